//! Interop with clients written exactly as the Node.js class writes them.

use std::process::Stdio;

use hubcast::{Config, HubEvent};
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

use crate::support::{require, within, TestHub};

#[tokio::test]
async fn lecture_style_node_clients_talk_through_the_hub() {
    if !require("node") {
        return;
    }
    let hub = TestHub::start(Config::default()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/lecture-clients.js");
    let output = Command::new("node")
        .arg(script)
        .arg(hub.addr.port().to_string())
        .arg("50")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = within(output).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("delivered 50/50"), "{stdout}");
    assert!(stdout.contains("driver: closed cleanly"), "{stdout}");
    let pickups = hub.events_matching(
        |e| matches!(e, HubEvent::Event { event, .. } if event.name().as_str() == "pickup"),
    );
    assert_eq!(pickups.len(), 50);
    assert!(hub
        .events_matching(|e| matches!(e, HubEvent::Rejected { .. }))
        .is_empty());
}

/// Issue #4: a class-style client that never says hello hears every event while the
/// clients around it subscribe, join rooms and filter.
#[tokio::test]
async fn a_class_style_client_still_hears_everything_while_others_filter() {
    if !require("node") {
        return;
    }
    let hub = TestHub::start(Config::default()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/plain-listener.js");
    let mut node = Command::new("node")
        .arg(script)
        .arg(hub.addr.port().to_string())
        .arg("4")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run `node`");
    let mut stdout = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    assert_eq!(within(stdout.next_line()).await.unwrap().unwrap(), "ready");
    hub.wait_clients(1).await;
    let mut filtering = hub.connect().await;
    filtering
        .send(r#"{"event":"$subscribe","payload":{"events":["order.*"]}}{"event":"$join","payload":{"room":"acme"}}"#)
        .await;
    assert_eq!(filtering.json().await["event"], "$subscribed");
    assert_eq!(filtering.json().await["event"], "$joined");
    filtering
        .send(concat!(
            r#"{"event":"pickup","payload":1}"#,
            r#"{"event":"order.new","payload":2}"#,
            r#"{"event":"status","payload":3}"#,
            r#"{"event":"order.paid","payload":4}"#
        ))
        .await;
    // The filtering client hears only its matches (its own echo included).
    assert_eq!(filtering.json().await["event"], "order.new");
    assert_eq!(filtering.json().await["event"], "order.paid");
    let heard = within(stdout.next_line()).await.unwrap().unwrap();
    assert_eq!(heard, "heard pickup,order.new,status,order.paid");
    assert!(within(node.wait()).await.unwrap().success());
}

/// Issue #11 (10): the README's ten-line Node client, run as printed, splits on
/// newlines: it parses every event of a chunk that holds several, and one that arrives
/// split across chunks.
#[tokio::test]
async fn the_readme_node_client_parses_events_that_arrive_together_or_split() {
    if !require("node") {
        return;
    }
    let readme = include_str!("../../README.md");
    let start = readme
        .find("```js\n// hello.js")
        .expect("the README's Node client")
        + "```js\n".len();
    let script = &readme[start..start + readme[start..].find("```").unwrap()];
    let path = std::env::temp_dir().join(format!("hubcast-readme-{}.js", std::process::id()));
    std::fs::write(&path, script).unwrap();

    let hub = TestHub::start(Config::default()).await;
    let mut node = Command::new("node")
        .arg(&path)
        .env("PORT", hub.addr.port().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run `node`");
    let mut stdout = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    // Its own hello, echoed: it is connected and parsing.
    let first = within(stdout.next_line()).await.unwrap().unwrap();
    assert_eq!(first, "hello { from: 'node' }");
    // Two events in one write (one chunk for node), then one event too big for one
    // chunk (node reads at most 64 KiB at a time).
    let mut other = hub.connect().await;
    other
        .send(concat!(
            r#"{"event":"one","payload":1}"#,
            "\n",
            r#"{"event":"two","payload":2}"#
        ))
        .await;
    let big = "x".repeat(300_000);
    other
        .send(&format!(r#"{{"event":"three","payload":"{big}"}}"#))
        .await;
    for name in ["one", "two", "three"] {
        let line = within(stdout.next_line()).await.unwrap().unwrap();
        assert!(line.starts_with(&format!("{name} ")), "{line}");
    }
    node.kill().await.unwrap();
    let _ = std::fs::remove_file(&path);
}
