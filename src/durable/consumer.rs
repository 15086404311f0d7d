//! Durable consumers: `$consume`, deliveries, `$ack` and `$nack`, redelivery, work
//! queues and dead letters.
//!
//! Each consumer has a *pump*, a task that runs while at least one connection holds
//! the consumer. It wakes when the stream grows, an ack frees room, a member comes or
//! goes, or a deadline passes; it reads stored records (off the runtime's threads) and
//! hands each to a member with room (round robin, skipping busy ones), so an event is
//! out to at most one member at a time. What the consumer must remember (acks,
//! redelivery counts, dead letters) goes to the consumer log ([`super::ledger`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::json;
use tokio::sync::Notify;

use super::ledger::{self, Entry, Ledger, Op, Pending, Spec, Where};
use crate::event::Event;
use crate::hub::{ClientId, Hub, Member};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::routing::Pattern;
use crate::store::{Record, SegmentLog, Store, StoreConfig, StoreError};

/// The consumer log's stream in its store.
const LOG: &str = "consumers";
/// Records appended to the consumer log between two rounds of snapshots.
#[cfg(not(test))]
const SNAPSHOT_EVERY: u64 = 50_000;
#[cfg(test)]
const SNAPSHOT_EVERY: u64 = 64;
/// The most records one pump turn reads from the stream.
const READ_BATCH: usize = 4096;
/// The most consumers a hub keeps, and one connection may hold.
pub(crate) const MAX_CONSUMERS: usize = 10_000;
pub(crate) const MAX_HELD: usize = 64;

fn too_many_held() -> ProtocolError {
    ProtocolError::new(
        ErrorCode::LimitExceeded,
        format!("a connection may hold at most {MAX_HELD} consumers"),
    )
}

/// The consumers each connection holds (at most [`MAX_HELD`]), for either engine.
pub(crate) struct Held<C>(Mutex<HashMap<ClientId, Vec<Arc<C>>>>);

impl<C> Default for Held<C> {
    fn default() -> Self {
        Held(Mutex::default())
    }
}

impl<C> Held<C> {
    /// Whether `client` may take one more (`named`: whether it holds that one
    /// already, which it may take again).
    pub(crate) fn room_for(
        &self,
        client: ClientId,
        named: impl Fn(&C) -> bool,
    ) -> Result<(), ProtocolError> {
        let full = lock(&self.0)
            .get(&client)
            .is_some_and(|held| held.len() >= MAX_HELD && !held.iter().any(|c| named(c)));
        match full {
            false => Ok(()),
            true => Err(too_many_held()),
        }
    }

    /// `client` holds `consumer` (once, however often it asks).
    pub(crate) fn hold(&self, client: ClientId, consumer: &Arc<C>) -> Result<(), ProtocolError> {
        let mut by_client = lock(&self.0);
        let held = by_client.entry(client).or_default();
        if !held.iter().any(|c| Arc::ptr_eq(c, consumer)) {
            if held.len() >= MAX_HELD {
                return Err(too_many_held());
            }
            held.push(Arc::clone(consumer));
        }
        Ok(())
    }

    /// The one `client` holds that is `named`.
    pub(crate) fn find(&self, client: ClientId, named: impl Fn(&C) -> bool) -> Option<Arc<C>> {
        lock(&self.0)
            .get(&client)
            .and_then(|held| held.iter().find(|c| named(c)).cloned())
    }

    /// `client` no longer holds `consumer`.
    pub(crate) fn release(&self, client: ClientId, consumer: &Arc<C>) {
        if let Some(held) = lock(&self.0).get_mut(&client) {
            held.retain(|c| !Arc::ptr_eq(c, consumer));
        }
    }

    /// Everything `client` held (it has gone).
    pub(crate) fn take(&self, client: ClientId) -> Vec<Arc<C>> {
        lock(&self.0).remove(&client).unwrap_or_default()
    }
}

/// Every consumer of the hub, and the log that remembers them.
pub(crate) struct Consumers {
    log: Arc<SegmentLog>,
    by_name: Mutex<HashMap<Arc<str>, Arc<Consumer>>>,
    /// Consumers whose stream is no longer declared: kept as they were, so that
    /// declaring it again brings them back.
    orphans: Vec<(String, ledger::Snapshot)>,
    by_client: Held<Consumer>,
    since_snapshot: AtomicU64,
    snapshotting: AtomicBool,
}

/// One named consumer.
pub(crate) struct Consumer {
    pub(crate) name: Arc<str>,
    /// Its stream's index among the hub's streams.
    pub(crate) stream: usize,
    filter: Option<Pattern>,
    room: Option<String>,
    live: Mutex<Live>,
    pub(crate) wake: Notify,
}

struct Live {
    ledger: Ledger,
    members: Vec<Slot>,
    /// Where the round robin looks first.
    next: usize,
    /// Whether a pump task is running.
    pumping: bool,
    /// Something may be due that the pump has not seen (a nack, a member gone):
    /// its next turn looks through every pending event.
    dirty: bool,
    /// Until then nothing out or delayed comes due (`None`: nothing is), so a clean
    /// turn need not look through the pending events at all.
    calm_until: Option<Instant>,
}

/// A connection holding the consumer.
struct Slot {
    member: Arc<Member>,
    /// Deliveries out to it.
    out: u32,
}

/// What `$consume` asked for, checked.
pub(crate) struct Request {
    pub(crate) spec: Spec,
    /// The settings the request named (the others were defaults): only these must
    /// agree with an existing consumer's.
    pub(crate) named: Named,
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Named {
    pub(crate) filter: bool,
    pub(crate) room: bool,
    pub(crate) start: bool,
    pub(crate) ack_wait: bool,
    pub(crate) max_deliver: bool,
    pub(crate) max_in_flight: bool,
}

impl Consumers {
    /// Opens the consumer log in `dir` and rebuilds every consumer; `stream_index`
    /// finds a stream by name. Returns what recovery repaired or skipped.
    pub(crate) fn open(
        mut config: StoreConfig,
        stream_index: impl Fn(&str) -> Option<usize>,
    ) -> Result<(Self, Vec<String>), StoreError> {
        // Small segments, no retention: older records are dropped only once a
        // snapshot has superseded them.
        config.segment_bytes = if cfg!(test) { 4 << 10 } else { 4 << 20 };
        config.retention.max_events = u64::MAX;
        config.retention.max_bytes = u64::MAX;
        config.retention.max_age = None;
        config.stream_retention.clear();
        let (log, recovery) = SegmentLog::open(config)?;
        let mut notes = recovery.repairs;
        let (ledgers, problems) = read_ledgers(&log)?;
        notes.extend(problems);
        let mut by_name = HashMap::new();
        let mut orphans = Vec::new();
        for (name, ledger) in ledgers {
            match stream_index(&ledger.spec.stream) {
                Some(stream) => {
                    let consumer = Consumer::new(name.as_str().into(), stream, ledger);
                    by_name.insert(consumer.name.clone(), Arc::new(consumer));
                }
                None => orphans.push((name, ledger.snapshot())),
            }
        }
        Ok((
            Consumers {
                log: Arc::new(log),
                by_name: Mutex::new(by_name),
                orphans,
                by_client: Held::default(),
                since_snapshot: AtomicU64::new(0),
                snapshotting: AtomicBool::new(false),
            },
            notes,
        ))
    }

    /// What every consumer holds now; `last_seq` gives a stream's last seq by index.
    pub(crate) fn infos(&self, last_seq: impl Fn(usize) -> u64) -> Vec<crate::store::ConsumerInfo> {
        let consumers: Vec<Arc<Consumer>> = lock(&self.by_name).values().cloned().collect();
        let mut infos: Vec<_> = consumers
            .iter()
            .map(|c| c.lock().ledger.info(&c.name, last_seq(c.stream)))
            .collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    /// The consumers of stream `stream`.
    pub(crate) fn of_stream(&self, stream: usize) -> Vec<Arc<Consumer>> {
        lock(&self.by_name)
            .values()
            .filter(|c| c.stream == stream)
            .cloned()
            .collect()
    }

    /// `$consume`: makes `member` a member of the consumer (creating it), queues the
    /// `$consuming` answer, and starts the pump. `stream` is the request's stream's
    /// index; `cursor` resolves the spec's start for a new consumer.
    pub(crate) fn consume(
        &self,
        hub: &Hub,
        member: &Arc<Member>,
        name: &str,
        stream: usize,
        request: Request,
        cursor: impl FnOnce(&Spec) -> u64,
    ) -> Result<(), ProtocolError> {
        let consumer = {
            let mut by_name = lock(&self.by_name);
            match by_name.get(name) {
                Some(consumer) => {
                    let live = consumer.lock();
                    mismatch(name, &live.ledger.spec, &request)?;
                    drop(live);
                    Arc::clone(consumer)
                }
                None => {
                    if by_name.len() >= MAX_CONSUMERS {
                        return Err(ProtocolError::new(
                            ErrorCode::LimitExceeded,
                            format!("the hub keeps at most {MAX_CONSUMERS} consumers"),
                        ));
                    }
                    let filter = request.spec.filter.as_deref().map(Pattern::parse);
                    if let Some(Err(e)) = filter {
                        return Err(e);
                    }
                    let ledger = Ledger::new(request.spec.clone(), cursor(&request.spec));
                    let consumer = Arc::new(Consumer::new(name.into(), stream, ledger));
                    // Logged before anything else of it.
                    let state = consumer.lock().ledger.snapshot();
                    self.log(name, Op::State(state), None);
                    by_name.insert(consumer.name.clone(), Arc::clone(&consumer));
                    hub.durable().watch(Arc::clone(&consumer));
                    consumer
                }
            }
        };
        self.by_client.hold(member.id, &consumer)?;
        // A consuming connection hears live events only through its subscriptions:
        // otherwise it would get each stored event twice, live and as a delivery.
        hub.subscribe(member.id, &[])?;
        let start_pump = {
            let mut live = consumer.lock();
            if !live.members.iter().any(|s| s.member.id == member.id) {
                live.members.push(Slot {
                    member: Arc::clone(member),
                    out: 0,
                });
            }
            let last_seq = hub.durable().last_seq(stream);
            let answer = json!({
                "stream": live.ledger.spec.stream,
                "consumer": name,
                "pending": live.ledger.unacked(last_seq),
            });
            // Queued under the consumer's lock: before any delivery to this member.
            member
                .outbox
                .push(crate::control::reply("$consuming", &answer)?);
            !std::mem::replace(&mut live.pumping, true)
        };
        consumer.wake.notify_one();
        if start_pump {
            tokio::spawn(Arc::clone(&consumer).pump(hub.clone()));
        }
        Ok(())
    }

    /// The consumer named `name`, held by `client`.
    fn held(&self, client: ClientId, name: &str) -> Result<Arc<Consumer>, ProtocolError> {
        let Some(consumer) = lock(&self.by_name).get(name).cloned() else {
            return Err(ProtocolError::new(
                ErrorCode::UnknownConsumer,
                format!(
                    "no consumer is named {:?}; $consume creates one",
                    crate::protocol::printable(name)
                ),
            ));
        };
        if !consumer
            .lock()
            .members
            .iter()
            .any(|s| s.member.id == client)
        {
            return Err(ProtocolError::new(
                ErrorCode::NotConsuming,
                format!(
                    "this connection does not consume {:?}; send $consume first",
                    crate::protocol::printable(name)
                ),
            ));
        }
        Ok(consumer)
    }

    /// `$ack`: the seqs are done. With `confirm`, `$acked` is sent once the acks are
    /// durable. Seqs that were not pending are named in the error (the others count).
    pub(crate) fn ack(
        &self,
        hub: &Hub,
        client: ClientId,
        name: &str,
        seqs: &[u64],
        confirm: bool,
    ) -> Result<(), ProtocolError> {
        let consumer = self.held(client, name)?;
        let (acked, bad, cursor) = {
            let mut live = consumer.lock();
            let (mut acked, mut bad) = (Vec::with_capacity(seqs.len()), Vec::new());
            for &seq in seqs {
                match live.ledger.pending.get(seq).map(|p| p.at) {
                    Some(at) => {
                        if let Where::Out { client, .. } = at {
                            live.release(client);
                        }
                        live.ledger.ack(seq);
                        acked.push(seq);
                    }
                    None => bad.push(seq),
                }
            }
            let cursor = live.ledger.cursor;
            if !acked.is_empty() || confirm {
                let done = confirm.then(|| {
                    let (hub, name, seqs) = (hub.clone(), consumer.name.clone(), acked.clone());
                    Box::new(move |result: Result<u64, StoreError>| {
                        let frame = match result {
                            Ok(_) => crate::control::reply(
                                "$acked",
                                &json!({"consumer": &*name, "seq": seqs}),
                            )
                            .ok(),
                            Err(e) => Some(
                                ProtocolError::new(
                                    ErrorCode::Storage,
                                    format!("acks for {name:?} were not stored: {e}"),
                                )
                                .to_frame(),
                            ),
                        };
                        if let Some(frame) = frame {
                            hub.reply(client, frame);
                        }
                    }) as crate::store::Appended
                });
                let floor = Some(live.ledger.ack_floor());
                self.log_at(name, floor, Op::Ack(acked.clone()), done);
            }
            (acked, bad, cursor)
        };
        if !acked.is_empty() {
            consumer.wake.notify_one();
        }
        self.maybe_snapshot(hub);
        settled("$ack", name, seqs, &bad, cursor)
    }

    /// `$nack`: the seqs are given back, due again after `delay`.
    pub(crate) fn nack(
        &self,
        client: ClientId,
        name: &str,
        seqs: &[u64],
        delay: Duration,
    ) -> Result<(), ProtocolError> {
        let consumer = self.held(client, name)?;
        let mut bad = Vec::new();
        let cursor = {
            let mut live = consumer.lock();
            let due = match delay.is_zero() {
                true => Where::Due,
                false => Where::Later(Instant::now() + delay),
            };
            for &seq in seqs {
                match live.ledger.pending.get(seq).map(|p| p.at) {
                    Some(Where::Out { client, .. }) => {
                        live.release(client);
                        live.ledger.pending.get_mut(seq).expect("just seen").at = due;
                        live.dirty = true;
                    }
                    _ => bad.push(seq),
                }
            }
            live.ledger.cursor
        };
        consumer.wake.notify_one();
        settled("$nack", name, seqs, &bad, cursor)
    }

    /// `$unconsume`: this connection stops getting deliveries; what was out to it is
    /// due again at once.
    pub(crate) fn unconsume(&self, client: ClientId, name: &str) -> Result<(), ProtocolError> {
        let consumer = self.held(client, name)?;
        self.by_client.release(client, &consumer);
        consumer.detach(client);
        Ok(())
    }

    /// A connection closed: what was out to it is due again at once, for the others.
    pub(crate) fn left(&self, client: ClientId) {
        for consumer in self.by_client.take(client) {
            consumer.detach(client);
        }
    }

    /// Appends `op` for consumer `name` to the log.
    fn log(&self, name: &str, op: Op, done: Option<crate::store::Appended>) {
        self.log_at(name, None, op, done);
    }

    /// [`Consumers::log`] with the consumer's ack floor after `op`.
    fn log_at(&self, name: &str, floor: Option<u64>, op: Op, done: Option<crate::store::Appended>) {
        let line = Entry {
            c: name.into(),
            floor,
            op,
        }
        .line();
        let done = done.unwrap_or_else(|| Box::new(|_| {}));
        self.log.append(LOG, None, line, done);
        self.since_snapshot.fetch_add(1, Ordering::Relaxed);
    }

    /// Writes every consumer's whole state once the log has grown enough since the
    /// last time, then deletes what the new states supersede.
    fn maybe_snapshot(&self, hub: &Hub) {
        if self.since_snapshot.load(Ordering::Relaxed) < SNAPSHOT_EVERY
            || self.snapshotting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.since_snapshot.store(0, Ordering::Relaxed);
        let consumers: Vec<Arc<Consumer>> = lock(&self.by_name).values().cloned().collect();
        let mut states: Vec<(String, ledger::Snapshot)> = self.orphans.clone();
        let total = consumers.len() + states.len();
        // Each consumer's state is taken and queued under its lock, so every record
        // of it before the state is covered by it, and every one after comes after.
        let round = Arc::new(Mutex::new((0usize, u64::MAX, false)));
        let hub = hub.clone();
        let finish = move |result: Result<u64, StoreError>| {
            let mut r = lock(&round);
            match result {
                Ok(seq) => r.1 = r.1.min(seq),
                Err(_) => r.2 = true,
            }
            r.0 += 1;
            if r.0 == total {
                let consumers = &hub.durable().consumers;
                if let (false, Some(consumers)) = (r.2, consumers) {
                    if let Err(e) = consumers.log.trim(LOG, r.1) {
                        hub.store_failed(format!("trimming the consumer log: {e}"));
                    }
                }
                if let Some(consumers) = consumers {
                    consumers.snapshotting.store(false, Ordering::Release);
                }
            }
        };
        let finish = Arc::new(finish);
        for consumer in consumers {
            let live = consumer.lock();
            let done = Arc::clone(&finish);
            self.log(
                &consumer.name,
                Op::State(live.ledger.snapshot()),
                Some(Box::new(move |r| done(r))),
            );
        }
        for (name, state) in states.drain(..) {
            let done = Arc::clone(&finish);
            self.log(&name, Op::State(state), Some(Box::new(move |r| done(r))));
        }
    }

    /// Writes every consumer's state (so a clean restart keeps delivery counts and
    /// reads nothing twice), commits what the log was given, and stops it.
    pub(crate) fn close(&self) {
        let consumers: Vec<Arc<Consumer>> = lock(&self.by_name).values().cloned().collect();
        for consumer in consumers {
            let live = consumer.lock();
            self.log(&consumer.name, Op::State(live.ledger.snapshot()), None);
        }
        self.log.close();
    }
}

/// Reads the consumer log of a store in `dir` without changing it.
pub(crate) fn read_only(dir: &std::path::Path) -> Result<Vec<(String, Ledger)>, StoreError> {
    let log = SegmentLog::open_read_only(dir)?;
    let (ledgers, _) = read_ledgers(&log)?;
    Ok(ledgers.into_iter().collect())
}

fn read_ledgers(
    log: &SegmentLog,
) -> Result<(std::collections::BTreeMap<String, Ledger>, Vec<String>), StoreError> {
    let Some(info) = log.info(LOG) else {
        return Ok(Default::default());
    };
    let mut records = Vec::new();
    let mut seq = info.first_seq;
    while seq <= info.last_seq {
        let batch = log.read(LOG, seq, 65_536)?;
        let Some(last) = batch.last() else { break };
        seq = last.seq + 1;
        records.extend(batch);
    }
    Ok(ledger::replay(
        records.iter().map(|r| trim_newline(&r.line)),
    ))
}

fn trim_newline(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n").unwrap_or(line)
}

/// `consumer_mismatch` when `request` names a setting unlike `spec`'s.
pub(crate) fn mismatch(name: &str, spec: &Spec, request: &Request) -> Result<(), ProtocolError> {
    let asked = &request.spec;
    let named = request.named;
    let differs: Vec<String> = [
        (true, "stream", spec.stream != asked.stream),
        (named.filter, "filter", spec.filter != asked.filter),
        (named.room, "room", spec.room != asked.room),
        (named.start, "start", spec.start != asked.start),
        (
            named.ack_wait,
            "ack_wait",
            spec.ack_wait_ms != asked.ack_wait_ms,
        ),
        (
            named.max_deliver,
            "max_deliver",
            spec.max_deliver != asked.max_deliver,
        ),
        (
            named.max_in_flight,
            "max_in_flight",
            spec.max_in_flight != asked.max_in_flight,
        ),
    ]
    .into_iter()
    .filter(|(named, _, differs)| *named && *differs)
    .map(|(_, key, _)| key.to_string())
    .collect();
    if differs.is_empty() {
        return Ok(());
    }
    let was = serde_json::to_string(spec).unwrap_or_default();
    Err(ProtocolError::new(
        ErrorCode::ConsumerMismatch,
        format!(
            "consumer {:?} exists with other settings ({}): it has {was}",
            crate::protocol::printable(name),
            differs.join(", ")
        ),
    ))
}

/// The answer to an `$ack` or `$nack` of `seqs`: `Ok` when none was `bad` (not out
/// for delivery), else the error naming them. When each bad seq was delivered once
/// (`delivered_below`: every seq under it was), a correct client can have raced a
/// redelivery or acked twice: it is told, not charged an error.
pub(crate) fn settled(
    request: &str,
    name: &str,
    seqs: &[u64],
    bad: &[u64],
    delivered_below: u64,
) -> Result<(), ProtocolError> {
    if bad.is_empty() {
        return Ok(());
    }
    let applied = seqs.len() - bad.len();
    let shown: Vec<String> = bad.iter().take(10).map(u64::to_string).collect();
    let more = match bad.len() {
        n if n > 10 => format!(" and {} more", n - 10),
        _ => String::new(),
    };
    let mut error = ProtocolError::new(
        ErrorCode::InvalidPayload,
        format!(
            "{request} for {:?}: seq {}{more} not out for delivery (acknowledged already, never delivered, or redelivered elsewhere after ack_wait); {applied} applied",
            crate::protocol::printable(name),
            shown.join(", ")
        ),
    );
    error.blameless = bad.iter().all(|&seq| seq < delivered_below);
    Err(error)
}

impl Live {
    /// One delivery to `client` ended (acked, nacked, timed out).
    fn release(&mut self, client: ClientId) {
        if let Some(slot) = self.members.iter_mut().find(|s| s.member.id == client) {
            slot.out = slot.out.saturating_sub(1);
        }
    }

    /// The next member with room (under `max_in_flight`, and `fits`), round robin.
    fn pick(&mut self, fits: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.members.len();
        let max = self.ledger.spec.max_in_flight;
        (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| self.members[i].out < max && fits(i))
            .inspect(|&i| self.next = i + 1)
    }
}

/// What one pump turn will read.
struct Plan {
    retries: Vec<u64>,
    dying: Vec<u64>,
    /// Read from the cursor, this many records at most.
    fresh: usize,
    cursor: u64,
    /// When something is due next (a deadline, a delayed nack).
    next_due: Option<Instant>,
}

/// What it read.
struct Read {
    retries: Vec<(u64, Option<Record>)>,
    dying: Vec<(u64, Option<Record>)>,
    fresh: Vec<Record>,
    first_seq: u64,
}

impl Consumer {
    fn new(name: Arc<str>, stream: usize, ledger: Ledger) -> Self {
        let filter = ledger
            .spec
            .filter
            .as_deref()
            .and_then(|f| Pattern::parse(f).ok());
        Consumer {
            name,
            stream,
            filter,
            room: ledger.spec.room.clone(),
            live: Mutex::new(Live {
                ledger,
                members: Vec::new(),
                next: 0,
                pumping: false,
                // What was restored is due.
                dirty: true,
                calm_until: None,
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Live> {
        lock(&self.live)
    }

    /// `client` no longer holds the consumer.
    fn detach(&self, client: ClientId) {
        {
            let mut live = self.lock();
            live.members.retain(|s| s.member.id != client);
            for pending in live.ledger.pending.values_mut() {
                if matches!(pending.at, Where::Out { client: c, .. } if c == client) {
                    pending.at = Where::Due;
                }
            }
            live.dirty = true;
        }
        self.wake.notify_one();
    }

    /// Delivers until no connection holds the consumer.
    async fn pump(self: Arc<Self>, hub: Hub) {
        let durable = hub.durable();
        let Some(store) = durable.segment_log() else {
            return;
        };
        let stream: Arc<str> = durable.stream_name(self.stream).into();
        let mut failing = false;
        loop {
            let Some(plan) = self.plan(durable.last_seq(self.stream)) else {
                return;
            };
            if plan.retries.is_empty() && plan.dying.is_empty() && plan.fresh == 0 {
                let wake = self.wake.notified();
                match plan.next_due {
                    Some(at) => {
                        let _ = tokio::time::timeout_at(at.into(), wake).await;
                    }
                    None => wake.await,
                }
                continue;
            }
            let (store2, stream2) = (Arc::clone(&store), Arc::clone(&stream));
            let read = tokio::task::spawn_blocking(move || read(&*store2, &stream2, plan)).await;
            match read {
                Ok(Ok(read)) => {
                    failing = false;
                    if !self.assign(&hub, read) {
                        // Every member with room in flight has a full queue: look again
                        // once they have read some (or something else wakes us).
                        let _ =
                            tokio::time::timeout(Duration::from_millis(10), self.wake.notified())
                                .await;
                    }
                }
                Ok(Err(e)) => {
                    if !failing {
                        hub.store_failed(format!("reading stream {stream} for {}: {e}", self.name));
                    }
                    failing = true;
                    // Try again in a while (or when something changes).
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), self.wake.notified()).await;
                }
                // The runtime is shutting down.
                Err(_) => return,
            }
        }
    }

    /// Under the lock: expires deliveries past their deadline and decides what to read.
    fn plan(&self, last_seq: u64) -> Option<Plan> {
        let mut live = self.lock();
        if live.members.is_empty() {
            live.pumping = false;
            return None;
        }
        let now = Instant::now();
        let max_deliver = live.ledger.spec.max_deliver;
        let mut next_due: Option<Instant> = None;
        let mut expired = Vec::new();
        let (mut due, mut dying) = (Vec::new(), Vec::new());
        // With thousands in flight, looking through them all on every turn would
        // cost more than the deliveries: only when something may be due.
        let calm = !live.dirty && live.calm_until.is_none_or(|t| now < t);
        let scan = if calm {
            next_due = live.calm_until;
            0
        } else {
            live.ledger.pending.len()
        };
        for (seq, pending) in live.ledger.pending.iter_mut().take(scan) {
            match pending.at {
                Where::Out { client, deadline } if deadline <= now => {
                    expired.push(client);
                    pending.at = Where::Due;
                }
                Where::Later(at) if at <= now => pending.at = Where::Due,
                Where::Out { deadline: at, .. } | Where::Later(at) => {
                    next_due = Some(next_due.map_or(at, |n| n.min(at)));
                }
                Where::Due | Where::Dying => {}
            }
            if pending.at == Where::Due {
                if pending.attempts >= max_deliver {
                    pending.at = Where::Dying;
                    dying.push(seq);
                } else {
                    due.push(seq);
                }
            }
        }
        for client in expired {
            live.release(client);
        }
        let max = live.ledger.spec.max_in_flight;
        let free: usize = live
            .members
            .iter()
            .map(|s| max.saturating_sub(s.out) as usize)
            .sum();
        if !calm {
            // Due events past the free room wait for the next turn's look.
            live.dirty = due.len() > free;
            live.calm_until = next_due;
        }
        due.truncate(free);
        let room = free - due.len();
        let cursor = live.ledger.cursor;
        let fresh = match (room, cursor <= last_seq) {
            (0, _) | (_, false) => 0,
            // A filter may skip most of what is read.
            (_, true) if self.filter.is_some() || self.room.is_some() => READ_BATCH,
            (room, true) => room.min(READ_BATCH),
        };
        Some(Plan {
            retries: due,
            dying,
            fresh,
            cursor,
            next_due,
        })
    }

    /// Under the lock: hands what was read to members with room.
    /// Returns whether anything was delivered (or there was nothing to deliver).
    fn assign(self: &Arc<Self>, hub: &Hub, read: Read) -> bool {
        let durable = hub.durable();
        let stream_name = durable.stream_name(self.stream);
        let now = Instant::now();
        let mut tries = Vec::new();
        let mut live = self.lock();
        let ack_wait = live.ledger.spec.ack_wait();
        let deadline = now + ack_wait;
        let parts = Parts::new(stream_name, &self.name);
        // Each member's deliveries of this turn, queued in pieces of up to
        // `Batch::PIECE` bytes: a buffer of a whole turn (megabytes) came from fresh
        // pages each time, and the kernel's zeroing of them was 6% of a replay.
        // Sized for an even share of what was read (growing them cost ~3% more);
        // with a filter or a room, most of it may be skipped.
        let overhead = parts.before_seq.len() + parts.before_attempt.len() + 24;
        let unfiltered = self.filter.is_none() && self.room.is_none();
        let fresh = if unfiltered { &read.fresh[..] } else { &[] };
        let bytes: usize = (read.retries.iter().filter_map(|(_, r)| r.as_ref()))
            .chain(fresh)
            .map(|r| r.line.len() + overhead)
            .sum();
        let share = (bytes / live.members.len().max(1) + overhead).min(Batch::PIECE + 1024);
        let mut batches: Vec<Batch> = live.members.iter().map(|_| Batch::new(share)).collect();
        // What each member's queue can still take: deliveries fill at most half of
        // `--max-pending`, so a member that reads slowly (or not at all) is skipped,
        // not cut as a slow consumer for a burst the hub chose to send it.
        let half = hub.config().limits.max_pending / 2;
        let queued: Vec<usize> = live
            .members
            .iter()
            .map(|s| s.member.outbox.pending())
            .collect();
        let mut blocked = false;
        let deliver =
            |live: &mut Live, batches: &mut Vec<Batch>, record: &Record, attempts: u32| -> bool {
                let size = crate::outbox::cost(record.line.len() + 256);
                let fits = |i: usize| {
                    let batch = &batches[i];
                    queued[i] + batch.bytes() + size <= half
                        || (queued[i] == 0 && batch.count() == 0)
                };
                let Some(i) = live.pick(fits) else {
                    return false;
                };
                let slot = &mut live.members[i];
                let batch = &mut batches[i];
                parts.write(&mut batch.buf, &record.line, record.seq, attempts);
                batch.events += 1;
                if batch.buf.len() >= Batch::PIECE {
                    batch.flush(&slot.member.outbox, share);
                }
                slot.out += 1;
                let client = slot.member.id;
                live.ledger.pending.insert(
                    record.seq,
                    Pending {
                        attempts,
                        at: Where::Out { client, deadline },
                    },
                );
                live.calm_until = Some(live.calm_until.map_or(deadline, |t| t.min(deadline)));
                true
            };
        for (seq, record) in read.retries {
            let Some(pending) = live.ledger.pending.get(seq).copied() else {
                continue; // acked meanwhile
            };
            if pending.at != Where::Due {
                continue;
            }
            let Some(record) = record else {
                // Deleted by the stream's retention: nothing left to deliver.
                live.ledger.pending.remove(seq);
                continue;
            };
            let attempts = pending.attempts + 1;
            if !deliver(&mut live, &mut batches, &record, attempts) {
                live.dirty = true;
                blocked = true;
                break;
            }
            if attempts > 1 {
                live.ledger.redelivered += 1;
                tries.push((seq, attempts));
            }
        }
        if live.ledger.cursor < read.first_seq && read.fresh.is_empty() {
            // Retention deleted what the cursor pointed at.
            live.ledger.cursor = read.first_seq;
        }
        for record in &read.fresh {
            let seq = record.seq;
            if seq < live.ledger.cursor {
                continue;
            }
            let skipped = live.ledger.skip.remove(&seq);
            let handled = live.ledger.pending.contains_key(seq);
            if skipped || handled || !self.wants(record) {
                live.ledger.cursor = seq + 1;
                continue;
            }
            if !deliver(&mut live, &mut batches, record, 1) {
                blocked = true;
                break;
            }
            live.ledger.cursor = seq + 1;
        }
        let delivered: usize = batches.iter().map(Batch::count).sum();
        // A full queue closes the connection, and its deliveries come back then.
        for (slot, mut batch) in live.members.iter().zip(batches) {
            batch.flush(&slot.member.outbox, 0);
        }
        if !tries.is_empty() {
            if let Some(consumers) = &durable.consumers {
                consumers.log(&self.name, Op::Tries(tries), None);
            }
        }
        drop(live);
        for (seq, record) in read.dying {
            self.dead_letter(hub, seq, record);
        }
        delivered > 0 || !blocked
    }

    /// Whether a stored event is for this consumer (its filter and room).
    fn wants(&self, record: &Record) -> bool {
        if self.filter.is_none() && self.room.is_none() {
            return true;
        }
        let Ok(event) = Event::from_line(record.line.clone()) else {
            return false;
        };
        let name_ok = self
            .filter
            .as_ref()
            .is_none_or(|f| f.matches(event.name().as_str()));
        let room_ok = self
            .room
            .as_deref()
            .is_none_or(|room| event.room().is_some_and(|r| r.as_str() == room));
        name_ok && room_ok
    }

    /// Moves an event past `max_deliver` to the dead-letter stream, then forgets it.
    fn dead_letter(self: &Arc<Self>, hub: &Hub, seq: u64, record: Option<Record>) {
        let durable = hub.durable();
        let dead = durable.dead_stream(self.stream);
        let consumer = Arc::clone(self);
        let hub2 = hub.clone();
        let settle = move |result: Result<u64, StoreError>| {
            let durable = hub2.durable();
            if let Err(e) = &result {
                hub2.store_failed(format!(
                    "moving seq {seq} of {} to its dead-letter stream: {e}",
                    durable.stream_name(consumer.stream)
                ));
            }
            let mut live = consumer.lock();
            match result {
                Ok(_) if live.ledger.pending.remove(seq).is_some() => {
                    live.ledger.dead_lettered += 1;
                    if let Some(consumers) = &durable.consumers {
                        let floor = Some(live.ledger.ack_floor());
                        consumers.log_at(&consumer.name, floor, Op::Dead(vec![seq]), None);
                    }
                }
                Ok(_) => {} // acked meanwhile
                Err(_) => {
                    // Tried again later (ack_wait from now).
                    let again = Instant::now() + live.ledger.spec.ack_wait();
                    live.dirty = true;
                    if let Some(p) = live.ledger.pending.get_mut(seq) {
                        p.at = Where::Later(again);
                        p.attempts = p.attempts.saturating_sub(1);
                    }
                }
            }
            drop(live);
            consumer.wake.notify_one();
        };
        let (Some(record), Some(dead)) = (record, dead) else {
            // Deleted by retention (nothing to move), or already a dead letter (what
            // fails in a dead-letter stream stays there, skipped).
            return settle(Ok(0));
        };
        let attempts = self
            .lock()
            .ledger
            .pending
            .get(seq)
            .map_or(0, |p| p.attempts);
        let line = with_fields(
            &record.line,
            &[(
                "dead_letter",
                json!({
                    "stream": durable.stream_name(self.stream),
                    "seq": seq,
                    "consumer": &*self.name,
                    "attempts": attempts,
                }),
            )],
        );
        durable.append_to(hub, dead, record.id.map(Into::into), line, Box::new(settle));
    }
}

/// One member's deliveries of one pump turn.
struct Batch {
    /// Not queued yet.
    buf: Vec<u8>,
    /// Deliveries in `buf`.
    events: usize,
    /// Bytes and deliveries queued already this turn.
    queued_bytes: usize,
    queued_events: usize,
}

impl Batch {
    /// Queued once it holds this much.
    const PIECE: usize = 64 * 1024;

    fn new(capacity: usize) -> Batch {
        Batch {
            buf: Vec::with_capacity(capacity),
            events: 0,
            queued_bytes: 0,
            queued_events: 0,
        }
    }

    /// Bytes of this turn, queued or not.
    fn bytes(&self) -> usize {
        self.queued_bytes + self.buf.len()
    }

    /// Deliveries of this turn, queued or not.
    fn count(&self) -> usize {
        self.queued_events + self.events
    }

    /// Queues what `buf` holds (a full queue closes the connection, and its
    /// deliveries come back then); the next piece gets `capacity`.
    fn flush(&mut self, outbox: &crate::outbox::Outbox, capacity: usize) {
        if self.events == 0 {
            return;
        }
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(capacity));
        self.queued_bytes += buf.len();
        self.queued_events += self.events;
        outbox.push_events(buf.into(), std::mem::take(&mut self.events));
    }
}

/// Reads what a plan needs (off the runtime's threads: this is file I/O).
fn read(store: &dyn Store, stream: &str, plan: Plan) -> Result<Read, StoreError> {
    let one = |seq: u64| -> Result<(u64, Option<Record>), StoreError> {
        let record = store.read(stream, seq, 1)?.into_iter().next();
        Ok((seq, record.filter(|r| r.seq == seq)))
    };
    let retries = plan
        .retries
        .iter()
        .map(|&s| one(s))
        .collect::<Result<_, _>>()?;
    let dying = plan
        .dying
        .iter()
        .map(|&s| one(s))
        .collect::<Result<_, _>>()?;
    let fresh = match plan.fresh {
        0 => Vec::new(),
        n => store.read(stream, plan.cursor, n)?,
    };
    let first_seq = store.info(stream).map_or(0, |i| i.first_seq);
    Ok(Read {
        retries,
        dying,
        fresh,
        first_seq,
    })
}

/// The fixed parts of a consumer's deliveries, JSON-escaped once.
struct Parts {
    /// `,"stream":NAME,"seq":`
    before_seq: Vec<u8>,
    /// `,"consumer":NAME,"attempt":`
    before_attempt: Vec<u8>,
    stream: String,
    consumer: String,
}

impl Parts {
    fn new(stream: &str, consumer: &str) -> Parts {
        let json = |s: &str| serde_json::to_string(s).expect("a string serialises");
        Parts {
            before_seq: format!(",\"stream\":{},\"seq\":", json(stream)).into_bytes(),
            before_attempt: format!(",\"consumer\":{},\"attempt\":", json(consumer)).into_bytes(),
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
        }
    }

    /// Appends the delivery of `line` to `out`.
    fn write(&self, out: &mut Vec<u8>, line: &[u8], seq: u64, attempt: u32) {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        match body.strip_suffix(b"}") {
            Some(open) if !has_delivery_key(body) => {
                out.extend_from_slice(open);
                out.extend_from_slice(&self.before_seq);
                out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
                out.extend_from_slice(&self.before_attempt);
                out.extend_from_slice(itoa::Buffer::new().format(attempt).as_bytes());
                out.extend_from_slice(b"}\n");
            }
            _ => out.extend_from_slice(&delivery(line, &self.stream, seq, &self.consumer, attempt)),
        }
    }
}

/// Whether a line may hold one of the keys a delivery adds (then it is rebuilt): one
/// pass over its quotes.
fn has_delivery_key(body: &[u8]) -> bool {
    has_any_key(body, &["stream", "seq", "consumer", "attempt"])
}

/// Whether `body` may hold one of `keys` (a quoted string equal to it anywhere: a
/// cheap, conservative check, in one pass over its quotes).
fn has_any_key(body: &[u8], keys: &[&str]) -> bool {
    memchr::memchr_iter(b'"', body).any(|at| {
        let rest = &body[at + 1..];
        keys.iter().any(|key| {
            rest.strip_prefix(key.as_bytes())
                .is_some_and(|after| after.first() == Some(&b'"'))
        })
    })
}

/// A stored event as a delivery: its line with `"stream"`, `"seq"`, `"consumer"` and
/// `"attempt"` added at the top level.
pub(crate) fn delivery(line: &[u8], stream: &str, seq: u64, consumer: &str, attempt: u32) -> Bytes {
    with_fields(
        line,
        &[
            ("stream", json!(stream)),
            ("seq", json!(seq)),
            ("consumer", json!(consumer)),
            ("attempt", json!(attempt)),
        ],
    )
}

/// `line` (a JSON object and `\n`) with `fields` set at its top level. Appended in
/// place when the line cannot already have those keys; rebuilt otherwise.
pub(crate) fn with_fields(line: &[u8], fields: &[(&str, serde_json::Value)]) -> Bytes {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let keys: Vec<&str> = fields.iter().map(|(key, _)| *key).collect();
    let clash = has_any_key(body, &keys);
    if let (false, Some(open)) = (clash, body.strip_suffix(b"}")) {
        let mut out = Vec::with_capacity(line.len() + 96);
        out.extend_from_slice(open);
        for (key, value) in fields {
            out.push(b',');
            serde_json::to_writer(&mut out, key).expect("a string serialises");
            out.push(b':');
            serde_json::to_writer(&mut out, value).expect("a value serialises");
        }
        out.extend_from_slice(b"}\n");
        return out.into();
    }
    // The slow way: the line has one of the keys already (or odd spacing).
    let mut object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).unwrap_or_default();
    for (key, value) in fields {
        object.insert((*key).to_owned(), value.clone());
    }
    let mut out = serde_json::to_vec(&object).expect("a map serialises");
    out.push(b'\n');
    out.into()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next frames the hub queued for `member`, one per line.
    async fn next_frames(
        member: &Member,
        queue: &mut std::collections::VecDeque<Bytes>,
    ) -> Vec<serde_json::Value> {
        if queue.is_empty() {
            tokio::time::timeout(Duration::from_secs(10), member.outbox.notified())
                .await
                .expect("frames for the member");
        }
        member.outbox.take(queue);
        let mut frames = Vec::new();
        for chunk in queue.drain(..) {
            for text in chunk.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                frames.push(serde_json::from_slice(text).unwrap());
            }
        }
        frames
    }

    /// Acks past several snapshot rounds: each round's states are written, the log is
    /// trimmed behind them (from the writer's own callback), and what is read back
    /// after a restart is every ack, the floor, and what is still out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshots_trim_the_log_and_a_restart_remembers_every_ack() {
        use crate::durable::ledger::Start;
        let dir = std::env::temp_dir().join(format!("hubcast-snapshots-{}", fastrand::u64(..)));
        let config = crate::Config::builder()
            .streams(vec![crate::StreamSpec::new("s", &["e"])])
            .data_dir(dir.clone())
            .fsync(crate::store::Fsync::Never)
            .build()
            .unwrap();
        let hub = Hub::try_new(config).unwrap();
        let (tx, mut stored) = tokio::sync::mpsc::unbounded_channel();
        for n in 0..600 {
            let tx = tx.clone();
            let line = Bytes::from(format!("{{\"event\":\"e\",\"payload\":{n}}}\n"));
            let done = Box::new(move |r: Result<u64, StoreError>| {
                let _ = tx.send(r.is_ok());
            });
            hub.durable().append_to(&hub, 0, None, line, done);
        }
        for _ in 0..600 {
            assert!(stored.recv().await.unwrap());
        }
        let member = hub.join("127.0.0.1:9".parse().unwrap(), true, Default::default());
        let consumers = hub.durable().consumers.as_ref().unwrap();
        let spec = Spec {
            stream: "s".into(),
            filter: None,
            room: None,
            start: Start::All,
            ack_wait_ms: 60_000,
            max_deliver: 5,
            max_in_flight: 1000,
        };
        let request = Request {
            spec,
            named: Named::default(),
        };
        consumers
            .consume(&hub, &member, "c", 0, request, |_| 1)
            .unwrap();
        let mut queue = std::collections::VecDeque::new();
        let mut seqs = Vec::new();
        while seqs.len() < 600 {
            let frames = next_frames(&member, &mut queue).await;
            seqs.extend(frames.iter().filter_map(|f| f["seq"].as_u64()));
        }
        // One ack at a time, each waited for (`$acked`): one record per commit, so
        // the log's small segments fill and snapshot rounds have something to trim.
        for &seq in &seqs[..500] {
            consumers.ack(&hub, member.id, "c", &[seq], true).unwrap();
            while !next_frames(&member, &mut queue)
                .await
                .iter()
                .any(|f| f["event"] == "$acked")
            {}
        }
        // (A writer hung in its own callback would never close: bounded.)
        let closing = hub.clone();
        let closed = tokio::task::spawn_blocking(move || closing.close_store());
        tokio::time::timeout(Duration::from_secs(10), closed)
            .await
            .expect("the consumer log's writer hung")
            .unwrap();
        let log = SegmentLog::open_read_only(&dir.join("consumers")).unwrap();
        let info = log.info(LOG).unwrap();
        assert!(info.first_seq > 1, "the log was trimmed: {info:?}");
        assert!(info.events < 500, "{info:?}");
        let listed = crate::store::consumers(&dir).unwrap();
        assert_eq!(listed.len(), 1);
        let c = &listed[0];
        assert_eq!((c.acked, c.ack_floor, c.pending), (500, 500, 100), "{c:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_fast_delivery_format_is_the_same_as_the_general_one() {
        let parts = Parts::new("orders", "dri\"vers");
        for line in [
            &b"{\"event\":\"pickup\",\"payload\":{\"n\":1}}\n"[..],
            b"{\"event\":\"x\",\"payload\":{\"seq\":1}}\n",
            b"{\"event\":\"x\",\"payload\":1} \n",
        ] {
            let mut fast = Vec::new();
            parts.write(&mut fast, line, 12345, 7);
            let general = delivery(line, "orders", 12345, "dri\"vers", 7);
            let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).unwrap();
            assert_eq!(parse(&fast), parse(&general));
            assert!(fast.ends_with(b"}\n"));
        }
    }

    #[test]
    fn fields_are_appended_or_replaced() {
        let line = br#"{"event":"pickup","payload":{"n":1}}"#.to_vec();
        let mut with_nl = line.clone();
        with_nl.push(b'\n');
        let out = delivery(&with_nl, "orders", 7, "drivers", 1);
        assert_eq!(
            &out[..],
            &br#"{"event":"pickup","payload":{"n":1},"stream":"orders","seq":7,"consumer":"drivers","attempt":1}
"#[..]
        );
        // A publisher's own top-level "seq" is replaced, not duplicated.
        let clash = b"{\"event\":\"x\",\"payload\":1,\"seq\":99}\n";
        let out = delivery(clash, "s", 3, "c", 2);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["seq"], 3);
        assert_eq!(value["attempt"], 2);
        assert_eq!(value["payload"], 1);
        assert!(out.ends_with(b"}\n"));
    }
}
