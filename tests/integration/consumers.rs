//! Durable consumers (issue #12): `$consume`, deliveries, `$ack`/`$nack`, redelivery,
//! work queues, dead letters, and what survives `kill -9`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hubcast::{Config, StreamSpec};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::support::{within, HubProcess, TestClient, TestHub};

fn temp_dir(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "hubcast-consumers-{tag}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

fn config(dir: &std::path::Path) -> Config {
    Config::builder()
        .streams(vec![StreamSpec::new("orders", &["pickup", "delivered"])])
        .data_dir(dir.to_path_buf())
        .echo(false)
        .build()
        .unwrap()
}

fn line(value: Value) -> String {
    format!("{value}\n")
}

fn consume(payload: Value) -> String {
    line(json!({"event": "$consume", "payload": payload}))
}

fn ack(consumer: &str, seq: Value) -> String {
    line(json!({"event": "$ack", "payload": {"consumer": consumer, "seq": seq}}))
}

/// Publishes `n` pickups with ids `{tag}-0..` and waits for every `$stored`.
async fn publish(hub: &TestHub, tag: &str, n: u64) {
    let mut publisher = hub.connect().await;
    let mut batch = String::new();
    for i in 0..n {
        batch.push_str(&line(
            json!({"event": "pickup", "payload": {"n": i}, "id": format!("{tag}-{i}")}),
        ));
    }
    publisher.send(batch).await;
    for _ in 0..n {
        let frame = publisher.json().await;
        assert_eq!(frame["event"], "$stored", "{frame}");
    }
}

/// `$consume`, and its `$consuming` answer.
async fn start(client: &mut TestClient, payload: Value) -> Value {
    client.send(consume(payload)).await;
    let frame = client.json().await;
    assert_eq!(frame["event"], "$consuming", "{frame}");
    frame["payload"].clone()
}

/// The next delivery (skipping nothing: anything else fails the test).
async fn delivery(client: &mut TestClient) -> Value {
    let frame = client.json().await;
    assert!(frame.get("seq").is_some(), "not a delivery: {frame}");
    frame
}

/// Issue #12 (3): a single member gets events in seq order, with the four fields
/// added; acked events are not delivered again, even after a restart; unacked ones
/// are, with their attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_gets_events_in_order_and_resumes_after_a_restart() {
    let dir = temp_dir("order");
    let mut hub = TestHub::start_keeping_port(config(&dir)).await;
    publish(&hub, "a", 10).await;
    let mut member = hub.connect().await;
    let answer = start(
        &mut member,
        json!({"stream": "orders", "consumer": "c", "max_in_flight": 4}),
    )
    .await;
    assert_eq!(
        answer,
        json!({"stream": "orders", "consumer": "c", "pending": 10})
    );
    let mut seqs = Vec::new();
    for expected in 1..=4 {
        let d = delivery(&mut member).await;
        assert_eq!(d["seq"], expected, "{d}");
        assert_eq!(d["stream"], "orders");
        assert_eq!(d["consumer"], "c");
        assert_eq!(d["attempt"], 1);
        assert_eq!(d["event"], "pickup");
        assert_eq!(d["id"], format!("a-{}", expected - 1));
        assert_eq!(d["payload"]["n"], expected - 1);
        seqs.push(expected);
    }
    // At max_in_flight: nothing more until an ack.
    member
        .send(line(json!({"event": "$ping", "payload": {}})))
        .await;
    assert_eq!(member.json().await["event"], "$pong");
    member.send(ack("c", json!([1, 2, 3]))).await;
    for expected in 5..=7 {
        assert_eq!(delivery(&mut member).await["seq"], expected);
    }
    // Acks are durable (`confirm` waits for that), then the hub stops. The two
    // freed places take 8 and 9 meanwhile.
    member
        .send(line(
            json!({"event": "$ack", "payload": {"consumer": "c", "seq": [5, 6], "confirm": true}}),
        ))
        .await;
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(member.json().await);
    }
    let acked = frames
        .iter()
        .find(|f| f["event"] == "$acked")
        .expect("$acked");
    assert_eq!(acked["payload"], json!({"consumer": "c", "seq": [5, 6]}));
    let mut out: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    out.sort_unstable();
    assert_eq!(out, [8, 9]);
    drop(member);
    hub.begin_shutdown();
    hub.stopped().await;
    hub.hub.close_store();
    let hub = hub.successor(config(&dir));
    let mut member = hub.connect().await;
    // Pending: 4, 7, 8, 9 (delivered, not acked) and 10.
    let answer = start(&mut member, json!({"stream": "orders", "consumer": "c"})).await;
    assert_eq!(answer["pending"], 5, "{answer}");
    let mut got = Vec::new();
    for _ in 0..4 {
        let d = delivery(&mut member).await;
        got.push((d["seq"].as_u64().unwrap(), d["attempt"].as_u64().unwrap()));
    }
    // max_in_flight (4) still holds: the last one after an ack.
    member.send(ack("c", json!(4))).await;
    let d = delivery(&mut member).await;
    got.push((d["seq"].as_u64().unwrap(), d["attempt"].as_u64().unwrap()));
    // Redeliveries first (in seq order, counted across the clean restart), then
    // what was never read.
    assert_eq!(got, [(4, 2), (7, 2), (8, 2), (9, 2), (10, 1)]);
    // The tool reads the same ledger beside the running hub.
    member
        .send(line(json!({"event": "$ack", "payload": {"consumer": "c", "seq": [7, 8, 9, 10], "confirm": true}})))
        .await;
    assert_eq!(member.json().await["event"], "$acked");
    let listed = crate::streams::run_tool(&[
        "streams",
        "--json",
        "--data-dir",
        &dir.display().to_string(),
    ])
    .await;
    let consumer: Value = listed
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["consumer"] == "c")
        .expect("the consumer is listed");
    assert_eq!(consumer["ack_floor"], 10, "{consumer}");
    assert_eq!(consumer["pending"], 0, "{consumer}");
    assert_eq!(consumer["redelivered"], 4, "{consumer}");
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #12 (3): a work queue of 3 members never has one event out to two of them;
/// busy members are skipped and the load is even; when a member dies, what it held
/// goes to the others within a second (far sooner than `ack_wait`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_queue_shares_events_and_a_dead_members_go_to_the_others() {
    let dir = temp_dir("queue");
    let hub = TestHub::start(config(&dir)).await;
    publish(&hub, "w", 30).await;
    let settings =
        json!({"stream": "orders", "consumer": "drivers", "max_in_flight": 5, "ack_wait": "60s"});
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut member = hub.connect().await;
        start(&mut member, settings.clone()).await;
        members.push(member);
    }
    // Each holds 5, none twice.
    let mut held: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 3];
    for (i, member) in members.iter_mut().enumerate() {
        for _ in 0..5 {
            let seq = delivery(member).await["seq"].as_u64().unwrap();
            assert!(
                held.iter().all(|h| !h.contains(&seq)),
                "seq {seq} out twice"
            );
            held[i].insert(seq);
        }
    }
    let all: BTreeSet<u64> = held.iter().flatten().copied().collect();
    assert_eq!(all, (1..=15).collect());
    // Members 1 and 2 finish theirs; member 0 dies holding 5.
    for i in [1, 2] {
        let seqs: Vec<u64> = held[i].iter().copied().collect();
        members[i].send(ack("drivers", json!(seqs))).await;
    }
    let mut survivors = members.split_off(1);
    let orphaned = held[0].clone();
    let died = Instant::now();
    drop(members);
    // 10 new for the survivors (5 each), plus the 5 orphans, first come.
    let mut seen = HashMap::new();
    while !orphaned.iter().all(|s| seen.contains_key(s)) {
        for (i, member) in survivors.iter_mut().enumerate() {
            let d = delivery(member).await;
            let seq = d["seq"].as_u64().unwrap();
            assert!(
                seen.insert(seq, (i, d["attempt"].clone())).is_none(),
                "seq {seq} out twice"
            );
            member.send(ack("drivers", json!(seq))).await;
        }
    }
    let elapsed = died.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "orphans came back after {elapsed:?}"
    );
    for seq in &orphaned {
        assert_eq!(seen[seq].1, 2, "seq {seq} is a second attempt");
    }
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An event not acked within `ack_wait` comes again; `$nack` gives it back at once
/// (or after its delay); after `max_deliver` attempts it moves to `orders.dead`, which
/// can be consumed like any stream, and the consumer goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_events_come_again_then_go_to_the_dead_letter_stream() {
    let dir = temp_dir("dead");
    let hub = TestHub::start(config(&dir)).await;
    publish(&hub, "p", 2).await;
    let mut member = hub.connect().await;
    start(
        &mut member,
        json!({"stream": "orders", "consumer": "c", "max_deliver": 3, "ack_wait": "200ms", "max_in_flight": 1}),
    )
    .await;
    // seq 1: attempt 1 (timed out), attempt 2 (nacked), attempt 3 (nacked): dead.
    let d = delivery(&mut member).await;
    assert_eq!(
        (d["seq"].clone(), d["attempt"].clone()),
        (json!(1), json!(1))
    );
    let d = delivery(&mut member).await;
    assert_eq!(
        (d["seq"].clone(), d["attempt"].clone()),
        (json!(1), json!(2))
    );
    member
        .send(line(
            json!({"event": "$nack", "payload": {"consumer": "c", "seq": 1}}),
        ))
        .await;
    let d = delivery(&mut member).await;
    assert_eq!(
        (d["seq"].clone(), d["attempt"].clone()),
        (json!(1), json!(3))
    );
    member
        .send(line(
            json!({"event": "$nack", "payload": {"consumer": "c", "seq": 1, "delay": "10ms"}}),
        ))
        .await;
    // The consumer moves on: no poison loop.
    let d = delivery(&mut member).await;
    assert_eq!(
        (d["seq"].clone(), d["attempt"].clone()),
        (json!(2), json!(1))
    );
    member.send(ack("c", json!(2))).await;
    let mut inspector = hub.connect().await;
    start(
        &mut inspector,
        json!({"stream": "orders.dead", "consumer": "inspect"}),
    )
    .await;
    let dead = delivery(&mut inspector).await;
    assert_eq!(dead["stream"], "orders.dead");
    assert_eq!(dead["seq"], 1);
    assert_eq!(dead["id"], "p-0");
    assert_eq!(dead["payload"]["n"], 0);
    assert_eq!(
        dead["dead_letter"],
        json!({"stream": "orders", "seq": 1, "consumer": "c", "attempts": 3})
    );
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `filter`, `room` and `start` pick what a consumer gets; a consuming connection
/// hears live events only through its subscriptions; `$unconsume` stops deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_rooms_and_starts_choose_what_is_delivered() {
    let dir = temp_dir("filter");
    let hub = TestHub::start(config(&dir)).await;
    let mut publisher = hub.connect().await;
    let events = [
        json!({"event": "pickup", "payload": 1, "id": "1"}),
        json!({"event": "delivered", "room": "acme", "payload": 2, "id": "2"}),
        json!({"event": "delivered", "room": "other", "payload": 3, "id": "3"}),
        json!({"event": "pickup", "payload": 4, "id": "4"}),
    ];
    for event in &events {
        publisher.send(line(event.clone())).await;
        assert_eq!(publisher.json().await["event"], "$stored");
    }
    let mut vendor = hub.connect().await;
    start(
        &mut vendor,
        json!({"stream": "orders", "consumer": "vendor-acme", "filter": "delivered", "room": "acme"}),
    )
    .await;
    let d = delivery(&mut vendor).await;
    assert_eq!(
        (d["seq"].clone(), d["payload"].clone()),
        (json!(2), json!(2))
    );
    let mut late = hub.connect().await;
    start(
        &mut late,
        json!({"stream": "orders", "consumer": "late", "start": "new"}),
    )
    .await;
    let mut from3 = hub.connect().await;
    start(
        &mut from3,
        json!({"stream": "orders", "consumer": "from3", "start": 3}),
    )
    .await;
    assert_eq!(delivery(&mut from3).await["seq"], 3);
    assert_eq!(delivery(&mut from3).await["seq"], 4);
    // A new event: `late` gets it as a delivery, and nobody consuming hears it live.
    publisher
        .send(line(json!({"event": "pickup", "payload": 5, "id": "5"})))
        .await;
    assert_eq!(delivery(&mut late).await["seq"], 5);
    assert_eq!(delivery(&mut from3).await["seq"], 5);
    late.send(line(
        json!({"event": "$unconsume", "payload": {"consumer": "late"}}),
    ))
    .await;
    assert_eq!(
        late.json().await,
        json!({"event": "$unconsumed", "payload": {"consumer": "late"}})
    );
    publisher
        .send(line(json!({"event": "pickup", "payload": 6, "id": "6"})))
        .await;
    assert_eq!(delivery(&mut from3).await["seq"], 6);
    late.send(line(json!({"event": "$ping", "payload": {}})))
        .await;
    assert_eq!(
        late.json().await["event"],
        "$pong",
        "no delivery after $unconsume"
    );
    vendor
        .send(line(json!({"event": "$ping", "payload": {}})))
        .await;
    assert_eq!(
        vendor.json().await["event"],
        "$pong",
        "no live pickup for a consumer"
    );
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #12 (6): bad input to every new control event is answered with a clear
/// `$error` naming the consumer where there is one; the connection keeps working and
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_consumer_requests_get_clear_errors() {
    let dir = temp_dir("bad");
    let mut lenient = config(&dir);
    lenient.limits.max_errors = 1000;
    let hub = TestHub::start(lenient).await;
    publish(&hub, "b", 3).await;
    let mut client = hub.connect().await;
    let huge: Vec<u64> = (1..=20_000).collect();
    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"event": "$consume", "payload": {"stream": "nope", "consumer": "c"}}),
            "unknown_stream",
            "nope",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": 1, "consumer": "c"}}),
            "invalid_payload",
            "$consume",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders"}}),
            "invalid_payload",
            "consumer",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": ""}}),
            "invalid_payload",
            "consumer",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "c", "start": -1}}),
            "invalid_payload",
            "start",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "c", "start": "soon"}}),
            "invalid_payload",
            "soon",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "c", "ack_wait": "forever"}}),
            "invalid_payload",
            "ack_wait",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "c", "ack_wait": "0s"}}),
            "invalid_payload",
            "ack_wait",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "c", "max_deliver": 0}}),
            "invalid_payload",
            "max_deliver",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "c", "max_in_flight": -5}}),
            "invalid_payload",
            "-5",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "c", "filter": "a.>.b"}}),
            "invalid_pattern",
            "",
        ),
        (
            json!({"event": "$consume", "payload": {"stream": "orders", "consumer": "c", "maxinflight": 5}}),
            "invalid_payload",
            "maxinflight",
        ),
        (
            json!({"event": "$consume", "payload": "orders"}),
            "invalid_payload",
            "",
        ),
        (
            json!({"event": "$ack", "payload": {"consumer": "nobody", "seq": 1}}),
            "unknown_consumer",
            "nobody",
        ),
        (
            json!({"event": "$nack", "payload": {"consumer": "nobody", "seq": 1}}),
            "unknown_consumer",
            "nobody",
        ),
        (
            json!({"event": "$unconsume", "payload": {"consumer": "nobody"}}),
            "unknown_consumer",
            "nobody",
        ),
        (
            json!({"event": "$ack", "payload": {"consumer": "c", "seq": "1"}}),
            "invalid_payload",
            "seq",
        ),
        (
            json!({"event": "$ack", "payload": {"consumer": "c", "seq": -3}}),
            "invalid_payload",
            "seq",
        ),
        (
            json!({"event": "$ack", "payload": {"consumer": "c", "seq": []}}),
            "invalid_payload",
            "seq",
        ),
        (
            json!({"event": "$ack", "payload": {"consumer": "c", "seq": huge}}),
            "limit_exceeded",
            "20000",
        ),
        (
            json!({"event": "$nack", "payload": {"consumer": "c", "seq": 1, "delay": "later"}}),
            "invalid_payload",
            "delay",
        ),
    ];
    for (request, code, mentions) in &cases {
        client.send(line(request.clone())).await;
        let message = client.expect_error(code).await;
        assert!(message.contains(mentions), "{request}: {message}");
    }
    // Someone else's consumer: not_consuming, for acks, nacks and unconsume.
    let mut owner = hub.connect().await;
    start(
        &mut owner,
        json!({"stream": "orders", "consumer": "mine", "max_in_flight": 1}),
    )
    .await;
    assert_eq!(delivery(&mut owner).await["seq"], 1);
    for request in [
        json!({"event": "$ack", "payload": {"consumer": "mine", "seq": 1}}),
        json!({"event": "$nack", "payload": {"consumer": "mine", "seq": 1}}),
        json!({"event": "$unconsume", "payload": {"consumer": "mine"}}),
    ] {
        client.send(line(request.clone())).await;
        let frame = client.json().await;
        assert_eq!(
            frame["payload"]["code"], "not_consuming",
            "{request}: {frame}"
        );
        assert_eq!(frame["payload"]["consumer"], "mine", "{frame}");
    }
    // Settings that contradict the first ones.
    client
        .send(consume(
            json!({"stream": "orders", "consumer": "mine", "max_in_flight": 7}),
        ))
        .await;
    let message = client.expect_error("consumer_mismatch").await;
    assert!(message.contains("max_in_flight"), "{message}");
    // Acks for seqs not out: named, the rest applied.
    owner.send(ack("mine", json!([1, 99, 2]))).await;
    let message = owner.expect_error("invalid_payload").await;
    assert!(
        message.contains("99") && message.contains("1 applied"),
        "{message}"
    );
    // The connections still work, and nothing was lost: seq 2 comes next.
    assert_eq!(delivery(&mut owner).await["seq"], 2);
    client
        .send(line(json!({"event": "$ping", "payload": {}})))
        .await;
    assert_eq!(client.json().await["event"], "$pong");
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An ack for a delivery already acked (or redelivered meanwhile: a race a correct
/// client cannot see) is answered, but not counted against `--max-errors`; an ack for
/// a seq never delivered is.
#[tokio::test]
async fn a_repeated_ack_is_answered_but_not_held_against_the_client() {
    let dir = temp_dir("again");
    let mut strict = config(&dir);
    strict.limits.max_errors = 2;
    let hub = TestHub::start(strict).await;
    publish(&hub, "a", 3).await;
    let mut client = hub.connect().await;
    start(
        &mut client,
        json!({"stream": "orders", "consumer": "c", "max_in_flight": 1}),
    )
    .await;
    assert_eq!(delivery(&mut client).await["seq"], 1);
    client.send(ack("c", json!(1))).await;
    assert_eq!(delivery(&mut client).await["seq"], 2);
    for _ in 0..5 {
        client.send(ack("c", json!(1))).await;
        let message = client.expect_error("invalid_payload").await;
        assert!(message.contains("seq 1 not out"), "{message}");
    }
    // Still served: seq 2 is acked and seq 3 comes.
    client.send(ack("c", json!(2))).await;
    assert_eq!(delivery(&mut client).await["seq"], 3);
    // Seq 99 was never delivered: that is a broken client, and charged.
    for _ in 0..2 {
        client.send(ack("c", json!(99))).await;
        client.expect_error("invalid_payload").await;
    }
    client.send(ack("c", json!(99))).await;
    client.expect_error("invalid_payload").await;
    client.expect_error("too_many_errors").await;
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection holds at most 64 consumers: the 65th is refused, one it holds
/// already may be asked for again.
#[tokio::test]
async fn a_connection_holds_at_most_64_consumers() {
    let dir = temp_dir("held");
    let hub = TestHub::start(config(&dir)).await;
    let mut client = hub.connect().await;
    for i in 0..64 {
        start(
            &mut client,
            json!({"stream": "orders", "consumer": format!("c{i}")}),
        )
        .await;
    }
    client
        .send(consume(json!({"stream": "orders", "consumer": "c64"})))
        .await;
    let message = client.expect_error("limit_exceeded").await;
    assert!(message.contains("64 consumers"), "{message}");
    start(&mut client, json!({"stream": "orders", "consumer": "c0"})).await;
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without any declared stream, `$consume` says how to get one.
#[tokio::test]
async fn consuming_without_streams_says_how_to_declare_one() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    client
        .send(consume(json!({"stream": "orders", "consumer": "c"})))
        .await;
    let message = client.expect_error("unknown_stream").await;
    assert!(message.contains("--stream"), "{message}");
}

/// The client library: `consume()` yields deliveries to `ack()`; after the hub
/// restarts, the client consumes again by itself and gets what it had not acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_consumes_acks_and_resumes_after_a_restart() {
    use hubcast::client::{ClientError, ConsumeOptions, Reconnect};
    let dir = temp_dir("client");
    let mut hub = TestHub::start_keeping_port(config(&dir)).await;
    publish(&hub, "c", 3).await;
    let client = hubcast::Client::builder()
        .reconnect(Reconnect {
            initial_delay: Duration::from_millis(10),
            ..Reconnect::default()
        })
        .connect(hub.addr)
        .await
        .unwrap();
    let refused = client
        .consume(ConsumeOptions::new("nope", "x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, ClientError::Hub(e) if e.code == hubcast::ErrorCode::UnknownStream),
        "{refused:?}"
    );
    let mut orders = client
        .consume(ConsumeOptions::new("orders", "lib").max_in_flight(10))
        .await
        .unwrap();
    assert_eq!(orders.pending(), 3);
    let first = within(orders.next()).await.unwrap();
    assert_eq!((first.seq, first.attempt), (1, 1));
    assert_eq!(first.event.name().as_str(), "pickup");
    first.ack().await.unwrap();
    let second = within(orders.next()).await.unwrap();
    assert_eq!(second.seq, 2);
    let third = within(orders.next()).await.unwrap();
    assert_eq!(third.seq, 3);
    third.ack().await.unwrap();
    // Once the hub has applied the last ack, a clean stop keeps both.
    hub.wait_for(|e| {
        matches!(e, hubcast::HubEvent::Control { event, .. }
            if event.name().as_str() == "$ack" && event.payload().contains('3'))
    })
    .await;
    hub.begin_shutdown();
    hub.stopped().await;
    hub.hub.close_store();
    let hub = hub.successor(config(&dir));
    // Seq 2 was never acked: it comes again on the new connection.
    let again = within(orders.next()).await.unwrap();
    assert_eq!((again.seq, again.attempt), (2, 2));
    again.ack().await.unwrap();
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #12 (1): a publisher sends 20,000 events with ids while the hub is killed
/// with SIGKILL at 20 points and restarted on the same data directory; a consumer
/// acks as it goes (asking for `$acked`). At the end every confirmed id was
/// delivered, and no seq was delivered after its ack was confirmed durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_confirmed_is_lost_across_20_kill_9s() {
    const EVENTS: usize = 20_000;
    const KILLS: usize = 20;
    let dir = temp_dir("kill20");
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
    let mut hub = HubProcess::spawn(HubProcess::command(&args)).await;
    let (port_tx, port) = watch::channel(hub.port);
    let progress = Arc::new(Progress::default());
    let (confirmed_tx, mut confirmed_rx) = watch::channel(0usize);
    let publisher = tokio::spawn(publisher(
        port.clone(),
        EVENTS,
        Arc::clone(&progress),
        confirmed_tx,
    ));
    let consumer = tokio::spawn(consumer(port.clone(), Arc::clone(&progress)));
    let deadline = Duration::from_secs(240);
    let started = Instant::now();
    for kill in 0..KILLS {
        // A point somewhere in this twentieth of the run.
        let step = EVENTS / (KILLS + 1);
        let at = step * kill + fastrand::usize(step / 4..step);
        tokio::time::timeout(deadline, confirmed_rx.wait_for(|&n| n >= at))
            .await
            .expect("the publisher stalled")
            .unwrap();
        hub.kill9().await;
        hub = HubProcess::spawn(HubProcess::command(&args)).await;
        port_tx.send_replace(hub.port);
    }
    tokio::time::timeout(deadline, publisher)
        .await
        .expect("the publisher did not finish")
        .unwrap();
    // Every confirmed id reaches the consumer.
    let confirmed = progress.confirmed.lock().unwrap().clone();
    assert_eq!(confirmed.len(), EVENTS);
    let mut seen = progress.seen.subscribe();
    tokio::time::timeout(deadline, async {
        loop {
            let missing = {
                let received = progress.received.lock().unwrap();
                confirmed
                    .iter()
                    .filter(|id| !received.contains(*id))
                    .count()
            };
            if missing == 0 {
                break;
            }
            seen.changed().await.unwrap();
        }
    })
    .await
    .expect("confirmed events never reached the consumer");
    consumer.abort();
    let violations = progress.violations.lock().unwrap().clone();
    assert!(
        violations.is_empty(),
        "delivered again after a durable ack: {violations:?}"
    );
    let deliveries = *progress.deliveries.lock().unwrap();
    eprintln!(
        "kill -9 x{KILLS}: {EVENTS} confirmed, {deliveries} deliveries ({} redelivered), {:?}",
        deliveries - EVENTS,
        started.elapsed()
    );
    hub.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Default)]
struct Progress {
    confirmed: Mutex<HashSet<String>>,
    received: Mutex<HashSet<String>>,
    /// Seqs whose ack the hub confirmed durable (`$acked`).
    acked: Mutex<HashSet<u64>>,
    violations: Mutex<Vec<u64>>,
    deliveries: Mutex<usize>,
    seen: watch::Sender<u64>,
}

/// Connects to whichever hub is up now, trying until one answers.
async fn reconnect(port: &watch::Receiver<u16>) -> TcpStream {
    loop {
        let now = *port.borrow();
        if let Ok(stream) = TcpStream::connect(("127.0.0.1", now)).await {
            return stream;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends `events` pickups with ids, 500 unconfirmed at most, resending the
/// unconfirmed after each reconnect, until every one is confirmed.
async fn publisher(
    port: watch::Receiver<u16>,
    events: usize,
    progress: Arc<Progress>,
    confirmed_tx: watch::Sender<usize>,
) {
    let mut unconfirmed: BTreeSet<usize> = BTreeSet::new();
    let mut next = 0;
    let mut done = 0;
    let frame =
        |n: usize| line(json!({"event": "pickup", "payload": {"n": n}, "id": format!("e-{n}")}));
    while done < events {
        let (read, mut write) = reconnect(&port).await.into_split();
        let mut lines = BufReader::new(read).lines();
        let resend: String = unconfirmed.iter().map(|&n| frame(n)).collect();
        if write.write_all(resend.as_bytes()).await.is_err() {
            continue;
        }
        loop {
            let mut batch = String::new();
            while unconfirmed.len() < 500 && next < events {
                batch.push_str(&frame(next));
                unconfirmed.insert(next);
                next += 1;
            }
            if !batch.is_empty() && write.write_all(batch.as_bytes()).await.is_err() {
                break;
            }
            let Ok(Some(text)) = lines.next_line().await else {
                break;
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["event"] != "$stored" {
                continue; // a storage error: resent after the next reconnect
            }
            let id = frame["payload"]["id"].as_str().unwrap().to_string();
            let n: usize = id[2..].parse().unwrap();
            if unconfirmed.remove(&n) {
                progress.confirmed.lock().unwrap().insert(id);
                done += 1;
                confirmed_tx.send_replace(done);
            }
            if done == events {
                break;
            }
        }
    }
}

/// Consumes `orders` as `c1`, acking each batch read with `confirm`; records what it
/// got and any seq delivered after its ack was confirmed.
async fn consumer(port: watch::Receiver<u16>, progress: Arc<Progress>) {
    loop {
        let (read, mut write) = reconnect(&port).await.into_split();
        let request = consume(
            json!({"stream": "orders", "consumer": "c1", "max_in_flight": 2000, "ack_wait": "60s"}),
        );
        if write.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        let mut reader = BufReader::new(read);
        let mut to_ack = Vec::new();
        loop {
            let mut text = String::new();
            match reader.read_line(&mut text).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let frame: Value = serde_json::from_str(&text).unwrap();
            match frame["event"].as_str() {
                // (A live pickup, heard before `$consume` took effect, has no seq.)
                Some("pickup") if frame.get("seq").is_some() => {
                    let seq = frame["seq"].as_u64().unwrap();
                    if progress.acked.lock().unwrap().contains(&seq) {
                        progress.violations.lock().unwrap().push(seq);
                    }
                    *progress.deliveries.lock().unwrap() += 1;
                    let id = frame["id"].as_str().unwrap().to_string();
                    progress.received.lock().unwrap().insert(id);
                    progress.seen.send_modify(|n| *n += 1);
                    to_ack.push(seq);
                }
                Some("$acked") => {
                    let mut acked = progress.acked.lock().unwrap();
                    for seq in frame["payload"]["seq"].as_array().unwrap() {
                        acked.insert(seq.as_u64().unwrap());
                    }
                }
                _ => {}
            }
            if reader.buffer().is_empty() && !to_ack.is_empty() {
                let request = line(
                    json!({"event": "$ack", "payload": {"consumer": "c1", "seq": to_ack, "confirm": true}}),
                );
                to_ack.clear();
                if write.write_all(request.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// `hubcast sub --durable`: prints what is stored (also what came while it was not
/// running) and acknowledges it once printed, so a second run prints only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_durable_prints_and_acks_so_a_second_run_resumes() {
    let dir = temp_dir("sub");
    let hub = TestHub::start(config(&dir)).await;
    publish(&hub, "s", 3).await;
    let port = hub.addr.port().to_string();
    let sub = || {
        let mut cmd = HubProcess::command(&[
            "sub",
            "--port",
            &port,
            "--durable",
            "printer",
            "--stream",
            "orders",
        ]);
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        cmd.spawn().unwrap()
    };
    let read =
        |child: &mut tokio::process::Child| BufReader::new(child.stdout.take().unwrap()).lines();
    let mut first = sub();
    let mut lines = read(&mut first);
    for n in 0..3 {
        let text = within(lines.next_line()).await.unwrap().unwrap();
        let event: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event["id"], format!("s-{n}"));
        assert_eq!(event["seq"], n + 1);
    }
    // Printed, then acknowledged: wait for the hub to have the ack of the last.
    hub.wait_for(|e| {
        matches!(e, hubcast::HubEvent::Control { event, .. }
            if event.name().as_str() == "$ack" && event.payload().contains('3'))
    })
    .await;
    first.kill().await.unwrap();
    publish(&hub, "t", 2).await;
    let mut second = sub();
    let mut lines = read(&mut second);
    for n in 0..2 {
        let text = within(lines.next_line()).await.unwrap().unwrap();
        let event: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event["id"], format!("t-{n}"), "{text}");
    }
    second.kill().await.unwrap();
    // A stream the hub does not have: one clear line, exit 1.
    let output = within(
        HubProcess::command(&[
            "sub",
            "--port",
            &port,
            "--no-reconnect",
            "--durable",
            "x",
            "--stream",
            "nope",
        ])
        .output(),
    )
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no stream is named \"nope\""), "{stderr}");
    // --durable without --stream is a usage error.
    let output = within(HubProcess::command(&["sub", "--durable", "x"]).output())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue #12 (2): a torn write at the end of a stream and of the consumer log (as a
/// crash mid-write leaves them) is cut back to the last whole record when the real hub
/// starts; it says what it cut, serves, and the stream and consumer go on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_store_tail_is_cut_reported_and_the_hub_goes_on() {
    use std::io::Write;
    let dir = temp_dir("torn");
    let data_dir = dir.display().to_string();
    let args = [
        "serve",
        "--port",
        "0",
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
    for n in 0..3 {
        let event = json!({"event": "pickup", "payload": n, "id": format!("t-{n}")});
        write.write_all(line(event).as_bytes()).await.unwrap();
        let frame: Value =
            serde_json::from_str(&within(lines.next_line()).await.unwrap().unwrap()).unwrap();
        assert_eq!(frame["event"], "$stored");
    }
    let request =
        json!({"event": "$ack", "payload": {"consumer": "c", "seq": [1], "confirm": true}});
    write
        .write_all(consume(json!({"stream": "orders", "consumer": "c"})).as_bytes())
        .await
        .unwrap();
    let mut seen = 0;
    while seen < 4 {
        within(lines.next_line()).await.unwrap().unwrap();
        seen += 1; // $consuming and three deliveries
    }
    write.write_all(line(request).as_bytes()).await.unwrap();
    let acked: Value =
        serde_json::from_str(&within(lines.next_line()).await.unwrap().unwrap()).unwrap();
    assert_eq!(acked["event"], "$acked");
    drop(write);
    hub.kill9().await;
    // Half a record at the end of each log.
    for sub in ["streams/orders", "consumers/streams/consumers"] {
        let segment = std::fs::read_dir(dir.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&segment)
            .unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap();
    }
    let mut hub = HubProcess::spawn(HubProcess::command(&args)).await;
    hub.wait_log("store repaired on open", 2).await;
    assert!(
        hub.log_contains("stream orders: cut 9 bytes after seq 3"),
        "{:?}",
        hub.lines
    );
    let mut client = TcpStream::connect(("127.0.0.1", hub.port)).await.unwrap();
    client
        .write_all(line(json!({"event": "pickup", "payload": 3, "id": "t-3"})).as_bytes())
        .await
        .unwrap();
    client
        .write_all(consume(json!({"stream": "orders", "consumer": "c"})).as_bytes())
        .await
        .unwrap();
    let mut reader = BufReader::new(client).lines();
    let mut frames = Vec::new();
    while frames.len() < 5 {
        let text = within(reader.next_line()).await.unwrap().unwrap();
        frames.push(serde_json::from_str::<Value>(&text).unwrap());
    }
    let stored = frames.iter().find(|f| f["event"] == "$stored").unwrap();
    assert_eq!(
        stored["payload"]["seq"], 4,
        "the stream goes on after seq 3"
    );
    let mut delivered: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    delivered.sort_unstable();
    // Seq 1 was acked (durably) before the crash: 2 and 3 again, and 4.
    assert_eq!(delivered, [2, 3, 4]);
    hub.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A member that never reads is given no more than half its queue's room (plus
/// what its socket buffers take), and is skipped after that: it is not cut as a slow
/// consumer for a burst the hub chose to send, and it does not hold up the member that
/// reads. When it goes, what it held goes to the reader. (Found by hand: with
/// `max_in_flight` 1,000 and 100 KB events both members were cut at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_reads_neither_is_cut_nor_holds_up_the_others() {
    const EVENTS: usize = 300;
    let dir = temp_dir("stuck");
    let mut cfg = config(&dir);
    cfg.limits.max_pending = 2 << 20;
    let hub = TestHub::start(cfg).await;
    let mut publisher = hub.connect().await;
    let pad = "x".repeat(50_000);
    for n in 0..EVENTS {
        let event = json!({"event": "pickup", "payload": pad, "id": format!("big-{n}")});
        publisher.send(line(event)).await;
        assert_eq!(publisher.json().await["event"], "$stored");
    }
    let settings =
        json!({"stream": "orders", "consumer": "q", "max_in_flight": 1000, "ack_wait": "60s"});
    let mut stuck = hub.connect_small_window().await;
    stuck.send(consume(settings.clone())).await;
    let mut reader = hub.connect().await;
    start(&mut reader, settings).await;
    // The stuck member can hold 1 MiB of queue and what its socket buffers take (a few
    // MB on loopback): about 100 of these at most. The reader gets the other 200 while
    // it is still connected, then, once it has gone, the rest.
    let mut got = BTreeSet::new();
    let mut again = 0;
    let mut stuck = Some(stuck);
    while got.len() < EVENTS {
        let d = delivery(&mut reader).await;
        let seq = d["seq"].as_u64().unwrap();
        assert!(got.insert(seq), "seq {seq} twice");
        reader.send(ack("q", json!(seq))).await;
        if d["attempt"] != 1 {
            again += 1;
        }
        if got.len() == EVENTS / 2 {
            drop(stuck.take());
        }
    }
    assert!(again < EVENTS / 2, "the stuck member held {again}");
    assert!(
        hub.events_matching(|e| matches!(e, hubcast::HubEvent::SlowConsumer { .. }))
            .is_empty(),
        "nobody is cut as a slow consumer"
    );
    hub.hub.close_store();
    let _ = std::fs::remove_dir_all(&dir);
}
