//! The hub's own words on the wire: error codes and the `$error` frame.
//!
//! Everything the hub says to a client about the client's input is one line
//! `{"event":"$error","payload":{"code":CODE,"message":TEXT}}`, built here so every
//! part of the hub words it the same way. See `docs/protocol.md`.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The machine-readable reason in a `$error` frame.
///
/// # Examples
///
/// ```
/// use hubcast::ErrorCode;
/// assert_eq!(ErrorCode::InvalidJson.as_str(), "invalid_json");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The bytes are not JSON.
    InvalidJson,
    /// Valid JSON, but not an object with a string `event` and a `payload`.
    NotAnEvent,
    /// An event name starting with `$` that the hub does not know.
    ReservedEvent,
    /// A frame longer than the hub's `max_frame`; the connection is closed.
    FrameTooLarge,
    /// The frame is not valid UTF-8.
    InvalidUtf8,
    /// The client read too slowly and its outbound queue overflowed; it is disconnected.
    SlowConsumer,
    /// A control event (`$subscribe`, `$join`, ...) whose payload has the wrong shape.
    InvalidPayload,
    /// A subscription pattern that breaks the pattern rules.
    InvalidPattern,
    /// A room name that is not a non-empty string of at most 256 bytes.
    InvalidRoom,
    /// A per-connection limit (subscriptions, rooms) would be exceeded.
    LimitExceeded,
    /// The connection was silent for longer than the hub's idle timeout; it is closed.
    IdleTimeout,
    /// The client asked for heartbeats and stopped answering them; it is closed.
    HeartbeatTimeout,
    /// The hub is at `--max-connections`; the new connection is closed.
    TooManyConnections,
    /// More bad frames than the error budget allows; the connection is closed.
    TooManyErrors,
    /// Events did not fit in the client's queue and were discarded (`--slow-consumer drop`).
    EventsDropped,
    /// An event could not be stored (disk full, an I/O failure); it was delivered live.
    Storage,
    /// `$consume` named a stream the hub does not declare.
    UnknownStream,
    /// `$ack`, `$nack` or `$unconsume` named a consumer that does not exist.
    UnknownConsumer,
    /// `$consume` contradicted the settings the consumer was created with.
    ConsumerMismatch,
    /// `$ack`, `$nack` or `$unconsume` for a consumer this connection does not hold.
    NotConsuming,
    /// The hub requires authentication and the first frame was not `$hello` with a
    /// token; the connection is closed.
    AuthRequired,
    /// The credentials in `$hello` are wrong; the connection is closed.
    AuthFailed,
    /// No `$hello` arrived within `--auth-timeout`; the connection is closed.
    AuthTimeout,
    /// The connection's JWT expired and no fresh one was sent; it is closed.
    TokenExpired,
    /// The identity was removed from the hub's auth settings; the connection is closed.
    AuthRevoked,
    /// The identity may not do that (publish this event, subscribe to this pattern,
    /// join this room, use this consumer); the connection stays.
    PermissionDenied,
    /// Plain bytes arrived on a TLS port; the connection is closed (sent in plain).
    TlsRequired,
    /// A code this version does not know (from a newer hub); the hub never sends it.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Every code, in declaration order (`code as usize` indexes it).
    pub const ALL: [ErrorCode; 28] = [
        ErrorCode::InvalidJson,
        ErrorCode::NotAnEvent,
        ErrorCode::ReservedEvent,
        ErrorCode::FrameTooLarge,
        ErrorCode::InvalidUtf8,
        ErrorCode::SlowConsumer,
        ErrorCode::InvalidPayload,
        ErrorCode::InvalidPattern,
        ErrorCode::InvalidRoom,
        ErrorCode::LimitExceeded,
        ErrorCode::IdleTimeout,
        ErrorCode::HeartbeatTimeout,
        ErrorCode::TooManyConnections,
        ErrorCode::TooManyErrors,
        ErrorCode::EventsDropped,
        ErrorCode::Storage,
        ErrorCode::UnknownStream,
        ErrorCode::UnknownConsumer,
        ErrorCode::ConsumerMismatch,
        ErrorCode::NotConsuming,
        ErrorCode::AuthRequired,
        ErrorCode::AuthFailed,
        ErrorCode::AuthTimeout,
        ErrorCode::TokenExpired,
        ErrorCode::AuthRevoked,
        ErrorCode::PermissionDenied,
        ErrorCode::TlsRequired,
        ErrorCode::Unknown,
    ];

    /// The code as it appears on the wire.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(hubcast::ErrorCode::SlowConsumer.as_str(), "slow_consumer");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::NotAnEvent => "not_an_event",
            ErrorCode::ReservedEvent => "reserved_event",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::InvalidUtf8 => "invalid_utf8",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::InvalidPayload => "invalid_payload",
            ErrorCode::InvalidPattern => "invalid_pattern",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::HeartbeatTimeout => "heartbeat_timeout",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::TooManyErrors => "too_many_errors",
            ErrorCode::EventsDropped => "events_dropped",
            ErrorCode::Storage => "storage",
            ErrorCode::UnknownStream => "unknown_stream",
            ErrorCode::UnknownConsumer => "unknown_consumer",
            ErrorCode::ConsumerMismatch => "consumer_mismatch",
            ErrorCode::NotConsuming => "not_consuming",
            ErrorCode::AuthRequired => "auth_required",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::AuthTimeout => "auth_timeout",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::AuthRevoked => "auth_revoked",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::TlsRequired => "tls_required",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem with what a client sent (or with how it reads), reported to that client
/// alone as a `$error` frame.
///
/// # Examples
///
/// ```
/// use hubcast::{ErrorCode, ProtocolError};
/// let err = ProtocolError::new(ErrorCode::NotAnEvent, "missing field `payload`");
/// assert_eq!(
///     &err.to_frame()[..],
///     &b"{\"event\":\"$error\",\"payload\":{\"code\":\"not_an_event\",\"message\":\"missing field `payload`\"}}\n"[..]
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtocolError {
    /// What kind of problem it is.
    pub code: ErrorCode,
    /// A sentence for people, naming the problem.
    pub message: String,
    /// The durable consumer the error is about (errors answering `$consume`, `$ack`,
    /// `$nack` and `$unconsume`), so a client consuming several can tell.
    pub consumer: Option<String>,
    /// When a refusal is about a rate (`too_many_connections` under `--accept-rate`):
    /// how long to wait before trying again, in milliseconds.
    pub retry_after_ms: Option<u64>,
    /// The client did nothing wrong: an answer a correct client can get through a race
    /// it cannot see (an `$ack` for a delivery that was redelivered meanwhile, or whose
    /// first ack already counted). Answered like any error, but not counted against
    /// `--max-errors`. Not sent on the wire.
    pub blameless: bool,
}

impl ProtocolError {
    /// An error with `code` and a human-readable `message`. A message longer than
    /// [`MAX_MESSAGE`] bytes is cut there (messages may quote the client's input, and
    /// must not echo a megabyte back).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            let total = message.len();
            message.truncate(end);
            message.push_str(&format!("… ({total} bytes)"));
        }
        ProtocolError {
            code,
            message,
            consumer: None,
            retry_after_ms: None,
            blameless: false,
        }
    }

    /// The same error, with a retry hint.
    pub fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after_ms = Some(wait.as_millis().try_into().unwrap_or(u64::MAX));
        self
    }

    /// The same error, about consumer `name`.
    pub fn with_consumer(mut self, name: &str) -> Self {
        self.consumer = Some(name.to_owned());
        self
    }

    /// The `$error` line (with its trailing `\n`) that tells the client about this error.
    pub fn to_frame(&self) -> Bytes {
        #[derive(Serialize)]
        struct Wire<'a> {
            event: &'static str,
            payload: Payload<'a>,
        }
        #[derive(Serialize)]
        struct Payload<'a> {
            code: ErrorCode,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            consumer: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            retry_after_ms: Option<u64>,
        }
        let wire = Wire {
            event: "$error",
            payload: Payload {
                code: self.code,
                message: &self.message,
                consumer: self.consumer.as_deref(),
                retry_after_ms: self.retry_after_ms,
            },
        };
        let mut line = serde_json::to_vec(&wire).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// The most bytes of a client's own input quoted back in a `$error` message or a log
/// line (issue #10: a 512 KiB pattern was echoed whole, into the log too).
pub const MAX_EXCERPT: usize = 200;

/// The longest `$error` message, in bytes.
pub const MAX_MESSAGE: usize = 400;

/// `text` made safe for one log line: control characters (newlines, carriage
/// returns, escape sequences) written as escapes, and at most [`MAX_MESSAGE`] bytes of
/// it. Unlike [`excerpt`] it is not quoted: for messages that are the hub's own words
/// with the client's text quoted inside.
///
/// # Examples
///
/// ```
/// use hubcast::protocol::printable;
/// assert_eq!(printable("plain"), "plain");
/// assert_eq!(printable("a\nforged line\r"), "a\\nforged line\\r");
/// ```
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= MAX_MESSAGE && !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE) + 16);
    for c in text.chars() {
        if out.len() >= MAX_MESSAGE {
            out.push_str(&format!("… ({} bytes)", text.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Client-supplied text made safe to quote in a message or a log line: as a quoted,
/// escaped string (so a newline cannot forge a log line), at most [`MAX_EXCERPT`]
/// bytes of it, then `…` and the full length.
///
/// # Examples
///
/// ```
/// use hubcast::protocol::excerpt;
/// assert_eq!(excerpt("a\nb").to_string(), r#""a\nb""#);
/// let long = "x".repeat(1000);
/// assert!(excerpt(&long).to_string().ends_with("…\" (1000 bytes)"));
/// ```
pub fn excerpt(text: &str) -> Excerpt<'_> {
    Excerpt(text)
}

/// See [`excerpt`].
#[derive(Debug, Clone, Copy)]
pub struct Excerpt<'a>(&'a str);

impl fmt::Display for Excerpt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.len() <= MAX_EXCERPT {
            return write!(f, "{text:?}");
        }
        let mut end = MAX_EXCERPT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let quoted = format!("{:?}", &text[..end]);
        write!(
            f,
            "{}…\" ({} bytes)",
            &quoted[..quoted.len() - 1],
            text.len()
        )
    }
}

/// The `$error` `events_dropped` notice: `count` events did not fit in this client's
/// queue and were discarded (`--slow-consumer drop`).
pub(crate) fn events_dropped_frame(count: usize) -> Bytes {
    let line = format!(
        "{{\"event\":\"$error\",\"payload\":{{\"code\":\"events_dropped\",\"message\":\"{count} events did not fit in this client's queue and were dropped\",\"count\":{count}}}}}\n"
    );
    Bytes::from(line)
}
