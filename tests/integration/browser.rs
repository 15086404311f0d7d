//! Issue #14: the dashboard in a real browser (Debian's Chromium driven by
//! playwright-core, tests/browser/dashboard.mjs), with this test as the TCP side.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use hubcast::Config;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::support::{event, require, require_file, within, TestHub};

const BROWSER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");

/// Chromium and playwright-core are there (in CI they must be: `.ci/run` installs them).
fn browser_available() -> bool {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    require("node")
        && require_file(Path::new(&chromium), "Chromium")
        && require_file(
            &Path::new(BROWSER_DIR).join("node_modules/playwright-core"),
            "playwright-core (npm ci in tests/browser)",
        )
}

/// Runs a browser script to the end; returns its stdout once it succeeded.
async fn run_script(script: &str, args: &[&str]) -> String {
    let output = Command::new("node")
        .arg(Path::new(BROWSER_DIR).join(script))
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = within(output).await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script}: {stdout}\n{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_hub_live_in_a_real_browser() {
    if !browser_available() {
        return;
    }
    // A stream and a consumer, so that the dashboard shows them too.
    let data = std::env::temp_dir().join(format!("hubcast-browser-{}", std::process::id()));
    let config = Config::builder()
        .streams(vec![hubcast::StreamSpec::new("ticks", &["tick"])])
        .data_dir(data.clone())
        .fsync(hubcast::store::Fsync::Never)
        .build()
        .unwrap();
    let hub = TestHub::start_http(config).await;
    let http = hub.http.unwrap();
    let mut audit = hub.connect().await;
    audit
        .send(event("$consume", json!({"stream": "ticks", "consumer": "audit"})) + "\n")
        .await;
    assert_eq!(audit.json().await["event"], "$consuming");
    // HUBCAST_SCREENSHOTS=docs/screenshots keeps them (the README shows those).
    let keep = std::env::var_os("HUBCAST_SCREENSHOTS");
    let shots = match &keep {
        Some(dir) => Path::new(env!("CARGO_MANIFEST_DIR")).join(dir),
        None => std::env::temp_dir().join(format!("hubcast-shots-{}", std::process::id())),
    };
    std::fs::create_dir_all(&shots).unwrap();
    let mut browser = Command::new("node")
        .arg(Path::new(BROWSER_DIR).join("dashboard.mjs"))
        .arg(http.to_string())
        .arg(&shots)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut to_browser = browser.stdin.take().unwrap();
    let mut from_browser = BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut step = async |word: &str| {
        let line = within(from_browser.next_line()).await.unwrap();
        assert_eq!(
            line.as_deref(),
            Some(word),
            "the browser script stopped short"
        );
    };

    // A TCP client that hears only what the browser publishes.
    let mut listener = hub.connect().await;
    listener
        .send(event("$subscribe", json!({"events": ["from-browser"]})) + "\n")
        .await;
    assert_eq!(listener.json().await["event"], "$subscribed");
    step("loaded").await;
    // Events flow while the browser watches the charts.
    let mut ticker = hub.connect().await;
    let flowing = tokio::spawn(async move {
        for i in 0.. {
            ticker.send(event("tick", json!({"i": i})) + "\n").await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    step("charts-moving").await;
    flowing.abort();

    step("published").await;
    let heard = listener.json().await;
    assert_eq!(
        heard,
        json!({"event": "from-browser", "payload": {"n": 42}})
    );

    // From TCP to the browser's tail; then more, while the tail is paused.
    let mut sender = hub.connect().await;
    sender
        .send(event("from-tcp", json!({"hello": "browser"})) + "\n")
        .await;
    to_browser.write_all(b"tail\n").await.unwrap();
    let keep_sending = tokio::spawn(async move {
        for i in 0.. {
            sender.send(event("later", json!(i)) + "\n").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    step("tail-ok").await;
    keep_sending.abort();
    step("screenshots").await;
    let status = within(browser.wait()).await.unwrap();
    assert!(status.success(), "the browser script failed: {status}");
    for name in ["dashboard-1280x800.png", "dashboard-390x844.png"] {
        let png = std::fs::read(shots.join(name)).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name} is a PNG");
        assert!(
            png.len() > 10_000,
            "{name} has content ({} bytes)",
            png.len()
        );
    }
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(shots);
    }
    drop(audit);
    let _ = std::fs::remove_dir_all(data);
}

/// The delivery demo in the browser: orders posted from examples/web/vendor.html are
/// taken through pickup → in-transit → delivered by `hubcast driver` over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_vendor_is_served_by_a_tcp_driver() {
    if !browser_available() {
        return;
    }
    let hub = TestHub::start_http(Config::default()).await;
    let mut driver = Command::new(env!("CARGO_BIN_EXE_hubcast"))
        .args(["driver", "--port", &hub.addr.port().to_string()])
        .args(["--pickup-delay", "50ms", "--deliver-delay", "50ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The driver is in the pool before the first order.
    let mut clients = hub.hub.watch_clients();
    within(clients.wait_for(|&n| n == 1)).await.unwrap();
    let http = hub.http.unwrap().to_string();
    let stdout = run_script("vendor.mjs", &[&http, "3"]).await;
    assert!(stdout.contains("delivered 3/3"), "{stdout}");
    driver.start_kill().unwrap();
}

/// With `--auth`, the dashboard asks for a token, says why a wrong one failed, and shows
/// the counters only to an admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_and_shows_the_counters_only_to_an_admin() {
    if !browser_available() {
        return;
    }
    let (viewer, admin) = (hubcast::auth::random_token(), hubcast::auth::random_token());
    let text = format!(
        "[[users]]\nname = \"viewer\"\ntoken_hash = \"{}\"\nsubscribe = {{ allow = [\">\"] }}\npublish = {{ allow = [\">\"] }}\n\n[[users]]\nname = \"ops\"\ntoken_hash = \"{}\"\nsubscribe = {{ allow = [\">\"] }}\nadmin = true\n",
        hubcast::auth::TokenHash::new(viewer.as_bytes()),
        hubcast::auth::TokenHash::new(admin.as_bytes())
    );
    let file: hubcast::auth::AuthFile = toml::from_str(&text).unwrap();
    let hub = TestHub::start_http(Config::default()).await;
    hub.hub
        .set_authenticator(hubcast::auth::Authenticator::from_spec(&file, None).unwrap());
    let http = hub.http.unwrap().to_string();
    let stdout = run_script("dashboard-auth.mjs", &[&http, &viewer, &admin]).await;
    assert!(stdout.contains("auth-ok"), "{stdout}");
}

/// Issue #15: hubcast-client runs in a real browser over the WebSocket gateway, as it
/// does in Node over TCP: it subscribes, hears a TCP client's event, and sends one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_runs_in_a_browser_over_websocket() {
    if !browser_available() {
        return;
    }
    let hub = TestHub::start_http(Config::default()).await;
    let mut tcp = hub.connect().await;
    tcp.send(event("$subscribe", json!({"events": ["from-browser"]})) + "\n")
        .await;
    assert_eq!(tcp.json().await["event"], "$subscribed");
    let mut browser = Command::new("node")
        .arg(Path::new(BROWSER_DIR).join("js-client.mjs"))
        .arg(hub.http.unwrap().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut to_browser = browser.stdin.take().unwrap();
    let mut from_browser = BufReader::new(browser.stdout.take().unwrap()).lines();
    let line = within(from_browser.next_line()).await.unwrap();
    assert_eq!(line.as_deref(), Some("subscribed"));
    tcp.send(event("from-tcp", json!({"n": 1})) + "\n").await;
    to_browser.write_all(b"send\n").await.unwrap();
    let line = within(from_browser.next_line()).await.unwrap();
    assert_eq!(line.as_deref(), Some("heard-and-sent"));
    assert_eq!(
        tcp.json().await,
        json!({"event": "from-browser", "payload": {"n": 2}})
    );
    assert!(within(browser.wait()).await.unwrap().success());
}
