//! How events, rooms and patterns become NATS subjects, and back.
//!
//! ```text
//!  event "order.created"            → hubcast.e.order.created
//!  event "pickup" to room "acme"    → hubcast.r.acme.pickup
//!  pattern "order.*"                → hubcast.e.order.*
//!  members of room "acme"           → hubcast.r.acme.>
//!  a client that hears everything   → hubcast.e.>
//! ```
//!
//! hubcast's patterns are NATS's (segments split on `.`, `*` one segment, `>` the
//! rest), so an event name's segments are a subject's tokens and a pattern maps
//! segment by segment. A segment NATS could not carry as it is (empty, whitespace,
//! `*`, `>`, non-ASCII, ...) is written `~` followed by its bytes in hex; a plain
//! segment never starts with `~`, so the mapping is one-to-one and matching is kept:
//! `*` still matches exactly one (encoded) segment. A room is one token, encoded
//! the same way when it holds a `.` or anything else not plain.

use std::fmt::Write as _;

/// The first token of every subject hubcast publishes or subscribes to.
pub const PREFIX: &str = "hubcast";

/// Whether `byte` may appear as it is in a token (a conservative set: NATS allows
/// more, but these need no thought in any client, log or monitoring page).
fn plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-_:@/+=#!".contains(&byte)
}

/// Writes `segment` as one subject token.
fn push_token(out: &mut String, segment: &str) {
    let bytes = segment.as_bytes();
    if !bytes.is_empty() && bytes[0] != b'~' && bytes.iter().all(|&b| plain(b)) {
        out.push_str(segment);
    } else {
        out.push('~');
        for byte in bytes {
            let _ = write!(out, "{byte:02x}");
        }
    }
}

/// Writes an event name's segments as tokens.
fn push_name(out: &mut String, name: &str) {
    for (i, segment) in name.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        push_token(out, segment);
    }
}

/// The subject a client's event is published on: `hubcast.e.NAME`, or
/// `hubcast.r.ROOM.NAME` when it names a room.
///
/// # Examples
///
/// ```
/// use hubcast::cluster::subject::event_subject;
/// assert_eq!(event_subject("order.created", None), "hubcast.e.order.created");
/// assert_eq!(event_subject("pickup", Some("acme")), "hubcast.r.acme.pickup");
/// assert_eq!(event_subject("a b", Some("x.y")), "hubcast.r.~782e79.~612062");
/// ```
pub fn event_subject(name: &str, room: Option<&str>) -> String {
    let mut out = String::with_capacity(PREFIX.len() + 4 + name.len());
    out.push_str(PREFIX);
    push_event(&mut out, name, room);
    out
}

/// Appends `.e.NAME`, or `.r.ROOM.NAME` when the event names a room.
fn push_event(out: &mut String, name: &str, room: Option<&str>) {
    match room {
        Some(room) => {
            out.push_str(".r.");
            push_token(out, room);
        }
        None => out.push_str(".e"),
    }
    out.push('.');
    push_name(out, name);
}

/// The subject that carries what a pattern subscriber wants (events naming no room).
///
/// # Examples
///
/// ```
/// use hubcast::cluster::subject::pattern_subject;
/// assert_eq!(pattern_subject("order.*"), "hubcast.e.order.*");
/// assert_eq!(pattern_subject(">"), "hubcast.e.>");
/// ```
pub fn pattern_subject(pattern: &str) -> String {
    let mut out = format!("{PREFIX}.e.");
    push_pattern(&mut out, pattern);
    out
}

/// Writes a pattern's segments as tokens, its wildcards as NATS's.
fn push_pattern(out: &mut String, pattern: &str) {
    for (i, segment) in pattern.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        match segment {
            "*" | ">" => out.push_str(segment),
            literal => push_token(out, literal),
        }
    }
}

/// The subject that carries every event sent to `room`.
///
/// # Examples
///
/// ```
/// use hubcast::cluster::subject::room_subject;
/// assert_eq!(room_subject("acme"), "hubcast.r.acme.>");
/// ```
pub fn room_subject(room: &str) -> String {
    let mut out = format!("{PREFIX}.r.");
    push_token(&mut out, room);
    out.push_str(".>");
    out
}

/// The subject that carries every event sent to any room (a node with members in
/// more rooms than [`MAX_INTEREST`](super::MAX_INTEREST)).
pub fn all_rooms_subject() -> String {
    format!("{PREFIX}.r.>")
}

/// The event name and room a subject carries (`None` for a subject hubcast does not
/// publish).
///
/// # Examples
///
/// ```
/// use hubcast::cluster::subject::{decode, event_subject};
/// let subject = event_subject("in transit", Some("acme.north"));
/// assert_eq!(
///     decode(&subject),
///     Some(("in transit".to_string(), Some("acme.north".to_string())))
/// );
/// assert_eq!(decode("other.subject"), None);
/// ```
pub fn decode(subject: &str) -> Option<(String, Option<String>)> {
    let rest = subject.strip_prefix(PREFIX)?.strip_prefix('.')?;
    let (room, name) = if let Some(name) = rest.strip_prefix("e.") {
        (None, name)
    } else {
        let rest = rest.strip_prefix("r.")?;
        let (room, name) = rest.split_once('.')?;
        (Some(decode_token(room)?), name)
    };
    let mut out = String::with_capacity(name.len());
    for (i, token) in name.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(&decode_token(token)?);
    }
    Some((out, room))
}

/// The subject an event is stored on in JetStream, under its stream (chosen by the
/// hub: the first declared stream that matches): `hubcast.s.STREAM.e.NAME`, or
/// `hubcast.s.STREAM.r.ROOM.NAME`. Outside the live subjects, so that storing and
/// live delivery never see each other's messages, and one stream's subjects never
/// overlap another's.
///
/// # Examples
///
/// ```
/// use hubcast::cluster::subject::stored_subject;
/// assert_eq!(stored_subject("orders", "pickup", None), "hubcast.s.orders.e.pickup");
/// assert_eq!(
///     stored_subject("orders.dead", "pickup", Some("acme")),
///     "hubcast.s.~6f72646572732e64656164.r.acme.pickup"
/// );
/// ```
pub fn stored_subject(stream: &str, name: &str, room: Option<&str>) -> String {
    let mut out = stream_prefix(stream);
    push_event(&mut out, name, room);
    out
}

/// Every subject of a stream's events: what its JetStream stream holds.
///
/// # Examples
///
/// ```
/// assert_eq!(hubcast::cluster::subject::stream_subjects("orders"), "hubcast.s.orders.>");
/// ```
pub fn stream_subjects(stream: &str) -> String {
    let mut out = stream_prefix(stream);
    out.push_str(".>");
    out
}

/// The JetStream filter subjects of a consumer of `stream` with an event-name
/// `filter` and a `room` (each optional; neither: the whole stream). A filter matches
/// events with or without a room, as on a single hub.
///
/// # Examples
///
/// ```
/// use hubcast::cluster::subject::consumer_filters;
/// assert_eq!(consumer_filters("orders", None, None), ["hubcast.s.orders.>"]);
/// assert_eq!(
///     consumer_filters("orders", Some("order.*"), None),
///     ["hubcast.s.orders.e.order.*", "hubcast.s.orders.r.*.order.*"]
/// );
/// assert_eq!(consumer_filters("orders", None, Some("acme")), ["hubcast.s.orders.r.acme.>"]);
/// ```
pub fn consumer_filters(stream: &str, filter: Option<&str>, room: Option<&str>) -> Vec<String> {
    let tail = push_pattern;
    let prefix = stream_prefix(stream);
    match (filter, room) {
        (None, None) => vec![stream_subjects(stream)],
        (Some(filter), None) => {
            let mut plain = format!("{prefix}.e.");
            tail(&mut plain, filter);
            let mut rooms = format!("{prefix}.r.*.");
            tail(&mut rooms, filter);
            vec![plain, rooms]
        }
        (filter, Some(room)) => {
            let mut out = format!("{prefix}.r.");
            push_token(&mut out, room);
            out.push('.');
            tail(&mut out, filter.unwrap_or(">"));
            vec![out]
        }
    }
}

fn stream_prefix(stream: &str) -> String {
    let mut out = format!("{PREFIX}.s.");
    push_token(&mut out, stream);
    out
}

/// A hubcast stream's name in JetStream: the same, with `.` (which JetStream names
/// cannot hold, and hubcast's dead-letter streams have: `orders.dead`) written `~`
/// (which hubcast's stream names cannot hold).
///
/// # Examples
///
/// ```
/// use hubcast::cluster::subject::jetstream_stream;
/// assert_eq!(jetstream_stream("orders"), "orders");
/// assert_eq!(jetstream_stream("orders.dead"), "orders~dead");
/// ```
pub fn jetstream_stream(stream: &str) -> String {
    stream.replace('.', "~")
}

/// A hubcast consumer's name in JetStream: letters, digits, `-` and `_` as they are,
/// any other byte `~` and two hex digits; a name that would come out longer than
/// [`MAX_JETSTREAM_NAME`] is `~~` and a digest of it instead.
///
/// # Examples
///
/// ```
/// use hubcast::cluster::subject::{jetstream_consumer, consumer_from_jetstream};
/// assert_eq!(jetstream_consumer("drivers"), "drivers");
/// assert_eq!(jetstream_consumer("north.drivers"), "north~2edrivers");
/// assert_eq!(consumer_from_jetstream("north~2edrivers").as_deref(), Some("north.drivers"));
/// ```
pub fn jetstream_consumer(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for &byte in name.as_bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(byte as char);
        } else {
            let _ = write!(out, "~{byte:02x}");
        }
    }
    if out.len() > MAX_JETSTREAM_NAME {
        let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
        out = String::from("~~");
        for byte in &digest.as_ref()[..16] {
            let _ = write!(out, "{byte:02x}");
        }
    }
    out
}

/// The hubcast name of a JetStream consumer [`jetstream_consumer`] named (`None` for
/// a digest, or a name hubcast did not make).
pub fn consumer_from_jetstream(name: &str) -> Option<String> {
    if name.starts_with("~~") {
        return None;
    }
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'~' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// The longest consumer name hubcast gives JetStream (its own limit is 255).
pub const MAX_JETSTREAM_NAME: usize = 200;

fn decode_token(token: &str) -> Option<String> {
    let Some(hex) = token.strip_prefix('~') else {
        return (!token.is_empty()).then(|| token.to_string());
    };
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Pattern;

    /// NATS's own matching of a subscription subject against a published subject.
    fn nats_matches(subscription: &str, subject: &str) -> bool {
        let mut tokens = subject.split('.');
        for part in subscription.split('.') {
            match part {
                ">" => return tokens.next().is_some(),
                "*" => {
                    if tokens.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if tokens.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        tokens.next().is_none()
    }

    #[test]
    fn names_round_trip_and_every_token_is_one_nats_can_carry() {
        let names = [
            "pickup",
            "in-transit",
            "order.created",
            "a..b",
            ".",
            "a b",
            "x*y",
            ">",
            "*",
            "~tilde",
            "ünïcode.ok",
            "tab\there",
            "$odd",
            "a.b.c.d",
        ];
        for name in names {
            for room in [
                None,
                Some("acme"),
                Some("a.b"),
                Some("with space"),
                Some("~"),
            ] {
                let subject = event_subject(name, room);
                for token in subject.split('.') {
                    assert!(!token.is_empty(), "{subject}");
                    assert!(token.bytes().all(|b| b.is_ascii_graphic()), "{subject}");
                    assert!(token != "*" && token != ">", "{subject}");
                }
                assert_eq!(
                    decode(&subject),
                    Some((name.to_string(), room.map(str::to_string))),
                    "{subject}"
                );
            }
        }
    }

    #[test]
    fn nats_matching_of_mapped_patterns_is_hubcast_matching() {
        let names = [
            "a", "a.b", "a.b.c", "a..b", "a b.c", "b.c", "x.a.b", "*.b", "~",
        ];
        let patterns = [
            "a", "a.*", "a.>", "*.b", ">", "*", "a.*.c", "a b.*", "~", "*.*",
        ];
        for pattern in patterns {
            let hub = Pattern::parse(pattern).unwrap();
            let subscription = pattern_subject(pattern);
            for name in names {
                assert_eq!(
                    nats_matches(&subscription, &event_subject(name, None)),
                    hub.matches(name),
                    "{pattern} vs {name}"
                );
            }
        }
        assert!(nats_matches(
            &room_subject("acme"),
            &event_subject("a.b", Some("acme"))
        ));
        assert!(!nats_matches(
            &room_subject("acme"),
            &event_subject("a", Some("acme2"))
        ));
        assert!(!nats_matches(
            &room_subject("acme"),
            &event_subject("a", None)
        ));
        assert!(!nats_matches(
            &pattern_subject(">"),
            &event_subject("a", Some("acme"))
        ));
    }

    #[test]
    fn foreign_subjects_are_not_decoded() {
        for subject in [
            "hubcast",
            "hubcast.x.a",
            "hubcast.r.acme",
            "hubcast.e.~7",
            "hubcast.e.~zz",
            "nats.e.a",
        ] {
            assert_eq!(decode(subject), None, "{subject}");
        }
    }
}
