//! Interop with clients written exactly as the Node.js lecture writes them.

use std::process::Stdio;

use hubcast::{Config, HubEvent};
use tokio::process::Command;

use crate::support::{within, TestHub};

#[tokio::test]
async fn lecture_style_node_clients_talk_through_the_hub() {
    let hub = TestHub::start(Config::default()).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/lecture-clients.js");
    let output = Command::new("node")
        .arg(script)
        .arg(hub.addr.port().to_string())
        .arg("50")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = within(output)
        .await
        .expect("cannot run `node`: install Node.js (the README's test command needs it)");
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
