//! Delivery under pressure: slow consumers and graceful shutdown.

use std::time::Duration;

use hubcast::{CloseReason, Config, HubEvent};
use serde_json::json;
use tokio::sync::watch;

use crate::support::{event, within, TestHub};

const READERS: usize = 10;
const EVENTS: usize = 100_000;
/// How far the publisher may run ahead of the slowest reader: well under the queue limit.
const WINDOW: usize = 2_000;

/// Issue #2: one client that stops reading is disconnected as a slow consumer while ten
/// readers that keep up receive every one of 100,000 events, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_cut_off_while_ten_readers_get_everything() {
    let config = Config::builder()
        .max_frame(64 << 10)
        .max_pending(1 << 20)
        .echo(false)
        // The slow client reads only after the readers finish; until then the hub keeps
        // trying to hand it the final `$error`.
        .drain_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let hub = TestHub::start_with(config, false).await;
    let mut slow = hub.connect_small_window().await;
    let mut progress = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let mut client = hub.connect().await;
        let (tx, rx) = watch::channel(0usize);
        progress.push(rx);
        readers.push(tokio::spawn(async move {
            for i in 0..EVENTS {
                let frame = client.json().await;
                assert_eq!(frame["payload"]["seq"], i, "lost or reordered");
                if i % 500 == 499 {
                    tx.send_replace(i + 1);
                }
            }
            client
        }));
    }
    let mut publisher = hub.connect().await;
    let padding = "x".repeat(100);
    for start in (0..EVENTS).step_by(1_000) {
        // Flow control: stay within WINDOW events of every reader.
        for rx in &mut progress {
            within(rx.wait_for(|&done| done + WINDOW >= start))
                .await
                .unwrap();
        }
        let chunk: String = (start..start + 1_000)
            .map(|seq| event("tick", json!({"seq": seq, "pad": padding})))
            .collect();
        publisher.send(chunk).await;
    }
    let mut done = Vec::new();
    for reader in readers {
        done.push(within(reader).await.unwrap());
    }
    // Nothing beyond the 100,000 events: the slow consumer's error went to it alone.
    publisher.send(event("end", json!(null))).await;
    for client in &mut done {
        assert_eq!(client.json().await["event"], "end");
    }
    hub.wait_for(|e| matches!(e, HubEvent::SlowConsumer { client } if *client == slow.id))
        .await;
    // The slow client finally reads: events (a prefix, in order), then the reason, then EOF.
    let mut last = String::new();
    while let Some(line) = slow.try_line().await {
        last = line;
    }
    assert!(last.contains("slow_consumer"), "last line was {last:?}");
    assert_eq!(
        hub.wait_close(slow.id).await,
        (true, CloseReason::SlowConsumer)
    );
    assert_eq!(hub.hub.stats().slow_consumers, 1);
    assert_eq!(hub.hub.clients(), READERS + 1);
}

/// Issue #2: on shutdown, whatever the hub accepted is still delivered before it closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_delivers_what_was_queued() {
    let config = Config::builder().echo(false).build().unwrap();
    let mut hub = TestHub::start_with(config, true).await;
    let mut reader = hub.connect_small_window().await;
    let mut publisher = hub.connect().await;
    let padding = "y".repeat(1_000);
    let burst: String = (0..3_000)
        .map(|seq| event("bulk", json!({"seq": seq, "pad": padding})))
        .collect();
    publisher.send(burst).await;
    hub.wait_accepted(3_000).await;
    // The reader has not read a byte: megabytes wait in the hub's queue for it.
    hub.begin_shutdown();
    for seq in 0..3_000 {
        assert_eq!(reader.json().await["payload"]["seq"], seq);
    }
    reader.expect_eof().await;
    hub.stopped().await;
    assert_eq!(
        hub.wait_close(reader.id).await,
        (false, CloseReason::Shutdown)
    );
    hub.wait_for(|e| matches!(e, HubEvent::Shutdown)).await;
    // Nothing can connect any more.
    assert!(tokio::net::TcpStream::connect(hub.addr).await.is_err());
}
