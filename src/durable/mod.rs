//! The *store* stage of the ingest pipeline: declared streams, publisher confirms
//! (`$stored`) and deduplication by `"id"` (issue #12).
//!
//! An event whose name matches a declared stream (the first that matches, in the
//! order declared) is appended to it; the live fan-out does not wait for that. An
//! event with a string `"id"` is answered with `$stored` once it is durable (at once,
//! with `"stream": null`, when no stream matched), and an id seen again within the
//! dedup window is neither stored nor broadcast again: it is answered
//! `"duplicate": true` with the first one's `seq` (once the first is durable).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use serde_json::json;

use crate::config::{ConfigError, Setting, Streams, MAX_DEDUP_IDS};
use crate::event::Event;
use crate::hub::{ClientId, Hub, Member};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::routing::{Pattern, Router};
use crate::store::{Recovery, SegmentLog, Store, StoreConfig};

pub(crate) mod consumer;
mod dedup;
pub(crate) mod ledger;
mod pending;

pub(crate) use consumer::Consumers;
use dedup::{Check, Seen};

/// The hub's durable side: the store and what routes events into it.
pub(crate) struct Durable {
    /// `None` when no stream is declared: ids are still confirmed and deduplicated.
    store: Option<Arc<dyn Store>>,
    /// The store when it is the embedded one (a single node).
    segment_log: Option<Arc<SegmentLog>>,
    /// The store when streams live in JetStream (a cluster node): consumers are
    /// JetStream's then, not `consumers`.
    pub(crate) jetstream: Option<Arc<crate::cluster::jetstream::JetStream>>,
    /// The declared streams' names, then their dead-letter streams' (`NAME.dead`).
    names: Vec<Arc<str>>,
    /// How many streams are declared (the first of `names`).
    declared: usize,
    /// Durable consumers (when any stream is declared).
    pub(crate) consumers: Option<Consumers>,
    /// Per stream (as `names`): the consumers to wake when it grows.
    watchers: Vec<Mutex<Vec<Arc<consumer::Consumer>>>>,
    /// How many consumers there are in `watchers` (none: nothing to wake).
    watching: std::sync::atomic::AtomicUsize,
    /// Event-name patterns to the index of their stream in `names`.
    router: Router<usize>,
    dedup: Mutex<dedup::Window>,
    /// Storage failures not reported yet, and when the last report was: a failing
    /// disk is reported once a second, not once per event.
    unreported: Mutex<(u64, Option<Instant>)>,
    /// Storage failures since the start (for `/metrics`).
    failures: std::sync::atomic::AtomicU64,
    /// The last append or read failed and no append has succeeded since.
    failing: std::sync::atomic::AtomicBool,
}

/// What the store stage decided for one event.
pub(crate) enum Verdict {
    /// Fan it out (it is being stored, or needs no storing), then send its publisher
    /// this, if anything (the confirmation of an id that no stream wanted).
    Deliver(Option<Bytes>),
    /// A duplicate: drop it (its publisher is answered).
    Drop,
}

impl Durable {
    /// Opens the store in `streams.data_dir` when any stream is declared.
    pub(crate) fn open(streams: &Streams) -> Result<(Self, Recovery), ConfigError> {
        let mut router = Router::default();
        let mut names: Vec<Arc<str>> = Vec::new();
        for (index, spec) in streams.declared.iter().enumerate() {
            for text in &spec.patterns {
                let pattern = Pattern::parse(text)
                    .map_err(|e| ConfigError::unusable(Setting::Stream, e.message))?;
                router.insert(&pattern, index);
            }
            names.push(Arc::from(spec.name.as_str()));
        }
        let declared = names.len();
        for index in 0..declared {
            let dead = format!("{}{}", names[index], crate::config::DEAD_SUFFIX);
            names.push(dead.into());
        }
        let watchers = names.iter().map(|_| Mutex::default()).collect();
        let mut jetstream = None;
        let (segment_log, consumers, recovery) = if streams.declared.is_empty() {
            // Nothing to store: no files, no writer thread.
            (None, None, Recovery::default())
        } else if let Some(engine) = &streams.jetstream {
            // A cluster node: the streams and consumers live in JetStream, no files.
            jetstream = Some(Arc::clone(&engine.0));
            (None, None, Recovery::default())
        } else {
            let mut config = StoreConfig::new(&streams.data_dir);
            config.fsync = streams.fsync;
            config.retention = streams.retention.clone();
            config.stream_retention = names
                .iter()
                .map(|name| (name.to_string(), streams.retention_of(name)))
                .collect();
            let unusable = |e: crate::store::StoreError| {
                ConfigError::unusable(
                    Setting::DataDir,
                    format!(
                        "cannot open the store in {}: {}",
                        streams.data_dir.display(),
                        chain(&e)
                    ),
                )
            };
            let mut consumer_config = config.clone();
            consumer_config.dir = streams.data_dir.join("consumers");
            let (store, mut recovery) = SegmentLog::open(config).map_err(unusable)?;
            let index = |name: &str| names.iter().position(|n| &**n == name);
            let (consumers, notes) = Consumers::open(consumer_config, index).map_err(unusable)?;
            recovery.repairs.extend(notes);
            store.around_callbacks(Arc::new(gathering_confirms));
            (Some(Arc::new(store)), Some(consumers), recovery)
        };
        let store: Option<Arc<dyn Store>> = match (&segment_log, &jetstream) {
            (Some(log), _) => Some(Arc::clone(log) as Arc<dyn Store>),
            (None, Some(js)) => Some(Arc::clone(js) as Arc<dyn Store>),
            (None, None) => None,
        };
        let durable = Durable {
            store,
            segment_log,
            jetstream,
            names,
            declared,
            consumers,
            watchers,
            watching: Default::default(),
            router,
            dedup: Mutex::new(dedup::Window::new(streams.dedup_window, MAX_DEDUP_IDS)),
            unreported: Mutex::default(),
            failures: Default::default(),
            failing: Default::default(),
        };
        if let Some(consumers) = &durable.consumers {
            for index in 0..durable.watchers.len() {
                for consumer in consumers.of_stream(index) {
                    durable.watch(consumer);
                }
            }
        }
        durable.remember_recent();
        Ok((durable, recovery))
    }

    /// Rebuilds the dedup window from the store: the ids of the events stored within
    /// it (at most the last [`MAX_DEDUP_IDS`] of each stream). A publisher whose
    /// confirmation was lost when the hub died resends, and the resend is recognised.
    fn remember_recent(&self) {
        // JetStream deduplicates by itself, within its own duplicate window.
        let Some(store) = &self.segment_log else {
            return;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let window_ms = self.lock().window().as_millis() as u64;
        let now = Instant::now();
        let mut recent = Vec::new();
        for (index, name) in self.names[..self.declared].iter().enumerate() {
            let Some(info) = store.info(name) else {
                continue;
            };
            let from = info
                .last_seq
                .saturating_sub(MAX_DEDUP_IDS as u64 - 1)
                .max(info.first_seq);
            // In batches: only the ids are kept, not the records' chunks. A store that
            // cannot be read here fails later, where it is reported.
            let mut next = from;
            while next <= info.last_seq {
                let Ok(records) = store.read(name, next, 4096) else {
                    break;
                };
                let Some(last) = records.last() else { break };
                next = last.seq + 1;
                for record in records {
                    let age = now_ms.saturating_sub(record.time_ms);
                    if let (Some(id), true) = (record.id, age <= window_ms) {
                        recent.push((record.time_ms, id, index, record.seq));
                    }
                }
            }
        }
        recent.sort_unstable_by_key(|r| r.0);
        let mut dedup = self.lock();
        for (time_ms, id, stream, seq) in recent {
            let at = now
                .checked_sub(std::time::Duration::from_millis(
                    now_ms.saturating_sub(time_ms),
                ))
                .unwrap_or(now);
            let done = Seen::Done {
                stream: Some(stream),
                seq,
            };
            dedup.insert(id.into(), at, done);
        }
    }

    /// The stream an event named `name` goes to, if any.
    fn stream_for(&self, name: &str) -> Option<usize> {
        if self.names.is_empty() {
            return None;
        }
        // Once per event: the matches go to a buffer the thread keeps.
        thread_local! {
            static MATCHED: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        MATCHED.with_borrow_mut(|matched| {
            matched.clear();
            self.router.matches(name, matched);
            matched.iter().copied().min()
        })
    }

    /// Appends a plain event (one of a run: it has no id) to its stream, if any.
    pub(crate) fn store_plain(&self, hub: &Hub, name: &str, line: impl FnOnce() -> Bytes) {
        if let Some(stream) = self.stream_for(name) {
            self.append_unconfirmed(hub, stream, line());
        }
    }

    /// Appends an event nobody waits to hear confirmed; a failure is still reported.
    fn append_unconfirmed(&self, hub: &Hub, stream: usize, line: Bytes) {
        let Some(store) = &self.store else { return };
        let hub = hub.clone();
        store.append(
            &self.names[stream],
            None,
            line,
            Box::new(move |result| match result {
                Ok(_) => hub.durable().appended(stream),
                Err(e) => hub.store_failed(chain(&e)),
            }),
        );
    }

    /// Appends `line` to stream `stream` (by index); `done` hears how it went, after
    /// the stream's consumers were woken.
    pub(crate) fn append_to(
        &self,
        hub: &Hub,
        stream: usize,
        id: Option<Arc<str>>,
        line: Bytes,
        done: crate::store::Appended,
    ) {
        let Some(store) = &self.store else {
            return done(Err(crate::store::StoreError::Closed));
        };
        let hub = hub.clone();
        store.append(
            &self.names[stream],
            id,
            line,
            Box::new(move |result| {
                if result.is_ok() {
                    hub.durable().appended(stream);
                }
                done(result);
            }),
        );
    }

    /// Stream `stream` grew: its consumers may have something to deliver.
    fn appended(&self, stream: usize) {
        self.recovered();
        if self.watching.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return;
        }
        let watchers = self.watchers[stream]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for consumer in watchers.iter() {
            consumer.wake.notify_one();
        }
    }

    /// An append succeeded: the store is failing no more.
    fn recovered(&self) {
        // Read first: the flag's cache line is written only when it changes.
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            self.failing
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A new consumer of `stream` is to be woken when it grows.
    pub(crate) fn watch(&self, consumer: Arc<consumer::Consumer>) {
        self.watching
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.watchers[consumer.stream]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(consumer);
    }

    /// The store, when streams are declared.
    pub(crate) fn segment_log(&self) -> Option<Arc<SegmentLog>> {
        self.segment_log.clone()
    }

    /// A stream's index by name (declared and dead-letter streams).
    pub(crate) fn stream_index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| &**n == name)
    }

    /// A stream's name by index.
    pub(crate) fn stream_name(&self, stream: usize) -> &str {
        &self.names[stream]
    }

    /// A stream's dead-letter stream (`None` for a dead-letter stream itself: what
    /// fails there stays there).
    pub(crate) fn dead_stream(&self, stream: usize) -> Option<usize> {
        (stream < self.declared).then_some(stream + self.declared)
    }

    /// The last seq stored (durably) in a stream; 0 when empty.
    pub(crate) fn last_seq(&self, stream: usize) -> u64 {
        self.store
            .as_ref()
            .and_then(|s| s.info(&self.names[stream]))
            .map_or(0, |i| i.last_seq)
    }

    /// Where a new consumer of `stream` starts.
    pub(crate) fn start_cursor(&self, stream: usize, start: ledger::Start) -> u64 {
        let info = self
            .store
            .as_ref()
            .and_then(|s| s.info(&self.names[stream]))
            .unwrap_or(crate::store::StreamInfo {
                first_seq: 1,
                ..Default::default()
            });
        match start {
            ledger::Start::All => info.first_seq,
            ledger::Start::New => info.last_seq + 1,
            ledger::Start::Seq(seq) => seq.max(info.first_seq),
        }
    }

    /// The store stage for one event from `from`: store it if a stream wants it, and
    /// confirm it if it has an id. `hub` is where the confirmation is sent.
    pub(crate) fn store(&self, hub: &Hub, sender: &Arc<Member>, event: &Event) -> Verdict {
        let from = sender.id;
        let stream = self.stream_for(event.name().as_str());
        let Some(id) = event.id() else {
            if let Some(stream) = stream {
                self.append_unconfirmed(hub, stream, event.line().clone());
            }
            return Verdict::Deliver(None);
        };
        // Most ids are new: the key is made once, and the map probed once for it.
        let key: Arc<str> = id.into();
        let fresh = match stream {
            Some(_) => Seen::Pending(Vec::new()),
            None => Seen::Done {
                stream: None,
                seq: 0,
            },
        };
        let now = Instant::now();
        match self.lock().check(&key, now, fresh) {
            Check::New => {}
            Check::Seen(Seen::Pending(waiting)) => {
                waiting.push(from);
                return Verdict::Drop;
            }
            Check::Seen(Seen::Done { stream, seq }) => {
                let reply = stored_frame(id, stream.map(|s| &*self.names[s]), *seq, true);
                hub.reply(from, reply);
                return Verdict::Drop;
            }
        }
        let Some(stream) = stream else {
            return Verdict::Deliver(Some(stored_frame(id, None, 0, false)));
        };
        let store = self
            .store
            .as_ref()
            .expect("a stream matched, so there is a store");
        // The sender itself, not its id: its confirmation goes straight to its queue,
        // without a look-up in the pool (on the store's writer, gathered per commit).
        let (hub, sender) = (hub.clone(), Arc::clone(sender));
        store.append(
            &self.names[stream],
            Some(Arc::clone(&key)),
            event.line().clone(),
            Box::new(move |result| hub.durable().settle(&hub, &sender, &key, stream, result)),
        );
        Verdict::Deliver(None)
    }

    /// Called from the store's writer once an event with an id is durable or failed.
    pub(crate) fn settle(
        &self,
        hub: &Hub,
        from: &Arc<Member>,
        key: &Arc<str>,
        stream: usize,
        result: Result<u64, crate::store::StoreError>,
    ) {
        let id = &**key;
        // JetStream already held the id (sent through another node, or before a
        // restart): stored once, answered as a resend.
        let (result, duplicate) = match result {
            Err(crate::store::StoreError::Duplicate(seq)) => (Ok(seq), true),
            other => (other, false),
        };
        let name = &*self.names[stream];
        let e = match result {
            Ok(seq) => {
                // Before anyone hears of it: a client told `$stored` finds the store
                // open on /metrics already (consumers are woken later, per commit).
                self.recovered();
                // On the store's writer, the ids of a whole commit are marked stored
                // under one lock once its confirmations are queued (see `Confirms`).
                let gathered = CONFIRMS.with_borrow_mut(|confirms| {
                    let Some(confirms) = confirms else {
                        return false;
                    };
                    confirms.hub.get_or_insert_with(|| hub.clone());
                    confirms.stored.push((Arc::clone(key), stream, seq));
                    if !confirms.grew.contains(&stream) {
                        confirms.grew.push(stream);
                    }
                    true
                });
                confirm(from, |out| {
                    write_stored(out, id, Some(name), seq, duplicate);
                });
                if !gathered {
                    // Elsewhere (JetStream's callbacks): the same, for this one id,
                    // its confirmation being queued already.
                    self.commit_settled(hub, vec![(Arc::clone(key), stream, seq)], vec![stream]);
                }
                return;
            }
            Err(e) => e,
        };
        // Not stored: a resend must be able to try again.
        let waiting = match self.lock().forget(id) {
            Some(Seen::Pending(waiting)) => waiting,
            _ => Vec::new(),
        };
        let error = ProtocolError::new(
            ErrorCode::Storage,
            format!(
                "event {:?} was not stored in {name}: {}; it was delivered live only",
                crate::protocol::printable(id),
                chain(&e)
            ),
        );
        // With the id, so that a client waiting for it knows which event failed.
        let frame = Event::new(
            "$error",
            &json!({"code": error.code, "message": error.message, "id": id}),
        )
        .map(|e| e.line().clone())
        .unwrap_or_else(|_| error.to_frame());
        // Counted before anyone hears of it: a client told `storage` finds
        // the failure on /metrics already.
        hub.store_failed(chain(&e));
        from.outbox.push(frame.clone());
        for client in waiting {
            hub.reply(client, frame.clone());
        }
    }

    /// The end of a commit's callbacks on the store's writer, once their
    /// confirmations are queued: marks the commit's ids stored, answers those who
    /// sent one again meanwhile (so after the first answer, when it is the same
    /// publisher; and a resend that comes later finds the id stored only once its
    /// first answer is queued), and wakes the consumers of the streams that grew.
    fn commit_settled(&self, hub: &Hub, stored: Vec<(Arc<str>, usize, u64)>, grew: Vec<usize>) {
        let now = Instant::now();
        let mut again = Vec::new();
        {
            let mut dedup = self.lock();
            for (key, stream, seq) in stored {
                for client in dedup.stored(&key, stream, seq, now) {
                    again.push((client, Arc::clone(&key), stream, seq));
                }
            }
        }
        for stream in grew {
            self.appended(stream);
        }
        for (client, id, stream, seq) in again {
            let name = Some(&*self.names[stream]);
            hub.reply(client, stored_frame(&id, name, seq, true));
        }
    }

    /// Whether a storage failure should be reported now; with how many were not.
    pub(crate) fn failure_to_report(&self) -> Option<u64> {
        self.failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut state = self
            .unreported
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (count, last) = &mut *state;
        *count += 1;
        if last.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(1)) {
            return None;
        }
        *last = Some(Instant::now());
        Some(std::mem::take(count) - 1)
    }

    /// Storage failures since the start, and whether the store is failing now (the
    /// last append or read failed and no append has succeeded since).
    pub(crate) fn failures(&self) -> (u64, bool) {
        (
            self.failures.load(std::sync::atomic::Ordering::Relaxed),
            self.failing.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, dedup::Window> {
        self.dedup.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Commits what was appended; later appends fail.
    pub(crate) fn close(&self) {
        if let Some(store) = &self.segment_log {
            store.close();
        }
        if let Some(consumers) = &self.consumers {
            consumers.close();
        }
    }

    /// Whether any stream is declared (runs then pass through the store stage).
    /// Each stream (dead-letter streams included) with its last seq, and every
    /// consumer's state: what `/metrics` and the dashboard show.
    pub(crate) fn live_info(&self) -> (Vec<(String, u64)>, Vec<crate::store::ConsumerInfo>) {
        let streams = (0..self.names.len())
            .map(|i| (self.names[i].to_string(), self.last_seq(i)))
            .collect();
        let consumers = match (&self.consumers, &self.jetstream) {
            (Some(c), _) => c.infos(|i| self.last_seq(i)),
            (None, Some(js)) => js.consumer_infos(),
            (None, None) => Vec::new(),
        };
        (streams, consumers)
    }

    pub(crate) fn has_streams(&self) -> bool {
        self.declared > 0
    }
}

/// `{"event":"$stored","payload":{"id":ID,"stream":NAME,"seq":N}}`, with
/// `"duplicate":true` for a resend.
fn stored_frame(id: &str, stream: Option<&str>, seq: u64, duplicate: bool) -> Bytes {
    let mut out = Vec::with_capacity(64 + id.len());
    write_stored(&mut out, id, stream, seq, duplicate);
    out.into()
}

/// Appends a `$stored` line to `out`. One per confirmed event, most written on the
/// store's writer thread: by hand.
fn write_stored(out: &mut Vec<u8>, id: &str, stream: Option<&str>, seq: u64, duplicate: bool) {
    out.extend_from_slice(b"{\"event\":\"$stored\",\"payload\":{\"id\":");
    serde_json::to_writer(&mut *out, id).expect("a string serialises");
    out.extend_from_slice(b",\"stream\":");
    match stream {
        Some(stream) => {
            serde_json::to_writer(&mut *out, stream).expect("a string serialises");
            out.extend_from_slice(b",\"seq\":");
            out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
        }
        None => out.extend_from_slice(b"null"),
    }
    if duplicate {
        out.extend_from_slice(b",\"duplicate\":true");
    }
    out.extend_from_slice(b"}}\n");
}

thread_local! {
    /// While the store's writer runs one commit's callbacks: the confirmations they
    /// make, each publisher's in one buffer, queued together once they have all run.
    static CONFIRMS: std::cell::RefCell<Option<Confirms>> = const { std::cell::RefCell::new(None) };
}

/// One commit's confirmations, by publisher in the order first met.
#[derive(Default)]
struct Confirms {
    /// (publisher, its confirmation lines, how many).
    to: Vec<(Arc<Member>, Vec<u8>, usize)>,
    /// Publisher id to its index in `to`.
    index: HashMap<ClientId, usize, foldhash::fast::RandomState>,
    /// The hub whose ids these are (set by the first).
    hub: Option<Hub>,
    /// Ids stored: (id, stream, seq), marked stored in the dedup window at the end.
    stored: Vec<(Arc<str>, usize, u64)>,
    /// The streams that grew, whose consumers are woken at the end (once each).
    grew: Vec<usize>,
}

/// Sends `from` the confirmation `write` makes: gathered with the others of the same
/// commit on the store's writer (one queue push and one wake-up per publisher per
/// commit, where one per event was a large part of a confirmed publish), at once
/// anywhere else (JetStream's callbacks).
fn confirm(from: &Arc<Member>, write: impl FnOnce(&mut Vec<u8>)) {
    // Handed back when nothing is gathering.
    let not_gathered = CONFIRMS.with_borrow_mut(|confirms| {
        let Some(confirms) = confirms else {
            return Some(write);
        };
        let at = *confirms.index.entry(from.id).or_insert_with(|| {
            confirms.to.push((Arc::clone(from), Vec::new(), 0));
            confirms.to.len() - 1
        });
        let (_, out, count) = &mut confirms.to[at];
        write(out);
        *count += 1;
        None
    });
    if let Some(write) = not_gathered {
        let mut out = Vec::with_capacity(96);
        write(&mut out);
        from.outbox.push(out.into());
    }
}

/// The store's [`AroundCallbacks`](crate::store::AroundCallbacks): runs one commit's
/// callbacks gathering their confirmations, then queues each publisher's at once.
fn gathering_confirms(run: &mut dyn FnMut()) {
    CONFIRMS.set(Some(Confirms::default()));
    run();
    let Some(confirms) = CONFIRMS.take() else {
        return;
    };
    for (member, lines, count) in confirms.to {
        member.outbox.push_events(lines.into(), count);
    }
    if let Some(hub) = confirms.hub {
        hub.durable()
            .commit_settled(&hub, confirms.stored, confirms.grew);
    }
}

/// An error with its causes, on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
