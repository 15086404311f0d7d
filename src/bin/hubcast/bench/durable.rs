//! `hubcast bench --durable publish|consume`: durable streams against a hub, NATS
//! JetStream and Redis Streams (issue #12).
//!
//! * `publish`: P publishers send K messages of S bytes, each with at most
//!   WINDOW/P unconfirmed; a message counts once the server confirmed it stored
//!   (hubcast `$stored`, the JetStream publish ack, the `XADD` reply). Reports
//!   confirmed messages per second and the publish → confirm latency.
//! * `consume`: the stream is first filled with K messages (not timed); then N
//!   members of one consumer (a work queue when N > 1) take them all, acknowledging
//!   each (hubcast `$ack` with a list per read, JetStream `+ACK` per message on a
//!   durable push consumer with a deliver group, Redis `XREADGROUP` + `XACK`), with at
//!   most WINDOW unacknowledged per member. Reports acknowledged deliveries per second.
//!
//! How durable each server is depends on how it was started (`--fsync` for the hub,
//! `sync_interval` for JetStream, `appendfsync` for Redis): `scripts/compare` starts
//! each both ways. The stream is `bench` (JetStream: stream `BENCH` on subject
//! `bench`); the hub must declare it: `hubcast serve --stream bench=bench`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::wire::{Kind, Target};
use super::Args;

/// Which durable workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Confirmed publishes.
    Publish,
    /// Consume with acks (after filling the stream).
    Consume,
}

#[derive(Debug, Serialize)]
struct Report {
    target: String,
    mode: &'static str,
    connections: usize,
    size: usize,
    window: usize,
    rate: Option<usize>,
    messages: u64,
    seconds: f64,
    per_second: f64,
    /// Publish → confirm, microseconds (publish mode).
    latency_us: Option<Latency>,
}

#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p99_9: u64,
    max: u64,
}

async fn run(args: &Args, target: &Target, mode: Mode) -> anyhow::Result<Report> {
    let run_id = format!("{:08x}", fastrand::u32(..));
    match mode {
        Mode::Publish => {
            setup_stream(target, args.replicas).await?;
            let Published {
                messages,
                seconds,
                latency,
                ..
            } = publish(args, target, args.pubs, args.events, &run_id).await?;
            Ok(Report {
                target: target.to_string(),
                mode: "publish",
                connections: args.pubs,
                size: args.size,
                window: args.window,
                rate: args.rate,
                messages,
                seconds,
                per_second: messages as f64 / seconds,
                latency_us: Some(latency),
            })
        }
        Mode::Consume => {
            setup_stream(target, args.replicas).await?;
            // Filled (confirmed) before the clock starts.
            let fill = Args {
                rate: None,
                window: args.window.max(1000),
                ..args.clone()
            };
            let filled = publish(&fill, target, 1, args.events, &run_id).await?;
            let (messages, seconds) = consume(args, target, &run_id, filled.first_seq).await?;
            Ok(Report {
                target: target.to_string(),
                mode: "consume",
                connections: args.subs,
                size: args.size,
                window: args.window,
                rate: None,
                messages,
                seconds,
                per_second: messages as f64 / seconds,
                latency_us: None,
            })
        }
    }
}

/// Prints the report as the fan-out bench does: a table, or JSON.
pub async fn main(
    args: &Args,
    target: &Target,
    mode: Mode,
) -> anyhow::Result<std::process::ExitCode> {
    if target.kind.websocket() {
        return super::usage("--durable measures hubcast://, nats:// and redis:// targets");
    }
    let report = run(args, target, mode).await?;
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        let mut text = format!(
            "{} {} x{} ({} B, window {}): {} messages in {:.2} s = {:.0}/s\n",
            report.target,
            report.mode,
            report.connections,
            report.size,
            report.window,
            report.messages,
            report.seconds,
            report.per_second
        );
        if let Some(l) = &report.latency_us {
            text.push_str(&format!(
                "publish -> confirm latency: p50 {} us, p90 {} us, p99 {} us, p99.9 {} us, max {} us\n",
                l.p50, l.p90, l.p99, l.p99_9, l.max
            ));
        }
        text
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
    Ok(std::process::ExitCode::SUCCESS)
}

const STREAM: &str = "bench";
const JS_STREAM: &str = "BENCH";

/// The reading side of a connection, with its buffer.
struct Reader {
    kind: Kind,
    read: tokio::net::tcp::OwnedReadHalf,
    buf: Vec<u8>,
    /// Where the next frame starts in `buf` (moving it down after every frame was
    /// two thirds of this client's time with thousands of frames per read).
    start: usize,
}

impl Reader {
    /// The next frame, reading as needed (NATS `PING`s are skipped: runs are far
    /// shorter than the server's ping interval).
    async fn next(&mut self) -> anyhow::Result<Frame> {
        loop {
            if let Some((frame, used)) = parse(self.kind, &self.buf[self.start..])? {
                self.start += used;
                if matches!(frame, Frame::Ping | Frame::Ok) {
                    continue;
                }
                return Ok(frame);
            }
            // What is left is part of a frame: moved to the front once per read.
            self.buf.drain(..self.start);
            self.start = 0;
            if self.read.read_buf(&mut self.buf).await? == 0 {
                bail!("the server closed the connection");
            }
        }
    }

    /// Whether a whole frame is already buffered.
    fn ready(&self) -> bool {
        let rest = &self.buf[self.start..];
        match self.kind {
            Kind::Hubcast => memchr::memchr(b'\n', rest).is_some(),
            kind => matches!(parse(kind, rest), Ok(Some(_))),
        }
    }
}

/// A connection speaking one of the three protocols.
struct Conn {
    reader: Reader,
    write: OwnedWriteHalf,
}

impl Conn {
    async fn open(target: &Target) -> anyhow::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(&target.addr)
            .await
            .with_context(|| format!("cannot connect to {target}"))?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut conn = Conn {
            reader: Reader {
                kind: target.kind,
                read,
                buf: Vec::with_capacity(64 << 10),
                start: 0,
            },
            write,
        };
        if target.kind == Kind::Nats {
            conn.write
                .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true}\r\nPING\r\n")
                .await?;
            loop {
                match conn.reader.next().await? {
                    Frame::Pong => break,
                    Frame::Error(e) => bail!("{target}: {e}"),
                    _ => {}
                }
            }
        }
        Ok(conn)
    }

    /// Sends a request and waits for its one answer (setup only).
    async fn request(&mut self, bytes: &[u8]) -> anyhow::Result<Frame> {
        self.write.write_all(bytes).await?;
        loop {
            match self.reader.next().await? {
                Frame::Pong => continue,
                frame => return Ok(frame),
            }
        }
    }
}

/// What a server sent.
#[derive(Debug)]
enum Frame {
    /// A hubcast line, a NATS MSG (subject, reply, payload), or a RESP value.
    Line(Vec<u8>),
    Msg {
        reply: Option<String>,
        payload: Vec<u8>,
    },
    Resp(Resp),
    Ping,
    Pong,
    Ok,
    Error(String),
}

#[derive(Debug)]
enum Resp {
    Simple(String),
    Int(#[allow(dead_code)] i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    memchr::memmem::find(&buf[from..], b"\r\n").map(|i| i + from)
}

fn parse(kind: Kind, buf: &[u8]) -> anyhow::Result<Option<(Frame, usize)>> {
    match kind {
        Kind::Ws | Kind::SocketIo => unreachable!("main refuses WebSocket targets"),
        Kind::Hubcast => Ok(memchr::memchr(b'\n', buf).map(|end| {
            let line = buf[..end].to_vec();
            if line.starts_with(b"{\"event\":\"$error\"") {
                (
                    Frame::Error(String::from_utf8_lossy(&line).into_owned()),
                    end + 1,
                )
            } else {
                (Frame::Line(line), end + 1)
            }
        })),
        Kind::Nats => parse_nats(buf),
        Kind::Redis => Ok(parse_resp(buf, 0)?.map(|(v, used)| match v {
            Resp::Simple(s) if s.starts_with('-') => (Frame::Error(s), used),
            v => (Frame::Resp(v), used),
        })),
    }
}

fn parse_nats(buf: &[u8]) -> anyhow::Result<Option<(Frame, usize)>> {
    let Some(end) = find_crlf(buf, 0) else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end])?;
    let mut words = line.split_ascii_whitespace();
    let op = words.next().unwrap_or("").to_ascii_uppercase();
    let after = end + 2;
    Ok(Some(match op.as_str() {
        "PING" => (Frame::Ping, after),
        "PONG" => (Frame::Pong, after),
        "+OK" => (Frame::Ok, after),
        "INFO" => (Frame::Ok, after),
        "-ERR" => (Frame::Error(line.to_owned()), after),
        "MSG" | "HMSG" => {
            let parts: Vec<&str> = words.collect();
            // MSG subject sid [reply] len; HMSG subject sid [reply] hlen tlen.
            let (reply, total, headers) = match (op.as_str(), parts.len()) {
                ("MSG", 3) => (None, parts[2].parse::<usize>()?, 0),
                ("MSG", 4) => (Some(parts[2]), parts[3].parse::<usize>()?, 0),
                ("HMSG", 4) => (None, parts[3].parse::<usize>()?, parts[2].parse::<usize>()?),
                ("HMSG", 5) => (
                    Some(parts[2]),
                    parts[4].parse::<usize>()?,
                    parts[3].parse::<usize>()?,
                ),
                _ => bail!("cannot read {line:?}"),
            };
            if buf.len() < after + total + 2 {
                return Ok(None);
            }
            let payload = buf[after + headers..after + total].to_vec();
            let reply = reply.map(str::to_owned);
            (Frame::Msg { reply, payload }, after + total + 2)
        }
        _ => bail!("unexpected from NATS: {line:?}"),
    }))
}

fn parse_resp(buf: &[u8], at: usize) -> anyhow::Result<Option<(Resp, usize)>> {
    let Some(end) = find_crlf(buf, at) else {
        return Ok(None);
    };
    if end == at {
        bail!("an empty RESP line");
    }
    let text = std::str::from_utf8(&buf[at + 1..end])?;
    let after = end + 2;
    Ok(match buf[at] {
        b'+' => Some((Resp::Simple(text.to_owned()), after)),
        b'-' => Some((Resp::Simple(format!("-{text}")), after)),
        b':' => Some((Resp::Int(text.parse()?), after)),
        b'$' => {
            let len: i64 = text.parse()?;
            if len < 0 {
                return Ok(Some((Resp::Bulk(None), after)));
            }
            let len = len as usize;
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            Some((
                Resp::Bulk(Some(buf[after..after + len].to_vec())),
                after + len + 2,
            ))
        }
        b'*' => {
            let len: i64 = text.parse()?;
            if len < 0 {
                return Ok(Some((Resp::Array(None), after)));
            }
            let mut items = Vec::with_capacity(len as usize);
            let mut next = after;
            for _ in 0..len {
                match parse_resp(buf, next)? {
                    Some((item, used)) => {
                        items.push(item);
                        next = used;
                    }
                    None => return Ok(None),
                }
            }
            Some((Resp::Array(Some(items)), next))
        }
        other => bail!("unexpected RESP type byte {other:?}"),
    })
}

fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A fresh, empty stream on the target (on JetStream, with `replicas`).
async fn setup_stream(target: &Target, replicas: u8) -> anyhow::Result<()> {
    let mut conn = Conn::open(target).await?;
    match target.kind {
        Kind::Ws | Kind::SocketIo => unreachable!("main refuses WebSocket targets"),
        // Declared by the hub (`--stream bench=bench`); a consumer name per run keeps
        // runs apart.
        Kind::Hubcast => Ok(()),
        Kind::Nats => {
            conn.write.write_all(b"SUB _INBOX.setup 1\r\n").await?;
            let delete = format!("PUB $JS.API.STREAM.DELETE.{JS_STREAM} _INBOX.setup 0\r\n\r\n");
            conn.request(delete.as_bytes()).await?;
            let config = format!(
                "{{\"name\":\"{JS_STREAM}\",\"subjects\":[\"{STREAM}\"],\"storage\":\"file\",\"retention\":\"limits\",\"discard\":\"old\",\"num_replicas\":{replicas}}}"
            );
            let create = format!(
                "PUB $JS.API.STREAM.CREATE.{JS_STREAM} _INBOX.setup {}\r\n{config}\r\n",
                config.len()
            );
            match conn.request(create.as_bytes()).await? {
                Frame::Msg { payload, .. } if !payload.windows(7).any(|w| w == b"\"error\"") => Ok(()),
                other => bail!("{target}: creating the JetStream stream failed: {other:?} (is JetStream on? nats-server -js)"),
            }
        }
        Kind::Redis => match conn.request(&resp(&[b"DEL", STREAM.as_bytes()])).await? {
            Frame::Resp(Resp::Int(_)) => Ok(()),
            other => bail!("{target}: DEL failed: {other:?}"),
        },
    }
}

/// A message body of `size` bytes, as each protocol carries it.
fn publish_frame(kind: Kind, size: usize, id: &str, msg_id: bool, out: &mut Vec<u8>) {
    match kind {
        Kind::Ws | Kind::SocketIo => unreachable!("main refuses WebSocket targets"),
        Kind::Hubcast => {
            // {"event":"bench","payload":"xxx","id":"..."}\n
            let fixed = 40 + id.len();
            let pad = size.saturating_sub(fixed).max(1);
            out.extend_from_slice(b"{\"event\":\"bench\",\"id\":\"");
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(b"\",\"payload\":\"");
            out.extend(std::iter::repeat_n(b'x', pad));
            out.extend_from_slice(b"\"}\n");
        }
        Kind::Nats if msg_id => {
            let header = format!("NATS/1.0\r\nNats-Msg-Id: {id}\r\n\r\n");
            let total = header.len() + size;
            out.extend_from_slice(
                format!("HPUB {STREAM} _INBOX.ack {} {total}\r\n", header.len()).as_bytes(),
            );
            out.extend_from_slice(header.as_bytes());
            out.extend(std::iter::repeat_n(b'x', size));
            out.extend_from_slice(b"\r\n");
        }
        Kind::Nats => {
            out.extend_from_slice(format!("PUB {STREAM} _INBOX.ack {size}\r\n").as_bytes());
            out.extend(std::iter::repeat_n(b'x', size));
            out.extend_from_slice(b"\r\n");
        }
        Kind::Redis => {
            let body = vec![b'x'; size];
            out.extend_from_slice(&resp(&[b"XADD", STREAM.as_bytes(), b"*", b"d", &body]));
        }
    }
}

/// Whether `frame` confirms one publish.
fn is_confirm(kind: Kind, frame: &Frame) -> anyhow::Result<bool> {
    Ok(match (kind, frame) {
        (Kind::Hubcast, Frame::Line(line)) => line.starts_with(b"{\"event\":\"$stored\""),
        (Kind::Nats, Frame::Msg { payload, .. }) => {
            if payload.windows(7).any(|w| w == b"\"error\"") {
                bail!(
                    "JetStream refused a publish: {}",
                    String::from_utf8_lossy(payload)
                );
            }
            true
        }
        (Kind::Redis, Frame::Resp(Resp::Bulk(Some(_)))) => true,
        (_, Frame::Error(e)) => bail!("the server refused a publish: {e}"),
        _ => false,
    })
}

/// What a publish run measured.
struct Published {
    messages: u64,
    seconds: f64,
    latency: Latency,
    /// The hub's seq of the first message (where a consumer of this run starts).
    first_seq: Option<u64>,
}

/// Runs `publishers` confirmed publishers over `events` messages.
async fn publish(
    args: &Args,
    target: &Target,
    publishers: usize,
    events: usize,
    run_id: &str,
) -> anyhow::Result<Published> {
    let histogram = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"),
    ));
    let first_seq = Arc::new(Mutex::new(None));
    let mut conns = Vec::new();
    for _ in 0..publishers {
        let mut conn = Conn::open(target).await?;
        if target.kind == Kind::Hubcast {
            // A durable publisher has no use for events back, its own or the other
            // publishers' (a hub client that never subscribes hears everything): like
            // JetStream's and Redis's publishers, it hears only its confirmations.
            // So: no echo, and a subscription to a name nobody sends.
            conn.write
                .write_all(
                    b"{\"event\":\"$hello\",\"payload\":{\"echo\":false}}\n\
                      {\"event\":\"$subscribe\",\"payload\":{\"events\":[\"bench.publisher.hears.nothing\"]}}\n",
                )
                .await?;
            loop {
                match conn.reader.next().await? {
                    Frame::Line(line) if line.starts_with(b"{\"event\":\"$subscribed\"") => break,
                    Frame::Error(e) => bail!("{target}: {e}"),
                    _ => {}
                }
            }
        }
        if target.kind == Kind::Nats {
            conn.write.write_all(b"SUB _INBOX.ack 1\r\n").await?;
            // The SUB is in place once the PONG comes back.
            conn.write.write_all(b"PING\r\n").await?;
            while !matches!(conn.reader.next().await?, Frame::Pong) {}
        }
        conns.push(conn);
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (p, conn) in conns.into_iter().enumerate() {
        let count = events / publishers + usize::from(p < events % publishers);
        let window = (args.window / publishers).max(1);
        let rate = args.rate.map(|r| (r as f64 / publishers as f64).max(1.0));
        let (size, kind, msg_id) = (args.size, target.kind, args.msg_id);
        let (histogram, first_seq) = (Arc::clone(&histogram), Arc::clone(&first_seq));
        // Ids unique to the run: the hub would take a repeat as a duplicate.
        let prefix = format!("{run_id}-p{p}");
        tasks.spawn(async move {
            let Conn {
                mut reader,
                mut write,
            } = conn;
            let permits = Semaphore::new(window);
            let sent_at: Mutex<VecDeque<Instant>> = Mutex::new(VecDeque::new());
            let writer = async {
                let mut out = Vec::with_capacity(64 << 10);
                let mut i = 0usize;
                let begin = tokio::time::Instant::now();
                while i < count {
                    permits.acquire().await?.forget();
                    let mut n = 1;
                    while n < 512 && i + n < count {
                        match permits.try_acquire() {
                            Ok(permit) => {
                                permit.forget();
                                n += 1;
                            }
                            Err(_) => break,
                        }
                    }
                    if let Some(rate) = rate {
                        // Paced: this message is due at i / rate; send what is due.
                        let due = begin + Duration::from_secs_f64(i as f64 / rate);
                        tokio::time::sleep_until(due).await;
                        let now = begin.elapsed().as_secs_f64();
                        let due_now = ((now * rate) as usize + 1).saturating_sub(i).max(1);
                        if due_now < n {
                            permits.add_permits(n - due_now);
                            n = due_now;
                        }
                    }
                    out.clear();
                    for k in 0..n {
                        publish_frame(kind, size, &format!("{prefix}-{}", i + k), msg_id, &mut out);
                    }
                    {
                        let now = Instant::now();
                        sent_at.lock().unwrap().extend(std::iter::repeat_n(now, n));
                    }
                    write.write_all(&out).await?;
                    i += n;
                }
                Ok::<(), anyhow::Error>(())
            };
            let confirms = async {
                let mut confirmed = 0;
                while confirmed < count {
                    let frame = reader.next().await?;
                    if !is_confirm(kind, &frame)? {
                        continue;
                    }
                    if confirmed == 0 && p == 0 {
                        if let Frame::Line(line) = &frame {
                            *first_seq.lock().unwrap() = seq_of(line);
                        }
                    }
                    confirmed += 1;
                    let sent = sent_at.lock().unwrap().pop_front();
                    if let Some(sent) = sent {
                        let micros = sent.elapsed().as_micros() as u64;
                        let _ = histogram.lock().unwrap().record(micros.max(1));
                    }
                    permits.add_permits(1);
                }
                Ok::<(), anyhow::Error>(())
            };
            tokio::try_join!(writer, confirms)?;
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let h = histogram.lock().unwrap();
    let first_seq = *first_seq.lock().unwrap();
    Ok(Published {
        messages: events as u64,
        seconds,
        latency: Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            max: h.max(),
        },
        first_seq,
    })
}

/// The `"seq"` of a hubcast `$stored` or delivery line.
fn seq_of(line: &[u8]) -> Option<u64> {
    let at = memchr::memmem::rfind(line, b"\"seq\":")? + 6;
    let digits = line[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&line[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Runs the members of one consumer until they have acknowledged `args.events`.
async fn consume(
    args: &Args,
    target: &Target,
    run_id: &str,
    first_seq: Option<u64>,
) -> anyhow::Result<(u64, f64)> {
    let members = args.subs;
    let consumer = format!("bench-{run_id}");
    let deliver = format!("deliver.{run_id}");
    let mut conns = Vec::new();
    for _ in 0..members {
        let mut conn = Conn::open(target).await?;
        if target.kind == Kind::Nats {
            conn.write
                .write_all(format!("SUB {deliver} q 1\r\nPING\r\n").as_bytes())
                .await?;
            while !matches!(conn.reader.next().await?, Frame::Pong) {}
        }
        conns.push(conn);
    }
    let mut setup = Conn::open(target).await?;
    let started = Instant::now();
    match target.kind {
        Kind::Ws | Kind::SocketIo => unreachable!("main refuses WebSocket targets"),
        Kind::Hubcast => {}
        Kind::Nats => {
            setup.write.write_all(b"SUB _INBOX.setup 1\r\n").await?;
            let config = format!(
                "{{\"stream_name\":\"{JS_STREAM}\",\"config\":{{\"durable_name\":\"{consumer}\",\"deliver_subject\":\"{deliver}\",\"deliver_group\":\"q\",\"deliver_policy\":\"all\",\"ack_policy\":\"explicit\",\"ack_wait\":60000000000,\"max_ack_pending\":{}}}}}",
                args.window * members
            );
            let create = format!(
                "PUB $JS.API.CONSUMER.DURABLE.CREATE.{JS_STREAM}.{consumer} _INBOX.setup {}\r\n{config}\r\n",
                config.len()
            );
            match setup.request(create.as_bytes()).await? {
                Frame::Msg { payload, .. } if !payload.windows(7).any(|w| w == b"\"error\"") => {}
                other => bail!("{target}: creating the JetStream consumer failed: {other:?}"),
            }
        }
        Kind::Redis => {
            let create = resp(&[
                b"XGROUP",
                b"CREATE",
                STREAM.as_bytes(),
                consumer.as_bytes(),
                b"0",
            ]);
            match setup.request(&create).await? {
                Frame::Resp(Resp::Simple(_)) => {}
                other => bail!("{target}: XGROUP CREATE failed: {other:?}"),
            }
        }
    }
    let total = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(Mutex::new(None::<Instant>));
    let goal = args.events as u64;
    let mut tasks = JoinSet::new();
    for (m, conn) in conns.into_iter().enumerate() {
        let (total, finished, consumer) =
            (Arc::clone(&total), Arc::clone(&finished), consumer.clone());
        let (kind, window) = (target.kind, args.window);
        tasks.spawn(async move {
            let Conn { mut reader, mut write } = conn;
            let count = |n: u64| {
                let now = total.fetch_add(n, Ordering::AcqRel) + n;
                if now >= goal {
                    finished.lock().unwrap().get_or_insert_with(Instant::now);
                }
                now >= goal
            };
            match kind {
                Kind::Ws | Kind::SocketIo => unreachable!("main refuses WebSocket targets"),
                Kind::Hubcast => {
                    let mut request = serde_json::json!({"stream": STREAM, "consumer": consumer, "max_in_flight": window, "ack_wait": "60s"});
                    if let Some(seq) = first_seq {
                        request["start"] = serde_json::json!(seq);
                    }
                    let line = format!("{}\n", serde_json::json!({"event": "$consume", "payload": request}));
                    write.write_all(line.as_bytes()).await?;
                    let mut seqs = Vec::new();
                    loop {
                        match reader.next().await? {
                            Frame::Line(line) if line.starts_with(b"{\"event\":\"bench\"") => {
                                seqs.extend(seq_of(&line));
                            }
                            Frame::Error(e) => bail!("the hub refused: {e}"),
                            _ => {}
                        }
                        if !reader.ready() && !seqs.is_empty() {
                            let ack = format!(
                                "{{\"event\":\"$ack\",\"payload\":{{\"consumer\":\"{consumer}\",\"seq\":{}}}}}\n",
                                serde_json::to_string(&seqs)?
                            );
                            write.write_all(ack.as_bytes()).await?;
                            if count(seqs.len() as u64) {
                                return Ok(());
                            }
                            seqs.clear();
                        }
                    }
                }
                Kind::Nats => {
                    let mut acks = Vec::new();
                    let mut n = 0u64;
                    loop {
                        match reader.next().await? {
                            Frame::Msg { reply: Some(reply), .. } if reply.starts_with("$JS.ACK") => {
                                acks.extend_from_slice(format!("PUB {reply} 0\r\n\r\n").as_bytes());
                                n += 1;
                            }
                            Frame::Error(e) => bail!("NATS: {e}"),
                            _ => {}
                        }
                        if !reader.ready() && n > 0 {
                            write.write_all(&acks).await?;
                            acks.clear();
                            if count(std::mem::take(&mut n)) {
                                return Ok(());
                            }
                        }
                    }
                }
                Kind::Redis => {
                    let name = format!("m{m}");
                    let window = window.to_string();
                    let read = resp(&[
                        b"XREADGROUP", b"GROUP", consumer.as_bytes(), name.as_bytes(), b"COUNT",
                        window.as_bytes(), b"BLOCK", b"100", b"STREAMS", STREAM.as_bytes(), b">",
                    ]);
                    write.write_all(&read).await?;
                    loop {
                        let ids = match reader.next().await? {
                            Frame::Resp(Resp::Array(Some(streams))) => entry_ids(streams),
                            Frame::Resp(Resp::Array(None)) => Vec::new(),
                            Frame::Resp(Resp::Int(_)) => continue, // an XACK's reply
                            Frame::Error(e) => bail!("Redis: {e}"),
                            other => bail!("Redis: unexpected {other:?}"),
                        };
                        let mut out = Vec::new();
                        if !ids.is_empty() {
                            let mut ack: Vec<&[u8]> = vec![b"XACK", STREAM.as_bytes(), consumer.as_bytes()];
                            ack.extend(ids.iter().map(Vec::as_slice));
                            out.extend_from_slice(&resp(&ack));
                        }
                        out.extend_from_slice(&read);
                        write.write_all(&out).await?;
                        if !ids.is_empty() && count(ids.len() as u64) {
                            return Ok(());
                        }
                        if total.load(Ordering::Acquire) >= goal {
                            return Ok(());
                        }
                    }
                }
            }
        });
    }
    // Done once the goal is reached (members still waiting for more are stopped).
    while let Some(done) = tasks.join_next().await {
        done??;
        if total.load(Ordering::Acquire) >= goal {
            break;
        }
    }
    tasks.abort_all();
    let end = finished.lock().unwrap().unwrap_or_else(Instant::now);
    Ok((total.load(Ordering::Acquire), (end - started).as_secs_f64()))
}

/// The entry ids of an `XREADGROUP` reply: `[[stream, [[id, [field, value]], ...]]]`.
fn entry_ids(streams: Vec<Resp>) -> Vec<Vec<u8>> {
    let mut ids = Vec::new();
    for stream in streams {
        let Resp::Array(Some(mut parts)) = stream else {
            continue;
        };
        let Some(Resp::Array(Some(entries))) = parts.pop() else {
            continue;
        };
        for entry in entries {
            if let Resp::Array(Some(mut fields)) = entry {
                if let Some(Resp::Bulk(Some(id))) = fields.drain(..).next() {
                    ids.push(id);
                }
            }
        }
    }
    ids
}
