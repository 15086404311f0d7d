//! `$hello` → `$welcome`: the client says who it is and what it wants (its echo, a
//! heartbeat); the hub answers with the protocol version and its limits.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::{invalid_payload, reply, Request};
use crate::protocol::ProtocolError;

/// The longest heartbeat interval a client may ask for, in seconds.
const MAX_HEARTBEAT_SECS: f64 = 86_400.0;
/// The protocol version `$welcome` announces.
pub const PROTOCOL_VERSION: u32 = 3;

#[derive(Deserialize)]
struct Hello {
    name: Option<String>,
    echo: Option<bool>,
    /// Seconds between the hub's `$ping`s.
    heartbeat: Option<f64>,
}

pub(super) fn apply(request: &mut Request<'_>) -> Result<Bytes, ProtocolError> {
    let hello: Hello = request.payload()?;
    let (hub, client) = (request.hub, request.client);
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
                request.name(),
                &format!("heartbeat must be seconds between 0 and {MAX_HEARTBEAT_SECS}"),
            ));
        }
        request
            .liveness
            .set_heartbeat(Duration::from_secs_f64(seconds));
        welcome["heartbeat"] = json!(seconds);
    }
    if let Some(client_name) = hello.name {
        welcome["name"] = json!(client_name);
    }
    reply("$welcome", &welcome)
}
