//! The `hubcast` binary: `serve` as a user runs it.

use std::process::Stdio;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::support::{event, within};

fn hubcast() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hubcast"));
    cmd.stdin(Stdio::null())
        .kill_on_drop(true)
        .env_remove("PORT");
    cmd
}

/// Starts `hubcast serve --port 0 ARGS` and reads the port from "Server up on ...".
async fn serve(args: &[&str]) -> (Child, u16) {
    let mut child = hubcast()
        .args(["serve", "--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = within(lines.next_line()).await.unwrap().unwrap();
    let addr = first.strip_prefix("Server up on ").expect(&first);
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    (child, port)
}

#[tokio::test]
async fn serve_announces_itself_relays_events_and_stops_on_sigterm() {
    let (mut child, port) = serve(&["--quiet"]).await;
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(event("pickup", json!({"orderID": 1})).as_bytes())
        .await
        .unwrap();
    let mut lines = BufReader::new(read).lines();
    let echo = within(lines.next_line()).await.unwrap().unwrap();
    assert_eq!(echo, r#"{"event":"pickup","payload":{"orderID":1}}"#);
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = within(child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "serve must exit 0 after SIGTERM");
    // The hub closed our connection on its way out.
    assert_eq!(within(lines.next_line()).await.unwrap(), None);
}

#[tokio::test]
async fn a_port_in_use_is_a_one_line_error_and_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = within(hubcast().args(["serve", "--port", &port]).output())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot listen on 127.0.0.1:") && stderr.contains("in use"),
        "{stderr}"
    );
}

#[tokio::test]
async fn bad_flags_exit_2_naming_the_problem() {
    for (args, needle) in [
        (&["serve", "--port", "seventy"][..], "--port"),
        (&["serve", "--max-frame", "lots"], "--max-frame"),
        (&["serve", "--drain-timeout", "soon"], "--drain-timeout"),
        (&["serve", "--frobnicate"], "--frobnicate"),
        (&["launch"], "launch"),
    ] {
        let output = within(hubcast().args(args).output()).await.unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn the_port_can_come_from_the_environment() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    let mut child = hubcast()
        .arg("serve")
        .env("PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within(lines.next_line()).await.unwrap().unwrap();
    assert_eq!(first, format!("Server up on 127.0.0.1:{port}"));
    child.kill().await.unwrap();
}
