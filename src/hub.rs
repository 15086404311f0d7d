//! The pool of connected clients, broadcast, and the [`Hub`] handle for embedding code.
//!
//! The pool maps each [`ClientId`] to its outbound queue. Broadcasting takes the pool's
//! read lock, pushes one shared [`Bytes`](bytes::Bytes) line into every queue (a
//! reference-count increment each, never a copy or an `.await`), and lets go. Joins and
//! leaves take the write lock briefly. Everything the hub does is also reported as a
//! [`HubEvent`] to an optional observer: that is how the binary logs and how tests watch.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use crate::config::{Config, ConfigError, SlowConsumerPolicy};
use crate::event::{Event, RoomName};
use crate::frame::Run;
use crate::inbound::InboundBudget;
use crate::outbox::{Outbox, Push};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::routing::{Pattern, Router};

/// Events routed per hold of the pool's read lock: matching is bounded per event
/// (see `Limits::max_pattern_segments`), so this bounds how long a writer waits.
const EVENTS_PER_LOCK: usize = 16;

/// A connected client's number, unique for the hub's lifetime (starts at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Why a client's connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The client closed its side (end of stream).
    PeerClosed,
    /// A read or write failed (reset, broken pipe, ...).
    Io(String),
    /// The client sent something the hub cannot resynchronise after.
    Protocol(ErrorCode),
    /// The client read too slowly; its outbound queue overflowed.
    SlowConsumer,
    /// The hub shut down.
    Shutdown,
    /// The flush before closing did not finish within the drain deadline.
    DrainTimeout,
    /// The connection task ended abnormally (a bug); the client was still removed.
    Aborted,
}

impl CloseReason {
    /// Node's `had_error`: whether the connection ended because of an error.
    pub fn had_error(&self) -> bool {
        !matches!(self, CloseReason::PeerClosed | CloseReason::Shutdown)
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("closed by peer"),
            CloseReason::Io(e) => write!(f, "i/o error: {e}"),
            CloseReason::Protocol(code) => write!(f, "protocol error: {code}"),
            CloseReason::SlowConsumer => f.write_str("slow consumer"),
            CloseReason::Shutdown => f.write_str("hub shutdown"),
            CloseReason::DrainTimeout => f.write_str("drain deadline passed"),
            CloseReason::Aborted => f.write_str("connection task aborted"),
        }
    }
}

/// What happens in the hub, as the Node class's server and socket events name it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum HubEvent {
    /// The server is bound and accepting (`listening`).
    Listening {
        /// The bound address (the real port when asked for port 0).
        addr: SocketAddr,
    },
    /// A client joined the pool (`connection`).
    Connection {
        /// The new client.
        client: ClientId,
        /// Its address.
        peer: SocketAddr,
    },
    /// A valid event arrived and was queued to its receivers.
    Event {
        /// The sender.
        client: ClientId,
        /// The event.
        event: Event,
        /// How many clients it was queued to.
        receivers: usize,
    },
    /// A client's control event (`$hello`, `$subscribe`, `$join`, ...) was applied.
    Control {
        /// The client.
        client: ClientId,
        /// The control event as it sent it.
        event: Event,
    },
    /// A client sent a bad frame; it was told so with a `$error`.
    Rejected {
        /// The sender.
        client: ClientId,
        /// What was wrong.
        error: ProtocolError,
    },
    /// A client's outbound queue overflowed; it is being disconnected.
    SlowConsumer {
        /// The slow client.
        client: ClientId,
    },
    /// A client that fell behind (`SlowConsumerPolicy::Drop`) has caught up to half its
    /// queue and was told, at the gap, how many events it missed.
    EventsDropped {
        /// The client.
        client: ClientId,
        /// How many events it missed in this episode.
        count: usize,
    },
    /// Frames in progress filled `--max-inbound-memory`: connections whose frames need
    /// more memory are not read until some frees. Reported once per episode (when the
    /// first connection starts waiting).
    InboundMemoryFull {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A connection was refused at the connection limit.
    Refused {
        /// Who tried to connect.
        peer: SocketAddr,
    },
    /// A client left the pool (`close`).
    Close {
        /// The client.
        client: ClientId,
        /// Node's `had_error`.
        had_error: bool,
        /// Why.
        reason: CloseReason,
    },
    /// An error not tied to one client, such as a failed `accept` (`error`).
    Error {
        /// A description of the error.
        message: String,
    },
    /// The server stopped and every connection has ended (the server's `close`).
    Shutdown,
}

/// A function called with every [`HubEvent`]. It runs on the hub's tasks: keep it quick.
pub type Observer = Arc<dyn Fn(&HubEvent) + Send + Sync>;

/// Why [`Hub::send_to`] could not queue an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// No client with that id is connected.
    #[error("no client {0} is connected")]
    NoSuchClient(ClientId),
    /// The client's queue was full; it is being disconnected as a slow consumer.
    #[error("client {0} is a slow consumer and is being disconnected")]
    SlowConsumer(ClientId),
    /// The client is closing.
    #[error("client {0} is closing")]
    Closing(ClientId),
    /// The client's queue was full and the policy is to drop: this event was discarded.
    #[error("client {0} is behind; the event was dropped")]
    Dropped(ClientId),
}

/// A connected client as the pool holds it: a *member* of the pool (the library's own
/// [`client::Client`](crate::client::Client) is the other end of a connection).
pub(crate) struct Member {
    pub(crate) id: ClientId,
    pub(crate) outbox: Outbox,
    /// Whether it hears its own events (the hub's default, or its `$hello`).
    pub(crate) echo: AtomicBool,
}

/// Who is connected and who wants what. One lock guards it all, so a broadcast sees
/// a consistent picture; it is only held for synchronous, short work.
#[derive(Default)]
struct Pool {
    clients: HashMap<ClientId, Arc<Member>>,
    /// Clients that never subscribed: they hear every event that names no room.
    unfiltered: HashMap<ClientId, Arc<Member>>,
    router: Router<ClientId>,
    /// Subscriptions and rooms, for clients that have any.
    routes: HashMap<ClientId, Routes>,
    rooms: HashMap<RoomName, HashSet<ClientId>>,
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
    /// Whether `id` wants an event named `name` (rooms aside).
    fn wants(&self, id: ClientId, name: &str) -> bool {
        match self.routes.get(&id) {
            Some(routes) if routes.subscribed => routes.patterns.iter().any(|p| p.matches(name)),
            _ => true,
        }
    }
}

/// How far [`Hub::publish_run`] got with a run.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RunProgress {
    /// The next event to match.
    next: usize,
    /// How many clients took the whole chunk (those that hear everything).
    everyone: usize,
}

/// What the pushes of one fan-out did.
#[derive(Default)]
struct Tally {
    /// Pushes queued (of whole runs or single events).
    queued: usize,
    /// Events discarded under the drop policy.
    dropped: usize,
    /// Clients whose drop episode ended, with how many events they missed.
    resumed: Vec<(ClientId, usize)>,
}

impl Tally {
    fn count(&mut self, client: &Member, push: Push, events: usize) {
        match push {
            Push::Queued => self.queued += 1,
            Push::Resumed(missed) => {
                self.queued += 1;
                self.resumed.push((client.id, missed));
            }
            Push::Dropped => self.dropped += events,
            Push::ResumedThenDropped(missed) => {
                self.dropped += events;
                self.resumed.push((client.id, missed));
            }
            Push::Overflow | Push::Closed => {}
        }
    }
}

/// Counters since the hub started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Valid events received from clients.
    pub events: u64,
    /// Event lines queued to receivers (one event to ten clients is ten).
    pub deliveries: u64,
    /// Frames rejected with a `$error`.
    pub rejected: u64,
    /// Clients disconnected as slow consumers.
    pub slow_consumers: u64,
    /// Deliveries discarded under `SlowConsumerPolicy::Drop`.
    pub dropped: u64,
    /// Connections refused at the connection limit.
    pub refused: u64,
    /// Times a connection had to wait to be read because frames in progress had
    /// filled `--max-inbound-memory`.
    pub inbound_waits: u64,
}

#[derive(Default)]
struct Counters {
    events: AtomicU64,
    deliveries: AtomicU64,
    rejected: AtomicU64,
    slow_consumers: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    inbound_waits: AtomicU64,
}

struct HubState {
    config: Config,
    pool: RwLock<Pool>,
    /// The pool size, for anyone waiting for clients to come or go.
    count: watch::Sender<usize>,
    next_id: AtomicU64,
    observer: Option<Observer>,
    counters: Counters,
    /// What read buffers may hold in all (`--max-inbound-memory`).
    inbound: InboundBudget,
}

/// The hub: the pool of clients and everything that can be done with it.
///
/// Cheap to clone; all clones share one pool. Embedding code uses it to send its own
/// events, to one client or to all (the Node class's `socketPool[0].write(...)`).
///
/// # Examples
///
/// ```
/// use hubcast::{Config, Event, Hub};
/// let hub = Hub::new(Config::default());
/// assert_eq!(hub.clients(), 0);
/// // No one is connected yet, so a broadcast reaches nobody.
/// assert_eq!(hub.broadcast(&Event::new("greeting", "hello").unwrap()), 0);
/// ```
#[derive(Clone)]
pub struct Hub {
    state: Arc<HubState>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("config", &self.state.config)
            .field("clients", &self.clients())
            .finish()
    }
}

impl Hub {
    /// A hub with no observer.
    ///
    /// # Panics
    ///
    /// If `config` cannot work ([`Config::validate`]); [`Hub::try_new`] returns the
    /// error instead.
    pub fn new(config: Config) -> Self {
        Self::try_new(config).unwrap_or_else(|e| panic!("invalid hub config: {e}"))
    }

    /// A hub with no observer, if `config` can work.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut config = hubcast::Config::default();
    /// config.timeouts.idle = Some(std::time::Duration::ZERO); // would close everyone
    /// let err = hubcast::Hub::try_new(config).unwrap_err();
    /// assert_eq!(err.setting(), hubcast::Setting::IdleTimeout);
    /// ```
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] of [`Config::validate`].
    pub fn try_new(config: Config) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self::build(config, None))
    }

    /// A hub that reports every [`HubEvent`] to `observer`.
    ///
    /// # Examples
    ///
    /// ```
    /// use hubcast::{Config, Hub, HubEvent};
    /// let hub = Hub::with_observer(Config::default(), |event: &HubEvent| {
    ///     if let HubEvent::Connection { client, peer } = event {
    ///         println!("{client} connected from {peer}");
    ///     }
    /// });
    /// # drop(hub);
    /// ```
    ///
    /// # Panics
    ///
    /// If `config` cannot work, as [`Hub::new`].
    pub fn with_observer(
        config: Config,
        observer: impl Fn(&HubEvent) + Send + Sync + 'static,
    ) -> Self {
        Self::try_with_observer(config, observer)
            .unwrap_or_else(|e| panic!("invalid hub config: {e}"))
    }

    /// A hub that reports every [`HubEvent`] to `observer`, if `config` can work.
    ///
    /// # Errors
    ///
    /// The [`ConfigError`] of [`Config::validate`].
    pub fn try_with_observer(
        config: Config,
        observer: impl Fn(&HubEvent) + Send + Sync + 'static,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self::build(config, Some(Arc::new(observer))))
    }

    fn build(config: Config, observer: Option<Observer>) -> Self {
        Hub {
            state: Arc::new(HubState {
                pool: RwLock::default(),
                count: watch::Sender::new(0),
                next_id: AtomicU64::new(1),
                observer,
                counters: Counters::default(),
                inbound: InboundBudget::new(
                    config.limits.max_inbound_memory,
                    config.limits.max_frame,
                ),
                config,
            }),
        }
    }

    /// The configuration the hub runs with.
    pub fn config(&self) -> &Config {
        &self.state.config
    }

    /// How many clients are in the pool.
    pub fn clients(&self) -> usize {
        *self.state.count.borrow()
    }

    /// The ids of the clients in the pool, lowest first.
    pub fn client_ids(&self) -> Vec<ClientId> {
        let mut ids: Vec<ClientId> = self.read_pool().clients.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// A receiver that sees the pool size change: wait on it instead of polling.
    ///
    /// # Examples
    ///
    /// ```
    /// # async fn demo(hub: hubcast::Hub) {
    /// let mut count = hub.watch_clients();
    /// count.wait_for(|&n| n == 0).await.unwrap();
    /// # }
    /// ```
    pub fn watch_clients(&self) -> watch::Receiver<usize> {
        self.state.count.subscribe()
    }

    /// Counters since the hub started.
    pub fn stats(&self) -> Stats {
        let c = &self.state.counters;
        Stats {
            events: c.events.load(Ordering::Relaxed),
            deliveries: c.deliveries.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            slow_consumers: c.slow_consumers.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            inbound_waits: c.inbound_waits.load(Ordering::Relaxed),
        }
    }

    /// Bytes held right now in connections' read buffers (frames in progress and the
    /// space for the next read); bounded by [`Limits::max_inbound_memory`](crate::Limits::max_inbound_memory) but for
    /// 512 bytes per connection.
    pub fn inbound_memory(&self) -> usize {
        self.state.inbound.used()
    }

    pub(crate) fn inbound(&self) -> &InboundBudget {
        &self.state.inbound
    }

    pub(crate) fn count_inbound_wait(&self) {
        self.state
            .counters
            .inbound_waits
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Queues `event` to one client, through its bounded queue.
    ///
    /// # Errors
    ///
    /// [`SendError`] when the client is gone, closing, or over its queue limit (in which
    /// case it is disconnected as a slow consumer, as for any other event).
    pub fn send_to(&self, client: ClientId, event: &Event) -> Result<(), SendError> {
        let target = self.read_pool().clients.get(&client).cloned();
        let target = target.ok_or(SendError::NoSuchClient(client))?;
        let push = target.outbox.push(event.line().clone());
        if let Push::Resumed(count) | Push::ResumedThenDropped(count) = push {
            self.report(|| HubEvent::EventsDropped { client, count });
        }
        match push {
            Push::Queued | Push::Resumed(_) => {
                self.state
                    .counters
                    .deliveries
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Push::Overflow => Err(SendError::SlowConsumer(client)),
            Push::Dropped | Push::ResumedThenDropped(_) => {
                self.state.counters.dropped.fetch_add(1, Ordering::Relaxed);
                Err(SendError::Dropped(client))
            }
            Push::Closed => Err(SendError::Closing(client)),
        }
    }

    /// Queues `event` to every client; returns how many it was queued to.
    pub fn broadcast(&self, event: &Event) -> usize {
        self.fan_out(None, event)
    }

    /// Queues a client's event to everyone who should hear it: the members of its room
    /// if it names one, else everyone who never subscribed plus every matching
    /// subscriber; the sender too if its echo is on.
    pub(crate) fn publish(&self, from: ClientId, event: Event) {
        let receivers = self.fan_out(Some(from), &event);
        self.state.counters.events.fetch_add(1, Ordering::Relaxed);
        self.report(|| HubEvent::Event {
            client: from,
            event,
            receivers,
        });
    }

    /// Queues a run of a client's plain events (see [`Run`]): the whole chunk to each
    /// client that hears everything, and event by event to subscribers that match.
    ///
    /// Matching can be costly (many wildcard patterns), so it stops once `deadline`
    /// has passed and says where it got to: the caller lets other tasks run, then calls
    /// again with the same `progress` until it returns `true`.
    pub(crate) fn publish_run(
        &self,
        from: ClientId,
        run: &Run,
        progress: &mut RunProgress,
        deadline: std::time::Instant,
    ) -> bool {
        let events = run.len();
        let mut pool = self.read_pool();
        let skip = pool
            .clients
            .get(&from)
            .filter(|c| !c.echo.load(Ordering::Relaxed))
            .map(|c| c.id);
        let mut tally = Tally::default();
        let first = progress.next;
        if first == 0 {
            for client in pool.unfiltered.values() {
                if Some(client.id) != skip {
                    tally.count(
                        client,
                        client.outbox.push_events(run.bytes().clone(), events),
                        events,
                    );
                }
            }
            progress.everyone = tally.queued;
        }
        // Subscribers are matched per event; most hubs have none. The read lock is let
        // go every few events, so that joins, leaves and subscribes (which wait for the
        // write lock, and block a worker thread meanwhile) never wait for a whole run.
        let mut matched_counts = Vec::new();
        let mut index = first;
        if !pool.router.is_empty() {
            let mut matched = Vec::new();
            while index < events {
                if index > first && (index - first).is_multiple_of(EVENTS_PER_LOCK) {
                    drop(pool);
                    if std::time::Instant::now() >= deadline {
                        break;
                    }
                    pool = self.read_pool();
                }
                let before = tally.queued;
                matched.clear();
                pool.router.matches(run.name(index), &mut matched);
                // One copy of the line per event, shared by its matching receivers.
                let mut line = None;
                for id in &matched {
                    if let Some(client) = pool.clients.get(id).filter(|_| Some(*id) != skip) {
                        let line = line.get_or_insert_with(|| run.line(index)).clone();
                        tally.count(client, client.outbox.push(line), 1);
                    }
                }
                matched_counts.push(tally.queued - before);
                index += 1;
            }
        } else {
            index = events;
        }
        let done = index - first;
        let everyone = progress.everyone;
        self.settle(
            &tally,
            everyone * done + matched_counts.iter().sum::<usize>(),
        );
        let counters = &self.state.counters;
        counters.events.fetch_add(done as u64, Ordering::Relaxed);
        if self.state.observer.is_some() {
            for (offset, index) in (first..index).enumerate() {
                let receivers = everyone + matched_counts.get(offset).copied().unwrap_or(0);
                self.report(|| HubEvent::Event {
                    client: from,
                    event: run.event(index),
                    receivers,
                });
            }
        }
        progress.next = index;
        index >= events
    }

    /// Reports and counts what a fan-out's pushes did.
    fn settle(&self, tally: &Tally, deliveries: usize) {
        for &(client, count) in &tally.resumed {
            self.report(|| HubEvent::EventsDropped { client, count });
        }
        let counters = &self.state.counters;
        counters
            .deliveries
            .fetch_add(deliveries as u64, Ordering::Relaxed);
        if tally.dropped > 0 {
            counters
                .dropped
                .fetch_add(tally.dropped as u64, Ordering::Relaxed);
        }
    }

    fn fan_out(&self, from: Option<ClientId>, event: &Event) -> usize {
        let line = event.line();
        let name = event.name().as_str();
        let pool = self.read_pool();
        let skip = from.filter(|id| {
            pool.clients
                .get(id)
                .is_some_and(|c| !c.echo.load(Ordering::Relaxed))
        });
        let mut tally = Tally::default();
        let mut deliver = |client: &Member| {
            if Some(client.id) != skip {
                tally.count(client, client.outbox.push(line.clone()), 1);
            }
        };
        if let Some(room) = event.room() {
            for id in pool.rooms.get(room).into_iter().flatten() {
                if let Some(client) = pool.clients.get(id).filter(|_| pool.wants(*id, name)) {
                    deliver(client);
                }
            }
        } else {
            for client in pool.unfiltered.values() {
                deliver(client);
            }
            if !pool.router.is_empty() {
                let mut matched = Vec::new();
                pool.router.matches(name, &mut matched);
                for id in matched {
                    if let Some(client) = pool.clients.get(&id) {
                        deliver(client);
                    }
                }
            }
        }
        drop(pool);
        self.settle(&tally, tally.queued);
        tally.queued
    }

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
        }
        routes.pattern_bytes = bytes;
        for pattern in fresh {
            routes.patterns.insert(pattern.clone());
            pool.router.insert(pattern, id);
        }
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
    }

    /// Adds a new client to the pool.
    pub(crate) fn join(&self, peer: SocketAddr) -> Arc<Member> {
        let id = ClientId(self.state.next_id.fetch_add(1, Ordering::Relaxed));
        let client = Arc::new(Member {
            id,
            outbox: Outbox::new(
                self.state.config.limits.max_pending,
                self.state.config.delivery.slow_consumer == SlowConsumerPolicy::Drop,
            ),
            echo: AtomicBool::new(self.state.config.delivery.echo),
        });
        {
            let mut pool = self.write_pool();
            pool.clients.insert(id, Arc::clone(&client));
            pool.unfiltered.insert(id, Arc::clone(&client));
            self.state.count.send_replace(pool.clients.len());
        }
        self.report(|| HubEvent::Connection { client: id, peer });
        client
    }

    /// Removes a client from the pool.
    pub(crate) fn leave(&self, client: ClientId, reason: CloseReason) {
        {
            let mut guard = self.write_pool();
            let pool = &mut *guard;
            pool.clients.remove(&client);
            pool.unfiltered.remove(&client);
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
        self.report(|| HubEvent::Close {
            client,
            had_error: reason.had_error(),
            reason,
        });
    }

    pub(crate) fn rejected(&self, client: ClientId, error: ProtocolError) {
        self.state.counters.rejected.fetch_add(1, Ordering::Relaxed);
        self.report(|| HubEvent::Rejected { client, error });
    }

    pub(crate) fn refused(&self, peer: SocketAddr) {
        self.state.counters.refused.fetch_add(1, Ordering::Relaxed);
        self.report(|| HubEvent::Refused { peer });
    }

    pub(crate) fn slow_consumer(&self, client: ClientId) {
        self.state
            .counters
            .slow_consumers
            .fetch_add(1, Ordering::Relaxed);
        self.report(|| HubEvent::SlowConsumer { client });
    }

    /// Reports to the observer; `make` runs only when there is one.
    pub(crate) fn report(&self, make: impl FnOnce() -> HubEvent) {
        if let Some(observer) = &self.state.observer {
            observer(&make());
        }
    }

    fn read_pool(&self) -> std::sync::RwLockReadGuard<'_, Pool> {
        self.state
            .pool
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_pool(&self) -> std::sync::RwLockWriteGuard<'_, Pool> {
        self.state
            .pool
            .write()
            .unwrap_or_else(PoisonError::into_inner)
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
