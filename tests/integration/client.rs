//! The client library against real hubs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubcast::client::{Client, ClientError, ClientEvent, Events, Reconnect};
use hubcast::{Config, ErrorCode, HubEvent};
use serde_json::json;
use tokio::sync::mpsc;

use crate::support::{within, TestHub};

/// The next event named `name` on `events`, skipping lifecycle and other events.
async fn next_named(events: &mut Events, name: &str) -> hubcast::Event {
    loop {
        match within(events.next()).await {
            Some(ClientEvent::Event(e)) if e.name().as_str() == name => return e,
            Some(_) => continue,
            None => panic!("the client closed while waiting for {name}"),
        }
    }
}

#[tokio::test]
async fn emit_reaches_every_client_with_the_payload_intact() {
    let hub = TestHub::start(Config::default()).await;
    let sender = Client::connect(hub.addr).await.unwrap();
    let receiver = Client::connect(hub.addr).await.unwrap();
    hub.wait_clients(2).await;
    let mut heard = receiver.events();
    let mut echo = sender.events();
    sender
        .emit("pickup", &json!({"store": "acme", "orderID": 7}))
        .await
        .unwrap();
    let event = next_named(&mut heard, "pickup").await;
    let payload: serde_json::Value = serde_json::from_str(event.payload()).unwrap();
    assert_eq!(payload, json!({"store": "acme", "orderID": 7}));
    assert_eq!(
        next_named(&mut echo, "pickup").await.payload(),
        event.payload()
    );
}

#[tokio::test]
async fn handlers_get_their_events_and_the_catch_all_gets_everything() {
    let hub = TestHub::start(Config::default()).await;
    let (named_tx, mut named) = mpsc::unbounded_channel();
    let (any_tx, mut any) = mpsc::unbounded_channel();
    let client = Client::connect(hub.addr).await.unwrap();
    client.on("delivered", move |e| {
        named_tx.send(e.payload().to_string()).unwrap()
    });
    client.on_any(move |e| {
        if let ClientEvent::Event(e) = e {
            any_tx.send(e.name().to_string()).unwrap();
        }
    });
    client.emit("pickup", &1).await.unwrap();
    client.emit("delivered", &2).await.unwrap();
    assert_eq!(within(any.recv()).await.unwrap(), "pickup");
    assert_eq!(within(any.recv()).await.unwrap(), "delivered");
    assert_eq!(within(named.recv()).await.unwrap(), "2");
    assert!(
        named.try_recv().is_err(),
        "the `delivered` handler heard a pickup"
    );
}

#[tokio::test]
async fn hub_errors_arrive_as_typed_errors_not_events() {
    let hub = TestHub::start(Config::default()).await;
    let client = Client::connect(hub.addr).await.unwrap();
    let mut events = client.events();
    client.emit("$shutdown", &json!({})).await.unwrap();
    loop {
        match within(events.next()).await.unwrap() {
            ClientEvent::HubError(error) => {
                assert_eq!(error.code, ErrorCode::ReservedEvent);
                break;
            }
            ClientEvent::Event(e) => panic!("a `$error` surfaced as an event: {e:?}"),
            _ => {}
        }
    }
    assert!(matches!(
        client.emit("", &1).await,
        Err(ClientError::InvalidEvent(_))
    ));
}

#[tokio::test]
async fn lifecycle_events_come_in_the_lecture_order() {
    let hub = TestHub::start(Config::default()).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let client = Client::builder()
        .on_any(move |e| {
            let name = match e {
                ClientEvent::Lookup { .. } => "lookup",
                ClientEvent::Connect { .. } => "connect",
                ClientEvent::Event(_) => "data",
                ClientEvent::End => "end",
                ClientEvent::Close { had_error: false } => "close",
                ClientEvent::Close { had_error: true } => "close(had_error)",
                _ => return,
            };
            log.lock().unwrap().push(name);
        })
        .connect(hub.addr)
        .await
        .unwrap();
    client.emit("hello", &1).await.unwrap();
    let mut events = client.events();
    next_named(&mut events, "hello").await;
    within(client.close()).await;
    assert_eq!(
        *seen.lock().unwrap(),
        ["lookup", "connect", "data", "end", "close"]
    );
    assert!(!client.is_connected());
    assert_eq!(client.emit("late", &1).await, Err(ClientError::Closed));
    // The stream hands over what it already holds, then ends.
    let mut rest = Vec::new();
    while let Some(e) = within(events.next()).await {
        rest.push(e);
    }
    assert!(
        matches!(
            rest[..],
            [ClientEvent::End, ClientEvent::Close { had_error: false }]
        ),
        "{rest:?}"
    );
}

#[tokio::test]
async fn a_refused_connection_is_a_clear_error() {
    // Nothing listens on port 1 (a port found free and let go could be taken).
    let addr: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
    let error = Client::connect(addr).await.unwrap_err();
    assert!(matches!(error, ClientError::Connect { .. }), "{error:?}");
    assert!(error.to_string().contains(&addr.to_string()), "{error}");
    // Issue #11: the I/O error is kept as the source, not flattened into a string.
    let source = std::error::Error::source(&error).expect("a source");
    let io = source
        .downcast_ref::<hubcast::IoError>()
        .expect("an IoError");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
}

/// The idle notice, with the clock paused: no real waiting.
#[tokio::test(flavor = "current_thread")]
async fn an_idle_connection_gets_a_timeout_notice_and_stays_open() {
    let hub = TestHub::start(Config::default()).await;
    let client = Client::builder()
        .idle_timeout(Duration::from_secs(5))
        .connect(hub.addr)
        .await
        .unwrap();
    let mut events = client.events();
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    match within(events.next()).await.unwrap() {
        ClientEvent::Timeout { idle } => assert_eq!(idle, Duration::from_secs(5)),
        other => panic!("expected a timeout notice, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_secs(5));
    tokio::time::resume();
    assert!(client.is_connected());
    client.emit("still-here", &true).await.unwrap();
    next_named(&mut events, "still-here").await;
}

fn quick_reconnect() -> Reconnect {
    Reconnect {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
        max_attempts: None,
    }
}

#[tokio::test]
async fn the_client_reconnects_after_the_hub_restarts() {
    let mut first = TestHub::start_keeping_port(Config::default()).await;
    let addr = first.addr;
    let client = Client::builder()
        .reconnect(quick_reconnect())
        .connect(addr)
        .await
        .unwrap();
    let mut events = client.events();
    // In the pool before the hub stops: a connection still in the listening socket's
    // backlog would wait there for the successor.
    first.wait_clients(1).await;
    first.begin_shutdown();
    first.stopped().await;
    let second = first.successor(Config::default());
    // Lost, then back: a close, reconnect attempts, and a new connect.
    let mut saw = Vec::new();
    loop {
        match within(events.next()).await.unwrap() {
            ClientEvent::Close { .. } => saw.push("close"),
            ClientEvent::Reconnecting { .. } if !saw.contains(&"reconnecting") => {
                saw.push("reconnecting")
            }
            ClientEvent::Connect { .. } => break,
            _ => {}
        }
    }
    assert_eq!(saw, ["close", "reconnecting"]);
    let mut listener = second.connect().await;
    client.emit("back", &"again").await.unwrap();
    assert_eq!(listener.json().await["payload"], "again");
}

/// While the hub is away, sends wait in a bounded buffer and go out after the
/// reconnect; past the bound they are refused, never dropped silently.
#[tokio::test(flavor = "current_thread")]
async fn sends_while_away_are_buffered_up_to_the_bound_then_refused() {
    let mut first = TestHub::start_keeping_port(Config::default()).await;
    let addr = first.addr;
    let client = Client::builder()
        .reconnect(quick_reconnect())
        .buffer(3)
        .connect(addr)
        .await
        .unwrap();
    let mut events = client.events();
    // In the pool before the hub stops (see above).
    first.wait_clients(1).await;
    first.begin_shutdown();
    first.stopped().await;
    while !matches!(
        within(events.next()).await.unwrap(),
        ClientEvent::Close { .. }
    ) {}
    assert!(!client.is_connected());
    let mut waiting = tokio::task::JoinSet::new();
    for n in 0..3 {
        let client = client.clone();
        waiting.spawn(async move { client.emit("queued", &n).await });
    }
    // Let the three queue up (one runtime thread: each runs until it waits).
    tokio::task::yield_now().await;
    assert_eq!(
        client.emit("one-too-many", &3).await,
        Err(ClientError::BufferFull(3))
    );
    let second = first.successor(Config::default());
    while let Some(sent) = within(waiting.join_next()).await {
        sent.unwrap().unwrap();
    }
    let queued = second.events_matching(
        |e| matches!(e, HubEvent::Event { event, .. } if event.name().as_str() == "queued"),
    );
    assert_eq!(queued.len(), 3, "all buffered sends reach the new hub");
}

/// Issue #4: subscriptions and rooms are told to the new hub after a reconnect.
#[tokio::test]
async fn subscriptions_and_rooms_are_restored_after_a_reconnect() {
    let mut first = TestHub::start_keeping_port(Config::default()).await;
    let addr = first.addr;
    let builder = Client::builder()
        .reconnect(quick_reconnect())
        .subscribe(&["order.*"]);
    let mut events = builder.events();
    let client = builder.connect(addr).await.unwrap();
    client.join("acme").await.unwrap();
    first.wait_clients(1).await;
    first.begin_shutdown();
    first.stopped().await;
    let second = first.successor(Config::default());
    while !matches!(
        within(events.next()).await.unwrap(),
        ClientEvent::Connect { .. }
    ) {}
    // The new hub has been told again: wait until it applied the join.
    second
        .wait_for(
            |e| matches!(e, HubEvent::Control { event, .. } if event.name().as_str() == "$join"),
        )
        .await;
    let mut sender = second.connect().await;
    sender.send(r#"{"event":"pickup","payload":1}"#).await; // not subscribed
    sender
        .send(r#"{"event":"order.new","room":"zeta","payload":2}"#)
        .await; // not a member
    sender
        .send(r#"{"event":"order.new","room":"acme","payload":3}"#)
        .await;
    sender.send(r#"{"event":"order.paid","payload":4}"#).await;
    let first_heard = next_named(&mut events, "order.new").await;
    assert_eq!(first_heard.payload(), "3");
    assert_eq!(next_named(&mut events, "order.paid").await.payload(), "4");
}

#[tokio::test]
async fn emit_to_reaches_only_the_room() {
    let hub = TestHub::start(Config::default()).await;
    let member = Client::builder()
        .join("acme")
        .connect(hub.addr)
        .await
        .unwrap();
    hub.wait_for(|e| matches!(e, HubEvent::Control { .. }))
        .await;
    let mut outsider = hub.connect().await;
    let mut heard = member.events();
    let sender = Client::connect(hub.addr).await.unwrap();
    sender.emit_to("acme", "delivered", &7).await.unwrap();
    sender.emit("everyone", &8).await.unwrap();
    let delivered = next_named(&mut heard, "delivered").await;
    assert_eq!(delivered.room().unwrap().as_str(), "acme");
    assert_eq!(outsider.json().await["event"], "everyone");
    assert!(matches!(
        sender.subscribe(&["bad..pattern"]).await,
        Err(ClientError::InvalidEvent(_))
    ));
}

/// Sends `count` `tick` events from a raw connection as fast as it can, then `done`;
/// returns the connection, which must stay open until the test is done (closed with
/// unread data, it would be reset, and the hub would lose what it had not read yet).
async fn broadcast_ticks(hub: &TestHub, count: usize) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    // Hears nothing itself.
    raw.write_all(b"{\"event\":\"$subscribe\",\"payload\":{\"events\":[\"none\"]}}\n")
        .await
        .unwrap();
    let mut answer = [0u8; 54];
    within(raw.read_exact(&mut answer)).await.unwrap();
    let mut batch = String::new();
    for n in 0..count {
        batch.push_str(&format!("{{\"event\":\"tick\",\"payload\":{n}}}\n"));
        if batch.len() > 60_000 {
            raw.write_all(batch.as_bytes()).await.unwrap();
            batch.clear();
        }
    }
    batch.push_str("{\"event\":\"done\",\"payload\":null}\n");
    raw.write_all(batch.as_bytes()).await.unwrap();
    raw
}

/// Issue #11 (3): a consumer that awaits `emit` for each event it hears used to hang
/// after its stream filled: the client's task waited for room in the stream while the
/// consumer waited for the task to write its reply. 100,000 events, each answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_replies_to_every_event_never_deadlocks() {
    const COUNT: usize = 100_000;
    let hub = TestHub::start_with(
        Config::builder()
            // This test is about the client, not the hub's slow-consumer limit.
            .max_pending(256 << 20)
            .build()
            .unwrap(),
        false,
    )
    .await;
    let builder = Client::builder().echo(false).subscribe(&["tick", "done"]);
    let mut events = builder.events();
    let client = builder.connect(hub.addr).await.unwrap();
    let answers = Client::builder().subscribe(&["tock"]);
    let mut tocks = answers.events();
    let _answers = answers.connect(hub.addr).await.unwrap();
    hub.wait_clients(2).await;
    // Both subscriptions are in place once the hub has answered them.
    next_control(&mut events, "$subscribed").await;
    next_control(&mut tocks, "$subscribed").await;
    let progress = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&progress);
    let replier = tokio::spawn(async move {
        let mut replied = 0;
        while let Some(event) = events.next().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let ClientEvent::Event(e) = event {
                if e.name().as_str() == "done" {
                    break;
                }
                client.emit("tock", &e.payload().to_string()).await.unwrap();
                replied += 1;
            }
        }
        replied
    });
    let _broadcaster = broadcast_ticks(&hub, COUNT).await;
    let replied = match tokio::time::timeout(Duration::from_secs(20), replier).await {
        Ok(replied) => replied.unwrap(),
        Err(_) => panic!(
            "the replier hung after {} items; hub stats {:?}",
            progress.load(std::sync::atomic::Ordering::Relaxed),
            hub.hub.stats()
        ),
    };
    assert_eq!(replied, COUNT);
    let mut heard = 0;
    while heard < COUNT {
        next_named(&mut tocks, "tock").await;
        heard += 1;
    }
}

/// Issue #11 (3): the same with handlers that send a reply for each event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_that_reply_to_every_event_never_deadlock() {
    const COUNT: usize = 20_000;
    let hub = TestHub::start_with(
        Config::builder().max_pending(256 << 20).build().unwrap(),
        false,
    )
    .await;
    let builder = Client::builder().echo(false).subscribe(&["tick"]);
    let mut control = builder.events();
    let client = builder.connect(hub.addr).await.unwrap();
    let replier = client.clone();
    client.on("tick", move |e| {
        let replier = replier.clone();
        let payload = e.payload().to_string();
        tokio::spawn(async move { replier.emit("tock", &payload).await.unwrap() });
    });
    let answers = Client::builder().subscribe(&["tock"]);
    let mut tocks = answers.events();
    let _answers = answers.connect(hub.addr).await.unwrap();
    hub.wait_clients(2).await;
    next_control(&mut control, "$subscribed").await;
    next_control(&mut tocks, "$subscribed").await;
    drop(control);
    let _broadcaster = broadcast_ticks(&hub, COUNT).await;
    for _ in 0..COUNT {
        tokio::time::timeout(Duration::from_secs(60), next_named(&mut tocks, "tock"))
            .await
            .expect("replies stopped");
    }
}

/// The next control frame named `name` (such as `$subscribed`).
async fn next_control(events: &mut Events, name: &str) {
    loop {
        match within(events.next()).await {
            Some(ClientEvent::Control(e)) if e.name().as_str() == name => return,
            Some(_) => continue,
            None => panic!("closed while waiting for {name}"),
        }
    }
}

/// Issue #11 (3): a consumer that stops reading gets a documented outcome, never a
/// hang: its stream buffers 1,024 items, then the client stops reading the socket,
/// the hub's queue for it fills, and the hub cuts it as a slow consumer. When the
/// consumer reads again it gets what was buffered, then the hub's `slow_consumer`
/// error, then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_is_cut_by_the_hub_and_told() {
    let hub = TestHub::start(
        Config::builder()
            .max_frame(16 << 10)
            .max_pending(64 << 10)
            .build()
            .unwrap(),
    )
    .await;
    let builder = Client::builder().subscribe(&["tick", "done"]);
    let mut events = builder.events();
    let client = builder.connect(hub.addr).await.unwrap();
    hub.wait_clients(1).await;
    next_control(&mut events, "$subscribed").await;
    let _broadcaster = broadcast_ticks(&hub, 20_000).await;
    hub.wait_for(|e| matches!(e, HubEvent::SlowConsumer { .. }))
        .await;
    let mut ticks = 0;
    let mut told = false;
    loop {
        match within(events.next()).await {
            Some(ClientEvent::Event(_)) => ticks += 1,
            Some(ClientEvent::HubError(e)) if e.code == ErrorCode::SlowConsumer => told = true,
            Some(ClientEvent::Close { had_error }) => {
                assert!(!had_error || told);
                break;
            }
            Some(_) => {}
            None => panic!("the stream ended without a close"),
        }
    }
    assert!(told, "the slow_consumer error was not passed on");
    assert!(ticks < 20_000, "{ticks}");
    assert!(!client.is_connected());
}

/// Issue #11 (3): a send that waits for room in the command buffer while connected
/// used to go on waiting when the connection dropped (until a reconnect, or forever if
/// none came). Now it is refused like any send made while disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_waiting_when_the_connection_drops_is_refused_not_stuck() {
    // A "hub" that accepts one connection and never reads from it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = tokio::spawn(async move { listener.accept().await.unwrap().0 });
    let client = Client::builder()
        .buffer(2)
        .reconnect(Reconnect {
            initial_delay: Duration::from_secs(3600),
            ..Reconnect::default()
        })
        .connect(addr)
        .await
        .unwrap();
    let hub_side = within(accepted).await.unwrap();
    // 1 MiB events until the socket's buffers are full and the command buffer too.
    let big = hubcast::Event::new("big", &"x".repeat(1 << 20)).unwrap();
    let mut sends = Vec::new();
    for _ in 0..32 {
        let (client, big) = (client.clone(), big.clone());
        sends.push(tokio::spawn(async move {
            // Returns once the event is in the buffer (or refused), not when written.
            client.enqueue(&big).await.map(drop)
        }));
    }
    // Wait until the sends that fit are in (no more finish for a while) and the rest
    // wait for room; then drop the connection.
    within(async {
        let (mut finished, mut calm) = (0, 0);
        while calm < 1000 {
            tokio::task::yield_now().await;
            let now = sends.iter().filter(|s| s.is_finished()).count();
            calm = if now == finished && now > 0 {
                calm + 1
            } else {
                0
            };
            finished = now;
        }
    })
    .await;
    assert!(
        sends.iter().any(|s| !s.is_finished()),
        "nothing waits for room"
    );
    drop(hub_side);
    let mut refused = 0;
    for send in sends {
        match within(send).await.unwrap() {
            Err(ClientError::BufferFull(_)) => refused += 1,
            Ok(()) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(refused > 0);
}

/// Issue #16: given several hubs (a cluster's nodes), the client connects to the first
/// that answers; when none does, the error names the last one tried.
#[tokio::test]
async fn several_addresses_connect_to_the_first_that_answers() {
    let (dead, also_dead) = (crate::support::free_port(), crate::support::free_port());
    let hub = TestHub::start(Config::default()).await;
    let client = within(Client::builder().connect(format!("127.0.0.1:{dead}, {}", hub.addr)))
        .await
        .unwrap();
    hub.wait_clients(1).await;
    assert!(client.is_connected());
    let error =
        within(Client::builder().connect(format!("127.0.0.1:{dead},127.0.0.1:{also_dead}")))
            .await
            .unwrap_err();
    assert!(
        matches!(&error, ClientError::Connect { addr, .. } if addr == &format!("127.0.0.1:{also_dead}")),
        "{error:?}"
    );
    let error = within(Client::builder().connect(" , ")).await.unwrap_err();
    assert!(
        matches!(error, ClientError::Resolve { .. })
            && format!("{error:?}").contains("no address given"),
        "{error:?}"
    );
}

/// A confirmed send made while the hub is away is written once after the reconnect:
/// the restore resends it (it is unconfirmed) and the send is still queued, and
/// writing it twice made the hub's first answer a `"duplicate": true` (CI, stop 23).
/// A raw socket stands in for the hub, so every byte the client writes is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_send_made_while_away_is_written_once() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client = Client::builder()
        .reconnect(quick_reconnect())
        .connect(addr)
        .await
        .unwrap();
    let mut events = client.events();
    let (first, _) = within(listener.accept()).await.unwrap();
    // Away: the connection closed and nothing listens, so reconnecting fails.
    drop(listener);
    drop(first);
    loop {
        if let ClientEvent::Reconnecting { .. } = within(events.next()).await.unwrap() {
            break;
        }
    }
    let confirmation = client
        .enqueue_with_id("pickup", &1, "order-1")
        .await
        .unwrap();
    let _written = client
        .enqueue(&hubcast::Event::new("after", &2).unwrap())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (second, _) = within(listener.accept()).await.unwrap();
    let (read, mut write) = second.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut sent = Vec::new();
    while let Some(line) = within(lines.next_line()).await.unwrap() {
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        let last = event["event"] == "after";
        sent.push(event);
        if last {
            break;
        }
    }
    let names: Vec<&str> = sent.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(names, ["pickup", "after"], "{sent:?}");
    assert_eq!(sent[0]["id"], "order-1");
    write
        .write_all(b"{\"event\":\"$stored\",\"payload\":{\"id\":\"order-1\",\"stream\":\"orders\",\"seq\":1}}\n")
        .await
        .unwrap();
    let stored = within(confirmation).await.unwrap();
    assert_eq!((stored.seq, stored.duplicate), (Some(1), false));
}
