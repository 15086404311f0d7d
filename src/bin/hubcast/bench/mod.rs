//! `hubcast bench`: fan-out throughput and latency against a hub (over TCP, TLS or
//! WebSocket), nats-server, Redis or Socket.IO.
//!
//! N subscribers and P publishers connect; the publishers send K messages of S bytes
//! (as fast as the window allows, or at `--rate`); every subscriber checks it got every
//! message of every publisher, in order, and records each one's latency. At most
//! `--window` messages are in flight to any subscriber (each publisher stays its share
//! ahead of the slowest one), so no target is pushed into dropping messages and every
//! run measures sustained, loss-free delivery.

mod connects;
mod durable;
mod records;
mod report;
mod run;
mod tally;
mod wire;

use std::process::ExitCode;
use std::time::Duration;

use crate::args::{parse_positive, parse_positive_duration, parse_size};
use wire::Target;

pub use run::run;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The server: hubcast://HOST:PORT, nats://HOST:PORT, redis://HOST:PORT,
    /// ws://HOST:PORT/ws (a hub's WebSocket gateway), socketio://HOST:PORT (a Socket.IO
    /// 4 server relaying "bench" events with socket.broadcast.emit), or a bare HOST:PORT
    /// (a hub). Several, comma-separated or repeated (the nodes of a cluster, all of one
    /// kind): subscribers are spread over them in turn, publishers connect to the
    /// first, and the run begins once every subscriber hears the first.
    #[arg(
        long,
        short,
        default_value = "hubcast://127.0.0.1:3000",
        value_delimiter = ',',
        conflicts_with = "embedded"
    )]
    target: Vec<Target>,
    /// Start a hub inside the bench (on 127.0.0.1, a free port) and measure that.
    #[arg(long)]
    embedded: bool,
    /// Subscribers: connections that receive every message.
    #[arg(long, short = 'n', default_value = "10", value_parser = parse_positive)]
    subs: usize,
    /// The target's port (overrides the one in --target; -p means port everywhere).
    #[arg(long, short = 'p', conflicts_with = "embedded")]
    port: Option<u16>,
    /// Publishers: connections that send the messages, each its share.
    #[arg(long, short = 'P', default_value = "1", value_parser = parse_positive)]
    pubs: usize,
    /// Messages to publish in all (split evenly between publishers).
    #[arg(long, short = 'k', default_value = "100000", value_parser = parse_positive)]
    events: usize,
    /// Size of each message's body in bytes (a JSON event, at least 83 B): 128, 4KiB.
    #[arg(long, short, default_value = "128", value_parser = parse_size)]
    size: usize,
    /// Publish at this many messages per second in all (default: as fast as the window
    /// allows). Latency is meaningful at a rate the server sustains.
    #[arg(long, value_parser = parse_positive)]
    rate: Option<usize>,
    /// Most messages in flight to any subscriber (published, not yet received), shared
    /// evenly between publishers: each may be WINDOW/PUBS ahead of the slowest
    /// subscriber.
    #[arg(long, default_value = "1000", value_parser = parse_positive)]
    window: usize,
    /// Stop and report when no message has arrived for this long.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    stall_timeout: Duration,
    /// Print the result as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Measure durable streams instead of fan-out: `publish` (confirmed publishes,
    /// --pubs connections) or `consume` (a consumer of --subs members acking what it
    /// gets, after filling the stream). A hub must declare `--stream bench=bench`;
    /// JetStream (nats-server -js) and Redis (with AOF) are set up by the bench.
    #[arg(long, value_name = "MODE", conflicts_with = "embedded")]
    durable: Option<durable::Mode>,
    /// With --durable against nats:// (a NATS cluster): replicas of the JetStream
    /// stream the bench makes, 1 to 5 (a hub's are set by its own `--replicas`).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), requires = "durable")]
    replicas: u8,
    /// With --durable publish against nats://: each publish carries a
    /// `Nats-Msg-Id` header (HPUB), so JetStream deduplicates as a hub does by id.
    #[arg(long, requires = "durable")]
    msg_id: bool,
    /// Connect with TLS (as `hubcasts://`; for nats:// the server needs
    /// `handshake_first`), trusting the system's roots or --ca.
    #[arg(long)]
    tls: bool,
    /// Trust this CA (PEM) for the target's certificate; implies --tls.
    #[arg(long, value_name = "PEM")]
    ca: Option<std::path::PathBuf>,
    /// Present this client certificate (PEM) for mutual TLS; needs --key; implies --tls.
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Authenticate every connection with this token (hubcast: `$hello {token}`, an
    /// auth-file token or a JWT; NATS: `auth_token` in CONNECT).
    #[arg(long, env = "HUBCAST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Measure connection setup instead of fan-out: open this many connections (TCP,
    /// TLS if asked, and authentication), 32 at a time, each closed once the server
    /// has accepted it; report connects/s and their latency.
    #[arg(long, value_name = "N", value_parser = parse_positive, conflicts_with_all = ["durable", "embedded"])]
    connects: Option<usize>,
}

fn usage(message: &str) -> anyhow::Result<ExitCode> {
    report!("hubcast: error: {message}");
    Ok(ExitCode::from(2))
}
