//! The accept loop and graceful shutdown.
//!
//! [`Server::run`] accepts until its [`CancellationToken`] fires, giving each socket its
//! own task (tracked by a [`TaskTracker`]). Shutdown then runs in two steps so that
//! every event the hub accepted reaches every reader: first all connections stop
//! reading (no new events can enter), then, once none reads, all flush their queues
//! within the drain deadline and close.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, ToSocketAddrs};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::{Admission, Refusal};
use crate::connection::{self, Phases};
use crate::hub::{CloseReason, ConnectionLimit, Hub, HubEvent};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::transport::{Listener, PeerInfo, TcpAcceptor, Transport};

/// The longest pause between retries when `accept` keeps failing (for example
/// when the process is out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Connections the kernel may hold for us before `accept` (it caps this at
/// `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// A bound listener plus the hub it feeds.
///
/// # Examples
///
/// ```no_run
/// use hubcast::{Config, Hub, Server};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn demo() -> std::io::Result<()> {
/// let server = Server::bind("127.0.0.1:3000", Hub::new(Config::default())).await?;
/// println!("Server up on {}", server.local_addr()?);
/// server.run(CancellationToken::new()).await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    hub: Hub,
    /// Serve TLS instead of plain TCP.
    tls: Option<crate::tls::ServerTls>,
    /// Also serve HTTP: the WebSocket gateway, metrics, health and the dashboard.
    http: Option<crate::http::Gateway>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port).
    ///
    /// # Errors
    ///
    /// The bind error, such as the address being in use.
    pub async fn bind(addr: impl ToSocketAddrs, hub: Hub) -> io::Result<Self> {
        Ok(Self::from_listener(bind_listener(addr).await?, hub))
    }

    /// Serves on a listener the caller already bound.
    pub fn from_listener(listener: TcpListener, hub: Hub) -> Self {
        Server {
            listener,
            hub,
            tls: None,
            http: None,
        }
    }

    /// Also serves `gateway`'s HTTP listener (`--http`): WebSocket clients join the
    /// same pool, under the same limits, and shut down with the rest.
    pub fn with_http(mut self, gateway: crate::http::Gateway) -> Self {
        self.hub.metrics().enable();
        self.http = Some(gateway);
        self
    }

    /// Serves TLS (every connection handshakes first) with `tls`'s certificate, which
    /// [`ServerTls::reload`](crate::tls::ServerTls::reload) can swap while serving.
    pub fn with_tls(mut self, tls: crate::tls::ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The address the server listens on.
    ///
    /// # Errors
    ///
    /// When the socket cannot report its address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The hub this server feeds.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Accepts and serves clients until `shutdown` is cancelled, then stops accepting,
    /// lets every connection flush what is queued for it (bounded by the hub's drain
    /// deadline), and returns once all connections have closed.
    pub async fn run(self, shutdown: CancellationToken) {
        let Server {
            listener,
            hub,
            tls,
            http,
        } = self;
        let gate = Gate::new(&hub);
        let http = async {
            if let Some(gateway) = http {
                let listener = gateway.listen(hub.clone());
                accept_into(listener, &hub, &gate, &shutdown).await;
            }
        };
        let tcp = async {
            match tls {
                Some(tls) => {
                    match crate::tls::TlsListener::new(
                        TcpAcceptor::new(listener),
                        tls,
                        &hub,
                        &gate.admission,
                    ) {
                        Ok(listener) => accept_into(listener, &hub, &gate, &shutdown).await,
                        Err(e) => hub.report(|| HubEvent::Error {
                            message: format!("cannot serve TLS: {e}"),
                        }),
                    }
                }
                None => accept_into(TcpAcceptor::new(listener), &hub, &gate, &shutdown).await,
            }
        };
        tokio::join!(tcp, http);
        gate.close(&hub).await;
    }
}

/// What every listener of one server shares: the connection limit, the per-address
/// admission, and the two-step shutdown (so a WebSocket client and a TCP client are
/// drained as one pool).
pub(crate) struct Gate {
    tracker: TaskTracker,
    phases: Phases,
    /// Each connection holds a clone while it reads; `all_stopped` yields `None` once
    /// all of them (and this one) are gone.
    reading: mpsc::Sender<()>,
    all_stopped: mpsc::Receiver<()>,
    /// One permit per connection: taken at accept, given back when it closes.
    slots: Arc<Semaphore>,
    lingering: Arc<Semaphore>,
    admission: Arc<Admission>,
}

impl Gate {
    pub(crate) fn new(hub: &Hub) -> Self {
        let (reading, all_stopped) = mpsc::channel::<()>(1);
        let limits = &hub.config().limits;
        Gate {
            tracker: TaskTracker::new(),
            phases: Phases::default(),
            reading,
            all_stopped,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            lingering: Arc::new(Semaphore::new(MAX_LINGERING_REFUSALS)),
            admission: Admission::new(limits.max_conns_per_ip, limits.accept_rate),
        }
    }

    /// Once every listener stopped accepting: the two-step shutdown the module
    /// describes.
    pub(crate) async fn close(self, hub: &Hub) {
        let Gate {
            tracker,
            phases,
            reading,
            mut all_stopped,
            ..
        } = self;
        tracker.close();
        phases.stop_reading.cancel();
        drop(reading);
        let deadline = hub.config().timeouts.drain;
        // Reading stops at once; the timeout only guards against a bug.
        let _ = tokio::time::timeout(deadline, all_stopped.recv()).await;
        phases.drain.cancel();
        tracker.wait().await;
        hub.report(|| HubEvent::Shutdown);
    }
}

/// Accepts from any [`Listener`] and serves each stream in a task of its own, until
/// `shutdown`; then the two-step shutdown the module describes.
#[cfg(test)]
pub(crate) async fn accept_loop<L: Listener>(listener: L, hub: Hub, shutdown: CancellationToken) {
    let gate = Gate::new(&hub);
    accept_into(listener, &hub, &gate, &shutdown).await;
    gate.close(&hub).await;
}

/// Accepts from `listener` into `gate` until `shutdown`.
async fn accept_into<L: Listener>(
    mut listener: L,
    hub: &Hub,
    gate: &Gate,
    shutdown: &CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        hub.report(|| HubEvent::Listening { addr });
    }
    let Gate {
        tracker,
        phases,
        reading,
        slots,
        lingering,
        admission,
        ..
    } = gate;
    let hub = hub.clone();
    let mut backoff = Duration::ZERO;
    let counts = &hub.metrics().transport(L::KIND).accepted;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, mut peer)) => {
                backoff = Duration::ZERO;
                let decided = match peer.admission.take() {
                    Some(decided) => *decided,
                    None => admission.admit(peer.addr.ip()),
                };
                let ticket = match decided {
                    Ok(ticket) => ticket,
                    Err(refusal) => {
                        let (error, limit) = refusal_error(refusal);
                        refuse_with(&hub, stream, peer.addr, lingering, error, Some(limit));
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(slots).try_acquire_owned() else {
                    refuse(&hub, stream, peer.addr, lingering);
                    continue;
                };
                counts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let task = serve(hub.clone(), stream, peer, phases.clone(), reading.clone());
                tracker.spawn(async move {
                    task.await;
                    drop(slot);
                    drop(ticket);
                });
            }
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(5), MAX_ACCEPT_BACKOFF);
                hub.report(|| HubEvent::Error {
                    message: format!("accept failed: {e}; retrying in {backoff:?}"),
                });
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
    drop(listener);
}

/// The error that tells a refused client why, and the limit it met.
pub(crate) fn refusal_error(refusal: Refusal) -> (ProtocolError, ConnectionLimit) {
    match refusal {
        Refusal::PerIp(e) => (e, ConnectionLimit::PerAddress),
        Refusal::Rate(e) => (e, ConnectionLimit::AcceptRate),
    }
}

/// Binds the first address `addr` resolves to that can be bound (with [`listen`]'s
/// backlog): the TCP port and the `--http` port alike.
pub(crate) async fn bind_listener(addr: impl ToSocketAddrs) -> io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(addr).await? {
        match listen(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

/// Binds and listens with a backlog for bursts of connections. (`TcpListener::bind`
/// uses 128, like std: 1,000 clients connecting at once overflow it, and with SYN
/// cookies the ones that overflow believe they are connected while the hub never
/// sees them.)
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Refusals that may wait (up to [`REFUSAL_LINGER`]) for their client to read why.
const MAX_LINGERING_REFUSALS: usize = 64;
/// How long a refusal waits for its client to close after reading the line.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Tells a connection over the limit why it is closed. Closing a socket whose peer has
/// sent bytes we did not read makes the kernel send a reset, which discards what was
/// not yet transmitted (the line itself, on a slow path): so the refusal writes the
/// line, shuts its side down (FIN after the line), and reads and discards until the
/// client closes, for at most a second, at most 64 at once; past that, a non-blocking
/// write and close.
fn refuse<T: Transport>(hub: &Hub, stream: T, peer: SocketAddr, lingering: &Arc<Semaphore>) {
    let error = ProtocolError::new(
        ErrorCode::TooManyConnections,
        format!(
            "the hub is at its limit of {} connections; try again later",
            hub.config().limits.max_connections
        ),
    );
    refuse_with(
        hub,
        stream,
        peer,
        lingering,
        error,
        Some(ConnectionLimit::Total),
    );
}

/// Tells a connection why it is refused, as [`refuse`] describes; `limit`, when the
/// refusal is at one, is counted and reported.
fn refuse_with<T: Transport>(
    hub: &Hub,
    stream: T,
    peer: SocketAddr,
    lingering: &Arc<Semaphore>,
    error: ProtocolError,
    limit: Option<ConnectionLimit>,
) {
    if let Some(limit) = limit {
        hub.refused(peer, limit);
    }
    let Ok(permit) = Arc::clone(lingering).try_acquire_owned() else {
        stream.write_now_and_close(&error.to_frame());
        return;
    };
    tokio::spawn(async move {
        let mut stream = stream;
        let (reader, writer) = stream.split();
        say_and_close(reader, writer, &error.to_frame()).await;
        drop(permit);
    });
}

/// Writes `line`, shuts this side down (FIN after the line), and reads and discards
/// until the peer closes, so that what it sent meanwhile does not turn the close into
/// a reset that loses the line. Bounded: a peer that neither reads nor closes costs a
/// task and 512 bytes for [`REFUSAL_LINGER`].
pub(crate) async fn say_and_close<R, W>(mut reader: R, mut writer: W, line: &[u8])
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let _ = writer.write_all(line).await;
        let _ = writer.shutdown().await;
        while let Ok(n) = reader.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Errors that concern one incoming connection only, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Serves one connection over any byte stream (an in-memory pipe, a transport of the
/// embedding program's own) as a peer of the hub's other clients, until it ends;
/// authentication, permissions and limits apply as on TCP. The fuzz target for the
/// pre-authentication state drives the hub through it.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use tokio::io::{AsyncReadExt, AsyncWriteExt};
/// let hub = hubcast::Hub::new(hubcast::Config::default());
/// let (mut ours, theirs) = tokio::io::duplex(4096);
/// let task = tokio::spawn(hubcast::serve_connection(hub, theirs, "10.0.0.1:1".parse().unwrap()));
/// ours.write_all(b"{\"event\":\"$ping\",\"payload\":1}\n").await.unwrap();
/// ours.shutdown().await.unwrap();
/// let mut answer = String::new();
/// ours.read_to_string(&mut answer).await.unwrap();
/// assert!(answer.contains("$pong"));
/// task.await.unwrap();
/// # }
/// ```
pub async fn serve_connection<S>(hub: Hub, stream: S, peer: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (reading, _all_stopped) = mpsc::channel::<()>(1);
    serve(
        hub,
        crate::transport::Plain(stream),
        PeerInfo::new(peer),
        Phases::default(),
        reading,
    )
    .await;
}

/// One connection's task: join the pool, serve, and leave whatever happens.
async fn serve<T: Transport>(
    hub: Hub,
    mut stream: T,
    peer: PeerInfo,
    phases: Phases,
    reading: mpsc::Sender<()>,
) {
    // What comes before the connection runs is scoped so that none of it is carried
    // in the task's state for the connection's whole life.
    let (client, session) = {
        let addr = peer.addr;
        let kind = peer.kind;
        let (open, by_certificate) = match certificate_identity(&hub, peer) {
            Ok(found) => found,
            Err(error) => {
                let lingering = Arc::new(Semaphore::new(1));
                refuse_with(&hub, stream, addr, &lingering, error, None);
                return;
            }
        };
        let awaiting_hello = !open && by_certificate.is_none();
        if awaiting_hello {
            // An address that failed recently waits before this attempt is read.
            // Boxed: only such connections pay for the timer's state.
            if let Some(slot) = hub.penalties().slot(addr.ip()) {
                let stop = &phases.stop_reading;
                let waited = Box::pin(async move {
                    tokio::select! {
                        _ = stop.cancelled() => false,
                        _ = tokio::time::sleep_until(slot) => true,
                    }
                });
                if !waited.await {
                    return;
                }
            }
        }
        let client = hub.join(addr, open, kind);
        if let Some(identity) = by_certificate {
            let user = identity.name.clone();
            hub.admit(&client, *identity);
            let id = client.id;
            hub.report(|| HubEvent::Authenticated {
                client: id,
                peer: addr,
                user,
            });
        }
        let session = crate::control::Session::new(addr, awaiting_hello);
        (client, session)
    };
    let mut membership = Membership {
        hub: &hub,
        client: client.id,
        reason: None,
    };
    let (reader, writer) = stream.split();
    let reason = connection::run(&hub, &client, reader, writer, &phases, reading, session).await;
    membership.reason = Some(reason);
    stream.finish().await;
}

/// Whether the hub is open (no authentication), and the identity a verified client
/// certificate names, if any; an error to refuse the connection with when the
/// certificate names no one the hub knows.
fn certificate_identity(
    hub: &Hub,
    peer: PeerInfo,
) -> Result<(bool, Option<Box<crate::auth::Identity>>), ProtocolError> {
    let Some(auth) = hub.authenticator() else {
        return Ok((true, None));
    };
    let Some(name) = peer.certificate else {
        return Ok((false, None));
    };
    match auth.certificate(&name) {
        Ok(identity) => Ok((false, Some(Box::new(identity)))),
        Err(e) => {
            hub.penalties().failed(peer.addr.ip());
            hub.count(|c| &c.auth_failed);
            tracing::debug!(peer = %peer.addr, error = %e, "client certificate refused");
            Err(ProtocolError::new(
                ErrorCode::AuthFailed,
                "the client certificate is not allowed in; closing the connection",
            ))
        }
    }
}

/// Removes the client from the pool when dropped, even if its task panicked.
struct Membership<'a> {
    hub: &'a Hub,
    client: crate::ClientId,
    reason: Option<CloseReason>,
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        let reason = self.reason.take().unwrap_or(CloseReason::Aborted);
        self.hub.leave(self.client, reason);
    }
}
#[cfg(test)]
mod size {
    /// Every connection is a task whose state is `serve`'s future (plus its slot and
    /// admission ticket), in one allocation with tokio's task header, rounded up to
    /// 128 bytes. Up to 1,152 bytes of future, that allocation stays in mimalloc's
    /// 1,280-byte size class; past it, it moves to the 1,536-byte class and every idle
    /// connection costs ~256 B more (measured in issue #13: 3.6-3.8 KB per idle
    /// connection became 4.3 KB when the future grew to 1,216 bytes). Keep what a
    /// connection carries for its whole life small: box what only some need.
    #[test]
    fn a_connection_task_fits_its_allocation_class() {
        let hub = crate::Hub::new(crate::Config::default());
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let serve = super::serve(
                hub.clone(),
                stream,
                crate::transport::PeerInfo::new(addr),
                crate::connection::Phases::default(),
                tx,
            );
            let size = std::mem::size_of_val(&serve);
            assert!(size <= 1_152, "a connection's future is {size} bytes");
        });
    }
}
