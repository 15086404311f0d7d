//! Running one benchmark: connect everyone, publish, count, report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::records::{self, Gate, GatedTls, Records};
use super::report::{Report, SubscriberGap};
use super::tally::{micros_since, read_stamp, write_body, Flow, Stamp, Tally, MIN_SIZE};
use super::wire::{Inbound, Kind, Reply, Target};
use super::{usage, Args};

/// A publisher writes up to this much per `write` call (pipelining, the same for every
/// target).
const BATCH_BYTES: usize = 64 * 1024;
/// Each connection's read buffer (grown when one message is larger).
const READ_BUFFER: usize = 64 * 1024;

/// What every task of one run shares.
struct Shared {
    kind: Kind,
    size: usize,
    subscribers: usize,
    /// Messages each publisher is to send.
    counts: Vec<u64>,
    /// Messages each publisher has written so far: loss is counted against these, so a
    /// run cut short does not count what was never sent as lost.
    sent: Vec<AtomicU64>,
    flows: Vec<Flow>,
    /// The clock all stamps are relative to.
    clock: Instant,
    /// Deliveries so far, for the progress bar and stall detection.
    delivered: AtomicU64,
    /// Errors the servers reported (first few kept), and how many in all.
    errors: Mutex<(Vec<String>, u64)>,
    /// Redis `PUBLISH` replies that counted fewer receivers than subscribers.
    short_publishes: AtomicU64,
    stop: CancellationToken,
    /// Which subscribers have heard a probe (several targets: a cluster).
    heard_probe: Vec<AtomicBool>,
    probed: Notify,
}

impl Shared {
    fn error(&self, text: String) {
        let mut errors = self.errors.lock().expect("errors lock");
        if errors.0.len() < 5 {
            errors.0.push(text);
        }
        errors.1 += 1;
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.size < MIN_SIZE {
        return usage(&format!(
            "--size must be at least {MIN_SIZE} bytes (each message carries a stamp of {MIN_SIZE} bytes)"
        ));
    }
    if args.events < args.pubs {
        return usage("--events must be at least --pubs (every publisher sends one or more)");
    }
    crate::serve::raise_open_files_limit(args.subs + args.pubs, "bench connections");
    crate::memory::small_pages_only();
    if args.target.len() > 1 {
        if args.port.is_some() {
            return usage("--port applies to one target; give each target its own port");
        }
        if args.durable.is_some() || args.connects.is_some() {
            return usage("several targets are for fan-out only (not --durable or --connects)");
        }
        if args.target.iter().any(|t| t.kind != args.target[0].kind) {
            return usage("several targets must all be of one kind (all hubs, or all nats://)");
        }
        if args.target[0].kind == Kind::Redis || args.target[0].kind == Kind::SocketIo {
            return usage(
                "several targets: hubcast (a hubcast cluster) or nats:// (a NATS cluster)",
            );
        }
    }
    let (targets, embedded) = if args.embedded {
        let (target, token) = start_embedded().await?;
        (vec![target], Some(token))
    } else {
        let mut targets = args.target.clone();
        if let Some(port) = args.port {
            targets[0].set_port(port);
        }
        (targets, None)
    };
    let target = targets[0].clone();
    if let Some(mode) = args.durable {
        return super::durable::main(&args, &target, mode).await;
    }
    if let Some(count) = args.connects {
        return super::connects::main(&args, &target, count).await;
    }
    let counts = (0..args.pubs)
        .map(|p| (args.events / args.pubs + usize::from(p < args.events % args.pubs)) as u64)
        .collect();
    let shared = Arc::new(Shared {
        kind: target.kind,
        size: args.size,
        subscribers: args.subs,
        counts,
        sent: (0..args.pubs).map(|_| AtomicU64::new(0)).collect(),
        // The window bounds what is in flight to each subscriber in all, so it is
        // shared between publishers: with a per-publisher window, 4 publishers of 4 KiB
        // messages could queue 16 MB for one subscriber, past the servers' limits.
        flows: (0..args.pubs)
            .map(|_| Flow::new((args.window / args.pubs).max(1), args.subs))
            .collect(),
        clock: Instant::now(),
        delivered: AtomicU64::new(0),
        errors: Mutex::new((Vec::new(), 0)),
        short_publishes: AtomicU64::new(0),
        stop: CancellationToken::new(),
        heard_probe: (0..args.subs).map(|_| AtomicBool::new(false)).collect(),
        probed: Notify::new(),
    });
    let report = measure(&args, &targets, &shared).await;
    if let Some(token) = embedded {
        token.cancel();
    }
    let report = report?;
    // Not `println!`, which panics when stdout is closed (`bench --json | head`): a
    // broken pipe ends the process quietly, as for `sub | head` (main.rs).
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report.table()
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn measure(args: &Args, targets: &[Target], shared: &Arc<Shared>) -> anyhow::Result<Report> {
    let target = &targets[0];
    let dial = Dial::new(args, target)?;
    let connecting = Instant::now();
    let mut subscribers = Vec::with_capacity(args.subs);
    for index in 0..args.subs {
        // Spread over the targets in turn (one target: all on it).
        let on = &targets[index % targets.len()];
        let ready = handshake(on, &dial, &dial.subscribe(on.kind))
            .await
            .with_context(|| format!("subscriber {} of {} (on {on})", index + 1, args.subs))?;
        subscribers.push(ready);
    }
    let mut publishers = Vec::with_capacity(args.pubs);
    for index in 0..args.pubs {
        let ready = match dial.publisher_hello(target.kind) {
            Some(hello) => handshake(target, &dial, &hello).await,
            None => connect(target, &dial)
                .await
                .map(|stream| (stream, Vec::new())),
        }
        .with_context(|| format!("publisher {} of {}", index + 1, args.pubs))?;
        publishers.push(ready);
    }
    let connect_time = connecting.elapsed();

    let mut subscriber_tasks = JoinSet::new();
    for (index, (stream, leftover)) in subscribers.into_iter().enumerate() {
        let shared = Arc::clone(shared);
        subscriber_tasks
            .spawn(async move { (index, subscribe(&shared, index, stream, leftover).await) });
    }
    if targets.len() > 1 {
        // In a cluster, a subscription reaches the other nodes a moment after it is
        // made: probe until every subscriber hears the first target.
        let Some((stream, _)) = publishers.first_mut() else {
            bail!("no publisher");
        };
        probe(shared, stream).await?;
    }
    let started_us = micros_since(shared.clock);
    let rate = args.rate.map(|rate| rate as f64 / args.pubs as f64);
    let mut publisher_tasks = JoinSet::new();
    for (id, (stream, _)) in publishers.into_iter().enumerate() {
        let shared = Arc::clone(shared);
        publisher_tasks.spawn(async move { publish(&shared, id, stream, rate).await });
    }

    let outcomes = watch(args, shared, &mut subscriber_tasks).await;
    shared.stop.cancel();
    while let Some(result) = publisher_tasks.join_next().await {
        if let Err(e) = result.context("a publisher task failed")? {
            shared.error(format!("publisher: {e:#}"));
        }
    }
    let mut report = summarise(args, target, shared, outcomes, started_us, connect_time);
    if targets.len() > 1 {
        report.target = targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
    }
    Ok(report)
}

/// Waits for every subscriber to finish, showing progress; stops the run when nothing
/// arrives for `--stall-timeout` or on Ctrl-C.
async fn watch(
    args: &Args,
    shared: &Shared,
    tasks: &mut JoinSet<(usize, SubscriberOutcome)>,
) -> Vec<Option<SubscriberOutcome>> {
    let expected = shared.counts.iter().sum::<u64>() * args.subs as u64;
    let bar = progress_bar(expected, args.json);
    let mut outcomes: Vec<Option<SubscriberOutcome>> = (0..args.subs).map(|_| None).collect();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let (mut seen, mut since) = (0, Instant::now());
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok((index, outcome))) => outcomes[index] = Some(outcome),
                Some(Err(e)) => shared.error(format!("a subscriber task failed: {e}")),
                None => break,
            },
            _ = ticker.tick() => {
                let now = shared.delivered.load(Ordering::Relaxed);
                bar.set_position(now);
                if now != seen {
                    (seen, since) = (now, Instant::now());
                } else if since.elapsed() >= args.stall_timeout && !shared.stop.is_cancelled() {
                    shared.error(format!(
                        "nothing arrived for {:?}: stopped waiting",
                        args.stall_timeout
                    ));
                    shared.stop.cancel();
                }
            }
            _ = tokio::signal::ctrl_c(), if !shared.stop.is_cancelled() => {
                shared.error("interrupted (Ctrl-C)".into());
                shared.stop.cancel();
            }
        }
    }
    bar.finish_and_clear();
    outcomes
}

fn progress_bar(expected: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(expected), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} deliveries ({per_sec})",
        )
        .expect("a valid template"),
    );
    bar
}

/// A connection to the target: TCP, or TLS over it.
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {
    /// Over TLS: whether the handshake resumed an earlier session (a ticket from the
    /// server: no certificate sent, signed or checked). `None` without TLS.
    fn resumed(&self) -> Option<bool> {
        None
    }

    /// Over TLS 1.3, the connection's records from here on, opened by the bench
    /// ([`Records`], with room for messages of `most` bytes, `before` first); otherwise
    /// the stream back.
    fn into_records(
        self: Box<Self>,
        most: usize,
        before: &[u8],
    ) -> Result<anyhow::Result<Records>, BenchStream>;
}
impl Stream for TcpStream {
    fn into_records(
        self: Box<Self>,
        _most: usize,
        _before: &[u8],
    ) -> Result<anyhow::Result<Records>, BenchStream> {
        Err(self)
    }
}
impl Stream for GatedTls {
    fn resumed(&self) -> Option<bool> {
        Some(self.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
    }

    fn into_records(
        self: Box<Self>,
        most: usize,
        before: &[u8],
    ) -> Result<anyhow::Result<Records>, BenchStream> {
        if records::can_take_over(&self) {
            Ok(Records::take_over(*self, most, before))
        } else {
            Err(self)
        }
    }
}
pub type BenchStream = Box<dyn Stream>;

/// How to reach the target: TLS (trusting `--ca`, else the system's roots) and a
/// token to authenticate with.
#[derive(Clone, Default)]
pub struct Dial {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub token: Option<String>,
    /// The addresses each target's `host:port` resolved to, looked up once: a lookup
    /// per connection (resolver files read, a blocking thread woken) cost the bench
    /// more CPU per connect than the server's TCP accept.
    resolved: Arc<Mutex<HashMap<String, Arc<[SocketAddr]>>>>,
}

impl Dial {
    pub fn new(args: &Args, target: &Target) -> anyhow::Result<Dial> {
        let tls = if target.tls || args.tls || args.ca.is_some() {
            let config =
                hubcast::tls::client_config(args.ca.as_deref(), None).map_err(crate::UsageError)?;
            // Subscribers open their records themselves once connected (`records`).
            let mut config = rustls::ClientConfig::clone(&config);
            config.enable_secret_extraction = true;
            Some(Arc::new(config))
        } else {
            None
        };
        Ok(Dial {
            tls,
            token: args.token.clone(),
            resolved: Arc::default(),
        })
    }

    /// The same, as a client of its own: over TLS, with a session store of its own
    /// (the tickets the server gives it, to resume with). rustls keeps at most 8
    /// tickets per server in a store, so workers sharing one took more than it held
    /// when their connections ended together, and a fifth of the connects made full
    /// handshakes where a real client, with tickets of its own, resumes.
    pub fn own_client(&self) -> Dial {
        let mut dial = self.clone();
        if let Some(config) = &self.tls {
            let mut config = rustls::ClientConfig::clone(config);
            config.resumption = rustls::client::Resumption::in_memory_sessions(8);
            dial.tls = Some(Arc::new(config));
        }
        dial
    }

    /// The addresses `target` resolves to, looked up on its first connection only.
    async fn resolve(&self, target: &Target) -> anyhow::Result<Arc<[SocketAddr]>> {
        if let Some(found) = self
            .resolved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&target.addr)
        {
            return Ok(Arc::clone(found));
        }
        let found: Arc<[SocketAddr]> = tokio::net::lookup_host(&target.addr)
            .await
            .with_context(|| format!("cannot resolve {target}"))?
            .collect();
        if found.is_empty() {
            bail!("{target} resolves to no address");
        }
        self.resolved
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(target.addr.clone(), Arc::clone(&found));
        Ok(found)
    }

    /// What a connection sends first to authenticate (hubcast's `$hello`; NATS's
    /// token goes in its CONNECT).
    pub fn hello(&self, kind: Kind, publisher: bool) -> Option<Vec<u8>> {
        let token = self.token.as_ref()?;
        match kind {
            Kind::Hubcast => {
                let mut payload = serde_json::json!({ "token": token, "name": "bench" });
                if publisher {
                    payload["echo"] = false.into();
                }
                Some(
                    (serde_json::json!({ "event": "$hello", "payload": payload }).to_string()
                        + "\n")
                        .into_bytes(),
                )
            }
            Kind::Nats => Some(
                format!(
                    "CONNECT {{\"verbose\":false,\"pedantic\":false,\"echo\":{},\"auth_token\":{},\"name\":\"hubcast-bench\"}}\r\n",
                    !publisher,
                    serde_json::Value::from(token.as_str())
                )
                .into_bytes(),
            ),
            Kind::Ws => {
                let mut payload = serde_json::json!({ "token": token, "name": "bench" });
                if publisher {
                    payload["echo"] = false.into();
                }
                let hello = serde_json::json!({ "event": "$hello", "payload": payload });
                Some(super::wire::ws_frame(hello.to_string().as_bytes()))
            }
            Kind::Redis | Kind::SocketIo => None,
        }
    }

    /// A subscriber's first bytes.
    pub fn subscribe(&self, kind: Kind) -> Vec<u8> {
        match (self.hello(kind, false), kind) {
            (Some(mut hello), Kind::Hubcast | Kind::Ws) => {
                hello.extend_from_slice(&kind.subscribe());
                hello
            }
            // The token's CONNECT replaces the plain one.
            (Some(mut hello), Kind::Nats) => {
                hello.extend_from_slice(
                    format!("SUB {} 1\r\nPING\r\n", super::wire::SUBJECT).as_bytes(),
                );
                hello
            }
            _ => kind.subscribe(),
        }
    }

    /// A publisher's first bytes, if it must wait for an answer before publishing.
    pub fn publisher_hello(&self, kind: Kind) -> Option<Vec<u8>> {
        match self.hello(kind, true) {
            Some(mut hello) if kind == Kind::Nats => {
                hello.extend_from_slice(b"PING\r\n");
                Some(hello)
            }
            Some(hello) => Some(hello),
            None => kind.publisher_hello(),
        }
    }
}

/// Connects with a bounded wait and no Nagle delay (every target gets the same), and
/// runs the TLS handshake if asked to.
pub async fn connect(target: &Target, dial: &Dial) -> anyhow::Result<BenchStream> {
    connect_sending(target, dial, &[]).await
}

/// [`connect`], then sends `first`. Over TLS (not under a WebSocket, whose upgrade
/// comes first) `first` is handed to rustls before the handshake, which sends it in
/// the same flight as the client's `Finished`, as TLS 1.3 allows: the server reads
/// both at once, one packet and one wake-up fewer per connection.
async fn connect_sending(
    target: &Target,
    dial: &Dial,
    first: &[u8],
) -> anyhow::Result<BenchStream> {
    let websocket = target.kind.websocket();
    let (mut stream, sent) = connect_tls(target, dial, if websocket { &[] } else { first }).await?;
    if websocket {
        stream = upgrade(target, stream).await?;
    }
    if sent < first.len() {
        stream.write_all(&first[sent..]).await?;
    }
    Ok(stream)
}

/// The WebSocket handshake: the upgrade request, then the `101` answer, read a byte at
/// a time so that nothing the server sends right after it is taken from the stream.
async fn upgrade(target: &Target, mut stream: BenchStream) -> anyhow::Result<BenchStream> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.addr
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let answer = async {
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 16 * 1024 {
                bail!("{target}: the HTTP answer's head is over 16 KiB");
            }
            let mut byte = [0u8; 1];
            if stream.read(&mut byte).await? == 0 {
                bail!("{target} closed the connection during the WebSocket handshake");
            }
            head.push(byte[0]);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .map_err(|_| {
            anyhow::anyhow!("{target} did not answer the WebSocket upgrade within 10 s")
        })??;
    if !head.starts_with(b"HTTP/1.1 101") {
        let status = String::from_utf8_lossy(&head);
        bail!(
            "{target} refused the WebSocket upgrade: {}",
            status.lines().next().unwrap_or_default()
        );
    }
    Ok(stream)
}

/// Connects, with TLS if `dial` says so; over TLS, `first` goes with the client's
/// `Finished`. Returns how much of `first` was sent (all of it, or none without TLS).
async fn connect_tls(
    target: &Target,
    dial: &Dial,
    first: &[u8],
) -> anyhow::Result<(BenchStream, usize)> {
    let stream = connect_tcp(target, dial).await?;
    let Some(config) = &dial.tls else {
        return Ok((Box::new(stream), 0));
    };
    let mut sent = 0;
    let host = target
        .addr
        .rsplit_once(':')
        .map_or(target.addr.as_str(), |(h, _)| h);
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| anyhow::anyhow!("{host:?} is not a TLS server name: {e}"))?;
    // Read ahead (rustls asks its socket for 4 KiB at a time), a record at a time for
    // rustls, so that a subscriber can take its records over (`records`).
    let stream = Gate::new(stream);
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(Arc::clone(config)).connect_with(name, stream, |tls| {
            // rustls holds it (up to its buffer limit) until the handshake allows
            // application data.
            sent = std::io::Write::write(&mut tls.writer(), first).unwrap_or(0);
        }),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the TLS handshake with {target} timed out after 10 s"))?
    .with_context(|| format!("TLS handshake with {target}"))?;
    Ok((Box::new(tls), sent))
}

async fn connect_tcp(target: &Target, dial: &Dial) -> anyhow::Result<TcpStream> {
    let addrs = dial.resolve(target).await?;
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addrs[..]))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to {target} timed out after 10 s"))?
        .map_err(|e| match (e.kind(), target.kind) {
            (std::io::ErrorKind::ConnectionRefused, Kind::Hubcast) => anyhow::anyhow!(
                "cannot connect to {target} ({e}): is `hubcast serve` running there? To measure a hub started inside the bench, use --embedded"
            ),
            _ => anyhow::Error::new(e).context(format!("cannot connect to {target}")),
        })?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects, sends `hello`, and reads until the server confirms it; returns the stream
/// and whatever arrived after the confirmation.
pub async fn handshake(
    target: &Target,
    dial: &Dial,
    hello: &[u8],
) -> anyhow::Result<(BenchStream, Vec<u8>)> {
    let mut stream = connect_sending(target, dial, hello).await?;
    let mut buf = Vec::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        loop {
            match target.kind.inbound(&buf) {
                Inbound::Control { used, reply, ready } => {
                    if let Some(reply) = reply {
                        stream.write_all(reply).await?;
                    }
                    buf.drain(..used);
                    if ready {
                        return Ok((stream, buf));
                    }
                }
                Inbound::Message { used, .. } => {
                    buf.drain(..used);
                }
                Inbound::Error { text, .. } => bail!("{target} refused: {text}"),
                Inbound::Garbage(why) => bail!("{target}: {why}"),
                Inbound::Incomplete => break,
            }
        }
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("{target} did not answer the handshake within 10 s"))??;
        if read == 0 {
            bail!("{target} closed the connection during the handshake");
        }
    }
}

/// What one subscriber saw, and why it stopped if it stopped early.
struct SubscriberOutcome {
    tally: Tally,
    /// When its last message arrived (µs on the shared clock).
    last_us: u64,
    error: Option<String>,
}

/// A probe's publisher number: not a publisher's, never counted.
const PROBE: u32 = u32::MAX;

/// Sends probe messages on `stream` every 10 ms until every subscriber has heard one
/// (within 10 s).
async fn probe(shared: &Shared, stream: &mut BenchStream) -> anyhow::Result<()> {
    let (head, tail) = shared.kind.publish_framing(shared.size);
    let mut message = head;
    write_body(
        &mut message,
        shared.size,
        Stamp {
            publisher: PROBE,
            seq: 0,
            sent_us: 0,
        },
    );
    message.extend_from_slice(tail);
    let all_heard = || shared.heard_probe.iter().all(|h| h.load(Ordering::Relaxed));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !all_heard() {
        if tokio::time::Instant::now() >= deadline {
            let deaf = shared
                .heard_probe
                .iter()
                .filter(|h| !h.load(Ordering::Relaxed))
                .count();
            bail!("{deaf} subscribers never heard the first target within 10 s: are the targets nodes of one cluster?");
        }
        stream.write_all(&message).await?;
        tokio::select! {
            () = shared.probed.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
    }
    Ok(())
}

async fn subscribe(
    shared: &Shared,
    index: usize,
    stream: BenchStream,
    leftover: Vec<u8>,
) -> SubscriberOutcome {
    let mut outcome = SubscriberOutcome {
        tally: Tally::new(shared.counts.len()),
        last_us: 0,
        error: None,
    };
    if let Err(e) = receive(shared, index, stream, leftover, &mut outcome).await {
        outcome.error = Some(format!("{e:#}"));
    }
    outcome
}

async fn receive(
    shared: &Shared,
    index: usize,
    stream: BenchStream,
    leftover: Vec<u8>,
    outcome: &mut SubscriberOutcome,
) -> anyhow::Result<()> {
    let mut taker = Taker::new(shared, index);
    let most = READ_BUFFER.max(2 * (shared.size + 64));
    // TLS 1.3 is read record by record in place; TCP, and TLS 1.2 through rustls, below.
    let mut stream = match stream.into_records(most, &leftover) {
        Ok(records) => return receive_records(&mut taker, records?, outcome).await,
        Err(stream) => stream,
    };
    let mut buf = vec![0; most];
    let mut filled = leftover.len();
    buf[..filled].copy_from_slice(&leftover);
    loop {
        let used = taker.take(&buf[..filled], outcome)?;
        taker.reply(&mut stream).await?;
        if outcome.tally.complete(&shared.counts) {
            return Ok(());
        }
        buf.copy_within(used..filled, 0);
        filled -= used;
        let read = tokio::select! {
            read = stream.read(&mut buf[filled..]) => read?,
            _ = shared.stop.cancelled() => return Ok(()),
        };
        if read == 0 {
            bail!("the server closed the connection");
        }
        filled += read;
    }
}

/// [`receive`] from a TLS 1.3 connection whose records the bench opens itself.
async fn receive_records(
    taker: &mut Taker<'_>,
    mut records: Records,
    outcome: &mut SubscriberOutcome,
) -> anyhow::Result<()> {
    let shared = taker.shared;
    loop {
        let used = taker.take(records.content(), outcome)?;
        records.consume(used);
        if !taker.replies.is_empty() {
            records.write_all(&taker.replies).await?;
            taker.replies.clear();
        }
        if outcome.tally.complete(&shared.counts) {
            return Ok(());
        }
        let more = tokio::select! {
            more = records.fill() => more?,
            _ = shared.stop.cancelled() => return Ok(()),
        };
        if !more {
            bail!("the server closed the connection");
        }
    }
}

/// Takes the complete messages at the start of what a subscriber has read: counts and
/// settles them, and keeps the replies they are owed until [`Taker::reply`].
struct Taker<'a> {
    shared: &'a Shared,
    index: usize,
    window: u64,
    replies: Vec<u8>,
}

impl<'a> Taker<'a> {
    fn new(shared: &'a Shared, index: usize) -> Self {
        Taker {
            shared,
            index,
            window: shared.flows.first().map_or(1, Flow::window),
            replies: Vec::new(),
        }
    }

    /// Returns how many bytes the complete messages at the start of `bytes` take.
    fn take(&mut self, bytes: &[u8], outcome: &mut SubscriberOutcome) -> anyhow::Result<usize> {
        let shared = self.shared;
        let now = micros_since(shared.clock);
        let (mut pos, mut messages) = (0, 0);
        loop {
            match shared.kind.inbound(&bytes[pos..]) {
                Inbound::Message { body, used } => {
                    let body = &bytes[pos + body.start..pos + body.end];
                    match read_stamp(body, shared.size) {
                        Some(stamp) if stamp.publisher == PROBE => {
                            if !shared.heard_probe[self.index].swap(true, Ordering::Relaxed) {
                                shared.probed.notify_one();
                            }
                            pos += used;
                            continue;
                        }
                        Some(stamp) => settle(shared, &mut outcome.tally, stamp, now, self.window),
                        None => outcome.tally.malformed += 1,
                    }
                    messages += 1;
                    pos += used;
                }
                Inbound::Control { used, reply, .. } => {
                    if let Some(reply) = reply {
                        self.replies.extend_from_slice(reply);
                    }
                    pos += used;
                }
                Inbound::Error { text, used } => {
                    shared.error(text);
                    pos += used;
                }
                Inbound::Incomplete => break,
                Inbound::Garbage(why) => bail!("{why}"),
            }
        }
        if messages > 0 {
            outcome.last_us = now;
            shared.delivered.fetch_add(messages, Ordering::Relaxed);
        }
        Ok(pos)
    }

    /// Sends the replies owed so far (NATS's `PONG`s).
    async fn reply(&mut self, stream: &mut BenchStream) -> anyhow::Result<()> {
        if !self.replies.is_empty() {
            stream.write_all(&self.replies).await?;
            self.replies.clear();
        }
        Ok(())
    }
}

fn settle(shared: &Shared, tally: &mut Tally, stamp: Stamp, now: u64, window: u64) {
    if let Some(settled) = tally.record(stamp, now) {
        let flow = &shared.flows[stamp.publisher as usize];
        // Sequence numbers a whole window back were settled long ago (or never sent).
        for seq in settled.start.max(settled.end.saturating_sub(window))..settled.end {
            flow.settle(seq);
        }
    }
}

/// Sends this publisher's share (counting what it has written in `shared.sent`).
async fn publish(
    shared: &Shared,
    id: usize,
    stream: BenchStream,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (answers_tx, mut answers) = mpsc::unbounded_channel();
    let kind = shared.kind;
    let subscribers = shared.subscribers as u64;
    let replies = async {
        let mut buf = Vec::with_capacity(READ_BUFFER);
        loop {
            // Replies are read from `start` on; what is left of a read is moved
            // down once, not after every reply (Redis answers every PUBLISH).
            let mut start = 0;
            while let Some((used, reply)) = kind.reply(&buf[start..]).map_err(anyhow::Error::msg)? {
                start += used;
                match reply {
                    Reply::Ignore => {}
                    Reply::Answer(bytes) => {
                        let _ = answers_tx.send(bytes);
                    }
                    Reply::Receivers(n) if n < subscribers => {
                        shared.short_publishes.fetch_add(1, Ordering::Relaxed);
                    }
                    Reply::Receivers(_) => {}
                    Reply::Error(text) => shared.error(format!("publisher: {text}")),
                }
            }
            buf.drain(..start);
            if reader.read_buf(&mut buf).await? == 0 {
                return anyhow::Ok(());
            }
        }
    };
    let flow = &shared.flows[id];
    let count = shared.counts[id];
    let (head, tail) = kind.publish_framing(shared.size);
    let mut out = Vec::with_capacity(BATCH_BYTES + shared.size + 64);
    let started = tokio::time::Instant::now();
    let mut seq = 0;
    let sending = async {
        while seq < count {
            while let Ok(answer) = answers.try_recv() {
                out.extend_from_slice(answer);
            }
            let due = match rate {
                None => count,
                Some(rate) => count.min((started.elapsed().as_secs_f64() * rate) as u64 + 1),
            };
            let now = micros_since(shared.clock);
            while seq < due && out.len() < BATCH_BYTES && flow.try_claim(seq) {
                out.extend_from_slice(&head);
                let stamp = Stamp {
                    publisher: id as u32,
                    seq,
                    sent_us: now,
                };
                write_body(&mut out, shared.size, stamp);
                out.extend_from_slice(tail);
                seq += 1;
            }
            if !out.is_empty() {
                writer.write_all(&out).await?;
                shared.sent[id].store(seq, Ordering::Relaxed);
                out.clear();
            } else if seq < due {
                tokio::select! {
                    _ = flow.wait_for(seq) => {}
                    Some(answer) = answers.recv() => out.extend_from_slice(answer),
                }
            } else if let Some(rate) = rate {
                let next = started + Duration::from_secs_f64(seq as f64 / rate);
                tokio::time::sleep_until(next).await;
            }
        }
        anyhow::Ok(())
    };
    tokio::pin!(replies);
    tokio::select! {
        sent = sending => sent?,
        read = &mut replies => {
            read?;
            bail!("the server closed the connection");
        }
        _ = shared.stop.cancelled() => return Ok(()),
    }
    // Stay connected (and keep reading replies) until the run ends: closing with
    // unread replies resets the connection, and a server may then discard messages it
    // has received but not yet processed (Redis does).
    tokio::select! {
        read = &mut replies => {
            read?;
            bail!("the server closed the connection");
        }
        _ = shared.stop.cancelled() => Ok(()),
    }
}

fn summarise(
    args: &Args,
    target: &Target,
    shared: &Shared,
    outcomes: Vec<Option<SubscriberOutcome>>,
    started_us: u64,
    connect_time: Duration,
) -> Report {
    let sent: Vec<u64> = shared
        .sent
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .collect();
    let published = sent.iter().sum::<u64>();
    let mut latency = Histogram::<u64>::new(3).expect("valid histogram");
    let (mut delivered, mut lost, mut out_of_order, mut malformed) = (0, 0, 0, 0);
    let (mut last_us, mut short_subscribers) = (started_us, 0);
    let mut first_gap = None;
    for (index, outcome) in outcomes.into_iter().enumerate() {
        let Some(mut outcome) = outcome else {
            short_subscribers += 1;
            continue;
        };
        // Whatever a publisher wrote and this subscriber never saw is lost.
        outcome.tally.finish(&sent);
        let tally = &outcome.tally;
        delivered += tally.received;
        lost += tally.lost;
        out_of_order += tally.out_of_order;
        malformed += tally.malformed;
        last_us = last_us.max(outcome.last_us);
        if tally.lost > 0 {
            short_subscribers += 1;
        }
        if let (None, Some(gap)) = (&first_gap, tally.first_gap) {
            first_gap = Some(SubscriberGap {
                subscriber: index + 1,
                gap,
            });
        }
        if let Some(error) = outcome.error {
            shared.error(format!("subscriber {}: {error}", index + 1));
        }
        for value in outcome.tally.latency.iter_recorded() {
            let _ = latency.record_n(value.value_iterated_to(), u64::from(value.count_at_value()));
        }
    }
    let (errors, error_count) = std::mem::take(&mut *shared.errors.lock().expect("errors lock"));
    Report::new(
        args,
        target,
        super::report::Counts {
            planned: shared.counts.iter().sum::<u64>(),
            published,
            expected: published * args.subs as u64,
            delivered,
            lost,
            out_of_order,
            malformed,
            short_subscribers,
            short_publishes: shared.short_publishes.load(Ordering::Relaxed),
        },
        Duration::from_micros(last_us - started_us),
        connect_time,
        &latency,
        first_gap,
        errors,
        error_count,
    )
}

/// Starts a hub with the default configuration on a free loopback port, on this
/// runtime (the bench and the hub share the machine's cores, as they would anyway).
async fn start_embedded() -> anyhow::Result<(Target, CancellationToken)> {
    let hub = hubcast::Hub::new(hubcast::Config::default());
    let server = hubcast::Server::bind("127.0.0.1:0", hub)
        .await
        .context("starting the embedded hub")?;
    let addr = server.local_addr()?;
    let token = CancellationToken::new();
    tokio::spawn(server.run(token.clone()));
    Ok((
        Target {
            kind: Kind::Hubcast,
            addr: addr.to_string(),
            tls: false,
            path: String::new(),
        },
        token,
    ))
}
