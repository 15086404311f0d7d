//! `hubcast serve`: run the hub, log what happens, stop gracefully on SIGINT/SIGTERM.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hubcast::{Config, Hub, HubEvent, Server, SlowConsumerPolicy};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::args::{parse_duration, parse_positive, parse_positive_duration, parse_size};

#[derive(clap::Args)]
#[command(args_override_self = true)]
pub struct Args {
    /// Read settings from this TOML file (deploy/hubcast.toml shows every key); flags
    /// and HUBCAST_* variables override it. `hubcast config check FILE` checks one.
    #[arg(long, env = "HUBCAST_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// Port to listen on.
    #[arg(short, long, env = "PORT", default_value_t = 3000)]
    port: u16,
    /// Address to listen on: 127.0.0.1 serves this machine only; 0.0.0.0 (or ::)
    /// serves other machines too.
    #[arg(long, env = "HUBCAST_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Largest frame a client may send (e.g. 65536, 64KiB, 1MiB).
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    max_frame: usize,
    /// Most bytes queued for one client before it is disconnected as a slow consumer.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    max_pending: usize,
    /// Do not send events back to the client that sent them.
    #[arg(long)]
    no_echo: bool,
    /// How long shutdown may spend flushing queued events to clients.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Most subscription patterns one connection may hold.
    #[arg(long, default_value_t = hubcast::DEFAULT_MAX_SUBSCRIPTIONS)]
    max_subscriptions: usize,
    /// Most segments in one subscription pattern (`a.*.c` has 3).
    #[arg(long, default_value_t = hubcast::DEFAULT_MAX_PATTERN_SEGMENTS, value_parser = parse_positive)]
    max_pattern_segments: usize,
    /// Most bytes of pattern text one connection may hold in all (e.g. 64KiB).
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    max_pattern_bytes: usize,
    /// Most rooms one connection may be in.
    #[arg(long, default_value_t = hubcast::DEFAULT_MAX_ROOMS)]
    max_rooms: usize,
    /// Close connections that send nothing for this long (e.g. 5m); off by default.
    #[arg(long, value_parser = parse_positive_duration)]
    idle_timeout: Option<Duration>,
    /// Most clients connected at once; more are told `too_many_connections` and closed.
    #[arg(long, env = "HUBCAST_MAX_CONNS", default_value_t = hubcast::DEFAULT_MAX_CONNECTIONS, value_parser = parse_positive)]
    max_conns: usize,
    /// What to do with a client that reads too slowly: disconnect it, or drop what
    /// does not fit in its queue (and tell it how many were dropped).
    #[arg(long, value_enum, default_value = "disconnect")]
    slow_consumer: SlowConsumer,
    /// Most memory all connections' read buffers (frames in progress) may hold; past
    /// it, connections whose frames need more are not read until memory frees.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    max_inbound_memory: usize,
    /// A connection that sends more than this many bad frames within
    /// --error-window is closed (`too_many_errors`).
    #[arg(long, default_value_t = hubcast::DEFAULT_MAX_ERRORS)]
    max_errors: usize,
    /// The window for --max-errors (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    error_window: Duration,
    /// Store every event whose name matches PATTERN in stream NAME
    /// (NAME=PATTERN[,PATTERN...]; repeatable; the first declared match wins).
    #[arg(long = "stream", value_name = "NAME=PATTERNS", value_parser = parse_stream)]
    streams: Vec<hubcast::StreamSpec>,
    /// Where streams are kept.
    #[arg(long, env = "HUBCAST_DATA_DIR", default_value = "hubcast-data")]
    data_dir: std::path::PathBuf,
    /// When a stored event is confirmed: `always` once on disk (fsync), `never` once
    /// written to the OS (survives a crash of the hub, not of the machine).
    #[arg(long, env = "HUBCAST_FSYNC", value_enum, default_value = "always")]
    fsync: FsyncPolicy,
    /// A resent "id" within this window is neither stored nor broadcast again.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    dedup_window: Duration,
    /// Each stream keeps at most this many events: past it, its oldest segments are
    /// deleted (events not consumed by then are skipped).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    max_stream_events: u64,
    /// Each stream's files take at most this much disk (e.g. 1GiB, 500MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    max_stream_bytes: usize,
    /// Segments whose newest event is older than this are deleted (default: kept).
    #[arg(long, value_parser = parse_positive_duration)]
    max_stream_age: Option<Duration>,
    /// One stream's own limits, in place of --max-stream-events/-bytes/-age for it
    /// (and its dead-letter stream): NAME:max_events=N,max_bytes=SIZE,max_age=DURATION,
    /// any of the three (repeatable; e.g. orders:max_age=7d,max_bytes=10GiB).
    #[arg(long = "stream-limits", value_name = "NAME:LIMITS", value_parser = parse_stream_limits)]
    stream_limits: Vec<(String, hubcast::StreamLimits)>,
    /// Require authentication: users, token hashes and permissions in this TOML file
    /// (see docs/security.md). Reread on SIGHUP.
    #[arg(long, env = "HUBCAST_AUTH", value_name = "FILE")]
    auth: Option<std::path::PathBuf>,
    /// Accept JWTs verified with this key: an HS256 secret (the file's contents) or an
    /// RS256/ES256/EdDSA public key PEM. Reread on SIGHUP.
    #[arg(long, env = "HUBCAST_JWT_KEY", value_name = "FILE")]
    jwt_key: Option<std::path::PathBuf>,
    /// How long a new connection has to authenticate (with --auth or --jwt-key).
    #[arg(long, default_value = "2s", value_parser = parse_positive_duration)]
    auth_timeout: Duration,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key. Reread on SIGHUP.
    #[arg(
        long,
        env = "HUBCAST_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// The TLS private key (PEM).
    #[arg(
        long,
        env = "HUBCAST_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// Mutual TLS: require client certificates signed by this CA (PEM); a
    /// certificate's subject CN (or first SAN) names the client's identity.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Allow listening beyond this machine without --auth or --jwt-key: anyone who
    /// can reach the port reads and sends every event.
    #[arg(long)]
    insecure: bool,
    /// Most events per second one connection may send; past it the hub stops reading
    /// it for a moment (back-pressure: nothing is dropped).
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    max_rate: Option<u32>,
    /// Most bytes per second one connection may send (e.g. 1MiB), as --max-rate.
    #[arg(long, value_name = "SIZE/s", value_parser = parse_byte_rate)]
    max_bytes_rate: Option<u64>,
    /// Most connections from one IP address at once.
    #[arg(long, value_parser = parse_positive)]
    max_conns_per_ip: Option<usize>,
    /// Most connection attempts per second from one IP address.
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    accept_rate: Option<u32>,
    /// Also serve HTTP on this address (e.g. 127.0.0.1:8080): the WebSocket gateway
    /// at /ws, the dashboard at /, Prometheus metrics at /metrics, and /healthz and
    /// /readyz. Off by default.
    #[arg(long, env = "HUBCAST_HTTP", value_name = "ADDR")]
    http: Option<String>,
    /// How often WebSocket clients are pinged (two unanswered intervals close them);
    /// `off` never pings.
    #[arg(long, default_value = "25s", value_parser = parse_ws_ping)]
    ws_ping: WsPing,
    /// Join a cluster: exchange events with the other hubs through these NATS
    /// servers (comma-separated or repeated; the rest of the NATS cluster is found
    /// from them). Off by default: a single hub.
    #[arg(long, env = "HUBCAST_CLUSTER", value_name = "nats://HOST:PORT", value_delimiter = ',', value_parser = parse_nats_url)]
    cluster: Vec<hubcast::cluster::nats::ServerUrl>,
    /// This node's name in a cluster (logs, /readyz, /metrics); default: the host name.
    #[arg(long, env = "HUBCAST_NODE", value_name = "NAME", requires = "cluster")]
    node: Option<String>,
    /// Trust this CA (PEM) for the NATS servers' certificates (tls:// URLs, and servers
    /// that require TLS); default: the system's roots.
    #[arg(long, value_name = "PEM", requires = "cluster")]
    cluster_ca: Option<std::path::PathBuf>,
    /// Present this certificate (PEM) to the NATS servers (mutual TLS); needs
    /// --cluster-key.
    #[arg(long, value_name = "PEM", requires_all = ["cluster", "cluster_key"])]
    cluster_cert: Option<std::path::PathBuf>,
    /// The key of --cluster-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "cluster_cert")]
    cluster_key: Option<std::path::PathBuf>,
    /// In a cluster, how many NATS servers keep each stream (JetStream replicas,
    /// 1 to 5; acknowledged once a majority has it).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), requires = "cluster")]
    replicas: u8,
    /// Do not log each event (connections, errors and closes are still logged).
    #[arg(short, long)]
    quiet: bool,
}

pub(crate) fn parse_nats_url(text: &str) -> Result<hubcast::cluster::nats::ServerUrl, String> {
    text.trim().parse()
}

/// The machine's host name, the default `--node`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "hubcast".to_string())
}

/// `--ws-ping`: an interval, or `off`.
#[derive(Clone, Copy)]
struct WsPing(Option<Duration>);

fn parse_ws_ping(text: &str) -> Result<WsPing, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(WsPing(None));
    }
    parse_positive_duration(text).map(|d| WsPing(Some(d)))
}

/// `100`, `100/s`: a positive rate per second.
fn parse_rate(text: &str) -> Result<u32, String> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<u32>() {
        Ok(0) => Err("must be at least 1 per second".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a rate (examples: 1000, 1000/s)")),
    }
}

/// `1MiB`, `1MiB/s`: a positive byte rate per second.
fn parse_byte_rate(text: &str) -> Result<u64, String> {
    parse_size(text.trim().trim_end_matches("/s")).map(|n| n as u64)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FsyncPolicy {
    Always,
    Never,
}

fn parse_stream(text: &str) -> Result<hubcast::StreamSpec, String> {
    hubcast::StreamSpec::parse(text)
}

/// `NAME:max_events=N,max_bytes=SIZE,max_age=DURATION` (any of the three, each once).
fn parse_stream_limits(text: &str) -> Result<(String, hubcast::StreamLimits), String> {
    const SHAPE: &str =
        "expected NAME:max_events=N,max_bytes=SIZE,max_age=DURATION (any of the three)";
    let (name, list) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?}: {SHAPE}"))?;
    let name = name.trim();
    if name.is_empty() || list.trim().is_empty() {
        return Err(format!("{text:?}: {SHAPE}"));
    }
    let mut limits = hubcast::StreamLimits::new();
    for item in list.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?}: {SHAPE}"))?;
        let (key, value) = (key.trim(), value.trim());
        let named = |e: String| format!("{key}: {e}");
        let earlier = match key {
            "max_events" => limits
                .max_events
                .replace(parse_positive(value).map_err(named)? as u64)
                .is_some(),
            "max_bytes" => limits
                .max_bytes
                .replace(parse_size(value).map_err(named)? as u64)
                .is_some(),
            "max_age" => limits
                .max_age
                .replace(parse_positive_duration(value).map_err(named)?)
                .is_some(),
            other => {
                return Err(format!(
                    "unknown limit {other:?} (known: max_events, max_bytes, max_age)"
                ))
            }
        };
        if earlier {
            return Err(format!("{key} is given twice for stream {name:?}"));
        }
    }
    Ok((name.to_string(), limits))
}

/// The declared streams with the limits `--stream-limits` gives them.
fn streams_with_limits(args: &Args) -> Result<Vec<hubcast::StreamSpec>, crate::UsageError> {
    let mut streams = args.streams.clone();
    for (name, limits) in &args.stream_limits {
        let Some(spec) = streams.iter_mut().find(|spec| &spec.name == name) else {
            return Err(crate::UsageError(format!(
                "--stream-limits: no stream {name:?} is declared (declare it with --stream {name}=PATTERN)"
            )));
        };
        if spec.limits != hubcast::StreamLimits::default() {
            return Err(crate::UsageError(format!(
                "--stream-limits: stream {name:?} is given limits twice (put them in one: {name}:max_events=N,max_age=D)"
            )));
        }
        spec.limits = limits.clone();
    }
    Ok(streams)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SlowConsumer {
    Disconnect,
    Drop,
}

/// Descriptors kept aside for the listener, logs and the rest of the process.
const SPARE_FILES: u64 = 64;

/// Raises the soft open-files limit to what `connections` (of a kind: `what`) need, up
/// to the hard limit, and says so when the hard limit is too low.
pub fn raise_open_files_limit(connections: usize, what: &str) {
    let wanted = connections as u64 + SPARE_FILES;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(got) if got < wanted => warn!(
            "the open-files limit is {got}: at most about {} {what} can connect, not {connections}; raise the hard limit (ulimit -Hn)",
            got.saturating_sub(SPARE_FILES)
        ),
        Ok(got) => tracing::debug!(limit = got, "open-files limit"),
        Err(e) => warn!("cannot read or raise the open-files limit: {e}"),
    }
}

/// What `serve` needs before it listens, checked: the hub's settings, and the auth and
/// TLS settings the flags name (loaded, so a bad file is found now).
pub struct Prepared {
    config: Config,
    auth: Option<hubcast::auth::Authenticator>,
    tls: Option<hubcast::tls::ServerTls>,
}

/// Builds and checks everything the flags (or a config file) ask for, without
/// listening: `serve` and `hubcast config check` alike.
pub fn prepare(args: &Args) -> anyhow::Result<Prepared> {
    let config = Config::builder()
        .max_frame(args.max_frame)
        .max_pending(args.max_pending)
        .max_inbound_memory(args.max_inbound_memory)
        .max_connections(args.max_conns)
        .max_subscriptions(args.max_subscriptions)
        .max_pattern_segments(args.max_pattern_segments)
        .max_pattern_bytes(args.max_pattern_bytes)
        .max_rooms(args.max_rooms)
        .max_errors(args.max_errors)
        .error_window(args.error_window)
        .echo(!args.no_echo)
        .slow_consumer(match args.slow_consumer {
            SlowConsumer::Disconnect => SlowConsumerPolicy::Disconnect,
            SlowConsumer::Drop => SlowConsumerPolicy::Drop,
        })
        .idle_timeout(args.idle_timeout)
        .drain_timeout(args.drain_timeout)
        .streams(streams_with_limits(args)?)
        .data_dir(args.data_dir.clone())
        .fsync(match args.fsync {
            FsyncPolicy::Always => hubcast::store::Fsync::Always,
            FsyncPolicy::Never => hubcast::store::Fsync::Never,
        })
        .dedup_window(args.dedup_window)
        .auth_timeout(args.auth_timeout)
        .ws_ping(args.ws_ping.0)
        .max_rate(args.max_rate)
        .max_bytes_rate(args.max_bytes_rate)
        .max_conns_per_ip(args.max_conns_per_ip)
        .accept_rate(args.accept_rate)
        .retention(hubcast::store::Retention {
            max_events: args.max_stream_events,
            max_bytes: args.max_stream_bytes as u64,
            max_age: args.max_stream_age,
        })
        .build()
        // Flags that cannot work together: one line naming the flag, exit 2.
        .map_err(|e| crate::UsageError(e.describe(hubcast::Setting::flag)))?;
    let auth = if args.auth.is_some() || args.jwt_key.is_some() {
        let auth =
            hubcast::auth::Authenticator::load(args.auth.as_deref(), args.jwt_key.as_deref())
                .map_err(|e| crate::UsageError(format!("--auth/--jwt-key: {e}")))?;
        Some(auth)
    } else {
        None
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            hubcast::tls::ServerTls::new(hubcast::tls::TlsSettings {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            })
            .map_err(crate::UsageError)?,
        ),
        _ => None,
    };
    Ok(Prepared { config, auth, tls })
}

/// The TLS settings for the NATS servers, when given: a tls:// server or one that
/// requires TLS is otherwise checked against the system's roots.
fn cluster_tls(args: &Args) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    if args.cluster_ca.is_none() && args.cluster_cert.is_none() {
        return Ok(None);
    }
    let identity = args
        .cluster_cert
        .as_deref()
        .zip(args.cluster_key.as_deref());
    let config = hubcast::tls::client_config(args.cluster_ca.as_deref(), identity)
        .map_err(|e| crate::UsageError(format!("--cluster-ca/--cluster-cert: {e}")))?;
    Ok(Some(config))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Prepared {
        mut config,
        auth,
        tls,
    } = prepare(&args)?;
    let node = args.node.clone().unwrap_or_else(host_name);
    if !args.cluster.is_empty() && !args.streams.is_empty() {
        // A cluster node's streams live in JetStream, made or checked before any
        // client is taken.
        let options = hubcast::cluster::jetstream::JetStreamOptions {
            urls: args.cluster.clone(),
            node: node.clone(),
            tls: cluster_tls(&args)?,
            replicas: usize::from(args.replicas),
        };
        let engine = hubcast::cluster::jetstream::JetStream::connect(options, &config.streams)
            .await
            .map_err(|e| anyhow::anyhow!("--stream with --cluster: {e}"))?;
        config.streams.jetstream = Some(engine);
    }
    raise_open_files_limit(config.limits.max_connections, "clients");
    crate::memory::small_pages_only();
    let quiet = args.quiet;
    // What each stream keeps, said as it is opened.
    let kept: Vec<String> = config
        .streams
        .declared
        .iter()
        .map(|spec| config.streams.retention_of(&spec.name).to_string())
        .collect();
    let mut signals = Signals::install()?;
    let events = (!quiet).then(EventLog::start);
    let refusals = RefusalLog::default();
    let hub = Hub::try_with_observer(config, move |event| match (event, &events) {
        // Per-event lines are formatted by a task of their own, never on the
        // connection that routes the event (issue #11).
        (HubEvent::Event { .. }, Some(events)) => events.queue(event),
        (HubEvent::Refused { .. }, _) => refusals.refused(event, quiet),
        _ => log(event, quiet),
    })
    // Valid settings, but the store cannot be opened there (permissions, a file in
    // the way): an environment problem, exit 1.
    .map_err(|e| anyhow::anyhow!(e.describe(hubcast::Setting::flag)))?;
    for (spec, kept) in args.streams.iter().zip(&kept) {
        if args.cluster.is_empty() {
            info!(
                stream = %spec.name,
                patterns = %spec.patterns.join(","),
                data_dir = %args.data_dir.display(),
                keeps = ?kept,
                "storing matching events"
            );
        } else {
            info!(
                stream = %spec.name,
                patterns = %spec.patterns.join(","),
                replicas = args.replicas,
                keeps = ?kept,
                "storing matching events in JetStream"
            );
        }
    }
    let host = args.host.trim_start_matches('[').trim_end_matches(']');
    // Protected mode, as Redis's: beyond this machine only with authentication,
    // checked before anything listens.
    if auth.is_none() && !args.insecure {
        let mut beyond = tokio::net::lookup_host((host, args.port))
            .await
            .with_context(|| format!("cannot resolve --host {}", args.host))?
            .find(|a| !a.ip().is_loopback());
        if let (None, Some(http)) = (beyond, &args.http) {
            beyond = tokio::net::lookup_host(http.as_str())
                .await
                .map_err(|e| crate::UsageError(format!("--http {http}: {e}")))?
                .find(|a| !a.ip().is_loopback());
        }
        if let Some(addr) = beyond {
            return Err(crate::UsageError(format!(
                "refusing to listen on {addr} without authentication (protected mode): add --auth FILE or --jwt-key FILE, or --insecure to let anyone who reaches the port read and send every event"
            ))
            .into());
        }
    }
    let mut server = Server::bind((host, args.port), hub.clone())
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    if let Some(tls) = &tls {
        server = server.with_tls(tls.clone());
        info!(
            client_certificates = args.tls_client_ca.is_some(),
            "serving TLS"
        );
    }
    let addr = server.local_addr()?;
    let mut http_addr = None;
    if let Some(http) = &args.http {
        let gateway = hubcast::http::Gateway::bind(http.as_str())
            .await
            .with_context(|| format!("cannot listen on --http {http}"))?;
        http_addr = Some(gateway.local_addr()?);
        server = server.with_http(gateway);
    }
    if !addr.ip().is_loopback() && auth.is_none() {
        warn!("listening on {addr} with --insecure: anyone who can reach this port can read and send every event");
    }
    if let Some(auth) = auth {
        info!(users = auth.users(), "authentication required");
        hub.set_authenticator(auth);
    }
    let shutdown = CancellationToken::new();
    if !args.cluster.is_empty() {
        let tls = cluster_tls(&args)?;
        let backplane = hubcast::cluster::nats::NatsBackplane::connect(
            hub.clone(),
            args.cluster.clone(),
            &node,
            tls,
            shutdown.clone(),
        )
        .await?;
        hub.set_backplane(backplane);
    }
    // Not `println!`: a closed stdout must not take the hub down.
    let _ = writeln!(std::io::stdout(), "Server up on {addr}");
    if let Some(http) = http_addr {
        let _ = writeln!(
            std::io::stdout(),
            "HTTP up on http://{http} (dashboard /, WebSocket /ws, metrics /metrics)"
        );
    }
    // Under systemd (Type=notify): ready now that every listener is bound. Without
    // NOTIFY_SOCKET this does nothing.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    if let Some(hangup) = signals.hangup.take() {
        tokio::spawn(reload_on_hangup(hangup, hub.clone(), tls));
    }
    tokio::spawn(signals.watch(shutdown.clone()));
    tokio::spawn(crate::memory::collect_when_idle(hub.watch_clients()));
    // STOPPING=1 is sent by the signal watcher, before the shutdown begins.
    server.run(shutdown.clone()).await;
    // Every connection is closed: what was appended is committed before exit.
    hub.close_store();
    let stats = hub.stats();
    info!(
        events = stats.events,
        deliveries = stats.deliveries,
        rejected = stats.rejected,
        slow_consumers = stats.slow_consumers,
        dropped = stats.dropped,
        refused = stats.refused,
        refused_per_ip = stats.refused_per_ip,
        refused_accept_rate = stats.refused_accept_rate,
        throttled = stats.throttled,
        auth_failed = stats.auth_failed,
        permission_denied = stats.permission_denied,
        "totals"
    );
    Ok(ExitCode::SUCCESS)
}

/// SIGINT and SIGTERM, installed before the hub says it is up, so that a signal sent
/// right after "Server up" is never met by the default action.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    /// SIGHUP: reread the auth file, JWT key and certificates (taken by its task).
    hangup: Option<Signal>,
}

/// On each SIGHUP, rereads what can be reloaded without dropping connections: the TLS
/// certificate and key, the auth file and JWT key (clients no longer allowed are closed, changed permissions
/// apply at once). A file that does not load is logged and the old settings kept.
async fn reload_on_hangup(mut hangup: Signal, hub: Hub, tls: Option<hubcast::tls::ServerTls>) {
    while hangup.recv().await.is_some() {
        if let Some(tls) = &tls {
            match tls.reload() {
                Ok(()) => info!("SIGHUP: TLS certificate reloaded (open connections keep theirs)"),
                Err(e) => error!("SIGHUP: TLS certificate not reloaded, the old one stays: {e}"),
            }
        }
        let Some(current) = hub.authenticator() else {
            if tls.is_none() {
                info!("SIGHUP: nothing to reload (no --auth, --jwt-key or --tls-cert)");
            }
            continue;
        };
        match current.reload() {
            Ok(fresh) => {
                let users = fresh.users();
                let closed = hub.set_authenticator(fresh);
                info!(users, closed, "SIGHUP: auth settings reloaded");
            }
            Err(e) => error!("SIGHUP: auth settings not reloaded, the old ones stay: {e}"),
        }
    }
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        // A file-size limit (`ulimit -f`) reached while storing would otherwise kill
        // the hub (SIGXFSZ's default); caught, the write fails with EFBIG instead, and
        // the publisher is told `storage` while live traffic goes on.
        let file_size =
            signal(SignalKind::from_raw(libc::SIGXFSZ)).context("installing a SIGXFSZ handler")?;
        drop(file_size); // The handler stays installed; nothing waits for it.
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            hangup: Some(signal(SignalKind::hangup()).context("installing a SIGHUP handler")?),
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }

    /// Cancels `shutdown` on the first signal; a second one exits at once.
    async fn watch(mut self, shutdown: CancellationToken) {
        self.recv().await;
        // Under systemd (Type=notify): stopping, said before anything of the shutdown
        // happens (nothing can end the process between the signal and this line).
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        info!("shutting down: no new connections, flushing queued events (again to force)");
        shutdown.cancel();
        self.recv().await;
        warn!("second signal: exiting without waiting");
        std::process::exit(130);
    }
}

/// Per-event log lines, formatted off the hot path: the observer queues each event
/// (a reference-counted clone, no copy) and a task formats and logs it. The queue is
/// bounded in bytes: past it, lines are skipped and counted, and the count is logged.
struct EventLog {
    queue: tokio::sync::mpsc::Sender<HubEvent>,
    /// Bytes of events queued and not logged yet.
    queued: Arc<AtomicUsize>,
    skipped: Arc<AtomicU64>,
    /// Lines per second: what logging may cost is bounded, whatever the load.
    rate: RateLimit,
}

fn report_skipped(skipped: &AtomicU64) {
    let skipped = skipped.swap(0, Ordering::Relaxed);
    if skipped > 0 {
        info!(
            skipped,
            "event lines not logged: more than {EVENT_LOG_RATE} events a second (the hub delivered them all)"
        );
    }
}

/// At most `per_second` takes per wall-clock second (a fixed window: cheap, and
/// exact enough for a log).
struct RateLimit {
    per_second: u64,
    /// The current second (since the Unix epoch) and takes in it, packed: the high
    /// 40 bits hold the second, the low 24 the count.
    window: AtomicU64,
}

impl RateLimit {
    fn new(per_second: u64) -> Self {
        RateLimit {
            per_second,
            window: AtomicU64::new(0),
        }
    }

    fn take(&self) -> bool {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            & ((1 << 40) - 1);
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (at, count) = (current >> 24, current & ((1 << 24) - 1));
            let next = if at == second {
                if count >= self.per_second {
                    return false;
                }
                current + 1
            } else {
                (second << 24) | 1
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }
}

/// Most bytes of events waiting to be logged.
const EVENT_LOG_BYTES: usize = 8 << 20;
/// Most events waiting to be logged.
const EVENT_LOG_LINES: usize = 8192;
/// Most event lines logged per second; the rest are counted, and the count logged.
const EVENT_LOG_RATE: u64 = 2000;

impl EventLog {
    fn start() -> EventLog {
        let (queue, mut events) = tokio::sync::mpsc::channel::<HubEvent>(EVENT_LOG_LINES);
        let queued = Arc::new(AtomicUsize::new(0));
        let skipped = Arc::new(AtomicU64::new(0));
        let (done, missed) = (Arc::clone(&queued), Arc::clone(&skipped));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    _ = tick.tick() => {
                        report_skipped(&missed);
                        continue;
                    }
                };
                let Some(event) = event else { break };
                report_skipped(&missed);
                log(&event, false);
                if let HubEvent::Event { event, .. } = &event {
                    done.fetch_sub(event.line().len(), Ordering::Relaxed);
                }
            }
        });
        EventLog {
            queue,
            queued,
            skipped,
            rate: RateLimit::new(EVENT_LOG_RATE),
        }
    }

    /// Queues an event's line for the logger, or counts it as skipped.
    fn queue(&self, event: &HubEvent) {
        let HubEvent::Event { event: e, .. } = event else {
            return;
        };
        if !self.rate.take() {
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let len = e.line().len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > EVENT_LOG_BYTES {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.skipped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self.queue.try_send(event.clone()).is_err() {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Refused connections logged one by one within a second; past that, they are
/// counted, and the count is logged when the second is over.
const REFUSALS_LOGGED_PER_SECOND: u64 = 10;

/// Keeps a flood of refused connections (thousands of attempts a second from
/// addresses over `--accept-rate`) from flooding the log: the first
/// [`REFUSALS_LOGGED_PER_SECOND`] of each second are logged one by one, the rest as
/// one line with their count. The stats count every refusal either way.
#[derive(Clone, Default)]
struct RefusalLog(Arc<std::sync::Mutex<RefusalWindow>>);

#[derive(Default)]
struct RefusalWindow {
    /// When the current second began.
    started: Option<std::time::Instant>,
    /// Refusals logged one by one in it.
    logged: u64,
    /// Refusals not logged yet (their count is logged when the second is over).
    unlogged: u64,
}

impl RefusalLog {
    fn refused(&self, event: &HubEvent, quiet: bool) {
        let now = std::time::Instant::now();
        let mut window = self.lock();
        let started = match window.started {
            Some(started) if now.duration_since(started) < Duration::from_secs(1) => started,
            _ => {
                // A new second: what the last one left unlogged is counted now (its
                // timer, if it wakes later, finds nothing left).
                let unlogged = std::mem::take(&mut window.unlogged);
                window.started = Some(now);
                window.logged = 0;
                drop(window);
                Self::sum_up(unlogged);
                window = self.lock();
                now
            }
        };
        if window.logged < REFUSALS_LOGGED_PER_SECOND {
            window.logged += 1;
            drop(window);
            return log(event, quiet);
        }
        window.unlogged += 1;
        if window.unlogged == 1 {
            drop(window);
            let log = self.clone();
            let at = tokio::time::Instant::from_std(started + Duration::from_secs(1));
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        tokio::time::sleep_until(at).await;
                        let unlogged = std::mem::take(&mut log.lock().unlogged);
                        Self::sum_up(unlogged);
                    });
                }
                // Refusals are reported from the accept loops, inside the runtime;
                // outside it, the count is logged at once.
                Err(_) => Self::sum_up(std::mem::take(&mut log.lock().unlogged)),
            }
        }
    }

    fn sum_up(unlogged: u64) {
        if unlogged > 0 {
            warn!(
                count = unlogged,
                "refused {unlogged} more connections within the second, not logged one by one (at most {REFUSALS_LOGGED_PER_SECOND} a second are; the stats count every refusal)"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RefusalWindow> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Logs what the hub reports. Everything a client chose (names, rooms, payloads,
/// patterns quoted in messages) is escaped and bounded: a newline in an event name
/// must not forge a log line (issue #10). `--quiet` leaves out events and control
/// requests, which clients can send as fast as they like.
fn log(event: &HubEvent, quiet: bool) {
    use hubcast::protocol::printable;
    match event {
        HubEvent::Listening { addr } => info!(%addr, "listening"),
        HubEvent::Connection { client, peer } => info!(%client, %peer, "connection"),
        HubEvent::Event {
            client,
            event,
            receivers,
        } if !quiet => info!(
            target: "hubcast::event",
            %client,
            receivers,
            "EVENT {} {}{}",
            printable(event.name().as_str()),
            event
                .room()
                .map(|r| format!("room={} ", printable(r.as_str())))
                .unwrap_or_default(),
            summary(event.payload())
        ),
        HubEvent::Control { client, event } if !quiet => {
            info!(%client, "{} {}", event.name(), summary(event.payload()))
        }
        HubEvent::Rejected { client, error } => {
            warn!(%client, code = %error.code, "rejected frame: {}", printable(&error.message))
        }
        HubEvent::SlowConsumer { client } => warn!(%client, "slow consumer: disconnecting"),
        HubEvent::EventsDropped { client, count } => {
            warn!(%client, count, "slow consumer: events dropped")
        }
        HubEvent::Refused { peer, limit } => warn!(%peer, "refused: at {limit}"),
        HubEvent::Authenticated { client, peer, user } => {
            info!(%client, %peer, user = %printable(user), "authenticated")
        }
        HubEvent::AuthFailed {
            client,
            peer,
            reason,
        } => warn!(%client, %peer, "authentication failed: {}", printable(reason)),
        HubEvent::StoreRepaired { message } => warn!("store repaired on open: {message}"),
        HubEvent::StoreFailed { message } => {
            error!("storage failed (events are still delivered live): {message}")
        }
        HubEvent::InboundMemoryFull { limit } => warn!(
            limit,
            "inbound memory limit reached: connections whose frames in progress need more memory wait to be read"
        ),
        HubEvent::Close {
            client,
            had_error,
            reason,
        } => info!(%client, had_error, reason = %printable(&reason.to_string()), "close"),
        HubEvent::Error { message } => error!("{}", printable(message)),
        HubEvent::Shutdown => info!("stopped: all connections closed"),
        _ => {}
    }
}

/// Payloads larger than this are not parsed for a summary: the start is shown.
const SUMMARY_PARSE_LIMIT: usize = 4096;

/// One line about a payload: an order's store, orderID, customer and address (as the
/// lab's hub prints them), or else the start of its JSON. Never parses a big payload
/// (issue #11: parsing 1 MiB payloads to log them cost 17-23 ms an event).
fn summary(payload: &str) -> String {
    const ORDER_FIELDS: [&str; 4] = ["store", "orderID", "customer", "address"];
    const MAX: usize = 120;
    if payload.len() <= SUMMARY_PARSE_LIMIT && payload.starts_with('{') {
        if let Ok(serde_json::Value::Object(map)) = serde_json::from_str(payload) {
            let fields: Vec<String> = ORDER_FIELDS
                .iter()
                .filter_map(|&key| map.get(key).map(|v| format!("{key}={}", one_line(v))))
                .collect();
            if !fields.is_empty() {
                let line = fields.join(" ");
                return hubcast::protocol::printable(&line).into_owned();
            }
        }
    }
    let mut end = payload.len().min(MAX);
    while !payload.is_char_boundary(end) {
        end -= 1;
    }
    let ellipsis = if end < payload.len() { "…" } else { "" };
    format!(
        "payload={}{ellipsis}",
        hubcast::protocol::printable(&payload[..end])
    )
}

fn one_line(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => hubcast::protocol::excerpt(s).to_string(),
        other => {
            let text = other.to_string();
            hubcast::protocol::printable(&text).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn the_event_log_rate_is_bounded() {
        let rate = super::RateLimit::new(3);
        let taken = (0..10).filter(|_| rate.take()).count();
        // Usually 3; 4 to 6 if the second turned during the loop.
        assert!((3..=6).contains(&taken), "{taken}");
    }

    #[test]
    fn orders_are_summarised_by_their_fields() {
        let order =
            r#"{"store":"acme","orderID":"42","customer":"Ann","address":"1 Main St","x":1}"#;
        assert_eq!(
            summary(order),
            r#"store="acme" orderID="42" customer="Ann" address="1 Main St""#
        );
        assert_eq!(summary("[1,2]"), "payload=[1,2]");
        let long = format!("\"{}\"", "é".repeat(200));
        assert!(summary(&long).ends_with('…'));
    }
}
