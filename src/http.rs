//! The `--http` listener: the WebSocket gateway, Prometheus metrics, health checks and
//! the dashboard, on one port.
//!
//! | path | what |
//! |---|---|
//! | `GET /ws` | WebSocket (RFC 6455; subprotocol `hubcast.v1` echoed when offered): the hub's protocol, one event per text message |
//! | `GET /metrics` | Prometheus text format (with authentication on: an `admin` identity's token as `Authorization: Bearer TOKEN`, or Basic `user:token`) |
//! | `GET /healthz` | `200 {"status":"ok",...}` while the process runs |
//! | `GET /readyz` | `200 {"ready":true,...}` when listening, the store is open and (in a cluster) the backplane connected; `503` otherwise |
//! | `GET /` | the dashboard, a single page embedded in the binary |
//!
//! HTTP is served by hyper, one task per connection (at most [`MAX_HTTP_CONNECTIONS`]
//! at once, each request head within [`HEADER_TIMEOUT`]). A WebSocket upgrade hands the
//! TCP socket itself back (hyper's `Upgraded::downcast`), which the server's accept
//! loop then serves like any connection (`ws.rs`): the same limits, admission and
//! shutdown as TCP clients, in the same pool.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::metrics::TransportKind;
use crate::transport::{Listener, PeerInfo};
use crate::ws::WsStream;
use crate::Hub;

/// HTTP connections served at once (WebSocket connections, once upgraded, count
/// against `--max-conns` instead).
pub const MAX_HTTP_CONNECTIONS: usize = 1024;
/// How long a client has to send a request's head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The WebSocket subprotocol the hub speaks.
pub const SUBPROTOCOL: &str = "hubcast.v1";

/// The dashboard: one page, its script and styles inline, no external assets.
static DASHBOARD: &str = include_str!("../assets/dashboard.html");

/// A bound `--http` listener, for [`Server::with_http`](crate::Server::with_http).
///
/// # Examples
///
/// ```no_run
/// use hubcast::{http::Gateway, Config, Hub, Server};
/// # async fn demo() -> std::io::Result<()> {
/// let hub = Hub::new(Config::default());
/// let gateway = Gateway::bind("127.0.0.1:8080").await?;
/// let server = Server::bind("127.0.0.1:3000", hub).await?.with_http(gateway);
/// server.run(tokio_util::sync::CancellationToken::new()).await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Gateway {
    listener: TcpListener,
}

impl Gateway {
    /// Binds `addr` (port 0 picks a free port).
    ///
    /// # Errors
    ///
    /// The bind error, such as the address being in use.
    pub async fn bind(addr: impl ToSocketAddrs) -> io::Result<Self> {
        Ok(Gateway {
            listener: crate::server::bind_listener(addr).await?,
        })
    }

    /// The address it listens on.
    ///
    /// # Errors
    ///
    /// When the socket cannot report its address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Starts serving HTTP; upgraded WebSocket connections come out of the returned
    /// listener.
    pub(crate) fn listen(self, hub: Hub) -> HttpListener {
        let addr = self.listener.local_addr();
        let (ready, upgraded) = mpsc::channel(256);
        let stop = CancellationToken::new();
        let context = Arc::new(Context {
            hub,
            started: Instant::now(),
            ready,
        });
        tokio::spawn(serve_http(self.listener, context, stop.clone()));
        HttpListener {
            addr,
            upgraded,
            _stop: stop.drop_guard(),
        }
    }
}

/// What every request handler shares.
struct Context {
    hub: Hub,
    started: Instant,
    /// Where upgraded WebSocket connections go (to the server's accept loop).
    ready: mpsc::Sender<(WsStream, PeerInfo)>,
}

/// WebSocket connections, once upgraded, for the server's accept loop.
pub(crate) struct HttpListener {
    addr: io::Result<SocketAddr>,
    upgraded: mpsc::Receiver<(WsStream, PeerInfo)>,
    /// Stops the HTTP side when the accept loop lets go of this listener.
    _stop: tokio_util::sync::DropGuard,
}

impl Listener for HttpListener {
    type Stream = WsStream;
    const KIND: TransportKind = TransportKind::Ws;

    async fn accept(&mut self) -> io::Result<(WsStream, PeerInfo)> {
        match self.upgraded.recv().await {
            Some(accepted) => Ok(accepted),
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.addr {
            Ok(addr) => Ok(*addr),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

async fn serve_http(listener: TcpListener, context: Arc<Context>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let mut listener = crate::transport::TcpAcceptor::new(listener);
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { return };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = Listener::accept(&mut listener) => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let context = Arc::clone(&context);
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request| {
                let context = Arc::clone(&context);
                async move { Ok::<_, Infallible>(route(request, &context, peer.addr)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(peer = %peer.addr, error = %e, "HTTP connection failed");
                    }
                }
                _ = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
            drop(slot);
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn route(mut request: Request<Incoming>, context: &Arc<Context>, peer: SocketAddr) -> Reply {
    let path = request.uri().path();
    let get = matches!(*request.method(), Method::GET | Method::HEAD);
    match path {
        "/ws" | "/healthz" | "/readyz" | "/metrics" | "/" | "/index.html" if !get => {
            let mut reply = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            reply
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            reply
        }
        "/ws" => upgrade(&mut request, context, peer),
        "/healthz" => json(
            StatusCode::OK,
            &serde_json::json!({
                "status": "ok",
                "version": env!("CARGO_PKG_VERSION"),
                "uptime_seconds": context.started.elapsed().as_secs(),
            }),
        ),
        "/readyz" => ready(context),
        "/metrics" => metrics(request.headers(), &context.hub),
        "/" | "/index.html" => {
            let mut reply = Response::new(Full::new(Bytes::from_static(DASHBOARD.as_bytes())));
            let headers = reply.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            headers.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' data:; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:",
                ),
            );
            reply
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /, /ws, /metrics, /healthz or /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

fn json(status: StatusCode, body: &serde_json::Value) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.to_string())));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    reply
}

fn ready(context: &Context) -> Reply {
    // The hub serves only once its store opened (or it has none), and this answer
    // comes from its listener: listening. In a cluster, ready also needs the link to
    // the other nodes.
    let durable = context.hub.durable();
    // A failing store does not make the hub unready: live traffic still flows.
    let store = if !durable.has_streams() {
        "none"
    } else if durable.failures().1 {
        "failing"
    } else {
        "open"
    };
    let (ready, backplane) = match context.hub.backplane_status() {
        None => (true, serde_json::json!("none")),
        Some(link) => (
            link.connected,
            serde_json::json!({
                "engine": link.engine,
                "node": link.node,
                "connected": link.connected,
                "server": link.server,
                "down_since": link.down_since.map(|t| humantime::format_rfc3339_millis(t).to_string()),
            }),
        ),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({
            "ready": ready,
            "listening": true,
            "store": store,
            "backplane": backplane,
        }),
    )
}

/// The handshake (RFC 6455 4.2): checks the request, answers 101, and hands the socket
/// to the accept loop once hyper lets go of it.
fn upgrade(request: &mut Request<Incoming>, context: &Arc<Context>, peer: SocketAddr) -> Reply {
    let headers = request.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return text(
            StatusCode::UPGRADE_REQUIRED,
            "/ws is a WebSocket endpoint: send Upgrade: websocket\n",
        );
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        let mut reply = text(
            StatusCode::UPGRADE_REQUIRED,
            "only WebSocket version 13 is spoken\n",
        );
        reply.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return reply;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing\n");
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let subprotocol = has_token(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    let on_upgrade = hyper::upgrade::on(request);
    let ready = context.ready.clone();
    let max_message = context.hub.config().limits.max_frame;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
            tracing::debug!(%peer, "WebSocket upgrade: not a TCP stream");
            return;
        };
        let stream = WsStream::new(parts.io.into_inner(), max_message, parts.read_buf);
        let peer = PeerInfo {
            kind: TransportKind::Ws,
            ..PeerInfo::new(peer)
        };
        let _ = ready.send((stream, peer)).await;
    });
    let mut reply = Response::new(Full::new(Bytes::new()));
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = reply.headers_mut();
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        out.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if subprotocol {
        out.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    reply
}

/// `/metrics`: with authentication on, only for an `admin` identity.
fn metrics(headers: &HeaderMap, hub: &Hub) -> Reply {
    if let Some(auth) = hub.authenticator() {
        let credentials = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_authorization);
        let admitted = credentials
            .as_ref()
            .and_then(|(user, token)| auth.authenticate(user.as_deref(), token).ok());
        match admitted {
            Some(identity) if identity.permissions.admin => {}
            Some(_) => {
                return text(
                    StatusCode::FORBIDDEN,
                    "permission_denied: /metrics needs an admin identity\n",
                )
            }
            None => {
                let mut reply = text(
                    StatusCode::UNAUTHORIZED,
                    "auth_required: send an admin token as Authorization: Bearer TOKEN\n",
                );
                reply.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"hubcast\""),
                );
                return reply;
            }
        }
    }
    let mut reply = Response::new(Full::new(Bytes::from(render_metrics(hub))));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    reply
}

/// `Bearer TOKEN` → (None, TOKEN); `Basic base64(user:token)` → (Some(user), token).
fn parse_authorization(value: &str) -> Option<(Option<String>, String)> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some((None, rest.trim().to_string()));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, token) = decoded.split_once(':')?;
        let user = (!user.is_empty()).then(|| user.to_string());
        return Some((user, token.to_string()));
    }
    None
}

/// Reads the hub's counters at scrape time.
struct HubCollector(Hub);

impl std::fmt::Debug for HubCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubCollector")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One metric family with a value per label set.
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: impl IntoIterator<Item = (Vec<(&'a str, String)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut values = values.into_iter().peekable();
    if values.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in values {
        let metric = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(metric)?,
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)?,
        }
    }
    Ok(())
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    snapshot: &crate::metrics::HistogramSnapshot,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    // The encoder writes the +Inf bucket itself from `count`.
    let finite: Vec<(f64, u64)> = snapshot
        .buckets
        .iter()
        .copied()
        .filter(|(bound, _)| bound.is_finite())
        .collect();
    metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
        snapshot.sum,
        snapshot.count,
        &finite,
        None,
    )
}

impl Collector for HubCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let hub = &self.0;
        let stats = hub.stats();
        let metrics = hub.metrics();
        let (open, subscriptions, rooms) = hub.gauges();
        family(
            &mut e,
            "hubcast_connections",
            "Clients connected now, by transport.",
            MetricType::Gauge,
            TransportKind::ALL.iter().map(|&k| {
                (
                    vec![("transport", k.as_str().to_string())],
                    open[k as usize],
                )
            }),
        )?;
        family(
            &mut e,
            "hubcast_connections_accepted",
            "Connections accepted into the pool, by transport.",
            MetricType::Counter,
            TransportKind::ALL.iter().map(|&k| {
                (
                    vec![("transport", k.as_str().to_string())],
                    metrics
                        .transport(k)
                        .accepted
                        .load(std::sync::atomic::Ordering::Relaxed),
                )
            }),
        )?;
        let at_limit = stats
            .refused
            .saturating_sub(stats.refused_per_ip + stats.refused_accept_rate);
        family(
            &mut e,
            "hubcast_connections_refused",
            "Connections refused, by reason.",
            MetricType::Counter,
            [
                ("max_conns", at_limit),
                ("max_conns_per_ip", stats.refused_per_ip),
                ("accept_rate", stats.refused_accept_rate),
            ]
            .map(|(reason, n)| (vec![("reason", reason.to_string())], n)),
        )?;
        counter(
            &mut e,
            "hubcast_events_received",
            "Valid events received from clients.",
            stats.events,
        )?;
        counter(
            &mut e,
            "hubcast_deliveries",
            "Events queued to receivers (one event to ten clients is ten).",
            stats.deliveries,
        )?;
        counter(
            &mut e,
            "hubcast_received_bytes",
            "Bytes received from clients.",
            metrics.bytes_in.sum(),
        )?;
        counter(
            &mut e,
            "hubcast_sent_bytes",
            "Bytes sent to clients.",
            metrics.bytes_out.sum(),
        )?;
        counter(
            &mut e,
            "hubcast_rejected_frames",
            "Frames answered with a $error, all codes.",
            stats.rejected,
        )?;
        family(
            &mut e,
            "hubcast_errors",
            "$error frames sent, by error code.",
            MetricType::Counter,
            metrics
                .rejected_by_code()
                .into_iter()
                .map(|(code, n)| (vec![("code", code.as_str().to_string())], n)),
        )?;
        counter(
            &mut e,
            "hubcast_slow_consumers",
            "Clients disconnected as slow consumers.",
            stats.slow_consumers,
        )?;
        counter(
            &mut e,
            "hubcast_dropped_events",
            "Deliveries discarded under --slow-consumer drop.",
            stats.dropped,
        )?;
        counter(
            &mut e,
            "hubcast_throttled",
            "Times a connection over --max-rate or --max-bytes-rate was paused.",
            stats.throttled,
        )?;
        counter(
            &mut e,
            "hubcast_auth_failures",
            "Failed authentications.",
            stats.auth_failed,
        )?;
        counter(
            &mut e,
            "hubcast_permission_denied",
            "Requests refused permission_denied.",
            stats.permission_denied,
        )?;
        counter(
            &mut e,
            "hubcast_inbound_waits",
            "Times a connection waited for --max-inbound-memory.",
            stats.inbound_waits,
        )?;
        gauge(
            &mut e,
            "hubcast_inbound_memory_bytes",
            "Bytes held in read buffers now.",
            hub.inbound_memory() as i64,
        )?;
        gauge(
            &mut e,
            "hubcast_subscriptions",
            "Subscription patterns held by clients.",
            subscriptions as i64,
        )?;
        gauge(
            &mut e,
            "hubcast_rooms",
            "Rooms with at least one member.",
            rooms as i64,
        )?;
        family(
            &mut e,
            "hubcast_events_by_name",
            "Events received, by name: the first 100 names seen, the rest as \"other\".",
            MetricType::Counter,
            metrics
                .names()
                .into_iter()
                .map(|(name, n)| (vec![("event", name)], n)),
        )?;
        histogram(
            &mut e,
            "hubcast_fanout_seconds",
            "Time to queue an event (or a run of events) to every receiver.",
            &metrics.latency(),
        )?;
        if let Some(link) = hub.backplane_status() {
            let node = || {
                vec![
                    ("engine", link.engine.to_string()),
                    ("node", link.node.clone()),
                ]
            };
            family(
                &mut e,
                "hubcast_backplane_connected",
                "1 while the link to the other nodes (the cluster's backplane) is up.",
                MetricType::Gauge,
                [(node(), u64::from(link.connected))],
            )?;
            family(
                &mut e,
                "hubcast_backplane_events",
                "Events handed to the other nodes (out) and received from them (in).",
                MetricType::Counter,
                [
                    (vec![("direction", "out".to_string())], link.published),
                    (vec![("direction", "in".to_string())], link.received),
                ],
            )?;
            counter(
                &mut e,
                "hubcast_backplane_dropped",
                "Events not handed to the other nodes: the link was down or its buffer full.",
                link.dropped,
            )?;
            counter(
                &mut e,
                "hubcast_backplane_rejected",
                "Backplane messages that were not valid events of their subject.",
                link.rejected,
            )?;
            counter(
                &mut e,
                "hubcast_backplane_reconnects",
                "Times the link to the backplane was lost and made again.",
                link.reconnects,
            )?;
            gauge(
                &mut e,
                "hubcast_backplane_subscriptions",
                "Subscriptions this node holds in the backplane for its clients.",
                link.subscriptions as i64,
            )?;
        }
        let durable = hub.durable();
        if durable.has_streams() {
            let (streams, consumers) = durable.live_info();
            let (failures, failing) = durable.failures();
            counter(
                &mut e,
                "hubcast_store_failures",
                "Appends and reads the store failed (each answered storage or logged).",
                failures,
            )?;
            gauge(
                &mut e,
                "hubcast_store_failing",
                "1 while the store is failing: the last append or read failed and none succeeded since.",
                i64::from(failing),
            )?;
            family(
                &mut e,
                "hubcast_stream_last_seq",
                "The last seq stored in each stream.",
                MetricType::Gauge,
                streams
                    .into_iter()
                    .map(|(name, seq)| (vec![("stream", name)], seq)),
            )?;
            let per_consumer = |pick: fn(&crate::store::ConsumerInfo) -> u64| {
                consumers
                    .iter()
                    .map(move |c| {
                        (
                            vec![("stream", c.stream.clone()), ("consumer", c.name.clone())],
                            pick(c),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            family(
                &mut e,
                "hubcast_consumer_pending",
                "Events a consumer has not acknowledged yet (delivered or not).",
                MetricType::Gauge,
                per_consumer(|c| c.pending),
            )?;
            family(
                &mut e,
                "hubcast_consumer_ack_pending",
                "Deliveries out and waiting for their ack.",
                MetricType::Gauge,
                per_consumer(|c| c.in_flight),
            )?;
            family(
                &mut e,
                "hubcast_consumer_ack_floor",
                "Every seq up to this one is acknowledged.",
                MetricType::Gauge,
                per_consumer(|c| c.ack_floor),
            )?;
            family(
                &mut e,
                "hubcast_consumer_acked",
                "Acks received.",
                MetricType::Counter,
                per_consumer(|c| c.acked),
            )?;
            family(
                &mut e,
                "hubcast_consumer_redelivered",
                "Deliveries that were a second or later attempt.",
                MetricType::Counter,
                per_consumer(|c| c.redelivered),
            )?;
            family(
                &mut e,
                "hubcast_consumer_dead_lettered",
                "Events moved to the dead-letter stream.",
                MetricType::Counter,
                per_consumer(|c| c.dead_lettered),
            )?;
            if let Some(store) = durable.segment_log() {
                let commits = store.commit_stats();
                histogram(
                    &mut e,
                    "hubcast_store_commit_seconds",
                    "Time per group commit (write, and fsync with --fsync always).",
                    &commits.latency.snapshot(),
                )?;
                histogram(
                    &mut e,
                    "hubcast_store_batch_events",
                    "Events per group commit.",
                    &commits.batch.snapshot(),
                )?;
            }
        }
        Ok(())
    }
}

/// The hub's metrics in Prometheus text format, as `/metrics` serves them.
pub fn render_metrics(hub: &Hub) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HubCollector(hub.clone())));
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut body, &registry) {
        // Writing to a String fails only if a metric's own encoding does.
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_headers_are_read() {
        assert_eq!(
            parse_authorization("Bearer abc.def"),
            Some((None, "abc.def".to_string()))
        );
        // "ops:s3cret"
        assert_eq!(
            parse_authorization("Basic b3BzOnMzY3JldA=="),
            Some((Some("ops".to_string()), "s3cret".to_string()))
        );
        assert_eq!(parse_authorization("Digest x"), None);
        assert_eq!(parse_authorization("Basic !!"), None);
    }
}
