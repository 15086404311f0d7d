//! The control protocol: `$`-named events a client sends to the hub itself.
//!
//! Each is answered on the same connection, in order: `$hello` → `$welcome`,
//! `$subscribe` → `$subscribed`, `$unsubscribe` → `$unsubscribed`, `$join` → `$joined`,
//! `$leave` → `$left`, `$ping` → `$pong`; a malformed one → `$error` naming the problem.
//! Control events are never broadcast. A client that never sends one behaves exactly
//! as in protocol v1. [`Liveness`] keeps the timers behind `$hello {heartbeat}` and the
//! hub's idle timeout.

use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::time::Instant;

use crate::event::{Event, RoomName};
use crate::hub::{Hub, Member};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::routing::Pattern;

/// The longest heartbeat interval a client may ask for, in seconds.
const MAX_HEARTBEAT_SECS: f64 = 86_400.0;
/// The protocol version `$welcome` announces.
pub const PROTOCOL_VERSION: u32 = 2;

#[derive(Deserialize)]
struct Hello {
    name: Option<String>,
    echo: Option<bool>,
    /// Seconds between the hub's `$ping`s.
    heartbeat: Option<f64>,
}

#[derive(Deserialize, Serialize)]
struct Patterns {
    events: Vec<String>,
}

#[derive(Deserialize, Serialize)]
struct Room {
    room: String,
}

/// Handles one control event from `client`; returns the reply line to send it.
///
/// # Errors
///
/// A [`ProtocolError`] for the client: an unknown `$` name (`reserved_event`), a payload
/// of the wrong shape (`invalid_payload`), a bad pattern or room, or a limit.
pub(crate) fn handle(
    hub: &Hub,
    client: &Member,
    liveness: &mut Liveness,
    event: &Event,
) -> Result<Option<Bytes>, ProtocolError> {
    let name = event.name().as_str();
    let reply = match name {
        "$hello" => {
            let hello: Hello = payload(event)?;
            if let Some(echo) = hello.echo {
                client
                    .echo
                    .store(echo, std::sync::atomic::Ordering::Relaxed);
            }
            let mut welcome = json!({
                "version": PROTOCOL_VERSION,
                "server": concat!("hubcast ", env!("CARGO_PKG_VERSION")),
                "id": client.id.0,
                "max_frame": hub.config().limits.max_frame,
                "max_pending": hub.config().limits.max_pending,
            });
            if let Some(seconds) = hello.heartbeat {
                if !(seconds > 0.0 && seconds <= MAX_HEARTBEAT_SECS) {
                    return Err(invalid_payload(
                        name,
                        &format!("heartbeat must be seconds between 0 and {MAX_HEARTBEAT_SECS}"),
                    ));
                }
                liveness.set_heartbeat(Duration::from_secs_f64(seconds));
                welcome["heartbeat"] = json!(seconds);
            }
            if let Some(client_name) = hello.name {
                welcome["name"] = json!(client_name);
            }
            reply("$welcome", &welcome)
        }
        "$subscribe" | "$unsubscribe" => {
            let request: Patterns = payload(event)?;
            let patterns = patterns(hub, name, &request.events)?;
            if name == "$subscribe" {
                hub.subscribe(client.id, &patterns)?;
                reply("$subscribed", &request)
            } else {
                hub.unsubscribe(client.id, &patterns);
                reply("$unsubscribed", &request)
            }
        }
        "$join" | "$leave" => {
            let request: Room = payload(event)?;
            let room = RoomName::new(request.room.as_str())?;
            if name == "$join" {
                hub.join_room(client.id, &room)?;
                reply("$joined", &request)
            } else {
                hub.leave_room(client.id, &room);
                reply("$left", &request)
            }
        }
        "$ping" => Event::new(
            "$pong",
            &serde_json::value::RawValue::from_string(event.payload().to_string())
                .map_err(|e| invalid_payload(name, &e.to_string()))?,
        )
        .map(|e| e.line().clone()),
        // The answer to our `$ping` (the connection counts one that was not asked for
        // against the error budget before it gets here).
        "$pong" => return Ok(None),
        _ => {
            return Err(ProtocolError::new(
                ErrorCode::ReservedEvent,
                format!(
                    "the hub knows no event named {name:?}; names starting with '$' are reserved"
                ),
            ))
        }
    };
    reply.map(Some)
}

/// Checks a `$subscribe`/`$unsubscribe` list: its size first (before any pattern is
/// parsed), then each pattern and its segments; returns the distinct patterns in the
/// order given. All outside the pool's lock, in time linear in the request.
fn patterns(hub: &Hub, name: &str, texts: &[String]) -> Result<Vec<Pattern>, ProtocolError> {
    let config = hub.config();
    if texts.is_empty() {
        return Err(invalid_payload(
            name,
            "\"events\" must list at least one pattern",
        ));
    }
    if texts.len() > config.limits.max_subscriptions {
        return Err(ProtocolError::new(
            ErrorCode::LimitExceeded,
            format!(
                "{name} lists {} patterns; a connection may hold at most {}",
                texts.len(),
                config.limits.max_subscriptions
            ),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(texts.len());
    let mut patterns = Vec::with_capacity(texts.len());
    for text in texts {
        if !seen.insert(text.as_str()) {
            continue;
        }
        let pattern = Pattern::parse(text)?;
        if pattern.segments() > config.limits.max_pattern_segments {
            return Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "pattern {} has {} segments; the limit is {}",
                    crate::protocol::excerpt(text),
                    pattern.segments(),
                    config.limits.max_pattern_segments
                ),
            ));
        }
        patterns.push(pattern);
    }
    Ok(patterns)
}

fn reply<T: Serialize>(name: &str, payload: &T) -> Result<Bytes, ProtocolError> {
    Event::new(name, payload).map(|e| e.line().clone())
}

fn payload<T: DeserializeOwned>(event: &Event) -> Result<T, ProtocolError> {
    serde_json::from_str(event.payload())
        .map_err(|e| invalid_payload(event.name().as_str(), &e.to_string()))
}

fn invalid_payload(name: &str, why: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InvalidPayload,
        format!("invalid {name} payload: {why}"),
    )
}

/// When a connection must hear from its client: the hub's idle timeout, and the
/// heartbeat a client asked for (a `$ping` every interval; two intervals of silence
/// close it).
#[derive(Debug)]
pub(crate) struct Liveness {
    idle: Option<Duration>,
    heartbeat: Option<Duration>,
    last_heard: Instant,
    next_ping: Option<Instant>,
    /// `$ping`s sent and not answered yet: a `$pong` beyond them was not asked for.
    pings_out: u32,
}

/// What the timer asks the connection to do.
pub(crate) enum Due {
    Nothing,
    Ping,
    Close(ProtocolError),
}

impl Liveness {
    pub(crate) fn new(idle: Option<Duration>) -> Self {
        Liveness {
            idle,
            heartbeat: None,
            last_heard: Instant::now(),
            next_ping: None,
            pings_out: 0,
        }
    }

    /// Records that the client sent something.
    pub(crate) fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    /// Takes a `$pong`: `false` if no `$ping` was waiting for one.
    pub(crate) fn answered(&mut self) -> bool {
        let asked = self.pings_out > 0;
        self.pings_out = self.pings_out.saturating_sub(1);
        asked
    }

    fn set_heartbeat(&mut self, every: Duration) {
        self.heartbeat = Some(every);
        self.next_ping = Instant::now().checked_add(every);
    }

    /// The next moment something is due, if any timer is set.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        // Checked: a deadline past the clock's range is never (no overflow panic).
        let idle = self.idle.and_then(|d| self.last_heard.checked_add(d));
        let silent = self
            .heartbeat
            .and_then(|d| self.last_heard.checked_add(d.saturating_mul(2)));
        [idle, silent, self.next_ping].into_iter().flatten().min()
    }

    /// Decides what is due now.
    pub(crate) fn fire(&mut self) -> Due {
        let now = Instant::now();
        let quiet = now.saturating_duration_since(self.last_heard);
        if let Some(idle) = self.idle.filter(|&d| quiet >= d) {
            return Due::Close(ProtocolError::new(
                ErrorCode::IdleTimeout,
                format!("nothing received for {idle:?}; closing the connection"),
            ));
        }
        if let Some(every) = self.heartbeat.filter(|&d| quiet >= d * 2) {
            return Due::Close(ProtocolError::new(
                ErrorCode::HeartbeatTimeout,
                format!(
                    "no answer to heartbeats for {:?}; closing the connection",
                    every * 2
                ),
            ));
        }
        match (self.next_ping, self.heartbeat) {
            (Some(at), Some(every)) if at <= now => {
                self.next_ping = now.checked_add(every);
                self.pings_out = self.pings_out.saturating_add(1);
                Due::Ping
            }
            _ => Due::Nothing,
        }
    }
}
