//! The transport seam: where connections come from ([`Listener`]) and what the
//! session loop reads and writes ([`Transport`]).
//!
//! The session loop (`connection.rs`) serves any [`Transport`]: a stream that splits
//! into a read half ([`Source`]) and a write half (`AsyncWrite`). Plain TCP is one; a
//! TLS stream (rustls over TCP) or a WebSocket adapter is another, and plugs in here
//! without touching the loop: its listener accepts, does its handshake, and hands over
//! the stream with a [`PeerInfo`] saying who is on the other end.
//!
//! TCP keeps one refinement of its own: its read half can wait for readiness without a
//! buffer ([`Source::WAITS_UNBUFFERED`]), which is what keeps an idle connection at a
//! few KiB. Streams that cannot (any stream served through `tokio::io::split`) keep
//! their buffer while they wait, and are otherwise served the same way.

use std::future::Future;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};

use crate::connection::Source;

/// TCP keepalive for every client socket: first probe after 60 s of silence, then
/// every 10 s; 5 unanswered probes and the kernel reports the connection dead.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(5);

/// A transport-level violation (a WebSocket frame over the limit, invalid UTF-8, a
/// protocol error), carried in the `io::Error` its read returns: the connection tells
/// the client with a `$error` and closes, as for a frame over the limit on TCP, and the
/// transport closes in its own way (a WebSocket close code).
#[derive(Debug)]
pub(crate) struct Violation {
    pub(crate) code: crate::ErrorCode,
    pub(crate) message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Violation {}

/// Who is on the other end of a connection, as its listener established it.
#[derive(Debug)]
pub(crate) struct PeerInfo {
    /// The peer's address.
    pub(crate) addr: SocketAddr,
    /// The name a verified TLS client certificate gives (its subject CN, else its
    /// first DNS or email SAN).
    /// (A `Box<str>`, not a `String`: what a connection's task carries is kept small.)
    pub(crate) certificate: Option<Box<str>>,
    /// How it reached the hub.
    pub(crate) kind: crate::metrics::TransportKind,
    /// Admission, if the listener decided it already (TLS decides before its
    /// handshake, so that a refused address costs no handshake); else the accept
    /// loop decides.
    /// (Boxed: every connection's task carries its `PeerInfo`.)
    pub(crate) admission: Option<Box<Result<crate::admission::Ticket, crate::admission::Refusal>>>,
}

impl PeerInfo {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        PeerInfo {
            addr,
            certificate: None,
            kind: crate::metrics::TransportKind::Tcp,
            admission: None,
        }
    }
}

/// A connected stream the session loop can serve.
pub(crate) trait Transport: Send + 'static {
    /// The read half, borrowed from the stream.
    type Reader<'a>: Source + Send
    where
        Self: 'a;
    /// The write half, borrowed from the stream.
    type Writer<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    /// Splits the stream for one task to read and write at once.
    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);

    /// After the session loop ended (and shut the write side down): what the
    /// transport does before the socket is dropped. The default does nothing.
    fn finish(&mut self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// Writes `line` if the stream can take it at once, never waiting, then drops the
    /// stream: for a refusal when the hub cannot spare a task to wait. The default
    /// only drops it.
    fn write_now_and_close(self, line: &[u8])
    where
        Self: Sized,
    {
        let _ = line;
    }
}

impl Transport for TcpStream {
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        TcpStream::split(self)
    }

    fn write_now_and_close(self, line: &[u8]) {
        // A new socket's send buffer has room for one short line.
        if let Ok(stream) = self.into_std() {
            let _ = (&stream).write(line);
        }
    }
}

/// Any `AsyncRead + AsyncWrite` stream, served through `tokio::io::split`; it keeps
/// its read buffer while it waits. TLS streams are served this way (and, in the
/// tests, an in-memory pipe).
#[derive(Debug)]
pub(crate) struct Plain<S>(pub(crate) S);

impl<S> Transport for Plain<S>
where
    S: tokio::io::AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Reader<'a> = tokio::io::ReadHalf<&'a mut S>;
    type Writer<'a> = tokio::io::WriteHalf<&'a mut S>;

    fn split(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(&mut self.0)
    }
}

/// Where connections come from: accepts them (after any handshake) with who they are.
pub(crate) trait Listener: Send + 'static {
    /// The streams it hands over.
    type Stream: Transport;

    /// How its connections reach the hub (for metrics).
    const KIND: crate::metrics::TransportKind = crate::metrics::TransportKind::Tcp;

    /// The next connection. Errors that concern only that connection are retried by
    /// the server; others back off.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, PeerInfo)>> + Send;

    /// The address it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// A TCP listener whose accepted sockets get the hub's options: no Nagle delay (writes
/// are batched already; Nagle would only add latency) and [`KEEPALIVE`] (finds peers
/// that vanished without a FIN: a pulled cable, a crashed host).
///
/// Linux gives an accepted socket the options of the socket that listened, so there
/// they are set once, on the listener, instead of five system calls per connection
/// (a tenth of the hub's system calls for a connect over TLS). Elsewhere, or if the
/// listener refuses them, each accepted socket gets them.
#[derive(Debug)]
pub(crate) struct TcpAcceptor {
    listener: TcpListener,
    /// Whether each accepted socket still needs the options set.
    per_connection: bool,
}

impl TcpAcceptor {
    pub(crate) fn new(listener: TcpListener) -> Self {
        let inherited =
            cfg!(target_os = "linux") && set_options(socket2::SockRef::from(&listener)).is_ok();
        TcpAcceptor {
            listener,
            per_connection: !inherited,
        }
    }
}

fn set_options(socket: socket2::SockRef<'_>) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&KEEPALIVE)
}

impl Listener for TcpAcceptor {
    type Stream = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, PeerInfo)> {
        let (stream, addr) = self.listener.accept().await?;
        if self.per_connection {
            let _ = set_options(socket2::SockRef::from(&stream));
        }
        Ok((stream, PeerInfo::new(addr)))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Hub};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    /// Connections handed over in memory: a transport that is not TCP.
    struct InMemory(mpsc::Receiver<(DuplexStream, SocketAddr)>);

    impl Listener for InMemory {
        type Stream = Plain<DuplexStream>;

        async fn accept(&mut self) -> io::Result<(Self::Stream, PeerInfo)> {
            match self.0.recv().await {
                Some((stream, addr)) => Ok((Plain(stream), PeerInfo::new(addr))),
                // Nothing more will come: wait for shutdown.
                None => std::future::pending().await,
            }
        }

        fn local_addr(&self) -> io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
        }
    }

    /// Every accepted socket has the hub's options, whether the listener passed them on
    /// (Linux) or each socket got them. Without them: Nagle's delay on small writes,
    /// and a peer that vanished without a FIN is never noticed.
    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_keepalive() {
        let mut acceptor = TcpAcceptor::new(TcpListener::bind("127.0.0.1:0").await.unwrap());
        let client = TcpStream::connect(acceptor.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = acceptor.accept().await.unwrap();
        assert_eq!(peer.addr, client.local_addr().unwrap());
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 5);
    }

    /// The seam holds: the server's accept loop serves streams that are not TCP, as
    /// peers of each other in one pool, and shuts them down gracefully.
    #[tokio::test]
    async fn the_server_serves_any_stream_its_listener_hands_over() {
        let peers_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = peers_seen.clone();
        let hub = Hub::with_observer(Config::default(), move |event| {
            if let crate::HubEvent::Connection { peer, .. } = event {
                seen.lock().unwrap().push(*peer);
            }
        });
        let (connect, accepted) = mpsc::channel(4);
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(crate::server::accept_loop(
            InMemory(accepted),
            hub.clone(),
            shutdown.clone(),
        ));
        let mut peers = Vec::new();
        for port in [1, 2] {
            let (ours, theirs) = tokio::io::duplex(4096);
            connect
                .send((theirs, SocketAddr::from(([10, 0, 0, 1], port))))
                .await
                .unwrap();
            peers.push(BufReader::new(ours));
        }
        let mut clients = hub.watch_clients();
        clients.wait_for(|&n| n == 2).await.unwrap();
        // Each peer as its listener named it.
        let mut seen = peers_seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(
            seen,
            [1, 2].map(|port| SocketAddr::from(([10, 0, 0, 1], port)))
        );

        peers[0]
            .get_mut()
            .write_all(b"{\"event\":\"hi\",\"payload\":1}")
            .await
            .unwrap();
        let mut line = String::new();
        peers[1].read_line(&mut line).await.unwrap();
        assert_eq!(line, "{\"event\":\"hi\",\"payload\":1}\n");

        shutdown.cancel();
        server.await.unwrap();
        assert_eq!(hub.clients(), 0);
    }
}
