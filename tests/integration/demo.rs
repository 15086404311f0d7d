//! The delivery demo end to end: `serve`, `driver` and `vendor`s as separate processes.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::support::{within, HubProcess};

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

fn driver(port: &str) -> Child {
    hubcast(&[
        "driver",
        "--port",
        port,
        "--pickup-delay",
        "10ms",
        "--deliver-delay",
        "30ms",
    ])
    .spawn()
    .unwrap()
}

/// Runs a vendor to completion; returns the orders it thanked for.
async fn vendor(port: &str, store: &str, count: &str) -> Vec<String> {
    let output = hubcast(&[
        "vendor",
        "--port",
        port,
        "--store",
        store,
        "--count",
        count,
        "--interval",
        "50ms",
    ])
    .output();
    let output = within(output).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "vendor {store} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("Thank you for delivering order "))
        .map(str::to_string)
        .collect()
}

/// Each order's events in the order the hub logged them, with their receiver counts.
fn stages(log: &[String]) -> HashMap<String, Vec<(String, String)>> {
    let mut stages: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for line in log {
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
        let receivers = rest.split("receivers=").nth(1).unwrap_or("?").to_string();
        stages
            .entry(id.to_string())
            .or_default()
            .push((name, receivers));
    }
    stages
}

/// Issue #3: the vendor thanks for all 20 orders and exits 0, and the hub's log shows
/// every order going pickup → in-transit → delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_and_driver_deliver_twenty_orders_through_the_hub() {
    let mut hub = HubProcess::spawn(HubProcess::command(&["serve", "--port", "0"])).await;
    let port = hub.port.to_string();
    let _driver = driver(&port);
    // The driver is in the pool before the first order goes out.
    hub.wait_log("connection", 1).await;
    let thanks = vendor(&port, "acme", "20").await;
    assert_eq!(thanks.len(), 20);
    let stages = stages(&hub.stop().await);
    for id in thanks {
        let names: Vec<&str> = stages[&id].iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["pickup", "in-transit", "delivered"], "order {id}");
    }
}

/// Issue #4: with rooms, two vendors each hear (and thank for) only their own orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vendors_each_hear_only_their_own_deliveries() {
    let mut hub = HubProcess::spawn(HubProcess::command(&["serve", "--port", "0"])).await;
    let port = hub.port.to_string();
    let _driver = driver(&port);
    hub.wait_log("connection", 1).await;
    let (acme, zeta) = tokio::join!(vendor(&port, "acme", "8"), vendor(&port, "zeta", "8"));
    assert_eq!(acme.len(), 8);
    assert_eq!(zeta.len(), 8);
    let acme: HashSet<String> = acme.into_iter().collect();
    assert!(
        zeta.iter().all(|id| !acme.contains(id)),
        "a vendor thanked for the other's order"
    );
    let stages = stages(&hub.stop().await);
    for id in acme.iter().chain(&zeta) {
        let updates: Vec<&(String, String)> = stages[id].iter().skip(1).collect();
        // Updates go to the store's room only. Its vendor subscribes to `delivered`
        // alone, so `delivered` reaches exactly that vendor and `in-transit` no one.
        let expected = [("in-transit", "0"), ("delivered", "1")];
        let got: Vec<(&str, &str)> = updates
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_str()))
            .collect();
        assert_eq!(got, expected, "order {id}");
    }
}
