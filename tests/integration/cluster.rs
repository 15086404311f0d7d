//! Issue #16: hubs as a cluster over NATS. Real processes: a three-node nats-server
//! cluster (tests/cluster/nats-node.conf, routes on loopback) and `hubcast serve
//! --cluster` hubs, with raw TCP clients as `nc` would be.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::support::{free_port, output_within, require, within, HubProcess, LOG_TAIL};
use crate::ws::http_get;

const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cluster/nats-node.conf");
/// Route connections from one node to each other (`pool_size` in [`CONFIG`]).
const ROUTE_POOL: usize = 3;

/// One nats-server of the test cluster.
struct NatsNode {
    child: Child,
    port: u16,
    http: SocketAddr,
    /// The last lines of its log (shown when a test fails).
    log: Arc<Mutex<VecDeque<String>>>,
}

/// Three nats-servers routed to each other, with JetStream, on loopback.
struct NatsCluster {
    nodes: Vec<Option<NatsNode>>,
    dir: PathBuf,
    /// One cluster at a time: three NATS servers and their hubs are most of what two
    /// cores can run beside the rest of the suite.
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl NatsCluster {
    /// Starts the cluster and waits until every node has routes to the two others
    /// (`None`, after saying so, when nats-server is not installed).
    async fn start() -> Option<NatsCluster> {
        if !require("nats-server") {
            return None;
        }
        let turn = TURN.lock().await;
        let dir = std::env::temp_dir().join(format!(
            "hubcast-nats-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // Ports are picked free, then let go for nats-server to bind: another process
        // can take one in between (an outgoing connection's ephemeral port), and the
        // server then exits at start. The whole cluster is started again on new ports.
        let mut attempt = 1;
        let nodes = loop {
            match Self::start_nodes(&dir).await {
                Ok(nodes) => break nodes,
                Err(why) if attempt < 5 => {
                    eprintln!("starting the NATS cluster again (attempt {attempt}): {why}");
                    attempt += 1;
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir).unwrap();
                }
                Err(why) => panic!("the NATS cluster did not start in 5 attempts: {why}"),
            }
        };
        let cluster = NatsCluster {
            nodes,
            dir,
            _turn: turn,
        };
        // Formed (NATS's own monitoring): each node has its whole pool of routes to
        // both others, and knows JetStream's meta leader. A route pool still forming
        // closes duplicate connections, and what core NATS had on one is gone: a test
        // that starts publishing then can lose an event it did not expect to lose.
        for i in 0..3 {
            within(async {
                loop {
                    let routes = cluster.monitor(i, "/routez").await;
                    let mut pools: BTreeMap<&str, usize> = BTreeMap::new();
                    for route in routes["routes"].as_array().into_iter().flatten() {
                        // Pinned routes (JetStream's `$SYS` account) are not in the pool.
                        if route.get("account").is_none() {
                            *pools
                                .entry(route["remote_name"].as_str().unwrap_or(""))
                                .or_default() += 1;
                        }
                    }
                    let pooled = pools.len() == 2 && pools.values().all(|&n| n == ROUTE_POOL);
                    let jsz = cluster.monitor(i, "/jsz").await;
                    if pooled
                        && jsz["meta_cluster"]["leader"]
                            .as_str()
                            .is_some_and(|l| !l.is_empty())
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
        }
        Some(cluster)
    }

    /// Starts the three servers on ports picked now; a server that exits while
    /// starting is an error with the last lines it printed (the others are stopped).
    async fn start_nodes(dir: &std::path::Path) -> Result<Vec<Option<NatsNode>>, String> {
        let ports: Vec<(u16, u16, u16)> = (0..3)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let route = |i: usize| format!("nats-route://127.0.0.1:{}", ports[i].1);
        let mut nodes = Vec::new();
        for (i, &(port, route_port, http)) in ports.iter().enumerate() {
            let name = format!("n{i}");
            let mut child = Command::new("nats-server")
                .args(["-c", CONFIG])
                .env("NATS_NAME", &name)
                .env("NATS_PORT", port.to_string())
                .env("NATS_HTTP_ADDR", format!("127.0.0.1:{http}"))
                .env("NATS_STORE", dir.join(&name))
                .env("NATS_ROUTE", route_port.to_string())
                .env("NATS_ROUTE_A", route(0))
                .env("NATS_ROUTE_B", route(1))
                .env("NATS_ROUTE_C", route(2))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
            let mut said = Vec::new();
            loop {
                let Some(line) = within(log.next_line()).await.unwrap() else {
                    // Dropping `child` and `nodes` stops this server and the others.
                    let last = said.len().saturating_sub(3);
                    return Err(format!(
                        "nats-server {name} exited while starting: {}",
                        said[last..].join(" | ")
                    ));
                };
                if line.contains("Server is ready") {
                    break;
                }
                said.push(line);
            }
            let tail = Arc::new(Mutex::new(VecDeque::new()));
            let keep = Arc::clone(&tail);
            tokio::spawn(async move {
                while let Ok(Some(line)) = log.next_line().await {
                    let mut tail = keep.lock().unwrap();
                    if tail.len() == LOG_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
            nodes.push(Some(NatsNode {
                child,
                port,
                http: SocketAddr::from(([127, 0, 0, 1], http)),
                log: tail,
            }));
        }
        Ok(nodes)
    }

    fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].as_ref().unwrap().port)
    }

    /// A monitoring endpoint of node `i`, parsed.
    async fn monitor(&self, i: usize, path: &str) -> Value {
        // HTTP/1.0: the body as it is, not chunked.
        use tokio::io::AsyncReadExt;
        let http = self.nodes[i].as_ref().unwrap().http;
        let mut stream = TcpStream::connect(http).await.unwrap();
        let request = format!("GET {path} HTTP/1.0\r\nHost: {http}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        within(stream.read_to_string(&mut response)).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{path}: {head}"
        );
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The messages NATS node `i` has sent to the connection named `name`.
    async fn out_msgs(&self, i: usize, name: &str) -> u64 {
        let connz = self.monitor(i, "/connz?limit=1024").await;
        let conn = connz["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no connection {name} on node {i}: {connz}"));
        conn["out_msgs"].as_u64().unwrap()
    }

    /// What node `i`'s monitoring says of JetStream stream `name`, its configuration
    /// included.
    async fn stream_detail(&self, i: usize, name: &str) -> Value {
        let jsz = self
            .monitor(i, "/jsz?streams=true&config=true&accounts=true")
            .await;
        jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no stream {name} on node {i}: {jsz}"))
    }

    /// The node that leads JetStream stream `name` (as a surviving node `i` sees it).
    async fn stream_leader(&self, i: usize, name: &str) -> usize {
        let detail = self.stream_detail(i, name).await;
        let leader = detail["cluster"]["leader"]
            .as_str()
            .unwrap_or_else(|| panic!("no leader of stream {name}: {detail}"));
        leader[1..].parse().unwrap()
    }

    async fn kill9(&mut self, i: usize) {
        let mut node = self.nodes[i].take().unwrap();
        node.child.start_kill().unwrap();
        within(node.child.wait()).await.unwrap();
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            let Some(node) = node else { continue };
            let _ = node.child.start_kill();
            if std::thread::panicking() {
                let tail = node.log.lock().unwrap();
                let tail: Vec<&str> = tail.iter().map(String::as_str).collect();
                eprintln!(
                    "--- the last log lines of nats-server n{i}:\n{}",
                    tail.join("\n")
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `hubcast serve --cluster URL --node NAME [ARGS]`.
async fn hub(cluster_url: &str, node: &str, args: &[&str]) -> HubProcess {
    let mut cmd = HubProcess::command(&["serve", "--port", "0", "--quiet"]);
    cmd.args(["--cluster", cluster_url, "--node", node])
        .args(args);
    let mut hub = HubProcess::spawn(cmd).await;
    hub.wait_log("backplane: connected to NATS", 1).await;
    hub
}

/// A raw TCP client; what it hears is parsed and sent to `events` by a task.
struct Peer {
    writer: tokio::net::tcp::OwnedWriteHalf,
    events: mpsc::UnboundedReceiver<Value>,
}

impl Peer {
    async fn connect(port: u16) -> Peer {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (reader, writer) = stream.into_split();
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(reader).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Peer { writer, events }
    }

    async fn send(&mut self, frame: Value) {
        let mut line = frame.to_string();
        line.push('\n');
        if let Err(e) = self.writer.write_all(line.as_bytes()).await {
            // What the hub said last says why it closed the connection.
            let mut heard = Vec::new();
            while let Ok(frame) = self.events.try_recv() {
                heard.push(frame);
            }
            let last = &heard[heard.len().saturating_sub(3)..];
            panic!("sending {frame}: {e}; the hub said last: {last:?}");
        }
    }

    async fn next(&mut self) -> Value {
        within(self.events.recv())
            .await
            .expect("the hub closed the connection")
    }

    /// Sends a control request and waits for its answer, skipping events before it.
    async fn request(&mut self, name: &str, payload: Value, answer: &str) {
        self.send(json!({"event": name, "payload": payload})).await;
        loop {
            let frame = self.next().await;
            if frame["event"] == answer {
                return;
            }
            assert_ne!(frame["event"], "$error", "{frame}");
        }
    }

    async fn subscribe(&mut self, patterns: &[&str]) {
        self.request("$subscribe", json!({ "events": patterns }), "$subscribed")
            .await;
    }

    async fn join(&mut self, room: &str) {
        self.request("$join", json!({ "room": room }), "$joined")
            .await;
    }
}

/// Sends `tick` events from `sender` every 20 ms until `listener` hears one; returns
/// the other frames `listener` got meanwhile.
async fn send_ticks_until_heard(sender: &mut Peer, listener: &mut Peer) -> Vec<Value> {
    let mut others = Vec::new();
    within(async {
        loop {
            sender.send(json!({"event": "tick", "payload": 0})).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut heard = false;
            while let Ok(frame) = listener.events.try_recv() {
                if frame["event"] == "tick" {
                    heard = true;
                } else {
                    others.push(frame);
                }
            }
            if heard {
                return;
            }
        }
    })
    .await;
    others
}

/// What one receiver got: per sender node and event name, the `n`s in arrival order.
#[derive(Default)]
struct Heard {
    by: BTreeMap<(u64, String), Vec<u64>>,
    ends: BTreeSet<u64>,
}

/// Reads `peer` until it has heard `sync.end` from `senders` nodes.
async fn hear_until_ends(peer: &mut Peer, senders: usize) -> Heard {
    let mut heard = Heard::default();
    while heard.ends.len() < senders {
        let frame = peer.next().await;
        let name = frame["event"].as_str().unwrap().to_string();
        let from = frame["payload"]["from"].as_u64();
        match (name.as_str(), from) {
            ("sync.end", Some(from)) => {
                heard.ends.insert(from);
            }
            (name, _) if name.starts_with("sync.") => {}
            (_, Some(from)) => heard
                .by
                .entry((from, name.clone()))
                .or_default()
                .push(frame["payload"]["n"].as_u64().unwrap()),
            _ => panic!("unexpected {frame}"),
        }
    }
    heard
}

/// Issue #16: an event published on any node reaches every matching client on every
/// node exactly once, in per-sender order, rooms and patterns spanning nodes; a node
/// whose clients want nothing of it never receives it from NATS.
#[tokio::test]
async fn every_matching_client_on_every_node_gets_each_event_once_in_order() {
    let Some(nats) = NatsCluster::start().await else {
        return;
    };
    // Three hubs, each on its own NATS node; a fourth that wants only `nobody.*`.
    let mut hubs = Vec::new();
    for i in 0..3 {
        hubs.push(hub(&nats.url(i), &format!("h{i}"), &[]).await);
    }
    let quiet = hub(&nats.url(0), "quiet", &[]).await;
    let mut publishers = Vec::new();
    let mut everyone = Vec::new();
    let mut orders = Vec::new();
    let mut room = Vec::new();
    for hub in &hubs {
        let mut p = Peer::connect(hub.port).await;
        p.subscribe(&["publishers.hear.nothing"]).await;
        publishers.push(p);
        everyone.push(Peer::connect(hub.port).await);
        let mut o = Peer::connect(hub.port).await;
        o.subscribe(&["order.*", "sync.*"]).await;
        orders.push(o);
        let mut r = Peer::connect(hub.port).await;
        r.subscribe(&["pickup", "sync.*"]).await;
        r.join("acme").await;
        room.push(r);
    }
    let mut nobody = Peer::connect(quiet.port).await;
    nobody.subscribe(&["nobody.*"]).await;

    // Interest travels through NATS: send `sync` events from every node until every
    // receiver has heard one from each (then the subscriptions are in place).
    let mut seen: Vec<BTreeSet<(u64, bool)>> = vec![BTreeSet::new(); 9];
    within(async {
        while seen.iter().any(|s| s.len() < 3) || seen[6..].iter().any(|s| s.len() < 6) {
            for (i, p) in publishers.iter_mut().enumerate() {
                p.send(json!({"event": "sync.x", "payload": {"from": i}}))
                    .await;
                p.send(json!({"event": "sync.r", "room": "acme", "payload": {"from": i}}))
                    .await;
            }
            let peers = everyone
                .iter_mut()
                .chain(orders.iter_mut())
                .chain(room.iter_mut());
            for (k, peer) in peers.enumerate() {
                while let Ok(frame) = peer.events.try_recv() {
                    let from = frame["payload"]["from"].as_u64().unwrap();
                    match frame["event"].as_str().unwrap() {
                        "sync.x" => seen[k].insert((from, false)),
                        "sync.r" => seen[k].insert((from, true)),
                        other => panic!("{other} before the test began"),
                    };
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Each node's publisher: orders (everyone and the order subscribers hear them),
    // misc (everyone), and pickups to room acme (its members), then sync.end.
    const N: u64 = 300;
    for (i, p) in publishers.iter_mut().enumerate() {
        let mut batch = String::new();
        for n in 0..N {
            let frame = match n % 3 {
                // Some with an id (confirmed, and not part of a run on either side).
                0 if n % 2 == 0 => {
                    json!({"event": "order.created", "id": format!("{i}-{n}"), "payload": {"from": i, "n": n}})
                }
                0 => json!({"event": "order.created", "payload": {"from": i, "n": n}}),
                1 => json!({"event": "misc", "payload": {"from": i, "n": n}}),
                _ => json!({"event": "pickup", "room": "acme", "payload": {"from": i, "n": n}}),
            };
            batch.push_str(&frame.to_string());
            batch.push('\n');
        }
        batch.push_str(&json!({"event": "sync.end", "payload": {"from": i}}).to_string());
        batch.push('\n');
        p.writer.write_all(batch.as_bytes()).await.unwrap();
    }
    let expect = |kind: u64| (0..N).filter(|n| n % 3 == kind).collect::<Vec<_>>();
    for (label, peers, names) in [
        (
            "everyone",
            &mut everyone,
            vec![("order.created", 0), ("misc", 1)],
        ),
        ("orders", &mut orders, vec![("order.created", 0)]),
        ("room", &mut room, vec![("pickup", 2)]),
    ] {
        for (node, peer) in peers.iter_mut().enumerate() {
            let heard = hear_until_ends(peer, 3).await;
            let mut wanted = BTreeMap::new();
            for from in 0..3u64 {
                for &(name, kind) in &names {
                    wanted.insert((from, name.to_string()), expect(kind));
                }
            }
            // Exactly the matching events, each once, in the order each node sent them.
            if heard.by != wanted {
                let summary: Vec<String> = heard
                    .by
                    .iter()
                    .map(|(key, ns)| {
                        let ordered = ns.windows(2).all(|w| w[0] < w[1]);
                        format!("{key:?}: {} events, in order: {ordered}", ns.len())
                    })
                    .collect();
                panic!(
                    "{label} client on node {node} heard {summary:#?}; each of {:?} once was wanted ({} each)",
                    wanted.keys().collect::<Vec<_>>(),
                    N / 3
                );
            }
        }
    }

    // Interest: `quiet` holds only `nobody.*`; none of the above crossed to it.
    let mut got = 0;
    within(async {
        loop {
            publishers[1]
                .send(json!({"event": "nobody.here", "payload": {"from": 1}}))
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut any = false;
            while let Ok(frame) = nobody.events.try_recv() {
                assert_eq!(frame["event"], "nobody.here");
                got += 1;
                any = true;
            }
            if any {
                break;
            }
        }
    })
    .await;
    // Some `nobody.here` may still be on the way; the last word is a `nobody.end`.
    publishers[1]
        .send(json!({"event": "nobody.end", "payload": {"from": 1}}))
        .await;
    loop {
        let frame = nobody.next().await;
        got += 1;
        if frame["event"] == "nobody.end" {
            break;
        }
    }
    let crossed = nats.out_msgs(0, "hubcast quiet").await;
    assert_eq!(
        crossed, got,
        "NATS sent the quiet node {crossed} messages; its client wanted {got}"
    );
    // While the hubs that want everything got every event of the test.
    assert!(nats.out_msgs(0, "hubcast h0").await >= 2 * N);
}

/// Issue #16: when a node loses its NATS server, its clients get `$gap {since}` within
/// a second and `$gap {until}` once it has found another server of the cluster; live
/// traffic resumes within 5 s, and /readyz says what happened.
#[tokio::test]
async fn losing_a_nats_node_sends_gap_notices_and_traffic_resumes() {
    let Some(mut nats) = NatsCluster::start().await else {
        return;
    };
    let http = format!("127.0.0.1:{}", free_port());
    // Only node 0 is given: the others are found from what the cluster announces.
    let mut a = hub(&nats.url(0), "a", &["--http", &http]).await;
    let b = hub(&nats.url(1), "b", &[]).await;
    let mut listener = Peer::connect(a.port).await;
    // The CLI and the JS client on the same node say what the notices mean.
    let mut sub = HubProcess::command(&["sub", "--port", &a.port.to_string(), "tick"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut sub_log = BufReader::new(sub.stderr.take().unwrap()).lines();
    let js = if require("node") {
        let client = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/src/index.js");
        let url = format!("tcp://127.0.0.1:{}", a.port);
        let script = format!(
            "const {{ connect }} = await import({client:?});
             const hub = await connect({url:?});
             hub.on('gap', (gap) => console.log(JSON.stringify(gap)));
             console.log('ready');"
        );
        let mut child = Command::new("node")
            .args(["--input-type=module", "-e", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = stdout_lines(&mut child);
        assert_eq!(within(lines.recv()).await.as_deref(), Some("ready"));
        Some((child, lines))
    } else {
        None
    };
    let mut sender = Peer::connect(b.port).await;
    sender.subscribe(&["nothing"]).await;
    let skipped = send_ticks_until_heard(&mut sender, &mut listener).await;
    assert!(skipped.iter().all(|f| f["event"] != "$gap"), "{skipped:?}");
    // The CLI's subscriber is in (its connection is logged by now or soon).
    a.wait_log("connection client=", if js.is_some() { 3 } else { 2 })
        .await;

    let lost = nats.url(0);
    let killed = Instant::now();
    nats.kill9(0).await;
    let since = loop {
        let frame = listener.next().await;
        if frame["event"] == "$gap" {
            break frame;
        }
        assert_eq!(frame["event"], "tick", "{frame}");
    };
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "$gap came {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(since["payload"]["reason"], "backplane", "{since}");
    let at = since["payload"]["since"].as_str().expect("since");
    humantime::parse_rfc3339(at).unwrap();
    let until = loop {
        let frame = listener.next().await;
        if frame["event"] == "$gap" {
            break frame;
        }
    };
    assert_eq!(until["payload"]["reason"], "backplane", "{until}");
    assert!(until["payload"]["until"].is_string(), "{until}");
    // Live traffic again, across the remaining NATS nodes.
    let skipped = send_ticks_until_heard(&mut sender, &mut listener).await;
    assert!(skipped.iter().all(|f| f["event"] != "$gap"), "{skipped:?}");
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "traffic resumed {:?} after the kill",
        killed.elapsed()
    );
    a.wait_log("backplane: reconnected", 1).await;
    for words in [
        "lost the other nodes",
        "has the other nodes of its cluster again",
    ] {
        loop {
            let line = within(sub_log.next_line())
                .await
                .unwrap()
                .expect("sub exited");
            if line.contains(words) {
                break;
            }
        }
    }
    if let Some((_child, mut lines)) = js {
        let since: Value = serde_json::from_str(&within(lines.recv()).await.unwrap()).unwrap();
        let until: Value = serde_json::from_str(&within(lines.recv()).await.unwrap()).unwrap();
        assert!(
            since["since"].is_string() && until["until"].is_string(),
            "{since} {until}"
        );
    }
    let (status, _, body) = http_get(http.parse().unwrap(), "/readyz", "").await;
    assert_eq!(status, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["backplane"]["connected"], true, "{ready}");
    assert_ne!(ready["backplane"]["server"], lost, "{ready}");
    let (_, _, metrics) = http_get(http.parse().unwrap(), "/metrics", "").await;
    assert!(
        metrics.contains("hubcast_backplane_reconnects_total 1"),
        "{metrics}"
    );
}

/// Issue #16: without a reachable NATS, `serve --cluster` says so and exits non-zero;
/// bad URLs are named.
#[tokio::test]
async fn cluster_flags_are_checked() {
    let port = free_port();
    let output = output_within(
        HubProcess::command(&["serve", "--port", "0"])
            .args(["--cluster", &format!("nats://127.0.0.1:{port}")])
            .stdin(Stdio::null()),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot reach NATS at nats://127.0.0.1:{port}")),
        "{stderr}"
    );
    let output = output_within(
        HubProcess::command(&["serve", "--cluster", "http://x:1"]).stdin(Stdio::null()),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not a NATS URL"), "{stderr}");
    let output =
        output_within(HubProcess::command(&["serve", "--node", "x"]).stdin(Stdio::null())).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--cluster"));
}

/// A client process's stdout, line by line, as a channel.
fn stdout_lines(child: &mut Child) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Issue #16: when a hub dies, its clients (the CLI with `--hub a,b`, the JS client
/// with several URLs) reconnect to another node, restore their subscriptions there,
/// and hear the cluster's events again.
#[tokio::test]
async fn clients_of_a_dead_hub_move_to_another_node() {
    let Some(nats) = NatsCluster::start().await else {
        return;
    };
    let node_ok = require("node");
    let first = hub(&nats.url(0), "first", &[]).await;
    let mut second = hub(&nats.url(1), "second", &[]).await;
    let hubs = format!("127.0.0.1:{},127.0.0.1:{}", first.port, second.port);
    let mut cli = HubProcess::command(&["sub", "--hub", &hubs, "order.*"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut heard = vec![stdout_lines(&mut cli)];
    let _js = if node_ok {
        let client = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/src/index.js");
        let urls = format!(
            "tcp://127.0.0.1:{},tcp://127.0.0.1:{}",
            first.port, second.port
        );
        let script = format!(
            "const {{ connect }} = await import({client:?});
             const hub = await connect({urls:?}, {{ minDelay: 20, maxDelay: 200 }});
             hub.on('reconnect', () => console.log(JSON.stringify({{event: 'reconnect', url: hub.url.href}})));
             await hub.subscribe('order.*');
             hub.onAny((e) => console.log(JSON.stringify(e)));"
        );
        let mut child = Command::new("node")
            .args(["--input-type=module", "-e", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        heard.push(stdout_lines(&mut child));
        Some(child)
    } else {
        None
    };
    let clients = heard.len();
    let mut publisher = Peer::connect(second.port).await;
    publisher.subscribe(&["nothing"]).await;
    let mut n = 0u64;
    // Sends order.x until every client has printed one numbered at least `from`.
    let mut publish_until_heard = async |from: u64, n: &mut u64| {
        let mut done = vec![false; heard.len()];
        within(async {
            while done.iter().any(|d| !d) {
                publisher
                    .send(json!({"event": "order.x", "payload": {"n": *n}}))
                    .await;
                *n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                for (i, lines) in heard.iter_mut().enumerate() {
                    while let Ok(line) = lines.try_recv() {
                        let frame: Value = serde_json::from_str(&line).unwrap();
                        if frame["event"] == "order.x"
                            && frame["payload"]["n"].as_u64().unwrap() >= from
                        {
                            done[i] = true;
                        }
                    }
                }
            }
        })
        .await;
    };
    // Both hear the cluster through the first hub (the first address).
    publish_until_heard(0, &mut n).await;
    let mut first = first;
    first.wait_log("connection client=", clients).await;
    let killed_at = n;
    first.kill9().await;
    // ... and, once it is gone, through the second, subscriptions restored.
    publish_until_heard(killed_at, &mut n).await;
    // The publisher and the clients that moved.
    second.wait_log("connection client=", 1 + clients).await;
}

/// Issue #16: `hubcast bench` spreads subscribers over several targets (a cluster's
/// nodes) and checks every message reached every subscriber; targets of mixed kinds
/// are refused.
#[tokio::test]
async fn the_bench_spreads_subscribers_over_a_cluster() {
    let Some(nats) = NatsCluster::start().await else {
        return;
    };
    let a = hub(&nats.url(0), "a", &[]).await;
    let b = hub(&nats.url(1), "b", &[]).await;
    let targets = format!(
        "hubcast://127.0.0.1:{},hubcast://127.0.0.1:{}",
        a.port, b.port
    );
    let output = output_within(
        HubProcess::command(&["bench", "-t", &targets, "-n", "6", "-k", "2000", "--json"])
            .stdin(Stdio::null()),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["target"], targets, "{report}");
    assert_eq!(report["delivered"], 12_000, "{report}");
    let mixed = format!("{targets},nats://127.0.0.1:1");
    let output =
        output_within(HubProcess::command(&["bench", "-t", &mixed]).stdin(Stdio::null())).await;
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("all be of one kind"));
}

/// Issue #16: what another program publishes on hubcast's subjects is delivered only
/// if it is a valid event of the name (and room) its subject says; the rest is counted
/// and dropped, and the clients hear nothing of it.
#[tokio::test]
async fn foreign_messages_on_hubcast_subjects_are_not_delivered() {
    let Some(nats) = NatsCluster::start().await else {
        return;
    };
    let http = format!("127.0.0.1:{}", free_port());
    let node = hub(&nats.url(0), "n", &["--http", &http]).await;
    let mut listener = Peer::connect(node.port).await;
    listener.subscribe(&[">"]).await;
    let mut foreign = TcpStream::connect(nats.url(0).trim_start_matches("nats://"))
        .await
        .unwrap();
    let pub_ = |subject: &str, body: &str| format!("PUB {subject} {}\r\n{body}\r\n", body.len());
    let mut wire = String::from("CONNECT {\"verbose\":false}\r\n");
    wire += &pub_("hubcast.e.x", "hello\n");
    wire += &pub_("hubcast.e.x", "{\"event\":\"y\",\"payload\":1}\n");
    wire += &pub_(
        "hubcast.e.z",
        "{\"event\":\"z\",\"room\":\"r\",\"payload\":1}\n",
    );
    wire += &pub_(
        "hubcast.e.two",
        "{\"event\":\"two\",\"payload\":1}\n{\"event\":\"two\",\"payload\":2}\n",
    );
    // Interest travels: send the good one until it arrives.
    within(async {
        loop {
            let good = pub_("hubcast.e.ok", "{\"event\":\"ok\",\"payload\":1}\n");
            foreign
                .write_all(format!("{wire}{good}").as_bytes())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            let mut heard_ok = false;
            while let Ok(frame) = listener.events.try_recv() {
                assert_eq!(frame["event"], "ok", "{frame}");
                heard_ok = true;
            }
            if heard_ok {
                return;
            }
        }
    })
    .await;
    let (_, _, metrics) = http_get(http.parse().unwrap(), "/metrics", "").await;
    let rejected: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hubcast_backplane_rejected_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(rejected >= 4, "{metrics}");
    assert_eq!(rejected % 4, 0, "four bad messages per round: {rejected}");
    // `$stats` (what the dashboard shows) names the node and its link.
    listener
        .send(json!({"event": "$stats", "payload": null}))
        .await;
    let stats = loop {
        let frame = listener.next().await;
        if frame["event"] == "$stats" {
            break frame;
        }
    };
    let link = &stats["payload"]["backplane"];
    assert_eq!(link["node"], "n", "{stats}");
    assert_eq!(link["connected"], true, "{stats}");
    assert_eq!(link["server"], nats.url(0), "{stats}");
}

/// Issue #16: what a node subscribes to in NATS stays bounded whatever its clients
/// subscribe to: past `MAX_INTEREST` distinct patterns (or rooms) it asks for every
/// event (or every room's) instead, and filters here.
#[tokio::test]
async fn a_node_s_interest_is_bounded() {
    use hubcast::cluster::MAX_INTEREST;
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    let mut clients = Vec::new();
    let per_client = 1000; // the default --max-subscriptions
    let mut patterns = 0;
    while patterns <= MAX_INTEREST {
        let mut client = hub.connect().await;
        let list: Vec<String> = (0..per_client)
            .map(|i| format!("p{}.{i}.*", clients.len()))
            .collect();
        client
            .send(format!(
                "{}\n",
                json!({"event": "$subscribe", "payload": {"events": list}})
            ))
            .await;
        assert_eq!(client.json().await["event"], "$subscribed");
        patterns += per_client;
        let interest = hub.hub.interest();
        if patterns <= MAX_INTEREST {
            assert!(!interest.everything);
            assert_eq!(interest.patterns.len(), patterns);
        } else {
            assert!(interest.everything, "{patterns} patterns");
            assert!(interest.patterns.is_empty());
        }
        clients.push(client);
    }
    let per_client = 100; // the default --max-rooms
    let mut rooms = 0;
    while rooms <= MAX_INTEREST {
        let mut client = hub.connect().await;
        let mut joins = String::new();
        for i in 0..per_client {
            joins += &format!(
                "{}\n",
                json!({"event": "$join", "payload": {"room": format!("r{rooms}-{i}")}})
            );
        }
        client.send(joins).await;
        for _ in 0..per_client {
            assert_eq!(client.json().await["event"], "$joined");
        }
        rooms += per_client;
        let interest = hub.hub.interest();
        assert_eq!(interest.all_rooms, rooms > MAX_INTEREST, "{rooms} rooms");
        assert_eq!(
            interest.rooms.len(),
            if rooms > MAX_INTEREST { 0 } else { rooms }
        );
        clients.push(client);
    }
}

/// A backplane that is cut off (as a node whose NATS went away), to see what the hub
/// tells the clients who come meanwhile.
struct CutOff(std::time::SystemTime);

impl hubcast::cluster::Backplane for CutOff {
    fn publish(&self, _: &str, _: Option<&str>, _: &[u8]) {}
    fn interest_changed(&self) {}
    fn status(&self) -> hubcast::cluster::BackplaneStatus {
        hubcast::cluster::BackplaneStatus {
            engine: "test",
            node: "cut-off".into(),
            connected: false,
            server: None,
            down_since: Some(self.0),
            published: 0,
            received: 0,
            dropped: 0,
            rejected: 0,
            reconnects: 0,
            subscriptions: 0,
        }
    }
}

/// Issue #16: a client that joins a node while it is cut off from the others is told
/// at once (`$gap {since}`: an open hub's at connection, an authenticated one right
/// after its `$welcome`), so it never believes it hears the whole cluster.
#[tokio::test]
async fn clients_joining_a_cut_off_node_are_told() {
    let since = std::time::SystemTime::now() - Duration::from_secs(3);
    let hub = crate::support::TestHub::start(hubcast::Config::default()).await;
    hub.hub.set_backplane(std::sync::Arc::new(CutOff(since)));
    let mut client = hub.connect().await;
    let gap = client.json().await;
    assert_eq!(gap["event"], "$gap", "{gap}");
    assert_eq!(gap["payload"]["reason"], "backplane");
    let at = humantime::parse_rfc3339(gap["payload"]["since"].as_str().unwrap()).unwrap();
    let off = at.duration_since(since).unwrap_or_else(|e| e.duration());
    assert!(off < Duration::from_millis(2), "{gap}");
    // An authenticated client: after its welcome, not before.
    let spec: hubcast::auth::AuthFile = toml::from_str(&format!(
        "[[users]]\nname = \"u\"\ntoken_hash = \"{}\"\nsubscribe = {{ allow = [\">\"] }}\n",
        hubcast::auth::TokenHash::new(b"secret")
    ))
    .unwrap();
    let auth = hubcast::auth::Authenticator::from_spec(&spec, None).unwrap();
    let guarded = crate::support::TestHub::start(hubcast::Config::default()).await;
    guarded.hub.set_authenticator(auth);
    guarded
        .hub
        .set_backplane(std::sync::Arc::new(CutOff(since)));
    let mut client = guarded.connect().await;
    client
        .send("{\"event\":\"$hello\",\"payload\":{\"token\":\"secret\"}}\n")
        .await;
    assert_eq!(client.json().await["event"], "$welcome");
    assert_eq!(client.json().await["event"], "$gap");
    // /readyz: not ready while cut off, and says since when.
    let web = crate::support::TestHub::start_http(hubcast::Config::default()).await;
    web.hub.set_backplane(std::sync::Arc::new(CutOff(since)));
    let (status, _, body) = http_get(web.http.unwrap(), "/readyz", "").await;
    assert_eq!(status, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], false, "{ready}");
    assert_eq!(ready["backplane"]["connected"], false, "{ready}");
    assert!(ready["backplane"]["down_since"].is_string(), "{ready}");
}

/// Issue #16: a NATS server that stops answering without closing anything (frozen
/// with SIGSTOP, as a machine that fell off the network) is found out by PINGs: the
/// node's clients get `$gap {since}`, then `{until}` once it has moved to another
/// server, and hear the cluster again.
#[tokio::test]
async fn a_silent_nats_server_is_found_out_by_pings() {
    let Some(nats) = NatsCluster::start().await else {
        return;
    };
    let a = hub(&nats.url(0), "a", &[]).await;
    let b = hub(&nats.url(1), "b", &[]).await;
    let mut listener = Peer::connect(a.port).await;
    let mut sender = Peer::connect(b.port).await;
    sender.subscribe(&["nothing"]).await;
    send_ticks_until_heard(&mut sender, &mut listener).await;
    let pid = nats.nodes[0]
        .as_ref()
        .unwrap()
        .child
        .id()
        .unwrap()
        .to_string();
    let signal = |name: &str| {
        let status = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    let mut edges = Vec::new();
    while edges.len() < 2 {
        let frame = listener.next().await;
        if frame["event"] == "$gap" {
            edges.push(frame);
        }
    }
    signal("-CONT");
    assert!(edges[0]["payload"]["since"].is_string(), "{edges:?}");
    assert!(edges[1]["payload"]["until"].is_string(), "{edges:?}");
    send_ticks_until_heard(&mut sender, &mut listener).await;
}

/// Issue #16: the lab's delivery demo across nodes: the vendor on one hub, the driver
/// on another; every order is thanked for (pickup crosses one way, in-transit and
/// delivered come back to the vendor's room on the other node).
#[tokio::test]
async fn the_delivery_demo_runs_across_two_nodes() {
    let Some(nats) = NatsCluster::start().await else {
        return;
    };
    let a = hub(&nats.url(0), "a", &[]).await;
    let mut b = hub(&nats.url(1), "b", &[]).await;
    let mut driver = HubProcess::command(&["driver", "--port", &b.port.to_string()])
        .args(["--pickup-delay", "10ms", "--deliver-delay", "30ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    b.wait_log("connection client=", 1).await;
    // Both ways of the demo are in place before the first order: node b hears what
    // is sent on node a (the driver's interest), node a hears room acme's events
    // from node b (the vendor's room, held here by a member of it).
    let mut on_a = Peer::connect(a.port).await;
    on_a.join("acme").await;
    let mut on_b = Peer::connect(b.port).await;
    within(async {
        let (mut there, mut back) = (false, false);
        while !(there && back) {
            on_a.send(json!({"event": "probe.there", "payload": 0}))
                .await;
            on_b.send(json!({"event": "probe.back", "room": "acme", "payload": 0}))
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            while let Ok(frame) = on_b.events.try_recv() {
                there |= frame["event"] == "probe.there";
            }
            while let Ok(frame) = on_a.events.try_recv() {
                back |= frame["event"] == "probe.back";
            }
        }
    })
    .await;
    let output = output_within(
        HubProcess::command(&["vendor", "--port", &a.port.to_string()])
            .args(["--store", "acme", "--count", "10", "--interval", "30ms"])
            .stdin(Stdio::null()),
    )
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let thanks = stdout
        .lines()
        .filter(|l| l.starts_with("Thank you for delivering order "))
        .count();
    assert_eq!(thanks, 10, "{stdout}");
    driver.kill().await.unwrap();
}

/// Issue #16 (and #13): the backplane speaks TLS to NATS: `tls://` URLs, and `nats://`
/// servers that require it, trusting `--cluster-ca`; a certificate it cannot trust is
/// a clear error at start.
#[tokio::test]
async fn the_backplane_speaks_tls_to_nats() {
    if !require("nats-server") {
        return;
    }
    let pki = crate::tls::Pki::new("nats");
    let (cert, key) = pki.issue("nats", None, false);
    let port = free_port();
    let mut server = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "--tls"])
        .arg("--tlscert")
        .arg(&cert)
        .arg("--tlskey")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut log = BufReader::new(server.stderr.take().unwrap()).lines();
    while !within(log.next_line())
        .await
        .unwrap()
        .expect("nats-server exited")
        .contains("Server is ready")
    {}
    tokio::spawn(async move { while let Ok(Some(_)) = log.next_line().await {} });
    let ca = pki.ca();
    let ca = ca.to_str().unwrap();
    let a = hub(
        &format!("tls://127.0.0.1:{port}"),
        "a",
        &["--cluster-ca", ca],
    )
    .await;
    // nats:// to a server that requires TLS: TLS all the same.
    let b = hub(
        &format!("nats://127.0.0.1:{port}"),
        "b",
        &["--cluster-ca", ca],
    )
    .await;
    let mut listener = Peer::connect(a.port).await;
    let mut sender = Peer::connect(b.port).await;
    sender.subscribe(&["nothing"]).await;
    send_ticks_until_heard(&mut sender, &mut listener).await;
    // Without the CA, the server's certificate is not trusted: said, exit 1.
    let output = output_within(
        HubProcess::command(&["serve", "--port", "0"])
            .args(["--cluster", &format!("tls://127.0.0.1:{port}")])
            .stdin(Stdio::null()),
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot reach NATS") && stderr.contains("TLS"),
        "{stderr}"
    );
    drop(server);
}

/// The flags of a node whose `orders` stream lives in JetStream, on all three servers.
/// (The test servers keep 256 MiB each: the stream asks for 16 MiB.)
const JETSTREAM: [&str; 8] = [
    "--stream",
    "orders=pickup",
    "--replicas",
    "3",
    "--max-stream-bytes",
    "16MiB",
    "--stream-limits",
    "orders:max_age=1d",
];

/// Sends `pickup` events with ids `{prefix}-{i}` from `peer` and returns each id's
/// `$stored` seq (events whose store failed are sent again, with the same id, until
/// stored: a resend is safe).
async fn publish_confirmed(peer: &mut Peer, prefix: &str, count: usize) -> BTreeMap<String, u64> {
    let mut stored = BTreeMap::new();
    let mut waiting: BTreeSet<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
    let send = async |peer: &mut Peer, id: &str| {
        peer.send(json!({"event": "pickup", "payload": {"order": id}, "id": id}))
            .await;
    };
    for id in &waiting {
        send(peer, id).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !waiting.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stored: {waiting:?}"
        );
        let frame = peer.next().await;
        let id = frame["payload"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match frame["event"].as_str() {
            Some("$stored") => {
                assert_eq!(frame["payload"]["stream"], "orders", "{frame}");
                let seq = frame["payload"]["seq"].as_u64().unwrap();
                if waiting.remove(&id) {
                    stored.insert(id, seq);
                }
            }
            Some("$error") if waiting.contains(&id) => {
                assert_eq!(frame["payload"]["code"], "storage", "{frame}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                send(peer, &id).await;
            }
            _ => {}
        }
    }
    stored
}

/// Reads deliveries of consumer `drivers` from `members` (acking each) until every id
/// of `ids` was delivered; returns, per member, the ids it got (each first delivery).
async fn drain_work_queue(members: &mut [Peer], ids: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut got: Vec<Vec<String>> = members.iter().map(|_| Vec::new()).collect();
    let mut seen = BTreeSet::new();
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while !ids.is_subset(&seen) {
            let mut idle = true;
            for (i, member) in members.iter_mut().enumerate() {
                while let Ok(frame) = member.events.try_recv() {
                    if frame["consumer"] != "drivers" {
                        continue;
                    }
                    idle = false;
                    let seq = frame["seq"].as_u64().unwrap();
                    let ack =
                        json!({"event": "$ack", "payload": {"consumer": "drivers", "seq": seq}});
                    member.send(ack).await;
                    let id = frame["id"].as_str().unwrap().to_string();
                    if seen.insert(id.clone()) {
                        got[i].push(id);
                    }
                }
            }
            if idle {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "not delivered: {:?} (delivered: {got:?})",
        ids.difference(&seen).collect::<Vec<_>>()
    );
    got
}

/// Issue #16: on a cluster, `--stream` lives in JetStream, shared by every node:
/// `$stored` carries JetStream's seq, a resend through another node is a duplicate,
/// one consumer's members on two nodes share its events (each delivered once), and a
/// `$consume` that contradicts the consumer's settings is refused on any node.
#[tokio::test]
async fn streams_live_in_jetstream_and_a_work_queue_spans_nodes() {
    let Some(nats) = NatsCluster::start().await else {
        return;
    };
    let a = hub(&nats.url(0), "a", &JETSTREAM).await;
    let b = hub(&nats.url(1), "b", &JETSTREAM).await;
    let c = hub(&nats.url(2), "c", &JETSTREAM).await;
    let mut members = Vec::new();
    for port in [b.port, c.port] {
        let mut member = Peer::connect(port).await;
        let consume = json!({"stream": "orders", "consumer": "drivers", "max_in_flight": 5});
        member.request("$consume", consume, "$consuming").await;
        members.push(member);
    }
    let mut other = Peer::connect(a.port).await;
    let contrary = json!({"stream": "orders", "consumer": "drivers", "max_deliver": 9});
    other
        .send(json!({"event": "$consume", "payload": contrary}))
        .await;
    let refused = other.next().await;
    assert_eq!(refused["payload"]["code"], "consumer_mismatch", "{refused}");

    // The stream and its dead letters keep what the hubs were told: the hub-wide
    // --max-stream-bytes, and the stream's own max_age (--stream-limits).
    for name in ["orders", "orders~dead"] {
        let config = &nats.stream_detail(0, name).await["config"];
        assert_eq!(config["max_bytes"], 16 << 20, "{name}: {config}");
        assert_eq!(config["max_age"], 86_400_000_000_000u64, "{name}: {config}");
    }

    let mut vendor = Peer::connect(a.port).await;
    vendor.subscribe(&["nothing"]).await;
    let stored = publish_confirmed(&mut vendor, "order", 60).await;
    let seqs: BTreeSet<u64> = stored.values().copied().collect();
    assert_eq!(seqs.len(), 60, "one seq per event: {stored:?}");

    // The same id through another node: stored once, answered as a resend.
    let mut again = Peer::connect(b.port).await;
    again.subscribe(&["nothing"]).await;
    again
        .send(json!({"event": "pickup", "payload": {}, "id": "order-7"}))
        .await;
    let answer = again.next().await;
    assert_eq!(answer["event"], "$stored", "{answer}");
    assert_eq!(answer["payload"]["duplicate"], true, "{answer}");
    assert_eq!(answer["payload"]["seq"], stored["order-7"], "{answer}");

    let ids: BTreeSet<String> = stored.keys().cloned().collect();
    let got = drain_work_queue(&mut members, &ids).await;
    assert!(
        got.iter().all(|g| !g.is_empty()),
        "both nodes' members took work: {got:?}"
    );
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 60);

    // `hubcast streams --cluster` shows what JetStream holds for the hubs, once the
    // acks have landed: every event acknowledged.
    let urls = format!("{},{}", nats.url(0), nats.url(1));
    let listed = within(async {
        loop {
            let output = HubProcess::command(&["streams", "--cluster", &urls, "--json"])
                .output()
                .await
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(output.status.success(), "{stdout}{:?}", output.stderr);
            let lines: Vec<Value> = stdout
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let floor = lines
                .iter()
                .find(|l| l["consumer"] == "drivers")
                .map(|l| l["ack_floor"].clone());
            if floor == Some(json!(60)) {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let orders = listed
        .iter()
        .find(|l| l["stream"] == "orders" && l.get("consumer").is_none());
    let orders = orders.unwrap_or_else(|| panic!("no stream orders: {listed:?}"));
    assert_eq!(orders["last_seq"], 60, "{orders}");
    assert_eq!(orders["events"], 60, "{orders}");
    assert_eq!(orders["replicas"], 3, "{orders}");
    assert!(
        orders["leader"]
            .as_str()
            .is_some_and(|l| l.starts_with('n')),
        "{orders}"
    );
    assert!(
        listed
            .iter()
            .any(|l| l["stream"] == "orders.dead" && l["jetstream"] == "orders~dead"),
        "{listed:?}"
    );
    let drivers = listed.iter().find(|l| l["consumer"] == "drivers").unwrap();
    assert_eq!(drivers["stream"], "orders", "{drivers}");
    assert_eq!(drivers["waiting"], 0, "{drivers}");
    // The table, as people read it.
    let table = HubProcess::command(&["streams", "--cluster", &urls])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("replicas") && table.contains("drivers"),
        "{table}"
    );
}

/// Issue #16: a NATS server killed with -9 while events are published: the hub
/// connected to it moves to another, publishers resend what got `$error storage`
/// (same id, so never stored twice), and every event confirmed with `$stored` is
/// delivered to the durable consumer. Acks lost in the failover bring redeliveries
/// that the member acks again: those answers must not close it (`--max-errors`).
#[tokio::test]
async fn kill_9_of_a_nats_server_loses_nothing_confirmed() {
    let Some(mut nats) = NatsCluster::start().await else {
        return;
    };
    let a = hub(&nats.url(0), "a", &JETSTREAM).await;
    let b = hub(&nats.url(1), "b", &JETSTREAM).await;
    let mut member = Peer::connect(b.port).await;
    let consume = json!({"stream": "orders", "consumer": "drivers", "ack_wait": "3s"});
    member.request("$consume", consume, "$consuming").await;
    let mut vendor = Peer::connect(a.port).await;
    vendor.subscribe(&["nothing"]).await;
    let mut stored = publish_confirmed(&mut vendor, "before", 30).await;
    // Node a's server dies; what is published meanwhile is stored (or resent until).
    nats.kill9(0).await;
    stored.extend(publish_confirmed(&mut vendor, "after", 30).await);
    let ids: BTreeSet<String> = stored.keys().cloned().collect();
    let mut members = [member];
    let got = drain_work_queue(&mut members, &ids).await;
    assert_eq!(got[0].len(), 60, "{got:?}");
    drop(a);
}

/// Issue #16: a hub killed with -9 while its member holds deliveries: JetStream gives
/// them, after `ack_wait`, to the member on another node.
#[tokio::test]
async fn a_dead_hubs_deliveries_go_to_members_on_other_nodes() {
    let Some(nats) = NatsCluster::start().await else {
        return;
    };
    let a = hub(&nats.url(0), "a", &JETSTREAM).await;
    let b = hub(&nats.url(1), "b", &JETSTREAM).await;
    let c = hub(&nats.url(2), "c", &JETSTREAM).await;
    let consume = json!({"stream": "orders", "consumer": "drivers", "ack_wait": "2s"});
    let mut doomed = Peer::connect(b.port).await;
    doomed
        .request("$consume", consume.clone(), "$consuming")
        .await;
    let mut vendor = Peer::connect(a.port).await;
    vendor.subscribe(&["nothing"]).await;
    let stored = publish_confirmed(&mut vendor, "order", 10).await;
    // The member on b takes deliveries and never acks; then b dies.
    let first = doomed.next().await;
    assert_eq!(first["consumer"], "drivers", "{first}");
    b.kill9().await;
    let mut survivor = Peer::connect(c.port).await;
    survivor.request("$consume", consume, "$consuming").await;
    let ids: BTreeSet<String> = stored.keys().cloned().collect();
    let mut members = [survivor];
    let got = drain_work_queue(&mut members, &ids).await;
    assert!(got[0].contains(&first["id"].as_str().unwrap().to_string()));
}

/// Issue #16: the durable delivery demo across three nodes. The vendor is on node a,
/// one driver on node b (ready to move to c) and one on node c; mid-way hub b and the
/// NATS server leading the stream are killed with -9. Every order is still thanked for,
/// exactly once: the vendor resends what could not be stored meanwhile (same id), the
/// moved driver resumes on c, and what was out to it on b comes back from JetStream.
#[tokio::test]
async fn the_durable_demo_survives_a_hub_and_a_nats_server_killed() {
    let Some(mut nats) = NatsCluster::start().await else {
        return;
    };
    let stream = [
        "--stream",
        "orders=pickup,in-transit,delivered",
        "--replicas",
        "3",
        "--max-stream-bytes",
        "16MiB",
    ];
    let a = hub(&nats.url(0), "a", &stream).await;
    let mut b = Some(hub(&nats.url(1), "b", &stream).await);
    let b_port = b.as_ref().unwrap().port;
    let mut c = hub(&nats.url(2), "c", &stream).await;
    let driver = |hubs: String| {
        let mut child = HubProcess::command(&["driver", "--hub", &hubs, "--durable"])
            .args(["--capacity", "4", "--pickup-delay", "10ms"])
            .args(["--deliver-delay", "30ms"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = stdout_lines(&mut child);
        (child, lines)
    };
    let moving = driver(format!("127.0.0.1:{b_port},127.0.0.1:{}", c.port));
    let staying = driver(format!("127.0.0.1:{}", c.port));
    c.wait_log("connection client=", 1).await;
    let mut vendor = HubProcess::command(&["vendor", "--hub", &format!("127.0.0.1:{}", a.port)])
        .args(["--store", "acme", "--count", "20", "--interval", "100ms"])
        .args(["--durable", "--timeout", "90s"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut said = stdout_lines(&mut vendor);
    let mut thanks = Vec::new();
    let mut killed = None;
    let finished = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = said.recv().await {
            if let Some(order) = line.strip_prefix("Thank you for delivering order ") {
                thanks.push(order.to_string());
            }
            if let Some(b) = b.take_if(|_| thanks.len() == 4) {
                b.kill9().await;
                // The NATS server leading the stream: JetStream must elect another
                // while orders are being stored.
                let leader = nats.stream_leader(2, "orders").await;
                nats.kill9(leader).await;
                killed = Some(thanks.len());
            }
        }
    })
    .await;
    let output = within(vendor.wait_with_output()).await.unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        finished.is_ok() && output.status.success(),
        "the vendor failed ({:?}); its log:\n{log}",
        output.status
    );
    assert!(
        killed.is_some(),
        "the vendor never got 4 thanks: {thanks:?}"
    );
    assert!(
        thanks.len() > 4,
        "nothing thanked after the kills: {thanks:?}"
    );
    let distinct: BTreeSet<&String> = thanks.iter().collect();
    assert_eq!(thanks.len(), 20, "{thanks:?}");
    assert_eq!(distinct.len(), 20, "thanked twice: {thanks:?}");
    // The driver that was on b moved to c (the second connection there).
    c.wait_log("connection client=", 2).await;
    // Every order thanked for was picked up (once, or again after hub b died).
    let mut picked = BTreeSet::new();
    for (mut child, mut lines) in [moving, staying] {
        child.start_kill().unwrap();
        within(child.wait()).await.unwrap();
        while let Some(line) = lines.recv().await {
            if let Some(order) = line.strip_prefix("DRIVER: picked up ") {
                picked.insert(order.to_string());
            }
        }
    }
    for order in &distinct {
        assert!(picked.contains(*order), "{order} thanked, never picked up");
    }
    drop(a);
}
