//! TLS with rustls, for the server and the client. The provider is *ring*'s with
//! X25519 from aws-lc-rs (`x25519`) and, on CPUs where aws-lc's AES-GCM is the faster,
//! TLS 1.3's records too (`aead`); ARCHITECTURE.md has the measurements.
//!
//! The server: [`TlsSettings`] names the certificate chain, key and (for mutual TLS)
//! the client CA, as PEM files; [`ServerTls`] holds the rustls config built from them
//! and swaps it on [`ServerTls::reload`] (SIGHUP): new handshakes use the new files,
//! connections already up keep theirs. The server (`Server::with_tls`) accepts TCP connections and
//! runs each handshake in a task of its own (bounded, with a deadline), so a client
//! that stalls its handshake never holds up anyone else's accept.
//!
//! A verified client certificate names an identity: its subject CN, else its first
//! DNS or email SAN (see `auth`).
//!
//! The client: [`client_config`] builds a rustls client config from an optional CA
//! file (else the system's roots) and an optional certificate and key.

mod aead;
mod x25519;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};

use crate::admission::Admission;
use crate::transport::{Listener, PeerInfo, Plain, TcpAcceptor};

/// Most handshakes in progress at once; past it, accepting waits (the kernel's
/// backlog holds the rest).
const MAX_HANDSHAKES: usize = 1024;
/// How long a client may take to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server's TLS files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The certificate chain, PEM (the server's certificate first).
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// For mutual TLS: the CA that signs client certificates, PEM. Clients without a
    /// certificate it signed are refused in the handshake.
    pub client_ca: Option<PathBuf>,
}

/// *ring*'s provider, with AES-128-GCM preferred: as strong as a hub needs, and
/// cheaper per byte than AES-256 (measured in BENCHMARKS.md), as Go's TLS prefers it.
/// X25519 comes from aws-lc-rs (see `x25519`), and so do TLS 1.3's AES-GCM records
/// on CPUs where aws-lc's AES-GCM is the faster (see `aead`).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider_with(aead::wide_aes_gcm()))
}

/// The provider, with TLS 1.3's AES-GCM records from aws-lc-rs if `aws_lc_records`.
fn provider_with(aws_lc_records: bool) -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    // X25519 (the group every client offers first) from aws-lc-rs: see `x25519`.
    for group in &mut provider.kx_groups {
        if group.name() == rustls::NamedGroup::X25519 {
            *group = &x25519::X25519;
        }
    }
    if aws_lc_records {
        for suite in &mut provider.cipher_suites {
            if let Some(swapped) = aead::with_aws_lc_records(*suite) {
                *suite = swapped;
            }
        }
    }
    provider.cipher_suites.sort_by_key(|suite| {
        use rustls::CipherSuite as C;
        match suite.suite() {
            C::TLS13_AES_128_GCM_SHA256 => 0,
            C::TLS13_AES_256_GCM_SHA384 => 1,
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 2,
            _ => 3,
        }
    });
    provider
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{what} {} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("key {}: {e} (expected a PEM private key)", path.display()))
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in read_certs(path, "CA file")? {
        store
            .add(cert)
            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    }
    Ok(store)
}

impl TlsSettings {
    /// Reads the files and builds a server config: TLS 1.2 and 1.3.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or parsed, or a key that does not match the
    /// certificate, named.
    pub fn server_config(&self) -> Result<ServerConfig, String> {
        let certs = read_certs(&self.cert, "certificate")?;
        let key = read_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                        .build()
                        .map_err(|e| format!("--tls-client-ca {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        // Our order of cipher suites, not the client's.
        config.ignore_client_order = true;
        Ok(config)
    }
}

/// The server's TLS config, swapped whole on reload.
#[derive(Clone)]
pub struct ServerTls {
    settings: TlsSettings,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("settings", &self.settings)
            .finish()
    }
}

impl ServerTls {
    /// Reads the files.
    ///
    /// # Errors
    ///
    /// As [`TlsSettings::server_config`].
    pub fn new(settings: TlsSettings) -> Result<Self, String> {
        let config = settings.server_config()?;
        Ok(ServerTls {
            settings,
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Reads the files again; new handshakes use them, open connections keep theirs.
    ///
    /// # Errors
    ///
    /// As [`TlsSettings::server_config`]; the old config stays.
    pub fn reload(&self) -> Result<(), String> {
        let config = self.settings.server_config()?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

/// A TLS stream served by the session loop.
///
/// The session loop's vectored writes go straight to rustls, which seals the slices
/// of one write together, up to 16 KiB per record: small frames share a record
/// without being gathered first. (An earlier layer gathered them into a buffer of
/// its own; that was a second copy of every byte, and the hub spent a quarter less
/// CPU on TLS fan-out without it: docs/performance.md.)
pub(crate) type ServerStream = Plain<Pieces<tokio_rustls::server::TlsStream<TcpStream>>>;

/// Most bytes of one slice handed to rustls: under glibc's `rep movsb` threshold
/// (2,112 bytes on CPUs with fast short `rep movsb`, more on others).
const PIECE: usize = 2048;
/// Most slices handed to rustls at once: 256 KiB in pieces, what its send buffer takes
/// into one write ([`SEND_BUFFER`]).
const MAX_PIECES: usize = 128;

/// How many sealed bytes rustls may hold for one connection (its default is 64 KiB),
/// or `--max-pending` if that is less: what one `writev` of a TLS connection carries
/// at most. At 64 KiB the hub made half as many writes again as for the same fan-out
/// in plain TCP (23,000 against 15,000 for 10 M deliveries to 100 subscribers), and
/// each write is a turn through the kernel's TCP stack: at 256 KiB it made ~16,500,
/// and spent 6-8% less CPU (docs/performance.md). The bytes are held only while the
/// client's socket is full, beside the client's queue, which `--max-pending` bounds.
const SEND_BUFFER: usize = 256 * 1024;

/// The hub's side of a TLS stream: its vectored writes reach rustls in slices of at
/// most [`PIECE`] bytes, and its reads end cleanly where the client ends without
/// `close_notify` (see the `AsyncRead` impl).
///
/// rustls copies every slice of a write into its record before sealing it. The
/// session loop's slices are runs of frames of up to tens of KiB, and glibc copies
/// those with `rep movsb`, which on this machine (an AMD EPYC, glibc 2.36) made the
/// hub spend about 15% more CPU on TLS fan-out than glibc's vector loop does for the
/// same bytes (measured end to end, docs/performance.md). Slices under the threshold
/// take the vector loop; the records rustls seals are the same.
pub(crate) struct Pieces<S>(S);

/// Reads pass through, but for one error: a client whose connection ends without TLS's
/// `close_notify` has closed its side, as a plain client closing its socket has (the
/// end of the stream, then `close` without error). Many clients end so (a Node
/// `tlsSocket.destroy()`, a process that exits), Node's own TLS server treats it so,
/// and nothing is lost by it: a frame cut short by the end is incomplete either way.
impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Pieces<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match std::task::ready!(std::pin::Pin::new(&mut self.0).poll_read(cx, buf)) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => std::task::Poll::Ready(Ok(())),
            other => std::task::Poll::Ready(other),
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Pieces<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.as_mut()
            .poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let mut pieces = [io::IoSlice::new(&[]); MAX_PIECES];
        let mut n = 0;
        for piece in bufs.iter().flat_map(|buf| buf.chunks(PIECE)) {
            if n == MAX_PIECES {
                break;
            }
            pieces[n] = io::IoSlice::new(piece);
            n += 1;
        }
        // The pieces are the slices' bytes in order, so what the inner stream took of
        // them is what was taken of the slices.
        std::pin::Pin::new(&mut self.0).poll_write_vectored(cx, &pieces[..n])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The first byte of a TLS ClientHello record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Answers a client that sent plain bytes to the TLS port with a plain `$error` line,
/// then closes.
async fn tell_plain_client(mut stream: TcpStream) {
    let error = crate::ProtocolError::new(
        crate::ErrorCode::TlsRequired,
        "this port speaks TLS: connect with TLS (hubcast's --tls, Node's tls.connect)",
    );
    let (reader, writer) = stream.split();
    crate::server::say_and_close(reader, writer, &error.to_frame()).await;
}

/// Accepts TCP connections and hands over those that complete a TLS handshake.
pub(crate) struct TlsListener {
    addr: SocketAddr,
    done: mpsc::Receiver<(ServerStream, PeerInfo)>,
    /// Ends the accepting task when the listener is dropped.
    _stop: tokio_util::sync::DropGuard,
}

impl TlsListener {
    /// Serves `tcp` with `tls`; `admission` (the server's per-address limits) is
    /// decided before each handshake, and `hub` counts the refusals made here.
    pub(crate) fn new(
        tcp: TcpAcceptor,
        tls: ServerTls,
        hub: &crate::Hub,
        admission: &Arc<Admission>,
    ) -> io::Result<Self> {
        let addr = tcp.local_addr()?;
        let (ready, done) = mpsc::channel(64);
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(handshakes(
            tcp,
            tls,
            (hub.clone(), Arc::clone(admission)),
            ready,
            stop.clone(),
        ));
        Ok(TlsListener {
            addr,
            done,
            _stop: stop.drop_guard(),
        })
    }
}

/// Accepts, and runs each handshake in a task (at most [`MAX_HANDSHAKES`] at once,
/// each within [`HANDSHAKE_TIMEOUT`]); completed streams go to `ready`.
///
/// `--max-conns-per-ip` and `--accept-rate` are decided at accept, before the
/// handshake: an admitted connection's ticket counts from then on (so handshakes in
/// progress count as open), and a refused one is handshaken only to be told why
/// (the first few per address per second: `admission::ANSWERED_TLS_REFUSALS`); past
/// those it is closed at once, so that one address cannot make the hub run a
/// handshake per attempt.
async fn handshakes(
    mut tcp: TcpAcceptor,
    tls: ServerTls,
    (hub, admission): (crate::Hub, Arc<Admission>),
    ready: mpsc::Sender<(ServerStream, PeerInfo)>,
    stop: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let send_buffer = SEND_BUFFER.min(hub.config().limits.max_pending);
    loop {
        let slot = tokio::select! {
            _ = stop.cancelled() => return,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else {
            return;
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = Listener::accept(&mut tcp) => accepted,
        };
        let (stream, mut peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        match admission.admit(peer.addr.ip()) {
            Err(refusal) if !admission.answer_refusal(peer.addr.ip()) => {
                hub.refused(peer.addr, crate::server::refusal_error(refusal).1);
                drop(stream);
                continue;
            }
            decided => peer.admission = Some(Box::new(decided)),
        }
        let acceptor = tls.acceptor();
        let ready = ready.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                // A plain client (JSON, where a TLS record should start) is told so in
                // words it can read, instead of a handshake failure it cannot.
                let mut first = [0u8; 1];
                if stream.peek(&mut first).await.is_ok_and(|n| n == 1) && first[0] != TLS_HANDSHAKE
                {
                    tell_plain_client(stream).await;
                    return Err(io::Error::other("the client does not speak TLS"));
                }
                acceptor.accept(stream).await
            })
            .await;
            drop(slot);
            let stream = match handshake {
                Ok(Ok(mut stream)) => {
                    stream.get_mut().1.set_buffer_limit(Some(send_buffer));
                    stream
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer.addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer.addr, "TLS handshake timed out");
                    return;
                }
            };
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| certificate_name(cert))
                .map(String::into_boxed_str);
            let peer = PeerInfo {
                certificate,
                kind: crate::metrics::TransportKind::Tls,
                ..peer
            };
            let _ = ready.send((Plain(Pieces(stream)), peer)).await;
        });
    }
}

impl Listener for TlsListener {
    type Stream = ServerStream;
    const KIND: crate::metrics::TransportKind = crate::metrics::TransportKind::Tls;

    async fn accept(&mut self) -> io::Result<(ServerStream, PeerInfo)> {
        match self.done.recv().await {
            Some(accepted) => Ok(accepted),
            None => Err(io::Error::other("the TLS accept task ended")),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// The identity a client certificate names: its subject's CN, else its first DNS or
/// email SAN.
pub(crate) fn certificate_name(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    if let Some(cn) = parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = parsed.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(n) | GeneralName::RFC822Name(n) => Some(n.to_string()),
        _ => None,
    })
}

/// A client config: trusting `ca` (PEM) if given, else the system's roots; presenting
/// `identity` (certificate chain and key, PEM) if given, for mutual TLS.
///
/// # Errors
///
/// A file that cannot be read or parsed, named; no roots at all.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = match ca {
        Some(path) => roots(path)?,
        None => {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err("no CA given (--ca) and no system root certificates found".into());
            }
            store
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert, "certificate")?, read_key(key)?)
            .map_err(|e| format!("--cert/--key: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Connects TLS over `stream` to `host` (the name the certificate must carry).
pub(crate) async fn connect(
    config: Arc<ClientConfig>,
    host: &str,
    stream: TcpStream,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncWrite, AsyncWriteExt};

    use super::*;

    /// Takes at most `limit` bytes per write, as a stream with a full buffer does, and
    /// keeps the length of every slice it is handed.
    struct Recorder {
        bytes: Vec<u8>,
        slices: Vec<usize>,
        limit: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut taken = 0;
            for buf in bufs {
                self.slices.push(buf.len());
                let n = buf.len().min(self.limit - taken);
                self.bytes.extend_from_slice(&buf[..n]);
                taken += n;
            }
            Poll::Ready(Ok(taken))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn vectored_writes_reach_the_stream_in_small_pieces_whole_and_in_order() {
        let frames: Vec<Vec<u8>> = [100usize, 5_000, PIECE, PIECE + 1, 300_000]
            .iter()
            .enumerate()
            .map(|(f, &len)| (0..len).map(|i| ((i + f) % 251) as u8).collect())
            .collect();
        let mut stream = Pieces(Recorder {
            bytes: Vec::new(),
            slices: Vec::new(),
            limit: 30_000,
        });
        let mut slices: Vec<io::IoSlice<'_>> = frames.iter().map(|f| io::IoSlice::new(f)).collect();
        let mut rest = &mut slices[..];
        let mut writes = 0;
        while !rest.is_empty() {
            let n = stream.write_vectored(rest).await.unwrap();
            assert!(n > 0, "a write took nothing");
            io::IoSlice::advance_slices(&mut rest, n);
            writes += 1;
        }
        let recorder = stream.0;
        assert_eq!(
            recorder.bytes,
            frames.concat(),
            "bytes lost, repeated or reordered"
        );
        assert!(
            recorder.slices.iter().all(|&len| len <= PIECE),
            "a slice over {PIECE} bytes: {:?}",
            recorder.slices.iter().max()
        );
        // 307 KiB at most 128 KiB (64 pieces) and 30,000 bytes per write.
        assert!(writes >= 11, "{writes} writes");
    }

    /// Moves what `from` has to send into `to`, and has `to` process it; returns the
    /// plaintext `to` received.
    fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Vec<u8> {
        use std::io::Read;
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let (mut rest, mut plain) = (&wire[..], Vec::new());
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets().unwrap();
            match to.reader().read_to_end(&mut plain) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => panic!("{other:?}"),
            }
        }
        plain
    }

    fn send(from: &mut rustls::Connection, to: &mut rustls::Connection, data: &[u8]) {
        std::io::Write::write_all(&mut from.writer(), data).unwrap();
        let got = pump(from, to);
        assert!(
            got == data,
            "{} bytes came out as {}",
            data.len(),
            got.len()
        );
    }

    #[test]
    fn aws_lc_records_and_ring_s_interoperate_in_both_directions() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ours =
            aead::with_aws_lc_records(rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256)
                .unwrap();
        for (server_aws_lc, client_aws_lc) in [(true, false), (false, true), (true, true)] {
            let server =
                ServerConfig::builder_with_provider(Arc::new(provider_with(server_aws_lc)))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(
                        vec![cert.der().clone()],
                        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                    )
                    .unwrap();
            let mut roots = RootCertStore::empty();
            roots.add(cert.der().clone()).unwrap();
            let client =
                ClientConfig::builder_with_provider(Arc::new(provider_with(client_aws_lc)))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut client: rustls::Connection =
                rustls::ClientConnection::new(Arc::new(client), name)
                    .unwrap()
                    .into();
            let mut server: rustls::Connection = rustls::ServerConnection::new(Arc::new(server))
                .unwrap()
                .into();
            let mut rounds = 0;
            while client.is_handshaking() || server.is_handshaking() {
                pump(&mut client, &mut server);
                pump(&mut server, &mut client);
                rounds += 1;
                assert!(rounds < 10, "the handshake does not finish");
            }
            for (side, aws_lc) in [(&client, client_aws_lc), (&server, server_aws_lc)] {
                let suite = side.negotiated_cipher_suite().unwrap();
                assert_eq!(suite.suite(), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
                let records = suite.tls13().unwrap().aead_alg;
                assert_eq!(
                    std::ptr::addr_eq(records, ours.tls13().unwrap().aead_alg),
                    aws_lc,
                    "the side's records are not the ones its provider names"
                );
            }
            // Small and empty-ish records, a full 16 KiB one, and a write rustls cuts
            // into three records; both ways, in sequence (each record's nonce differs).
            for len in [1, 150, 16_384, 40_000] {
                let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
                send(&mut client, &mut server, &data);
                send(&mut server, &mut client, &data);
            }
        }
    }
}
