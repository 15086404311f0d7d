//! The `hubcast` binary: `serve` as a user runs it.

use std::process::Stdio;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::support::{event, within, PATIENCE};

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
        (&["serve", "--max-conns", "0"], "--max-conns"),
        (
            &["serve", "--slow-consumer", "sometimes"],
            "--slow-consumer",
        ),
        (&["serve", "--ws-ping", "often"], "--ws-ping"),
        (&["serve", "--ws-ping", "0s"], "--ws-ping"),
        // Protected mode covers the HTTP listener too.
        (
            &["serve", "--port", "0", "--http", "0.0.0.0:0"],
            "protected mode",
        ),
        (&["pub"], "EVENT"),
        (&["vendor"], "--store"),
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
    // PORT=0: a port of the system's choosing, so not the default 3000 (and no port
    // found free, let go and reused).
    let mut child = hubcast()
        .arg("serve")
        .env("PORT", "0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within(lines.next_line()).await.unwrap().unwrap();
    let port = first.strip_prefix("Server up on 127.0.0.1:").expect(&first);
    assert_ne!(port, "3000", "the default port, not the environment's");
    child.kill().await.unwrap();
}

/// Starts `hubcast ARGS --port P` with stdout piped, and waits until it is in the pool.
async fn join(hub: &crate::support::TestHub, args: &[&str]) -> Child {
    let before = hub.hub.clients();
    let child = hubcast()
        .args(args)
        .args(["--port", &hub.addr.port().to_string(), "--no-reconnect"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hub.wait_clients(before + 1).await;
    child
}

/// Runs `hubcast pub ARGS --port P` with `stdin` and waits for it.
async fn publish(
    hub: &crate::support::TestHub,
    args: &[&str],
    stdin: &str,
) -> std::process::Output {
    let mut child = hubcast()
        .arg("pub")
        .args(args)
        .args(["--port", &hub.addr.port().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    within(child.wait_with_output()).await.unwrap()
}

#[tokio::test]
async fn pub_sends_one_event_per_stdin_line_to_sub() {
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    let mut sub = join(&hub, &["sub"]).await;
    let output = publish(&hub, &["greeting"], "{\"a\":1}\n\n[2]\r\n\"three\"\n").await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut lines = BufReader::new(sub.stdout.take().unwrap()).lines();
    for expected in [
        r#"{"event":"greeting","payload":{"a":1}}"#,
        r#"{"event":"greeting","payload":[2]}"#,
        r#"{"event":"greeting","payload":"three"}"#,
    ] {
        assert_eq!(within(lines.next_line()).await.unwrap().unwrap(), expected);
    }
    sub.kill().await.unwrap();
}

#[tokio::test]
async fn pub_stops_at_invalid_json_naming_the_line_and_exits_2() {
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    let output = publish(&hub, &["num"], "1\n2\n{bad\n4\n").await;
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("line 3: invalid JSON"), "{stderr}");
    // Lines 1 and 2 went out whole; line 3 and after not at all.
    let sent: Vec<String> = hub
        .events_matching(|e| matches!(e, hubcast::HubEvent::Event { .. }))
        .into_iter()
        .map(|e| match e {
            hubcast::HubEvent::Event { event, .. } => event.payload().to_string(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(sent, ["1", "2"]);
    assert!(hub
        .events_matching(|e| matches!(e, hubcast::HubEvent::Rejected { .. }))
        .is_empty());
}

#[tokio::test]
async fn pub_with_a_payload_argument_and_bad_arguments() {
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    let mut listener = hub.connect().await;
    let ok = publish(&hub, &["pickup", r#"{"store":"acme"}"#], "").await;
    assert!(ok.status.success());
    assert_eq!(
        listener.line().await,
        r#"{"event":"pickup","payload":{"store":"acme"}}"#
    );
    for (args, needle) in [
        (&["pickup", "{nope"][..], "not valid JSON"),
        (&["$error", "1"], "reserved"),
        (&["", "1"], "invalid event name"),
    ] {
        let output = publish(&hub, args, "").await;
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(needle),
            "{args:?}"
        );
    }
}

#[tokio::test]
async fn sub_subscribes_to_patterns_and_pretty_prints() {
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    let mut sub = join(&hub, &["sub", "keep", "--pretty"]).await;
    hub.wait_for(|e| matches!(e, hubcast::HubEvent::Control { event, .. } if event.name().as_str() == "$subscribe"))
        .await;
    let mut sender = hub.connect().await;
    sender.send(event("drop", json!(1))).await;
    sender.send(event("keep", json!({"n": 2}))).await;
    let mut out = String::new();
    let mut stdout = BufReader::new(sub.stdout.take().unwrap());
    // Pretty output ends with a `}` alone on its line.
    while !out.ends_with("\n}\n") {
        within(stdout.read_line(&mut out)).await.unwrap();
    }
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value, json!({"event": "keep", "payload": {"n": 2}}));
    assert!(out.lines().count() > 1, "not pretty: {out}");
    sub.kill().await.unwrap();
}

#[tokio::test]
async fn sub_into_head_exits_0_when_head_is_done() {
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    let exe = env!("CARGO_BIN_EXE_hubcast");
    let script = format!(
        "set -o pipefail; '{exe}' sub --port {} --no-reconnect | head -3",
        hub.addr.port()
    );
    let pipeline = Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    hub.wait_clients(1).await;
    let mut sender = hub.connect().await;
    for n in 0..3 {
        sender.send(event("n", json!(n))).await;
    }
    // No further event: `sub` must notice by itself that `head` has gone.
    let output = within(pipeline.wait_with_output()).await.unwrap();
    assert_eq!(output.status.code(), Some(0), "the pipeline failed");
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 3);
}

/// `bench --json` into a reader that has gone (`| true` exits before the report is
/// written) used to panic in `println!` (exit 101); a closed pipe ends it quietly.
#[tokio::test]
async fn bench_into_a_closed_pipe_exits_0_without_a_panic() {
    let exe = env!("CARGO_BIN_EXE_hubcast");
    let script = format!("set -o pipefail; '{exe}' bench --embedded -n 2 -k 100 --json | true");
    let output = within(
        Command::new("bash")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Issue #11 (6): a payload nested 200 deep, `1e400` or `"\ud800"` (all forwarded by
/// the hub, correctly) made `sub --pretty` exit 1. It prints whatever the hub forwards,
/// in the sender's key order.
#[tokio::test]
async fn sub_pretty_prints_whatever_the_hub_forwards() {
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    let mut sub = join(&hub, &["sub", "--pretty"]).await;
    hub.wait_for(|e| matches!(e, hubcast::HubEvent::Connection { .. }))
        .await;
    let mut sender = hub.connect().await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for payload in [deep.as_str(), "1e400", r#""\ud800""#, r#"{"z":1,"a":2}"#] {
        sender
            .send(format!("{{\"event\":\"odd\",\"payload\":{payload}}}\n"))
            .await;
    }
    let mut stdout = BufReader::new(sub.stdout.take().unwrap());
    let mut seen = Vec::new();
    let mut event = String::new();
    while seen.len() < 4 {
        let mut line = String::new();
        let n = within(stdout.read_line(&mut line)).await.unwrap();
        assert!(n > 0, "sub exited; status {:?}", sub.try_wait());
        event.push_str(&line);
        if line == "}\n" {
            seen.push(std::mem::take(&mut event));
        }
    }
    assert!(seen[1].contains("1e400"), "{}", seen[1]);
    assert!(seen[2].contains(r"\ud800"), "{}", seen[2]);
    assert!(seen[3].find("\"z\"").unwrap() < seen[3].find("\"a\"").unwrap());
    assert!(sub.try_wait().unwrap().is_none(), "sub must still run");
    sub.kill().await.unwrap();
}

/// Runs `hubcast ARGS` to completion (bounded), returning its exit code and stderr.
async fn run_to_end(args: &[&str]) -> (Option<i32>, String) {
    let output = within(
        hubcast()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Issue #11 (5, 7): settings that cannot work, and CLI wording.
#[tokio::test]
async fn cli_misuse_is_named_and_wording_fits_the_problem() {
    // Exit 2, naming the flag.
    for (args, flag) in [
        (vec!["sub", "--room", ""], "--room"),
        (vec!["vendor", "--store", "acme", "--count", "0"], "--count"),
        (
            vec!["vendor", "--store", "acme", "--interval", "0s"],
            "--interval",
        ),
        (
            vec!["serve", "--port", "0", "--idle-timeout", "0s"],
            "--idle-timeout",
        ),
        // Each parses alone; together they cannot work. `Config::validate` names the
        // flag in one line, before anything listens.
        (
            vec![
                "serve",
                "--port",
                "0",
                "--max-pending",
                "1KiB",
                "--max-frame",
                "64KiB",
            ],
            "--max-pending",
        ),
        (
            vec!["serve", "--port", "0", "--max-inbound-memory", "1MiB"],
            "--max-inbound-memory",
        ),
    ] {
        let (code, stderr) = run_to_end(&args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        if args.contains(&"--max-pending") || args.contains(&"--max-inbound-memory") {
            assert!(stderr.starts_with("hubcast: error:"), "{stderr}");
        }
        // Ours, not clap's (which adds a hint line): exactly one line.
        if stderr.starts_with("hubcast: error:") {
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            assert!(!stderr.contains("Server up"), "{stderr}");
        }
    }
    // A name that does not resolve is not a question of whether a hub runs.
    let (code, stderr) = run_to_end(&[
        "pub",
        "--host",
        "no-such-host.invalid",
        "x",
        "1",
        "--no-reconnect",
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("resolve"), "{stderr}");
    assert!(!stderr.contains("hubcast serve"), "{stderr}");
    // No hub there: bench suggests --embedded; -p is the port, as everywhere.
    // (Port 1: nothing listens there; a port found free and let go could be taken.)
    let (code, stderr) = run_to_end(&["bench", "-p", "1", "-n", "1", "-k", "10"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--embedded"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
}

/// Issue #11 (7): `pub` says how many events it sent.
#[tokio::test]
async fn pub_says_how_many_it_sent() {
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    let mut child = hubcast()
        .args(["pub", "--port", &hub.addr.port().to_string(), "tick"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"1\n2\n3\n").await.unwrap();
    drop(stdin);
    let output = within(child.wait_with_output()).await.unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("sent 3 events"), "{stderr}");
}

/// Issue #11 (7): the client commands never said "reconnected".
#[tokio::test]
async fn sub_says_when_it_has_reconnected() {
    let mut first = crate::support::TestHub::start_keeping_port(hubcast::Config::default()).await;
    let mut sub = hubcast()
        .args(["sub", "--port", &first.addr.port().to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    first.wait_clients(1).await;
    first.begin_shutdown();
    first.stopped().await;
    let second = first.successor(hubcast::Config::default());
    second.wait_clients(1).await;
    let mut log = BufReader::new(sub.stderr.take().unwrap()).lines();
    loop {
        let line = within(log.next_line()).await.unwrap().expect("sub exited");
        if line.contains("reconnected to the hub") {
            break;
        }
    }
    sub.kill().await.unwrap();
}

/// Issue #15: `serve --config FILE` as an operator runs it: from an empty directory
/// holding only the file (relative paths are the file's), with flags and `HUBCAST_*`
/// variables overriding it.
#[tokio::test]
async fn serve_reads_a_config_file_and_flags_and_environment_override_it() {
    let dir = std::env::temp_dir().join(format!("hubcast-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hubcast.toml");
    std::fs::write(
        &file,
        "[listen]\nport = 0\n\n[limits]\nmax_frame = 200\nmax_pending = 4096\nmax_connections = 100\n\n[streams]\ndeclared = [\"orders=pickup\"]\ndata_dir = \"data\"\nfsync = \"never\"\n\n[logging]\nquiet = true\n",
    )
    .unwrap();
    let start = |extra: &[&str], env: &[(&str, &str)]| {
        let mut command = hubcast();
        command
            .current_dir(&dir)
            .args(["serve", "--config", "hubcast.toml"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        command.spawn().unwrap()
    };
    let port_of = async |child: &mut Child| -> u16 {
        let stdout = child.stdout.take().unwrap();
        let first = within(BufReader::new(stdout).lines().next_line())
            .await
            .unwrap()
            .unwrap();
        let addr = first.strip_prefix("Server up on ").expect(&first);
        addr.rsplit(':').next().unwrap().parse().unwrap()
    };
    let big = format!("{}\n", event("big", json!("x".repeat(300))));

    // The file's limit: a 300 B frame is too large.
    let mut hub = start(&[], &[]);
    let port = port_of(&mut hub).await;
    let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    client.write_all(big.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(client).lines();
    let line = within(lines.next_line()).await.unwrap().unwrap();
    assert!(line.contains("frame_too_large"), "{line}");
    // A stored event lands in the file's data_dir, relative to the file.
    let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    client
        .write_all(b"{\"event\":\"pickup\",\"payload\":1,\"id\":\"a\"}\n")
        .await
        .unwrap();
    let mut lines = BufReader::new(client).lines();
    loop {
        let line = within(lines.next_line()).await.unwrap().unwrap();
        if line.contains("$stored") {
            assert!(line.contains("\"seq\":1"), "{line}");
            break;
        }
    }
    assert!(dir.join("data").join("streams").join("orders").is_dir());
    hub.kill().await.unwrap();

    // A flag overrides the file: the same frame is fine.
    let mut hub = start(&["--max-frame", "1000", "--max-pending", "1MiB"], &[]);
    let port = port_of(&mut hub).await;
    let mut client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    client.write_all(big.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(client).lines();
    let line = within(lines.next_line()).await.unwrap().unwrap();
    assert!(line.starts_with("{\"event\":\"big\""), "{line}");
    hub.kill().await.unwrap();

    // An environment variable overrides the file: one connection at most.
    let mut hub = start(&[], &[("HUBCAST_MAX_CONNS", "1")]);
    let port = port_of(&mut hub).await;
    let _first = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let second = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut lines = BufReader::new(second).lines();
    let line = within(lines.next_line()).await.unwrap().unwrap();
    assert!(line.contains("too_many_connections"), "{line}");
    hub.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #15: the release binary, as installed, runs from an empty directory holding
/// only the annotated example config (deploy/hubcast.toml): it serves, stores under
/// the data dir the file names (relative to the file), and stops cleanly on SIGTERM.
/// `.ci/run` builds it (`cargo build --release`) before the tests.
#[tokio::test]
async fn the_release_binary_runs_from_an_empty_directory_with_only_its_config() {
    let debug = std::path::Path::new(env!("CARGO_BIN_EXE_hubcast"));
    let release = debug
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("release/hubcast");
    if !crate::support::require_file(&release, "the release binary (cargo build --release)") {
        return;
    }
    // Built from this revision, not left over from another.
    let version = |bin: &std::path::Path| {
        let out = std::process::Command::new(bin)
            .arg("--version")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let (theirs, ours) = (version(&release), version(debug));
    if theirs != ours {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(!ci, "target/release/hubcast is {theirs}, the tests {ours}");
        eprintln!("SKIPPED: target/release/hubcast is {theirs}, not {ours}: cargo build --release");
        return;
    }
    let dir = std::env::temp_dir().join(format!("hubcast-release-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/hubcast.toml");
    std::fs::copy(example, dir.join("hubcast.toml")).unwrap();
    let mut hub = Command::new(&release)
        .current_dir(&dir)
        .args(["serve", "--config", "hubcast.toml", "--port", "0"])
        .args(["--stream", "orders=pickup", "--quiet"])
        .env_remove("PORT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let first = within(
        BufReader::new(hub.stdout.take().unwrap())
            .lines()
            .next_line(),
    )
    .await
    .unwrap()
    .unwrap();
    let addr = first.strip_prefix("Server up on 127.0.0.1:").expect(&first);
    let port: u16 = addr.parse().unwrap();
    let listener = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut sender = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The class's framing: no newline; the id asks for a confirmation once on disk.
    sender
        .write_all(b"{\"event\":\"pickup\",\"payload\":{\"orderID\":7},\"id\":\"o-7\"}")
        .await
        .unwrap();
    let mut heard = BufReader::new(listener).lines();
    let line = within(heard.next_line()).await.unwrap().unwrap();
    assert!(line.contains("\"orderID\":7"), "{line}");
    let mut answers = BufReader::new(sender).lines();
    loop {
        let line = within(answers.next_line()).await.unwrap().unwrap();
        if line.contains("$stored") {
            assert!(line.contains("\"seq\":1"), "{line}");
            break;
        }
    }
    assert!(dir.join("hubcast-data/streams/orders").is_dir());
    let pid = hub.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(within(hub.wait()).await.unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #15: `hubcast config check` says OK for the annotated example, and names the
/// line and key of what is wrong, with exit code 2.
#[tokio::test]
async fn config_check_names_the_line_and_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/hubcast.toml");
    let output = within(hubcast().args(["config", "check", example]).output())
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(out.contains("OK"), "{out}");
    let dir = std::env::temp_dir().join(format!("hubcast-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, needles) in [
        (
            "[limits]\nmax_frame = \"lots\"\n",
            &[":2:", "limits.max_frame", "lots"][..],
        ),
        (
            "[limits]\n\nmax_frames = 1\n",
            &[":3:", "unknown key `limits.max_frames`"],
        ),
        ("[limitz]\n", &[":1:", "unknown section [limitz]"]),
        (
            "[delivery]\necho = \"yes\"\n",
            &[":2:", "delivery.echo", "true or false"],
        ),
        (
            "[delivery]\nslow_consumer = \"sometimes\"\n",
            &[":2:", "sometimes"],
        ),
        // Each value is fine; together they cannot work.
        (
            "[limits]\nmax_frame = \"1MiB\"\nmax_pending = \"1KiB\"\n",
            &["--max-pending"],
        ),
        ("[auth]\nfile = \"missing.toml\"\n", &["missing.toml"]),
        (
            "[cluster]\nurls = [\"nats://127.0.0.1:4222\", \"http://x:1\"]\n",
            &[":2:", "cluster.urls", "is not a NATS URL"],
        ),
        ("[listen\n", &[":1:"]),
    ] {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let (code, out) = run_to_end(&["config", "check", file.to_str().unwrap()]).await;
        assert_eq!(code, Some(2), "{text}: {out}");
        for needle in needles {
            assert!(out.contains(needle), "{text}: {needle:?} not in {out}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #15: the systemd unit passes `systemd-analyze verify` (with ExecStart pointed
/// at the binary under test, since /usr/local/bin/hubcast is not installed here).
#[tokio::test]
async fn the_systemd_unit_verifies() {
    if !crate::support::require("systemd-analyze") {
        return;
    }
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/hubcast.service"
    ))
    .unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("DynamicUser=yes"));
    let dir = std::env::temp_dir().join(format!("hubcast-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hubcast.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/hubcast", env!("CARGO_BIN_EXE_hubcast")),
    )
    .unwrap();
    let output = within(
        tokio::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("hubcast.service"), "warnings: {stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue #15: under systemd (`Type=notify`), `serve` says READY=1 once it listens, and
/// STOPPING=1 when asked to stop.
#[tokio::test]
async fn serve_notifies_systemd_when_ready_and_stopping() {
    let dir = std::env::temp_dir().join(format!("hubcast-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&socket_path);
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    // The hub's log goes to a file: when a notification does not come, the failure
    // shows what the hub was doing.
    let log_path = dir.join("hub.log");
    let mut child = hubcast()
        .args(["serve", "--port", "0", "--quiet"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut buf = [0u8; 256];
    let n = within(socket.recv(&mut buf)).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("READY=1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Ready means listening: the port is announced and takes connections.
    // stdout stays open (read to its end below): the hub never writes to a closed pipe.
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within(stdout.next_line()).await.unwrap().unwrap();
    let addr = first.strip_prefix("Server up on ").expect(&first);
    TcpStream::connect(addr).await.unwrap();
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let n = tokio::time::timeout(PATIENCE, socket.recv(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no STOPPING=1 after SIGTERM; the hub's log:\n{}", log()))
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    while let Ok(Some(_)) = within(stdout.next_line()).await {}
    let status = within(child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}; the hub's log:\n{}", log());
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue #15: completions and the man page come from the CLI definition, and
/// `--version` names the git revision.
#[tokio::test]
async fn completions_man_page_and_version() {
    let stdout = async |args: &[&str]| {
        let output = within(hubcast().args(args).output()).await.unwrap();
        assert!(output.status.success(), "{args:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let script = stdout(&["completions", shell]).await;
        // Every subcommand and serve's newest flags are in it.
        for word in ["serve", "bench", "config", "http", "ws-ping", "completions"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let man = stdout(&["man"]).await;
    assert!(
        man.contains(".TH hubcast 1"),
        "{}",
        &man[..200.min(man.len())]
    );
    assert!(man.contains("serve"));
    let version = stdout(&["--version"]).await;
    let rev = version
        .trim()
        .strip_prefix(concat!("hubcast ", env!("CARGO_PKG_VERSION"), " ("))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{version}"));
    assert!(
        rev == "unknown" || rev.chars().all(|c| c.is_ascii_hexdigit()),
        "{version}"
    );
    let (code, err) = run_to_end(&["completions", "tcsh"]).await;
    assert_eq!(code, Some(2), "{err}");
}
