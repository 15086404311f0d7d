//! The hub's log (issue #11): a broken or slow log destination never stops the hub.

use serde_json::json;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::{event, within, HubProcess};

/// Issue #11 (1): `hubcast serve 2>&1 | head -2` used to wedge the hub once `head`
/// exited: tracing reported the failed write with `eprintln!`, which panicked on EPIPE
/// in whichever task was logging (the signal handler included). Now the log's reader
/// goes away and the hub goes on: it relays events, stops on SIGTERM with exit 0, and
/// lets go of its port.
#[tokio::test]
async fn the_hub_survives_its_log_reader_going_away() {
    let mut command = HubProcess::command(&["serve", "--port", "0"]);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut banner = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within(banner.next_line()).await.unwrap().unwrap();
    let port: u16 = first.rsplit(':').next().unwrap().parse().unwrap();
    // As `head -2` after `2>&1` (the banner is one of its two lines): read one log
    // line, then close the pipe.
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    within(log.next_line()).await.unwrap().unwrap();
    drop(log);
    // Plenty to log, into a pipe nobody reads.
    let mut a = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let b = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut b = BufReader::new(b);
    // In the pool before anything is sent (the answer to a `$ping` says so).
    b.get_mut()
        .write_all(b"{\"event\":\"$ping\",\"payload\":0}\n")
        .await
        .unwrap();
    let mut pong = String::new();
    within(b.read_line(&mut pong)).await.unwrap();
    assert!(pong.contains("$pong"), "{pong}");
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
