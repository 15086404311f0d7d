//! Several hubs as one: the backplane that carries live events between nodes.
//!
//! Each node keeps its own clients, validation, limits and authentication. A client's
//! event is fanned out on its own node as on a single hub, and handed to the
//! [`Backplane`], which carries it to the other nodes; each of them fans it out to
//! its own clients as if one of them had sent it (no echo: the sender is elsewhere).
//!
//! What a node receives is what its clients want: the hub tells its backplane when
//! the [`Interest`] of its clients changes (a client that hears everything, the
//! patterns subscribed to, the rooms with members), and the backplane subscribes to
//! just that. The engine is NATS ([`nats`]): hubcast's patterns are its subject
//! wildcards ([`subject`]), and its routing is interest-based.

use std::collections::BTreeSet;
use std::time::SystemTime;

pub mod jetstream;
pub mod nats;
pub mod subject;

/// Past this many distinct patterns (or rooms), a node asks for all events (or all
/// rooms' events) instead: the engine's subscriptions stay bounded whatever clients
/// subscribe to, at the price of receiving more and filtering here.
pub const MAX_INTEREST: usize = 4096;

/// What a node's clients want from the other nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interest {
    /// Some client hears every event that names no room (it never subscribed), or
    /// the clients' patterns are more than [`MAX_INTEREST`].
    pub everything: bool,
    /// The patterns its clients subscribed to (empty when `everything`: they are
    /// covered).
    pub patterns: BTreeSet<String>,
    /// Rooms have members here in more than [`MAX_INTEREST`] rooms: every room's
    /// events are wanted.
    pub all_rooms: bool,
    /// The rooms with members here (empty when `all_rooms`).
    pub rooms: BTreeSet<String>,
}

/// Where a backplane stands, for `/readyz`, `/metrics` and `$stats`.
#[derive(Debug, Clone)]
pub struct BackplaneStatus {
    /// The engine, e.g. `"nats"`.
    pub engine: &'static str,
    /// This node's name.
    pub node: String,
    /// Whether events cross to the other nodes now.
    pub connected: bool,
    /// The server it is connected to (when connected).
    pub server: Option<String>,
    /// Since when it has been cut off (when not connected).
    pub down_since: Option<SystemTime>,
    /// Events handed to the other nodes.
    pub published: u64,
    /// Events received from the other nodes.
    pub received: u64,
    /// Events not handed over: cut off, or the send buffer full.
    pub dropped: u64,
    /// Frames from the backplane that were not valid events of their subject (not
    /// from a hub): not delivered.
    pub rejected: u64,
    /// Times the link was lost and made again.
    pub reconnects: u64,
    /// Subscriptions held in the engine for this node's clients.
    pub subscriptions: usize,
}

/// Carries live events between hub nodes. [`nats::NatsBackplane`] is the one engine
/// today; the trait is what another (Redis) would implement.
pub trait Backplane: Send + Sync + 'static {
    /// Hands a client's event (its validated line, `\n` included) to the other
    /// nodes. Never waits: when the link is down or its buffer full, the event is
    /// counted as dropped (its receivers on other nodes are told of the gap).
    fn publish(&self, name: &str, room: Option<&str>, line: &[u8]);
    /// The hub's [`Interest`] changed: the backplane reads it again
    /// ([`Hub::interest`](crate::Hub::interest)), soon, not necessarily at once.
    fn interest_changed(&self);
    /// Where it stands.
    fn status(&self) -> BackplaneStatus;
    /// Since when it has been cut off from the other nodes (`None`: connected).
    fn down_since(&self) -> Option<SystemTime> {
        let status = self.status();
        (!status.connected).then(|| status.down_since.unwrap_or_else(SystemTime::now))
    }
}

/// The `$gap` notice clients get when their node loses the other nodes (`since`) and
/// when it has them again (`until`): live events in between may be missing.
pub(crate) fn gap_line(edge: &str, at: SystemTime) -> bytes::Bytes {
    let time = humantime::format_rfc3339_millis(at).to_string();
    let mut line = serde_json::to_vec(&serde_json::json!({
        "event": "$gap",
        "payload": { "reason": "backplane", edge: time },
    }))
    .expect("a JSON value serialises");
    line.push(b'\n');
    bytes::Bytes::from(line)
}
