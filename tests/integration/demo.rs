//! The delivery demo end to end: `serve`, `driver` and `vendor` as three processes.

use std::collections::HashMap;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::support::within;

fn hubcast(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hubcast"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info")
        .env_remove("PORT")
        .kill_on_drop(true);
    cmd
}

/// Issue #3: the vendor thanks for all 20 orders and exits 0, and the hub's log shows
/// every order going pickup → in-transit → delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_and_driver_deliver_twenty_orders_through_the_hub() {
    let mut serve = hubcast(&["serve", "--port", "0"]).spawn().unwrap();
    let mut banner = BufReader::new(serve.stdout.take().unwrap()).lines();
    let first = within(banner.next_line()).await.unwrap().unwrap();
    let port = first.rsplit(':').next().unwrap().to_string();
    // Collect the hub's log as it is written, so its pipe never fills.
    let (log_tx, mut log) = mpsc::unbounded_channel();
    let mut stderr = BufReader::new(serve.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            let _ = log_tx.send(line);
        }
    });
    let mut hub_log = Vec::new();
    let mut wait_log = async |needle: &str, hub_log: &mut Vec<String>| loop {
        let line = within(log.recv()).await.expect("the hub exited");
        let found = line.contains(needle);
        hub_log.push(line);
        if found {
            return;
        }
    };

    let driver = hubcast(&[
        "driver",
        "--port",
        &port,
        "--pickup-delay",
        "10ms",
        "--deliver-delay",
        "30ms",
    ])
    .spawn()
    .unwrap();
    // The driver is in the pool before the first order goes out.
    wait_log("connection", &mut hub_log).await;
    let vendor = hubcast(&[
        "vendor",
        "--port",
        &port,
        "--store",
        "acme",
        "--count",
        "20",
        "--interval",
        "50ms",
    ])
    .output();
    let vendor = within(vendor).await.unwrap();
    let stdout = String::from_utf8_lossy(&vendor.stdout);
    assert!(
        vendor.status.success(),
        "vendor failed: {}",
        String::from_utf8_lossy(&vendor.stderr)
    );
    let thanks: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("Thank you for delivering order "))
        .collect();
    assert_eq!(thanks.len(), 20, "{stdout}");

    drop(driver);
    let pid = serve.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(within(serve.wait()).await.unwrap().success());
    while let Some(line) = log.recv().await {
        hub_log.push(line);
    }

    // Each order's events, in the order the hub logged them.
    let mut stages: HashMap<String, Vec<String>> = HashMap::new();
    for line in &hub_log {
        let Some(rest) = line.split("EVENT ").nth(1) else {
            continue;
        };
        let name = rest.split(' ').next().unwrap().to_string();
        let Some(id) = rest
            .split("orderID=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        stages.entry(id.to_string()).or_default().push(name);
    }
    for id in thanks {
        assert_eq!(
            stages.get(id).map(Vec::as_slice),
            Some(
                &[
                    "pickup".to_string(),
                    "in-transit".to_string(),
                    "delivered".to_string()
                ][..]
            ),
            "order {id}"
        );
    }
}
