//! The pool: who is connected, and who wants what (subscriptions and rooms).
//!
//! Membership changes take the pool's write lock briefly; fan-out (`fanout.rs`) reads
//! it. What a client wants is decided here ([`Pool::wants`], [`Pool::echo_skip`]), so
//! both fan-out paths ask the same questions.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::SlowConsumerPolicy;
use crate::event::RoomName;
use crate::outbox::Outbox;
use crate::protocol::{ErrorCode, ProtocolError};
use crate::routing::{Pattern, Router};

use super::{ClientId, CloseReason, Hub, HubEvent};

/// A connected client as the pool holds it: a *member* of the pool (the library's own
/// [`client::Client`](crate::client::Client) is the other end of a connection).
pub(crate) struct Member {
    pub(crate) id: ClientId,
    pub(crate) outbox: Outbox,
    /// Whether it hears its own events (the hub's default, or its `$hello`).
    pub(crate) echo: AtomicBool,
    /// Who it is and what it may do (with authentication on).
    pub(crate) access: super::access::Access,
    /// How it reached the hub.
    pub(crate) transport: crate::metrics::TransportKind,
}

/// Who is connected and who wants what. One lock guards it all, so a broadcast sees
/// a consistent picture; it is only held for synchronous, short work.
#[derive(Default)]
pub(super) struct Pool {
    pub(super) clients: HashMap<ClientId, Arc<Member>>,
    /// Clients that never subscribed: they hear every event that names no room.
    pub(super) unfiltered: HashMap<ClientId, Arc<Member>>,
    /// Clients that never subscribed but may not hear everything (their identity's
    /// `subscribe` rules): they hear what those allow, checked once per run of events
    /// per set of rules.
    pub(super) guarded: HashMap<ClientId, Arc<Member>>,
    pub(super) router: Router<ClientId>,
    /// Subscriptions and rooms, for clients that have any.
    routes: HashMap<ClientId, Routes>,
    pub(super) rooms: HashMap<RoomName, HashSet<ClientId>>,
}

/// One client's subscriptions and rooms.
#[derive(Default)]
struct Routes {
    /// Set by the first `$subscribe`: from then on only matches are heard.
    subscribed: bool,
    patterns: HashSet<Pattern, foldhash::fast::RandomState>,
    /// The patterns' total length, against `Limits::max_pattern_bytes`.
    pattern_bytes: usize,
    rooms: Vec<RoomName>,
}

impl Pool {
    /// Subscription patterns held, and rooms with members.
    pub(super) fn routing_counts(&self) -> (usize, usize) {
        let patterns = self.routes.values().map(|r| r.patterns.len()).sum();
        (patterns, self.rooms.len())
    }

    /// What the clients here want from other nodes (see [`crate::cluster`]).
    pub(super) fn interest(&self) -> crate::cluster::Interest {
        use crate::cluster::MAX_INTEREST;
        let mut everything = !self.unfiltered.is_empty() || !self.guarded.is_empty();
        let mut patterns = std::collections::BTreeSet::new();
        if !everything {
            for pattern in self.routes.values().flat_map(|r| r.patterns.iter()) {
                if !patterns.contains(pattern.as_str()) {
                    if patterns.len() == MAX_INTEREST {
                        everything = true;
                        patterns.clear();
                        break;
                    }
                    patterns.insert(pattern.as_str().to_string());
                }
            }
        }
        let all_rooms = self.rooms.len() > MAX_INTEREST;
        let rooms = if all_rooms {
            Default::default()
        } else {
            self.rooms.keys().map(|r| r.as_str().to_string()).collect()
        };
        crate::cluster::Interest {
            everything,
            patterns,
            all_rooms,
            rooms,
        }
    }

    /// Whether `id` wants an event named `name` (rooms aside).
    pub(super) fn wants(&self, id: ClientId, name: &str) -> bool {
        match self.routes.get(&id) {
            Some(routes) if routes.subscribed => routes.patterns.iter().any(|p| p.matches(name)),
            _ => true,
        }
    }

    /// Who must not get `from`'s own events: `from`, if its echo is off.
    pub(super) fn echo_skip(&self, from: ClientId) -> Option<ClientId> {
        self.clients
            .get(&from)
            .filter(|c| !c.echo.load(Ordering::Relaxed))
            .map(|c| c.id)
    }
}

impl Hub {
    /// Adds `patterns` (distinct, already checked) to a client's subscriptions;
    /// patterns it holds already are skipped. After its first subscription a client
    /// hears only events that match one. Nothing is applied if a limit would be passed.
    pub(crate) fn subscribe(
        &self,
        id: ClientId,
        patterns: &[Pattern],
    ) -> Result<(), ProtocolError> {
        let config = &self.state.config;
        let mut guard = self.write_pool();
        let pool = &mut *guard;
        let routes = pool.routes.entry(id).or_default();
        // Linear: one hash lookup per pattern (issue #10: this was quadratic).
        let fresh: Vec<&Pattern> = patterns
            .iter()
            .filter(|p| !routes.patterns.contains(*p))
            .collect();
        let count = routes.patterns.len() + fresh.len();
        if count > config.limits.max_subscriptions {
            return Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "a connection may hold at most {} subscriptions; this one holds {} and asked for {} more",
                    config.limits.max_subscriptions,
                    routes.patterns.len(),
                    fresh.len()
                ),
            ));
        }
        let bytes = routes.pattern_bytes + fresh.iter().map(|p| p.as_str().len()).sum::<usize>();
        if bytes > config.limits.max_pattern_bytes {
            return Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "a connection's patterns may total at most {} bytes; these would make {bytes}",
                    config.limits.max_pattern_bytes
                ),
            ));
        }
        if !routes.subscribed {
            routes.subscribed = true;
            pool.unfiltered.remove(&id);
            pool.guarded.remove(&id);
        }
        routes.pattern_bytes = bytes;
        for pattern in fresh {
            routes.patterns.insert(pattern.clone());
            pool.router.insert(pattern, id);
        }
        drop(guard);
        self.interest_changed();
        Ok(())
    }

    /// Removes `patterns` from a client's subscriptions (those it does not hold are
    /// ignored). A client that unsubscribes from everything hears nothing until it
    /// subscribes again.
    pub(crate) fn unsubscribe(&self, id: ClientId, patterns: &[Pattern]) {
        let mut guard = self.write_pool();
        let pool = &mut *guard;
        let Some(routes) = pool.routes.get_mut(&id) else {
            return;
        };
        for pattern in patterns {
            if routes.patterns.remove(pattern) {
                routes.pattern_bytes -= pattern.as_str().len();
                pool.router.remove(pattern, id);
            }
        }
        drop(guard);
        self.interest_changed();
    }

    /// Makes a client a member of `room` (idempotent).
    pub(crate) fn join_room(&self, id: ClientId, room: &RoomName) -> Result<(), ProtocolError> {
        let max = self.state.config.limits.max_rooms;
        let mut guard = self.write_pool();
        let pool = &mut *guard;
        let routes = pool.routes.entry(id).or_default();
        if routes.rooms.contains(room) {
            return Ok(());
        }
        if routes.rooms.len() >= max {
            return Err(ProtocolError::new(
                ErrorCode::LimitExceeded,
                format!("a connection may be in at most {max} rooms"),
            ));
        }
        routes.rooms.push(room.clone());
        pool.rooms.entry(room.clone()).or_default().insert(id);
        drop(guard);
        self.interest_changed();
        Ok(())
    }

    /// Takes a client out of `room` (nothing happens if it was not in it).
    pub(crate) fn leave_room(&self, id: ClientId, room: &RoomName) {
        let mut guard = self.write_pool();
        let pool = &mut *guard;
        if let Some(routes) = pool.routes.get_mut(&id) {
            routes.rooms.retain(|r| r != room);
        }
        remove_member(&mut pool.rooms, room, id);
        drop(guard);
        self.interest_changed();
    }

    /// Adds a new client to the pool. One that must authenticate first (`open` false)
    /// hears nothing until [`Hub::admit`].
    pub(crate) fn join(
        &self,
        peer: SocketAddr,
        open: bool,
        transport: crate::metrics::TransportKind,
    ) -> Arc<Member> {
        let id = ClientId(self.state.next_id.fetch_add(1, Ordering::Relaxed));
        let client = Arc::new(Member {
            id,
            outbox: Outbox::new(
                self.state.config.limits.max_pending,
                self.state.config.delivery.slow_consumer == SlowConsumerPolicy::Drop,
            ),
            echo: AtomicBool::new(self.state.config.delivery.echo),
            access: Default::default(),
            transport,
        });
        {
            let mut pool = self.write_pool();
            pool.clients.insert(id, Arc::clone(&client));
            if open {
                pool.unfiltered.insert(id, Arc::clone(&client));
            }
            self.state.count.send_replace(pool.clients.len());
        }
        if open {
            self.interest_changed();
            if let Some(gap) = self.gap_notice() {
                let _ = client.outbox.push(gap);
            }
        }
        self.report(|| HubEvent::Connection { client: id, peer });
        client
    }

    /// Lets a client that authenticated (or whose permissions changed on a reload)
    /// hear what its identity allows: everything if it may hear everything and never
    /// subscribed; else, until it subscribes, what its rules allow. Its own
    /// subscriptions and rooms that the permissions no longer allow are dropped and
    /// returned, to tell it.
    pub(crate) fn admit(
        &self,
        client: &Arc<Member>,
        identity: crate::auth::Identity,
    ) -> Vec<String> {
        let id = client.id;
        let permissions = Arc::clone(&identity.permissions);
        client.access.set(identity);
        let hear = &permissions.subscribe;
        let mut guard = self.write_pool();
        let pool = &mut *guard;
        if !pool.clients.contains_key(&id) {
            return Vec::new();
        }
        let routes = pool.routes.entry(id).or_default();
        let mut dropped = Vec::new();
        if routes.subscribed {
            let forbidden: Vec<Pattern> = routes
                .patterns
                .iter()
                .filter(|p| !hear.allows_pattern(p))
                .cloned()
                .collect();
            for pattern in forbidden {
                routes.patterns.remove(&pattern);
                routes.pattern_bytes -= pattern.as_str().len();
                pool.router.remove(&pattern, id);
                dropped.push(format!("subscription {}", pattern.as_str()));
            }
        } else if hear.allows_everything() {
            pool.guarded.remove(&id);
            pool.unfiltered.insert(id, Arc::clone(client));
        } else {
            pool.unfiltered.remove(&id);
            pool.guarded.insert(id, Arc::clone(client));
        }
        let (kept, gone): (Vec<RoomName>, Vec<RoomName>) = std::mem::take(&mut routes.rooms)
            .into_iter()
            .partition(|room| permissions.rooms.allows(room.as_str()));
        routes.rooms = kept;
        for room in gone {
            remove_member(&mut pool.rooms, &room, id);
            dropped.push(format!("room {}", room.as_str()));
        }
        drop(guard);
        self.interest_changed();
        dropped
    }

    /// Removes a client from the pool.
    pub(crate) fn leave(&self, client: ClientId, reason: CloseReason) {
        {
            let mut guard = self.write_pool();
            let pool = &mut *guard;
            pool.clients.remove(&client);
            pool.unfiltered.remove(&client);
            pool.guarded.remove(&client);
            if let Some(routes) = pool.routes.remove(&client) {
                for pattern in &routes.patterns {
                    pool.router.remove(pattern, client);
                }
                for room in &routes.rooms {
                    remove_member(&mut pool.rooms, room, client);
                }
            }
            self.state.count.send_replace(pool.clients.len());
        }
        self.interest_changed();
        // What was out to it for durable consumers goes to their other members.
        if let Some(consumers) = &self.durable().consumers {
            consumers.left(client);
        }
        if let Some(jetstream) = &self.durable().jetstream {
            jetstream.left(client);
        }
        self.report(|| HubEvent::Close {
            client,
            had_error: reason.had_error(),
            reason,
        });
    }
}

/// Removes `id` from `room`, forgetting rooms left empty.
fn remove_member(rooms: &mut HashMap<RoomName, HashSet<ClientId>>, room: &RoomName, id: ClientId) {
    if let Some(members) = rooms.get_mut(room) {
        members.remove(&id);
        if members.is_empty() {
            rooms.remove(room);
        }
    }
}
