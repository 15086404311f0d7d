//! The client: connect to a hub, send events, react to what it hears.
//!
//! A [`Client`] is a cheap handle to one background task that owns the socket (as in
//! async-nats). Sends go through a bounded channel to that task and complete once the
//! bytes are written to the socket. What the task hears, and what happens to the
//! connection (the Node class's socket events: lookup, connect, data, end, timeout, error,
//! close), is reported as [`ClientEvent`]s to handlers ([`Client::on`],
//! [`Client::on_any`]) and to streams ([`Client::events`]).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::error::IoError;
use crate::event::{Event, RoomName};
use crate::protocol::ProtocolError;
use crate::routing::Pattern;

mod consume;
mod task;

pub use consume::{ConsumeOptions, Consumer, Message};

/// The default time allowed for one connection attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default number of events that may wait to be sent (while disconnected, say).
pub const DEFAULT_BUFFER: usize = 1024;

/// How received bytes are handed over, as Node's `socket.setEncoding` chooses.
///
/// # Examples
///
/// ```
/// use hubcast::client::{Client, Mode};
/// let builder = Client::builder().mode(Mode::Text);
/// # drop(builder);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Parse each line into an [`Event`] (or a `$error` into [`ClientEvent::HubError`]).
    #[default]
    Events,
    /// Hand over each chunk read as text ([`ClientEvent::Text`]), UTF-8 sequences kept whole.
    Text,
    /// Hand over each chunk read as raw bytes ([`ClientEvent::Data`]).
    Bytes,
}

/// When and how often to reconnect after the connection is lost.
///
/// Delays double from `initial_delay` up to `max_delay`; each is jittered to between
/// half and all of its value, so many clients do not return at the same instant.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use hubcast::client::Reconnect;
/// let policy = Reconnect { max_attempts: Some(5), ..Reconnect::default() };
/// assert_eq!(policy.initial_delay, Duration::from_millis(100));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconnect {
    /// The delay before the first attempt.
    pub initial_delay: Duration,
    /// The longest delay between attempts.
    pub max_delay: Duration,
    /// Give up after this many failed attempts in a row (`None`: never give up).
    pub max_attempts: Option<u32>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_attempts: None,
        }
    }
}

impl Reconnect {
    /// The jittered delay before attempt number `attempt` (1 for the first).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        let full = self
            .initial_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay);
        full.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

/// What a client hears and what happens to its connection.
///
/// # Examples
///
/// ```
/// use hubcast::client::ClientEvent;
/// fn describe(event: &ClientEvent) -> String {
///     match event {
///         ClientEvent::Event(e) => format!("{}: {}", e.name(), e.payload()),
///         ClientEvent::Close { had_error } => format!("closed (error: {had_error})"),
///         other => format!("{other:?}"),
///     }
/// }
/// # let _ = describe;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientEvent {
    /// The hub's address was resolved (Node's `lookup`).
    Lookup {
        /// The address as given.
        host: String,
        /// What it resolved to.
        addrs: Vec<SocketAddr>,
    },
    /// The connection is up (`connect`).
    Connect {
        /// The hub's address.
        addr: SocketAddr,
    },
    /// An event from the hub ([`Mode::Events`]).
    Event(Event),
    /// A `$`-named frame from the hub other than `$error`, such as a future `$welcome`.
    Control(Event),
    /// A chunk of text ([`Mode::Text`]).
    Text(String),
    /// A chunk of bytes ([`Mode::Bytes`]).
    Data(Bytes),
    /// The hub rejected something this client sent (a `$error` frame).
    HubError(ProtocolError),
    /// Nothing was received for the idle period set with
    /// [`ClientBuilder::idle_timeout`]. Only a notice: the connection stays open.
    Timeout {
        /// The idle period.
        idle: Duration,
    },
    /// The hub closed its side of the connection (`end`).
    End,
    /// Something went wrong (`error`); a [`ClientEvent::Close`] follows when it ends
    /// the connection.
    Error(ClientError),
    /// The connection is closed (`close`).
    Close {
        /// Whether it closed because of an error.
        had_error: bool,
    },
    /// Waiting `delay` before reconnect attempt number `attempt`.
    Reconnecting {
        /// 1 for the first attempt after a loss.
        attempt: u32,
        /// How long until the attempt.
        delay: Duration,
    },
}

/// What can go wrong for a client.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(client: hubcast::Client) {
/// use hubcast::client::ClientError;
/// match client.emit("pickup", &1).await {
///     Ok(()) => {}
///     Err(ClientError::BufferFull(n)) => eprintln!("hub away and {n} events waiting; try later"),
///     Err(e) => eprintln!("{e}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The address could not be resolved.
    #[error("cannot resolve {addr}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        source: IoError,
    },
    /// The TLS handshake failed (an untrusted, expired or misnamed certificate, or a
    /// hub that does not speak TLS).
    #[error("TLS handshake with {addr} failed")]
    Tls {
        /// The address as given.
        addr: String,
        /// Why.
        source: IoError,
    },
    /// No connection could be made.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address as given.
        addr: String,
        /// Why (the last error, when it resolved to several addresses).
        source: IoError,
    },
    /// The connection attempt took longer than the connect timeout.
    #[error("connecting to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The address as given.
        addr: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The connection broke while this send was being written; it may or may not
    /// have reached the hub.
    #[error("the connection to the hub was lost")]
    ConnectionLost(#[source] IoError),
    /// Too many sends are already waiting (while disconnected); this one was refused.
    #[error("not connected to the hub, and {0} events are already waiting to be sent")]
    BufferFull(usize),
    /// The client was closed, or gave up reconnecting.
    #[error("the client is closed")]
    Closed,
    /// The event could not be built (bad name, payload not serialisable).
    #[error("invalid event: {0}")]
    InvalidEvent(ProtocolError),
    /// The hub could not store an event sent with [`Client::emit_confirmed`]; it was
    /// delivered live only.
    #[error("the hub could not store the event: {0}")]
    Storage(String),
    /// The hub refused a request (a `$error` answering it), such as
    /// [`Client::consume`] of a stream it does not have.
    #[error("the hub refused: {0}")]
    Hub(ProtocolError),
    /// The hub sent something that is not a hubcast frame.
    #[error("unexpected data from the hub: {0}")]
    Protocol(String),
}

/// What this client has told the hub about itself, replayed after every reconnect.
#[derive(Default, Debug)]
pub(crate) struct SessionState {
    hello: Option<serde_json::Value>,
    patterns: Vec<String>,
    rooms: Vec<String>,
    /// Events sent with [`Client::emit_confirmed`] and not confirmed yet, in the order
    /// sent: resent after a reconnect (the hub drops those it already has).
    unconfirmed: Vec<(String, Bytes)>,
    /// Who waits for each of them.
    confirms: HashMap<String, oneshot::Sender<Result<Stored, ClientError>>>,
    /// Durable consumers held, by name: consumed again after a reconnect.
    consumers: HashMap<String, consume::Held>,
    /// The client's handle, for the deliveries the task hands out.
    handle: std::sync::Weak<ClientState>,
}

impl SessionState {
    /// Settles the wait for `id`, if anyone waits (a duplicate answer to a resend of
    /// an event already settled finds nobody).
    pub(crate) fn confirmed(&mut self, id: &str, outcome: Result<Stored, ClientError>) {
        self.unconfirmed.retain(|(waiting, _)| waiting != id);
        if let Some(waiter) = self.confirms.remove(id) {
            let _ = waiter.send(outcome);
        }
    }

    /// Fails every wait (the client is closed).
    pub(crate) fn fail_confirms(&mut self) {
        self.unconfirmed.clear();
        for (_, waiter) in self.confirms.drain() {
            let _ = waiter.send(Err(ClientError::Closed));
        }
    }
}

/// The hub's answer to an event queued with [`Client::enqueue_with_id`], to come.
#[derive(Debug)]
#[must_use = "a confirmation says whether the event was stored"]
pub struct Confirmation {
    answer: oneshot::Receiver<Result<Stored, ClientError>>,
}

impl std::future::Future for Confirmation {
    type Output = Result<Stored, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.answer)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(ClientError::Closed)))
    }
}

/// What the hub said when it confirmed an event sent with [`Client::emit_confirmed`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[non_exhaustive]
pub struct Stored {
    /// The stream it was stored in; `None` when no stream matched (delivered live
    /// only).
    pub stream: Option<String>,
    /// Its place in that stream.
    pub seq: Option<u64>,
    /// The hub had it already (an earlier send with the same id): `seq` is the first's.
    #[serde(default)]
    pub duplicate: bool,
}

impl SessionState {
    /// The unconfirmed events [`SessionState::frames`] sends again. Some may still be
    /// queued to be written for the first time (sent before the connection was up, or
    /// while it was away): the task must not write those twice.
    pub(crate) fn resent(&self) -> Vec<Bytes> {
        self.unconfirmed
            .iter()
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// The control events that restore this state on a fresh connection.
    pub(crate) fn frames(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut add = |name: &str, payload: &serde_json::Value| {
            if let Ok(event) = Event::new(name, payload) {
                out.extend_from_slice(event.line());
            }
        };
        if let Some(hello) = &self.hello {
            add("$hello", hello);
        }
        if !self.patterns.is_empty() {
            add(
                "$subscribe",
                &serde_json::json!({ "events": self.patterns }),
            );
        }
        for room in &self.rooms {
            add("$join", &serde_json::json!({ "room": room }));
        }
        for held in self.consumers.values() {
            add("$consume", &held.payload);
        }
        for (_, line) in &self.unconfirmed {
            out.extend_from_slice(line);
        }
        out
    }
}

type EventHandler = Arc<dyn Fn(&Event) + Send + Sync>;
type AnyHandler = Arc<dyn Fn(&ClientEvent) + Send + Sync>;

/// Where [`ClientEvent`]s go: handlers and streams.
#[derive(Default)]
struct Listeners {
    by_name: RwLock<HashMap<String, Vec<EventHandler>>>,
    any: RwLock<Vec<AnyHandler>>,
    streams: Mutex<Vec<mpsc::Sender<ClientEvent>>>,
}

impl Listeners {
    fn on(&self, name: &str, handler: EventHandler) {
        let mut by_name = self.by_name.write().unwrap_or_else(PoisonError::into_inner);
        by_name.entry(name.to_string()).or_default().push(handler);
    }

    fn on_any(&self, handler: AnyHandler) {
        let mut any = self.any.write().unwrap_or_else(PoisonError::into_inner);
        any.push(handler);
    }

    /// Calls the handlers (on the client's task, so they must not block), and returns
    /// the streams the event is for. The task then delivers it to them in order,
    /// never waiting on a full one while it has sends to write (see `task.rs`).
    fn handle(&self, event: &ClientEvent) -> Vec<mpsc::Sender<ClientEvent>> {
        // Snapshots, so a handler may register handlers without deadlocking.
        let any = self
            .any
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for handler in any {
            handler(event);
        }
        if let ClientEvent::Event(e) = event {
            let named = {
                let by_name = self.by_name.read().unwrap_or_else(PoisonError::into_inner);
                by_name.get(e.name().as_str()).cloned()
            };
            for handler in named.into_iter().flatten() {
                handler(e);
            }
        }
        let mut streams = self.lock_streams();
        streams.retain(|s| !s.is_closed());
        streams.clone()
    }

    fn stream(&self) -> Events {
        let (tx, rx) = mpsc::channel(DEFAULT_BUFFER);
        self.lock_streams().push(tx);
        Events { rx }
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, Vec<mpsc::Sender<ClientEvent>>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Options for a [`Client`], then [`ClientBuilder::connect`].
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use hubcast::client::{Client, ClientEvent, Reconnect};
///
/// # async fn demo() -> Result<(), hubcast::client::ClientError> {
/// let client = Client::builder()
///     .connect_timeout(Duration::from_secs(3))
///     .reconnect(Reconnect::default())
///     .idle_timeout(Duration::from_secs(30))
///     .on_any(|event| if let ClientEvent::Connect { addr } = event { println!("connected to {addr}") })
///     .connect("127.0.0.1:3000")
///     .await?;
/// # drop(client); Ok(()) }
/// ```
pub struct ClientBuilder {
    connect_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    reconnect: Option<Reconnect>,
    idle_timeout: Option<Duration>,
    buffer: usize,
    mode: Mode,
    listeners: Listeners,
    hello: serde_json::Map<String, serde_json::Value>,
    patterns: Vec<String>,
    rooms: Vec<String>,
}

impl fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &self.reconnect)
            .field("idle_timeout", &self.idle_timeout)
            .field("buffer", &self.buffer)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: None,
            reconnect: None,
            idle_timeout: None,
            buffer: DEFAULT_BUFFER,
            mode: Mode::Events,
            listeners: Listeners::default(),
            hello: serde_json::Map::new(),
            patterns: Vec::new(),
            rooms: Vec::new(),
        }
    }
}

impl ClientBuilder {
    /// How long one connection attempt may take (default 10 s).
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().connect_timeout(std::time::Duration::from_secs(3));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Reconnect automatically after the connection is lost (off by default).
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().reconnect(hubcast::client::Reconnect::default());
    /// ```
    pub fn reconnect(mut self, policy: Reconnect) -> Self {
        self.reconnect = Some(policy);
        self
    }

    /// Report [`ClientEvent::Timeout`] after `idle` without receiving anything.
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().idle_timeout(std::time::Duration::from_secs(60));
    /// ```
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.idle_timeout = Some(idle);
        self
    }

    /// How many sends may wait for the connection (default 1024, at least 1). Past
    /// that, sends made while disconnected fail with [`ClientError::BufferFull`].
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().buffer(100);
    /// ```
    pub fn buffer(mut self, events: usize) -> Self {
        self.buffer = events.max(1);
        self
    }

    /// Introduces the client to the hub by `name` (sent in `$hello`, shown in `$welcome`).
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().name("vendor-acme");
    /// ```
    pub fn name(mut self, name: &str) -> Self {
        self.hello.insert("name".into(), name.into());
        self
    }

    /// Connects with TLS, trusting and presenting what `config` says (see
    /// [`tls::client_config`](crate::tls::client_config)); the host part of the
    /// address given to `connect` is the name the hub's certificate must carry.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo() -> Result<(), String> {
    /// let config = hubcast::tls::client_config(Some("ca.pem".as_ref()), None)?;
    /// let builder = hubcast::Client::builder().tls(config);
    /// # Ok(()) }
    /// ```
    pub fn tls(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Authenticates with `token` (an auth-file token or a JWT), as `user` if given:
    /// sent in the first frame, `$hello`, on every connect and reconnect. A hub that
    /// requires authentication closes a connection whose first frame is anything else.
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().credentials(Some("vendor-acme"), "s3cret");
    /// ```
    pub fn credentials(mut self, user: Option<&str>, token: &str) -> Self {
        if let Some(user) = user {
            self.hello.insert("user".into(), user.into());
        }
        self.hello.insert("token".into(), token.into());
        self
    }

    /// Whether this client hears its own events (sent in `$hello`; default: the hub's).
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().echo(false);
    /// ```
    pub fn echo(mut self, echo: bool) -> Self {
        self.hello.insert("echo".into(), echo.into());
        self
    }

    /// Asks the hub for a `$ping` every `every` (answered automatically); the hub closes
    /// the connection if the client stops answering for two intervals. Pair it with
    /// [`ClientBuilder::idle_timeout`] to notice a silent hub on this side.
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().heartbeat(std::time::Duration::from_secs(15));
    /// ```
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.hello
            .insert("heartbeat".into(), every.as_secs_f64().into());
        self
    }

    /// Subscribes to `patterns` as part of connecting, so no unfiltered event arrives
    /// first (see [`Client::subscribe`]). Patterns are checked by
    /// [`ClientBuilder::connect`].
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().subscribe(&["order.*"]);
    /// ```
    pub fn subscribe(mut self, patterns: &[&str]) -> Self {
        self.patterns.extend(patterns.iter().map(|p| p.to_string()));
        self
    }

    /// Joins `room` as part of connecting (see [`Client::join`]).
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().join("acme");
    /// ```
    pub fn join(mut self, room: &str) -> Self {
        self.rooms.push(room.to_string());
        self
    }

    /// How received bytes are handed over (default: parsed events).
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().mode(hubcast::client::Mode::Bytes);
    /// ```
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Calls `handler` for every event named `name`.
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().on("delivered", |event| println!("{}", event.payload()));
    /// ```
    pub fn on(self, name: &str, handler: impl Fn(&Event) + Send + Sync + 'static) -> Self {
        self.listeners.on(name, Arc::new(handler));
        self
    }

    /// Calls `handler` for everything: events and connection lifecycle, from the first
    /// address lookup on.
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder().on_any(|event| println!("{event:?}"));
    /// ```
    pub fn on_any(self, handler: impl Fn(&ClientEvent) + Send + Sync + 'static) -> Self {
        self.listeners.on_any(Arc::new(handler));
        self
    }

    /// A stream of everything this client will hear and do, from the first address
    /// lookup on: unlike [`Client::events`], nothing that arrives between connecting
    /// and asking for a stream can be missed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), hubcast::client::ClientError> {
    /// let builder = hubcast::Client::builder();
    /// let mut events = builder.events();
    /// let client = builder.connect("127.0.0.1:3000").await?;
    /// while let Some(event) = events.next().await {
    ///     println!("{event:?}");
    /// }
    /// # drop(client); Ok(()) }
    /// ```
    pub fn events(&self) -> Events {
        self.listeners.stream()
    }

    /// Connects to the hub at `addr` (`"host:port"`), or to the first that answers of
    /// several (`"a:3000,b:3000"`: the nodes of a cluster), trying the others when the
    /// connection is lost, beginning with the one it had.
    ///
    /// The first attempt must succeed (with one of the hubs); reconnection (if
    /// enabled) applies to losses after that.
    ///
    /// # Errors
    ///
    /// [`ClientError::Resolve`], [`ClientError::Connect`] or
    /// [`ClientError::ConnectTimeout`]; [`ClientError::InvalidEvent`] for a bad pattern
    /// or room given to the builder.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), hubcast::client::ClientError> {
    /// let client = hubcast::Client::builder().connect("127.0.0.1:3000").await?;
    /// # drop(client); Ok(()) }
    /// ```
    pub async fn connect(self, addr: impl ToString) -> Result<Client, ClientError> {
        for pattern in &self.patterns {
            Pattern::parse(pattern).map_err(ClientError::InvalidEvent)?;
        }
        for room in &self.rooms {
            RoomName::new(room.as_str()).map_err(ClientError::InvalidEvent)?;
        }
        let addrs: Vec<String> = addr
            .to_string()
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::Resolve {
                addr: addr.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address given")
                    .into(),
            });
        }
        let listeners = Arc::new(self.listeners);
        let mut first = Vec::new();
        let (current, stream) = task::dial_any(
            &addrs,
            0,
            self.connect_timeout,
            self.tls.as_ref(),
            &mut first,
        )
        .await?;
        let (commands, receiver) = mpsc::channel(self.buffer);
        let (connected_tx, connected) = watch::channel(true);
        let closing = CancellationToken::new();
        let (done_tx, done) = watch::channel(false);
        let state = Arc::new(Mutex::new(SessionState {
            hello: (!self.hello.is_empty()).then_some(serde_json::Value::Object(self.hello)),
            patterns: self.patterns,
            rooms: self.rooms,
            ..SessionState::default()
        }));
        let session = task::Session {
            state: Arc::clone(&state),
            addrs,
            current,
            connect_timeout: self.connect_timeout,
            tls: self.tls,
            reconnect: self.reconnect,
            idle_timeout: self.idle_timeout,
            mode: self.mode,
            listeners: Arc::clone(&listeners),
            commands: receiver,
            connected: connected_tx,
            closing: closing.clone(),
            done: done_tx,
        };
        // The first lookup and connect are told now, before `connect` returns: a
        // stream made on the builder sees them, one made later does not.
        for event in first {
            for stream in listeners.handle(&event) {
                let _ = stream.try_send(event.clone());
            }
        }
        tokio::spawn(session.run(stream));
        let shared = Arc::new(ClientState {
            commands,
            connected,
            listeners,
            closing,
            done,
            buffer: self.buffer,
            state,
        });
        shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle = Arc::downgrade(&shared);
        Ok(Client { shared })
    }
}

/// A send waiting for the background task.
pub(crate) struct Command {
    line: Bytes,
    ack: oneshot::Sender<Result<(), ClientError>>,
}

impl Command {
    /// Which bytes this sends: the same for a copy of its line, different for an
    /// equal line made apart (two sends of the same event are two sends). Valid while
    /// a copy of the line is held.
    pub(crate) fn key(&self) -> (usize, usize) {
        Self::key_of(&self.line)
    }

    /// [`Command::key`] of a send of `line`.
    pub(crate) fn key_of(line: &Bytes) -> (usize, usize) {
        (line.as_ptr() as usize, line.len())
    }

    /// Done without writing: it was written already.
    pub(crate) fn written(self) {
        let _ = self.ack.send(Ok(()));
    }
}

struct ClientState {
    commands: mpsc::Sender<Command>,
    connected: watch::Receiver<bool>,
    listeners: Arc<Listeners>,
    closing: CancellationToken,
    /// Becomes `true` when the background task has ended.
    done: watch::Receiver<bool>,
    buffer: usize,
    /// Subscriptions and rooms, restored after a reconnect.
    state: Arc<Mutex<SessionState>>,
}

impl Drop for ClientState {
    fn drop(&mut self) {
        // The last handle is gone: flush what was sent and close.
        self.closing.cancel();
    }
}

/// A connection to a hub. Clones share it; it closes when the last clone is dropped
/// (after sending what was queued) or on [`Client::close`].
///
/// # Examples
///
/// ```no_run
/// use hubcast::client::{Client, ClientEvent};
///
/// # async fn demo() -> Result<(), hubcast::client::ClientError> {
/// let client = Client::connect("127.0.0.1:3000").await?;
/// let mut events = client.events();
/// client.emit("pickup", &serde_json::json!({"store": "acme"})).await?;
/// while let Some(event) = events.next().await {
///     if let ClientEvent::Event(e) = event {
///         println!("{}: {}", e.name(), e.payload());
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    shared: Arc<ClientState>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Options for a new client.
    ///
    /// # Examples
    ///
    /// ```
    /// let builder = hubcast::Client::builder();
    /// ```
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects with the default options: no reconnection, a 10 s connect timeout.
    ///
    /// # Errors
    ///
    /// As [`ClientBuilder::connect`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), hubcast::client::ClientError> {
    /// let client = hubcast::Client::connect("127.0.0.1:3000").await?;
    /// # drop(client); Ok(()) }
    /// ```
    pub async fn connect(addr: impl ToString) -> Result<Client, ClientError> {
        Client::builder().connect(addr).await
    }

    /// Sends an event named `name` with `payload` encoded as JSON, and returns once its
    /// bytes are written to the socket.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidEvent`] for a bad name or payload;
    /// [`ClientError::BufferFull`] when disconnected with the buffer full;
    /// [`ClientError::ConnectionLost`] when the connection broke during the write;
    /// [`ClientError::Closed`] once the client is closed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// client.emit("pickup", &serde_json::json!({"store": "acme", "orderID": "42"})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn emit<T: Serialize + ?Sized>(
        &self,
        name: &str,
        payload: &T,
    ) -> Result<(), ClientError> {
        let event = Event::new(name, payload).map_err(ClientError::InvalidEvent)?;
        self.send(&event).await
    }

    /// Sends a pre-encoded event; returns once it is written to the socket.
    ///
    /// # Errors
    ///
    /// As [`Client::emit`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let event = hubcast::Event::new("pickup", &42)?;
    /// client.send(&event).await?;
    /// # Ok(()) }
    /// ```
    pub async fn send(&self, event: &Event) -> Result<(), ClientError> {
        self.enqueue(event).await?.await
    }

    /// Sends an event and waits until the hub confirms it (`$stored`): stored in a
    /// stream, or delivered live when no stream wants it. It carries a fresh `"id"`;
    /// if the connection drops first, it is sent again after the reconnect, and the hub
    /// drops it if it had it already, so it is stored once.
    ///
    /// # Errors
    ///
    /// As [`Client::emit`]; [`ClientError::Storage`] when the hub could not store it
    /// (it was delivered live only); [`ClientError::Closed`] if the client closes
    /// before the answer.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// let stored = client.emit_confirmed("pickup", &serde_json::json!({"orderID": "42"})).await?;
    /// println!("stored in {:?} as #{:?}", stored.stream, stored.seq);
    /// # Ok(()) }
    /// ```
    pub async fn emit_confirmed<T: Serialize + ?Sized>(
        &self,
        name: &str,
        payload: &T,
    ) -> Result<Stored, ClientError> {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        self.emit_with_id(name, payload, &id).await
    }

    /// [`Client::emit_confirmed`] with an id of the caller's (at most 128 bytes), such
    /// as an order number: sending the same id again is answered as a duplicate, and
    /// the event is neither stored nor broadcast twice.
    ///
    /// # Errors
    ///
    /// As [`Client::emit_confirmed`].
    pub async fn emit_with_id<T: Serialize + ?Sized>(
        &self,
        name: &str,
        payload: &T,
        id: &str,
    ) -> Result<Stored, ClientError> {
        self.enqueue_with_id(name, payload, id).await?.await
    }

    /// Queues an event with `id` behind earlier sends and returns at once with a
    /// [`Confirmation`], which completes when the hub confirms it: many can be in
    /// flight, sent in order (as [`Client::enqueue`]).
    ///
    /// # Errors
    ///
    /// As [`Client::enqueue`], and [`ClientError::InvalidEvent`] for a payload that is
    /// not serialisable or an id over 128 bytes.
    pub async fn enqueue_with_id<T: Serialize + ?Sized>(
        &self,
        name: &str,
        payload: &T,
        id: &str,
    ) -> Result<Confirmation, ClientError> {
        self.enqueue_identified(None, name, payload, id).await
    }

    /// [`Client::emit_with_id`] for the members of `room` only.
    ///
    /// # Errors
    ///
    /// As [`Client::emit_with_id`], and [`ClientError::InvalidEvent`] for a bad room.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// let order = serde_json::json!({"orderID": "42"});
    /// client.emit_to_with_id("acme", "delivered", &order, "delivered-42").await?;
    /// # Ok(()) }
    /// ```
    pub async fn emit_to_with_id<T: Serialize + ?Sized>(
        &self,
        room: &str,
        name: &str,
        payload: &T,
        id: &str,
    ) -> Result<Stored, ClientError> {
        RoomName::new(room).map_err(ClientError::InvalidEvent)?;
        self.enqueue_identified(Some(room), name, payload, id)
            .await?
            .await
    }

    async fn enqueue_identified<T: Serialize + ?Sized>(
        &self,
        room: Option<&str>,
        name: &str,
        payload: &T,
        id: &str,
    ) -> Result<Confirmation, ClientError> {
        let mut event = serde_json::json!({
            "event": name,
            "payload": payload,
            "id": id,
        });
        if let Some(room) = room {
            event["room"] = serde_json::json!(room);
        }
        let line = serde_json::to_vec(&event).map_err(|e| {
            ClientError::InvalidEvent(ProtocolError::new(
                crate::protocol::ErrorCode::InvalidPayload,
                e.to_string(),
            ))
        })?;
        let mut line = line;
        line.push(b'\n');
        let event = Event::from_line(Bytes::from(line)).map_err(ClientError::InvalidEvent)?;
        let (waiter, answer) = oneshot::channel();
        {
            let mut state = self.lock_state();
            state
                .unconfirmed
                .push((id.to_string(), event.line().clone()));
            state.confirms.insert(id.to_string(), waiter);
        }
        match self.enqueue(&event).await {
            // Written or not, it is in order behind earlier sends; a write lost with
            // the connection is resent after the reconnect.
            Ok(_written) => Ok(Confirmation { answer }),
            Err(e) => {
                let mut state = self.lock_state();
                state.unconfirmed.retain(|(waiting, _)| waiting != id);
                state.confirms.remove(id);
                Err(e)
            }
        }
    }

    /// Queues `event` behind earlier sends and returns at once with a [`Delivery`]
    /// that completes when it is written: many sends can be in flight, in order.
    ///
    /// # Errors
    ///
    /// [`ClientError::BufferFull`] when disconnected with the buffer full;
    /// [`ClientError::Closed`] once the client is closed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut in_flight = Vec::new();
    /// for n in 0..100 {
    ///     in_flight.push(client.enqueue(&hubcast::Event::new("tick", &n)?).await?);
    /// }
    /// for delivery in in_flight {
    ///     delivery.await?; // all 100 written, in order
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn enqueue(&self, event: &Event) -> Result<Delivery, ClientError> {
        let (ack, written) = oneshot::channel();
        let command = Command {
            line: event.line().clone(),
            ack,
        };
        let mut connected = self.shared.connected.clone();
        if *connected.borrow_and_update() {
            // Connected: wait for room, as a socket write would, but only while the
            // connection lasts: a send waiting when it drops is treated as one made
            // while disconnected (issue #11: it used to wait until a reconnect, or
            // forever).
            tokio::select! {
                permit = self.shared.commands.reserve() => {
                    permit.map_err(|_| ClientError::Closed)?.send(command);
                }
                _ = connected.wait_for(|up| !up) => {
                    self.shared
                        .commands
                        .try_send(command)
                        .map_err(|e| match e {
                            mpsc::error::TrySendError::Full(_) => {
                                ClientError::BufferFull(self.shared.buffer)
                            }
                            mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
                        })?;
                }
            }
        } else {
            self.shared
                .commands
                .try_send(command)
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => {
                        ClientError::BufferFull(self.shared.buffer)
                    }
                    mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
                })?;
        }
        Ok(Delivery { written })
    }

    /// Sends an event for the members of `room` only.
    ///
    /// # Errors
    ///
    /// As [`Client::emit`], and [`ClientError::InvalidEvent`] for a bad room name.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// client.emit_to("acme", "delivered", &serde_json::json!({"orderID": "42"})).await?;
    /// # Ok(()) }
    /// ```
    pub async fn emit_to<T: Serialize + ?Sized>(
        &self,
        room: &str,
        name: &str,
        payload: &T,
    ) -> Result<(), ClientError> {
        let event = Event::in_room(room, name, payload).map_err(ClientError::InvalidEvent)?;
        self.send(&event).await
    }

    /// Hears only events matching `patterns` from now on (NATS rules: `*` one segment,
    /// `>` one or more at the end). Kept across reconnects. The hub answers
    /// `$subscribed` (a [`ClientEvent::Control`]).
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidEvent`] for a pattern that breaks the rules (checked here,
    /// before anything is sent); otherwise as [`Client::send`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// client.subscribe(&["order.*", "delivered"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(&self, patterns: &[&str]) -> Result<(), ClientError> {
        self.change_patterns(patterns, true).await
    }

    /// Stops hearing events through `patterns`.
    ///
    /// # Errors
    ///
    /// As [`Client::subscribe`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// client.unsubscribe(&["order.*"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn unsubscribe(&self, patterns: &[&str]) -> Result<(), ClientError> {
        self.change_patterns(patterns, false).await
    }

    async fn change_patterns(&self, patterns: &[&str], add: bool) -> Result<(), ClientError> {
        for pattern in patterns {
            Pattern::parse(pattern).map_err(ClientError::InvalidEvent)?;
        }
        {
            let mut state = self.lock_state();
            for pattern in patterns {
                state.patterns.retain(|p| p != pattern);
                if add {
                    state.patterns.push(pattern.to_string());
                }
            }
        }
        let name = if add { "$subscribe" } else { "$unsubscribe" };
        self.emit(name, &serde_json::json!({ "events": patterns }))
            .await
    }

    /// Joins `room`: events sent to it (see [`Client::emit_to`]) reach this client.
    /// Kept across reconnects. The hub answers `$joined`.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidEvent`] for a bad room name; otherwise as [`Client::send`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// client.join("acme").await?;
    /// # Ok(()) }
    /// ```
    pub async fn join(&self, room: &str) -> Result<(), ClientError> {
        self.change_room(room, true).await
    }

    /// Leaves `room`.
    ///
    /// # Errors
    ///
    /// As [`Client::join`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// client.leave("acme").await?;
    /// # Ok(()) }
    /// ```
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        self.change_room(room, false).await
    }

    async fn change_room(&self, room: &str, join: bool) -> Result<(), ClientError> {
        RoomName::new(room).map_err(ClientError::InvalidEvent)?;
        {
            let mut state = self.lock_state();
            state.rooms.retain(|r| r != room);
            if join {
                state.rooms.push(room.to_string());
            }
        }
        let name = if join { "$join" } else { "$leave" };
        self.emit(name, &serde_json::json!({ "room": room })).await
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls `handler` for every event named `name` heard from now on.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::client::Client) {
    /// client.on("delivered", |event| println!("delivered: {}", event.payload()));
    /// # }
    /// ```
    pub fn on(&self, name: &str, handler: impl Fn(&Event) + Send + Sync + 'static) {
        self.shared.listeners.on(name, Arc::new(handler));
    }

    /// Calls `handler` for everything heard and every lifecycle change from now on.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(client: hubcast::Client) {
    /// client.on_any(|event| println!("{event:?}"));
    /// # }
    /// ```
    pub fn on_any(&self, handler: impl Fn(&ClientEvent) + Send + Sync + 'static) {
        self.shared.listeners.on_any(Arc::new(handler));
    }

    /// A stream of everything from now on (use [`ClientBuilder::events`] to miss
    /// nothing from the start).
    ///
    /// Each stream holds up to 1024 items. When one is full the client stops reading
    /// from the hub (rather than losing anything) but keeps sending, so a consumer that
    /// awaits [`Client::emit`] for each event it takes never deadlocks. A stream that
    /// stays unread makes the hub's queue for this client fill, and the hub disconnects
    /// it as a slow consumer: once read again, the stream yields what it holds, then
    /// the hub's `slow_consumer` error ([`ClientEvent::HubError`]), then the close.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) {
    /// let mut events = client.events();
    /// while let Some(event) = events.next().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub fn events(&self) -> Events {
        self.shared.listeners.stream()
    }

    /// Whether the connection is up right now.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(client: hubcast::Client) {
    /// if !client.is_connected() {
    ///     eprintln!("waiting for the hub...");
    /// }
    /// # }
    /// ```
    pub fn is_connected(&self) -> bool {
        *self.shared.connected.borrow() && !*self.shared.done.borrow()
    }

    /// Sends what is queued, closes the connection, and waits until it is closed.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) {
    /// client.emit("bye", &()).await.ok();
    /// client.close().await; // "bye" has reached the hub
    /// # }
    /// ```
    pub async fn close(&self) {
        self.shared.closing.cancel();
        let mut done = self.shared.done.clone();
        let _ = done.wait_for(|&done| done).await;
    }
}

/// A queued send: completes when its bytes are written to the socket.
///
/// Dropping it does not cancel the send. See [`Client::enqueue`].
///
/// # Examples
///
/// ```no_run
/// # async fn demo(client: hubcast::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let delivery = client.enqueue(&hubcast::Event::new("tick", &1)?).await?;
/// delivery.await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a Delivery tells whether the send was written; await it or drop it knowingly"]
pub struct Delivery {
    written: oneshot::Receiver<Result<(), ClientError>>,
}

impl std::future::Future for Delivery {
    type Output = Result<(), ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.written)
            .poll(cx)
            .map(|ack| ack.unwrap_or(Err(ClientError::Closed)))
    }
}

/// A stream of [`ClientEvent`]s from [`Client::events`]. It ends when the client is
/// closed for good.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(client: hubcast::Client) {
/// let mut events = client.events();
/// while let Some(event) = events.next().await {
///     println!("{event:?}");
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<ClientEvent>,
}

impl Events {
    /// The next item, or `None` once the client is closed for good.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(mut events: hubcast::client::Events) {
    /// while let Some(event) = events.next().await {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub async fn next(&mut self) -> Option<ClientEvent> {
        self.rx.recv().await
    }

    /// The next item if one is ready now, without waiting.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn demo(mut events: hubcast::client::Events) {
    /// while let Some(event) = events.try_next() {
    ///     println!("{event:?}");
    /// }
    /// # }
    /// ```
    pub fn try_next(&mut self) -> Option<ClientEvent> {
        self.rx.try_recv().ok()
    }
}

impl futures_core::Stream for Events {
    type Item = ClientEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClientEvent>> {
        self.rx.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter() {
        let policy = Reconnect {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            max_attempts: None,
        };
        for _ in 0..100 {
            let first = policy.delay(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.delay(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = policy.delay(50);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }
}
