//! The control protocol: `$`-named events a client sends to the hub itself.
//!
//! Each is answered on the same connection, in order: `$hello` → `$welcome`,
//! `$subscribe` → `$subscribed`, `$unsubscribe` → `$unsubscribed`, `$join` → `$joined`,
//! `$leave` → `$left`, `$ping` → `$pong`, `$stats` → `$stats`; a malformed one → `$error` naming the problem.
//! Control events are never broadcast. A client that never sends one behaves exactly
//! as in protocol v1. One module per request (`hello`, `subscribe`, `room`, `ping`),
//! as mini-redis has one per command; `liveness` keeps the timers behind `$hello
//! {heartbeat}` and the hub's idle timeout. A new request is a new module and one line
//! in [`handle`].

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::event::Event;
use crate::hub::{Hub, Member};
use crate::protocol::{ErrorCode, ProtocolError};

mod consume;
mod hello;
mod liveness;
mod ping;
mod room;
mod stats;
mod subscribe;

pub use hello::PROTOCOL_VERSION;
pub(crate) use liveness::{Due, Liveness};

/// What a connection knows of its peer that control requests need.
#[derive(Debug)]
pub(crate) struct Session {
    /// The peer's address (failed authentications count against it), in parts: an
    /// `IpAddr` and a port take 12 bytes less than a `SocketAddr`, and every
    /// connection's task carries them.
    ip: std::net::IpAddr,
    port: u16,
    /// The hub requires authentication and this connection has not authenticated yet.
    pub(crate) awaiting_hello: bool,
}

impl Session {
    pub(crate) fn new(peer: std::net::SocketAddr, awaiting_hello: bool) -> Self {
        Session {
            ip: peer.ip(),
            port: peer.port(),
            awaiting_hello,
        }
    }

    /// The peer's address.
    pub(crate) fn peer(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, self.port)
    }
}

/// One control request: who sent it, on which connection, and the event itself.
pub(crate) struct Request<'a> {
    pub(crate) hub: &'a Hub,
    pub(crate) client: &'a std::sync::Arc<Member>,
    pub(crate) liveness: &'a mut Liveness,
    pub(crate) session: &'a mut Session,
    pub(crate) event: &'a Event,
}

impl Request<'_> {
    /// The request's name (`$hello`, ...).
    fn name(&self) -> &str {
        self.event.name().as_str()
    }

    /// The payload, parsed as `T`, or `invalid_payload`.
    fn payload<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        serde_json::from_str(self.event.payload())
            .map_err(|e| invalid_payload(self.name(), &e.to_string()))
    }
}

/// Handles one control event from `client`; returns the reply line to send it.
///
/// # Errors
///
/// A [`ProtocolError`] for the client: an unknown `$` name (`reserved_event`), a payload
/// of the wrong shape (`invalid_payload`), a bad pattern or room, or a limit.
pub(crate) fn handle(
    hub: &Hub,
    client: &std::sync::Arc<Member>,
    liveness: &mut Liveness,
    session: &mut Session,
    event: &Event,
) -> Result<Option<Bytes>, ProtocolError> {
    let mut request = Request {
        hub,
        client,
        liveness,
        session,
        event,
    };
    let reply = match request.name() {
        "$hello" => hello::apply(&mut request),
        "$subscribe" => subscribe::subscribe(&request),
        "$unsubscribe" => subscribe::unsubscribe(&request),
        "$join" => room::join(&request),
        "$leave" => room::leave(&request),
        "$ping" => ping::apply(&request),
        "$stats" => stats::apply(&request),
        "$consume" => return consume::consume(&request),
        "$ack" => return consume::ack(&request),
        "$nack" => return consume::nack(&request),
        "$unconsume" => return consume::unconsume(&request),
        // The answer to our `$ping` (the connection counts one that was not asked for
        // against the error budget before it gets here).
        "$pong" => return Ok(None),
        name => {
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

pub(crate) fn reply<T: Serialize>(name: &str, payload: &T) -> Result<Bytes, ProtocolError> {
    Event::new(name, payload).map(|e| e.line().clone())
}

/// `permission_denied`: the identity may not do `what`.
pub(crate) fn denied(what: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::PermissionDenied, format!("not allowed: {what}"))
}

pub(crate) fn invalid_payload(name: &str, why: &str) -> ProtocolError {
    ProtocolError::new(
        ErrorCode::InvalidPayload,
        format!("invalid {name} payload: {why}"),
    )
}
