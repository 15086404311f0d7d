//! The pool of connected clients, broadcast, and the [`Hub`] handle for embedding code.
//!
//! The pool maps each [`ClientId`] to its outbound queue. Broadcasting takes the pool's
//! read lock, pushes one shared [`Bytes`](bytes::Bytes) line into every queue (a
//! reference-count increment each, never a copy or an `.await`), and lets go. Joins and
//! leaves take the write lock briefly. Everything the hub does is also reported as a
//! [`HubEvent`] to an optional observer: that is how the binary logs and how tests watch.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use crate::config::{Config, ConfigError};
use crate::error::IoError;
use crate::event::Event;
use crate::inbound::InboundBudget;
use crate::protocol::{ErrorCode, ProtocolError};

mod access;
mod fanout;
mod pool;

pub(crate) use fanout::RunProgress;
pub(crate) use pool::Member;
use pool::Pool;

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
    /// A read or write failed (reset, broken pipe, ...); the error is kept.
    Io(IoError),
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

/// The limit a refused connection met ([`HubEvent::Refused`]); every refusal is
/// counted in [`Stats::refused`], and by its limit in the counters named below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionLimit {
    /// The most connections the hub serves at once (`--max-conns`).
    Total,
    /// The most connections one address may have open (`--max-conns-per-ip`;
    /// [`Stats::refused_per_ip`]).
    PerAddress,
    /// The most connection attempts one address may make in a second
    /// (`--accept-rate`; [`Stats::refused_accept_rate`]).
    AcceptRate,
}

impl std::fmt::Display for ConnectionLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectionLimit::Total => "the connection limit",
            ConnectionLimit::PerAddress => "the per-address connection limit",
            ConnectionLimit::AcceptRate => "the per-address accept rate",
        })
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
    /// Opening the store repaired it (a torn or corrupted tail cut after a crash).
    StoreRepaired {
        /// What was cut, and where.
        message: String,
    },
    /// The store failed to keep an event (disk full, an I/O error): it was delivered
    /// live only, and its publisher told `storage`.
    StoreFailed {
        /// Why.
        message: String,
    },
    /// A client proved who it is (`$hello` with credentials, or a client certificate).
    Authenticated {
        /// The client.
        client: ClientId,
        /// Its address.
        peer: SocketAddr,
        /// Its identity's name.
        user: String,
    },
    /// A client's credentials were wrong; it is being closed, and its address waits
    /// longer before its next attempt is read.
    AuthFailed {
        /// The client.
        client: ClientId,
        /// Its address.
        peer: SocketAddr,
        /// Why (for the log; the client is only told its credentials are invalid).
        reason: String,
    },
    /// A connection was refused at a limit.
    Refused {
        /// Who tried to connect.
        peer: SocketAddr,
        /// Which limit.
        limit: ConnectionLimit,
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
    /// Connections refused because their address had `--max-conns-per-ip` open (also
    /// counted in `refused`).
    pub refused_per_ip: u64,
    /// Connections refused because their address passed `--accept-rate` (also
    /// counted in `refused`).
    pub refused_accept_rate: u64,
    /// Times a connection over `--max-rate` or `--max-bytes-rate` was paused.
    pub throttled: u64,
    /// Failed authentications (wrong token, bad JWT, refused certificate).
    pub auth_failed: u64,
    /// Requests refused `permission_denied`.
    pub permission_denied: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) refused_per_ip: AtomicU64,
    pub(crate) refused_accept_rate: AtomicU64,
    pub(crate) throttled: AtomicU64,
    pub(crate) auth_failed: AtomicU64,
    pub(crate) permission_denied: AtomicU64,
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
    /// Declared streams, their store, and publisher ids seen recently.
    durable: crate::durable::Durable,
    /// Who may connect and what they may do; `None`: everyone, everything.
    auth: RwLock<Option<Arc<crate::auth::Authenticator>>>,
    /// Addresses that failed to authenticate recently.
    penalties: crate::auth::Penalties,
    /// What `/metrics` shows beyond the counters.
    metrics: crate::metrics::Metrics,
    /// The link to the other nodes of a cluster, once set.
    backplane: std::sync::OnceLock<Arc<dyn crate::cluster::Backplane>>,
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
        Self::build(config, None)
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
        Self::build(config, Some(Arc::new(observer)))
    }

    /// Validates `config`, opens the store if streams are declared (reporting what its
    /// recovery repaired), and makes the hub.
    fn build(config: Config, observer: Option<Observer>) -> Result<Self, ConfigError> {
        config.validate()?;
        let (durable, recovery) = crate::durable::Durable::open(&config.streams)?;
        let hub = Hub {
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
                durable,
                config,
                auth: RwLock::new(None),
                penalties: Default::default(),
                metrics: Default::default(),
                backplane: std::sync::OnceLock::new(),
            }),
        };
        for message in recovery.repairs {
            hub.report(|| HubEvent::StoreRepaired { message });
        }
        Ok(hub)
    }

    /// Turns authentication on (or replaces the authenticator, as a reload does): from
    /// now on every new connection must prove who it is with its first frame (`$hello
    /// {"token"}`) or a client certificate. On a replacement, connected clients are
    /// checked against it: those no longer allowed in are closed (`auth_revoked`), the
    /// others get their new permissions, and subscriptions and rooms those forbid are
    /// dropped (each client is told with a `permission_denied`). Returns how many
    /// clients were closed.
    ///
    /// Call it before serving: connections that joined an open hub (before the first
    /// call) keep their unrestricted access.
    pub fn set_authenticator(&self, auth: crate::auth::Authenticator) -> usize {
        let auth = Arc::new(auth);
        let previous = self
            .state
            .auth
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(Arc::clone(&auth));
        if previous.is_none() {
            return 0;
        }
        let members: Vec<Arc<Member>> = self.read_pool().clients.values().cloned().collect();
        let mut closed = 0;
        for member in members {
            let Some(identity) = member.access.identity() else {
                continue;
            };
            match auth.refresh(&identity) {
                None => {
                    closed += 1;
                    member.access.revoke(ProtocolError::new(
                        ErrorCode::AuthRevoked,
                        format!(
                            "{:?} may no longer connect (the hub's auth settings changed); closing",
                            identity.name
                        ),
                    ));
                    // Wakes its connection.
                    member.outbox.notify();
                }
                Some(permissions) => {
                    let identity = crate::auth::Identity {
                        permissions,
                        ..identity
                    };
                    for what in self.admit(&member, identity) {
                        member.outbox.push(
                            ProtocolError::new(
                                ErrorCode::PermissionDenied,
                                format!("{what} is no longer allowed (the hub's auth settings changed); it was removed"),
                            )
                            .to_frame(),
                        );
                    }
                }
            }
        }
        closed
    }

    /// The authenticator, when authentication is on (to reload it: see
    /// [`Authenticator::reload`](crate::auth::Authenticator::reload)).
    pub fn authenticator(&self) -> Option<Arc<crate::auth::Authenticator>> {
        self.state
            .auth
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Addresses that failed to authenticate recently.
    pub(crate) fn penalties(&self) -> &crate::auth::Penalties {
        &self.state.penalties
    }

    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.state.metrics
    }

    /// Connected clients by transport (in [`TransportKind::ALL`](crate::metrics::TransportKind::ALL) order),
    /// subscription patterns held, and rooms with members.
    pub(crate) fn gauges(&self) -> ([u64; 3], usize, usize) {
        let pool = self.read_pool();
        let mut open = [0u64; 3];
        for member in pool.clients.values() {
            open[member.transport as usize] += 1;
        }
        let (patterns, rooms) = pool.routing_counts();
        (open, patterns, rooms)
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
            refused_per_ip: c.refused_per_ip.load(Ordering::Relaxed),
            refused_accept_rate: c.refused_accept_rate.load(Ordering::Relaxed),
            throttled: c.throttled.load(Ordering::Relaxed),
            auth_failed: c.auth_failed.load(Ordering::Relaxed),
            permission_denied: c.permission_denied.load(Ordering::Relaxed),
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

    /// Adds one to the counter `which` picks.
    pub(crate) fn count(&self, which: impl FnOnce(&Counters) -> &AtomicU64) {
        which(&self.state.counters).fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_inbound_wait(&self) {
        self.state
            .counters
            .inbound_waits
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self, client: ClientId, error: ProtocolError) {
        self.state.counters.rejected.fetch_add(1, Ordering::Relaxed);
        self.state.metrics.rejected(error.code);
        match error.code {
            ErrorCode::PermissionDenied => self.count(|c| &c.permission_denied),
            ErrorCode::AuthFailed => self.count(|c| &c.auth_failed),
            _ => {}
        }
        self.report(|| HubEvent::Rejected { client, error });
    }

    /// Counts a refused connection, in all and by its limit, and reports it.
    pub(crate) fn refused(&self, peer: SocketAddr, limit: ConnectionLimit) {
        self.state.counters.refused.fetch_add(1, Ordering::Relaxed);
        match limit {
            ConnectionLimit::Total => {}
            ConnectionLimit::PerAddress => self.count(|c| &c.refused_per_ip),
            ConnectionLimit::AcceptRate => self.count(|c| &c.refused_accept_rate),
        }
        self.report(|| HubEvent::Refused { peer, limit });
    }

    pub(crate) fn slow_consumer(&self, client: ClientId) {
        self.state
            .counters
            .slow_consumers
            .fetch_add(1, Ordering::Relaxed);
        self.report(|| HubEvent::SlowConsumer { client });
    }

    /// Makes this hub a node of a cluster: from now on its clients' events are also
    /// handed to `backplane`, which brings it the other nodes' events its clients want
    /// (see [`crate::cluster`]). Set once: a second call is refused (`false`).
    pub fn set_backplane(&self, backplane: Arc<dyn crate::cluster::Backplane>) -> bool {
        let set = self.state.backplane.set(backplane).is_ok();
        self.interest_changed();
        set
    }

    /// Where the backplane stands (`None` on a single node).
    pub fn backplane_status(&self) -> Option<crate::cluster::BackplaneStatus> {
        self.state.backplane.get().map(|b| b.status())
    }

    /// What this node's clients want from the other nodes: what its backplane
    /// subscribes to.
    pub fn interest(&self) -> crate::cluster::Interest {
        self.read_pool().interest()
    }

    pub(crate) fn backplane(&self) -> Option<&dyn crate::cluster::Backplane> {
        self.state.backplane.get().map(|b| &**b)
    }

    /// Tells the backplane, if any, that the pool's interest may have changed.
    fn interest_changed(&self) {
        if let Some(backplane) = self.state.backplane.get() {
            backplane.interest_changed();
        }
    }

    /// Fans out an event another node's client sent: to everyone here who should
    /// hear it (as if a client here had sent it, with no echo to skip).
    pub(crate) fn deliver_remote(&self, event: &Event) -> usize {
        self.fan_out(None, event)
    }

    /// Fans out a run of plain events other nodes' clients sent, whole, as
    /// [`Hub::publish_run`] does for a client's (with no sender here to skip).
    pub(crate) fn deliver_remote_run(&self, run: &crate::frame::Run) {
        let mut progress = RunProgress::default();
        // Matching yields the read lock every few events; there is no other task to
        // give the thread to here, so it goes on until the run is done.
        let far = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        while !self.publish_run_from(None, run, &mut progress, far) {}
    }

    /// `$gap {since}` while the backplane is cut off from the other nodes, for a client
    /// that joins meanwhile.
    pub(crate) fn gap_notice(&self) -> Option<bytes::Bytes> {
        let since = self.state.backplane.get()?.down_since()?;
        Some(crate::cluster::gap_line("since", since))
    }

    /// Queues `line` to every client admitted to the pool (not those still to
    /// authenticate), whatever they subscribed to: the hub's own notices (`$gap`).
    pub(crate) fn tell_everyone(&self, line: bytes::Bytes) {
        let authenticating = self.authenticator().is_some();
        let pool = self.read_pool();
        for client in pool.clients.values() {
            if authenticating && client.access.permissions().is_none() {
                continue;
            }
            let _ = client.outbox.push(line.clone());
        }
    }

    /// The declared streams, their store, and publisher ids seen recently.
    pub(crate) fn durable(&self) -> &crate::durable::Durable {
        &self.state.durable
    }

    /// Queues a reply (`$stored`, an `$error`) to one client, if it is still here.
    pub(crate) fn reply(&self, client: ClientId, frame: bytes::Bytes) {
        let member = self.read_pool().clients.get(&client).cloned();
        if let Some(member) = member {
            member.outbox.push(frame);
        }
    }

    /// An append failed: reported, at most once a second (with how many others
    /// failed since the last report).
    pub(crate) fn store_failed(&self, message: String) {
        if let Some(others) = self.durable().failure_to_report() {
            let message = match others {
                0 => message,
                n => format!("{message} (and {n} more failures since the last report)"),
            };
            self.report(|| HubEvent::StoreFailed { message });
        }
    }

    /// Commits what the store holds and stops its writer: after the last connection
    /// has closed (the server calls it when it stops). Later appends fail `storage`.
    pub fn close_store(&self) {
        self.durable().close();
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
