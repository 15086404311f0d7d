//! TLS 1.3 subscribers that open their records where the socket put them.
//!
//! rustls (0.23) reads a connection into a buffer of its own and copies each record it
//! opens into another (its reader's queue of plaintext, one allocation per record):
//! two copies of every byte a subscriber receives, in a client that shares the
//! machine's cores with the server it measures. So once the handshake is over, a
//! subscriber takes the connection's traffic secrets from rustls and opens its records
//! itself, in place, with the negotiated suite's own decrypter (the `MessageDecrypter`
//! rustls would have used): the kernel's copy is the only one, as for a plain
//! subscriber, and the messages are read as contiguous text.
//!
//! [`Gate`] makes the hand-over safe: it feeds rustls at most one record per read, so
//! when rustls yields plaintext it has just finished a record and holds no part of the
//! next one. Everything it holds after that is in [`Gate`]'s buffer, which
//! [`Records`] starts from.
//!
//! What rustls would do after the handshake and [`Records`] does too: open records
//! with the sequence numbers in order, refuse a damaged one, end at `close_notify`,
//! report any other alert. What it does not: resume sessions from the tickets the
//! server sends (they are skipped; only the connects measurement resumes, and it keeps
//! rustls), follow a `KeyUpdate` (an error naming it: rustls's server sends one only
//! after 2^24 records on one connection), or speak TLS 1.2 (such connections keep
//! rustls's reader).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use anyhow::{anyhow, bail, Context as _};
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A record's header: type, version, length.
const HEADER: usize = 5;
/// The longest TLS 1.3 record on the wire: 2^14 bytes of content, a type byte and up to
/// 255 bytes of padding and tag (RFC 8446 §5.2).
const MAX_RECORD: usize = HEADER + (1 << 14) + 256;
/// The most content one record carries.
const MAX_CONTENT: usize = 1 << 14;
/// How much [`Gate`] reads from its socket at once: rustls asks for 4 KiB at a time,
/// so a 16 KiB record would take four or five `recv` calls.
const READ_AHEAD: usize = 32 * 1024;
/// The handshake message type of a `KeyUpdate` (RFC 8446 §4).
const KEY_UPDATE: u8 = 24;

/// The length of the record whose header starts `bytes`.
fn record_len(bytes: &[u8]) -> usize {
    HEADER + usize::from(u16::from_be_bytes([bytes[3], bytes[4]]))
}

/// A socket read ahead into a buffer, from which each read takes bytes of one record
/// only (see the module's documentation).
pub struct Gate<S> {
    io: S,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes of the current record not yet handed out (0: a header comes next).
    record_left: usize,
}

impl<S> Gate<S> {
    pub fn new(io: S) -> Self {
        Gate {
            io,
            buf: vec![0; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
            record_left: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let held = this.end - this.start;
            if this.record_left == 0 && held >= HEADER {
                this.record_left = record_len(&this.buf[this.start..this.end]);
            }
            if this.record_left > 0 && held > 0 {
                let n = held.min(this.record_left).min(out.remaining());
                out.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                this.record_left -= n;
                return Poll::Ready(Ok(()));
            }
            // Fewer bytes than a header (perhaps none): read more, after them.
            this.buf.copy_within(this.start..this.end, 0);
            this.end = held;
            this.start = 0;
            let mut free = ReadBuf::new(&mut this.buf[this.end..]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut free))?;
            let read = free.filled().len();
            if read == 0 {
                // The end of the stream: what is left (a torn header) is rustls's to
                // report.
                let n = held.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.start = n;
                return Poll::Ready(Ok(()));
            }
            this.end += read;
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Gate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A TLS client stream whose reads go through a [`Gate`].
pub type GatedTls = tokio_rustls::client::TlsStream<Gate<TcpStream>>;

/// Whether [`Records`] can take `stream` over: TLS 1.3, nothing left to send.
pub fn can_take_over(stream: &GatedTls) -> bool {
    let conn = stream.get_ref().1;
    matches!(
        conn.negotiated_cipher_suite(),
        Some(SupportedCipherSuite::Tls13(_))
    ) && !conn.wants_write()
        && !conn.is_handshaking()
}

/// A TLS 1.3 connection's records, opened in the buffer they are read into.
///
/// The buffer holds, in order: opened content not yet consumed (`start..content`),
/// a gap left by the headers and tags of opened records, then bytes read and not yet
/// opened (`raw..`). It holds a message and a record and is read into past its
/// length: with 130 KiB zeroed per subscriber, a profile of a 1,000-subscriber run
/// showed ~30 ms more page faults than a plain run's (the same run with this buffer:
/// bench CPU 1.09 → 1.06 s, medians of five, rate unchanged within noise).
pub struct Records {
    io: TcpStream,
    buf: Vec<u8>,
    start: usize,
    content: usize,
    raw: usize,
    /// The longest message the buffer must hold.
    most: usize,
    open: Box<dyn MessageDecrypter>,
    read_seq: u64,
    seal: Box<dyn MessageEncrypter>,
    write_seq: u64,
    /// The server's `close_notify` has been opened: nothing follows.
    closed: bool,
}

impl Records {
    /// Takes `stream` over (see [`can_take_over`]), with room for a message of up to
    /// `most` bytes. `before` is content read from `stream` and not yet consumed; it
    /// comes first in [`Records::content`], then what rustls had opened and not yet
    /// handed out.
    ///
    /// # Errors
    ///
    /// The client config does not allow secret extraction, or the suite's keys cannot
    /// be extracted.
    pub fn take_over(stream: GatedTls, most: usize, before: &[u8]) -> anyhow::Result<Records> {
        let (gate, mut conn) = stream.into_inner();
        let Some(SupportedCipherSuite::Tls13(suite)) = conn.negotiated_cipher_suite() else {
            bail!("records are taken over only from TLS 1.3 connections");
        };
        let mut opened = before.to_vec();
        let mut chunk = [0u8; 4096];
        loop {
            match io::Read::read(&mut conn.reader(), &mut chunk) {
                Ok(0) => break,
                Ok(n) => opened.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("reading what rustls had opened"),
            }
        }
        // The deprecation points kTLS users at a connection that also keeps session
        // tickets and follows key updates; the bench needs neither (module docs).
        #[allow(deprecated)]
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| anyhow!("cannot take the connection's keys from rustls: {e}"))?;
        let keys = |secrets: ConnectionTrafficSecrets| match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
            _ => Err(anyhow!(
                "the negotiated cipher suite is not one the bench opens"
            )),
        };
        let (read_seq, rx) = secrets.rx;
        let (write_seq, tx) = secrets.tx;
        let (rx_key, rx_iv) = keys(rx)?;
        let (tx_key, tx_iv) = keys(tx)?;
        let Gate {
            io,
            buf: ahead,
            start,
            end,
            record_left,
        } = gate;
        debug_assert_eq!(record_left, 0, "the gate stops at record boundaries");
        // Room for the longest message and a record: the start of each is all that is
        // kept from one read to the next.
        let most = most.max(opened.len());
        let mut buf = Vec::with_capacity(most + MAX_RECORD);
        buf.extend_from_slice(&opened);
        buf.extend_from_slice(&ahead[start..end]);
        let content = opened.len();
        let mut records = Records {
            io,
            buf,
            start: 0,
            content,
            raw: content,
            most,
            open: suite.aead_alg.decrypter(rx_key, rx_iv),
            read_seq,
            seal: suite.aead_alg.encrypter(tx_key, tx_iv),
            write_seq,
            closed: false,
        };
        records.open_all()?;
        Ok(records)
    }

    /// The content opened and not yet consumed.
    pub fn content(&self) -> &[u8] {
        &self.buf[self.start..self.content]
    }

    /// Marks the first `n` bytes of [`Records::content`] consumed.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.content - self.start);
        self.start += n;
    }

    /// Reads from the socket and opens the records it completes. Returns `false` at the
    /// end of the stream (the server's `close_notify`, or the socket's end between
    /// records).
    ///
    /// # Errors
    ///
    /// The socket's, a record that does not open (damaged, out of order), an alert, a
    /// key update, the end of the stream inside a record, or a message longer than the
    /// buffer holds.
    pub async fn fill(&mut self) -> anyhow::Result<bool> {
        if self.closed {
            return Ok(false);
        }
        // Move what is left to the front: the start of a message, then the start of a
        // record. Both are short next to a read.
        let content = self.content - self.start;
        if content > self.most {
            bail!("a message is larger than the {} B read buffer", self.most);
        }
        let filled = self.buf.len();
        self.buf.copy_within(self.start..self.content, 0);
        self.buf.copy_within(self.raw..filled, content);
        self.buf.truncate(content + (filled - self.raw));
        self.start = 0;
        self.content = content;
        self.raw = content;
        // What is kept is under a message and a record, so there is room to read (and
        // for the record being read to complete).
        let read = self.io.read_buf(&mut self.buf).await?;
        if read == 0 {
            if self.buf.len() > self.raw {
                bail!("the server closed the connection inside a TLS record");
            }
            return Ok(false);
        }
        self.open_all()?;
        Ok(!self.closed || self.content > self.start)
    }

    /// Opens every complete record read, moving its content after the content before.
    fn open_all(&mut self) -> anyhow::Result<()> {
        while !self.closed && self.buf.len() - self.raw >= HEADER {
            let header = &self.buf[self.raw..self.raw + HEADER];
            let len = record_len(header);
            if len > MAX_RECORD {
                bail!("the server sent a TLS record of {len} B, over TLS 1.3's limit");
            }
            if self.buf.len() - self.raw < len {
                break;
            }
            let (typ, version) = (
                ContentType::from(header[0]),
                ProtocolVersion::from(u16::from_be_bytes([header[1], header[2]])),
            );
            if typ != ContentType::ApplicationData {
                bail!("the server sent a TLS record of type {typ:?} after the handshake");
            }
            let at = self.raw;
            let base = self.buf.as_ptr() as usize;
            let sealed =
                InboundOpaqueMessage::new(typ, version, &mut self.buf[at + HEADER..at + len]);
            let plain = self
                .open
                .decrypt(sealed, self.read_seq)
                .map_err(|e| anyhow!("TLS record {} does not open: {e}", self.read_seq))?;
            self.read_seq += 1;
            // Where the content lies in the buffer (decrypted in place).
            let offset = plain.payload.as_ptr() as usize - base;
            let size = plain.payload.len();
            match plain.typ {
                ContentType::ApplicationData => {
                    self.buf.copy_within(offset..offset + size, self.content);
                    self.content += size;
                }
                ContentType::Handshake => {
                    if handshake_types(&self.buf[offset..offset + size]).any(|t| t == KEY_UPDATE) {
                        bail!("the server updated its TLS keys (KeyUpdate), which the bench's record reader does not follow");
                    }
                    // NewSessionTicket: not kept (module docs).
                }
                ContentType::Alert => {
                    let alert = &self.buf[offset..offset + size];
                    if alert.get(1) == Some(&0) {
                        self.closed = true;
                    } else {
                        bail!(
                            "the server sent a TLS alert ({:?})",
                            rustls::AlertDescription::from(alert.get(1).copied().unwrap_or(0))
                        );
                    }
                }
                other => bail!("the server sent a TLS record holding {other:?}"),
            }
            self.raw += len;
        }
        Ok(())
    }

    /// Seals `data` into records and sends them.
    ///
    /// # Errors
    ///
    /// The socket's, or the sealer's.
    pub async fn write_all(&mut self, data: &[u8]) -> anyhow::Result<()> {
        let mut wire = Vec::with_capacity(data.len() + 32);
        for chunk in data.chunks(MAX_CONTENT) {
            let message = OutboundPlainMessage {
                typ: ContentType::ApplicationData,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(chunk),
            };
            let sealed = self
                .seal
                .encrypt(message, self.write_seq)
                .map_err(|e| anyhow!("cannot seal a TLS record: {e}"))?;
            self.write_seq += 1;
            wire.extend_from_slice(&sealed.encode());
        }
        self.io.write_all(&wire).await?;
        Ok(())
    }
}

/// The types of the handshake messages in `bytes` (each a type, a 3-byte length, the
/// body), as far as they are whole.
fn handshake_types(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        let head = bytes.get(at..at + 4)?;
        let len = usize::from(head[1]) << 16 | usize::from(head[2]) << 8 | usize::from(head[3]);
        at += 4 + len;
        Some(head[0])
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    type ServerSide = tokio_rustls::server::TlsStream<TcpStream>;

    /// A TLS 1.3 connection over loopback: the bench's client side (the project's
    /// client config, gated) and a rustls server.
    async fn connection(name: &str) -> (GatedTls, ServerSide) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ca =
            std::env::temp_dir().join(format!("hubcast-records-{name}-{}.pem", std::process::id()));
        std::fs::write(&ca, cert.pem()).unwrap();
        let client = hubcast::tls::client_config(Some(&ca), None).unwrap();
        std::fs::remove_file(&ca).unwrap();
        let mut client = rustls::ClientConfig::clone(&client);
        client.enable_secret_extraction = true;
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(server))
                .accept(socket)
                .await
                .unwrap()
        });
        let socket = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let client = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, Gate::new(socket))
            .await
            .unwrap();
        (client, accept.await.unwrap())
    }

    /// Reads `len` bytes of content (consuming them), or the error that stops it.
    async fn take(records: &mut Records, len: usize) -> anyhow::Result<Vec<u8>> {
        let mut got = Vec::new();
        while got.len() < len {
            let content = records.content();
            let n = content.len().min(len - got.len());
            got.extend_from_slice(&content[..n]);
            records.consume(n);
            if got.len() < len && !records.fill().await? {
                bail!("the stream ended after {} B of {len}", got.len());
            }
        }
        Ok(got)
    }

    #[tokio::test]
    async fn taken_over_records_carry_on_where_rustls_stopped_both_ways() {
        let (mut client, mut server) = connection("both-ways").await;
        // A short record, then three more, all in the client's socket (loopback) before
        // it reads: read ahead without the gate, rustls would hold part of the second
        // when it hands out the first.
        let next: Vec<u8> = (0..40_000).map(|i| (i * 11 % 253) as u8).collect();
        server.write_all(b"hello, subscriber\n").await.unwrap();
        server.flush().await.unwrap();
        server.write_all(&next).await.unwrap();
        server.flush().await.unwrap();
        // The client has read part of the first record's content; rustls holds the rest.
        let mut first = [0u8; 7];
        client.read_exact(&mut first).await.unwrap();
        assert!(can_take_over(&client));
        let mut records = Records::take_over(client, 64 * 1024, &first).unwrap();
        assert_eq!(
            take(&mut records, 18).await.unwrap(),
            b"hello, subscriber\n"
        );
        assert_eq!(take(&mut records, next.len()).await.unwrap(), next);
        // Records of every size, and writes rustls cuts into several records.
        for len in [1, 150, 16_384, 40_000, 200_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            server.write_all(&data).await.unwrap();
            server.flush().await.unwrap();
            assert_eq!(take(&mut records, len).await.unwrap(), data, "{len} B");
        }
        records.write_all(b"PONG\r\n").await.unwrap();
        let mut pong = [0u8; 6];
        server.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"PONG\r\n");
        // close_notify ends the stream.
        server.shutdown().await.unwrap();
        assert!(!records.fill().await.unwrap());
    }

    #[tokio::test]
    async fn a_key_update_a_damaged_record_or_a_torn_one_is_an_error() {
        let (client, mut server) = connection("key-update").await;
        let mut records = Records::take_over(client, 64 * 1024, &[]).unwrap();
        server.get_mut().1.refresh_traffic_keys().unwrap();
        server.write_all(b"after the update").await.unwrap();
        server.flush().await.unwrap();
        let error = take(&mut records, 16).await.unwrap_err().to_string();
        assert!(error.contains("KeyUpdate"), "{error}");

        let (client, server) = connection("damaged").await;
        let mut records = Records::take_over(client, 64 * 1024, &[]).unwrap();
        let (mut socket, _) = server.into_inner();
        let mut damaged = vec![23, 3, 3, 0, 40];
        damaged.extend_from_slice(&[0x5a; 40]);
        socket.write_all(&damaged).await.unwrap();
        let error = take(&mut records, 1).await.unwrap_err().to_string();
        assert!(error.contains("does not open"), "{error}");

        let (client, server) = connection("torn").await;
        let mut records = Records::take_over(client, 64 * 1024, &[]).unwrap();
        let (mut socket, _) = server.into_inner();
        socket.write_all(&[23, 3, 3, 1, 0, 1, 2, 3]).await.unwrap();
        socket.shutdown().await.unwrap();
        let error = take(&mut records, 1).await.unwrap_err().to_string();
        assert!(error.contains("inside a TLS record"), "{error}");
    }

    #[tokio::test]
    async fn the_gate_never_hands_out_bytes_past_the_end_of_a_record() {
        let mut wire = Vec::new();
        let mut ends = Vec::new();
        for len in [0usize, 10, 5_000, 20_000, 3, 16_640, 1] {
            wire.extend_from_slice(&[23, 3, 3]);
            wire.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
            wire.extend((0..len).map(|i| (i % 256) as u8));
            ends.push(wire.len());
        }
        let mut gate = Gate::new(&wire[..]);
        let mut read = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = gate.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            let (from, to) = (read.len(), read.len() + n);
            assert!(
                !ends.iter().any(|&end| from < end && end < to),
                "a read of {from}..{to} crosses the end of a record"
            );
            read.extend_from_slice(&buf[..n]);
        }
        assert_eq!(read, wire);
    }
}
