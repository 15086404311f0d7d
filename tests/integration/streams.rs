//! Durable streams, first part (issue #12): `--stream`, `$stored` confirmations and
//! deduplication by `"id"`, surviving a restart and `kill -9`.

use std::time::Duration;

use hubcast::store::{SegmentLog, Store, StoreConfig};
use hubcast::{Config, StreamSpec};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::{connect_in_pool, within, HubProcess, TestClient, TestHub};

fn temp_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "hubcast-streams-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

fn with_id(name: &str, id: &str, n: u64) -> String {
    format!("{}\n", json!({"event": name, "payload": n, "id": id}))
}

/// The next frame that is not `$stored`'s, and the `$stored` payloads before it.
async fn stored(client: &mut TestClient) -> Value {
    let frame = client.json().await;
    assert_eq!(frame["event"], "$stored", "{frame}");
    frame["payload"].clone()
}

/// Without any stream, an id is still confirmed (`"stream": null`) and a resend of it
/// is not broadcast again.
#[tokio::test]
async fn an_id_is_confirmed_live_and_a_resend_is_dropped() {
    let hub = TestHub::start(Config::default()).await;
    let mut listener = hub.connect().await;
    let mut publisher = hub.connect().await;
    publisher.send(with_id("a", "x-1", 1)).await;
    assert_eq!(
        stored_after_echo(&mut publisher, "a").await,
        json!({"id": "x-1", "stream": null})
    );
    assert_eq!(listener.json().await["event"], "a");
    publisher.send(with_id("a", "x-1", 1)).await;
    assert_eq!(
        stored(&mut publisher).await,
        json!({"id": "x-1", "stream": null, "duplicate": true})
    );
    // The listener's next event is the one after: the resend never reached it.
    publisher.send(r#"{"event":"b","payload":2}"#).await;
    assert_eq!(listener.json().await["event"], "b");
}

/// A resend within `--dedup-window` is answered with the first seq; once the window
/// has passed, the id is forgotten and the same id is stored again as a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_is_forgotten_once_the_dedup_window_has_passed() {
    let dir = temp_dir("window");
    let window = Duration::from_millis(300);
    let hub = TestHub::start(
        Config::builder()
            .streams(vec![StreamSpec::new("orders", &["pickup"])])
            .data_dir(dir.clone())
            .dedup_window(window)
            .echo(false)
            .build()
            .unwrap(),
    )
    .await;
    let mut publisher = hub.connect().await;
    publisher.send(with_id("pickup", "w-1", 1)).await;
    assert_eq!(
        stored(&mut publisher).await,
        json!({"id": "w-1", "stream": "orders", "seq": 1})
    );
    let first = std::time::Instant::now();
    publisher.send(with_id("pickup", "w-1", 1)).await;
    let again = stored(&mut publisher).await;
    assert!(
        first.elapsed() >= window
            || again == json!({"id": "w-1", "stream": "orders", "seq": 1, "duplicate": true}),
        "{again}"
    );
    // The window is what is being tested: it has to pass.
    tokio::time::sleep(window + Duration::from_millis(100)).await;
    // Any event makes the hub forget what is older than the window.
    publisher.send(with_id("pickup", "w-2", 2)).await;
    assert_eq!(stored(&mut publisher).await["seq"], 2);
    publisher.send(with_id("pickup", "w-1", 1)).await;
    assert_eq!(
        stored(&mut publisher).await,
        json!({"id": "w-1", "stream": "orders", "seq": 3})
    );
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The publisher hears its own echo, then the confirmation (live only: at once).
async fn stored_after_echo(client: &mut TestClient, name: &str) -> Value {
    assert_eq!(client.json().await["event"], name);
    stored(client).await
}

/// Events matching a stream are stored with consecutive seqs and confirmed once
/// durable; a resend is answered with the first seq; after a restart on the same data
/// directory the stream goes on where it was, and what it holds is what was confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_events_are_stored_confirmed_and_kept_across_a_restart() {
    let dir = temp_dir("restart");
    let config = || {
        Config::builder()
            .streams(vec![StreamSpec::new("orders", &["pickup", "order.*"])])
            .data_dir(dir.clone())
            .echo(false)
            .build()
            .unwrap()
    };
    let mut hub = TestHub::start(config()).await;
    let mut publisher = hub.connect().await;
    for (n, name) in ["pickup", "order.new", "pickup"].iter().enumerate() {
        publisher
            .send(with_id(name, &format!("o-{n}"), n as u64))
            .await;
        assert_eq!(
            stored(&mut publisher).await,
            json!({"id": format!("o-{n}"), "stream": "orders", "seq": n + 1})
        );
    }
    // Not matching: live only.
    publisher.send(with_id("hello", "h-1", 0)).await;
    assert_eq!(
        stored(&mut publisher).await,
        json!({"id": "h-1", "stream": null})
    );
    // A resend: the first seq, not stored again.
    publisher.send(with_id("pickup", "o-1", 1)).await;
    assert_eq!(
        stored(&mut publisher).await,
        json!({"id": "o-1", "stream": "orders", "seq": 2, "duplicate": true})
    );
    // Plain events (no id) that match are stored too, unconfirmed; the next confirmed
    // one shows it took its seq.
    publisher
        .send(r#"{"event":"pickup","payload":"plain"}"#)
        .await;
    publisher.send(with_id("pickup", "o-3", 3)).await;
    assert_eq!(
        stored(&mut publisher).await,
        json!({"id": "o-3", "stream": "orders", "seq": 5})
    );
    drop(publisher);
    hub.begin_shutdown();
    hub.stopped().await;
    hub.hub.close_store();
    drop(hub);

    let hub = TestHub::start(config()).await;
    let mut publisher = hub.connect().await;
    publisher.send(with_id("pickup", "o-9", 9)).await;
    assert_eq!(
        stored(&mut publisher).await,
        json!({"id": "o-9", "stream": "orders", "seq": 6})
    );
    hub.hub.close_store();
    let (log, recovery) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
    assert!(recovery.repairs.is_empty(), "{:?}", recovery.repairs);
    let records = log.read("orders", 1, 100).unwrap();
    let ids: Vec<Option<&str>> = records.iter().map(|r| r.id.as_deref()).collect();
    assert_eq!(
        ids,
        [
            Some("o-0"),
            Some("o-1"),
            Some("o-2"),
            None,
            Some("o-3"),
            Some("o-9")
        ]
    );
    assert!(String::from_utf8_lossy(&records[3].line).contains("plain"));
    log.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #12 (1), in part: whatever was confirmed survives `kill -9` of the real
/// binary, and the restarted hub continues the sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_events_survive_kill_9() {
    const EVENTS: u64 = 500;
    let dir = temp_dir("kill9");
    let data_dir = dir.display().to_string();
    let args = [
        "serve",
        "--port",
        "0",
        "--quiet",
        "--no-echo",
        "--stream",
        "orders=pickup",
        "--data-dir",
        &data_dir,
    ];
    let hub = HubProcess::spawn(HubProcess::command(&args)).await;
    let stream = TcpStream::connect(("127.0.0.1", hub.port)).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut batch = String::new();
    for n in 0..EVENTS {
        batch.push_str(&with_id("pickup", &format!("k-{n}"), n));
    }
    write.write_all(batch.as_bytes()).await.unwrap();
    let mut confirmed = 0;
    while confirmed < EVENTS {
        let line = within(lines.next_line()).await.unwrap().expect("open");
        let frame: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(frame["event"], "$stored", "{frame}");
        confirmed += 1;
        assert_eq!(frame["payload"]["seq"], confirmed);
    }
    hub.kill9().await;

    let hub = HubProcess::spawn(HubProcess::command(&args)).await;
    let mut client = TcpStream::connect(("127.0.0.1", hub.port)).await.unwrap();
    client
        .write_all(with_id("pickup", "after", 0).as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    within(BufReader::new(&mut client).read_line(&mut line))
        .await
        .unwrap();
    let frame: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(frame["payload"]["seq"], EVENTS + 1, "{frame}");
    // A publisher that lost its confirmations in the crash resends: recognised.
    client
        .write_all(with_id("pickup", "k-7", 7).as_bytes())
        .await
        .unwrap();
    line.clear();
    within(BufReader::new(&mut client).read_line(&mut line))
        .await
        .unwrap();
    let frame: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        frame["payload"],
        json!({"id": "k-7", "stream": "orders", "seq": 8, "duplicate": true})
    );
    // The tools read the store beside the running hub, changing nothing.
    let listed = run_tool(&["streams", "--json", "--data-dir", &data_dir]).await;
    let listed: Value = serde_json::from_str(listed.trim()).unwrap();
    assert_eq!(listed["stream"], "orders");
    assert_eq!(listed["last_seq"], EVENTS + 1);
    assert_eq!(listed["events"], EVENTS + 1);
    let from = (EVENTS - 1).to_string();
    let tail = run_tool(&["replay", "orders", "--data-dir", &data_dir, "--from", &from]).await;
    let ids: Vec<Value> = tail
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].clone())
        .collect();
    assert_eq!(
        ids,
        [
            json!(format!("k-{}", EVENTS - 2)),
            json!(format!("k-{}", EVENTS - 1)),
            json!("after")
        ]
    );
    let none = run_tool(&[
        "replay",
        "orders",
        "--data-dir",
        &data_dir,
        "--filter",
        "nothing",
    ])
    .await;
    assert!(none.is_empty(), "{none}");
    hub.stop().await;
    let (log, _) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
    assert_eq!(log.info("orders").unwrap().last_seq, EVENTS + 1);
    log.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `hubcast ARGS` to completion; its stdout (it must exit 0).
pub async fn run_tool(args: &[&str]) -> String {
    let output = within(HubProcess::command(args).output()).await.unwrap();
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A stream declaration that cannot work is refused in one line naming `--stream`.
#[tokio::test]
async fn bad_stream_flags_are_named() {
    for bad in ["orders", "=pickup", "orders=", "../x=pickup", "orders=a..b"] {
        let output =
            within(HubProcess::command(&["serve", "--port", "0", "--stream", bad]).output())
                .await
                .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--stream"), "{bad}: {stderr}");
    }
    // Dead-letter streams' names are taken; retention must be able to keep something.
    for (flag, value) in [
        ("--stream", "orders.dead=x"),
        ("--max-stream-events", "0"),
        ("--max-stream-bytes", "0"),
        ("--max-stream-age", "soon"),
    ] {
        let output = within(HubProcess::command(&["serve", "--port", "0", flag, value]).output())
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}

/// Issue #12: a stream's own limits (`--stream-limits`, or `limits` in the config
/// file's `[streams]`) are checked, named when wrong, and what each stream keeps is
/// said as it opens.
#[tokio::test]
async fn each_stream_can_have_limits_of_its_own() {
    for (bad, says) in [
        ("x:max_events=5", "no stream \"x\" is declared"),
        ("orders", "expected NAME:max_events=N"),
        ("orders:", "expected NAME:max_events=N"),
        ("orders:max_events=0", "max_events: must be at least 1"),
        ("orders:max_bytes=lots", "max_bytes:"),
        ("orders:max_age=soon", "max_age:"),
        ("orders:size=5", "unknown limit \"size\""),
        (
            "orders:max_events=5,max_events=6",
            "max_events is given twice",
        ),
    ] {
        let output = within(
            HubProcess::command(&["serve", "--port", "0", "--stream", "orders=pickup"])
                .args(["--stream-limits", bad])
                .output(),
        )
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{bad}: {stderr}");
        assert!(
            stderr.contains("--stream-limits") && stderr.contains(says),
            "{bad}: {stderr}"
        );
    }
    let twice = within(
        HubProcess::command(&["serve", "--port", "0", "--stream", "orders=pickup"])
            .args(["--stream-limits", "orders:max_events=5"])
            .args(["--stream-limits", "orders:max_age=1d"])
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(twice.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("given limits twice"));

    // From the config file: `orders` keeps 5,000 events for a week, `audit` the
    // hub-wide limits (here from the command line).
    let dir = temp_dir("stream-limits");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hubcast.toml");
    std::fs::write(
        &file,
        "[streams]\ndeclared = [\"orders=pickup\", \"audit=audit.>\"]\ndata_dir = \"data\"\n\
         limits = [\"orders:max_events=5000,max_age=7d\"]\n",
    )
    .unwrap();
    let file = file.display().to_string();
    let mut hub = HubProcess::spawn({
        let mut cmd = HubProcess::command(&["serve", "--port", "0", "--config", &file]);
        cmd.args(["--max-stream-events", "700"]);
        cmd
    })
    .await;
    hub.wait_log("storing matching events", 2).await;
    let said = |stream: &str| {
        hub.lines
            .iter()
            .find(|l| l.contains(&format!("stream={stream} ")))
            .cloned()
            .unwrap()
    };
    let orders = said("orders");
    assert!(
        orders.contains("max_events=5000 max_bytes=1073741824 max_age=7days"),
        "{orders}"
    );
    let audit = said("audit");
    assert!(
        audit.contains("max_events=700 max_bytes=1073741824 max_age=off"),
        "{audit}"
    );
    drop(hub);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tools name what is missing: a directory with no store, a stream not in it.
#[tokio::test]
async fn the_tools_say_what_is_missing() {
    let dir = temp_dir("missing");
    let dir_text = dir.display().to_string();
    let output = within(HubProcess::command(&["streams", "--data-dir", &dir_text]).output())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("holds no streams"));
    let (log, _) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
    log.close();
    let output =
        within(HubProcess::command(&["replay", "orders", "--data-dir", &dir_text]).output())
            .await
            .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no stream named \"orders\""));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #12 (4): when the disk is full (here: a file-size limit, `ulimit -S -f`), the
/// publisher is told `storage`, live traffic goes on, the hub does not crash, and
/// once there is room again (the limit raised with `prlimit`) events are stored and
/// confirmed again, the sequence going on from the last confirmed one. `/metrics`
/// counts the failures and `/readyz` says the store is failing until it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_live_traffic_goes_on_and_storing_recovers() {
    if !crate::support::require("prlimit") {
        return;
    }
    let dir = temp_dir("full");
    let script = format!(
        "ulimit -S -f 16 && exec '{}' serve --port 0 --http 127.0.0.1:0 --quiet --no-echo --stream orders=pickup --data-dir '{}'",
        env!("CARGO_BIN_EXE_hubcast"),
        dir.display()
    );
    let mut command = tokio::process::Command::new("bash");
    command.args(["-c", &script]).env("RUST_LOG", "info");
    let mut hub = HubProcess::spawn(command).await;
    let http = http_listener(&mut hub).await;
    let store_health = |scrape: &prometheus_parse::Scrape| {
        (
            crate::ws::value(scrape, "hubcast_store_failures_total", &[]),
            crate::ws::value(scrape, "hubcast_store_failing", &[]),
        )
    };
    assert_eq!(store_health(&crate::ws::scrape(http, "").await), (0.0, 0.0));
    // In the pool before anything is sent.
    let mut listener = connect_in_pool(hub.port).await;
    let mut publisher = connect_in_pool(hub.port).await;
    let padding = "p".repeat(1000);
    let mut confirmed = 0u64;
    let mut refused = 0;
    for n in 0..100 {
        let line = format!(
            "{}\n",
            json!({"event": "pickup", "payload": padding, "id": format!("f-{n}")})
        );
        publisher
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .unwrap();
        let mut reply = String::new();
        within(publisher.read_line(&mut reply)).await.unwrap();
        let reply: Value = serde_json::from_str(&reply).unwrap();
        let mut heard = String::new();
        within(listener.read_line(&mut heard)).await.unwrap();
        assert!(
            heard.contains(&format!("f-{n}")),
            "live delivery went on: {heard}"
        );
        if reply["event"] == "$stored" {
            assert_eq!(refused, 0, "stored after a refusal, before room was made");
            confirmed += 1;
            assert_eq!(reply["payload"]["seq"], confirmed);
        } else {
            assert_eq!(reply["payload"]["code"], "storage", "{reply}");
            refused += 1;
            if refused == 3 {
                break;
            }
        }
    }
    assert!(
        confirmed > 0 && refused == 3,
        "{confirmed} stored, {refused} refused"
    );
    assert!(hub.is_running());
    let (failures, failing) = store_health(&crate::ws::scrape(http, "").await);
    assert!(failures >= 3.0 && failing == 1.0, "{failures} {failing}");
    let (status, _, body) = crate::ws::http_get(http, "/readyz", "").await;
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, &ready["store"], &ready["ready"]),
        (200, &json!("failing"), &json!(true))
    );
    // Room again.
    let pid = hub.pid().to_string();
    let raised = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--fsize=unlimited"])
        .status()
        .unwrap();
    assert!(raised.success());
    publisher
        .get_mut()
        .write_all(with_id("pickup", "f-after", 0).as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    within(publisher.read_line(&mut reply)).await.unwrap();
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(
        reply["payload"],
        json!({"id": "f-after", "stream": "orders", "seq": confirmed + 1})
    );
    assert_eq!(
        store_health(&crate::ws::scrape(http, "").await),
        (failures, 0.0),
        "failing no more, the count kept"
    );
    let (_, _, body) = crate::ws::http_get(http, "/readyz", "").await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["store"],
        "open"
    );
    let log = hub.stop().await;
    assert!(log.iter().any(|l| l.contains("storage failed")), "{log:?}");
    let (store, recovery) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
    assert!(recovery.repairs.is_empty(), "{:?}", recovery.repairs);
    assert_eq!(store.info("orders").unwrap().last_seq, confirmed + 1);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `--http` listener of a hub started with `--http 127.0.0.1:0`: the second
/// `listening` line of its log (the first is the TCP port).
async fn http_listener(hub: &mut HubProcess) -> std::net::SocketAddr {
    hub.wait_log("listening addr=", 2).await;
    let tcp = format!("addr=127.0.0.1:{}", hub.port);
    let line = hub
        .lines
        .iter()
        .find(|l| l.contains("listening addr=") && !l.contains(&tcp))
        .expect("an HTTP listening line");
    line.split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn orders_config(dir: &std::path::Path) -> Config {
    Config::builder()
        .streams(vec![StreamSpec::new("orders", &["pickup"])])
        .data_dir(dir.to_owned())
        .build()
        .unwrap()
}

/// The client library waits for `$stored`: stored with its seq, live only when no
/// stream matched, a duplicate for a repeated id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_waits_for_confirmations() {
    use hubcast::client::{Client, Stored};
    let dir = temp_dir("client");
    let hub = TestHub::start(orders_config(&dir)).await;
    let client = Client::connect(hub.addr).await.unwrap();
    let first = within(client.emit_confirmed("pickup", &json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(
        (first.stream.as_deref(), first.seq, first.duplicate),
        (Some("orders"), Some(1), false)
    );
    let live: Stored = within(client.emit_confirmed("hello", &1)).await.unwrap();
    assert_eq!((live.stream, live.seq), (None, None));
    let once = within(client.emit_with_id("pickup", &2, "order-2"))
        .await
        .unwrap();
    let again = within(client.emit_with_id("pickup", &2, "order-2"))
        .await
        .unwrap();
    assert_eq!((once.seq, once.duplicate), (Some(2), false));
    assert_eq!((again.seq, again.duplicate), (Some(2), true));
    drop(client);
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same id sent twice at once on one connection is answered in order: stored,
/// then the duplicate (the second waits for the first; its answer used to be queued
/// at once, ahead of the first's, which is queued once the whole commit is done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_sent_twice_at_once_is_answered_in_order() {
    let dir = temp_dir("twice");
    let hub = TestHub::start(orders_config(&dir)).await;
    let mut client = hub.connect().await;
    let line = "{\"event\":\"pickup\",\"payload\":1,\"id\":\"twice\"}\n";
    client.send(format!("{line}{line}")).await;
    // The client hears its own event too (once: the resend is dropped).
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let event = client.json().await;
        if event["event"] != "pickup" {
            answers.push(event);
        }
    }
    let (first, second) = (&answers[0], &answers[1]);
    assert_eq!(first["event"], "$stored", "{first}");
    assert_eq!(first["payload"]["seq"], 1, "{first}");
    assert_eq!(first["payload"].get("duplicate"), None, "{first}");
    assert_eq!(second["payload"]["seq"], 1, "{second}");
    assert_eq!(second["payload"]["duplicate"], true, "{second}");
    drop(client);
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An event confirmed-sent while the hub is away is sent again after the reconnect
/// and confirmed by the hub that comes back (on the same data directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_send_made_while_away_is_confirmed_after_the_reconnect() {
    use hubcast::client::{Client, Reconnect};
    let dir = temp_dir("away");
    let mut first = TestHub::start_keeping_port(orders_config(&dir)).await;
    let client = Client::builder()
        .reconnect(Reconnect {
            initial_delay: std::time::Duration::from_millis(10),
            max_delay: std::time::Duration::from_millis(50),
            ..Reconnect::default()
        })
        .connect(first.addr)
        .await
        .unwrap();
    let stored = within(client.emit_confirmed("pickup", &0)).await.unwrap();
    assert_eq!(stored.seq, Some(1));
    first.begin_shutdown();
    first.stopped().await;
    first.hub.close_store();
    let sender = client.clone();
    let waiting = tokio::spawn(async move { sender.emit_confirmed("pickup", &1).await });
    let second = first.successor(orders_config(&dir));
    let stored = within(waiting).await.unwrap().unwrap();
    assert_eq!(
        (stored.stream.as_deref(), stored.seq),
        (Some("orders"), Some(2))
    );
    drop(client);
    second.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `hubcast pub --confirm` waits for every `$stored` and says how each ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_confirm_reports_what_was_stored() {
    let dir = temp_dir("pub");
    let data_dir = dir.display().to_string();
    let hub = HubProcess::spawn(HubProcess::command(&[
        "serve",
        "--port",
        "0",
        "--quiet",
        "--stream",
        "orders=pickup",
        "--data-dir",
        &data_dir,
    ]))
    .await;
    let port = hub.port.to_string();
    let mut lines = HubProcess::command(&["pub", "pickup", "--confirm", "-p", &port])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = lines.stdin.take().unwrap();
    stdin.write_all(b"1\n{\"n\":2}\n3\n").await.unwrap();
    drop(stdin);
    let output = within(lines.wait_with_output()).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("confirmed: 3 stored, 0 delivered live only"),
        "{stderr}"
    );
    let single =
        within(HubProcess::command(&["pub", "hello", "1", "--confirm", "-p", &port]).output())
            .await
            .unwrap();
    let stderr = String::from_utf8_lossy(&single.stderr);
    assert!(
        stderr.contains("0 stored, 1 delivered live only"),
        "{stderr}"
    );
    hub.stop().await;
    let (store, _) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
    assert_eq!(store.info("orders").unwrap().last_seq, 3);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}
