//! `$hello` → `$welcome`: the client says who it is and what it wants (its echo, a
//! heartbeat); the hub answers with the protocol version and its limits.

use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;

use tokio::time::Instant;

use super::{invalid_payload, reply, Request};
use crate::auth::{AuthError, Identity};
use crate::hub::HubEvent;
use crate::protocol::{ErrorCode, ProtocolError};

/// The longest heartbeat interval a client may ask for, in seconds.
const MAX_HEARTBEAT_SECS: f64 = 86_400.0;
/// The protocol version `$welcome` announces.
pub const PROTOCOL_VERSION: u32 = 3;

#[derive(Deserialize)]
struct Hello {
    /// The identity to authenticate as (optional: a token or JWT can say it).
    user: Option<String>,
    /// The secret: an auth-file token or a JWT.
    token: Option<String>,
    name: Option<String>,
    echo: Option<bool>,
    /// Seconds between the hub's `$ping`s.
    heartbeat: Option<f64>,
}

pub(super) fn apply(request: &mut Request<'_>) -> Result<Bytes, ProtocolError> {
    let hello: Hello = match request.payload() {
        Ok(hello) => hello,
        Err(e) if request.session.awaiting_hello => {
            return Err(ProtocolError::new(ErrorCode::AuthRequired, e.message));
        }
        Err(e) => return Err(e),
    };
    // This `$hello` lets the client in (the hub authenticates): it hears from now on.
    let admission = request.session.awaiting_hello;
    let identity = authenticate(request, hello.user.as_deref(), hello.token.as_deref())?;
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
    if let Some(identity) = identity.or_else(|| client.access.identity()) {
        welcome["user"] = json!(identity.name);
        welcome["auth"] = json!(identity.method.as_str());
        if let Some(expires) = identity.expires {
            let secs = expires
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            welcome["expires"] = json!(secs);
        }
        if identity.permissions.admin {
            welcome["admin"] = json!(true);
        }
    }
    let welcome = reply("$welcome", &welcome)?;
    // A cluster node cut off from the others says so to those it lets in meanwhile
    // (an open hub's clients were told when they connected).
    match hub.gap_notice().filter(|_| admission) {
        Some(gap) => Ok([welcome, gap].concat().into()),
        None => Ok(welcome),
    }
}

/// Checks the credentials of a `$hello`, if it carries any (or must): on success the
/// connection takes the identity and hears what it allows; a failure closes it
/// (`auth_failed`) and makes its address wait before its next attempt is read.
fn authenticate(
    request: &mut Request<'_>,
    user: Option<&str>,
    token: Option<&str>,
) -> Result<Option<Identity>, ProtocolError> {
    let (hub, client) = (request.hub, request.client);
    let Some(auth) = hub.authenticator() else {
        // The hub is open: credentials are not needed, and not checked.
        return Ok(None);
    };
    let Some(token) = token else {
        if request.session.awaiting_hello {
            return Err(ProtocolError::new(
                ErrorCode::AuthRequired,
                "this hub requires authentication: the first frame must be {\"event\":\"$hello\",\"payload\":{\"token\":...}}",
            ));
        }
        return Ok(None);
    };
    let peer = request.session.peer();
    let identity = match auth.authenticate(user, token) {
        Ok(identity) => identity,
        Err(e) => {
            hub.penalties().failed(peer.ip());
            let id = client.id;
            let reason = e.to_string();
            hub.report(|| HubEvent::AuthFailed {
                client: id,
                peer,
                reason,
            });
            let message = match e {
                AuthError::Expired => "the token has expired; closing the connection",
                _ => "invalid credentials; closing the connection",
            };
            return Err(ProtocolError::new(ErrorCode::AuthFailed, message));
        }
    };
    if let Some(current) = client.access.identity() {
        if current.name != identity.name {
            return Err(ProtocolError::new(
                ErrorCode::AuthFailed,
                format!(
                    "this connection is {:?}; it cannot become {:?} (open a new connection)",
                    current.name, identity.name
                ),
            ));
        }
    }
    // Close when the credentials expire (a fresh `$hello` moves it), else never.
    let expiry = identity.expires.map(|at| {
        let left = at
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        (Instant::now() + left, ErrorCode::TokenExpired)
    });
    request.liveness.set_expiry(expiry);
    request.session.awaiting_hello = false;
    let id = client.id;
    let name = identity.name.clone();
    hub.report(|| HubEvent::Authenticated {
        client: id,
        peer,
        user: name,
    });
    for what in hub.admit(client, identity.clone()) {
        client.outbox.push(
            super::denied(format!(
                "{what}: removed, the new credentials do not allow it"
            ))
            .to_frame(),
        );
    }
    Ok(Some(identity))
}
