//! Durable streams' storage (issue #12): the [`Store`] trait the hub appends to and
//! reads from, and [`SegmentLog`], the embedded implementation.
//!
//! What a store promises: [`Store::append`] assigns each record the next `seq` of its
//! stream and calls back once the record is as durable as the [`Fsync`] policy says
//! (on disk for [`Fsync::Always`], in the operating system for [`Fsync::Never`]);
//! only then may the hub confirm it (`$stored`). Appends from every connection share
//! one writer, so one `fsync` covers every record that arrived while the previous one
//! ran (group commit). The cluster issue puts a JetStream-backed store behind the same
//! trait.
//!
//! The hub appends to it through the store stage of its ingest pipeline
//! (`hubcast serve --stream`); consumers and acks come next (issue #12 stays open
//! until they do). Embedding code can use it on its own too.
//!
//! # Examples
//!
//! ```
//! use hubcast::store::{SegmentLog, Store, StoreConfig};
//! # let dir = std::env::temp_dir().join(format!("hubcast-doc-{}", std::process::id()));
//! let (log, recovery) = SegmentLog::open(StoreConfig::new(&dir))?;
//! assert!(recovery.repairs.is_empty());
//! let (tx, rx) = std::sync::mpsc::channel();
//! let line = bytes::Bytes::from_static(b"{\"event\":\"pickup\",\"payload\":1}\n");
//! log.append("orders", Some("order-1".into()), line, Box::new(move |stored| {
//!     tx.send(stored).unwrap(); // Ok(seq), once on disk
//! }));
//! assert_eq!(rx.recv().unwrap()?, 1);
//! assert_eq!(log.read("orders", 1, 10)?[0].id.as_deref(), Some("order-1"));
//! # log.close(); std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), hubcast::store::StoreError>(())
//! ```

mod segment;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub(crate) use segment::GatheredAppends;
pub use segment::{check_name, AroundCallbacks, CommitStats, SegmentLog, MAX_ID};

/// When an appended record counts as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fsync {
    /// After it is on disk (`fsync`): survives power loss. One `fsync` per batch of
    /// appends (group commit).
    #[default]
    Always,
    /// After it is written to the operating system: survives `kill -9` of the hub,
    /// not a power loss.
    Never,
}

/// How much a stream keeps: past any limit, its oldest segments are deleted whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The most events a stream keeps (default 10,000,000).
    pub max_events: u64,
    /// The most bytes a stream's files may take (default 1 GiB).
    pub max_bytes: u64,
    /// Segments whose newest record is older than this are deleted (default: kept).
    pub max_age: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_events: 10_000_000,
            max_bytes: 1 << 30,
            max_age: None,
        }
    }
}

/// As the hub logs it: `max_events=10000000 max_bytes=1073741824 max_age=off`.
impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "max_events={} max_bytes={} max_age=",
            self.max_events, self.max_bytes
        )?;
        match self.max_age {
            Some(age) => write!(f, "{}", humantime::format_duration(age)),
            None => f.write_str("off"),
        }
    }
}

/// How a [`SegmentLog`] is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Where the store keeps its files (`DIR/streams/NAME/*.log`).
    pub dir: PathBuf,
    /// When an append counts as stored.
    pub fsync: Fsync,
    /// A segment file is closed and a new one begun past this size.
    pub segment_bytes: u64,
    /// How much each stream keeps, unless `stream_retention` says otherwise.
    pub retention: Retention,
    /// What a stream named here keeps instead of `retention`.
    pub stream_retention: std::collections::HashMap<String, Retention>,
    /// The most bytes of appends waiting for the writer: past it, appends fail at
    /// once ([`StoreError::Behind`]) rather than queue without bound when events come
    /// faster than the disk takes them (default 64 MiB).
    pub max_queued: usize,
}

impl StoreConfig {
    /// What `stream` keeps.
    pub fn retention_of(&self, stream: &str) -> &Retention {
        self.stream_retention.get(stream).unwrap_or(&self.retention)
    }

    /// The defaults (fsync always, 64 MiB segments, default retention) in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            fsync: Fsync::Always,
            segment_bytes: 64 << 20,
            retention: Retention::default(),
            stream_retention: std::collections::HashMap::new(),
            max_queued: 64 << 20,
        }
    }
}

/// One stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its place in its stream: 1, 2, ...
    pub seq: u64,
    /// When it was appended, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The publisher's `"id"`, for deduplication.
    pub id: Option<String>,
    /// The event's wire line, as the hub forwarded it.
    pub line: Bytes,
}

/// What a stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamInfo {
    /// The oldest seq still stored (the next one to be written when empty).
    pub first_seq: u64,
    /// The newest seq (0 when nothing was ever appended).
    pub last_seq: u64,
    /// Events stored.
    pub events: u64,
    /// Bytes their files take.
    pub bytes: u64,
}

/// What a durable consumer has done, as `hubcast streams` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// The stream it consumes.
    pub stream: String,
    /// Every seq up to this one is acknowledged (or not for this consumer).
    pub ack_floor: u64,
    /// Events not acknowledged yet: delivered and waiting for an ack, due again, or not
    /// delivered yet (with a filter, those count whether or not they match).
    pub pending: u64,
    /// Deliveries out to a connection now, waiting for their ack.
    pub in_flight: u64,
    /// Acks received.
    pub acked: u64,
    /// Deliveries that were a second or later attempt.
    pub redelivered: u64,
    /// Events moved to the dead-letter stream after `max_deliver` attempts.
    pub dead_lettered: u64,
}

/// The durable consumers kept in the store in `dir` (a hub's `--data-dir`), read
/// without changing anything: safe beside a running hub (what it has not finished
/// writing is not read).
///
/// # Errors
///
/// When the store cannot be read.
pub fn consumers(dir: &std::path::Path) -> Result<Vec<ConsumerInfo>, StoreError> {
    let log_dir = dir.join("consumers");
    if !log_dir.join("streams").is_dir() {
        return Ok(Vec::new());
    }
    let streams = SegmentLog::open_read_only(dir)?;
    let ledgers = crate::durable::consumer::read_only(&log_dir)?;
    Ok(ledgers
        .into_iter()
        .map(|(name, ledger)| {
            let last_seq = streams.info(&ledger.spec.stream).map_or(0, |i| i.last_seq);
            ledger.info(&name, last_seq)
        })
        .collect())
}

/// What opening a store found and repaired.
#[derive(Debug, Default)]
pub struct Recovery {
    /// One line per repair (a torn or corrupted tail cut), for the log.
    pub repairs: Vec<String>,
}

/// A storage failure: disk full, an I/O error, a corrupted record.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file operation failed (disk full, permissions, an I/O error).
    #[error("storage I/O failed ({context})")]
    Io {
        /// What the store was doing.
        context: String,
        /// The failure.
        #[source]
        source: crate::IoError,
    },
    /// A bad request (a stream name, an id too long) or a corrupted record.
    #[error("{0}")]
    Invalid(String),
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// Appends come faster than the disk takes them: this one was not queued.
    #[error("the store is {0} bytes behind (events arrive faster than the disk takes them)")]
    Behind(usize),
    /// A store that deduplicates by id itself (JetStream, within its duplicate
    /// window) already holds this event's id: not stored again; the first one's seq.
    /// Not a failure: the publisher is answered `"duplicate": true`.
    #[error("already stored as seq {0}")]
    Duplicate(u64),
    /// The engine that keeps the streams (JetStream) did not take or confirm the
    /// event: it may or may not be stored; a resend with the same id is safe.
    #[error("{0}")]
    Engine(String),
}

impl StoreError {
    /// An I/O failure while doing `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Called once an append is stored (with its seq) or has failed.
pub type Appended = Box<dyn FnOnce(Result<u64, StoreError>) + Send>;

/// Where streams are kept.
pub trait Store: Send + Sync {
    /// Appends `line` to `stream`, creating the stream if needed; `done` is called from
    /// the store's writer once the record is durable (or failed). Never blocks.
    fn append(&self, stream: &str, id: Option<Arc<str>>, line: Bytes, done: Appended);

    /// Up to `max` records of `stream` from `seq` on (those retention deleted are
    /// skipped), in order.
    fn read(&self, stream: &str, seq: u64, max: usize) -> Result<Vec<Record>, StoreError>;

    /// What `stream` holds, if it exists.
    fn info(&self, stream: &str) -> Option<StreamInfo>;
}
