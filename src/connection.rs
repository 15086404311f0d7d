//! One client's connection: frames in, queued events out, in a single task.
//!
//! The task loops over one `select!`: shutdown phases first, then writing the batch it
//! holds, then waiting for its outbox, then reading. Every branch is cancel-safe: the
//! read buffer and the batch live outside the loop, a vectored write either writes or
//! does nothing, and a dropped wake-up is kept by the [`Notify`](tokio::sync::Notify).
//! Inbound frames are decoded and fanned out synchronously inside the read branch, so
//! the task never holds a lock across an `.await`.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::control::{self, Due, Liveness};
use crate::frame::{Frame, FrameDecoder, Run};
use crate::hub::{CloseReason, Hub, HubEvent, Member, RunProgress};
use crate::inbound::{Prepared, ReadBuffer};
use crate::ingest;
use crate::outbox::{self, Closed, Outbox};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::Event;

/// The hub's heartbeat probe.
static PING: Bytes = Bytes::from_static(b"{\"event\":\"$ping\",\"payload\":null}\n");

/// A read side that can say when it has bytes without being handed a buffer, so a
/// quiet connection need not hold one while it waits.
pub(crate) trait Source: AsyncRead + Unpin {
    /// Whether [`try_read_now`](Self::try_read_now) works: then a connection with
    /// nothing buffered waits for readiness holding no buffer at all.
    const WAITS_UNBUFFERED: bool = false;

    /// Whether the hub pings this transport's clients unasked (WebSocket, every
    /// `timeouts.ws_ping`), as browsers expect of a server.
    const WANTS_PINGS: bool = false;

    /// Ready when a read would not block. The default is always ready: such sources
    /// keep their buffer while they wait.
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Reads what is there into `buf`, never waiting (`WouldBlock` when nothing is);
    /// `None` when this source cannot, and keeps a buffer while it waits instead.
    fn try_read_now(
        &mut self,
        _buf: &mut bytes::buf::Limit<&mut BytesMut>,
    ) -> Option<io::Result<usize>> {
        None
    }
}

impl Source for tokio::net::tcp::ReadHalf<'_> {
    const WAITS_UNBUFFERED: bool = true;

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let stream: &tokio::net::TcpStream = self.as_ref();
        stream.poll_read_ready(cx)
    }

    fn try_read_now(
        &mut self,
        buf: &mut bytes::buf::Limit<&mut BytesMut>,
    ) -> Option<io::Result<usize>> {
        Some(self.try_read_buf(buf))
    }
}

impl<T: AsyncRead + Unpin> Source for tokio::io::ReadHalf<T> {}

/// Most time one turn spends decoding and fanning out before it lets other tasks run.
const TIME_SLICE: std::time::Duration = std::time::Duration::from_millis(2);
/// Most frames handed to one `writev`.
const MAX_IOV: usize = 64;

/// The two steps of a graceful shutdown, as seen by a connection.
#[derive(Clone)]
pub(crate) struct Phases {
    /// Cancelled first: stop reading, so no new event enters the hub. A child of
    /// `drain` (cancelling `drain` cancels it too), so a connection waits on one token.
    pub(crate) stop_reading: CancellationToken,
    /// Cancelled once no connection reads any more: flush what is queued, then close.
    pub(crate) drain: CancellationToken,
}

impl Default for Phases {
    fn default() -> Self {
        let drain = CancellationToken::new();
        Phases {
            stop_reading: drain.child_token(),
            drain,
        }
    }
}

/// Frames taken from the outbox and not yet fully written.
#[derive(Default)]
struct Batch {
    frames: VecDeque<Bytes>,
    /// How much of the front frame is written: non-zero means the peer has seen half
    /// a line.
    front_done: usize,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn mid_frame(&self) -> bool {
        self.front_done > 0
    }

    fn slices<'a>(&'a self, iov: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
        let mut n = 0;
        for (slot, frame) in iov.iter_mut().zip(&self.frames) {
            *slot = IoSlice::new(frame);
            n += 1;
        }
        n
    }

    /// Takes `written` bytes off the front; a frame's cost is given back to the outbox
    /// once it is completely written (until then its whole allocation is alive).
    fn advance(&mut self, mut written: usize, outbox: &Outbox) {
        let mut released = 0;
        while let Some(front) = self.frames.front_mut() {
            if written < front.len() {
                front.advance(written);
                self.front_done += written;
                break;
            }
            written -= front.len();
            released += outbox::cost(self.front_done + front.len());
            self.front_done = 0;
            self.frames.pop_front();
        }
        if released > 0 {
            outbox.written(released);
        }
        // A quiet client's queue gives its little memory back; a busy one keeps its
        // capacity for the next batch.
        if self.frames.is_empty() && self.frames.capacity() <= 8 {
            self.frames = VecDeque::new();
        }
    }
}

/// One `writev` of the batch. Builds the `IoSlice`s on the stack inside `poll`, so the
/// connection's future does not carry them across awaits.
struct WriteBatch<'a, W> {
    writer: &'a mut W,
    batch: &'a Batch,
}

impl<W: AsyncWrite + Unpin> Future for WriteBatch<'_, W> {
    type Output = io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut iov = [IoSlice::new(&[]); MAX_IOV];
        let n = this.batch.slices(&mut iov);
        Pin::new(&mut *this.writer).poll_write_vectored(cx, &iov[..n])
    }
}

struct Connection<'a> {
    hub: &'a Hub,
    client: &'a Arc<Member>,
    decoder: FrameDecoder,
    /// What the client sent and the hub has not consumed yet.
    input: ReadBuffer,
    batch: Batch,
    liveness: Liveness,
    /// When the recent bad frames arrived, for the error budget.
    errors: VecDeque<Instant>,
    /// The error budget is spent: close after telling the client.
    over_budget: bool,
    /// Frames are left in the buffer because decoding used up its time slice: decode
    /// them (after letting other tasks run) before reading more.
    backlog: bool,
    /// The last run of plain events decoded (kept for its allocation while busy).
    run: Run,
    /// How far routing got with `run`, while it is not finished.
    routing: Option<RunProgress>,
    /// Its peer, and whether it must still authenticate.
    session: control::Session,
    /// A frame was answered with an error that ends the connection (`auth_failed`,
    /// `auth_required`): close once it is sent.
    fatal: Option<ErrorCode>,
    /// `--max-rate` / `--max-bytes-rate`, when set (boxed: most hubs set neither, and
    /// every connection pays for the field).
    throttle: Option<Box<Throttle>>,
}

/// Token buckets for one connection's events and bytes per second (a second's worth
/// of burst); a connection that overdraws waits until the debt is paid.
struct Throttle {
    events: Option<Bucket>,
    bytes: Option<Bucket>,
    /// Over its rate: not read until then (the client's sends wait in TCP).
    paused_until: Option<Instant>,
    /// Frames decoded since the throttle last counted.
    frames: u64,
}

struct Bucket {
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_second: f64) -> Self {
        Bucket {
            per_second,
            tokens: per_second,
            at: Instant::now(),
        }
    }

    /// Spends `n`; when that overdraws, the moment the debt is paid.
    fn spend(&mut self, n: u64, now: Instant) -> Option<Instant> {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.per_second) - n as f64;
        self.at = now;
        (self.tokens < 0.0)
            .then(|| now + std::time::Duration::from_secs_f64(-self.tokens / self.per_second))
    }
}

impl Throttle {
    fn new(limits: &crate::Limits) -> Option<Self> {
        let events = limits.max_rate.map(|n| Bucket::new(f64::from(n)));
        let bytes = limits.max_bytes_rate.map(|n| Bucket::new(n as f64));
        (events.is_some() || bytes.is_some()).then_some(Throttle {
            events,
            bytes,
            paused_until: None,
            frames: 0,
        })
    }

    fn spend(&mut self, frames: u64, bytes: u64) -> Option<Instant> {
        let now = Instant::now();
        let a = self.events.as_mut().and_then(|b| b.spend(frames, now));
        let b = self.bytes.as_mut().and_then(|b| b.spend(bytes, now));
        a.max(b)
    }
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        // However the connection ends (a panic included), its memory goes back.
        self.input.release(self.hub.inbound());
    }
}

impl Connection<'_> {
    /// After a read was consumed: a connection that has gone quiet gives its read
    /// buffer, run list and write queues back (issue #11: a connection that was ever
    /// busy used to keep ~300 KB forever).
    fn settle(&mut self, filled: bool) {
        self.input
            .settle(self.hub.inbound(), filled || self.backlog);
        if self.input.buf().capacity() == 0 && self.routing.is_none() {
            self.run = Run::default();
            if self.batch.is_empty() && self.batch.frames.capacity() > 0 {
                self.batch.frames = VecDeque::new();
                self.client.outbox.shrink();
            }
        }
    }
}

/// Serves one client until it leaves, fails, or the hub shuts down; returns why it ended.
///
/// `reading` is held while the connection may still publish; dropping it tells the
/// server this connection will not add events any more.
pub(crate) async fn run<R, W>(
    hub: &Hub,
    client: &Arc<Member>,
    mut reader: R,
    mut writer: W,
    phases: &Phases,
    reading: mpsc::Sender<()>,
    session: control::Session,
) -> CloseReason
where
    R: Source,
    W: AsyncWrite + Unpin,
{
    let mut conn = Connection {
        hub,
        client,
        decoder: FrameDecoder::new(hub.config().limits.max_frame),
        input: ReadBuffer::default(),
        batch: Batch::default(),
        liveness: Liveness::new(hub.config().timeouts.idle),
        errors: VecDeque::new(),
        over_budget: false,
        backlog: false,
        run: Run::default(),
        routing: None,
        session,
        fatal: None,
        throttle: Throttle::new(&hub.config().limits).map(Box::new),
    };
    if R::WANTS_PINGS {
        if let Some(every) = hub.config().timeouts.ws_ping {
            conn.liveness.set_heartbeat(every);
        }
    }
    if conn.session.awaiting_hello {
        let at = Instant::now() + hub.config().timeouts.auth;
        conn.liveness.set_expiry(Some((at, ErrorCode::AuthTimeout)));
    }
    let inbound = hub.inbound();
    let mut reading = Some(reading);
    // Boxed and kept across turns: only connections with a timer pay for one, and it
    // is re-armed rather than re-registered on every turn.
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let reason = loop {
        if let Some(error) = client.access.take_revoked() {
            let code = error.code;
            conn.reject(error);
            break CloseReason::Protocol(code);
        }
        // Checked even mid-write: a client that stopped reading blocks the write forever.
        let closed = if conn.batch.is_empty() {
            client.outbox.take(&mut conn.batch.frames)
        } else {
            client.outbox.closed()
        };
        if closed == Some(Closed::Overflow) {
            break CloseReason::SlowConsumer;
        }
        if let Some(count) = client.outbox.end_drops_if_drained() {
            let id = client.id;
            hub.report(|| HubEvent::EventsDropped { client: id, count });
        }
        // Made before retrying, so a release in between wakes us (see `freed`). Boxed:
        // only a starved connection (rare) pays for the wake-up's state.
        let freed = conn.input.is_starved().then(|| Box::pin(inbound.freed()));
        let was_starved = freed.is_some();
        let room = conn.decoder.read_limit(conn.input.buf());
        let paused_until = conn.throttle.as_ref().and_then(|t| t.paused_until);
        let paused = paused_until.is_some();
        let prepared = match reading {
            Some(_) if paused => Prepared::Parked,
            // Nothing buffered: wait for readiness, then `read_now`.
            Some(_) if R::WAITS_UNBUFFERED && conn.input.buf().is_empty() => Prepared::Parked,
            Some(_) if !conn.backlog => conn.input.prepare(inbound, room),
            _ => Prepared::Parked,
        };
        let offered = match prepared {
            Prepared::Read(n) => Some(n),
            Prepared::Starved { first } => {
                if first {
                    let limit = inbound.limit();
                    hub.report(|| HubEvent::InboundMemoryFull { limit });
                }
                hub.count_inbound_wait();
                if !was_starved {
                    // Retry once with a wake-up registered first.
                    continue;
                }
                None
            }
            Prepared::Parked => None,
        };
        let starved = conn.input.is_starved();
        let writing = !conn.batch.is_empty();
        // One timer for all: liveness, and the end of a pause over `--max-rate`.
        let due_at = [
            conn.liveness.deadline().filter(|_| reading.is_some()),
            paused_until,
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(at) = due_at {
            match timer.as_mut() {
                Some(sleep) if sleep.deadline() != at => sleep.as_mut().reset(at),
                Some(_) => {}
                None => timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        // One token for both phases: `stop_reading` fires on `drain` too.
        let phase = if reading.is_some() {
            &phases.stop_reading
        } else {
            &phases.drain
        };
        let mut read_into = offered.map(|n| conn.input.buf().limit(n));
        let read = async {
            match read_into.as_mut() {
                Some(buf) => reader.read_buf(buf).await.map(Some),
                None => std::future::poll_fn(|cx| reader.poll_readable(cx))
                    .await
                    .map(|()| None),
            }
        };
        tokio::select! {
            biased;
            _ = phase.cancelled() => {
                // A run half routed was accepted: the rest of it goes out too.
                conn.finish_routing();
                if phases.drain.is_cancelled() {
                    break CloseReason::Shutdown;
                }
                reading = None;
            }
            res = WriteBatch { writer: &mut writer, batch: &conn.batch }, if writing => match res {
                Ok(0) => break CloseReason::Io(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    hub.metrics().bytes_out.add(client.id.0, n as u64);
                    conn.batch.advance(n, &client.outbox);
                }
                Err(e) => break CloseReason::Io(e.into()),
            },
            _ = client.outbox.notified() => {}
            _ = async { timer.as_mut().expect("armed above").await }, if due_at.is_some() => match conn.fire_timer() {
                Due::Nothing => {}
                Due::Ping => {
                    client.outbox.push(PING.clone());
                }
                Due::Close(error) => {
                    let code = error.code;
                    conn.reject(error);
                    break CloseReason::Protocol(code);
                }
            },
            // Decoding used up its slice: let other tasks run, then go on.
            _ = tokio::task::yield_now(), if conn.backlog && reading.is_some() => {
                if let Err(reason) = conn.consumed(false) {
                    break reason;
                }
            }
            _ = async { freed.expect("made when starved").await }, if starved && was_starved => {}
            res = read, if reading.is_some() && !starved && !conn.backlog && !paused => {
                let res = match res {
                    // Readable: take a buffer only now, and only for what is there.
                    Ok(None) => match conn.read_now(&mut reader) {
                        Some(res) => res,
                        None => continue,
                    },
                    Ok(Some(n)) => Ok((n, offered.unwrap_or(n))),
                    Err(e) => Err(e),
                };
                if let Err(reason) = conn.received(res) {
                    break reason;
                }
            }
        }
    };
    // Whatever ended the connection, the events it had sent are delivered.
    conn.finish_routing();
    drop(reading);
    // Boxed: the closing steps (a flush under a timeout) would otherwise add their
    // state to every connection's future for its whole life.
    Box::pin(conn.close(&mut writer, reason)).await
}

impl Connection<'_> {
    /// Counts decoded frames against `--max-rate`, when it is set.
    fn count_frames(&mut self, n: usize) {
        if let Some(throttle) = self.throttle.as_mut() {
            throttle.frames += n as u64;
        }
    }

    /// The timer fired: a pause over the rate may be over, and a liveness deadline
    /// may be due.
    fn fire_timer(&mut self) -> Due {
        if let Some(throttle) = self.throttle.as_mut() {
            if throttle.paused_until.is_some_and(|at| at <= Instant::now()) {
                throttle.paused_until = None;
            }
        }
        self.liveness.fire()
    }

    /// After the socket said it is readable, with nothing buffered: allocates a
    /// buffer and reads what is there without waiting, so that no buffer is held
    /// while waiting. `None`: nothing to do now (nothing was there, and the buffer went
    /// back; or the source cannot read without waiting, and reads next turn).
    fn read_now<R: Source>(&mut self, reader: &mut R) -> Option<io::Result<(usize, usize)>> {
        self.input.set_readable();
        let room = self.decoder.read_limit(self.input.buf());
        let Prepared::Read(offered) = self.input.prepare(self.hub.inbound(), room) else {
            return None;
        };
        match reader.try_read_now(&mut self.input.buf().limit(offered))? {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.input.drained(self.hub.inbound());
                None
            }
            res => Some(res.map(|n| (n, offered))),
        }
    }

    /// Handles the outcome of a read of `n` bytes into `offered`.
    fn received(&mut self, res: io::Result<(usize, usize)>) -> Result<(), CloseReason> {
        match res {
            Ok((0, _)) => {
                self.end_of_stream();
                Err(CloseReason::PeerClosed)
            }
            Ok((n, offered)) => {
                self.input.read(n, offered);
                self.hub.metrics().bytes_in.add(self.client.id.0, n as u64);
                self.liveness.heard();
                let consumed = self.consumed(n >= offered);
                if let Some(throttle) = self.throttle.as_mut() {
                    let frames = std::mem::take(&mut throttle.frames);
                    if let Some(until) = throttle.spend(frames, n as u64) {
                        throttle.paused_until = Some(until);
                        self.hub.count(|c| &c.throttled);
                    }
                }
                consumed
            }
            Err(e) => {
                let violation = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<crate::transport::Violation>());
                if let Some(violation) = violation {
                    let code = violation.code;
                    self.reject(ProtocolError::new(code, violation.message.clone()));
                    return Err(CloseReason::Protocol(code));
                }
                Err(CloseReason::Io(e.into()))
            }
        }
    }

    /// Decodes what the buffer holds, then lets the buffer settle.
    fn consumed(&mut self, filled: bool) -> Result<(), CloseReason> {
        if let Err(code) = self.decode_all() {
            return Err(CloseReason::Protocol(code));
        }
        if self.over_budget {
            return Err(CloseReason::Protocol(ErrorCode::TooManyErrors));
        }
        self.settle(filled);
        Ok(())
    }

    /// Handles the complete frames in the read buffer, until the error budget is spent
    /// or the time slice is: then `backlog` is set and the rest waits for the next turn,
    /// so one client's expensive frames never keep a worker from everyone else.
    fn decode_all(&mut self) -> Result<(), ErrorCode> {
        // What these frames append to streams goes to the store's writer together,
        // at the end (one commit for a read's events, not one per event or few).
        let _appends = crate::store::GatheredAppends::begin();
        let deadline = std::time::Instant::now() + TIME_SLICE;
        self.backlog = false;
        while !self.over_budget {
            if let Some(progress) = self.routing.as_mut() {
                if !ingest::run(self.hub, self.client.id, &self.run, progress, deadline) {
                    // Routing used up the slice: the rest of the run waits its turn.
                    self.backlog = true;
                    return Ok(());
                }
                self.routing = None;
                // The receivers hold the chunk now; we keep only the event list's room.
                self.run.clear();
            }
            if let Some(code) = self.fatal {
                return Err(code);
            }
            if std::time::Instant::now() >= deadline {
                self.backlog = !self.input.buf().is_empty();
                return Ok(());
            }
            if self.session.awaiting_hello {
                // Only `$hello` with credentials may come first.
                match self.decoder.decode(self.input.buf()) {
                    Ok(Some(Frame::Event(event))) if event.name().as_str() == "$hello" => {
                        self.dispatch(event);
                    }
                    Ok(Some(_)) | Err(_) => {
                        self.reject(ProtocolError::new(
                            ErrorCode::AuthRequired,
                            "this hub requires authentication: the first frame must be {\"event\":\"$hello\",\"payload\":{\"token\":...}}",
                        ));
                    }
                    Ok(None) => return Ok(()),
                }
                continue;
            }
            if self.decoder.decode_run(self.input.buf(), &mut self.run) {
                self.count_frames(self.run.len());
                if self.run_is_allowed() {
                    self.routing = Some(RunProgress::default());
                } else {
                    self.publish_one_by_one();
                }
                continue;
            }
            match self.decoder.decode(self.input.buf()) {
                Ok(Some(Frame::Event(event))) => {
                    self.count_frames(1);
                    self.dispatch(event);
                }
                Ok(Some(Frame::Rejected(error))) => {
                    self.count_frames(1);
                    self.reject(error);
                }
                Ok(None) => return Ok(()),
                Err(fatal) => {
                    let code = fatal.code;
                    self.reject(fatal);
                    return Err(code);
                }
            }
        }
        Ok(())
    }

    /// Routes the rest of a run that was cut short by the time slice, at once.
    fn finish_routing(&mut self) {
        if let Some(mut progress) = self.routing.take() {
            let never = std::time::Instant::now() + std::time::Duration::from_secs(3600);
            ingest::run(self.hub, self.client.id, &self.run, &mut progress, never);
            self.run.clear();
        }
    }

    /// Whether every event of the run just decoded may be published (one check per
    /// name, through the rule's index; nothing to check without authentication).
    fn run_is_allowed(&self) -> bool {
        let Some(permissions) = self.client.access.permissions() else {
            return true;
        };
        let rule = &permissions.publish;
        if rule.allows_everything() {
            return true;
        }
        let run = &self.run;
        let all = rule
            .allows_each((0..run.len()).map(|i| run.name(i)))
            .all(|allowed| allowed);
        all
    }

    /// A run holds an event this identity may not publish: each event on its own, the
    /// denied ones answered `permission_denied`.
    fn publish_one_by_one(&mut self) {
        let run = std::mem::take(&mut self.run);
        for index in 0..run.len() {
            match Event::from_line(run.line(index)) {
                Ok(event) => self.dispatch(event),
                Err(error) => self.reject(error),
            }
        }
    }

    /// Whether this identity may publish `event` (its name, and its room if any).
    fn may_publish(&self, event: &Event) -> Result<(), ProtocolError> {
        let Some(permissions) = self.client.access.permissions() else {
            return Ok(());
        };
        let name = event.name().as_str();
        if !permissions.publish.allows(name) {
            return Err(control::denied(format!(
                "publishing {}",
                crate::protocol::excerpt(name)
            )));
        }
        if let Some(room) = event.room() {
            if !permissions.rooms.allows(room.as_str()) {
                return Err(control::denied(format!(
                    "sending to room {}",
                    crate::protocol::excerpt(room.as_str())
                )));
            }
        }
        Ok(())
    }

    fn dispatch(&mut self, event: Event) {
        if !event.name().is_reserved() {
            if let Err(error) = self.may_publish(&event) {
                self.reject(error);
                return;
            }
            ingest::event(self.hub, self.client, event);
            return;
        }
        // A `$pong` nobody asked for costs a unit of the error budget (without a
        // reply): 100 of them, of 1 MiB each, used to cost nothing.
        if event.name().as_str() == "$pong" && !self.liveness.answered() {
            self.charge_error();
            return;
        }
        match control::handle(
            self.hub,
            self.client,
            &mut self.liveness,
            &mut self.session,
            &event,
        ) {
            Ok(reply) => {
                if let Some(reply) = reply {
                    self.client.outbox.push(reply);
                }
                let client = self.client.id;
                self.hub.report(|| HubEvent::Control { client, event });
            }
            Err(error) => self.reject(error),
        }
    }

    /// Tells this client (and only it) what was wrong with its input, and spends one
    /// unit of its error budget.
    fn reject(&mut self, error: ProtocolError) {
        let (code, blameless) = (error.code, error.blameless);
        self.client.outbox.push(error.to_frame());
        self.hub.rejected(self.client.id, error);
        match code {
            // The connection ends once the client has read why.
            ErrorCode::AuthRequired | ErrorCode::AuthFailed => self.fatal = Some(code),
            // Permissions are the hub's policy, not a broken client: a denial is
            // answered (the connection stays), not charged.
            ErrorCode::PermissionDenied => {}
            // Neither is an ack that lost a race with a redelivery.
            _ if blameless => {}
            _ => self.charge_error(),
        }
    }

    /// Spends one unit of the error budget; the last one closes the connection.
    fn charge_error(&mut self) {
        let config = self.hub.config();
        let now = Instant::now();
        self.errors.push_back(now);
        while self
            .errors
            .front()
            .is_some_and(|&at| now.duration_since(at) > config.limits.error_window)
        {
            self.errors.pop_front();
        }
        if self.errors.len() > config.limits.max_errors && !self.over_budget {
            self.over_budget = true;
            let error = ProtocolError::new(
                ErrorCode::TooManyErrors,
                format!(
                    "more than {} bad frames (or $pongs not asked for) within {:?}; closing the connection",
                    config.limits.max_errors, config.limits.error_window
                ),
            );
            self.client.outbox.push(error.to_frame());
            self.hub.rejected(self.client.id, error);
        }
    }

    fn end_of_stream(&mut self) {
        if self.decoder.has_partial(self.input.buf()) {
            self.reject(ProtocolError::new(
                ErrorCode::InvalidJson,
                "the connection ended in the middle of a frame",
            ));
        }
    }

    /// Delivers what the client is owed (within the drain deadline), then closes.
    async fn close<W: AsyncWrite + Unpin>(
        mut self,
        writer: &mut W,
        reason: CloseReason,
    ) -> CloseReason {
        match reason {
            // The socket is broken: nothing more can be written.
            CloseReason::Io(_) => return reason,
            CloseReason::SlowConsumer => {
                self.hub.slow_consumer(self.client.id);
                // Finish the line the client has half seen, then say why it is dropped.
                if !self.batch.mid_frame() {
                    self.batch.frames.clear();
                }
                self.batch.frames.truncate(1);
                let error = ProtocolError::new(
                    ErrorCode::SlowConsumer,
                    format!(
                        "more than {} bytes were waiting for this client; disconnecting",
                        self.hub.config().limits.max_pending
                    ),
                );
                self.batch.frames.push_back(error.to_frame());
            }
            _ => self.client.outbox.close(),
        }
        let deadline = self.hub.config().timeouts.drain;
        match tokio::time::timeout(deadline, self.flush(writer)).await {
            Ok(Ok(())) => reason,
            Ok(Err(e)) if reason == CloseReason::SlowConsumer => {
                tracing::debug!(client = %self.client.id, error = %e, "slow consumer: final error not delivered");
                reason
            }
            Ok(Err(e)) => CloseReason::Io(e.into()),
            Err(_) if reason == CloseReason::SlowConsumer => reason,
            Err(_) => CloseReason::DrainTimeout,
        }
    }

    /// Writes the batch and everything still queued, then half-closes the socket.
    async fn flush<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> io::Result<()> {
        loop {
            if self.batch.is_empty() {
                self.client.outbox.take(&mut self.batch.frames);
                if self.batch.is_empty() {
                    break;
                }
            }
            let n = WriteBatch {
                writer: &mut *writer,
                batch: &self.batch,
            }
            .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.batch.advance(n, &self.client.outbox);
        }
        writer.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::time::Instant;

    /// Runs one connection of `hub` over an in-memory pipe; returns our end.
    fn serve_pipe(
        hub: &Hub,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<CloseReason>,
    ) {
        let (peer, server_side) = tokio::io::duplex(1024);
        let client = hub.join(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            true,
            Default::default(),
        );
        let (tx, _rx) = mpsc::channel(1);
        let hub = hub.clone();
        let task = tokio::spawn(async move {
            let (r, w) = tokio::io::split(server_side);
            let session = control::Session::new(SocketAddr::from(([127, 0, 0, 1], 1)), false);
            run(&hub, &client, r, w, &Phases::default(), tx, session).await
        });
        (peer, task)
    }

    async fn next_line(
        lines: &mut tokio::io::Lines<BufReader<&mut tokio::io::DuplexStream>>,
    ) -> String {
        lines.next_line().await.unwrap().expect("closed")
    }

    /// A partial write keeps every frame after the one it cut (a regression found
    /// while reworking the cost accounting: a small queue was reset mid-batch), and
    /// each frame's cost goes back once, when it is completely written.
    #[test]
    fn partial_writes_lose_nothing_and_release_each_frame_once() {
        let outbox = Outbox::new(1 << 20, false);
        let mut batch = Batch::default();
        for frame in ["aaaa", "bbbb", "cccc"] {
            outbox.push(Bytes::from_static(frame.as_bytes()));
        }
        outbox.take(&mut batch.frames);
        let mut wire = Vec::new();
        for written in [2, 3, 1, 6] {
            // What a `writev` of `written` bytes puts on the wire.
            let pending: Vec<u8> = batch.frames.iter().flat_map(|f| f.to_vec()).collect();
            wire.extend_from_slice(&pending[..written]);
            batch.advance(written, &outbox);
        }
        assert_eq!(wire, b"aaaabbbbcccc");
        assert!(batch.is_empty());
        assert_eq!(outbox.pending(), 0);
    }

    /// The connection logic over an in-memory pipe: no sockets involved.
    #[tokio::test]
    async fn serves_over_a_duplex_pipe() {
        let hub = Hub::new(Config::default());
        let (mut peer, task) = serve_pipe(&hub);
        peer.write_all(b"{\"event\":\"a\",\"payload\":1}garbage\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(&mut peer).lines();
        assert_eq!(
            lines.next_line().await.unwrap().unwrap(),
            r#"{"event":"a","payload":1}"#
        );
        let error = lines.next_line().await.unwrap().unwrap();
        assert!(error.contains("invalid_json"), "{error}");
        drop(lines);
        peer.shutdown().await.unwrap();
        assert_eq!(task.await.unwrap(), CloseReason::PeerClosed);
    }

    /// Issue #4: `--idle-timeout` closes a silent connection (paused clock: no waiting).
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_idle_timeout() {
        let hub = Hub::new(
            Config::builder()
                .idle_timeout(Some(Duration::from_secs(30)))
                .build()
                .unwrap(),
        );
        let started = Instant::now();
        let (mut peer, task) = serve_pipe(&hub);
        let mut lines = BufReader::new(&mut peer).lines();
        let error = next_line(&mut lines).await;
        assert!(error.contains("idle_timeout"), "{error}");
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert_eq!(
            task.await.unwrap(),
            CloseReason::Protocol(ErrorCode::IdleTimeout)
        );
    }

    /// Issue #4: activity resets the idle timer.
    #[tokio::test(start_paused = true)]
    async fn activity_keeps_a_connection_open() {
        let hub = Hub::new(
            Config::builder()
                .idle_timeout(Some(Duration::from_secs(30)))
                .build()
                .unwrap(),
        );
        let started = Instant::now();
        let (mut peer, task) = serve_pipe(&hub);
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            peer.write_all(b"{\"event\":\"$ping\",\"payload\":null}")
                .await
                .unwrap();
        }
        let mut lines = BufReader::new(&mut peer).lines();
        for _ in 0..3 {
            assert!(next_line(&mut lines).await.contains("$pong"));
        }
        assert!(next_line(&mut lines).await.contains("idle_timeout"));
        assert!(started.elapsed() >= Duration::from_secs(90));
        task.await.unwrap();
    }

    /// Issue #4: a client that asked for heartbeats gets `$ping`s, stays while it
    /// answers, and is closed two intervals after it stops.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_are_sent_and_silence_is_punished() {
        let hub = Hub::new(Config::default());
        let (mut peer, task) = serve_pipe(&hub);
        peer.write_all(b"{\"event\":\"$hello\",\"payload\":{\"heartbeat\":10}}\n")
            .await
            .unwrap();
        let (read, mut write) = tokio::io::split(&mut peer);
        let mut lines = BufReader::new(read).lines();
        assert!(lines
            .next_line()
            .await
            .unwrap()
            .unwrap()
            .contains("$welcome"));
        let started = Instant::now();
        for _ in 0..3 {
            let ping = lines.next_line().await.unwrap().unwrap();
            assert_eq!(ping, r#"{"event":"$ping","payload":null}"#);
            write
                .write_all(b"{\"event\":\"$pong\",\"payload\":null}\n")
                .await
                .unwrap();
        }
        assert!(started.elapsed() >= Duration::from_secs(30));
        // Now silence: more pings, then the close.
        let mut last = String::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            last = line;
        }
        assert!(last.contains("heartbeat_timeout"), "{last}");
        assert_eq!(
            task.await.unwrap(),
            CloseReason::Protocol(ErrorCode::HeartbeatTimeout)
        );
    }
}
