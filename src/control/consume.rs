//! Durable consumers (protocol v3): `$consume` → `$consuming`, `$ack` (→ `$acked`
//! when asked), `$nack`, `$unconsume` → `$unconsumed`. The engine is in
//! `durable::consumer`; this checks what the client sent.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::{invalid_payload, reply, Request};
use crate::durable::consumer::Named;
use crate::durable::ledger::{Spec, Start};
use crate::durable::Consumers;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::routing::Pattern;

/// Defaults, as JetStream's: a delivery not acknowledged within 30 s goes again, at
/// most 5 times; 100 out to each member at once.
pub(crate) const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_MAX_DELIVER: u32 = 5;
pub(crate) const DEFAULT_MAX_IN_FLIGHT: u32 = 100;
/// Upper bounds on what a client may ask for.
const MAX_ACK_WAIT: Duration = Duration::from_secs(24 * 3600);
const MAX_IN_FLIGHT: u32 = 100_000;
const MAX_DELIVER: u32 = 1_000_000;
/// The most seqs one `$ack` or `$nack` may list.
pub(crate) const MAX_ACK_SEQS: usize = 10_000;
/// The longest consumer name.
const MAX_CONSUMER_NAME: usize = 128;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Consume {
    stream: String,
    consumer: String,
    filter: Option<String>,
    room: Option<String>,
    start: Option<Start>,
    ack_wait: Option<String>,
    max_deliver: Option<u32>,
    max_in_flight: Option<u32>,
}

/// One seq or a list of them.
enum Seqs {
    One(u64),
    Many(Vec<u64>),
}

impl<'de> Deserialize<'de> for Seqs {
    /// Read straight from the JSON (an untagged enum would buffer every list of
    /// seqs first: 2-3% of the hub's time when a fast consumer acks).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Seqs;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a seq (a whole number, 1 or more) or a list of them")
            }
            // A negative number (`visit_i64`), a float, a string, anything else:
            // serde's own error, replaced by ours below, as is any error in a list.
            fn visit_u64<E: serde::de::Error>(self, seq: u64) -> Result<Seqs, E> {
                Ok(Seqs::One(seq))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut list: A,
            ) -> Result<Seqs, A::Error> {
                let mut seqs = Vec::with_capacity(list.size_hint().unwrap_or(0).min(MAX_ACK_SEQS));
                while let Some(seq) = list.next_element::<u64>()? {
                    seqs.push(seq);
                }
                Ok(Seqs::Many(seqs))
            }
        }
        d.deserialize_any(Visitor)
            .map_err(|_| serde::de::Error::custom(SEQS_EXPECTED))
    }
}

const SEQS_EXPECTED: &str = "\"seq\" must be a seq (a whole number, 1 or more) or a list of them";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ack {
    consumer: String,
    seq: Seqs,
    /// Answer `$acked` once the acks are durable.
    #[serde(default)]
    confirm: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nack {
    consumer: String,
    seq: Seqs,
    delay: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Unconsume {
    consumer: String,
}

/// Where the hub's consumers are: its own store, or JetStream (a cluster node).
enum Engine<'a> {
    Local(&'a Consumers),
    JetStream(&'a std::sync::Arc<crate::cluster::jetstream::JetStream>),
}

fn consumers<'a>(request: &'a Request<'_>) -> Result<Engine<'a>, ProtocolError> {
    let durable = request.hub.durable();
    match (&durable.consumers, &durable.jetstream) {
        (Some(local), _) => Ok(Engine::Local(local)),
        (None, Some(jetstream)) => Ok(Engine::JetStream(jetstream)),
        (None, None) => Err(ProtocolError::new(
            ErrorCode::UnknownStream,
            "this hub declares no stream (hubcast serve --stream NAME=PATTERNS)",
        )),
    }
}

pub(super) fn consume(request: &Request<'_>) -> Result<Option<Bytes>, ProtocolError> {
    let asked: Consume = request.payload()?;
    let consumer = asked.consumer.clone();
    start(request, asked).map_err(|e| e.with_consumer(&consumer))
}

fn start(request: &Request<'_>, asked: Consume) -> Result<Option<Bytes>, ProtocolError> {
    let name = request.name();
    let consumers = consumers(request)?;
    let durable = request.hub.durable();
    let Some(stream) = durable.stream_index(&asked.stream) else {
        return Err(ProtocolError::new(
            ErrorCode::UnknownStream,
            format!(
                "no stream is named {:?}",
                crate::protocol::printable(&asked.stream)
            ),
        ));
    };
    consumer_name(name, &asked.consumer)?;
    if let Some(permissions) = request.client.access.permissions() {
        if !permissions.consume.allows(&asked.stream, &asked.consumer) {
            return Err(super::denied(format!(
                "consuming {}/{}",
                crate::protocol::printable(&asked.stream),
                crate::protocol::printable(&asked.consumer)
            )));
        }
    }
    if let Some(filter) = &asked.filter {
        Pattern::parse(filter)?;
    }
    if let Some(room) = &asked.room {
        crate::event::RoomName::new(room.clone())?;
    }
    let ack_wait = match &asked.ack_wait {
        None => DEFAULT_ACK_WAIT,
        Some(text) => duration(name, "ack_wait", text)?,
    };
    if ack_wait.is_zero() {
        return Err(invalid_payload(name, "ack_wait must be more than 0"));
    }
    let max_deliver = asked.max_deliver.unwrap_or(DEFAULT_MAX_DELIVER);
    if !(1..=MAX_DELIVER).contains(&max_deliver) {
        return Err(invalid_payload(
            name,
            &format!("max_deliver must be from 1 to {MAX_DELIVER}"),
        ));
    }
    let max_in_flight = asked.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
    if !(1..=MAX_IN_FLIGHT).contains(&max_in_flight) {
        return Err(invalid_payload(
            name,
            &format!("max_in_flight must be from 1 to {MAX_IN_FLIGHT}"),
        ));
    }
    let named = Named {
        filter: asked.filter.is_some(),
        room: asked.room.is_some(),
        start: asked.start.is_some(),
        ack_wait: asked.ack_wait.is_some(),
        max_deliver: asked.max_deliver.is_some(),
        max_in_flight: asked.max_in_flight.is_some(),
    };
    let spec = Spec {
        stream: asked.stream,
        filter: asked.filter,
        room: asked.room,
        start: asked.start.unwrap_or(Start::All),
        ack_wait_ms: ack_wait.as_millis() as u64,
        max_deliver,
        max_in_flight,
    };
    let wanted = crate::durable::consumer::Request { spec, named };
    match consumers {
        Engine::Local(consumers) => consumers.consume(
            request.hub,
            request.client,
            &asked.consumer,
            stream,
            wanted,
            |spec| durable.start_cursor(stream, spec.start),
        )?,
        Engine::JetStream(jetstream) => {
            jetstream.consume(request.hub, request.client, &asked.consumer, stream, wanted)?
        }
    }
    // `$consuming` is already queued, ahead of any delivery.
    Ok(None)
}

pub(super) fn ack(request: &Request<'_>) -> Result<Option<Bytes>, ProtocolError> {
    let ack: Ack = request.payload()?;
    let about = |e: ProtocolError| e.with_consumer(&ack.consumer);
    let seqs = seqs(request.name(), ack.seq).map_err(about)?;
    consumers(request)
        .and_then(|engine| {
            let (hub, client) = (request.hub, request.client.id);
            match engine {
                Engine::Local(c) => c.ack(hub, client, &ack.consumer, &seqs, ack.confirm),
                Engine::JetStream(js) => js.ack(hub, client, &ack.consumer, &seqs, ack.confirm),
            }
        })
        .map_err(about)?;
    Ok(None)
}

pub(super) fn nack(request: &Request<'_>) -> Result<Option<Bytes>, ProtocolError> {
    let nack: Nack = request.payload()?;
    let name = request.name();
    let about = |e: ProtocolError| e.with_consumer(&nack.consumer);
    let seqs = seqs(name, nack.seq).map_err(about)?;
    let delay = match &nack.delay {
        None => Duration::ZERO,
        Some(text) => duration(name, "delay", text).map_err(about)?,
    };
    consumers(request)
        .and_then(|engine| match engine {
            Engine::Local(c) => c.nack(request.client.id, &nack.consumer, &seqs, delay),
            Engine::JetStream(js) => js.nack(request.client.id, &nack.consumer, &seqs, delay),
        })
        .map_err(about)?;
    Ok(None)
}

pub(super) fn unconsume(request: &Request<'_>) -> Result<Option<Bytes>, ProtocolError> {
    let asked: Unconsume = request.payload()?;
    consumers(request)
        .and_then(|engine| match engine {
            Engine::Local(c) => c.unconsume(request.client.id, &asked.consumer),
            Engine::JetStream(js) => js.unconsume(request.client.id, &asked.consumer),
        })
        .map_err(|e| e.with_consumer(&asked.consumer))?;
    reply("$unconsumed", &json!({ "consumer": asked.consumer })).map(Some)
}

fn seqs(name: &str, seqs: Seqs) -> Result<Vec<u64>, ProtocolError> {
    let seqs = match seqs {
        Seqs::One(seq) => vec![seq],
        Seqs::Many(seqs) => seqs,
    };
    if seqs.is_empty() {
        return Err(invalid_payload(name, "\"seq\" lists no seq"));
    }
    if seqs.len() > MAX_ACK_SEQS {
        return Err(ProtocolError::new(
            ErrorCode::LimitExceeded,
            format!(
                "{name} lists {} seqs; at most {MAX_ACK_SEQS} at once",
                seqs.len()
            ),
        ));
    }
    Ok(seqs)
}

fn consumer_name(request: &str, name: &str) -> Result<(), ProtocolError> {
    if name.is_empty() || name.len() > MAX_CONSUMER_NAME || name.chars().any(char::is_control) {
        return Err(invalid_payload(
            request,
            &format!(
                "\"consumer\" must be a name of 1 to {MAX_CONSUMER_NAME} bytes without control characters"
            ),
        ));
    }
    Ok(())
}

/// `"30s"`, `"500ms"`, `"2m"`: a duration of at most a day.
fn duration(request: &str, key: &str, text: &str) -> Result<Duration, ProtocolError> {
    let parsed = humantime::parse_duration(text).map_err(|e| {
        invalid_payload(
            request,
            &format!(
                "{key} {:?} is not a duration like \"30s\" ({e})",
                crate::protocol::printable(text)
            ),
        )
    })?;
    if parsed > MAX_ACK_WAIT {
        return Err(invalid_payload(
            request,
            &format!("{key} may be at most 24h"),
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(text: &str) -> Result<Vec<u64>, String> {
        serde_json::from_str::<Seqs>(text)
            .map(|s| match s {
                Seqs::One(seq) => vec![seq],
                Seqs::Many(seqs) => seqs,
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_seq_or_a_list_of_them_and_nothing_else() {
        assert_eq!(seqs("7"), Ok(vec![7]));
        assert_eq!(
            seqs("[1, 2, 18446744073709551615]"),
            Ok(vec![1, 2, u64::MAX])
        );
        assert_eq!(seqs("[]"), Ok(vec![]));
        for bad in [
            "-1",
            "1.5",
            "\"3\"",
            "null",
            "true",
            "{}",
            "[\"3\"]",
            "[-1]",
            "[[1]]",
            "[1.5]",
            "18446744073709551616",
        ] {
            let error = seqs(bad).expect_err(bad);
            assert!(error.starts_with(SEQS_EXPECTED), "{bad}: {error}");
        }
    }
}
