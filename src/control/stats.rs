//! `$stats`: the hub's counters, as the dashboard shows them (with authentication on,
//! only for an `admin` identity).

use bytes::Bytes;

use super::{denied, reply, Request};
use crate::protocol::ProtocolError;

pub(super) fn apply(request: &Request<'_>) -> Result<Bytes, ProtocolError> {
    if request.hub.authenticator().is_some() {
        let admin = request.client.access.permissions().is_some_and(|p| p.admin);
        if !admin {
            return Err(denied("$stats (it needs an admin identity)".into()));
        }
    }
    reply("$stats", &crate::metrics::stats_payload(request.hub))
}
