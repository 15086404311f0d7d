//! The delivery demo end to end: `serve`, `driver` and `vendor`s as separate processes.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;

use tokio::io::AsyncBufReadExt;
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

/// A free port outside the range the kernel hands out to outgoing connections, so a
/// restarted hub can bind it again.
fn quiet_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..30_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Issue #12 (5): the delivery demo, durable. The vendor stores 20 orders with no
/// driver running; the hub is killed with SIGKILL and restarted; two drivers start
/// and share the work queue. The vendor thanks for all 20 exactly once, and each
/// order was picked up by exactly one driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_demo_survives_kill_9_and_shares_orders_between_two_drivers() {
    let dir = std::env::temp_dir().join(format!(
        "hubcast-demo-durable-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let data_dir = dir.display().to_string();
    let port = quiet_port().to_string();
    let serve = [
        "serve",
        "--port",
        &port,
        "--stream",
        "orders=pickup,in-transit,delivered",
        "--data-dir",
        &data_dir,
    ];
    let hub = HubProcess::spawn(HubProcess::command(&serve)).await;
    let mut vendor = hubcast(&[
        "vendor",
        "--port",
        &port,
        "--store",
        "acme",
        "--count",
        "20",
        "--interval",
        "5ms",
        "--durable",
        "--timeout",
        "60s",
    ])
    .spawn()
    .unwrap();
    // Every order is stored before the hub dies.
    let mut log = tokio::io::BufReader::new(vendor.stderr.take().unwrap()).lines();
    loop {
        let line = within(log.next_line())
            .await
            .unwrap()
            .expect("the vendor exited");
        if line.contains("all orders stored") {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    hub.kill9().await;
    let hub = HubProcess::spawn(HubProcess::command(&serve)).await;
    let driver = |port: &str| {
        hubcast(&[
            "driver",
            "--port",
            port,
            "--durable",
            "--capacity",
            "4",
            "--pickup-delay",
            "10ms",
            "--deliver-delay",
            "20ms",
        ])
        .spawn()
        .unwrap()
    };
    let drivers = [driver(&port), driver(&port)];
    let output = within(vendor.wait_with_output()).await.unwrap();
    assert!(output.status.success(), "the vendor failed");
    let thanks: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("Thank you for delivering order "))
        .map(str::to_string)
        .collect();
    assert_eq!(thanks.len(), 20, "{thanks:?}");
    assert_eq!(
        thanks.iter().collect::<HashSet<_>>().len(),
        20,
        "thanked twice"
    );
    // Each order picked up by one driver, once.
    let mut pickups: HashMap<String, usize> = HashMap::new();
    let mut per_driver = Vec::new();
    for mut driver in drivers {
        driver.start_kill().unwrap();
        let output = within(driver.wait_with_output()).await.unwrap();
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let mine: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("DRIVER: picked up "))
            .map(str::to_string)
            .collect();
        per_driver.push(mine.len());
        for id in mine {
            *pickups.entry(id).or_default() += 1;
        }
    }
    for id in &thanks {
        assert_eq!(pickups.get(id), Some(&1), "order {id}: {pickups:?}");
    }
    assert!(
        per_driver.iter().all(|&n| n > 0),
        "one driver did everything: {per_driver:?}"
    );
    hub.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
