//! The NATS backplane: one connection per node to a NATS cluster, speaking the core
//! protocol (`CONNECT`, `PUB`, `SUB` with a queue group, `MSG`, `PING`/`PONG`).
//!
//! ```text
//!  ingest ──publish──▶ send buffer (Mutex<BytesMut>, bounded) ──▶ writer task ──▶ NATS
//!  NATS ──▶ link task: one ordered read stream ──MSG──▶ Event::from_line_fast ──▶ fan out
//!           interest changed ──▶ SUB / UNSUB (the diff)        PING every 500 ms
//! ```
//!
//! Why its own client, not `async-nats`: every message a node receives must come
//! through **one ordered stream**, whatever subscription it matched, so that one
//! sender's events reach a receiver in the order sent (a per-subscription channel, as
//! `async-nats` has, can interleave two subscriptions' messages differently from the
//! wire). All of a node's subscriptions share one queue group of its own, so an event
//! matching several of them (`order.*` and `*.created`) crosses to the node once.
//! The connection is made with `echo: false`: a node never hears its own events back
//! (it delivered them itself).
//!
//! When the link is lost, every client of the node gets `$gap {since}` at once, the
//! link is made again (the servers given, then those the cluster announced), the
//! subscriptions are sent again, and clients get `$gap {until}`. Events published while
//! cut off are dropped and counted: core NATS keeps nothing for an absent subscriber.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::subject::{all_rooms_subject, decode, event_subject, pattern_subject, room_subject};
use super::{gap_line, Backplane, BackplaneStatus, Interest};
use crate::event::Event;
use crate::frame::{FrameDecoder, Run};
use crate::hub::Hub;

/// How long connecting to one server (TCP, `INFO`, `CONNECT`, `PONG`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A `PING` this often; two in a row with nothing at all from the server since (no
/// `PONG`, no message) and the link is declared lost.
const PING_INTERVAL: Duration = Duration::from_millis(500);
/// Events queued for NATS beyond this are dropped (a server that stopped reading).
const MAX_BUFFERED: usize = 64 * 1024 * 1024;
/// The longest protocol line (`INFO` can be long in a big cluster).
const MAX_LINE: usize = 64 * 1024;
/// The longest message accepted (NATS's own default `max_payload` is 1 MiB).
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// One NATS server to try: `nats://[user:pass@|token@]HOST:PORT`, or `tls://...` to
/// insist on TLS (a `nats://` server that requires TLS gets it too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// `HOST:PORT`.
    pub addr: String,
    /// TLS whatever the server says (`tls://`).
    tls: bool,
    user: Option<String>,
    pass: Option<String>,
    token: Option<String>,
}

impl std::str::FromStr for ServerUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (tls, rest) = match text.split_once("://") {
            Some(("nats", rest)) => (false, rest),
            Some(("tls", rest)) => (true, rest),
            _ => {
                return Err(format!(
                    "{text:?} is not a NATS URL (expected nats://HOST:PORT or tls://HOST:PORT)"
                ))
            }
        };
        let (auth, addr) = match rest.rsplit_once('@') {
            Some((auth, addr)) => (Some(auth), addr),
            None => (None, rest),
        };
        let addr = addr.trim_end_matches('/');
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?} has no port (expected nats://HOST:PORT)"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!("{text:?}: expected nats://HOST:PORT"));
        }
        let (mut user, mut pass, mut token) = (None, None, None);
        match auth.map(|a| a.split_once(':')) {
            Some(Some((u, p))) => (user, pass) = (Some(u.to_string()), Some(p.to_string())),
            Some(None) => token = auth.map(str::to_string),
            None => {}
        }
        Ok(ServerUrl {
            addr: addr.to_string(),
            tls,
            user,
            pass,
            token,
        })
    }
}

impl ServerUrl {
    /// The user and password it carries, if any.
    pub(crate) fn user_pass(&self) -> Option<(&str, &str)> {
        self.user.as_deref().zip(self.pass.as_deref())
    }

    /// The token it carries, if any.
    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// Whether it insists on TLS (`tls://`).
    pub(crate) fn requires_tls(&self) -> bool {
        self.tls
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials: this is what logs and /readyz show.
        let scheme = if self.tls { "tls" } else { "nats" };
        write!(f, "{scheme}://{}", self.addr)
    }
}

/// Parses `nats://a:4222,nats://b:4222`.
///
/// # Errors
///
/// A message naming the URL that is not `nats://HOST:PORT`.
///
/// # Examples
///
/// ```
/// let urls = hubcast::cluster::nats::parse_urls("nats://a:4222,nats://u:p@b:4223").unwrap();
/// assert_eq!(urls.len(), 2);
/// assert_eq!(urls[1].to_string(), "nats://b:4223");
/// assert!(hubcast::cluster::nats::parse_urls("http://a:1").is_err());
/// ```
pub fn parse_urls(text: &str) -> Result<Vec<ServerUrl>, String> {
    let urls: Vec<ServerUrl> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    if urls.is_empty() {
        return Err("no NATS URL given (expected nats://HOST:PORT[,nats://...])".into());
    }
    Ok(urls)
}

/// Why the backplane could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach NATS at {tried}: {reason}")]
pub struct ConnectError {
    tried: String,
    reason: String,
}

/// A node's link to NATS. Made by [`NatsBackplane::connect`]; hand it to
/// [`Hub::set_backplane`].
pub struct NatsBackplane {
    shared: Arc<Shared>,
}

struct Shared {
    node: String,
    /// TLS to NATS: the trust (and identity) for `tls://` servers and those that ask.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The queue group all of this node's subscriptions share: one copy per node.
    queue: String,
    /// `PUB`s (and the link task's commands) waiting for the writer.
    out: Mutex<BytesMut>,
    wake: Notify,
    interest: Notify,
    connected: AtomicBool,
    link: Mutex<Link>,
    published: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    rejected: AtomicU64,
    reconnects: AtomicU64,
}

#[derive(Default)]
struct Link {
    server: Option<String>,
    down_since: Option<SystemTime>,
    subscriptions: usize,
}

impl Shared {
    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn out(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues protocol bytes for the writer.
    fn queue(&self, bytes: &[u8]) {
        let mut out = self.out();
        let was_empty = out.is_empty();
        out.extend_from_slice(bytes);
        drop(out);
        if was_empty {
            self.wake.notify_one();
        }
    }
}

impl Backplane for NatsBackplane {
    fn publish(&self, name: &str, room: Option<&str>, line: &[u8]) {
        let shared = &self.shared;
        if !shared.connected.load(Ordering::Acquire) {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let subject = event_subject(name, room);
        let mut size = itoa::Buffer::new();
        let size = size.format(line.len());
        let mut out = shared.out();
        if out.len() + line.len() > MAX_BUFFERED {
            drop(out);
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = out.is_empty();
        out.reserve(subject.len() + size.len() + line.len() + 10);
        out.extend_from_slice(b"PUB ");
        out.extend_from_slice(subject.as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(size.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
        drop(out);
        shared.published.fetch_add(1, Ordering::Relaxed);
        if was_empty {
            shared.wake.notify_one();
        }
    }

    fn interest_changed(&self) {
        self.shared.interest.notify_one();
    }

    fn down_since(&self) -> Option<SystemTime> {
        if self.shared.connected.load(Ordering::Acquire) {
            return None;
        }
        Some(
            self.shared
                .link()
                .down_since
                .unwrap_or_else(SystemTime::now),
        )
    }

    fn status(&self) -> BackplaneStatus {
        let shared = &self.shared;
        let link = shared.link();
        BackplaneStatus {
            engine: "nats",
            node: shared.node.clone(),
            connected: shared.connected.load(Ordering::Acquire),
            server: link.server.clone(),
            down_since: link.down_since,
            published: shared.published.load(Ordering::Relaxed),
            received: shared.received.load(Ordering::Relaxed),
            dropped: shared.dropped.load(Ordering::Relaxed),
            rejected: shared.rejected.load(Ordering::Relaxed),
            reconnects: shared.reconnects.load(Ordering::Relaxed),
            subscriptions: link.subscriptions,
        }
    }
}

impl NatsBackplane {
    /// Connects to the first of `urls` that answers (each within 2 s), and starts the
    /// task that keeps the link: reading, subscribing as `hub`'s interest changes,
    /// pinging, reconnecting (to `urls` and the servers the cluster announces) until
    /// `shutdown`. Call [`Hub::set_backplane`] with the result.
    ///
    /// # Errors
    ///
    /// [`ConnectError`] when no server could be reached (or each refused the
    /// credentials), naming each and why.
    pub async fn connect(
        hub: Hub,
        urls: Vec<ServerUrl>,
        node: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        shutdown: CancellationToken,
    ) -> Result<Arc<NatsBackplane>, ConnectError> {
        let shared = Arc::new(Shared {
            node: node.to_string(),
            tls,
            queue: format!("hubcast-node.{}.{:016x}", sanitize(node), fastrand::u64(..)),
            out: Mutex::new(BytesMut::new()),
            wake: Notify::new(),
            interest: Notify::new(),
            connected: AtomicBool::new(false),
            link: Mutex::default(),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
        });
        let mut failures = Vec::new();
        let mut first = None;
        for url in &urls {
            match handshake(url, node, shared.tls.as_ref()).await {
                Ok(conn) => {
                    first = Some((url.clone(), conn));
                    break;
                }
                Err(e) => failures.push(format!("{url}: {e}")),
            }
        }
        let Some((url, conn)) = first else {
            return Err(ConnectError {
                tried: urls
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                reason: failures.join("; "),
            });
        };
        // Connected from now on (not only once the task runs): a client that comes
        // in the meantime must not be told of a gap, nor its events dropped.
        shared.link().server = Some(url.to_string());
        shared.connected.store(true, Ordering::Release);
        let backplane = Arc::new(NatsBackplane {
            shared: Arc::clone(&shared),
        });
        tokio::spawn(keep_link(shared, hub, urls, (url, conn), shutdown));
        Ok(backplane)
    }
}

/// A queue-group token from a node name (no spaces, dots or wildcards).
fn sanitize(node: &str) -> String {
    node.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A connection that has been through `INFO` / `CONNECT` / `PONG`.
struct Conn {
    stream: Stream,
    /// Bytes read past the handshake.
    buf: BytesMut,
    /// Other servers of the cluster, as its `INFO` announced them.
    announced: Vec<String>,
}

/// The connection to a NATS server: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn handshake(
    url: &ServerUrl,
    node: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<Conn> {
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut tcp = TcpStream::connect(&url.addr).await?;
        tcp.set_nodelay(true)?;
        let mut buf = BytesMut::with_capacity(4096);
        let info = read_line(&mut tcp, &mut buf).await?;
        let info = info
            .strip_prefix("INFO ")
            .ok_or_else(|| other(format!("not a NATS server (it said {:?})", excerpt(&info))))?;
        let info: serde_json::Value =
            serde_json::from_str(info).map_err(|e| other(format!("bad INFO: {e}")))?;
        let required = info
            .get("tls_required")
            .and_then(serde_json::Value::as_bool)
            == Some(true);
        let mut stream = if url.tls || required {
            if !buf.is_empty() {
                return Err(other("the server sent more than INFO before TLS".into()));
            }
            let config = match tls {
                Some(config) => Arc::clone(config),
                None => crate::tls::client_config(None, None).map_err(other)?,
            };
            let host = url
                .addr
                .rsplit_once(':')
                .map_or(url.addr.as_str(), |(h, _)| h);
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let secured = crate::tls::connect(config, host, tcp)
                .await
                .map_err(|e| other(format!("TLS: {e}")))?;
            Stream::Tls(Box::new(secured))
        } else {
            Stream::Plain(tcp)
        };
        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "name": format!("hubcast {node}"),
            "lang": "rust-hubcast",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "echo": false,
            "headers": false,
        });
        if let (Some(user), Some(pass)) = (&url.user, &url.pass) {
            connect["user"] = user.as_str().into();
            connect["pass"] = pass.as_str().into();
        }
        if let Some(token) = &url.token {
            connect["auth_token"] = token.as_str().into();
        }
        if matches!(stream, Stream::Tls(_)) {
            connect["tls_required"] = true.into();
        }
        let hello = format!("CONNECT {connect}\r\nPING\r\n");
        stream.write_all(hello.as_bytes()).await?;
        loop {
            let line = read_line(&mut stream, &mut buf).await?;
            match line.as_str() {
                "PONG" => break,
                "+OK" => {}
                "PING" => stream.write_all(b"PONG\r\n").await?,
                _ if line.starts_with("INFO ") => {}
                _ if line.starts_with("-ERR") => {
                    return Err(other(format!("the server refused: {}", excerpt(&line))))
                }
                _ => return Err(other(format!("unexpected {:?}", excerpt(&line)))),
            }
        }
        Ok(Conn {
            stream,
            buf,
            announced: announced_servers(&info),
        })
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 2 s"))?
}

/// The `connect_urls` of an `INFO`.
fn announced_servers(info: &serde_json::Value) -> Vec<String> {
    info.get("connect_urls")
        .and_then(|v| v.as_array())
        .map(|urls| {
            urls.iter()
                .filter_map(|u| u.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn other(message: String) -> io::Error {
    io::Error::other(message)
}

fn excerpt(text: &str) -> &str {
    let end = text.char_indices().nth(120).map_or(text.len(), |(i, _)| i);
    &text[..end]
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.write_all(bytes).await,
            Stream::Tls(s) => s.write_all(bytes).await,
        }
    }
}

/// Something `read_line` can read from.
trait Fill {
    async fn fill(&mut self, buf: &mut BytesMut) -> io::Result<usize>;
}

impl Fill for TcpStream {
    async fn fill(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        self.read_buf(buf).await
    }
}

impl Fill for Stream {
    async fn fill(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read_buf(buf).await,
            Stream::Tls(s) => s.read_buf(buf).await,
        }
    }
}

/// Reads one `\r\n`-ended line during the handshake.
async fn read_line(stream: &mut impl Fill, buf: &mut BytesMut) -> io::Result<String> {
    loop {
        if let Some(at) = memchr::memmem::find(buf, b"\r\n") {
            let line = buf.split_to(at + 2);
            return Ok(String::from_utf8_lossy(&line[..at]).into_owned());
        }
        if buf.len() > MAX_LINE {
            return Err(other("a protocol line longer than 64 KiB".into()));
        }
        if stream.fill(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
    }
}

/// Keeps the link until `shutdown`: serves a connection until it is lost, tells the
/// clients, connects again.
async fn keep_link(
    shared: Arc<Shared>,
    hub: Hub,
    urls: Vec<ServerUrl>,
    first: (ServerUrl, Conn),
    shutdown: CancellationToken,
) {
    let mut current = Some(first);
    let mut announced: Vec<String> = Vec::new();
    loop {
        let Some((url, conn)) = current.take() else {
            return;
        };
        announced.clone_from(&conn.announced);
        {
            let mut link = shared.link();
            link.server = Some(url.to_string());
            let was_down = link.down_since.take();
            drop(link);
            shared.connected.store(true, Ordering::Release);
            if let Some(since) = was_down {
                shared.reconnects.fetch_add(1, Ordering::Relaxed);
                info!(server = %url, down_for = ?since.elapsed().unwrap_or_default(), "backplane: reconnected");
                hub.tell_everyone(gap_line("until", SystemTime::now()));
            } else {
                info!(server = %url, node = %shared.node, "backplane: connected to NATS");
            }
        }
        let Conn { stream, buf, .. } = conn;
        let lost = match stream {
            Stream::Plain(tcp) => {
                let (reader, writer) = tcp.into_split();
                serve(
                    &shared,
                    &hub,
                    (reader, writer, buf),
                    &shutdown,
                    &mut announced,
                )
                .await
            }
            Stream::Tls(tls) => {
                let (reader, writer) = tokio::io::split(*tls);
                serve(
                    &shared,
                    &hub,
                    (reader, writer, buf),
                    &shutdown,
                    &mut announced,
                )
                .await
            }
        };
        shared.connected.store(false, Ordering::Release);
        // What was queued and not written is gone with the connection: counted.
        let unsent = {
            let mut out = shared.out();
            let count = count_publishes(&out);
            out.clear();
            count
        };
        shared.dropped.fetch_add(unsent, Ordering::Relaxed);
        if shutdown.is_cancelled() {
            return;
        }
        let since = SystemTime::now();
        {
            let mut link = shared.link();
            link.server = None;
            link.down_since = Some(since);
            link.subscriptions = 0;
        }
        warn!(server = %url, reason = %lost, "backplane: lost NATS; live events from other nodes may be missed until it is back");
        hub.tell_everyone(gap_line("since", since));
        current = reconnect(
            &shared.node,
            shared.tls.as_ref(),
            &urls,
            &announced,
            &url,
            &shutdown,
        )
        .await;
    }
}

/// How many `PUB`s are in `out` (protocol lines, each `PUB` followed by its payload).
fn count_publishes(out: &[u8]) -> u64 {
    let mut count = 0;
    let mut rest = out;
    while let Some(at) = memchr::memmem::find(rest, b"\r\n") {
        let line = &rest[..at];
        rest = &rest[at + 2..];
        if let Some(args) = line.strip_prefix(b"PUB ") {
            count += 1;
            let size = args
                .rsplit(|&b| b == b' ')
                .next()
                .and_then(|s| std::str::from_utf8(s).ok()?.parse::<usize>().ok());
            match size {
                Some(size) if size + 2 <= rest.len() => rest = &rest[size + 2..],
                _ => break,
            }
        }
    }
    count
}

/// Tries the servers (those given, then those announced, the one just lost last)
/// with backoff from 50 ms to 1 s, until one answers or `shutdown`.
async fn reconnect(
    node: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    urls: &[ServerUrl],
    announced: &[String],
    lost: &ServerUrl,
    shutdown: &CancellationToken,
) -> Option<(ServerUrl, Conn)> {
    let mut candidates: Vec<ServerUrl> = urls.iter().filter(|u| *u != lost).cloned().collect();
    for addr in announced {
        let url = ServerUrl {
            addr: addr.clone(),
            tls: lost.tls,
            user: lost.user.clone(),
            pass: lost.pass.clone(),
            token: lost.token.clone(),
        };
        if !candidates.contains(&url) && url != *lost {
            candidates.push(url);
        }
    }
    candidates.push(lost.clone());
    let mut delay = Duration::from_millis(50);
    loop {
        for url in &candidates {
            if shutdown.is_cancelled() {
                return None;
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                conn = handshake(url, node, tls) => match conn {
                    Ok(conn) => return Some((url.clone(), conn)),
                    Err(e) => tracing::debug!(server = %url, error = %e, "backplane: cannot connect"),
                },
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Serves one connection: the writer in a task of its own, reading, subscriptions
/// and pings here. Returns why it ended.
async fn serve<R, W>(
    shared: &Arc<Shared>,
    hub: &Hub,
    (mut reader, mut writer, mut buf): (R, W, BytesMut),
    shutdown: &CancellationToken,
    announced: &mut Vec<String>,
) -> String
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let failed = CancellationToken::new();
    let stop_writer = failed.clone();
    let writer_shared = Arc::clone(shared);
    let writer_task = tokio::spawn(async move {
        let mut local = BytesMut::new();
        loop {
            tokio::select! {
                () = stop_writer.cancelled() => return,
                () = writer_shared.wake.notified() => {}
            }
            loop {
                std::mem::swap(&mut *writer_shared.out(), &mut local);
                if local.is_empty() {
                    break;
                }
                if let Err(e) = writer.write_all(&local).await {
                    tracing::debug!(error = %e, "backplane: write failed");
                    stop_writer.cancel();
                    return;
                }
                local.clear();
            }
        }
    });
    let mut subscriptions = Subscriptions::default();
    subscriptions.reconcile(shared, &hub.interest());
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut unanswered = 0u32;
    let mut batch = Batch::new(hub.config().limits.max_frame);
    let reason = loop {
        // What is already read is handled before waiting for more.
        let handled = handle(
            shared,
            hub,
            &mut buf,
            &mut unanswered,
            announced,
            &mut batch,
        );
        // Whatever was read is out before waiting for more.
        batch.flush(shared, hub);
        if let Err(e) = handled {
            break e;
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // Whatever was published is on its way before the hub closes.
                shared.wake.notify_one();
                break "shutdown".to_string();
            }
            () = failed.cancelled() => break "a write to NATS failed".to_string(),
            () = shared.interest.notified() => {
                subscriptions.reconcile(shared, &hub.interest());
            }
            _ = ping.tick() => {
                if unanswered >= 2 {
                    break "two PINGs unanswered".to_string();
                }
                unanswered += 1;
                shared.queue(b"PING\r\n");
            }
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) => break "the server closed the connection".to_string(),
                // Anything from the server shows the link is alive: a PONG stuck
                // behind a backlog of messages is not a dead server.
                Ok(_) => unanswered = 0,
                Err(e) => break format!("read failed: {e}"),
            },
        }
    };
    if reason == "shutdown" {
        // Let the writer flush what is queued (bounded), then stop it.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while !shared.out().is_empty() && !failed.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
    failed.cancel();
    let _ = writer_task.await;
    reason
}

/// Handles every complete operation in `buf`.
fn handle(
    shared: &Shared,
    hub: &Hub,
    buf: &mut BytesMut,
    unanswered: &mut u32,
    announced: &mut Vec<String>,
    batch: &mut Batch,
) -> Result<(), String> {
    loop {
        let Some(at) = memchr::memmem::find(buf, b"\r\n") else {
            if buf.len() > MAX_LINE {
                return Err("a protocol line longer than 64 KiB".into());
            }
            return Ok(());
        };
        let line = &buf[..at];
        if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
            let headers = line[0] == b'H';
            let text = std::str::from_utf8(line).map_err(|_| "a MSG line that is not UTF-8")?;
            let fields: Vec<&str> = text.split_ascii_whitespace().collect();
            let bad = || format!("a bad MSG line {:?}", excerpt(text));
            // MSG subject sid [reply] size / HMSG subject sid [reply] hsize size
            let sizes = if headers { 2 } else { 1 };
            if fields.len() < 3 + sizes || fields.len() > 4 + sizes {
                return Err(bad());
            }
            let total: usize = fields[fields.len() - 1].parse().map_err(|_| bad())?;
            let header_len: usize = if headers {
                fields[fields.len() - 2].parse().map_err(|_| bad())?
            } else {
                0
            };
            if total > MAX_PAYLOAD || header_len > total {
                return Err(bad());
            }
            if buf.len() < at + 2 + total + 2 {
                // The payload is not all here yet.
                buf.reserve(at + 2 + total + 2 - buf.len());
                return Ok(());
            }
            let start = at + 2 + header_len;
            let payload = &buf[start..at + 2 + total];
            match decode(fields[1]) {
                // Plain events in a row go out together, as a run (one queue push per
                // receiver for the lot, as for a client's).
                Some((name, None)) if plain_line(payload) => batch.push(name, payload),
                Some((name, room)) => {
                    batch.flush(shared, hub);
                    // Its own allocation: a slice would pin the read buffer (issue #10).
                    let line = Bytes::copy_from_slice(payload);
                    deliver(shared, hub, &name, room.as_deref(), line);
                }
                None => {
                    shared.rejected.fetch_add(1, Ordering::Relaxed);
                }
            }
            buf.advance(at + 2 + total + 2);
            continue;
        }
        let op = String::from_utf8_lossy(line).into_owned();
        buf.advance(at + 2);
        match op.as_str() {
            "PING" => shared.queue(b"PONG\r\n"),
            "PONG" => *unanswered = 0,
            "+OK" => {}
            _ if op.starts_with("INFO ") => {
                if let Ok(info) = serde_json::from_str::<serde_json::Value>(&op[5..]) {
                    let urls = announced_servers(&info);
                    if !urls.is_empty() {
                        *announced = urls;
                    }
                }
            }
            _ if op.starts_with("-ERR") => {
                warn!(error = %excerpt(&op), "backplane: NATS said");
                // Permissions and limits errors leave the connection open; the server
                // closes it itself for the others.
            }
            _ => return Err(format!("unexpected {:?}", excerpt(&op))),
        }
    }
}

/// Whether `payload` is one line as a hub forwards it: an object, one `\n` at the end
/// and none before.
fn plain_line(payload: &[u8]) -> bool {
    payload.first() == Some(&b'{')
        && payload.last() == Some(&b'\n')
        && memchr::memchr(b'\n', payload) == Some(payload.len() - 1)
}

/// Fans out an event from another node, if it is one: a valid event whose name and
/// room are those its subject says.
fn deliver(shared: &Shared, hub: &Hub, name: &str, room: Option<&str>, line: Bytes) {
    let event = Event::from_line_fast(line).ok().filter(|event| {
        event.name().as_str() == name && event.room().map(crate::event::RoomName::as_str) == room
    });
    match event {
        Some(event) => {
            shared.received.fetch_add(1, Ordering::Relaxed);
            hub.deliver_remote(&event);
        }
        None => {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Plain events from NATS (no room), gathered from one read to be fanned out as runs.
struct Batch {
    decoder: FrameDecoder,
    /// Their lines, back to back.
    lines: BytesMut,
    /// The name each one's subject says, in order.
    names: Vec<String>,
    run: Run,
}

impl Batch {
    fn new(max_frame: usize) -> Batch {
        Batch {
            decoder: FrameDecoder::new(max_frame),
            lines: BytesMut::new(),
            names: Vec::new(),
            run: Run::default(),
        }
    }

    fn push(&mut self, name: String, line: &[u8]) {
        self.lines.extend_from_slice(line);
        self.names.push(name);
    }

    /// Fans out what was gathered: runs of typical events whole, anything else (an
    /// `"id"`, something the fast path is unsure of) one by one.
    fn flush(&mut self, shared: &Shared, hub: &Hub) {
        let mut names = self.names.drain(..);
        while !self.lines.is_empty() {
            if self.decoder.decode_run(&mut self.lines, &mut self.run) {
                let count = self.run.len();
                let expected: Vec<String> = names.by_ref().take(count).collect();
                let matches =
                    expected.len() == count && (0..count).all(|i| self.run.name(i) == expected[i]);
                if matches {
                    shared.received.fetch_add(count as u64, Ordering::Relaxed);
                    hub.deliver_remote_run(&self.run);
                } else {
                    shared.rejected.fetch_add(count as u64, Ordering::Relaxed);
                }
            } else {
                // Each line ends with its only `\n` (`plain_line`).
                let end = memchr::memchr(b'\n', &self.lines).map_or(self.lines.len(), |at| at + 1);
                let line = Bytes::copy_from_slice(&self.lines[..end]);
                self.lines.advance(end);
                match names.next() {
                    Some(name) => deliver(shared, hub, &name, None, line),
                    None => {
                        shared.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        drop(names);
        self.names.clear();
    }
}

/// The subscriptions held on the current connection, by subject.
#[derive(Default)]
struct Subscriptions {
    by_subject: HashMap<String, u64>,
    next_sid: u64,
}

impl Subscriptions {
    /// Subscribes to what `interest` needs and unsubscribes from the rest.
    fn reconcile(&mut self, shared: &Shared, interest: &Interest) {
        let mut wanted: BTreeSet<String> = BTreeSet::new();
        if interest.everything {
            wanted.insert(pattern_subject(">"));
        } else {
            wanted.extend(interest.patterns.iter().map(|p| pattern_subject(p)));
        }
        if interest.all_rooms {
            wanted.insert(all_rooms_subject());
        } else {
            wanted.extend(interest.rooms.iter().map(|r| room_subject(r)));
        }
        let mut commands = String::new();
        self.by_subject.retain(|subject, sid| {
            let keep = wanted.contains(subject);
            if !keep {
                commands.push_str(&format!("UNSUB {sid}\r\n"));
            }
            keep
        });
        for subject in wanted {
            if !self.by_subject.contains_key(&subject) {
                self.next_sid += 1;
                commands.push_str(&format!(
                    "SUB {subject} {} {}\r\n",
                    shared.queue, self.next_sid
                ));
                self.by_subject.insert(subject, self.next_sid);
            }
        }
        if !commands.is_empty() {
            shared.queue(commands.as_bytes());
        }
        shared.link().subscriptions = self.by_subject.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_credentials_and_say_what_is_wrong() {
        let url: ServerUrl = "nats://alice:secret@127.0.0.1:4222".parse().unwrap();
        assert_eq!(url.addr, "127.0.0.1:4222");
        assert_eq!(url.user.as_deref(), Some("alice"));
        assert_eq!(url.pass.as_deref(), Some("secret"));
        assert_eq!(url.to_string(), "nats://127.0.0.1:4222");
        let url: ServerUrl = "nats://t0ken@h:1".parse().unwrap();
        assert_eq!(url.token.as_deref(), Some("t0ken"));
        for bad in [
            "127.0.0.1:4222",
            "nats://h",
            "nats://:4222",
            "nats://h:port",
            "",
        ] {
            assert!(bad.parse::<ServerUrl>().is_err(), "{bad}");
        }
        assert!(parse_urls(" , ").is_err());
        assert_eq!(parse_urls("nats://a:1, nats://b:2").unwrap().len(), 2);
    }

    #[test]
    fn queued_publishes_are_counted_past_their_payloads() {
        let out = b"SUB a q 1\r\nPUB x 5\r\nPUB y\r\nPUB y 0\r\n\r\nPING\r\nPUB z 3\r\nab";
        // Two whole PUBs ("PUB y..." is a payload), then one cut short.
        assert_eq!(count_publishes(out), 3);
        assert_eq!(count_publishes(b""), 0);
    }

    #[test]
    fn queue_groups_are_plain_tokens() {
        assert_eq!(sanitize("node 1.a*"), "node_1_a_");
    }
}
