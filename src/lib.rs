//! hubcast: a TCP event hub. Clients send JSON events; the hub checks each one and
//! broadcasts it to every connected client.
//!
//! # How an event flows
//!
//! ```text
//!  Listener ──▶ Transport ──bytes──▶ connection task ──▶ FrameDecoder ──▶ Run / Event
//!  (TCP)        + PeerInfo            (connection.rs)     (frame.rs)         │
//!  (transport.rs)                                                            ▼
//!                                       ingest: authorize → store → backplane → fan out
//!                                       (ingest.rs)                            (hub/fanout.rs)
//!                                                                      │ one Bytes chunk
//!                                                                      │ (a run of events,
//!                                                                      │ or one line),
//!                                                                      │ shared, per member
//!                                                                      ▼
//!  socket ◀──writev── connection task ◀──────────────────────────── Outbox (outbox.rs)
//!  (client B)                                                       bounded in bytes
//! ```
//!
//! * `transport`: where connections come from (a `Listener`) and what the session loop
//!   serves (a `Transport` with a `PeerInfo`): TCP today; TLS and WebSocket plug in here.
//! * [`frame`]: cuts the inbound byte stream into frames (no I/O); a hand-written fast
//!   path validates typical events in one pass and takes consecutive ones as a
//!   [`frame::Run`], with serde_json as the reference for everything else.
//! * [`event`](Event): validates a frame into an [`Event`] with an [`EventName`].
//! * [`protocol`](ErrorCode): error codes and the `$error` frame.
//! * `ingest`: the one way a client's event enters the hub, in stages (authorize,
//!   store, backplane, fan out); store and fan-out act today.
//! * `outbox`: each client's bounded outbound queue.
//! * [`Hub`]: the handle for embedding code, counters, and [`HubEvent`]s for observers;
//!   `hub/pool.rs` holds who is connected and who wants what, `hub/fanout.rs` queues
//!   events to them.
//! * `connection`: one task per client, one `select!` over reads, writes and shutdown.
//! * [`Server`]: the accept loop and graceful shutdown.
//! * [`routing`]: subscription patterns and the index that matches them.
//! * `control`: the hub's `$` control events, one module per request.
//! * [`Config`]: the hub's settings in sections ([`Limits`], [`Delivery`],
//!   [`Timeouts`]), validated, as `hubcast serve` exposes them.
//! * `inbound`: the hub-wide budget for read buffers (frames in progress).
//! * [`store`]: durable streams' storage, an append-only segment log with group
//!   commit (docs/storage.md); `durable`: the ingest pipeline's store stage (streams,
//!   `$stored`, deduplication by `"id"`) and the durable consumers (`durable::consumer`:
//!   deliveries, acks, work queues, dead letters; `durable::ledger`: what a consumer
//!   remembers, in the consumer log; docs/durability.md).
//! * [`client`]: a client library ([`client::Client`]) for sending and hearing events,
//!   confirming them, and consuming durable streams ([`client::Consumer`]).
//!
//! # Examples
//!
//! Run a hub on a free port, and stop it:
//!
//! ```
//! use hubcast::{Config, Hub, Server};
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let server = Server::bind("127.0.0.1:0", Hub::new(Config::default())).await?;
//! let addr = server.local_addr()?;
//! let shutdown = CancellationToken::new();
//! let running = tokio::spawn(server.run(shutdown.clone()));
//! // ... clients connect to `addr` ...
//! # let _ = addr;
//! shutdown.cancel();
//! running.await.unwrap();
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod admission;
pub mod auth;
pub mod client;
pub mod cluster;
mod config;
mod connection;
mod control;
mod durable;
mod error;
mod event;
pub mod frame;
pub mod http;
mod hub;
mod inbound;
mod ingest;
pub mod metrics;
mod outbox;
pub mod protocol;
pub mod routing;
mod server;
pub mod store;
pub mod tls;
mod transport;
mod ws;

pub use client::{Client, ClientEvent};
pub use config::{
    Config, ConfigBuilder, ConfigError, Delivery, Limits, Setting, SlowConsumerPolicy,
    StreamLimits, StreamSpec, Streams, Timeouts, DEAD_SUFFIX, DEFAULT_AUTH_TIMEOUT,
    DEFAULT_DEDUP_WINDOW, DEFAULT_DRAIN_TIMEOUT, DEFAULT_ERROR_WINDOW, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_ERRORS, DEFAULT_MAX_INBOUND_MEMORY, DEFAULT_MAX_PATTERN_BYTES,
    DEFAULT_MAX_PATTERN_SEGMENTS, DEFAULT_MAX_PENDING, DEFAULT_MAX_ROOMS,
    DEFAULT_MAX_SUBSCRIPTIONS, DEFAULT_WS_PING, MAX_DEDUP_IDS, MAX_DURATION, QUEUE_ENTRY_OVERHEAD,
};
pub use control::PROTOCOL_VERSION;
pub use error::IoError;
pub use event::{Event, EventName, RoomName, MAX_EVENT_ID, MAX_EVENT_NAME};
pub use frame::DEFAULT_MAX_FRAME;
pub use hub::{ClientId, CloseReason, ConnectionLimit, Hub, HubEvent, Observer, SendError, Stats};
pub use protocol::{ErrorCode, ProtocolError};
pub use server::{serve_connection, Server};

/// The README's examples, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
