//! `$ping` → `$pong`: the hub answers at once, echoing the payload (a client's round
//! trip). The hub's own `$ping`s, and the `$pong`s that answer them, are `Liveness`'s.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::{invalid_payload, Request};
use crate::event::Event;
use crate::protocol::ProtocolError;

pub(super) fn apply(request: &Request<'_>) -> Result<Bytes, ProtocolError> {
    let payload = RawValue::from_string(request.event.payload().to_string())
        .map_err(|e| invalid_payload(request.name(), &e.to_string()))?;
    Event::new("$pong", &payload).map(|e| e.line().clone())
}
