//! The WebSocket transport (RFC 6455): a stream the session loop serves like TCP.
//!
//! After the HTTP upgrade (`http.rs`) the hub takes the TCP socket back and serves it
//! through [`WsStream`], which turns WebSocket frames into the byte stream the rest of
//! the hub already speaks, and back:
//!
//! * **In**: the client's frames are read straight into the connection's read buffer
//!   and rewritten in place: headers are cut out, payloads unmasked, and each text
//!   message ends with a newline. A frame header is at least 6 bytes (clients must
//!   mask), so the output never outgrows what was read, and the decoder sees exactly
//!   what a TCP client would have sent: one event per line. UTF-8 is checked as
//!   payloads stream by, across fragments and reads. Pings are answered with pongs;
//!   pings and pongs count as activity for the idle timeout and heartbeats.
//! * **Out**: each line the hub queues becomes one text message; a batch of lines is
//!   encoded into one buffer and written with one `write`, as TCP writes a batch with
//!   one `writev`. The hub's heartbeat (`$ping`) goes out as a WebSocket ping.
//! * **Errors close with the RFC's codes**: a message over `--max-frame` with 1009,
//!   invalid UTF-8 with 1007, a binary message with 1003, a protocol violation
//!   (unmasked frame, reserved bits or opcodes, a bad fragment sequence, an oversized
//!   or fragmented control frame) with 1002. The client's close is echoed.
//!
//! The frame header codec and the handshake's accept key come from `tungstenite`; the
//! buffering is ours, because it is what keeps an idle WebSocket connection at a few
//! KiB (it holds no buffer while it waits, as a TCP connection does not) and lets a
//! batch go out in one write (ARCHITECTURE.md).

use std::io::{self, Cursor, IoSlice};
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::connection::Source;
use crate::protocol::ErrorCode;
use crate::transport::Transport;

/// The hub's heartbeat line, sent to WebSocket clients as a ping frame instead.
const PING_LINE: &[u8] = b"{\"event\":\"$ping\",\"payload\":null}";
/// Most bytes encoded for one write.
const MAX_WRITE: usize = 64 * 1024;
/// How long a connection the hub closed waits for the client to close its side.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// Most bytes of control frames (pongs) waiting for a client that does not read: past
/// it, pings go unanswered (RFC 6455 5.5.3 lets an endpoint answer only the latest),
/// so a client that pings without reading cannot grow the hub's memory.
const MAX_QUEUED_CONTROL: usize = 1024;
/// The longest control frame payload (RFC 6455 5.5).
const MAX_CONTROL: usize = 125;

/// Close codes the hub sends (RFC 6455 7.4.1).
pub(crate) mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// A protocol violation.
    pub const PROTOCOL: u16 = 1002;
    /// A message type the hub does not take (binary).
    pub const UNSUPPORTED: u16 = 1003;
    /// Data inconsistent with the message type (invalid UTF-8 in text).
    pub const INVALID_DATA: u16 = 1007;
    /// A message too big to process.
    pub const TOO_BIG: u16 = 1009;
}

/// A WebSocket connection after its handshake, served like any other stream.
#[derive(Debug)]
pub(crate) struct WsStream {
    tcp: TcpStream,
    inbound: Inbound,
    outbound: Outbound,
    shared: Mutex<Shared>,
}

impl WsStream {
    /// Serves `tcp`, whose handshake is done; `max_message` is `--max-frame`;
    /// `preread` is what the HTTP server read past the handshake (frames a client sent
    /// without waiting for the answer), read first.
    pub(crate) fn new(tcp: TcpStream, max_message: usize, preread: bytes::Bytes) -> Self {
        let mut inbound = Inbound::new(max_message);
        if !preread.is_empty() {
            inbound.preread = Some(Box::new(preread));
        }
        WsStream {
            tcp,
            inbound,
            outbound: Outbound::default(),
            shared: Mutex::new(Shared::default()),
        }
    }
}

impl Transport for WsStream {
    type Reader<'a> = WsReader<'a>;
    type Writer<'a> = WsWriter<'a>;

    fn split(&mut self) -> (WsReader<'_>, WsWriter<'_>) {
        let (read, write) = self.tcp.split();
        (
            WsReader {
                tcp: read,
                state: &mut self.inbound,
                shared: &self.shared,
            },
            WsWriter {
                tcp: write,
                out: &mut self.outbound,
                shared: &self.shared,
            },
        )
    }

    /// The hub closed first: waits (at most [`CLOSE_LINGER`]) for the client's close
    /// frame or end of stream, discarding what comes meanwhile. Dropping a socket with
    /// unread bytes makes the kernel reset it, and a reset can destroy the close frame
    /// (and the `$error` before it) before the client reads them.
    fn finish(&mut self) -> impl std::future::Future<Output = ()> + Send {
        let waiting = !self.inbound.closed || self.inbound.failed.is_some();
        let tcp = &mut self.tcp;
        Box::pin(async move {
            if !waiting {
                return;
            }
            let mut sink = [0u8; 512];
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                use tokio::io::AsyncReadExt;
                while let Ok(n) = tcp.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        })
    }

    fn write_now_and_close(self, line: &[u8]) {
        let mut frame = Vec::with_capacity(line.len() + 16);
        encode_line(trim_newline(line), &mut frame);
        encode_close(close::NORMAL, "", &mut frame);
        if let Ok(stream) = self.tcp.into_std() {
            use std::io::Write;
            let _ = (&stream).write(&frame);
        }
    }
}

/// What the read half tells the write half: control frames to send, and how to close.
#[derive(Debug, Default)]
struct Shared {
    /// Encoded control frames (pongs, the close echo) waiting to be written.
    control: Vec<u8>,
    /// The write half holds encoded bytes it has not finished writing: control frames
    /// must wait for them, or they would land inside a frame.
    writer_busy: bool,
    /// The close code and reason to send when the connection ends, if not normal.
    close: Option<(u16, String)>,
    /// The close frame is written (or queued): nothing more may follow it.
    close_sent: bool,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // The lock is never held across anything that can panic; a poisoned one still
    // holds consistent bytes.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the reader is in the client's frame stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Reading a frame header.
    Header,
    /// Inside a data frame's payload.
    Data,
    /// Inside a control frame's payload.
    Control(Control),
}

#[derive(Debug)]
struct Inbound {
    max_message: usize,
    part: Part,
    /// A header cut by the end of a read.
    head: [u8; 14],
    head_len: u8,
    /// Payload bytes left in the current frame.
    remaining: u64,
    mask: [u8; 4],
    /// The mask offset of the next payload byte.
    mask_at: u8,
    /// The current data frame ends its message.
    fin: bool,
    /// A text message is open (its first frame came; its final one has not).
    in_message: bool,
    /// The open message's length so far.
    message_len: u64,
    /// A UTF-8 sequence cut by the end of a frame or read.
    utf8: [u8; 4],
    utf8_len: u8,
    /// A message ended where the newline had no room (its header came in an earlier
    /// read): written at the next chance.
    owed_newline: bool,
    /// The payload of the control frame being read (at most 125 bytes; empty, with
    /// no allocation, between control frames).
    control: Vec<u8>,
    /// The client sent its close: the stream has ended.
    closed: bool,
    /// A violation, reported on the next read (what came before it is delivered first).
    failed: Option<(u16, String)>,
    /// Bytes read with the handshake, to go through before the socket's.
    preread: Option<Box<bytes::Bytes>>,
}

impl Inbound {
    fn new(max_message: usize) -> Self {
        Inbound {
            max_message,
            part: Part::Header,
            head: [0; 14],
            head_len: 0,
            remaining: 0,
            mask: [0; 4],
            mask_at: 0,
            fin: false,
            in_message: false,
            message_len: 0,
            utf8: [0; 4],
            utf8_len: 0,
            owed_newline: false,
            control: Vec::new(),
            closed: false,
            failed: None,
            preread: None,
        }
    }

    /// Rewrites `data` (bytes just read) in place into the hub's line stream; returns
    /// how many bytes at its front are the output. Stops at a violation or the
    /// client's close, recording it.
    fn rewrite(&mut self, data: &mut [u8], shared: &Mutex<Shared>) -> usize {
        let n = data.len();
        let (mut r, mut w) = (0, 0);
        loop {
            if self.owed_newline && w < r {
                data[w] = b'\n';
                w += 1;
                self.owed_newline = false;
            }
            // An empty frame ends at its header, even at the end of a read.
            let frame_ends = self.part != Part::Header && self.remaining == 0;
            if (r == n && !frame_ends) || self.closed || self.failed.is_some() {
                return w;
            }
            let step = match self.part {
                Part::Header => self.header(&data[r..]).map(|used| {
                    r += used;
                }),
                Part::Data => {
                    let take = (n - r).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    let chunk = &mut data[r..r + take];
                    unmask(chunk, self.mask, &mut self.mask_at);
                    // A chunk that breaks UTF-8 is not passed on.
                    let checked = self.check_utf8(chunk);
                    if checked.is_ok() {
                        data.copy_within(r..r + take, w);
                        w += take;
                    }
                    r += take;
                    self.remaining -= take as u64;
                    checked.and_then(|()| {
                        if self.remaining == 0 {
                            self.part = Part::Header;
                            if self.fin {
                                self.end_message()?;
                                if w < r {
                                    data[w] = b'\n';
                                    w += 1;
                                } else {
                                    self.owed_newline = true;
                                }
                            }
                        }
                        Ok(())
                    })
                }
                Part::Control(op) => {
                    let take = (n - r).min(self.remaining as usize);
                    let chunk = &mut data[r..r + take];
                    unmask(chunk, self.mask, &mut self.mask_at);
                    self.control.extend_from_slice(chunk);
                    r += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.part = Part::Header;
                        // Taken whole: an idle connection keeps no allocation.
                        let payload = std::mem::take(&mut self.control);
                        self.control_frame(op, &payload, shared).map(|heard| {
                            // Pings and pongs are activity: a blank line says so to the
                            // connection's timers (the decoder skips it); not inside a
                            // fragmented message, where it would land inside an event.
                            if heard && w < r && !self.in_message {
                                data[w] = b'\n';
                                w += 1;
                            }
                        })
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(violation) = step {
                self.failed = Some(violation);
            }
        }
    }

    /// Takes header bytes from the front of `data`; returns how many it used.
    fn header(&mut self, data: &[u8]) -> Result<usize, (u16, String)> {
        let had = usize::from(self.head_len);
        let take = (self.head.len() - had).min(data.len());
        self.head[had..had + take].copy_from_slice(&data[..take]);
        let mut cursor = Cursor::new(&self.head[..had + take]);
        let parsed = FrameHeader::parse(&mut cursor)
            .map_err(|e| (close::PROTOCOL, format!("bad frame header: {e}")))?;
        let Some((header, len)) = parsed else {
            self.head_len = (had + take) as u8;
            return Ok(take);
        };
        let used = cursor.position() as usize - had;
        self.head_len = 0;
        self.start_frame(header, len)?;
        Ok(used)
    }

    fn start_frame(&mut self, header: FrameHeader, len: u64) -> Result<(), (u16, String)> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err((
                close::PROTOCOL,
                "reserved bits set (no extension was agreed)".into(),
            ));
        }
        let Some(mask) = header.mask else {
            return Err((close::PROTOCOL, "client frames must be masked".into()));
        };
        self.mask = mask;
        self.mask_at = 0;
        self.remaining = len;
        match header.opcode {
            OpCode::Control(op @ (Control::Close | Control::Ping | Control::Pong)) => {
                if !header.is_final || len > MAX_CONTROL as u64 {
                    return Err((
                        close::PROTOCOL,
                        "control frames must be final and at most 125 bytes".into(),
                    ));
                }
                self.part = Part::Control(op);
            }
            OpCode::Data(Data::Binary) => {
                return Err((
                    close::UNSUPPORTED,
                    "hubcast takes JSON events in text messages, not binary".into(),
                ))
            }
            OpCode::Data(Data::Text | Data::Continue) => {
                let first = header.opcode == OpCode::Data(Data::Text);
                if first == self.in_message {
                    return Err((
                        close::PROTOCOL,
                        if first {
                            "a new message began before the last one ended"
                        } else {
                            "a continuation frame with no message to continue"
                        }
                        .into(),
                    ));
                }
                if first {
                    self.in_message = true;
                    self.message_len = 0;
                }
                self.message_len = self.message_len.saturating_add(len);
                if self.message_len > self.max_message as u64 {
                    return Err((
                        close::TOO_BIG,
                        format!("message over the hub's limit of {} bytes", self.max_message),
                    ));
                }
                self.fin = header.is_final;
                self.part = Part::Data;
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err((close::PROTOCOL, "reserved opcode".into()))
            }
        }
        Ok(())
    }

    fn end_message(&mut self) -> Result<(), (u16, String)> {
        self.in_message = false;
        if self.utf8_len > 0 {
            self.utf8_len = 0;
            return Err((
                close::INVALID_DATA,
                "the message ends inside a UTF-8 character".into(),
            ));
        }
        Ok(())
    }

    /// Checks a chunk of a text message's payload, carrying a character cut at its end.
    fn check_utf8(&mut self, mut chunk: &[u8]) -> Result<(), (u16, String)> {
        let invalid = || {
            (
                close::INVALID_DATA,
                "the text message is not valid UTF-8".to_string(),
            )
        };
        if self.utf8_len > 0 {
            let have = usize::from(self.utf8_len);
            let width = utf8_width(self.utf8[0]);
            let take = (width - have).min(chunk.len());
            self.utf8[have..have + take].copy_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if have + take < width {
                self.utf8_len = (have + take) as u8;
                return Ok(());
            }
            self.utf8_len = 0;
            std::str::from_utf8(&self.utf8[..width]).map_err(|_| invalid())?;
        }
        match std::str::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &chunk[e.valid_up_to()..];
                self.utf8[..tail.len()].copy_from_slice(tail);
                self.utf8_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(invalid()),
        }
    }

    /// Acts on a complete control frame; `true` if it counts as activity.
    fn control_frame(
        &mut self,
        op: Control,
        payload: &[u8],
        shared: &Mutex<Shared>,
    ) -> Result<bool, (u16, String)> {
        match op {
            Control::Ping => {
                let mut shared = lock(shared);
                if !shared.close_sent && shared.control.len() < MAX_QUEUED_CONTROL {
                    encode_frame(OpCode::Control(Control::Pong), payload, &mut shared.control);
                }
                Ok(true)
            }
            Control::Pong => Ok(true),
            Control::Close => {
                let (code, reason) = match payload {
                    [] => (close::NORMAL, ""),
                    [_] => {
                        return Err((close::PROTOCOL, "a close frame with a 1-byte body".into()))
                    }
                    [a, b, rest @ ..] => {
                        let code = u16::from_be_bytes([*a, *b]);
                        let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
                        if !valid {
                            return Err((close::PROTOCOL, format!("invalid close code {code}")));
                        }
                        let Ok(reason) = std::str::from_utf8(rest) else {
                            return Err((
                                close::INVALID_DATA,
                                "the close reason is not UTF-8".into(),
                            ));
                        };
                        (code, reason)
                    }
                };
                tracing::trace!(code, reason, "WebSocket client closed");
                self.closed = true;
                // Echo the close (RFC 6455 5.5.1) when the connection ends.
                lock(shared).close.get_or_insert((code, String::new()));
                Ok(false)
            }
            Control::Reserved(_) => Err((close::PROTOCOL, "reserved opcode".into())),
        }
    }
}

fn utf8_width(first: u8) -> usize {
    match first {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

/// Unmasks `chunk`, whose first byte has mask offset `at`; advances `at`.
fn unmask(chunk: &mut [u8], mask: [u8; 4], at: &mut u8) {
    let start = usize::from(*at);
    let rotated = u32::from_ne_bytes([
        mask[start % 4],
        mask[(start + 1) % 4],
        mask[(start + 2) % 4],
        mask[(start + 3) % 4],
    ]);
    let mut words = chunk.chunks_exact_mut(4);
    for word in &mut words {
        let value = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]) ^ rotated;
        word.copy_from_slice(&value.to_ne_bytes());
    }
    let bytes = rotated.to_ne_bytes();
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= bytes[i];
    }
    *at = ((start + chunk.len()) % 4) as u8;
}

/// The read half: the client's frames, as the hub's line stream.
pub(crate) struct WsReader<'a> {
    tcp: tokio::net::tcp::ReadHalf<'a>,
    state: &'a mut Inbound,
    shared: &'a Mutex<Shared>,
}

impl WsReader<'_> {
    /// What the stream says instead of reading: its end, or the violation that ended it.
    fn ended(&mut self) -> Option<io::Result<()>> {
        if let Some((code, why)) = self.state.failed.take() {
            tracing::debug!(code, %why, "WebSocket protocol error; closing");
            let mut shared = lock(self.shared);
            shared.close = Some((code, why.clone()));
            self.state.closed = true;
            let error = match code {
                close::TOO_BIG => ErrorCode::FrameTooLarge,
                close::INVALID_DATA => ErrorCode::InvalidUtf8,
                close::UNSUPPORTED => ErrorCode::NotAnEvent,
                _ => ErrorCode::InvalidJson,
            };
            let violation = crate::transport::Violation {
                code: error,
                message: format!("WebSocket: {why}; closing ({code})"),
            };
            return Some(Err(io::Error::new(io::ErrorKind::InvalidData, violation)));
        }
        self.state.closed.then_some(Ok(()))
    }

    /// Sends queued control frames now if the write half is not mid-frame.
    fn send_control(&self) {
        let mut shared = lock(self.shared);
        if shared.writer_busy || shared.control.is_empty() {
            return;
        }
        let stream: &TcpStream = self.tcp.as_ref();
        if let Ok(n) = stream.try_write(&shared.control) {
            shared.control.drain(..n);
        }
    }

    /// Rewrites `data`, just read; returns the output length.
    fn rewrite(&mut self, data: &mut [u8]) -> usize {
        let out = self.state.rewrite(data, self.shared);
        self.send_control();
        out
    }

    /// Takes up to `room` bytes of what the handshake read.
    fn take_preread(&mut self, room: usize) -> Option<bytes::Bytes> {
        let preread = self.state.preread.as_mut()?;
        let chunk = preread.split_to(room.min(preread.len()));
        if preread.is_empty() {
            self.state.preread = None;
        }
        Some(chunk)
    }
}

impl AsyncRead for WsReader<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(end) = self.ended() {
                return Poll::Ready(end);
            }
            let before = buf.filled().len();
            if let Some(chunk) = self.take_preread(buf.remaining()) {
                buf.put_slice(&chunk);
            } else {
                ready!(Pin::new(&mut self.tcp).poll_read(cx, buf))?;
            }
            let n = buf.filled().len() - before;
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            let out = self.rewrite(&mut buf.filled_mut()[before..]);
            buf.set_filled(before + out);
            if out > 0 {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl Source for WsReader<'_> {
    const WAITS_UNBUFFERED: bool = true;
    const WANTS_PINGS: bool = true;

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.closed || self.state.failed.is_some() || self.state.preread.is_some() {
            return Poll::Ready(Ok(()));
        }
        let stream: &TcpStream = self.tcp.as_ref();
        stream.poll_read_ready(cx)
    }

    fn try_read_now(
        &mut self,
        buf: &mut bytes::buf::Limit<&mut BytesMut>,
    ) -> Option<io::Result<usize>> {
        Some(loop {
            if let Some(end) = self.ended() {
                break end.map(|()| 0);
            }
            let before = buf.get_ref().len();
            let read = match self.take_preread(buf.limit()) {
                Some(chunk) => {
                    bytes::BufMut::put_slice(buf, &chunk);
                    Ok(chunk.len())
                }
                None => self.tcp.try_read_buf(buf),
            };
            let n = match read {
                Ok(0) => break Ok(0),
                Ok(n) => n,
                Err(e) => break Err(e),
            };
            let inner: &mut BytesMut = buf.get_mut();
            let out = self
                .state
                .rewrite(&mut inner[before..before + n], self.shared);
            inner.truncate(before + out);
            self.send_control();
            if out > 0 {
                break Ok(out);
            }
            // Only control frames: give back what they took, and read on.
            buf.set_limit(buf.limit() + n);
        })
    }
}

/// Encoded frames the write half has not finished writing.
#[derive(Debug, Default)]
struct Outbound {
    buf: Vec<u8>,
    written: usize,
    /// How many bytes of the caller's lines `buf` encodes: reported once it is written.
    consumed: usize,
}

/// The write half: each line the hub writes goes out as one text message.
///
/// A write encodes a batch of whole lines and reports them written only once all
/// their frames are; until then it is `Pending`, and the caller offers the same lines
/// again (the session loop does: its batch changes only by what a write reports).
pub(crate) struct WsWriter<'a> {
    tcp: tokio::net::tcp::WriteHalf<'a>,
    out: &'a mut Outbound,
    shared: &'a Mutex<Shared>,
}

impl WsWriter<'_> {
    /// Writes what is encoded; `Ready` once all of it is.
    /// Writes what is encoded, then any control frames queued meanwhile; `Ready` once
    /// all of it is.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.out.written < self.out.buf.len() {
                let pending = &self.out.buf[self.out.written..];
                match ready!(Pin::new(&mut self.tcp).poll_write(cx, pending)) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(n) => self.out.written += n,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            // A quiet connection holds no buffer.
            self.out.buf = Vec::new();
            self.out.written = 0;
            let mut shared = lock(self.shared);
            if shared.control.is_empty() {
                shared.writer_busy = false;
                return Poll::Ready(Ok(()));
            }
            shared.writer_busy = true;
            self.out.buf = std::mem::take(&mut shared.control);
        }
    }

    /// Starts a buffer: control frames queued by the read half go first.
    fn begin(&mut self) {
        let mut shared = lock(self.shared);
        shared.writer_busy = true;
        self.out.buf.append(&mut shared.control);
    }
}

impl AsyncWrite for WsWriter<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.out.buf.is_empty() {
            if lock(this.shared).close_sent {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the WebSocket is closing",
                )));
            }
            this.begin();
            this.out.consumed = encode_lines(bufs, &mut this.out.buf);
        }
        ready!(this.poll_drain(cx))?;
        Poll::Ready(Ok(std::mem::take(&mut this.out.consumed)))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// Finishes what is being written, sends the close frame (the code a violation or
    /// the client's own close set, else 1000), then shuts TCP down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_drain(cx))?;
            let mut shared = lock(this.shared);
            if shared.close_sent {
                break;
            }
            shared.close_sent = true;
            shared.writer_busy = true;
            let (code, reason) = shared
                .close
                .take()
                .unwrap_or((close::NORMAL, String::new()));
            drop(shared);
            encode_close(code, &reason, &mut this.out.buf);
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

fn trim_newline(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// Encodes the lines in `bufs` as text messages (the heartbeat as a ping), up to about
/// [`MAX_WRITE`] bytes; returns how many input bytes that covers (whole lines only,
/// unless a single line is bigger).
fn encode_lines(bufs: &[IoSlice<'_>], out: &mut Vec<u8>) -> usize {
    let mut consumed = 0;
    for slice in bufs {
        let mut rest: &[u8] = slice;
        while !rest.is_empty() {
            if out.len() >= MAX_WRITE {
                return consumed;
            }
            let (line, take) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], i + 1),
                None => (rest, rest.len()),
            };
            encode_line(line, out);
            consumed += take;
            rest = &rest[take..];
        }
    }
    consumed
}

fn encode_line(line: &[u8], out: &mut Vec<u8>) {
    if line == PING_LINE {
        encode_frame(OpCode::Control(Control::Ping), &[], out);
    } else {
        encode_frame(OpCode::Data(Data::Text), line, out);
    }
}

fn encode_frame(opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    out.reserve(payload.len() + 10);
    // Writing to a Vec cannot fail.
    let _ = header.format(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut body = Vec::with_capacity(2 + reason.len().min(MAX_CONTROL - 2));
    body.extend_from_slice(&code.to_be_bytes());
    // At most 123 bytes of reason, cut on a character boundary.
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    body.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(OpCode::Control(Control::Close), &body, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked, as browsers send them.
    fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn text(payload: &str) -> Vec<u8> {
        client_frame(0x81, payload.as_bytes(), [1, 2, 3, 4])
    }

    /// Feeds `wire` in reads of the given sizes; returns the output and the state.
    fn feed(wire: &[u8], sizes: impl Iterator<Item = usize>) -> (Vec<u8>, Inbound, Shared) {
        let shared = Mutex::new(Shared::default());
        let mut inbound = Inbound::new(1024);
        let mut output = Vec::new();
        let mut rest = wire;
        let mut sizes = sizes;
        while !rest.is_empty() {
            let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
            let mut chunk = rest[..n].to_vec();
            rest = &rest[n..];
            let out = inbound.rewrite(&mut chunk, &shared);
            assert!(out <= n);
            output.extend_from_slice(&chunk[..out]);
        }
        (output, inbound, shared.into_inner().unwrap())
    }

    #[test]
    fn messages_become_lines_however_the_reads_cut_them() {
        let mut wire = text(r#"{"event":"a","payload":1}"#);
        wire.extend(text(r#"{"event":"é","payload":"ü€𝄞"}"#));
        // A fragmented message with a ping between its fragments.
        wire.extend(client_frame(0x01, br#"{"event":"c","#, [9, 8, 7, 6]));
        wire.extend(client_frame(0x89, b"hi", [5, 5, 5, 5]));
        wire.extend(client_frame(0x80, br#""payload":[]}"#, [0, 1, 0, 1]));
        let expected = "{\"event\":\"a\",\"payload\":1}\n{\"event\":\"é\",\"payload\":\"ü€𝄞\"}\n{\"event\":\"c\",\"payload\":[]}\n";
        for size in 1..=wire.len() {
            let (out, state, shared) = feed(&wire, std::iter::repeat(size));
            // Blank lines (pings) and an owed newline may shift; the lines are the same.
            let text = String::from_utf8(out).unwrap();
            let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
            let want: Vec<&str> = expected.lines().collect();
            assert_eq!(lines, want, "reads of {size}");
            assert!(state.failed.is_none());
            // The ping was answered with a pong carrying its payload.
            assert_eq!(shared.control, [0x8A, 2, b'h', b'i'], "reads of {size}");
        }
    }

    /// A client that pings without reading: the pongs waiting for it stay bounded.
    #[test]
    fn a_ping_flood_queues_a_bounded_number_of_pongs() {
        let mut wire = Vec::new();
        for _ in 0..10_000 {
            wire.extend(client_frame(0x89, &[b'p'; 100], [1, 2, 3, 4]));
        }
        let (_, state, shared) = feed(&wire, std::iter::repeat(4096));
        assert!(state.failed.is_none());
        assert!(
            shared.control.len() < MAX_QUEUED_CONTROL + 128,
            "{} bytes of pongs queued",
            shared.control.len()
        );
    }

    #[test]
    fn violations_close_with_the_rfc_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (
                client_frame(0x81, &[b'"', 0xFF, b'"'], [1, 2, 3, 4]),
                close::INVALID_DATA,
            ),
            // A message cut inside a character.
            (
                client_frame(0x81, &[0xE2, 0x82], [1, 2, 3, 4]),
                close::INVALID_DATA,
            ),
            (
                client_frame(0x81, &[b'x'; 1025], [1, 2, 3, 4]),
                close::TOO_BIG,
            ),
            (client_frame(0x82, b"{}", [1, 2, 3, 4]), close::UNSUPPORTED),
            (vec![0x81, 0x02, b'{', b'}'], close::PROTOCOL), // unmasked
            (client_frame(0xC1, b"{}", [1, 2, 3, 4]), close::PROTOCOL), // rsv1
            (client_frame(0x80, b"{}", [1, 2, 3, 4]), close::PROTOCOL), // lone continuation
            (client_frame(0x83, b"{}", [1, 2, 3, 4]), close::PROTOCOL), // reserved opcode
            (client_frame(0x09, b"", [1, 2, 3, 4]), close::PROTOCOL), // fragmented ping
            (
                client_frame(0x88, &[0x03, 0xEC], [1, 2, 3, 4]),
                close::PROTOCOL,
            ), // code 1004
        ];
        for (wire, code) in cases {
            let (_, mut state, _) = feed(&wire, std::iter::empty());
            assert_eq!(state.failed.take().map(|f| f.0), Some(code), "{wire:02x?}");
        }
        // Fragments adding up past the limit.
        let mut wire = client_frame(0x01, &[b' '; 600], [1, 2, 3, 4]);
        wire.extend(client_frame(0x80, &[b' '; 600], [1, 2, 3, 4]));
        let (_, state, _) = feed(&wire, std::iter::empty());
        assert_eq!(state.failed.map(|f| f.0), Some(close::TOO_BIG));
    }

    #[test]
    fn what_came_before_a_violation_is_delivered() {
        let mut wire = text(r#"{"event":"a","payload":1}"#);
        wire.extend(client_frame(0x81, &[0xFF], [1, 2, 3, 4]));
        let (out, state, _) = feed(&wire, std::iter::empty());
        assert_eq!(out, b"{\"event\":\"a\",\"payload\":1}\n");
        assert_eq!(state.failed.map(|f| f.0), Some(close::INVALID_DATA));
    }

    #[test]
    fn a_close_ends_the_stream_and_is_echoed() {
        let mut wire = text(r#"{"event":"a","payload":1}"#);
        wire.extend(client_frame(
            0x88,
            &[0x03, 0xE8, b'b', b'y', b'e'],
            [1, 2, 3, 4],
        ));
        wire.extend(text(r#"{"event":"after","payload":1}"#));
        let (out, state, shared) = feed(&wire, std::iter::empty());
        assert_eq!(out, b"{\"event\":\"a\",\"payload\":1}\n");
        assert!(state.closed);
        assert_eq!(shared.close.map(|c| c.0), Some(close::NORMAL));
    }

    #[test]
    fn lines_become_text_messages_and_the_heartbeat_a_ping() {
        let lines = b"{\"event\":\"a\",\"payload\":1}\n{\"event\":\"$ping\",\"payload\":null}\n";
        let big = format!("{{\"event\":\"b\",\"payload\":\"{}\"}}\n", "x".repeat(300));
        let mut out = Vec::new();
        let consumed = encode_lines(
            &[IoSlice::new(lines), IoSlice::new(big.as_bytes())],
            &mut out,
        );
        assert_eq!(consumed, lines.len() + big.len());
        let mut expected = vec![0x81, 25];
        expected.extend_from_slice(br#"{"event":"a","payload":1}"#);
        expected.extend_from_slice(&[0x89, 0]);
        let body = big.trim_end().as_bytes();
        expected.extend_from_slice(&[0x81, 126]);
        expected.extend_from_slice(&(body.len() as u16).to_be_bytes());
        expected.extend_from_slice(body);
        assert_eq!(out, expected);
    }

    #[test]
    fn unmasking_from_any_offset_matches_bytewise() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..=255u8).collect();
        for split in 0..data.len() {
            let mut chunk = data.clone();
            let mut at = 0;
            let (a, b) = chunk.split_at_mut(split);
            unmask(a, mask, &mut at);
            unmask(b, mask, &mut at);
            let want: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, x)| x ^ mask[i % 4])
                .collect();
            assert_eq!(chunk, want);
        }
    }
}
