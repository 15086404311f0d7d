//! The client's background task: owns the socket, writes queued sends, reads and
//! reports what arrives, and reconnects when the connection is lost (if asked to).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ClientError, ClientEvent, Command, Listeners, Mode, Reconnect};
use crate::error::IoError;
use crate::event::Event;
use crate::protocol::{ErrorCode, ProtocolError};

/// How long [`Client::close`](super::Client::close) waits for the hub to close its
/// side after this side is done sending.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Most sends written in one go.
const BATCH: usize = 64;
/// A line from the hub longer than this is not a hubcast frame.
const MAX_LINE: usize = 64 << 20;

pub(crate) struct Session {
    pub(crate) state: Arc<std::sync::Mutex<super::SessionState>>,
    /// The hubs to try (several: nodes of a cluster), and which one answered last.
    pub(crate) addrs: Vec<String>,
    pub(crate) current: usize,
    pub(crate) connect_timeout: Duration,
    /// TLS to the hub, when set.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) reconnect: Option<Reconnect>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) mode: Mode,
    pub(crate) listeners: Arc<Listeners>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) connected: watch::Sender<bool>,
    pub(crate) closing: CancellationToken,
    pub(crate) done: watch::Sender<bool>,
}

/// Most events waiting for streams before the task stops reading the socket.
const MAX_PENDING_EVENTS: usize = 64;

/// How one connection ended.
enum Outcome {
    /// Closed on purpose: the client is done.
    Finished,
    /// Lost: reconnect if the policy says so.
    Lost { had_error: bool },
}

/// A connection to the hub: plain TCP, or TLS over it.
pub(crate) enum Conn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Connects to the first of `addrs` that answers, beginning with `start` (the hub
/// used last, so that a client stays where it was when it can): its index and the
/// connection, or the last error.
pub(crate) async fn dial_any(
    addrs: &[String],
    start: usize,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
    report: &mut Vec<ClientEvent>,
) -> Result<(usize, Conn), ClientError> {
    let mut last = None;
    for offset in 0..addrs.len() {
        let index = (start + offset) % addrs.len();
        match dial(&addrs[index], timeout, tls, report).await {
            Ok(conn) => return Ok((index, conn)),
            Err(e) => {
                if addrs.len() > 1 {
                    report.push(ClientEvent::Error(e.clone()));
                }
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one address"))
}

/// Connects as [`dial_tcp`] does, then runs the TLS handshake if `tls` is set (the
/// host part of `addr` is the name the hub's certificate must carry).
pub(crate) async fn dial(
    addr: &str,
    timeout: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
    report: &mut Vec<ClientEvent>,
) -> Result<Conn, ClientError> {
    let stream = dial_tcp(addr, timeout, report).await?;
    let Some(config) = tls else {
        return Ok(Conn::Tcp(stream));
    };
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    match tokio::time::timeout(
        timeout,
        crate::tls::connect(Arc::clone(config), host, stream),
    )
    .await
    {
        Ok(Ok(stream)) => Ok(Conn::Tls(Box::new(stream))),
        Ok(Err(e)) => Err(ClientError::Tls {
            addr: addr.to_string(),
            source: e.into(),
        }),
        Err(_) => Err(ClientError::ConnectTimeout {
            addr: addr.to_string(),
            timeout,
        }),
    }
}

/// Resolves `addr` and connects to the first address that answers; the lifecycle
/// events on the way (`Lookup`, `Connect`) are added to `report`.
async fn dial_tcp(
    addr: &str,
    timeout: Duration,
    report: &mut Vec<ClientEvent>,
) -> Result<TcpStream, ClientError> {
    let timed_out = || ClientError::ConnectTimeout {
        addr: addr.to_string(),
        timeout,
    };
    let resolved = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| timed_out())?;
    let addrs: Vec<SocketAddr> = resolved
        .map_err(|e| ClientError::Resolve {
            addr: addr.to_string(),
            source: e.into(),
        })?
        .collect();
    report.push(ClientEvent::Lookup {
        host: addr.to_string(),
        addrs: addrs.clone(),
    });
    let mut last_error = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the name resolved to no addresses",
    );
    for candidate in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(candidate)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                report.push(ClientEvent::Connect { addr: candidate });
                return Ok(stream);
            }
            Ok(Err(e)) => last_error = e,
            Err(_) => return Err(timed_out()),
        }
    }
    Err(ClientError::Connect {
        addr: addr.to_string(),
        source: last_error.into(),
    })
}

/// An event handed to the handlers, still to be delivered to some streams.
struct Pending {
    event: ClientEvent,
    streams: Vec<mpsc::Sender<ClientEvent>>,
    /// The next stream to deliver to (those before it have it).
    next: usize,
}

impl Session {
    pub(crate) async fn run(mut self, first: Conn) {
        let mut pending = VecDeque::new();
        let mut stream = first;
        loop {
            let outcome = self.serve(stream, &mut pending).await;
            self.connected.send_replace(false);
            let had_error = matches!(outcome, Outcome::Lost { had_error: true });
            self.offer(&mut pending, ClientEvent::Close { had_error });
            if matches!(outcome, Outcome::Finished) {
                break;
            }
            match self.reconnect(&mut pending).await {
                Some(next) => stream = next,
                None => break,
            }
        }
        self.finish(pending);
    }

    /// Hands `event` to the handlers now, and queues it for the streams behind what
    /// is already queued (so each stream sees events in order). Never waits.
    fn offer(&self, pending: &mut VecDeque<Pending>, event: ClientEvent) {
        let streams = self.listeners.handle(&event);
        if !streams.is_empty() {
            pending.push_back(Pending {
                event,
                streams,
                next: 0,
            });
            deliver(pending);
        }
    }

    /// Answers an `emit_confirmed` waiting for this `$stored` (or `$error storage`,
    /// which names the id); the event still goes to handlers and streams.
    fn settle_confirmation(&self, event: &Event) {
        if super::consume::may_route(event) {
            super::consume::route(
                &mut self
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                event,
            );
        }
        let name = event.name().as_str();
        if name != "$stored" && name != "$error" {
            return;
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            id: Option<String>,
            #[serde(flatten)]
            stored: Option<crate::client::Stored>,
            code: Option<String>,
            message: Option<String>,
        }
        let Ok(answer) = serde_json::from_str::<Answer>(event.payload()) else {
            return;
        };
        let Some(id) = answer.id else { return };
        let outcome = match (name, answer.stored) {
            ("$stored", Some(stored)) => Ok(stored),
            ("$error", _) if answer.code.as_deref() == Some("storage") => {
                Err(ClientError::Storage(answer.message.unwrap_or_default()))
            }
            _ => return,
        };
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .confirmed(&id, outcome);
    }

    /// Tries again with backoff until connected, closed, or out of attempts.
    async fn reconnect(&mut self, pending: &mut VecDeque<Pending>) -> Option<Conn> {
        let policy = self.reconnect.clone()?;
        for attempt in 1.. {
            if policy.max_attempts.is_some_and(|max| attempt > max) {
                break;
            }
            let delay = policy.delay(attempt);
            self.offer(pending, ClientEvent::Reconnecting { attempt, delay });
            tokio::select! {
                _ = self.closing.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            let mut report = Vec::new();
            let dialed = tokio::select! {
                _ = self.closing.cancelled() => return None,
                dialed = dial_any(&self.addrs, self.current, self.connect_timeout, self.tls.as_ref(), &mut report) => dialed,
            };
            for event in report {
                self.offer(pending, event);
            }
            match dialed {
                Ok((index, stream)) => {
                    self.current = index;
                    return Some(stream);
                }
                Err(e) => self.offer(pending, ClientEvent::Error(e)),
            }
        }
        None
    }

    /// The client is closed for good: refuse what still waits, end the streams. What
    /// a stream has not taken by now is dropped with it.
    fn finish(mut self, mut pending: VecDeque<Pending>) {
        deliver(&mut pending);
        drop(pending);
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            let _ = command.ack.send(Err(ClientError::Closed));
        }
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fail_confirms();
        self.listeners.lock_streams().clear();
        self.connected.send_replace(false);
        self.done.send_replace(true);
    }

    /// Runs one connection until it ends. While a stream is full, the socket is not
    /// read (the hub holds what the client has not taken), but sends are still
    /// written: a consumer that awaits `emit` for each event it takes keeps going.
    async fn serve(&mut self, stream: Conn, pending: &mut VecDeque<Pending>) -> Outcome {
        match stream {
            Conn::Tcp(stream) => {
                let (reader, writer) = stream.into_split();
                self.serve_io(reader, writer, pending).await
            }
            Conn::Tls(stream) => {
                let (reader, writer) = tokio::io::split(stream);
                self.serve_io(reader, writer, pending).await
            }
        }
    }

    async fn serve_io<R, W>(
        &mut self,
        mut reader: R,
        mut writer: W,
        pending: &mut VecDeque<Pending>,
    ) -> Outcome
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // Tell the hub again who we are and what we want, before anything else.
        let (restore, mut resent) = {
            let state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let resent: Resent = state
                .resent()
                .into_iter()
                .map(|line| (Command::key_of(&line), line))
                .collect();
            (state.frames(), resent)
        };
        if !restore.is_empty() {
            if let Err(e) = writer.write_all(&restore).await {
                return self.lost(pending, e);
            }
        }
        self.connected.send_replace(true);
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let mut batch = Vec::with_capacity(BATCH);
        let mut inbound = Vec::new();
        // Set once this side has finished sending and waits for the hub to close.
        let mut closing_until: Option<Instant> = None;
        let mut idle_at = self
            .idle_timeout
            .and_then(|idle| Instant::now().checked_add(idle));
        loop {
            tokio::select! {
                biased;
                _ = self.closing.cancelled(), if closing_until.is_none() => {
                    // Send what is queued, then half-close: the hub flushes and closes.
                    self.commands.close();
                    while let Ok(command) = self.commands.try_recv() {
                        batch.push(command);
                    }
                    skip_resent(&mut batch, &mut resent);
                    if let Err(e) = write_batch(&mut writer, &mut batch).await {
                        return self.lost(pending, e);
                    }
                    let _ = writer.shutdown().await;
                    closing_until = Some(Instant::now() + CLOSE_GRACE);
                }
                received = self.commands.recv_many(&mut batch, BATCH), if closing_until.is_none() => {
                    if received == 0 {
                        // Every handle is gone; the drop already asked to close.
                        self.closing.cancel();
                        continue;
                    }
                    skip_resent(&mut batch, &mut resent);
                    if let Err(e) = write_batch(&mut writer, &mut batch).await {
                        return self.lost(pending, e);
                    }
                }
                _ = room(pending), if !pending.is_empty() => deliver(pending),
                read = reader.read_buf(&mut rbuf), if pending.len() < MAX_PENDING_EVENTS => match read {
                    Ok(0) => {
                        self.offer(pending, ClientEvent::End);
                        return if closing_until.is_some() {
                            Outcome::Finished
                        } else {
                            Outcome::Lost { had_error: false }
                        };
                    }
                    Ok(_) => {
                        idle_at = self.idle_timeout.and_then(|idle| Instant::now().checked_add(idle));
                        let settle = &mut |event: &Event| self.settle_confirmation(event);
                        if let Err(e) = decode(self.mode, &mut rbuf, &mut inbound, settle) {
                            self.offer(pending, ClientEvent::Error(e));
                            return Outcome::Lost { had_error: true };
                        }
                        for event in inbound.drain(..) {
                            if let Some(pong) = pong_for(&event) {
                                if let Err(e) = writer.write_all(&pong).await {
                                    return self.lost(pending, e);
                                }
                            }
                            self.offer(pending, event);
                        }
                    }
                    Err(e) => return self.lost(pending, e),
                },
                _ = sleep_until(idle_at), if idle_at.is_some() => {
                    let idle = self.idle_timeout.unwrap_or_default();
                    idle_at = Instant::now().checked_add(idle);
                    self.offer(pending, ClientEvent::Timeout { idle });
                }
                _ = sleep_until(closing_until), if closing_until.is_some() => {
                    return Outcome::Finished;
                }
            }
        }
    }

    fn lost(&self, pending: &mut VecDeque<Pending>, error: impl Into<IoError>) -> Outcome {
        let error = ClientError::ConnectionLost(error.into());
        self.offer(pending, ClientEvent::Error(error));
        Outcome::Lost { had_error: true }
    }
}

/// Delivers queued events to their streams as far as they have room, in order.
fn deliver(pending: &mut VecDeque<Pending>) {
    while let Some(front) = pending.front_mut() {
        while let Some(stream) = front.streams.get(front.next) {
            match stream.try_send(front.event.clone()) {
                // A stream whose reader is gone is skipped.
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => front.next += 1,
                Err(mpsc::error::TrySendError::Full(_)) => return,
            }
        }
        pending.pop_front();
    }
}

/// Completes when the stream the first queued event is waiting for has room.
async fn room(pending: &VecDeque<Pending>) {
    match pending.front().and_then(|p| p.streams.get(p.next)) {
        // The permit is dropped at once: only this task sends to the stream, so the
        // room is still there for `deliver`.
        Some(stream) => drop(stream.reserve().await),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The restore's copies of the sends it wrote, by [`Command::key`].
type Resent = std::collections::HashMap<(usize, usize), Bytes>;

/// Takes out of `batch` the sends the restore wrote already: confirmed sends queued
/// before this connection came up are in the restore (so that none is lost) and still
/// queued, or about to be. `resent` holds the restore's own copies (so the bytes keep
/// their address, and no other send can have it) until each is met or the connection
/// ends; those written on an earlier connection are never met, and cost only their
/// memory until then.
fn skip_resent(batch: &mut Vec<Command>, resent: &mut Resent) {
    if resent.is_empty() {
        return;
    }
    let mut kept = Vec::with_capacity(batch.len());
    for command in batch.drain(..) {
        if resent.remove(&command.key()).is_some() {
            command.written();
        } else {
            kept.push(command);
        }
    }
    *batch = kept;
}

/// Writes every queued send in one go, then tells each sender how it went.
async fn write_batch<W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &mut Vec<Command>,
) -> Result<(), IoError> {
    if batch.is_empty() {
        return Ok(());
    }
    let result = if let [one] = &batch[..] {
        writer.write_all(&one.line).await
    } else {
        let total = batch.iter().map(|c| c.line.len()).sum();
        let mut joined = BytesMut::with_capacity(total);
        for command in batch.iter() {
            joined.extend_from_slice(&command.line);
        }
        writer.write_all(&joined).await
    };
    let result = result.map_err(IoError::from);
    for command in batch.drain(..) {
        let ack = match &result {
            Ok(()) => Ok(()),
            Err(e) => Err(ClientError::ConnectionLost(e.clone())),
        };
        let _ = command.ack.send(ack);
    }
    result
}

/// Turns received bytes into [`ClientEvent`]s as `mode` says.
/// `seen` is shown every event line first (the task settles confirmations there, before
/// `$error`s lose their extra fields).
fn decode(
    mode: Mode,
    rbuf: &mut BytesMut,
    out: &mut Vec<ClientEvent>,
    seen: &mut dyn FnMut(&Event),
) -> Result<(), ClientError> {
    match mode {
        Mode::Bytes => out.push(ClientEvent::Data(rbuf.split().freeze())),
        Mode::Text => {
            let whole = complete_utf8_prefix(rbuf);
            let chunk = rbuf.split_to(whole);
            out.push(ClientEvent::Text(
                String::from_utf8_lossy(&chunk).into_owned(),
            ));
        }
        Mode::Events => {
            while let Some(newline) = memchr::memchr(b'\n', rbuf) {
                out.push(parse_line(rbuf.split_to(newline + 1).freeze(), seen));
            }
            if rbuf.len() > MAX_LINE {
                return Err(ClientError::Protocol(format!(
                    "a line longer than {MAX_LINE} bytes"
                )));
            }
        }
    }
    Ok(())
}

/// The length of `bytes` without a multi-byte character cut off at its end.
fn complete_utf8_prefix(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        // `error_len() == None`: the input ends inside a character; keep that for later.
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}

/// The answer to the hub's heartbeat `$ping`.
fn pong_for(event: &ClientEvent) -> Option<Bytes> {
    let ClientEvent::Control(ping) = event else {
        return None;
    };
    if ping.name().as_str() != "$ping" {
        return None;
    }
    let payload = serde_json::value::RawValue::from_string(ping.payload().to_string()).ok()?;
    Event::new("$pong", &payload).ok().map(|e| e.line().clone())
}

fn parse_line(line: Bytes, seen: &mut dyn FnMut(&Event)) -> ClientEvent {
    let event = match Event::from_line(line) {
        Ok(event) => event,
        Err(e) => return ClientEvent::Error(ClientError::Protocol(e.to_string())),
    };
    seen(&event);
    if event.name().as_str() == "$error" {
        #[derive(Deserialize)]
        struct Payload {
            code: ErrorCode,
            message: String,
            consumer: Option<String>,
            retry_after_ms: Option<u64>,
        }
        return match serde_json::from_str::<Payload>(event.payload()) {
            Ok(p) => ClientEvent::HubError(ProtocolError {
                consumer: p.consumer,
                retry_after_ms: p.retry_after_ms,
                ..ProtocolError::new(p.code, p.message)
            }),
            Err(e) => ClientEvent::Error(ClientError::Protocol(format!("malformed $error: {e}"))),
        };
    }
    if event.name().is_reserved() {
        return ClientEvent::Control(event);
    }
    ClientEvent::Event(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_events_errors_and_control_frames() {
        let mut buf = BytesMut::from(
            &b"{\"event\":\"a\",\"payload\":1}\n{\"event\":\"$error\",\"payload\":{\"code\":\"invalid_json\",\"message\":\"m\"}}\n{\"event\":\"$welcome\",\"payload\":{}}\n{\"event\":\"b\""[..],
        );
        let mut out = Vec::new();
        decode(Mode::Events, &mut buf, &mut out, &mut |_| {}).unwrap();
        assert!(matches!(&out[0], ClientEvent::Event(e) if e.name().as_str() == "a"));
        assert!(
            matches!(&out[1], ClientEvent::HubError(e) if e.code == ErrorCode::InvalidJson && e.message == "m")
        );
        assert!(matches!(&out[2], ClientEvent::Control(_)));
        assert_eq!(out.len(), 3);
        assert_eq!(&buf[..], b"{\"event\":\"b\"");
    }

    #[test]
    fn text_mode_keeps_characters_whole_across_reads() {
        let mut buf = BytesMut::from(&b"caf"[..]);
        buf.extend_from_slice(&"é".as_bytes()[..1]); // half of the character
        let mut out = Vec::new();
        decode(Mode::Text, &mut buf, &mut out, &mut |_| {}).unwrap();
        assert!(matches!(&out[0], ClientEvent::Text(t) if t == "caf"));
        buf.extend_from_slice(&"é".as_bytes()[1..]);
        decode(Mode::Text, &mut buf, &mut out, &mut |_| {}).unwrap();
        assert!(matches!(&out[1], ClientEvent::Text(t) if t == "é"));
    }
}
