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

/// How a hub behaves.
///
/// # Examples
///
/// ```
/// let config = hubcast::Config { echo: false, ..hubcast::Config::default() };
/// assert_eq!(config.max_frame, 1 << 20);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The longest frame a client may send, in bytes; longer closes the connection.
    pub max_frame: usize,
    /// The most bytes queued for one client before it counts as a slow consumer.
    pub max_pending: usize,
    /// Whether a sender also receives its own events (the lecture's behaviour).
    pub echo: bool,
    /// How long closing connections may spend flushing what is queued for them
    /// (at shutdown, after end of stream, or to deliver a final `$error`).
    pub drain_timeout: Duration,
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
    /// Close connections that send nothing for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// The most clients connected at once; more are answered `too_many_connections`.
    pub max_connections: usize,
    /// A connection that sends more than this many bad frames within `error_window`
    /// is closed (`too_many_errors`).
    pub max_errors: usize,
    /// The window for `max_errors`.
    pub error_window: Duration,
    /// What to do with a client whose queue is full.
    pub slow_consumer: SlowConsumerPolicy,
    /// The most bytes all connections' read buffers (frames in progress) may hold;
    /// past it, connections whose frames need more are not read until memory frees.
    pub max_inbound_memory: usize,
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

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame: DEFAULT_MAX_FRAME,
            max_pending: DEFAULT_MAX_PENDING,
            echo: true,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_pattern_segments: DEFAULT_MAX_PATTERN_SEGMENTS,
            max_pattern_bytes: DEFAULT_MAX_PATTERN_BYTES,
            max_rooms: DEFAULT_MAX_ROOMS,
            idle_timeout: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_errors: DEFAULT_MAX_ERRORS,
            error_window: DEFAULT_ERROR_WINDOW,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            max_inbound_memory: DEFAULT_MAX_INBOUND_MEMORY,
        }
    }
}
