//! Issue #14: the WebSocket gateway and the HTTP endpoints, driven by a real WebSocket
//! client (tokio-tungstenite) and raw HTTP, against a hub serving `--http`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hubcast::{CloseReason, Config, ErrorCode, HubEvent};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{within, TestHub};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to the hub's `/ws`, offering `hubcast.v1`.
async fn open(hub: &TestHub) -> Ws {
    let url = format!("ws://{}/ws", hub.http.unwrap());
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "hubcast.v1".parse().unwrap());
    let (ws, response) = within(tokio_tungstenite::connect_async(request))
        .await
        .unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "hubcast.v1",
        "the subprotocol is echoed"
    );
    ws
}

/// Opens a WebSocket and waits until the hub has it in its pool.
async fn join(hub: &TestHub, ws_clients: usize) -> Ws {
    let ws = open(hub).await;
    let mut clients = hub.hub.watch_clients();
    within(clients.wait_for(|&n| n >= ws_clients))
        .await
        .unwrap();
    ws
}

async fn send(ws: &mut Ws, value: Value) {
    within(ws.send(Message::text(value.to_string())))
        .await
        .unwrap();
}

/// The next text message, as JSON (pings are answered by the client library).
async fn next(ws: &mut Ws) -> Value {
    loop {
        match within(ws.next()).await {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Reads until the hub closes; returns its close code.
async fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match within(ws.next()).await {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("expected a close frame, got {e}"),
            None => return None,
        }
    }
}

#[tokio::test]
async fn websocket_and_tcp_clients_are_peers_in_one_pool() {
    let hub = TestHub::start_http(Config::default()).await;
    let mut ws = join(&hub, 1).await;
    let mut tcp = hub.connect().await;

    // Browser to TCP.
    send(&mut ws, json!({"event": "pickup", "payload": {"order": 1}})).await;
    assert_eq!(
        tcp.json().await,
        json!({"event": "pickup", "payload": {"order": 1}})
    );
    // Echoed to the sender too, as on TCP.
    assert_eq!(next(&mut ws).await["event"], "pickup");

    // TCP (lecture style: no newline) to the browser, one event per message.
    tcp.send(r#"{"event":"in-transit","payload":{"order":1}}{"event":"delivered","payload":{"order":1}}"#)
        .await;
    assert_eq!(next(&mut ws).await["event"], "in-transit");
    assert_eq!(next(&mut ws).await["event"], "delivered");
    assert_eq!(hub.hub.stats().events, 3);
}

#[tokio::test]
async fn every_control_event_is_answered_over_websocket() {
    let hub = TestHub::start_http(Config::default()).await;
    let mut ws = join(&hub, 1).await;
    let mut tcp = hub.connect().await;

    send(
        &mut ws,
        json!({"event": "$hello", "payload": {"echo": false}}),
    )
    .await;
    let welcome = next(&mut ws).await;
    assert_eq!(welcome["event"], "$welcome", "{welcome}");

    send(
        &mut ws,
        json!({"event": "$subscribe", "payload": {"events": ["order.*"]}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["event"], "$subscribed");
    send(
        &mut ws,
        json!({"event": "$join", "payload": {"room": "acme"}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["event"], "$joined");
    send(&mut ws, json!({"event": "$ping", "payload": 7})).await;
    let pong = next(&mut ws).await;
    assert_eq!(pong, json!({"event": "$pong", "payload": 7}));

    // The subscription filters: only order.* arrives.
    tcp.send("{\"event\":\"chat\",\"payload\":1}\n{\"event\":\"order.new\",\"payload\":2}\n")
        .await;
    assert_eq!(next(&mut ws).await["event"], "order.new");
    // A room event reaches the room's member.
    tcp.send("{\"event\":\"$join\",\"payload\":{\"room\":\"acme\"}}\n")
        .await;
    tcp.json().await;
    tcp.send("{\"event\":\"order.room\",\"payload\":3,\"room\":\"acme\"}\n")
        .await;
    assert_eq!(next(&mut ws).await["event"], "order.room");

    send(&mut ws, json!({"event": "$stats", "payload": null})).await;
    let stats = next(&mut ws).await;
    assert_eq!(stats["event"], "$stats");
    assert_eq!(stats["payload"]["connections"]["ws"], 1, "{stats}");
    assert_eq!(stats["payload"]["connections"]["tcp"], 1, "{stats}");
    assert!(stats["payload"]["events"].as_u64().unwrap() >= 3, "{stats}");

    send(
        &mut ws,
        json!({"event": "$unsubscribe", "payload": {"events": ["order.*"]}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["event"], "$unsubscribed");
    send(
        &mut ws,
        json!({"event": "$leave", "payload": {"room": "acme"}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["event"], "$left");
}

#[tokio::test]
async fn bad_events_get_errors_and_the_connection_stays() {
    let hub = TestHub::start_http(Config::default()).await;
    let mut ws = join(&hub, 1).await;
    within(ws.send(Message::text("not json"))).await.unwrap();
    let error = next(&mut ws).await;
    assert_eq!(error["event"], "$error");
    assert_eq!(error["payload"]["code"], "invalid_json", "{error}");
    send(&mut ws, json!({"event": 1})).await;
    assert_eq!(next(&mut ws).await["payload"]["code"], "not_an_event");
    send(&mut ws, json!({"event": "$nope", "payload": 1})).await;
    assert_eq!(next(&mut ws).await["payload"]["code"], "reserved_event");
    // Still served: a valid event is echoed.
    send(&mut ws, json!({"event": "ok", "payload": 1})).await;
    assert_eq!(next(&mut ws).await["event"], "ok");
}

#[tokio::test]
async fn a_message_over_max_frame_closes_with_1009() {
    let hub = TestHub::start_http(Config::builder().max_frame(1024).build().unwrap()).await;
    let mut ws = join(&hub, 1).await;
    let big = json!({"event": "big", "payload": "x".repeat(2000)});
    within(ws.send(Message::text(big.to_string())))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Size));
    let mut clients = hub.hub.watch_clients();
    within(clients.wait_for(|&n| n == 0)).await.unwrap();
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_binary_with_1003() {
    let hub = TestHub::start_http(Config::default()).await;
    let mut ws = join(&hub, 1).await;
    let frame = Frame::message(
        b"{\"event\":\"a\",\"payload\":\"\xff\"}".to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    within(ws.send(Message::Frame(frame))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Invalid));

    let mut ws = join(&hub, 1).await;
    within(ws.send(Message::binary(b"{}".to_vec())))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Unsupported));
}

#[tokio::test]
async fn a_client_close_is_answered_and_leaves_the_pool() {
    let hub = TestHub::start_http(Config::default()).await;
    let mut ws = join(&hub, 1).await;
    within(ws.close(None)).await.unwrap();
    // The hub echoes the close, then the stream ends.
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Normal));
    let closed = hub.wait_for(|e| matches!(e, HubEvent::Close { .. })).await;
    let HubEvent::Close { reason, .. } = closed else {
        unreachable!()
    };
    assert!(matches!(reason, CloseReason::PeerClosed), "{reason:?}");
}

#[tokio::test]
async fn the_hub_pings_and_closes_a_peer_that_stopped_answering() {
    let config = Config::builder()
        .ws_ping(Some(Duration::from_millis(100)))
        .build()
        .unwrap();
    let hub = TestHub::start_http(config).await;
    // This one reads all the time, so its library answers pings: it stays.
    let mut alive = join(&hub, 1).await;
    let (heard, mut hear) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = alive.next().await {
            if let Message::Text(text) = message {
                let _ = heard.send(serde_json::from_str::<Value>(&text).unwrap());
            }
        }
    });
    // A raw socket that did the handshake and then went silent.
    let http = hub.http.unwrap();
    let mut dead = raw_handshake(http).await;
    let mut clients = hub.hub.watch_clients();
    within(clients.wait_for(|&n| n == 2)).await.unwrap();
    // It gets ping frames (opcode 0x9) ...
    let mut head = [0u8; 2];
    within(dead.read_exact(&mut head)).await.unwrap();
    assert_eq!(head, [0x89, 0x00], "an empty ping frame");
    // ... and, unanswered, is closed heartbeat_timeout.
    let closed = hub
        .wait_for(|e| {
            matches!(
                e,
                HubEvent::Close {
                    reason: CloseReason::Protocol(ErrorCode::HeartbeatTimeout),
                    ..
                }
            )
        })
        .await;
    assert!(matches!(closed, HubEvent::Close { .. }));
    // The live one answered every ping (its library does) and is still served.
    let mut tcp = hub.connect().await;
    tcp.send("{\"event\":\"still\",\"payload\":1}\n").await;
    assert_eq!(within(hear.recv()).await.unwrap()["event"], "still");
}

#[tokio::test]
async fn a_websocket_client_that_does_not_read_is_a_slow_consumer() {
    let config = Config::builder()
        .max_frame(16 * 1024)
        .max_pending(1024 * 1024)
        .echo(false)
        .build()
        .unwrap();
    let hub = TestHub::start_http(config).await;
    let _stalled = raw_handshake(hub.http.unwrap()).await;
    let mut clients = hub.hub.watch_clients();
    within(clients.wait_for(|&n| n == 1)).await.unwrap();
    // A WebSocket client that reads all the time.
    let fast = join(&hub, 2).await;
    let (heard, mut hear) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut fast = fast;
        while let Some(Ok(message)) = fast.next().await {
            if let Message::Text(text) = message {
                let event: Value = serde_json::from_str(&text).unwrap();
                let _ = heard.send(event["event"].as_str().unwrap().to_string());
            }
        }
    });
    let mut tcp = hub.connect().await;
    let line = format!(
        "{{\"event\":\"fill\",\"payload\":\"{}\"}}\n",
        "x".repeat(1000)
    );
    // Until the stalled client's socket buffers and its queue are full; the reading
    // client gets every burst whole meanwhile.
    for _ in 0..100 {
        tcp.send(line.repeat(500)).await;
        for _ in 0..500 {
            assert_eq!(within(hear.recv()).await.unwrap(), "fill");
        }
        if hub.hub.stats().slow_consumers > 0 {
            break;
        }
    }
    let dropped = hub
        .wait_for(|e| matches!(e, HubEvent::SlowConsumer { .. }))
        .await;
    assert!(matches!(dropped, HubEvent::SlowConsumer { .. }));
    tcp.send("{\"event\":\"end\",\"payload\":null}\n").await;
    assert_eq!(within(hear.recv()).await.unwrap(), "end");
    assert_eq!(hub.hub.stats().slow_consumers, 1);
}

#[tokio::test]
async fn authentication_over_websocket_is_the_first_message() {
    let (auth, token) =
        one_user_auth("publish = { allow = [\">\"] }\nsubscribe = { allow = [\">\"] }");
    let hub = TestHub::start_http(Config::default()).await;
    hub.hub.set_authenticator(auth);
    // Something else first: auth_required, then the close.
    let mut ws = open(&hub).await;
    send(&mut ws, json!({"event": "pickup", "payload": 1})).await;
    assert_eq!(next(&mut ws).await["payload"]["code"], "auth_required");
    close_code(&mut ws).await;
    // With $hello: welcomed, then served.
    let mut ws = open(&hub).await;
    send(
        &mut ws,
        json!({"event": "$hello", "payload": {"user": "alice", "token": token}}),
    )
    .await;
    let welcome = next(&mut ws).await;
    assert_eq!(welcome["event"], "$welcome", "{welcome}");
    assert_eq!(welcome["payload"]["user"], "alice");
    send(&mut ws, json!({"event": "$stats", "payload": null})).await;
    assert_eq!(
        next(&mut ws).await["payload"]["code"],
        "permission_denied",
        "the stats need admin"
    );
}

/// An authenticator with one user, `alice`, with `permissions` (TOML lines); and her
/// token.
fn one_user_auth(permissions: &str) -> (hubcast::auth::Authenticator, String) {
    let token = hubcast::auth::random_token();
    let text = format!(
        "[[users]]\nname = \"alice\"\ntoken_hash = \"{}\"\n{permissions}\n",
        hubcast::auth::TokenHash::new(token.as_bytes())
    );
    let file: hubcast::auth::AuthFile = toml::from_str(&text).unwrap();
    (
        hubcast::auth::Authenticator::from_spec(&file, None).unwrap(),
        token,
    )
}

/// The handshake by hand; the socket is then left alone (it answers no ping).
async fn raw_handshake(http: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(http).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        within(stream.read_exact(&mut byte)).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // RFC 6455's own example key and answer.
    assert!(
        head.contains("sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{head}"
    );
    stream
}

/// GET `path` over HTTP/1.1; returns the status, headers and body.
pub async fn http_get(http: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(http).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n{headers}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within(stream.read_to_end(&mut response)).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[tokio::test]
async fn health_readiness_dashboard_and_not_found() {
    let hub = TestHub::start_http(Config::default()).await;
    let http = hub.http.unwrap();
    let (status, _, body) = http_get(http, "/healthz", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let (status, _, body) = http_get(http, "/readyz", "").await;
    assert_eq!(status, 200);
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["store"], "none");
    let (status, head, body) = http_get(http, "/", "").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(body.contains("<canvas"), "the dashboard page");
    let (status, _, body) = http_get(http, "/nope", "").await;
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
    // /ws without an upgrade says what it is.
    let (status, _, _) = http_get(http, "/ws", "").await;
    assert_eq!(status, 426);
}

/// Parses `/metrics` with a Prometheus text parser.
pub async fn scrape(http: SocketAddr, headers: &str) -> prometheus_parse::Scrape {
    let (status, head, body) = http_get(http, "/metrics", headers).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let lines = body.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).unwrap()
}

pub fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_count_what_the_test_sent() {
    let hub = TestHub::start_http(Config::default()).await;
    let http = hub.http.unwrap();
    let mut ws = join(&hub, 1).await;
    let mut c = hub.connect().await;
    c.send("garbage\n").await;
    c.expect_error("invalid_json").await;
    let mut a = hub.connect().await;
    let mut b = hub.connect().await;
    for i in 0..5 {
        a.send(format!("{{\"event\":\"pickup\",\"payload\":{i}}}\n"))
            .await;
    }
    for _ in 0..3 {
        send(&mut ws, json!({"event": "delivered", "payload": 1})).await;
    }
    b.send("{\"event\":\"$subscribe\",\"payload\":{\"events\":[\"pickup\",\"x.*\"]}}\n")
        .await;
    b.json().await;
    // Everything sent has been received once the last event reached the WS client.
    let mut seen = 0;
    while seen < 8 {
        next(&mut ws).await;
        seen += 1;
    }
    let s = scrape(http, "").await;
    assert_eq!(
        value(&s, "hubcast_connections", &[("transport", "tcp")]),
        3.0
    );
    assert_eq!(
        value(&s, "hubcast_connections", &[("transport", "ws")]),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "hubcast_connections_accepted_total",
            &[("transport", "ws")]
        ),
        1.0
    );
    assert_eq!(value(&s, "hubcast_events_received_total", &[]), 8.0);
    assert_eq!(
        value(&s, "hubcast_events_by_name_total", &[("event", "pickup")]),
        5.0
    );
    assert_eq!(
        value(
            &s,
            "hubcast_events_by_name_total",
            &[("event", "delivered")]
        ),
        3.0
    );
    assert_eq!(
        value(&s, "hubcast_errors_total", &[("code", "invalid_json")]),
        1.0
    );
    assert_eq!(value(&s, "hubcast_subscriptions", &[]), 2.0);
    // 8 events to 3 clients (echo on).
    assert!(value(&s, "hubcast_deliveries_total", &[]) >= 8.0 * 2.0);
    assert!(value(&s, "hubcast_received_bytes_total", &[]) > 0.0);
    assert!(value(&s, "hubcast_sent_bytes_total", &[]) > 0.0);
    let fanouts = s
        .samples
        .iter()
        .find(|x| x.metric == "hubcast_fanout_seconds")
        .expect("the fan-out histogram");
    let prometheus_parse::Value::Histogram(buckets) = &fanouts.value else {
        panic!("{:?}", fanouts.value)
    };
    assert!(buckets.last().unwrap().count >= 1.0, "{buckets:?}");
}

#[tokio::test]
async fn metrics_need_an_admin_token_when_authentication_is_on() {
    let (auth, token) = one_user_auth("admin = true");
    let hub = TestHub::start_http(Config::default()).await;
    hub.hub.set_authenticator(auth);
    let http = hub.http.unwrap();
    let (status, head, _) = http_get(http, "/metrics", "").await;
    assert_eq!(status, 401);
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    let (status, _, _) = http_get(http, "/metrics", "Authorization: Bearer wrong\r\n").await;
    assert_eq!(status, 401);
    let s = scrape(http, &format!("Authorization: Bearer {token}\r\n")).await;
    assert_eq!(
        value(&s, "hubcast_connections", &[("transport", "ws")]),
        0.0
    );
}

#[tokio::test]
async fn metrics_show_streams_and_consumers() {
    let dir = tempdir();
    let config = Config::builder()
        .streams(vec![hubcast::StreamSpec::new("orders", &["pickup"])])
        .data_dir(dir.clone())
        .fsync(hubcast::store::Fsync::Never)
        .build()
        .unwrap();
    let hub = TestHub::start_http(config).await;
    let mut tcp = hub.connect().await;
    tcp.send("{\"event\":\"$consume\",\"payload\":{\"stream\":\"orders\",\"consumer\":\"drivers\",\"start\":\"all\"}}\n")
        .await;
    assert_eq!(tcp.json().await["event"], "$consuming");
    for i in 0..3 {
        tcp.send(format!(
            "{{\"event\":\"pickup\",\"payload\":{i},\"id\":\"o{i}\"}}\n"
        ))
        .await;
    }
    // Three $stored, three deliveries, three echoes, in some order.
    let mut stored = 0;
    while stored < 3 {
        if tcp.json().await["event"] == "$stored" {
            stored += 1;
        }
    }
    let s = scrape(hub.http.unwrap(), "").await;
    assert_eq!(
        value(&s, "hubcast_stream_last_seq", &[("stream", "orders")]),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "hubcast_consumer_pending",
            &[("stream", "orders"), ("consumer", "drivers")]
        ),
        3.0
    );
    assert!(s
        .samples
        .iter()
        .any(|x| x.metric == "hubcast_store_commit_seconds"));
    let _ = std::fs::remove_dir_all(dir);
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hubcast-ws-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// 10,000 WebSocket clients in the pool at once, each one served. The hub runs as
/// its own process (`hubcast serve --http`), as a user runs it: one process holding
/// both ends of 10,000 connections would pass this machine's descriptor limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_websocket_connections() {
    use tokio::io::AsyncBufReadExt;
    const N: usize = 10_000;
    rlimit::increase_nofile_limit(N as u64 + 1000).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubcast"))
        .args(["serve", "--port", "0", "--http", "127.0.0.1:0", "--quiet"])
        .args(["--max-conns", "10010"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within(lines.next_line()).await.unwrap().unwrap();
    let tcp_addr: SocketAddr = first
        .strip_prefix("Server up on ")
        .expect(&first)
        .parse()
        .unwrap();
    let second = within(lines.next_line()).await.unwrap().unwrap();
    let http: SocketAddr = second
        .strip_prefix("HTTP up on http://")
        .and_then(|rest| rest.split_whitespace().next())
        .expect(&second)
        .parse()
        .unwrap();
    let mut sockets = Vec::with_capacity(N);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in 0..N / 500 {
        for _ in 0..500 {
            tasks.spawn(async move {
                let url = format!("ws://{http}/ws");
                tokio_tungstenite::connect_async(url)
                    .await
                    .map(|(ws, _)| ws)
            });
        }
        while let Some(ws) = within(tasks.join_next()).await {
            sockets.push(ws.unwrap().unwrap_or_else(|e| panic!("chunk {chunk}: {e}")));
        }
    }
    // Every one is in the pool: the hub says so (a handshake is answered just before
    // its connection joins the pool, so the count is asked for until it is there).
    let mut probe = open_at(http).await;
    within(async {
        loop {
            send(&mut probe, json!({"event": "$stats", "payload": null})).await;
            let stats = next(&mut probe).await;
            if stats["payload"]["connections"]["ws"] == N + 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // One event from a TCP client reaches all of them.
    let mut tcp = TcpStream::connect(tcp_addr).await.unwrap();
    tcp.write_all(b"{\"event\":\"all\",\"payload\":1}\n")
        .await
        .unwrap();
    for ws in sockets.iter_mut() {
        assert_eq!(next(ws).await["event"], "all");
    }
    child.start_kill().unwrap();
}

async fn open_at(http: SocketAddr) -> Ws {
    let url = format!("ws://{http}/ws");
    within(tokio_tungstenite::connect_async(url))
        .await
        .unwrap()
        .0
}

/// Durable consumers over WebSocket: `$consume`, deliveries with their four fields,
/// `$ack` with a confirm, `$nack` (delivered again, attempt 2), `$unconsume`.
#[tokio::test]
async fn durable_consumers_work_over_websocket() {
    let dir = tempdir();
    let config = Config::builder()
        .streams(vec![hubcast::StreamSpec::new("orders", &["pickup"])])
        .data_dir(dir.clone())
        .fsync(hubcast::store::Fsync::Never)
        .build()
        .unwrap();
    let hub = TestHub::start_http(config).await;
    let mut ws = join(&hub, 1).await;
    send(
        &mut ws,
        json!({"event": "$hello", "payload": {"echo": false}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["event"], "$welcome");
    send(
        &mut ws,
        json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "web", "start": "all"}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["event"], "$consuming");
    // A publisher over WebSocket too: confirmed once stored.
    send(
        &mut ws,
        json!({"event": "pickup", "payload": {"order": 1}, "id": "o1"}),
    )
    .await;
    let mut stored = None;
    let mut delivery = None;
    while stored.is_none() || delivery.is_none() {
        let frame = next(&mut ws).await;
        match frame["event"].as_str() {
            Some("$stored") => stored = Some(frame),
            Some("pickup") => delivery = Some(frame),
            other => panic!("unexpected {other:?}: {frame}"),
        }
    }
    assert_eq!(stored.unwrap()["payload"]["seq"], 1);
    let delivery = delivery.unwrap();
    assert_eq!(delivery["stream"], "orders");
    assert_eq!(delivery["consumer"], "web");
    assert_eq!(delivery["seq"], 1);
    assert_eq!(delivery["attempt"], 1);
    // Given back: delivered again, second attempt.
    send(
        &mut ws,
        json!({"event": "$nack", "payload": {"consumer": "web", "seq": 1}}),
    )
    .await;
    let again = next(&mut ws).await;
    assert_eq!(again["event"], "pickup", "{again}");
    assert_eq!(again["attempt"], 2);
    send(
        &mut ws,
        json!({"event": "$ack", "payload": {"consumer": "web", "seq": 1, "confirm": true}}),
    )
    .await;
    let acked = next(&mut ws).await;
    assert_eq!(acked["event"], "$acked", "{acked}");
    send(
        &mut ws,
        json!({"event": "$unconsume", "payload": {"consumer": "web"}}),
    )
    .await;
    assert_eq!(next(&mut ws).await["event"], "$unconsumed");
    let _ = std::fs::remove_dir_all(dir);
}
