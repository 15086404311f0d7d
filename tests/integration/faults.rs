//! Limits and faults (issue #5): the hub keeps serving everyone else.

use std::time::Duration;

use hubcast::{CloseReason, Config, ConnectionLimit, HubEvent, SlowConsumerPolicy};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::{event, within, HubProcess, TestHub};

/// Sends an event from `from` and checks that `to` hears it: the hub still works.
async fn still_serving(hub: &TestHub, tag: &str) {
    let mut from = hub.connect().await;
    let mut to = hub.connect().await;
    from.send(event("alive", json!(tag))).await;
    assert_eq!(to.json().await["payload"], tag);
}

#[tokio::test]
async fn connections_over_the_limit_are_told_and_closed() {
    let hub = TestHub::start(Config::builder().max_connections(3).build().unwrap()).await;
    let mut a = hub.connect().await;
    let mut b = hub.connect().await;
    let c = hub.connect().await;
    let extra = TcpStream::connect(hub.addr).await.unwrap();
    let mut lines = BufReader::new(extra).lines();
    let refusal = within(lines.next_line()).await.unwrap().unwrap();
    assert!(refusal.contains("too_many_connections"), "{refusal}");
    assert_eq!(within(lines.next_line()).await.unwrap(), None);
    hub.wait_for(|e| {
        matches!(
            e,
            HubEvent::Refused {
                limit: ConnectionLimit::Total,
                ..
            }
        )
    })
    .await;
    // The three already in are unaffected.
    a.send(event("x", json!(1))).await;
    assert_eq!(b.json().await["event"], "x");
    assert_eq!(hub.hub.stats().refused, 1);
    // A slot frees up when one leaves.
    let c_id = c.id;
    drop(c);
    hub.wait_close(c_id).await;
    let mut d = hub.connect().await;
    a.send(event("y", json!(2))).await;
    assert_eq!(d.json().await["event"], "y");
}

#[tokio::test]
async fn the_error_budget_tolerates_ten_bad_frames_and_closes_on_the_eleventh() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    client.send("bad\n".repeat(10)).await;
    for _ in 0..10 {
        client.expect_error("invalid_json").await;
    }
    client.send(event("fine", json!(1))).await;
    assert_eq!(client.json().await["event"], "fine");
    client.send("bad\n").await;
    client.expect_error("invalid_json").await;
    client.expect_error("too_many_errors").await;
    client.expect_eof().await;
    let (_, reason) = hub.wait_close(client.id).await;
    assert_eq!(
        reason,
        CloseReason::Protocol(hubcast::ErrorCode::TooManyErrors)
    );
    still_serving(&hub, "after the garbage").await;
}

/// `--slow-consumer drop`: the slow client stays, misses what did not fit, and is told
/// exactly how many it missed, at the gap: nothing is dropped silently. (The soak found
/// the first version placing the notice after later events.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drop_policy_keeps_the_client_and_accounts_for_every_event() {
    let hub = TestHub::start_with(
        Config::builder()
            .max_frame(16 << 10)
            .max_pending(64 << 10)
            .slow_consumer(SlowConsumerPolicy::Drop)
            .echo(false)
            .build()
            .unwrap(),
        true,
    )
    .await;
    let mut slow = hub.connect_small_window().await;
    let mut publisher = hub.connect().await;
    let padding = "z".repeat(1000);
    let burst: String = (0..3000)
        .map(|seq| event("bulk", json!({"seq": seq, "pad": padding})))
        .collect();
    publisher.send(burst).await;
    hub.wait_accepted(3000).await;
    // Each notice stands exactly where its gap is: the next event's seq skips `count`.
    let (mut received, mut dropped, mut next_seq) = (0u64, 0u64, 0u64);
    while received + dropped < 3000 {
        let frame = slow.json().await;
        if frame["event"] == "$error" {
            assert_eq!(frame["payload"]["code"], "events_dropped", "{frame}");
            let count = frame["payload"]["count"].as_u64().unwrap();
            dropped += count;
            next_seq += count;
        } else {
            let seq = frame["payload"]["seq"].as_u64().unwrap();
            assert_eq!(
                seq, next_seq,
                "a gap without a notice, or a notice in the wrong place"
            );
            next_seq += 1;
            received += 1;
        }
    }
    assert!(dropped > 0, "the test must overflow the queue");
    assert_eq!(received + dropped, 3000);
    assert_eq!(hub.hub.stats().dropped, dropped);
    assert_eq!(hub.hub.clients(), 2, "the slow client is still connected");
}

#[tokio::test]
async fn a_client_killed_mid_frame_or_reset_leaves_no_trace() {
    let hub = TestHub::start(Config::default()).await;
    let mut half = hub.connect().await;
    half.send(r#"{"event":"pickup","payload":{"sto"#).await;
    let half_id = half.id;
    drop(half);
    hub.wait_close(half_id).await;

    let reset = hub.connect().await;
    let reset_id = reset.id;
    let stream = reset.reader.into_inner().reunite(reset.writer).unwrap();
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream); // linger 0: the kernel sends RST, not FIN
    hub.wait_close(reset_id).await;
    hub.wait_clients(0).await;
    still_serving(&hub, "after the crashes").await;
    assert!(hub
        .events_matching(|e| matches!(e, HubEvent::Event { .. }))
        .iter()
        .all(|e| matches!(e, HubEvent::Event { event, .. } if event.name().as_str() == "alive")));
}

#[tokio::test]
async fn a_silent_peer_is_closed_by_the_idle_timeout() {
    let hub = TestHub::start(
        Config::builder()
            .idle_timeout(Some(Duration::from_millis(200)))
            .build()
            .unwrap(),
    )
    .await;
    let mut silent = hub.connect().await;
    silent.expect_error("idle_timeout").await;
    silent.expect_eof().await;
    let (had_error, reason) = hub.wait_close(silent.id).await;
    assert!(had_error, "{reason:?}");
}

#[tokio::test]
async fn a_client_that_never_sends_stays_and_hears_everything() {
    let hub = TestHub::start(Config::default()).await;
    let mut mute = hub.connect().await;
    for round in 0..3 {
        still_serving(&hub, &format!("round {round}")).await;
    }
    for round in 0..3 {
        assert_eq!(mute.json().await["payload"], format!("round {round}"));
    }
    assert!(hub.hub.client_ids().contains(&mute.id));
}

/// Also a regression test: with the default listen backlog of 128, about a tenth of
/// these were silently lost (issue #5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_connecting_at_once_all_get_served() {
    // Each connection here costs two descriptors: the client's and the hub's.
    rlimit::increase_nofile_limit(4096).unwrap();
    let hub = TestHub::start_with(Config::default(), false).await;
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let addr = hub.addr;
        connecting.spawn(async move { TcpStream::connect(addr).await.unwrap() });
    }
    let mut clients = Vec::new();
    while let Some(stream) = connecting.join_next().await {
        clients.push(BufReader::new(stream.unwrap()));
    }
    hub.wait_clients(1000).await;
    let reached = hub
        .hub
        .broadcast(&hubcast::Event::new("all", &"hands").unwrap());
    assert_eq!(reached, 1000);
    for client in &mut clients {
        let mut line = String::new();
        within(client.read_line(&mut line)).await.unwrap();
        assert_eq!(line, "{\"event\":\"all\",\"payload\":\"hands\"}\n");
    }
    drop(clients);
    hub.wait_clients(0).await;
}

/// Descriptor exhaustion: a hub limited to 48 open files keeps serving the clients it
/// has while accept fails, and recovers once descriptors free up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_survives_running_out_of_descriptors() {
    let exe = env!("CARGO_BIN_EXE_hubcast");
    let mut shell = tokio::process::Command::new("bash");
    shell.args([
        "-c",
        &format!("ulimit -n 48 && exec '{exe}' serve --port 0 --quiet"),
    ]);
    let mut hub = HubProcess::spawn(shell).await;
    let port = hub.port;
    let connect = || async move { TcpStream::connect(("127.0.0.1", port)).await.unwrap() };
    // Two clients the hub has (each proven by a `$ping` round trip: a finished TCP
    // handshake does not mean the hub has accepted yet), then far more than its
    // descriptors allow.
    let (mut talker, mut listener) = (connect().await, BufReader::new(connect().await));
    for client in [&mut talker, listener.get_mut()] {
        client
            .write_all(b"{\"event\":\"$ping\",\"payload\":null}\n")
            .await
            .unwrap();
    }
    let mut talker_lines = BufReader::new(&mut talker);
    let mut pong = String::new();
    within(talker_lines.read_line(&mut pong)).await.unwrap();
    pong.clear();
    within(listener.read_line(&mut pong)).await.unwrap();
    assert!(pong.contains("$pong"), "{pong}");
    let mut crowd = Vec::new();
    for _ in 0..80 {
        crowd.push(connect().await);
    }
    hub.wait_log("accept failed", 1).await;
    let failure = hub
        .lines
        .iter()
        .find(|l| l.contains("accept failed"))
        .unwrap();
    assert!(failure.contains("Too many open files"), "{failure}");
    // Existing clients are still served while accept fails.
    talker
        .write_all(event("during", json!(1)).as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    loop {
        line.clear();
        within(listener.read_line(&mut line)).await.unwrap();
        if line.contains("during") {
            break;
        }
    }
    // Free the descriptors: the hub recovers and serves new clients.
    drop(crowd);
    let mut late = BufReader::new(connect().await);
    within(async {
        let mut late_line = String::new();
        loop {
            // Until the hub has accepted `late`, these go to the others only.
            talker
                .write_all(event("after", json!(2)).as_bytes())
                .await
                .unwrap();
            late_line.clear();
            let read =
                tokio::time::timeout(Duration::from_millis(500), late.read_line(&mut late_line))
                    .await;
            if matches!(read, Ok(Ok(n)) if n > 0) && late_line.contains("after") {
                return;
            }
        }
    })
    .await;
    assert!(hub.is_running(), "the hub must still be running");
}

/// SIGTERM while 100 clients receive a stream: every event the hub accepted before the
/// signal reaches every client still reading, then the hub exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_stream_delivers_everything_accepted_to_every_reader() {
    let mut hub = HubProcess::spawn(HubProcess::command(&[
        "serve",
        "--port",
        "0",
        "--no-echo",
        "--quiet",
    ]))
    .await;
    let port = hub.port;
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0u64);
    let mut readers = tokio::task::JoinSet::new();
    for r in 0..100 {
        let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let progress_tx = progress_tx.clone();
        readers.spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            let mut next = 0u64;
            while let Ok(Some(line)) = lines.next_line().await {
                let seq: u64 = line
                    .trim_start_matches(r#"{"event":"n","payload":"#)
                    .trim_end_matches('}')
                    .parse()
                    .unwrap_or_else(|_| panic!("reader {r}: unexpected line {line}"));
                assert_eq!(seq, next, "reader {r}: a gap in the stream");
                next += 1;
                if r == 0 {
                    progress_tx.send_replace(next);
                }
            }
            next
        });
    }
    // All 100 readers are in the pool before the stream starts.
    hub.wait_log("connection client", 100).await;
    let mut publisher = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let publishing = tokio::spawn(async move {
        let mut seq = 0u64;
        // A paced stream (about 4,000 events/s, 400,000 deliveries/s), bounded.
        while seq < 1_000_000 {
            let batch: String = (seq..seq + 20)
                .map(|i| format!(r#"{{"event":"n","payload":{i}}}"#))
                .collect();
            if publisher.write_all(batch.as_bytes()).await.is_err() {
                break;
            }
            seq += 20;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    within(progress.wait_for(|&n| n >= 1000)).await.unwrap();
    let log_lines = hub.stop().await;
    let mut counts = Vec::new();
    while let Some(count) = within(readers.join_next()).await {
        counts.push(count.unwrap());
    }
    publishing.abort();
    let totals = log_lines
        .iter()
        .find(|l| l.contains("totals"))
        .expect("no totals line");
    let accepted: u64 = totals
        .split("events=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("events=N in the totals line");
    assert!(accepted >= 1000, "{totals}");
    assert!(
        counts.iter().all(|&c| c == accepted),
        "the hub accepted {accepted} events; readers got {:?}",
        counts
            .iter()
            .filter(|&&c| c != accepted)
            .take(5)
            .collect::<Vec<_>>()
    );
}

/// Issue #11 (8): a refused client that had already sent something could lose the
/// `too_many_connections` line to a reset (the hub closed with its bytes unread). The
/// hub now shuts down its side and lets the client read the line before it closes.
#[tokio::test]
async fn a_refused_client_that_already_sent_still_reads_why() {
    let hub = TestHub::start(Config::builder().max_connections(1).build().unwrap()).await;
    let _inside = hub.connect().await;
    for _ in 0..20 {
        let mut extra = TcpStream::connect(hub.addr).await.unwrap();
        // Class-style: write at once, read later.
        let _ = extra.write_all(&[b'x'; 4096]).await;
        hub.wait_for(|e| matches!(e, HubEvent::Refused { .. }))
            .await;
        let mut lines = BufReader::new(extra).lines();
        let refusal = within(lines.next_line()).await;
        let refusal = refusal.unwrap_or_else(|e| panic!("the refusal was lost: {e}"));
        assert!(
            refusal
                .as_deref()
                .is_some_and(|l| l.contains("too_many_connections")),
            "{refusal:?}"
        );
    }
}
