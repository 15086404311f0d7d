//! The hub's settings, with the defaults `hubcast serve` documents.

use std::time::Duration;

use crate::frame::DEFAULT_MAX_FRAME;

/// The default bound on each client's outbound queue: 8 MiB.
pub const DEFAULT_MAX_PENDING: usize = 8 << 20;

/// The default time the hub spends flushing queued events to a client before closing it.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The default limit on subscription patterns per connection.
pub const DEFAULT_MAX_SUBSCRIPTIONS: usize = 1000;

/// The default limit on rooms per connection.
pub const DEFAULT_MAX_ROOMS: usize = 100;

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
    /// The most rooms one connection may be in.
    pub max_rooms: usize,
    /// Close connections that send nothing for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame: DEFAULT_MAX_FRAME,
            max_pending: DEFAULT_MAX_PENDING,
            echo: true,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_subscriptions: DEFAULT_MAX_SUBSCRIPTIONS,
            max_rooms: DEFAULT_MAX_ROOMS,
            idle_timeout: None,
        }
    }
}
