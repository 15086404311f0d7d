//! What the client subcommands share: where the hub is, and connecting to it.

use anyhow::Context;
use hubcast::client::{Client, ClientBuilder, ClientEvent, Reconnect};
use tracing::{debug, info, warn};

/// Where the hub is.
#[derive(clap::Args, Debug)]
pub struct HubAddr {
    /// The hub's host name or address.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The hub's port.
    #[arg(short, long, env = "PORT", default_value_t = 3000)]
    port: u16,
    /// Give up when the connection is lost instead of reconnecting.
    #[arg(long)]
    no_reconnect: bool,
}

impl HubAddr {
    /// `host:port`, with IPv6 addresses in brackets.
    pub fn addr(&self) -> String {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        if host.contains(':') {
            format!("[{host}]:{}", self.port)
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// A builder that logs connection changes to stderr and reconnects (unless told not to).
    pub fn builder(&self) -> ClientBuilder {
        let builder = Client::builder().on_any(log_lifecycle);
        if self.no_reconnect {
            builder
        } else {
            builder.reconnect(Reconnect::default())
        }
    }

    /// Connects `builder` to the hub, with an error that says what to check.
    pub async fn connect(&self, builder: ClientBuilder) -> anyhow::Result<Client> {
        let addr = self.addr();
        builder
            .connect(&addr)
            .await
            .with_context(|| format!("is `hubcast serve` running at {addr}?"))
    }
}

fn log_lifecycle(event: &ClientEvent) {
    match event {
        ClientEvent::Connect { addr } => debug!(%addr, "connected to the hub"),
        ClientEvent::Close { had_error: false } => debug!("connection to the hub closed"),
        ClientEvent::Close { had_error: true } => warn!("connection to the hub lost"),
        ClientEvent::Reconnecting { attempt, delay } => {
            info!(attempt, "reconnecting in {delay:?}")
        }
        ClientEvent::Error(error) => warn!("{error}"),
        ClientEvent::HubError(error) => {
            warn!(code = %error.code, "the hub says: {}", error.message)
        }
        _ => {}
    }
}
