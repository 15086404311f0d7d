//! The hub's settings, with the defaults `hubcast serve` documents.

use std::time::Duration;

use crate::frame::DEFAULT_MAX_FRAME;

/// The default bound on each client's outbound queue: 8 MiB.
pub const DEFAULT_MAX_PENDING: usize = 8 << 20;

/// The longest duration any setting or payload field may have: 365 days (longer ones
/// are refused rather than overflowing a clock, as `--idle-timeout 500000000000y` did).
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The default time the hub spends flushing queued events to a client before closing it.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The default limit on subscription patterns per connection.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1000;

/// The default limit on segments in one subscription pattern.
pub const DEFAULT_MAX_PATTERN_SEGMENTS: usize = 16;

/// The default limit on the total length of the patterns one connection holds: 64 KiB.
pub const DEFAULT_MAX_PATTERN_BYTES: usize = 64 << 10;

/// The default limit on rooms per connection.
pub const DEFAULT_MAX_ROOMS: usize = 100;

/// The default bound on memory held in all connections' read buffers: 256 MiB.
pub const DEFAULT_MAX_INBOUND_MEMORY: usize = 256 << 20;

/// The default limit on connected clients.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// The default error budget: this many bad frames ...
pub const DEFAULT_MAX_ERRORS: usize = 10;

/// ... within this window.
pub const DEFAULT_ERROR_WINDOW: Duration = Duration::from_secs(10);

/// How a hub behaves, in sections: [`Limits`], [`Delivery`] and [`Timeouts`]. The
/// sections to come (TLS, authentication, the store, the cluster) are added beside
/// them; the struct is `#[non_exhaustive]` so that adding one breaks no embedding code.
///
/// Build one with [`Config::builder`] (which validates), or start from
/// [`Config::default`] and set fields; [`Hub::try_new`](crate::Hub::try_new) validates
/// either way.
///
/// # Examples
///
/// ```
/// let config = hubcast::Config::builder().echo(false).max_frame(64 << 10).build()?;
/// assert_eq!(config.limits.max_frame, 64 << 10);
/// assert!(!config.delivery.echo);
///
/// // Settings that cannot work are refused, naming the setting.
/// let err = hubcast::Config::builder().max_pending(1000).build().unwrap_err();
/// assert_eq!(err.setting(), hubcast::Setting::MaxPending);
/// # Ok::<(), hubcast::ConfigError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Config {
    /// What one client, and all of them together, may cost the hub.
    pub limits: Limits,
    /// Who hears what, and what happens to a client that cannot keep up.
    pub delivery: Delivery,
    /// How long the hub waits for quiet and closing clients.
    pub timeouts: Timeouts,
    /// Durable streams: which events are stored, where, and how surely.
    pub streams: Streams,
}

/// How long a new connection has to authenticate, by default.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(2);

/// How often WebSocket clients are pinged, by default (Socket.IO's `pingInterval`).
pub const DEFAULT_WS_PING: Duration = Duration::from_secs(25);

/// The default window in which a resent `"id"` is recognised as a duplicate.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// The most publisher ids remembered for deduplication; past it the oldest are
/// forgotten first, a generation at a time (the window is then shorter than
/// `dedup_window`), and at least the last half of them are always remembered.
pub const MAX_DEDUP_IDS: usize = 100_000;

/// Durable streams: every client event whose name matches a stream's patterns is
/// appended to it (the first declared stream that matches) before it is confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Streams {
    /// The streams, in the order they are matched.
    pub declared: Vec<StreamSpec>,
    /// Where they are kept (default `./hubcast-data`).
    pub data_dir: std::path::PathBuf,
    /// When an appended event counts as stored.
    pub fsync: crate::store::Fsync,
    /// How much each stream keeps.
    pub retention: crate::store::Retention,
    /// A resent `"id"` within this window is neither stored nor broadcast again.
    pub dedup_window: Duration,
    /// Where the streams live when the hub is a cluster node: in JetStream
    /// ([`JetStream::connect`](crate::cluster::jetstream::JetStream::connect)), not
    /// in `data_dir`.
    pub jetstream: Option<crate::cluster::jetstream::Engine>,
}

impl Streams {
    /// What stream `name` keeps: its own limits over the hub-wide ones. A dead-letter
    /// stream (`orders.dead`) keeps what its stream keeps; an undeclared name, the
    /// hub-wide limits.
    pub fn retention_of(&self, name: &str) -> crate::store::Retention {
        let declared = name.strip_suffix(DEAD_SUFFIX).unwrap_or(name);
        self.declared
            .iter()
            .find(|spec| spec.name == declared)
            .map_or_else(
                || self.retention.clone(),
                |spec| spec.limits.over(&self.retention),
            )
    }
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            declared: Vec::new(),
            data_dir: "hubcast-data".into(),
            fsync: crate::store::Fsync::Always,
            retention: crate::store::Retention::default(),
            dedup_window: DEFAULT_DEDUP_WINDOW,
            jetstream: None,
        }
    }
}

/// What a stream's dead-letter stream adds to its name (`orders` → `orders.dead`).
pub const DEAD_SUFFIX: &str = ".dead";

/// One declared stream: its name and the event-name patterns it stores.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSpec {
    /// Its name: letters, digits, `-`, `_`, `.`, at most 64 bytes.
    pub name: String,
    /// Patterns as in `$subscribe` (`orders.*`, `pickup`).
    pub patterns: Vec<String>,
    /// Its own limits, where they differ from the hub-wide [`Streams::retention`]
    /// (its dead-letter stream keeps the same).
    pub limits: StreamLimits,
}

/// One stream's own retention limits: each one set replaces the hub-wide one
/// ([`Streams::retention`]) for that stream; those not set are the hub-wide ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamLimits {
    /// The most events it keeps.
    pub max_events: Option<u64>,
    /// The most bytes its files may take.
    pub max_bytes: Option<u64>,
    /// Its events older than this are deleted (a segment at a time).
    pub max_age: Option<Duration>,
}

impl StreamLimits {
    /// No limit of its own: the hub-wide ones.
    pub fn new() -> Self {
        StreamLimits::default()
    }

    /// Keeps at most `n` events.
    pub fn max_events(mut self, n: u64) -> Self {
        self.max_events = Some(n);
        self
    }

    /// Its files take at most `bytes`.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// Deletes events older than `age`.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// These limits over `hub_wide`.
    pub fn over(&self, hub_wide: &crate::store::Retention) -> crate::store::Retention {
        crate::store::Retention {
            max_events: self.max_events.unwrap_or(hub_wide.max_events),
            max_bytes: self.max_bytes.unwrap_or(hub_wide.max_bytes),
            max_age: self.max_age.or(hub_wide.max_age),
        }
    }
}

impl StreamSpec {
    /// A stream named `name` storing events whose names match any of `patterns`.
    pub fn new(name: impl Into<String>, patterns: &[&str]) -> Self {
        StreamSpec {
            name: name.into(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            limits: StreamLimits::default(),
        }
    }

    /// The same stream with limits of its own.
    pub fn with_limits(mut self, limits: StreamLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Parses `NAME=PATTERN[,PATTERN...]`, as `hubcast serve --stream` takes it.
    ///
    /// # Errors
    ///
    /// A message naming what is missing.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, patterns) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?}: expected NAME=PATTERN[,PATTERN...]"))?;
        let patterns: Vec<&str> = patterns.split(',').map(str::trim).collect();
        if name.is_empty() || patterns.iter().any(|p| p.is_empty()) {
            return Err(format!("{text:?}: expected NAME=PATTERN[,PATTERN...]"));
        }
        Ok(StreamSpec::new(name, &patterns))
    }
}

/// What one client, and all of them together, may cost the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The longest frame a client may send, in bytes; longer closes the connection.
    pub max_frame: usize,
    /// The most bytes queued for one client before it counts as a slow consumer
    /// (each queued frame also counts [`QUEUE_ENTRY_OVERHEAD`] bytes).
    pub max_pending: usize,
    /// The most bytes all connections' read buffers (frames in progress) may hold;
    /// past it, connections whose frames need more are not read until memory frees.
    pub max_inbound_memory: usize,
    /// The most clients connected at once; more are answered `too_many_connections`.
    pub max_connections: usize,
    /// The most subscription patterns one connection may hold.
    pub max_subscriptions: usize,
    /// The most segments one subscription pattern may have: a pattern's matching cost
    /// can grow with its segments (see [`routing::Router`](crate::routing::Router)).
    pub max_pattern_segments: usize,
    /// The most bytes of pattern text one connection may hold in all (its share of the
    /// routing index: at most ~40 bytes of memory per byte of pattern).
    pub max_pattern_bytes: usize,
    /// The most rooms one connection may be in.
    pub max_rooms: usize,
    /// A connection that sends more than this many bad frames within `error_window`
    /// is closed (`too_many_errors`).
    pub max_errors: usize,
    /// The window for `max_errors`.
    pub error_window: Duration,
    /// The most events per second one connection may send; past it the hub stops
    /// reading it for a while (TCP back-pressure: nothing is dropped). `None`: no limit.
    pub max_rate: Option<u32>,
    /// The most bytes per second one connection may send, as `max_rate`.
    pub max_bytes_rate: Option<u64>,
    /// The most connections from one IP address at once; more are answered
    /// `too_many_connections`. `None`: no limit.
    pub max_conns_per_ip: Option<usize>,
    /// The most connection attempts per second from one IP address; more are answered
    /// `too_many_connections` with a retry hint. `None`: no limit.
    pub accept_rate: Option<u32>,
}

/// Who hears what, and what happens to a client that cannot keep up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// Whether a sender also receives its own events (the default, as in the class's
    /// broadcast server).
    pub echo: bool,
    /// What to do with a client whose queue is full.
    pub slow_consumer: SlowConsumerPolicy,
}

/// How long the hub waits for quiet and closing clients.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// Close connections that send nothing for this long (`None`: never).
    pub idle: Option<Duration>,
    /// How long closing connections may spend flushing what is queued for them
    /// (at shutdown, after end of stream, or to deliver a final `$error`).
    pub drain: Duration,
    /// With authentication on, how long a new connection has to send its `$hello`.
    pub auth: Duration,
    /// How often the hub pings a WebSocket client (a WebSocket ping frame); a client
    /// silent for two intervals is closed `heartbeat_timeout`. `None`: never.
    pub ws_ping: Option<Duration>,
}

/// What the hub does with a client that reads too slowly (its queue is full).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SlowConsumerPolicy {
    /// Send `$error` `slow_consumer` and disconnect it (the default).
    #[default]
    Disconnect,
    /// Keep it, discard the events that do not fit, and tell it once per episode with
    /// `$error` `events_dropped` and a count.
    Drop,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: DEFAULT_MAX_FRAME,
            max_pending: DEFAULT_MAX_PENDING,
            max_inbound_memory: DEFAULT_MAX_INBOUND_MEMORY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_pattern_segments: DEFAULT_MAX_PATTERN_SEGMENTS,
            max_pattern_bytes: DEFAULT_MAX_PATTERN_BYTES,
            max_rooms: DEFAULT_MAX_ROOMS,
            max_errors: DEFAULT_MAX_ERRORS,
            error_window: DEFAULT_ERROR_WINDOW,
            max_rate: None,
            max_bytes_rate: None,
            max_conns_per_ip: None,
            accept_rate: None,
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            echo: true,
            slow_consumer: SlowConsumerPolicy::Disconnect,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: None,
            drain: DEFAULT_DRAIN_TIMEOUT,
            auth: DEFAULT_AUTH_TIMEOUT,
            ws_ping: Some(DEFAULT_WS_PING),
        }
    }
}

/// One setting of [`Config`], as a [`ConfigError`] names it: [`Setting::key`] is its
/// path in the config (and in a config file), [`Setting::flag`] its `hubcast serve` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Setting {
    /// [`Limits::max_frame`]
    MaxFrame,
    /// [`Limits::max_pending`]
    MaxPending,
    /// [`Limits::max_inbound_memory`]
    MaxInboundMemory,
    /// [`Limits::max_connections`]
    MaxConnections,
    /// [`Limits::max_subscriptions`]
    MaxSubscriptions,
    /// [`Limits::max_pattern_segments`]
    MaxPatternSegments,
    /// [`Limits::max_pattern_bytes`]
    MaxPatternBytes,
    /// [`Limits::max_rooms`]
    MaxRooms,
    /// [`Limits::max_errors`]
    MaxErrors,
    /// [`Limits::error_window`]
    ErrorWindow,
    /// [`Delivery::echo`]
    Echo,
    /// [`Delivery::slow_consumer`]
    SlowConsumer,
    /// [`Timeouts::idle`]
    IdleTimeout,
    /// [`Timeouts::drain`]
    DrainTimeout,
    /// [`Streams::declared`]
    Stream,
    /// [`StreamSpec::limits`]
    StreamLimits,
    /// [`Streams::data_dir`]
    DataDir,
    /// [`Streams::dedup_window`]
    DedupWindow,
    /// [`Timeouts::auth`]
    AuthTimeout,
    /// [`Limits::max_rate`]
    MaxRate,
    /// [`Limits::max_bytes_rate`]
    MaxBytesRate,
    /// [`Limits::max_conns_per_ip`]
    MaxConnsPerIp,
    /// [`Limits::accept_rate`]
    AcceptRate,
    /// [`Timeouts::ws_ping`]
    WsPing,
}

impl Setting {
    /// Its path in [`Config`], e.g. `limits.max_pending`.
    pub fn key(self) -> &'static str {
        match self {
            Setting::MaxFrame => "limits.max_frame",
            Setting::MaxPending => "limits.max_pending",
            Setting::MaxInboundMemory => "limits.max_inbound_memory",
            Setting::MaxConnections => "limits.max_connections",
            Setting::MaxSubscriptions => "limits.max_subscriptions",
            Setting::MaxPatternSegments => "limits.max_pattern_segments",
            Setting::MaxPatternBytes => "limits.max_pattern_bytes",
            Setting::MaxRooms => "limits.max_rooms",
            Setting::MaxErrors => "limits.max_errors",
            Setting::ErrorWindow => "limits.error_window",
            Setting::Echo => "delivery.echo",
            Setting::SlowConsumer => "delivery.slow_consumer",
            Setting::IdleTimeout => "timeouts.idle",
            Setting::DrainTimeout => "timeouts.drain",
            Setting::Stream => "streams.declared",
            Setting::StreamLimits => "streams.limits",
            Setting::DataDir => "streams.data_dir",
            Setting::DedupWindow => "streams.dedup_window",
            Setting::AuthTimeout => "timeouts.auth",
            Setting::MaxRate => "limits.max_rate",
            Setting::MaxBytesRate => "limits.max_bytes_rate",
            Setting::MaxConnsPerIp => "limits.max_conns_per_ip",
            Setting::AcceptRate => "limits.accept_rate",
            Setting::WsPing => "timeouts.ws_ping",
        }
    }

    /// Its `hubcast serve` flag, e.g. `--max-pending`.
    pub fn flag(self) -> &'static str {
        match self {
            Setting::MaxFrame => "--max-frame",
            Setting::MaxPending => "--max-pending",
            Setting::MaxInboundMemory => "--max-inbound-memory",
            Setting::MaxConnections => "--max-conns",
            Setting::MaxSubscriptions => "--max-subscriptions",
            Setting::MaxPatternSegments => "--max-pattern-segments",
            Setting::MaxPatternBytes => "--max-pattern-bytes",
            Setting::MaxRooms => "--max-rooms",
            Setting::MaxErrors => "--max-errors",
            Setting::ErrorWindow => "--error-window",
            Setting::Echo => "--no-echo",
            Setting::SlowConsumer => "--slow-consumer",
            Setting::IdleTimeout => "--idle-timeout",
            Setting::DrainTimeout => "--drain-timeout",
            Setting::Stream => "--stream",
            Setting::StreamLimits => "--stream-limits",
            Setting::DataDir => "--data-dir",
            Setting::DedupWindow => "--dedup-window",
            Setting::AuthTimeout => "--auth-timeout",
            Setting::MaxRate => "--max-rate",
            Setting::MaxBytesRate => "--max-bytes-rate",
            Setting::MaxConnsPerIp => "--max-conns-per-ip",
            Setting::AcceptRate => "--accept-rate",
            Setting::WsPing => "--ws-ping",
        }
    }
}

/// A setting that cannot work, and why: what [`Config::validate`] and
/// [`ConfigBuilder::build`] return.
///
/// Its `Display` names settings by their [`Setting::key`];
/// [`ConfigError::describe`] names them any other way (the CLI uses flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    setting: Setting,
    problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Problem {
    /// Zero (or an empty duration) where that stops the hub from working.
    Zero(&'static str),
    /// A duration past [`MAX_DURATION`].
    TooLong(Duration),
    /// Smaller than another setting allows: (value, other setting, least value, why).
    BelowOther(usize, Setting, usize, &'static str),
    /// A value that cannot work, and why.
    Unusable(String),
}

impl ConfigError {
    /// A setting that cannot be used, and why (for checks made outside
    /// [`Config::validate`], such as opening the store).
    pub(crate) fn unusable(setting: Setting, why: impl Into<String>) -> Self {
        ConfigError {
            setting,
            problem: Problem::Unusable(why.into()),
        }
    }

    /// The setting at fault.
    pub fn setting(&self) -> Setting {
        self.setting
    }

    /// The problem in one line, naming each setting with `name` (e.g. [`Setting::flag`]).
    pub fn describe(&self, name: impl Fn(Setting) -> &'static str) -> String {
        let this = name(self.setting);
        match &self.problem {
            Problem::Zero(why) => format!("{this} must be greater than zero: {why}"),
            Problem::TooLong(value) => format!(
                "{this} is {value:?}, longer than the longest allowed ({} days)",
                MAX_DURATION.as_secs() / 86_400
            ),
            Problem::BelowOther(value, other, least, why) => format!(
                "{this} is {value} bytes; with this {} it must be at least {least} bytes: {why}",
                name(*other)
            ),
            Problem::Unusable(why) => format!("{this}: {why}"),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe(Setting::key))
    }
}

impl std::error::Error for ConfigError {}

/// What one queued frame costs a client's [`Limits::max_pending`] besides its bytes:
/// its slot in the queue and its allocation's header and rounding.
pub const QUEUE_ENTRY_OVERHEAD: usize = crate::outbox::ENTRY_OVERHEAD;

impl Config {
    /// A builder, starting from the defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
        }
    }

    /// Checks that the settings can work together: every limit that must be positive
    /// is, durations are at most [`MAX_DURATION`], a client's queue holds at least one
    /// frame of the largest size, and the inbound budget holds two.
    ///
    /// # Errors
    ///
    /// The first setting that cannot work, as a [`ConfigError`] naming it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |setting, problem| Err(ConfigError { setting, problem });
        let limits = &self.limits;
        let positive = [
            (Setting::MaxFrame, limits.max_frame, "no event would fit"),
            (
                Setting::MaxConnections,
                limits.max_connections,
                "every client would be refused",
            ),
            (
                Setting::MaxPatternSegments,
                limits.max_pattern_segments,
                "no pattern would fit",
            ),
            (
                Setting::MaxPatternBytes,
                limits.max_pattern_bytes,
                "no pattern would fit",
            ),
        ];
        let optional = [
            (
                Setting::MaxRate,
                limits.max_rate.map(u64::from),
                "no event could be sent",
            ),
            (
                Setting::MaxBytesRate,
                limits.max_bytes_rate,
                "no event could be sent",
            ),
            (
                Setting::MaxConnsPerIp,
                limits.max_conns_per_ip.map(|n| n as u64),
                "every client would be refused",
            ),
            (
                Setting::AcceptRate,
                limits.accept_rate.map(u64::from),
                "every client would be refused",
            ),
        ];
        for (setting, value, why) in optional {
            if value == Some(0) {
                return fail(setting, Problem::Zero(why));
            }
        }
        for (setting, value, why) in positive {
            if value == 0 {
                return fail(setting, Problem::Zero(why));
            }
        }
        let durations = [
            (
                Setting::ErrorWindow,
                Some(limits.error_window),
                "no error would ever count",
            ),
            (
                Setting::IdleTimeout,
                self.timeouts.idle,
                "every client would be closed at once (leave it unset to never close idle clients)",
            ),
            (Setting::DrainTimeout, Some(self.timeouts.drain), ""),
            (
                Setting::AuthTimeout,
                Some(self.timeouts.auth),
                "every client would be closed before it could authenticate",
            ),
            (
                Setting::WsPing,
                self.timeouts.ws_ping,
                "WebSocket clients would be pinged without pause (leave it unset to never ping)",
            ),
        ];
        for (setting, value, why) in durations {
            match value {
                Some(d) if d.is_zero() && !why.is_empty() => {
                    return fail(setting, Problem::Zero(why))
                }
                Some(d) if d > MAX_DURATION => return fail(setting, Problem::TooLong(d)),
                _ => {}
            }
        }
        // A full-size frame is queued with its `\n` and the per-entry overhead.
        let one_frame = limits.max_frame.saturating_add(1 + QUEUE_ENTRY_OVERHEAD);
        if limits.max_pending < one_frame {
            return fail(
                Setting::MaxPending,
                Problem::BelowOther(
                    limits.max_pending,
                    Setting::MaxFrame,
                    one_frame,
                    "every receiver of a full-size event would be cut as a slow consumer",
                ),
            );
        }
        let two_frames = limits.max_frame.saturating_add(1).saturating_mul(2);
        if limits.max_inbound_memory < two_frames {
            return fail(
                Setting::MaxInboundMemory,
                Problem::BelowOther(
                    limits.max_inbound_memory,
                    Setting::MaxFrame,
                    two_frames,
                    "half of it is for ordinary reads and half for full-size frames in progress",
                ),
            );
        }
        self.streams.validate()?;
        Ok(())
    }
}

impl Streams {
    fn validate(&self) -> Result<(), ConfigError> {
        let unusable = |setting, why: String| Err(ConfigError::unusable(setting, why));
        let mut names = std::collections::HashSet::new();
        for spec in &self.declared {
            if let Err(e) = crate::store::check_name(&spec.name) {
                return unusable(Setting::Stream, e.to_string());
            }
            // Each stream has a dead-letter stream beside it, NAME.dead.
            if spec.name.ends_with(DEAD_SUFFIX) || spec.name.len() + DEAD_SUFFIX.len() > 64 {
                return unusable(
                    Setting::Stream,
                    format!(
                        "stream {:?}: names ending in {DEAD_SUFFIX:?} are the dead-letter streams', and a name is at most {} bytes",
                        spec.name,
                        64 - DEAD_SUFFIX.len()
                    ),
                );
            }
            if !names.insert(spec.name.as_str()) {
                return unusable(
                    Setting::Stream,
                    format!("stream {:?} is declared twice", spec.name),
                );
            }
            if spec.patterns.is_empty() {
                return unusable(
                    Setting::Stream,
                    format!("stream {:?} has no pattern", spec.name),
                );
            }
            for pattern in &spec.patterns {
                if let Err(e) = crate::routing::Pattern::parse(pattern) {
                    return unusable(
                        Setting::Stream,
                        format!("stream {:?}: {}", spec.name, e.message),
                    );
                }
            }
            let limits = &spec.limits;
            if limits.max_events == Some(0) || limits.max_bytes == Some(0) {
                return unusable(
                    Setting::StreamLimits,
                    format!(
                        "stream {:?}: max_events and max_bytes must be more than 0",
                        spec.name
                    ),
                );
            }
            if limits
                .max_age
                .is_some_and(|age| age.is_zero() || age > MAX_DURATION)
            {
                return unusable(
                    Setting::StreamLimits,
                    format!(
                        "stream {:?}: max_age must be more than 0 and at most {} days",
                        spec.name,
                        MAX_DURATION.as_secs() / 86_400
                    ),
                );
            }
        }
        if self.dedup_window > MAX_DURATION {
            return Err(ConfigError {
                setting: Setting::DedupWindow,
                problem: Problem::TooLong(self.dedup_window),
            });
        }
        Ok(())
    }
}

/// Builds a [`Config`], one setting per method, validated by [`ConfigBuilder::build`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ConfigBuilder {
    config: Config,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty => $($field:ident).+;)*) => {
        impl ConfigBuilder {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: $ty) -> Self {
                    self.config.$($field).+ = value;
                    self
                }
            )*
        }
    };
}

setters! {
    /// Sets [`Limits::max_frame`].
    max_frame: usize => limits.max_frame;
    /// Sets [`Limits::max_pending`].
    max_pending: usize => limits.max_pending;
    /// Sets [`Limits::max_inbound_memory`].
    max_inbound_memory: usize => limits.max_inbound_memory;
    /// Sets [`Limits::max_connections`].
    max_connections: usize => limits.max_connections;
    /// Sets [`Limits::max_subscriptions`].
    max_subscriptions: usize => limits.max_subscriptions;
    /// Sets [`Limits::max_pattern_segments`].
    max_pattern_segments: usize => limits.max_pattern_segments;
    /// Sets [`Limits::max_pattern_bytes`].
    max_pattern_bytes: usize => limits.max_pattern_bytes;
    /// Sets [`Limits::max_rooms`].
    max_rooms: usize => limits.max_rooms;
    /// Sets [`Limits::max_errors`].
    max_errors: usize => limits.max_errors;
    /// Sets [`Limits::error_window`].
    error_window: Duration => limits.error_window;
    /// Sets [`Delivery::echo`].
    echo: bool => delivery.echo;
    /// Sets [`Delivery::slow_consumer`].
    slow_consumer: SlowConsumerPolicy => delivery.slow_consumer;
    /// Sets [`Timeouts::idle`].
    idle_timeout: Option<Duration> => timeouts.idle;
    /// Sets [`Timeouts::drain`].
    drain_timeout: Duration => timeouts.drain;
    /// Sets [`Timeouts::auth`].
    auth_timeout: Duration => timeouts.auth;
    /// Sets [`Timeouts::ws_ping`].
    ws_ping: Option<Duration> => timeouts.ws_ping;
    /// Sets [`Limits::max_rate`].
    max_rate: Option<u32> => limits.max_rate;
    /// Sets [`Limits::max_bytes_rate`].
    max_bytes_rate: Option<u64> => limits.max_bytes_rate;
    /// Sets [`Limits::max_conns_per_ip`].
    max_conns_per_ip: Option<usize> => limits.max_conns_per_ip;
    /// Sets [`Limits::accept_rate`].
    accept_rate: Option<u32> => limits.accept_rate;
    /// Sets [`Streams::declared`].
    streams: Vec<StreamSpec> => streams.declared;
    /// Sets [`Streams::data_dir`].
    data_dir: std::path::PathBuf => streams.data_dir;
    /// Sets [`Streams::fsync`].
    fsync: crate::store::Fsync => streams.fsync;
    /// Sets [`Streams::dedup_window`].
    dedup_window: Duration => streams.dedup_window;
    /// Sets [`Streams::retention`] (each stream's limits).
    retention: crate::store::Retention => streams.retention;
}

impl ConfigBuilder {
    /// The config, once [`Config::validate`] accepts it.
    ///
    /// # Errors
    ///
    /// The first setting that cannot work.
    pub fn build(self) -> Result<Config, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    /// Issue #12: a stream's own limits replace the hub-wide ones for it and its
    /// dead-letter stream, and no other; limits that cannot work are refused.
    #[test]
    fn a_stream_keeps_its_own_limits_over_the_hub_wide_ones() {
        let week = Duration::from_secs(7 * 86_400);
        let config = Config::builder()
            .streams(vec![
                StreamSpec::new("orders", &["pickup"])
                    .with_limits(StreamLimits::new().max_events(5).max_age(week)),
                StreamSpec::new("audit", &["audit.>"]),
            ])
            .build()
            .unwrap();
        let hub_wide = crate::store::Retention::default();
        let orders = config.streams.retention_of("orders");
        assert_eq!(
            (orders.max_events, orders.max_bytes, orders.max_age),
            (5, hub_wide.max_bytes, Some(week))
        );
        assert_eq!(config.streams.retention_of("orders.dead"), orders);
        assert_eq!(config.streams.retention_of("audit"), hub_wide);
        assert_eq!(config.streams.retention_of("audit.dead"), hub_wide);
        for limits in [
            StreamLimits::new().max_events(0),
            StreamLimits::new().max_bytes(0),
            StreamLimits::new().max_age(Duration::ZERO),
        ] {
            let refused = Config::builder()
                .streams(vec![
                    StreamSpec::new("orders", &["pickup"]).with_limits(limits)
                ])
                .build()
                .unwrap_err();
            assert_eq!(refused.setting, Setting::StreamLimits, "{refused}");
            assert!(refused.to_string().contains("\"orders\""), "{refused}");
        }
    }

    /// Issue #11 (5): settings that cannot work are refused, naming the setting.
    #[test]
    fn settings_that_cannot_work_are_refused() {
        let cases = [
            (
                Config::builder().idle_timeout(Some(Duration::ZERO)),
                Setting::IdleTimeout,
            ),
            (
                Config::builder().max_frame(1 << 20).max_pending(1 << 20),
                Setting::MaxPending,
            ),
            (Config::builder().max_frame(0), Setting::MaxFrame),
            (
                Config::builder().max_connections(0),
                Setting::MaxConnections,
            ),
            (
                Config::builder().drain_timeout(MAX_DURATION * 2),
                Setting::DrainTimeout,
            ),
            (
                Config::builder().max_inbound_memory(1 << 20),
                Setting::MaxInboundMemory,
            ),
            (
                Config::builder().error_window(Duration::ZERO),
                Setting::ErrorWindow,
            ),
        ];
        for (builder, setting) in cases {
            let err = builder.build().unwrap_err();
            assert_eq!(err.setting(), setting, "{err}");
            assert!(err.to_string().starts_with(setting.key()), "{err}");
            assert!(err.describe(Setting::flag).starts_with(setting.flag()));
        }
    }

    #[test]
    fn the_smallest_workable_queue_is_accepted() {
        let config = Config::builder()
            .max_frame(1000)
            .max_pending(1000 + 1 + QUEUE_ENTRY_OVERHEAD)
            .drain_timeout(Duration::ZERO)
            .build();
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn a_message_names_both_settings() {
        let err = Config::builder().max_pending(10).build().unwrap_err();
        let line = err.describe(Setting::flag);
        assert!(
            line.contains("--max-pending") && line.contains("--max-frame"),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
