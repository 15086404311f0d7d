//! What the client subcommands share: where the hub is, and connecting to it.

use hubcast::client::{Client, ClientBuilder, ClientError, ClientEvent, Reconnect};
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
    /// Several hubs (the nodes of a cluster): the first that answers is used, and
    /// the others when it is lost. Instead of --host and --port.
    #[arg(long, env = "HUBCAST_HUB", value_name = "HOST:PORT[,HOST:PORT...]", conflicts_with = "host", value_parser = parse_hubs)]
    hub: Option<String>,
    /// Give up when the connection is lost instead of reconnecting.
    #[arg(long)]
    no_reconnect: bool,
    /// The token (or JWT) to authenticate with, for a hub started with --auth or
    /// --jwt-key.
    #[arg(long, env = "HUBCAST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The user to authenticate as (optional: the token says who).
    #[arg(long, env = "HUBCAST_USER", requires = "token")]
    user: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS to the hub, as the client subcommands take it.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// Connect with TLS (trusting the system's roots, or --ca).
    #[arg(long)]
    pub tls: bool,
    /// Trust this CA (PEM) for the hub's certificate; implies --tls.
    #[arg(long, value_name = "PEM")]
    pub ca: Option<std::path::PathBuf>,
    /// Present this client certificate (PEM) for mutual TLS; needs --key; implies --tls.
    #[arg(long, value_name = "PEM", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// The client config, when TLS is asked for.
    pub fn config(&self) -> anyhow::Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        if !self.tls && self.ca.is_none() && self.cert.is_none() {
            return Ok(None);
        }
        let identity = self.cert.as_deref().zip(self.key.as_deref());
        hubcast::tls::client_config(self.ca.as_deref(), identity)
            .map(Some)
            .map_err(|e| crate::UsageError(e).into())
    }
}

/// `--hub`: a comma-separated list of HOST:PORT.
fn parse_hubs(text: &str) -> Result<String, String> {
    let hubs: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    if hubs.is_empty() {
        return Err("no hub given (expected HOST:PORT[,HOST:PORT...])".into());
    }
    for hub in &hubs {
        let port = hub.rsplit_once(':').map(|(_, port)| port);
        if port.is_none_or(|p| p.parse::<u16>().is_err()) {
            return Err(format!("{hub:?} is not HOST:PORT"));
        }
    }
    Ok(hubs.join(","))
}

impl HubAddr {
    /// `host:port`, with IPv6 addresses in brackets (or the `--hub` list).
    pub fn addr(&self) -> String {
        if let Some(hubs) = &self.hub {
            return hubs.clone();
        }
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        if host.contains(':') {
            format!("[{host}]:{}", self.port)
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// A builder that logs connection changes to stderr and reconnects (unless told
    /// not to), with TLS and credentials if asked for.
    pub fn builder(&self) -> anyhow::Result<ClientBuilder> {
        let mut builder = Client::builder().on_any(log_lifecycle);
        if let Some(config) = self.tls.config()? {
            builder = builder.tls(config);
        }
        if let Some(token) = &self.token {
            builder = builder.credentials(self.user.as_deref(), token);
        }
        Ok(if self.no_reconnect {
            builder
        } else {
            builder.reconnect(Reconnect::default())
        })
    }

    /// Connects `builder` to the hub, with an error that says what to check.
    pub async fn connect(&self, builder: ClientBuilder) -> anyhow::Result<Client> {
        let addr = self.addr();
        builder.connect(&addr).await.map_err(|e| match e {
            // A name that does not resolve, a certificate problem: no hub question to ask.
            ClientError::Resolve { .. } | ClientError::Tls { .. } => anyhow::Error::new(e),
            _ => anyhow::Error::new(e).context(format!("is `hubcast serve` running at {addr}?")),
        })
    }
}

/// Whether the connection was lost since the last connect: the next one is a
/// reconnection, and says so.
static LOST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn log_lifecycle(event: &ClientEvent) {
    use std::sync::atomic::Ordering;
    match event {
        ClientEvent::Connect { addr } if LOST.swap(false, Ordering::Relaxed) => {
            info!(%addr, "reconnected to the hub")
        }
        ClientEvent::Connect { addr } => debug!(%addr, "connected to the hub"),
        ClientEvent::Close { had_error } => {
            LOST.store(true, Ordering::Relaxed);
            if *had_error {
                warn!("connection to the hub lost");
            } else {
                debug!("connection to the hub closed");
            }
        }
        ClientEvent::Reconnecting { attempt, delay } => {
            info!(attempt, "reconnecting in {delay:?}")
        }
        // With its causes: "the connection to the hub was lost: Connection reset ...".
        ClientEvent::Error(error) => warn!("{:#}", anyhow::Error::new(error.clone())),
        ClientEvent::HubError(error) => {
            warn!(code = %error.code, "the hub says: {}", error.message)
        }
        // A cluster node cut off from (or back with) the others.
        ClientEvent::Control(event) if event.name().as_str() == "$gap" => {
            let payload: serde_json::Value =
                serde_json::from_str(event.payload()).unwrap_or_default();
            if let Some(since) = payload["since"].as_str() {
                warn!(%since, "the hub lost the other nodes of its cluster: their events may be missing until it is back");
            } else if let Some(until) = payload["until"].as_str() {
                info!(%until, "the hub has the other nodes of its cluster again (their events from the gap may be missing)");
            }
        }
        _ => {}
    }
}
