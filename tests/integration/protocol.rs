//! Wire protocol v1: framing, forwarding, and every `$error` code.

use hubcast::{Config, HubEvent};
use serde_json::json;

use crate::support::{event, TestHub};

const THREE: &str = concat!(
    r#"{"event":"a","payload":{"text":"brace } and quote \" inside"}}"#,
    r#"{"event":"b","payload":[1,{"c":2}],"extra":true}"#,
    "\n",
    r#"{"payload":null,"event":"c"}"#
);

fn three_lines() -> Vec<String> {
    vec![
        r#"{"event":"a","payload":{"text":"brace } and quote \" inside"}}"#.to_string(),
        r#"{"event":"b","payload":[1,{"c":2}],"extra":true}"#.to_string(),
        r#"{"payload":null,"event":"c"}"#.to_string(),
    ]
}

#[tokio::test]
async fn a_stream_split_at_every_offset_yields_the_same_three_events() {
    let hub = TestHub::start(Config::default()).await;
    for cut in 0..=THREE.len() {
        let mut client = hub.connect().await;
        client.send(&THREE.as_bytes()[..cut]).await;
        client.send(&THREE.as_bytes()[cut..]).await;
        for expected in three_lines() {
            assert_eq!(client.line().await, expected, "split at byte {cut}");
        }
    }
}

#[tokio::test]
async fn objects_with_no_delimiter_are_separate_events() {
    let hub = TestHub::start(Config::default()).await;
    let mut sender = hub.connect().await;
    let mut listener = hub.connect().await;
    // What `socket.write(JSON.stringify(msg))` in a loop produces.
    let burst: String = (0..50).map(|i| event("tick", json!(i))).collect();
    sender.send(burst).await;
    for i in 0..50 {
        let frame = listener.json().await;
        assert_eq!(frame, json!({"event": "tick", "payload": i}));
    }
}

#[tokio::test]
async fn whitespace_crlf_and_multiline_objects_are_accepted_and_compacted() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    client
        .send(" \t{\"event\":\"a\",\"payload\":1}\r\n\r\n{\n  \"event\": \"b\",\n  \"payload\": {\"s\": \"two words\"}\n}\n")
        .await;
    assert_eq!(client.line().await, r#"{"event":"a","payload":1}"#);
    assert_eq!(
        client.line().await,
        r#"{"event":"b","payload":{"s":"two words"}}"#
    );
}

#[tokio::test]
async fn events_are_forwarded_byte_for_byte() {
    let hub = TestHub::start(Config::default()).await;
    let mut sender = hub.connect().await;
    let mut listener = hub.connect().await;
    let original =
        r#"{ "payload" : { "b":2, "a":1 }, "id": 7, "event" : "caf\u00e9", "ünï": "çødé" }"#;
    sender.send(format!("{original}\n")).await;
    assert_eq!(listener.line().await, original);
    let seen = hub.wait_for(|e| matches!(e, HubEvent::Event { .. })).await;
    let HubEvent::Event {
        event, receivers, ..
    } = seen
    else {
        unreachable!()
    };
    assert_eq!(event.name().as_str(), "café");
    assert_eq!(receivers, 2);
}

/// Sends `bad` and checks: the sender gets `$error` `code`, the connection goes on,
/// and the other client never sees the bad frame.
async fn rejected_but_connection_survives(bad: &[u8], code: &str) {
    let hub = TestHub::start(Config::default()).await;
    let mut sender = hub.connect().await;
    let mut other = hub.connect().await;
    sender.send(bad).await;
    sender.expect_error(code).await;
    sender.send(event("after", json!(1))).await;
    assert_eq!(sender.json().await["event"], "after");
    assert_eq!(other.json().await["event"], "after", "the bad frame leaked");
    assert_eq!(hub.hub.stats().rejected, 1);
}

#[tokio::test]
async fn invalid_json_is_rejected() {
    rejected_but_connection_survives(b"{\"event\": pickup}\n", "invalid_json").await;
    rejected_but_connection_survives(b"hello hub\n", "invalid_json").await;
    rejected_but_connection_survives(b"{\"event\":\"a\",\"payload\":\"no end\n", "invalid_json")
        .await;
}

#[tokio::test]
async fn json_that_is_not_an_event_is_rejected() {
    for bad in [
        &br#"{"event":"x"}"#[..],
        br#"{"payload":1}"#,
        br#"{"event":42,"payload":1}"#,
        br#"{"event":"","payload":1}"#,
        b"[1,2,3]",
        b"42\n",
    ] {
        rejected_but_connection_survives(bad, "not_an_event").await;
    }
}

#[tokio::test]
async fn reserved_names_are_rejected() {
    rejected_but_connection_survives(br#"{"event":"$shutdown","payload":{}}"#, "reserved_event")
        .await;
}

#[tokio::test]
async fn invalid_utf8_is_rejected() {
    rejected_but_connection_survives(
        b"{\"event\":\"a\",\"payload\":\"\xc3\x28\"}",
        "invalid_utf8",
    )
    .await;
}

#[tokio::test]
async fn an_oversized_frame_closes_only_that_connection() {
    let config = Config::builder().max_frame(1024).build().unwrap();
    let hub = TestHub::start(config).await;
    let mut big = hub.connect().await;
    let mut other = hub.connect().await;
    let huge = event("big", json!("x".repeat(4096)));
    big.send(&huge[..2000]).await;
    let message = big.expect_error("frame_too_large").await;
    assert!(message.contains("1024"), "{message}");
    big.expect_eof().await;
    let (had_error, reason) = hub.wait_close(big.id).await;
    assert!(had_error, "{reason:?}");
    other.send(event("still", json!("here"))).await;
    assert_eq!(other.json().await["payload"], "here");
    assert_eq!(hub.hub.clients(), 1);
}

#[tokio::test]
async fn a_frame_cut_short_by_end_of_stream_is_reported() {
    let hub = TestHub::start(Config::default()).await;
    let mut client = hub.connect().await;
    client.send(r#"{"event":"half","#).await;
    client.writer.shutdown().await.unwrap();
    let message = client.expect_error("invalid_json").await;
    assert!(message.contains("middle of a frame"), "{message}");
    client.expect_eof().await;
}

use tokio::io::AsyncWriteExt;
