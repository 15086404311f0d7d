//! The pool: joining, leaving, broadcast to everyone, echo.

use hubcast::{CloseReason, Config, Event};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::{event, within, TestHub};

#[tokio::test]
async fn clients_join_on_connect_and_leave_on_close() {
    let hub = TestHub::start(Config::default()).await;
    let a = hub.connect().await;
    let b = hub.connect().await;
    let c = hub.connect().await;
    assert_eq!(hub.hub.clients(), 3);
    assert_eq!(hub.hub.client_ids(), vec![a.id, b.id, c.id]);
    let b_id = b.id;
    drop(b);
    assert_eq!(hub.wait_close(b_id).await, (false, CloseReason::PeerClosed));
    hub.wait_clients(2).await;
    assert_eq!(hub.hub.client_ids(), vec![a.id, c.id]);
}

/// Issue #2: 10,000 connect/disconnect cycles leave the pool empty. Each cycle proves
/// it was in the pool (its own event comes back) before it disconnects, half of them
/// cleanly and half abruptly, with events from the others still unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_come_and_go_without_a_leak() {
    let hub = TestHub::start_with(Config::default(), false).await;
    let addr = hub.addr;
    let mut tasks = Vec::new();
    for worker in 0..4 {
        tasks.push(tokio::spawn(async move {
            for i in 0..2_500 {
                let stream = TcpStream::connect(addr).await.unwrap();
                let (read, mut write) = stream.into_split();
                let mine = event("cycle", json!([worker, i]));
                write.write_all(mine.as_bytes()).await.unwrap();
                let mut lines = BufReader::new(read).lines();
                while lines.next_line().await.unwrap().as_deref() != Some(mine.as_str()) {}
                if i % 2 == 0 {
                    write.shutdown().await.unwrap();
                }
            }
        }));
    }
    for task in tasks {
        within(task).await.unwrap();
    }
    hub.wait_clients(0).await;
    // Every cycle was registered (ids are handed out in order of joining).
    let probe = hub.connect().await;
    assert_eq!(probe.id.0, 10_001);
    assert_eq!(hub.hub.stats().events, 10_000);
}

#[tokio::test]
async fn every_client_hears_every_event_including_the_sender() {
    let hub = TestHub::start(Config::default()).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(hub.connect().await);
    }
    clients[2]
        .send(event("pickup", json!({"orderID": 1})))
        .await;
    for client in &mut clients {
        assert_eq!(
            client.json().await,
            json!({"event": "pickup", "payload": {"orderID": 1}})
        );
    }
}

#[tokio::test]
async fn no_echo_leaves_the_sender_out() {
    let hub = TestHub::start(Config::builder().echo(false).build().unwrap()).await;
    let mut sender = hub.connect().await;
    let mut other = hub.connect().await;
    sender.send(event("one", json!(1))).await;
    assert_eq!(other.json().await["event"], "one");
    // The sender's next line is the answer to the next thing it sends, not its echo.
    other.send(event("two", json!(2))).await;
    assert_eq!(sender.json().await["event"], "two");
}

#[tokio::test]
async fn embedding_code_can_send_to_one_client_or_to_all() {
    let hub = TestHub::start(Config::default()).await;
    let mut a = hub.connect().await;
    let mut b = hub.connect().await;
    let greeting = Event::new("greeting", &json!({"text": "welcome"})).unwrap();
    hub.hub.send_to(b.id, &greeting).unwrap();
    assert_eq!(b.json().await["event"], "greeting");
    assert_eq!(hub.hub.broadcast(&Event::new("news", &1).unwrap()), 2);
    assert_eq!(
        a.json().await["event"],
        "news",
        "a got the greeting meant for b"
    );
    assert_eq!(b.json().await["event"], "news");
    assert!(hub.hub.send_to(hubcast::ClientId(999), &greeting).is_err());
}

#[tokio::test]
async fn events_from_one_sender_arrive_in_order() {
    let hub = TestHub::start(Config::default()).await;
    let mut sender = hub.connect().await;
    let mut receiver = hub.connect().await;
    let stream: String = (0..5_000).map(|i| event("n", json!(i)) + "\n").collect();
    sender.send(stream).await;
    for i in 0..5_000 {
        assert_eq!(receiver.json().await["payload"], i);
    }
}
