//! `hubcast bench`: against an embedded hub, a running hub, a lossy server it must catch,
//! and the real nats-server and redis-server it compares with.

use std::process::{Output, Stdio};
use std::sync::Arc;

use hubcast::Config;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use crate::support::{free_port, within, TestHub};

/// `hubcast bench ARGS`, killed if the test ends first.
fn bench_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hubcast"));
    command
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn bench(args: &[&str]) -> Output {
    within(bench_command(args).output()).await.unwrap()
}

/// Runs `bench ARGS --json` and returns its exit code and report.
async fn bench_json(args: &[&str]) -> (Option<i32>, Value) {
    let output = bench(&[args, &["--json"]].concat()).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not a JSON report ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), report)
}

fn assert_complete(report: &Value, deliveries: u64) {
    assert_eq!(report["expected"], deliveries, "{report:#}");
    assert_eq!(report["delivered"], deliveries, "{report:#}");
    assert_eq!(report["lost"], 0, "{report:#}");
    assert_eq!(report["latency_us"]["samples"], deliveries, "{report:#}");
    assert_eq!(report["error_count"], 0, "{report:#}");
}

#[tokio::test]
async fn embedded_run_counts_every_delivery() {
    // 3,001 messages do not split evenly between two publishers: both shares count.
    let (code, report) = bench_json(&["--embedded", "-n", "3", "-P", "2", "-k", "3001"]).await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_complete(&report, 3 * 3001);
    assert_eq!(report["published"], 3001);
    assert!(
        report["latency_us"]["max"].as_u64().unwrap()
            >= report["latency_us"]["p50"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn a_running_hub_gets_a_table_and_a_paced_run() {
    let hub = TestHub::start_with(Config::default(), false).await;
    let target = hub.addr.to_string();
    let output = bench(&[
        "-t", &target, "-n", "2", "-k", "400", "--rate", "2000", "--size", "4KiB",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("at 2,000 messages/s"), "{stdout}");
    assert!(stdout.contains("800 of 800"), "{stdout}");
    assert!(
        stdout.contains("OK: every subscriber got every message"),
        "{stdout}"
    );
}

#[tokio::test]
async fn bad_flags_are_refused_with_exit_code_2() {
    let output = bench(&["--embedded", "--size", "10"]).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--size must be at least 83 bytes"),
        "{stderr}"
    );

    let output = bench(&["-t", "http://127.0.0.1:1"]).await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown scheme \"http\""), "{stderr}");

    let output = bench(&["--embedded", "-n", "0"]).await;
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test]
async fn an_unreachable_server_is_named() {
    // Nothing listens on port 1 (a port found free and let go could be taken).
    let addr = "127.0.0.1:1";
    let output = bench(&["-t", &format!("nats://{addr}")]).await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot connect to nats://{addr}")),
        "{stderr}"
    );
}

/// A hub-like server that forwards every publisher line to every subscriber except
/// the messages whose sequence numbers are in `drop`: the bench must notice, say
/// where, and not wait forever for the last one.
async fn lossy_server(drop: &'static [usize]) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let subscribers: Arc<Mutex<Vec<OwnedWriteHalf>>> = Arc::default();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let subscribers = Arc::clone(&subscribers);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let first = lines.next_line().await.unwrap().unwrap();
                if first.contains("$ping") {
                    write
                        .write_all(b"{\"event\":\"$pong\",\"payload\":null}\n")
                        .await
                        .unwrap();
                    subscribers.lock().await.push(write);
                    return;
                }
                write
                    .write_all(b"{\"event\":\"$welcome\",\"payload\":{}}\n")
                    .await
                    .unwrap();
                let mut seq = 0;
                while let Ok(Some(line)) = lines.next_line().await {
                    if !drop.contains(&seq) {
                        for subscriber in subscribers.lock().await.iter_mut() {
                            subscriber
                                .write_all(format!("{line}\n").as_bytes())
                                .await
                                .unwrap();
                        }
                    }
                    seq += 1;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn lost_messages_are_counted_and_located() {
    let addr = lossy_server(&[5, 19]).await;
    let (code, report) = bench_json(&[
        "-t",
        &addr.to_string(),
        "-n",
        "2",
        "-k",
        "20",
        "--window",
        "4",
        "--stall-timeout",
        "500ms",
    ])
    .await;
    assert_eq!(code, Some(1), "{report:#}");
    // Each subscriber missed #5 (a gap it saw) and #19 (the last: never came).
    assert_eq!(report["lost"], 4, "{report:#}");
    assert_eq!(report["delivered"], 36, "{report:#}");
    assert_eq!(report["short_subscribers"], 2, "{report:#}");
    let gap = &report["first_gap"];
    assert_eq!(
        (
            &gap["subscriber"],
            &gap["publisher"],
            &gap["from"],
            &gap["missing"]
        ),
        (
            &Value::from(1),
            &Value::from(0),
            &Value::from(5),
            &Value::from(1)
        ),
        "{report:#}"
    );
    let errors = report["errors"].to_string();
    assert!(errors.contains("nothing arrived for 500ms"), "{errors}");
}

/// Starts an external server for the comparison and waits until it logs `ready`, or
/// says why it cannot. Under CI (`.ci/run` installs both) a missing server fails the
/// test; elsewhere it is skipped with a note.
/// Starts `program` (with the arguments `args` makes for a port) on a free loopback
/// port and waits until it says `ready`; `None` if it is not installed (see
/// `support::require`). A port is found free and let go before the server binds it, so
/// something else could take it in between: then the server fails to start, and it is
/// tried again on another port (and it never answers on a port someone else holds).
async fn external(
    program: &str,
    args: impl Fn(&str) -> Vec<String>,
    ready: &str,
) -> Option<(Child, u16)> {
    if !crate::support::require(program) {
        return None;
    }
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(program)
            .args(args(&port.to_string()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // nats-server logs to stderr, redis-server to stdout.
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut lines = merged_lines(stdout, stderr);
        let started = loop {
            match within(lines.recv()).await {
                Some(line) if line.contains(ready) => break true,
                Some(_) => {}
                // Exited before it was ready: the port was taken; try another.
                None => break false,
            }
        };
        if started {
            // Keep draining its output so it never blocks on a full pipe.
            tokio::spawn(async move { while lines.recv().await.is_some() {} });
            return Some((child, port));
        }
    }
    panic!("{program} did not start on any of five ports");
}

/// Lines from both of a child's output streams, in arrival order.
fn merged_lines(
    mut a: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    mut b: tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let tx2 = tx.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = a.next_line().await {
            let _ = tx.send(line);
        }
    });
    tokio::spawn(async move {
        while let Ok(Some(line)) = b.next_line().await {
            let _ = tx2.send(line);
        }
    });
    rx
}

/// redis-server's arguments for a loopback test server on `port`, without snapshots.
fn redis_args(port: &str, extra: &[&str]) -> Vec<String> {
    ["--port", port, "--bind", "127.0.0.1", "--save", ""]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect()
}

/// Runs a small workload against the server at `target` and checks it was complete.
async fn same_workload(target: &str) {
    let (code, report) = bench_json(&["-t", target, "-n", "3", "-P", "2", "-k", "2000"]).await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_complete(&report, 3 * 2000);
}

#[tokio::test]
async fn nats_server_speaks_the_same_workload() {
    let args = |port: &str| ["-a", "127.0.0.1", "-p", port].map(String::from).to_vec();
    if let Some((_server, port)) = external("nats-server", args, "Server is ready").await {
        same_workload(&format!("nats://127.0.0.1:{port}")).await;
    }
}

#[tokio::test]
async fn redis_pub_sub_speaks_the_same_workload() {
    let args = |port: &str| redis_args(port, &["--appendonly", "no"]);
    if let Some((_server, port)) =
        external("redis-server", args, "Ready to accept connections").await
    {
        same_workload(&format!("redis://127.0.0.1:{port}")).await;
    }
}

/// A server that goes away mid-run: the report says the run stopped early and how far
/// it got, and counts as lost only what was published and never arrived.
#[tokio::test]
async fn a_run_cut_short_says_so() {
    let mut hub = TestHub::start_with(Config::default(), false).await;
    let target = hub.addr.to_string();
    let args = [
        "-t", &target, "-n", "2", "-k", "1000000", "--rate", "20000", "--json",
    ];
    let bench = bench_command(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hub.wait_accepted(500).await;
    hub.begin_shutdown();
    hub.stopped().await;
    let output = within(bench.wait_with_output()).await.unwrap();
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let published = report["published"].as_u64().unwrap();
    assert!((500..1_000_000).contains(&published), "{report:#}");
    assert_eq!(report["planned"], 1_000_000, "{report:#}");
    assert_eq!(report["expected"], 2 * published, "{report:#}");
    let delivered = report["delivered"].as_u64().unwrap();
    assert_eq!(report["lost"], 2 * published - delivered, "{report:#}");
    assert!(
        report["errors"]
            .to_string()
            .contains("closed the connection"),
        "{report:#}"
    );
}

/// Runs the two durable workloads against `target`; checks every message counted.
async fn durable_workloads(target: &str) {
    for (mode, conns) in [("publish", ["-P", "2"]), ("consume", ["-n", "2"])] {
        let (code, report) = bench_json(&[
            "-t",
            target,
            "--durable",
            mode,
            conns[0],
            conns[1],
            "-k",
            "3000",
        ])
        .await;
        assert_eq!(code, Some(0), "{report:#}");
        assert_eq!(report["mode"], mode, "{report:#}");
        assert_eq!(report["messages"], 3000, "{report:#}");
        assert!(report["per_second"].as_f64().unwrap() > 0.0, "{report:#}");
        if mode == "publish" {
            assert!(
                report["latency_us"]["p99"].as_u64().unwrap() > 0,
                "{report:#}"
            );
        }
    }
}

/// `bench --durable` against a hub declaring the `bench` stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_workloads_run_against_a_hub() {
    let dir = std::env::temp_dir().join(format!("hubcast-bench-durable-{}", fastrand::u64(..)));
    let config = Config::builder()
        .streams(vec![hubcast::StreamSpec::new("bench", &["bench"])])
        .data_dir(dir.clone())
        .fsync(hubcast::store::Fsync::Never)
        .build()
        .unwrap();
    let hub = TestHub::start_with(config, false).await;
    durable_workloads(&format!("hubcast://{}", hub.addr)).await;
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same against JetStream (file storage) and Redis Streams (AOF on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_workloads_run_against_jetstream_and_redis_streams() {
    let dir = std::env::temp_dir().join(format!("hubcast-bench-js-{}", fastrand::u64(..)));
    let store = dir.display().to_string();
    let js = |port: &str| {
        ["-a", "127.0.0.1", "-p", port, "-js", "-sd", &store]
            .map(String::from)
            .to_vec()
    };
    if let Some((_server, port)) = external("nats-server", js, "Server is ready").await {
        let target = format!("nats://127.0.0.1:{port}");
        durable_workloads(&target).await;
        // With Nats-Msg-Id headers (HPUB): a malformed one would end the connection.
        let (code, report) = bench_json(&[
            "-t",
            &target,
            "--durable",
            "publish",
            "--msg-id",
            "-k",
            "2000",
        ])
        .await;
        assert_eq!(code, Some(0), "{report:#}");
        assert_eq!(report["messages"], 2000, "{report:#}");
    }
    let redis = |port: &str| redis_args(port, &["--appendonly", "yes", "--dir", &store]);
    std::fs::create_dir_all(&dir).unwrap();
    if let Some((_server, port)) =
        external("redis-server", redis, "Ready to accept connections").await
    {
        durable_workloads(&format!("redis://127.0.0.1:{port}")).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #13: the bench over TLS with authentication (a JWT in `$hello`), for fan-out
/// and for connects; a wrong token is reported, not counted.
#[tokio::test]
async fn tls_and_authenticated_workloads_run_against_a_hub() {
    let pki = crate::tls::Pki::new("bench");
    let secret = pki.dir.join("jwt.secret");
    std::fs::write(
        &secret,
        "a secret of at least thirty-two bytes, for the bench\n",
    )
    .unwrap();
    let hub = TestHub::start_tls(Config::default(), pki.server(None)).await;
    hub.hub.set_authenticator(
        hubcast::auth::Authenticator::from_spec(
            &hubcast::auth::AuthFile::default(),
            Some(hubcast::auth::JwtKey::load(&secret).unwrap()),
        )
        .unwrap(),
    );
    let everything = hubcast::auth::PermissionSpec::everything();
    let token = hubcast::auth::mint_token(
        &secret,
        "bench",
        Some(std::time::Duration::from_secs(600)),
        &everything,
    )
    .unwrap();
    let target = format!("hubcasts://localhost:{}", hub.addr.port());
    let ca = pki.ca();
    let ca = ca.to_str().unwrap();
    let (code, report) = bench_json(&[
        "-t", &target, "--ca", ca, "--token", &token, "-n", "3", "-k", "500",
    ])
    .await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_complete(&report, 3 * 500);
    // Messages larger than a TLS record (16 KiB): each is put together from the
    // records that carry it.
    let (code, report) = bench_json(&[
        "-t", &target, "--ca", ca, "--token", &token, "-n", "2", "-k", "40", "-s", "40000",
    ])
    .await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_complete(&report, 2 * 40);
    let (code, report) = bench_json(&[
        "-t",
        &target,
        "--ca",
        ca,
        "--token",
        &token,
        "--connects",
        "80",
    ])
    .await;
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["connects"], 80);
    assert_eq!(report["tls"], true);
    // 32 workers, each a client with tickets of its own: past its first connect,
    // each resumes.
    let resumed = report["resumed"]
        .as_u64()
        .expect("a count of resumed handshakes");
    assert!((80 - 32..=80).contains(&resumed), "{report:#}");
    let output = bench(&[
        "-t",
        &target,
        "--ca",
        ca,
        "--token",
        "wrong",
        "--connects",
        "1",
    ])
    .await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("auth_failed"), "{stderr}");
}

/// Issue #14: the bench speaks hubcast over WebSocket (small frames, 16-bit and 64-bit
/// lengths) and checks every delivery, as for TCP.
#[tokio::test]
async fn the_websocket_gateway_speaks_the_same_workload() {
    let hub = TestHub::start_http(Config::default()).await;
    let target = format!("ws://{}/ws", hub.http.unwrap());
    same_workload(&target).await;
    for size in ["4KiB", "70KiB"] {
        let (code, report) =
            bench_json(&["-t", &target, "-n", "2", "-k", "50", "--size", size]).await;
        assert_eq!(code, Some(0), "{size}: {report:#}");
        assert_complete(&report, 2 * 50);
    }
}

/// Issue #14: the bench speaks Engine.IO 4 / Socket.IO 4 to a real Socket.IO server
/// (scripts/socketio; `.ci/run` installs it with `npm ci`).
#[tokio::test]
async fn a_socketio_server_speaks_the_same_workload() {
    if !crate::support::require("node") {
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/socketio");
    let installed = std::path::Path::new(dir).join("node_modules/socket.io");
    if !crate::support::require_file(&installed, "socket.io (npm ci in scripts/socketio)") {
        return;
    }
    let port = free_port();
    let mut server = Command::new("node")
        .arg(format!("{dir}/server.js"))
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let ready = within(lines.next_line()).await.unwrap().unwrap_or_default();
    assert!(ready.contains("listening"), "{ready}");
    same_workload(&format!("socketio://127.0.0.1:{port}")).await;
}
