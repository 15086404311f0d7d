//! Soak test driver (run it through `scripts/soak`): 1,000 connections to a hub on
//! loopback, mixing steady subscribers, slow readers, publishers, garbage senders and
//! clients that disconnect at random, for a bounded time. Then it checks that every
//! steady subscriber got every event, that every event a slow reader missed was
//! reported to it, and prints what happened, with the hub's memory over the run.
//!
//! Usage: soak PORT HUB_PID [SECONDS] [CONNECTIONS]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// Each publisher's pace: with 50 publishers and ~850 readers, about 400,000
/// deliveries per second, which two cores sustain for the hub and this driver.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    delivered: AtomicU64,
    reported_dropped: AtomicU64,
    garbage_sent: AtomicU64,
    churned: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn error(&self, code: &str) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(code.to_string())
            .or_default() += 1;
    }
}

/// How one reader fared: events received and drops reported to it.
struct Reading {
    received: u64,
    dropped: u64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: soak PORT HUB_PID [SECONDS] [CONNECTIONS]");
        std::process::exit(2);
    }
    let port: u16 = args[1].parse()?;
    let pid: u32 = args[2].parse()?;
    let seconds: u64 = args.get(3).map_or(Ok(60), |s| s.parse())?;
    let connections: usize = args.get(4).map_or(Ok(1000), |s| s.parse())?;
    // Share of each role: most connections just listen.
    let publishers = connections / 20;
    let slow = connections / 20;
    let garbage = connections / 20;
    let churners = connections / 20;
    let steady = connections - publishers - slow - garbage - churners;

    let tally = Arc::new(Tally::default());
    let running = Arc::new(AtomicBool::new(true));
    let rss = Arc::new(Mutex::new(Vec::new()));
    let sampling = tokio::spawn(sample_rss(pid, Arc::clone(&rss)));
    let start_rss = rss_kib(pid);

    // Readers first, each proven in the pool (a `$ping` answered) before anything is sent.
    let mut readers = JoinSet::new();
    for i in 0..steady + slow {
        let stream = if i < steady {
            connect(port).await?
        } else {
            connect_slow(port).await?
        };
        let mut lines = BufReader::new(stream);
        lines
            .get_mut()
            .write_all(b"{\"event\":\"$ping\",\"payload\":null}\n")
            .await?;
        let mut pong = String::new();
        lines.read_line(&mut pong).await?;
        let tally = Arc::clone(&tally);
        readers.spawn(read_until_end(
            lines,
            i >= steady,
            Arc::clone(&running),
            tally,
        ));
    }
    println!("soak: {steady} steady and {slow} slow readers connected; running {seconds} s with {publishers} publishers, {garbage} garbage senders, {churners} churners");

    let mut load = JoinSet::new();
    for p in 0..publishers {
        load.spawn(publish(port, p, Arc::clone(&running), Arc::clone(&tally)));
    }
    for _ in 0..garbage {
        load.spawn(send_garbage(port, Arc::clone(&running), Arc::clone(&tally)));
    }
    for c in 0..churners {
        load.spawn(churn(
            port,
            c as u64,
            Arc::clone(&running),
            Arc::clone(&tally),
        ));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    running.store(false, Ordering::SeqCst);
    while let Some(done) = load.join_next().await {
        done??;
    }
    // Everything is sent; the end marker follows every event on each connection.
    let mut marker = connect(port).await?;
    marker
        .write_all(b"{\"event\":\"soak.end\",\"payload\":null}\n")
        .await?;
    let sent = tally.sent.load(Ordering::SeqCst);
    let (mut kept_up, mut fell_behind, mut short) = (0, 0, Vec::new());
    while let Some(reading) = readers.join_next().await {
        let reading = reading??;
        if reading.received + reading.dropped != sent {
            short.push((reading.received, reading.dropped));
        } else if reading.dropped == 0 {
            kept_up += 1;
        } else {
            fell_behind += 1;
        }
    }
    drop(marker);
    // Give the hub a moment to release the connections, then read its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end_rss = rss_kib(pid);
    sampling.abort();
    let peak_rss = rss.lock().unwrap().iter().copied().max().unwrap_or(0);

    println!("events sent by publishers:     {sent}");
    println!(
        "events delivered to readers:   {}",
        tally.delivered.load(Ordering::SeqCst)
    );
    println!(
        "readers that got every event:  {kept_up} of {}",
        steady + slow
    );
    println!("readers that fell behind:      {fell_behind} (every missed event reported to them: {} in all)", tally.reported_dropped.load(Ordering::SeqCst));
    println!(
        "garbage frames sent:           {}",
        tally.garbage_sent.load(Ordering::SeqCst)
    );
    println!(
        "random disconnects:            {}",
        tally.churned.load(Ordering::SeqCst)
    );
    println!(
        "$error codes received:         {:?}",
        tally.errors.lock().unwrap()
    );
    println!("hub RSS (KiB):                 start {start_rss}, peak {peak_rss}, end {end_rss}");
    if !short.is_empty() {
        println!(
            "FAIL: {} readers got neither every event nor a report of what they missed: {:?}",
            short.len(),
            &short[..short.len().min(5)]
        );
        std::process::exit(1);
    }
    println!("OK: every event reached every reader or was reported dropped to it");
    Ok(())
}

async fn connect(port: u16) -> std::io::Result<TcpStream> {
    TcpStream::connect(("127.0.0.1", port)).await
}

/// A connection with a tiny receive window: the hub easily fills it.
async fn connect_slow(port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    socket.connect(([127, 0, 0, 1], port).into()).await
}

/// Reads events until the end marker. Slow readers read far slower than events come
/// while the load runs (so the hub must drop for them), then catch up.
async fn read_until_end(
    mut lines: BufReader<TcpStream>,
    slow: bool,
    running: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> std::io::Result<Reading> {
    let mut reading = Reading {
        received: 0,
        dropped: 0,
    };
    let mut line = String::new();
    let mut since_pause = 0;
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("the hub closed a reader"));
        }
        if line.starts_with("{\"event\":\"soak.tick\"") {
            reading.received += 1;
            tally.delivered.fetch_add(1, Ordering::Relaxed);
            since_pause += 1;
            if slow && since_pause >= 50 && running.load(Ordering::Relaxed) {
                since_pause = 0;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            continue;
        }
        let frame: Value = serde_json::from_str(&line).map_err(std::io::Error::other)?;
        match frame["event"].as_str() {
            Some("soak.end") => return Ok(reading),
            Some("$error") => {
                let code = frame["payload"]["code"].as_str().unwrap_or("?");
                tally.error(code);
                if code == "events_dropped" {
                    let count = frame["payload"]["count"].as_u64().unwrap_or(0);
                    reading.dropped += count;
                    tally.reported_dropped.fetch_add(count, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }
}

/// Sends an event every [`PUBLISH_EVERY`]. It subscribes to a name no one uses, so it
/// hears nothing and needs to read nothing.
async fn publish(
    port: u16,
    id: usize,
    running: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> std::io::Result<()> {
    let mut stream = connect(port).await?;
    stream
        .write_all(b"{\"event\":\"$subscribe\",\"payload\":{\"events\":[\"soak.nobody\"]}}\n")
        .await?;
    let mut seq = 0u64;
    let pad = "p".repeat(64);
    while running.load(Ordering::SeqCst) {
        seq += 1;
        let event = json!({"event": "soak.tick", "payload": {"from": id, "seq": seq, "pad": pad}});
        stream.write_all(event.to_string().as_bytes()).await?;
        tally.sent.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(PUBLISH_EVERY).await;
    }
    // Closing cleanly lets the hub read everything first.
    stream.shutdown().await?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await?;
    Ok(())
}

/// Sends bad frames now and then, and sometimes a burst past the error budget.
async fn send_garbage(
    port: u16,
    running: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> std::io::Result<()> {
    let junk: [&[u8]; 4] = [
        b"not json\n",
        b"{\"event\":\"\",\"payload\":1}\n",
        b"{\"event\":\"$nope\",\"payload\":1}\n",
        b"\xff\xfe\n",
    ];
    let mut round = 0u64;
    while running.load(Ordering::SeqCst) {
        let stream = connect(port).await?;
        let (read, mut write) = stream.into_split();
        let reading = tokio::spawn(drain_errors(read, Arc::clone(&tally)));
        let burst = if round % 5 == 4 { 20 } else { 3 };
        for i in 0..burst {
            if write
                .write_all(junk[(round as usize + i) % junk.len()])
                .await
                .is_err()
            {
                break;
            }
            tally.garbage_sent.fetch_add(1, Ordering::Relaxed);
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(write);
        let _ = reading.await;
    }
    Ok(())
}

/// Counts the `$error`s a garbage sender gets back (it ignores events).
async fn drain_errors(read: tokio::net::tcp::OwnedReadHalf, tally: Arc<Tally>) {
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.starts_with("{\"event\":\"$error\"") {
            if let Ok(frame) = serde_json::from_str::<Value>(&line) {
                tally.error(frame["payload"]["code"].as_str().unwrap_or("?"));
            }
        }
    }
}

/// Connects, listens a while, vanishes (sometimes mid-frame), and comes back.
async fn churn(
    port: u16,
    seed: u64,
    running: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> std::io::Result<()> {
    let mut rng = fastrand::Rng::with_seed(seed);
    while running.load(Ordering::SeqCst) {
        let mut stream = connect(port).await?;
        if rng.bool() {
            stream.write_all(b"{\"event\":\"half\",\"payl").await?;
        }
        let mut buf = vec![0; 4096];
        let stay = Duration::from_millis(rng.u64(10..400));
        let until = Instant::now() + stay;
        while Instant::now() < until {
            match tokio::time::timeout(until - Instant::now(), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(_)) => {}
            }
        }
        drop(stream);
        tally.churned.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

async fn sample_rss(pid: u32, samples: Arc<Mutex<Vec<u64>>>) {
    loop {
        samples.lock().unwrap().push(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
