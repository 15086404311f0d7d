//! The control protocol: hello, subscriptions, rooms, ping, limits (issue #4).

use hubcast::{Config, HubEvent};
use serde_json::{json, Value};

use crate::support::{event, TestClient, TestHub};

/// Sends a control event and returns the hub's answer.
async fn control(client: &mut TestClient, name: &str, payload: Value) -> Value {
    client.send(event(name, payload) + "\n").await;
    client.json().await
}

async fn subscribe(client: &mut TestClient, patterns: &[&str]) {
    let ack = control(client, "$subscribe", json!({ "events": patterns })).await;
    assert_eq!(
        ack,
        json!({"event": "$subscribed", "payload": {"events": patterns}})
    );
}

async fn join(client: &mut TestClient, room: &str) {
    let ack = control(client, "$join", json!({ "room": room })).await;
    assert_eq!(ack, json!({"event": "$joined", "payload": {"room": room}}));
}

/// Sends `frames` from a fresh client, then a marker event that everyone in these
/// tests hears (unfiltered, or subscribed to `zz.>`).
async fn send_all(hub: &TestHub, frames: &[Value]) {
    let mut sender = hub.connect().await;
    for frame in frames {
        sender.send(frame.to_string()).await;
    }
    sender.send(event("zz.marker", json!(null))).await;
}

/// The names `client` heard before the marker: the marker proves nothing else of
/// the batch is on its way.
async fn until_marker(client: &mut TestClient) -> Vec<String> {
    let mut names = Vec::new();
    loop {
        let frame = client.json().await;
        let name = frame["event"].as_str().unwrap().to_string();
        if name == "zz.marker" {
            return names;
        }
        names.push(name);
    }
}

fn named(name: &str) -> Value {
    json!({"event": name, "payload": 1})
}

fn in_room(name: &str, room: &str) -> Value {
    json!({"event": name, "room": room, "payload": 1})
}

#[tokio::test]
async fn hello_is_answered_with_welcome() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    let welcome = control(&mut client, "$hello", json!({"name": "vendor-1"})).await;
    assert_eq!(welcome["event"], "$welcome");
    let payload = &welcome["payload"];
    assert_eq!(payload["version"], hubcast::PROTOCOL_VERSION);
    assert_eq!(payload["id"], client.id.0);
    assert_eq!(payload["max_frame"], hubcast::DEFAULT_MAX_FRAME);
    assert_eq!(payload["max_pending"], hubcast::DEFAULT_MAX_PENDING);
    assert_eq!(payload["name"], "vendor-1");
}

#[tokio::test]
async fn hello_can_turn_echo_off_for_one_client() {
    let hub = TestHub::start(Config::default()).await;
    let mut quiet = hub.connect().await;
    control(&mut quiet, "$hello", json!({"echo": false})).await;
    let mut loud = hub.connect().await;
    quiet.send(event("one", json!(1))).await;
    assert_eq!(loud.json().await["event"], "one");
    loud.send(event("two", json!(2))).await;
    assert_eq!(
        quiet.json().await["event"],
        "two",
        "quiet heard its own event"
    );
}

#[tokio::test]
async fn subscribers_hear_only_matches_and_others_hear_everything() {
    let hub = TestHub::start(Config::default()).await;
    let mut orders = hub.connect().await;
    subscribe(&mut orders, &["order.*", "zz.>"]).await;
    let mut everything = hub.connect().await;
    send_all(
        &hub,
        &[
            named("order.new"),
            named("order.new.late"),
            named("pickup"),
            named("order.paid"),
        ],
    )
    .await;
    assert_eq!(until_marker(&mut orders).await, ["order.new", "order.paid"]);
    assert_eq!(
        until_marker(&mut everything).await,
        ["order.new", "order.new.late", "pickup", "order.paid"]
    );
}

#[tokio::test]
async fn unsubscribe_removes_only_what_it_names() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    subscribe(&mut client, &["a", "b", "zz.marker"]).await;
    let ack = control(
        &mut client,
        "$unsubscribe",
        json!({"events": ["a", "never-had"]}),
    )
    .await;
    assert_eq!(
        ack,
        json!({"event": "$unsubscribed", "payload": {"events": ["a", "never-had"]}})
    );
    send_all(&hub, &[named("a"), named("b")]).await;
    assert_eq!(until_marker(&mut client).await, ["b"]);
}

#[tokio::test]
async fn room_events_reach_members_only_filtered_by_their_subscriptions() {
    let hub = TestHub::start(Config::default()).await;
    let mut member = hub.connect().await;
    join(&mut member, "acme").await;
    let mut picky = hub.connect().await;
    join(&mut picky, "acme").await;
    subscribe(&mut picky, &["delivered", "zz.marker"]).await;
    let mut outsider = hub.connect().await;
    send_all(
        &hub,
        &[
            in_room("in-transit", "acme"),
            in_room("delivered", "acme"),
            in_room("delivered", "zeta"),
            named("pickup"),
        ],
    )
    .await;
    assert_eq!(
        until_marker(&mut member).await,
        ["in-transit", "delivered", "pickup"]
    );
    assert_eq!(until_marker(&mut picky).await, ["delivered"]);
    assert_eq!(until_marker(&mut outsider).await, ["pickup"]);
    let ack = control(&mut member, "$leave", json!({"room": "acme"})).await;
    assert_eq!(ack, json!({"event": "$left", "payload": {"room": "acme"}}));
    send_all(&hub, &[in_room("delivered", "acme")]).await;
    assert_eq!(until_marker(&mut member).await, Vec::<String>::new());
}

#[tokio::test]
async fn ping_is_answered_with_pong_carrying_the_payload() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    let pong = control(&mut client, "$ping", json!({"t": 42})).await;
    assert_eq!(pong, json!({"event": "$pong", "payload": {"t": 42}}));
}

#[tokio::test]
async fn malformed_control_events_get_an_error_naming_the_problem() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    for (name, payload, code) in [
        (
            "$subscribe",
            json!({"events": "order.*"}),
            "invalid_payload",
        ),
        ("$subscribe", json!({"events": []}), "invalid_payload"),
        ("$subscribe", json!(null), "invalid_payload"),
        (
            "$subscribe",
            json!({"events": ["order..new"]}),
            "invalid_pattern",
        ),
        (
            "$subscribe",
            json!({"events": ["order.>.x"]}),
            "invalid_pattern",
        ),
        ("$join", json!({"room": ""}), "invalid_room"),
        ("$join", json!({"room": 7}), "invalid_payload"),
        ("$hello", json!({"heartbeat": -1}), "invalid_payload"),
        ("$welcome", json!({}), "reserved_event"),
        ("$error", json!({}), "reserved_event"),
    ] {
        client.send(event(name, payload.clone())).await;
        let message = client.expect_error(code).await;
        assert!(!message.is_empty(), "{name} {payload}");
    }
    // Still connected, and a failed subscribe changed nothing: it hears everything.
    let mut other = hub.connect().await;
    other.send(event("after", json!(1))).await;
    assert_eq!(client.json().await["event"], "after");
}

#[tokio::test]
async fn limits_answer_limit_exceeded() {
    let config = Config::builder()
        .max_subscriptions(2)
        .max_rooms(1)
        .build()
        .unwrap();
    let hub = TestHub::start(config).await;
    let mut client = hub.connect().await;
    subscribe(&mut client, &["a", "b"]).await;
    subscribe(&mut client, &["a"]).await; // already held: not counted again
    client
        .send(event("$subscribe", json!({"events": ["c"]})))
        .await;
    assert!(client
        .expect_error("limit_exceeded")
        .await
        .contains("at most 2"));
    join(&mut client, "one").await;
    client.send(event("$join", json!({"room": "two"}))).await;
    client.expect_error("limit_exceeded").await;
    let applied = hub.events_matching(|e| matches!(e, HubEvent::Control { .. }));
    assert_eq!(applied.len(), 3);
}

#[tokio::test]
async fn leaving_the_hub_forgets_subscriptions_and_rooms() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    subscribe(&mut client, &["x.*"]).await;
    join(&mut client, "acme").await;
    let id = client.id;
    drop(client);
    hub.wait_close(id).await;
    let mut listener = hub.connect().await;
    let mut sender = hub.connect().await;
    sender.send(event("x.1", json!(1))).await;
    assert_eq!(listener.json().await["event"], "x.1");
    assert_eq!(
        hub.hub.stats().deliveries,
        2,
        "only listener and sender's echo"
    );
}

/// Issue #6: a single write holding plain events (which the hub fans out as one chunk
/// per receiver), control events, an event for a room and a bad frame, with no
/// delimiters and with CRLFs: each receiver gets exactly its own share, in order, and
/// the sender its own replies.
#[tokio::test]
async fn one_write_mixing_runs_control_rooms_and_errors_reaches_each_as_its_own() {
    let hub = TestHub::start(Config::default()).await;
    let mut everyone = hub.connect().await;
    let mut orders = hub.connect().await;
    subscribe(&mut orders, &["order.*", "zz.>"]).await;
    let mut room = hub.connect().await;
    join(&mut room, "acme").await;
    let mut sender = hub.connect().await;
    control(&mut sender, "$hello", json!({"echo": false})).await;

    let stream = [
        event("a", json!(1)),
        event("order.new", json!({"id": 1})),
        "\r\n".to_string(),
        event("b", json!([2])),
        event("$ping", json!("p")),
        json!({"event": "order.paid", "payload": 3, "room": "acme"}).to_string(),
        "{\"event\":\"c\"}\n".to_string(),
        event("order.done", json!(4)),
        event("d", json!(null)),
        "\n".to_string(),
        event("zz.marker", json!(null)),
        "\n".to_string(),
    ]
    .concat();
    sender.send(stream).await;

    assert_eq!(
        until_marker(&mut everyone).await,
        ["a", "order.new", "b", "order.done", "d"]
    );
    assert_eq!(until_marker(&mut orders).await, ["order.new", "order.done"]);
    // The room member hears everything that names no room, and the room's event.
    assert_eq!(
        until_marker(&mut room).await,
        ["a", "order.new", "b", "order.paid", "order.done", "d"]
    );
    // The sender hears only the hub's answers to it, in the order of its frames.
    assert_eq!(
        sender.json().await,
        json!({"event": "$pong", "payload": "p"})
    );
    sender.expect_error("not_an_event").await;
    let stats = hub.hub.stats();
    assert_eq!(stats.events, 7, "{stats:?}");
    // a, b and d to two; order.new, order.done and the marker to three; order.paid to one.
    assert_eq!(stats.deliveries, 3 * 2 + 3 * 3 + 1, "{stats:?}");
}
