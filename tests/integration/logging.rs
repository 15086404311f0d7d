//! The hub's log (issue #11): a broken or slow log destination never stops the hub.

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::{connect_in_pool, event, within, HubProcess};

/// Issue #11 (1): `hubcast serve 2>&1 | head -2` used to wedge the hub once `head`
/// exited: tracing reported the failed write with `eprintln!`, which panicked on EPIPE
/// in whichever task was logging (the signal handler included). Now the log's reader
/// goes away and the hub goes on: it relays events, stops on SIGTERM with exit 0, and
/// lets go of its port.
#[tokio::test]
async fn the_hub_survives_its_log_reader_going_away() {
    let (mut child, port) =
        HubProcess::spawn_raw(HubProcess::command(&["serve", "--port", "0"])).await;
    // As `head -2` after `2>&1` (the banner is one of its two lines): read one log
    // line, then close the pipe.
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    within(log.next_line()).await.unwrap().unwrap();
    drop(log);
    // Plenty to log, into a pipe nobody reads.
    let mut a = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // In the pool before anything is sent.
    let mut b = connect_in_pool(port).await;
    for n in 0..200 {
        a.write_all(format!("{}\n", event("tick", json!(n))).as_bytes())
            .await
            .unwrap();
    }
    a.write_all(b"{\"event\":\"last\",\"payload\":0}\n")
        .await
        .unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        within(b.read_line(&mut line)).await.unwrap();
        assert!(!line.is_empty(), "the hub closed the connection");
        if line.contains("\"last\"") {
            break;
        }
    }
    // SIGTERM is still heard.
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    // It exits (0), and with it goes its port.
    let status = within(child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

/// Issue #11 (2): per-event logging ran on the connection that routed the event, and
/// wrote synchronously: a log destination that stopped reading (a full pipe) stopped
/// routing. Now a stalled log costs routing nothing: with its stderr pipe never read,
/// the hub still relays 20,000 events (far more log than a pipe holds), and once the
/// log is read again it says how many lines it skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_never_stalls_routing_and_skipped_lines_are_counted() {
    const EVENTS: usize = 20_000;
    let (mut child, port) =
        HubProcess::spawn_raw(HubProcess::command(&["serve", "--port", "0"])).await;
    // Held, not read: the pipe (64 KiB) fills after a few hundred lines.
    let stderr = child.stderr.take().unwrap();
    let mut a = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut b = connect_in_pool(port).await;
    let mut line = String::new();
    let payload = "p".repeat(100);
    let sender = tokio::spawn(async move {
        let mut batch = String::new();
        for n in 0..EVENTS {
            batch.push_str(&event("tick", json!({ "n": n, "pad": payload })));
            batch.push('\n');
            if batch.len() > 32 << 10 {
                a.write_all(batch.as_bytes()).await.unwrap();
                batch.clear();
            }
        }
        a.write_all(batch.as_bytes()).await.unwrap();
        a
    });
    let mut received = 0;
    while received < EVENTS {
        line.clear();
        within(b.read_line(&mut line)).await.unwrap();
        assert!(!line.is_empty(), "the hub closed the connection");
        received += usize::from(line.contains("\"tick\""));
    }
    let _a = sender.await.unwrap();
    // Now read the log: somewhere in it, the count of what was skipped.
    let mut log = BufReader::new(stderr).lines();
    let skipped = within(async {
        while let Some(line) = log.next_line().await.unwrap() {
            if line.contains("skipped") {
                return line;
            }
        }
        panic!("the log ended without saying what it skipped");
    })
    .await;
    assert!(skipped.contains("skipped"), "{skipped}");
    child.kill().await.unwrap();
}

/// A flood of refused connections does not flood the log: at most ten refusals a
/// second are logged one by one, the rest as a count once the second is over, and
/// every refusal is in one or the other. Each line names the limit that refused.
#[tokio::test]
async fn refusals_past_ten_a_second_are_logged_as_a_count() {
    const ATTEMPTS: usize = 40;
    let (mut child, port) = HubProcess::spawn_raw(HubProcess::command(&[
        "serve",
        "--port",
        "0",
        "--max-conns",
        "1",
    ]))
    .await;
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    // The one connection the hub may serve, in the pool before the others come.
    let _held = connect_in_pool(port).await;
    let mut line = String::new();
    for _ in 0..ATTEMPTS {
        let mut refused = BufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
        line.clear();
        within(refused.read_line(&mut line)).await.unwrap();
        assert!(line.contains("too_many_connections"), "{line}");
    }
    let (mut one_by_one, mut counted) = (0, 0);
    within(async {
        while one_by_one + counted < ATTEMPTS {
            let line = log.next_line().await.unwrap().expect("the log ended");
            if line.contains("refused: at the connection limit") {
                one_by_one += 1;
            } else if let Some(rest) = line.split_once("refused ").map(|(_, rest)| rest) {
                if let Some((n, _)) = rest.split_once(" more connections within the second") {
                    counted += n.parse::<usize>().unwrap();
                }
            }
        }
    })
    .await;
    assert_eq!(one_by_one + counted, ATTEMPTS);
    assert!(
        one_by_one < ATTEMPTS && counted > 0,
        "{one_by_one} logged one by one, {counted} counted"
    );
    child.kill().await.unwrap();
}
