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
    match room {
        Some(room) => {
            out.push_str(".r.");
            push_token(&mut out, room);
        }
        None => out.push_str(".e"),
    }
    out.push('.');
    push_name(&mut out, name);
    out
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
    for (i, segment) in pattern.split('.').enumerate() {
        if i > 0 {
            out.push('.');
        }
        match segment {
            "*" | ">" => out.push_str(segment),
            literal => push_token(&mut out, literal),
        }
    }
    out
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
