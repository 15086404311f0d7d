//! Events: validated meaning on top of framed bytes.
//!
//! An [`Event`] owns the exact line that goes on the wire (shared with every receiver
//! as one [`Bytes`]) plus where its name and payload sit inside it. An [`EventName`]
//! can only be made through validation, so no part of the hub holds an unchecked name.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::protocol::{ErrorCode, ProtocolError};

/// The longest event name the hub accepts, in bytes.
pub const MAX_EVENT_NAME: usize = 256;

/// A non-empty event name of at most [`MAX_EVENT_NAME`] bytes.
///
/// # Examples
///
/// ```
/// use hubcast::EventName;
/// let name = EventName::new("pickup").unwrap();
/// assert_eq!(name.as_str(), "pickup");
/// assert!(!name.is_reserved());
/// assert!(EventName::new("").is_err());
/// assert!(EventName::new("$error").unwrap().is_reserved());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventName(ByteString);

/// Checks a name (of an event or a room): non-empty, at most [`MAX_EVENT_NAME`] bytes.
fn check_name(name: &str, what: &str, code: ErrorCode) -> Result<(), ProtocolError> {
    if name.is_empty() {
        return Err(ProtocolError::new(
            code,
            format!("the {what} name is empty"),
        ));
    }
    if name.len() > MAX_EVENT_NAME {
        return Err(ProtocolError::new(
            code,
            format!(
                "the {what} name is {} bytes long; the limit is {MAX_EVENT_NAME}",
                name.len()
            ),
        ));
    }
    Ok(())
}

impl EventName {
    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::NotAnEvent`] when the name is empty or longer than [`MAX_EVENT_NAME`].
    pub fn new(name: impl Into<ByteString>) -> Result<Self, ProtocolError> {
        let name = name.into();
        check_name(&name, "event", ErrorCode::NotAnEvent)?;
        Ok(EventName(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Names starting with `$` belong to the hub's own protocol.
    pub fn is_reserved(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A room name: a non-empty string of at most [`MAX_EVENT_NAME`] bytes.
///
/// # Examples
///
/// ```
/// use hubcast::RoomName;
/// assert_eq!(RoomName::new("acme").unwrap().as_str(), "acme");
/// assert!(RoomName::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomName(ByteString);

impl RoomName {
    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::InvalidRoom`] when the name is empty or too long.
    pub fn new(name: impl Into<ByteString>) -> Result<Self, ProtocolError> {
        let name = name.into();
        check_name(&name, "room", ErrorCode::InvalidRoom)?;
        Ok(RoomName(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// One event: `{"event": NAME, "payload": VALUE, ...}` as a single `\n`-terminated line.
///
/// Cloning is cheap (reference counts); the line is what every receiver is sent.
///
/// # Examples
///
/// ```
/// use hubcast::Event;
/// let event = Event::new("pickup", &serde_json::json!({"store": "acme"})).unwrap();
/// assert_eq!(event.name().as_str(), "pickup");
/// assert_eq!(event.payload(), r#"{"store":"acme"}"#);
/// assert_eq!(&event.line()[..], &b"{\"event\":\"pickup\",\"payload\":{\"store\":\"acme\"}}\n"[..]);
/// ```
#[derive(Clone, Debug)]
pub struct Event {
    /// The wire line, `\n` included; valid UTF-8 (checked once, in [`Event::from_line`]).
    line: Bytes,
    name: EventName,
    /// Byte range of the raw payload JSON inside `line`.
    payload: Range<usize>,
    /// The top-level `"room"`, if any: only that room's members receive the event.
    room: Option<RoomName>,
    /// The top-level `"id"`, if it is a string: the publisher asks for a `$stored`.
    id: Option<ByteString>,
}

/// The shape an event must have; extra keys are ignored here and forwarded unchanged.
/// `event` and `room` are taken raw and checked after: a name that is valid JSON but
/// not a valid string (a number, a lone surrogate escape) is `not_an_event`, not
/// `invalid_json`, and `"room": null` is a room that is not a string (issue #10: it
/// used to read as no room, and went to everyone).
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    event: &'a RawValue,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(borrow, default, deserialize_with = "present")]
    room: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

/// A key that is present is `Some`, even when its value is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

impl Event {
    /// Encodes a new event with `payload` serialised as JSON.
    ///
    /// # Errors
    ///
    /// When the name is invalid, or `payload` cannot be serialised as JSON
    /// (for example a map with non-string keys).
    pub fn new<T: Serialize + ?Sized>(name: &str, payload: &T) -> Result<Self, ProtocolError> {
        Self::encode(name, None, payload)
    }

    /// Encodes a new event for the members of `room` only.
    ///
    /// # Errors
    ///
    /// As [`Event::new`], and [`ErrorCode::InvalidRoom`] for a bad room name.
    ///
    /// # Examples
    ///
    /// ```
    /// let event = hubcast::Event::in_room("acme", "delivered", &1).unwrap();
    /// assert_eq!(event.room().unwrap().as_str(), "acme");
    /// assert_eq!(&event.line()[..], &b"{\"event\":\"delivered\",\"room\":\"acme\",\"payload\":1}\n"[..]);
    /// ```
    pub fn in_room<T: Serialize + ?Sized>(
        room: &str,
        name: &str,
        payload: &T,
    ) -> Result<Self, ProtocolError> {
        RoomName::new(room)?;
        Self::encode(name, Some(room), payload)
    }

    fn encode<T: Serialize + ?Sized>(
        name: &str,
        room: Option<&str>,
        payload: &T,
    ) -> Result<Self, ProtocolError> {
        EventName::new(name)?;
        let payload = serde_json::to_string(payload)
            .map_err(|e| ProtocolError::new(ErrorCode::InvalidJson, e.to_string()))?;
        #[derive(Serialize)]
        struct Out<'a> {
            event: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            room: Option<&'a str>,
            payload: &'a RawValue,
        }
        let raw = RawValue::from_string(payload)
            .map_err(|e| ProtocolError::new(ErrorCode::InvalidJson, e.to_string()))?;
        let mut line = serde_json::to_vec(&Out {
            event: name,
            room,
            payload: &raw,
        })
        .map_err(|e| ProtocolError::new(ErrorCode::InvalidJson, e.to_string()))?;
        line.push(b'\n');
        Event::from_line(Bytes::from(line))
    }

    /// Parses one complete event from `line`, which must be a single JSON object
    /// followed by exactly one `\n` and contain no other raw newline.
    ///
    /// The frame decoder builds lines in that form; this is its validation step.
    ///
    /// # Errors
    ///
    /// [`ErrorCode::InvalidUtf8`], [`ErrorCode::InvalidJson`] or [`ErrorCode::NotAnEvent`]
    /// naming what is wrong.
    pub fn from_line(line: Bytes) -> Result<Self, ProtocolError> {
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = std::str::from_utf8(body).map_err(|e| {
            // The first problem by position: a syntax error before the bad byte wins.
            let valid = std::str::from_utf8(&body[..e.valid_up_to()]).unwrap_or_default();
            match serde_json::from_str::<serde::de::IgnoredAny>(valid) {
                Err(syntax) if !syntax.is_eof() => {
                    ProtocolError::new(ErrorCode::InvalidJson, syntax.to_string())
                }
                _ => utf8_at(e.valid_up_to()),
            }
        })?;
        if !text.trim_start().starts_with('{') {
            return Err(ProtocolError::new(
                ErrorCode::NotAnEvent,
                "an event must be a JSON object",
            ));
        }
        let wire: Wire<'_> = serde_json::from_str(text).map_err(classify)?;
        let payload = offset_in(text, wire.payload.get());
        let name = match name_text(wire.event.get())? {
            // Names without escapes share the line's allocation.
            Cow::Borrowed(name) => {
                let at = offset_in(text, name);
                line.slice(at.clone())
            }
            Cow::Owned(name) => Bytes::from(name),
        };
        // `name` was a `str`, so this check cannot fail; it costs at most 256 bytes.
        let name = EventName::new(ByteString::try_from(name).map_err(utf8_error)?)?;
        let room = match wire.room {
            None => None,
            Some(raw) => Some(room_name(raw)?),
        };
        let id = match wire.id.map(|raw| raw.get()) {
            // Only a string is an id; any other `"id"` is an extra key, as before v3.
            Some(raw) if raw.starts_with('"') => {
                let id: Cow<'_, str> = serde_json::from_str(raw).map_err(|e| {
                    ProtocolError::new(
                        ErrorCode::NotAnEvent,
                        format!("\"id\" is not a valid string ({e})"),
                    )
                })?;
                Some(event_id(match id {
                    // Ids without escapes share the line's allocation.
                    Cow::Borrowed(id) => line.slice(offset_in(text, id)),
                    Cow::Owned(id) => Bytes::from(id),
                })?)
            }
            _ => None,
        };
        Ok(Event {
            line,
            name,
            payload,
            room,
            id,
        })
    }

    /// As [`Event::from_line`], through the fast path first (one pass, no serde) when
    /// it is sure, the reference path otherwise: for lines that are almost always
    /// valid and typical, such as those another node of a cluster forwards. (The
    /// decoder's reference mode keeps calling [`Event::from_line`], so that the fast
    /// path is still tested against something else.)
    pub(crate) fn from_line_fast(line: Bytes) -> Result<Self, ProtocolError> {
        if let Some(body) = line.strip_suffix(b"\n") {
            if body.first() == Some(&b'{') {
                if let Some(parts) = crate::frame::fast::event(body).filter(|p| p.end == body.len())
                {
                    return Event::from_parts(line, parts);
                }
            }
        }
        Event::from_line(line)
    }

    /// An event from a line the fast path has validated as JSON and taken apart: only
    /// the name and room rules are left to check.
    pub(crate) fn from_parts(
        line: Bytes,
        parts: crate::frame::fast::Parts,
    ) -> Result<Self, ProtocolError> {
        let text =
            |range: Range<usize>| ByteString::try_from(line.slice(range)).map_err(utf8_error);
        let name = EventName::new(text(parts.name)?)?;
        let room = match parts.room {
            None => None,
            Some(range) => Some(RoomName::new(text(range)?)?),
        };
        let id = match parts.id {
            None => None,
            Some(range) => Some(event_id(line.slice(range))?),
        };
        Ok(Event {
            payload: parts.payload,
            line,
            name,
            room,
            id,
        })
    }

    /// The event's name.
    pub fn name(&self) -> &EventName {
        &self.name
    }

    /// The payload as raw JSON text, exactly as the sender wrote it.
    pub fn payload(&self) -> &str {
        self.line
            .get(self.payload.clone())
            .and_then(|raw| std::str::from_utf8(raw).ok())
            .unwrap_or("null")
    }

    /// The room the event is for, if it names one.
    pub fn room(&self) -> Option<&RoomName> {
        self.room.as_ref()
    }

    /// The top-level `"id"` (a string): the publisher asks the hub to confirm the
    /// event with `$stored`, and to drop a resend of it as a duplicate.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The whole wire line, trailing `\n` included.
    pub fn line(&self) -> &Bytes {
        &self.line
    }
}

/// The `"room"` of an event: a string naming a valid room.
fn room_name(raw: &RawValue) -> Result<RoomName, ProtocolError> {
    let not_a_string = || ProtocolError::new(ErrorCode::NotAnEvent, "\"room\" must be a string");
    if !raw.get().starts_with('"') {
        return Err(not_a_string());
    }
    let room: Cow<'_, str> = serde_json::from_str(raw.get()).map_err(|_| not_a_string())?;
    RoomName::new(room.into_owned())
}

/// The text of an event name given as raw JSON: borrowed when it has no escapes.
fn name_text(raw: &str) -> Result<Cow<'_, str>, ProtocolError> {
    let not_a_name = |why: &str| {
        ProtocolError::new(
            ErrorCode::NotAnEvent,
            format!("\"event\" must be a string naming the event; {why}"),
        )
    };
    let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) else {
        return Err(not_a_name(&format!(
            "got {}",
            crate::protocol::excerpt(raw)
        )));
    };
    if !inner.contains('\\') {
        return Ok(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw)
        .map(Cow::Owned)
        .map_err(|e| not_a_name(&format!("it is not valid Unicode ({e})")))
}

/// The `invalid_utf8` error for a frame whose first bad byte is at `at`.
pub(crate) fn utf8_at(at: usize) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InvalidUtf8,
        format!("invalid UTF-8 at byte {at} of the frame"),
    )
}

/// Where `part` (a sub-slice of `whole`) starts and ends inside `whole`.
fn offset_in(whole: &str, part: &str) -> Range<usize> {
    let start = (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize);
    start..start + part.len()
}

/// The longest `"id"` an event may carry, in bytes.
pub const MAX_EVENT_ID: usize = 128;

/// Checks an event's `"id"` (its text, unescaped): 1 to [`MAX_EVENT_ID`] bytes.
fn event_id(id: Bytes) -> Result<ByteString, ProtocolError> {
    if id.is_empty() {
        return Err(ProtocolError::new(
            ErrorCode::NotAnEvent,
            "\"id\" is empty; an id names the event for its confirmation",
        ));
    }
    if id.len() > MAX_EVENT_ID {
        return Err(ProtocolError::new(
            ErrorCode::NotAnEvent,
            format!(
                "\"id\" is {} bytes long; the limit is {MAX_EVENT_ID}",
                id.len()
            ),
        ));
    }
    ByteString::try_from(id).map_err(utf8_error)
}

fn utf8_error(_: std::str::Utf8Error) -> ProtocolError {
    ProtocolError::new(ErrorCode::InvalidUtf8, "invalid UTF-8 in the frame")
}

/// Syntax errors are `invalid_json`; well-formed JSON of the wrong shape is `not_an_event`.
fn classify(err: serde_json::Error) -> ProtocolError {
    use serde_json::error::Category;
    let code = match err.classify() {
        Category::Data => ErrorCode::NotAnEvent,
        Category::Syntax | Category::Eof | Category::Io => ErrorCode::InvalidJson,
    };
    ProtocolError::new(code, err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_line_parser_agrees_with_the_reference() {
        let lines = [
            r#"{"event":"pickup","payload":{"orderID":1}}"#,
            r#"{"event":"pickup","payload":[1,2,{"a":null}],"room":"acme","id":"o-1"}"#,
            r#"{"event":"ab","payload":1}"#,
            r#"{"event":"x","payload":1,"id":7}"#,
            r#"{"event":"","payload":1}"#,
            r#"{"event":"x"}"#,
            r#"{"event":"x","payload":01}"#,
            r#"{"event":"x","payload":1,"room":""}"#,
            r#"[1]"#,
            r#"{"event":"x","payload":1} "#,
        ];
        for text in lines {
            let line = Bytes::copy_from_slice(format!("{text}\n").as_bytes());
            let (fast, reference) = (
                Event::from_line_fast(line.clone()),
                Event::from_line(line.clone()),
            );
            match (fast, reference) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.name(), b.name(), "{text}");
                    assert_eq!(a.room(), b.room(), "{text}");
                    assert_eq!(a.payload(), b.payload(), "{text}");
                    assert_eq!(a.id(), b.id(), "{text}");
                }
                (Err(a), Err(b)) => assert_eq!(a, b, "{text}"),
                (a, b) => panic!("{text}: fast {a:?}, reference {b:?}"),
            }
        }
    }

    fn parse(s: &str) -> Result<Event, ProtocolError> {
        Event::from_line(Bytes::copy_from_slice(format!("{s}\n").as_bytes()))
    }

    /// Issue #12: a string `"id"` is the publisher's id (escapes decoded, at most 128
    /// bytes); any other `"id"` is an extra key, as before protocol v3.
    #[test]
    fn a_string_id_is_the_publishers_id() {
        let e = parse(r#"{"event":"a","payload":1,"id":"order-7"}"#).unwrap();
        assert_eq!(e.id(), Some("order-7"));
        let e = parse(r#"{"id":"\u00e9","event":"a","payload":1}"#).unwrap();
        assert_eq!(e.id(), Some("é"));
        assert_eq!(
            parse(r#"{"event":"a","payload":1,"id":7}"#).unwrap().id(),
            None
        );
        assert_eq!(parse(r#"{"event":"a","payload":1}"#).unwrap().id(), None);
        let empty = parse(r#"{"event":"a","payload":1,"id":""}"#).unwrap_err();
        assert_eq!(empty.code, ErrorCode::NotAnEvent);
        let long = format!(r#"{{"event":"a","payload":1,"id":"{}"}}"#, "x".repeat(129));
        let err = parse(&long).unwrap_err();
        assert_eq!(err.code, ErrorCode::NotAnEvent);
        assert!(err.message.contains("128"), "{}", err.message);
    }

    #[test]
    fn keeps_bytes_and_extra_keys() {
        let e = parse(r#"{"payload": {"a":1},  "x": [1], "event":"pickup"}"#).unwrap();
        assert_eq!(e.name().as_str(), "pickup");
        assert_eq!(e.payload(), r#"{"a":1}"#);
        assert_eq!(
            &e.line()[..],
            b"{\"payload\": {\"a\":1},  \"x\": [1], \"event\":\"pickup\"}\n"
        );
    }

    #[test]
    fn null_payload_and_escaped_name() {
        let e = parse(r#"{"event":"pick\u0075p","payload":null}"#).unwrap();
        assert_eq!(e.name().as_str(), "pickup");
        assert_eq!(e.payload(), "null");
    }

    #[test]
    fn shape_errors_are_not_an_event() {
        for bad in [
            r#"{"event":"x"}"#,
            r#"{"payload":1}"#,
            r#"{"event":5,"payload":1}"#,
            r#"{"event":"","payload":1}"#,
            r#"{"event":"a","event":"b","payload":1}"#,
            r#"[1,2]"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code, ErrorCode::NotAnEvent, "{bad}");
        }
        let long = format!(r#"{{"event":"{}","payload":1}}"#, "a".repeat(257));
        assert_eq!(parse(&long).unwrap_err().code, ErrorCode::NotAnEvent);
        let max = format!(r#"{{"event":"{}","payload":1}}"#, "a".repeat(256));
        assert!(parse(&max).is_ok());
    }

    #[test]
    fn syntax_errors_are_invalid_json() {
        for bad in [r#"{"event":"x","payload":}"#, r#"{"event" "x"}"#, "{,}"] {
            assert_eq!(
                parse(bad).unwrap_err().code,
                ErrorCode::InvalidJson,
                "{bad}"
            );
        }
    }

    #[test]
    fn invalid_utf8_is_reported_as_such() {
        let line = Bytes::from_static(b"{\"event\":\"x\",\"payload\":\"\xff\"}\n");
        assert_eq!(
            Event::from_line(line).unwrap_err().code,
            ErrorCode::InvalidUtf8
        );
    }

    #[test]
    fn rooms_are_read_and_checked() {
        let e = parse(r#"{"event":"x","payload":1,"room":"acme"}"#).unwrap();
        assert_eq!(e.room().map(RoomName::as_str), Some("acme"));
        assert!(parse(r#"{"event":"x","payload":1}"#)
            .unwrap()
            .room()
            .is_none());
        let bad = parse(r#"{"event":"x","payload":1,"room":5}"#).unwrap_err();
        assert_eq!(bad.code, ErrorCode::NotAnEvent);
        assert_eq!(
            parse(r#"{"event":"x","payload":1,"room":""}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidRoom
        );
    }

    #[test]
    fn new_encodes_compact_line() {
        let e = Event::new("a.b", &vec![1, 2]).unwrap();
        assert_eq!(&e.line()[..], b"{\"event\":\"a.b\",\"payload\":[1,2]}\n");
        assert!(Event::new("", &1).is_err());
    }
}
