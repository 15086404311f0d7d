//! `$subscribe` → `$subscribed` and `$unsubscribe` → `$unsubscribed`: name patterns a
//! client wants to hear (after its first subscription, only matches).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{invalid_payload, reply, Request};
use crate::hub::Hub;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::routing::Pattern;

#[derive(Deserialize, Serialize)]
struct Patterns {
    events: Vec<String>,
}

pub(super) fn subscribe(request: &Request<'_>) -> Result<Bytes, ProtocolError> {
    let wanted: Patterns = request.payload()?;
    let patterns = patterns(request.hub, request.name(), &wanted.events)?;
    if let Some(permissions) = request.client.access.permissions() {
        if let Some(p) = patterns
            .iter()
            .find(|p| !permissions.subscribe.allows_pattern(p))
        {
            return Err(super::denied(format!(
                "subscribing to {} (it could match events this identity may not hear)",
                crate::protocol::excerpt(p.as_str())
            )));
        }
    }
    request.hub.subscribe(request.client.id, &patterns)?;
    reply("$subscribed", &wanted)
}

pub(super) fn unsubscribe(request: &Request<'_>) -> Result<Bytes, ProtocolError> {
    let unwanted: Patterns = request.payload()?;
    let patterns = patterns(request.hub, request.name(), &unwanted.events)?;
    request.hub.unsubscribe(request.client.id, &patterns);
    reply("$unsubscribed", &unwanted)
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
