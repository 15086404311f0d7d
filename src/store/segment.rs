//! [`SegmentLog`]: each stream is a directory of append-only segment files, every
//! record checksummed; one writer thread commits the appends of all streams in
//! batches (one `fsync` per touched file per batch).
//!
//! ```text
//! DIR/streams/NAME/00000000000000000001.log     records 1 ..
//!                  00000000000000052311.log     records 52,311 .. (the active one)
//!
//! record: len u32 | crc32 u32 | seq u64 | time_ms u64 | id_len u16 | id | line
//!         (little-endian; the CRC covers everything after it, `len` counts it too)
//! ```
//!
//! A crash can leave the active segment with a torn last record (a short or partly
//! written one): opening the store checks the active segment record by record and cuts
//! it after the last valid one, saying what it cut ([`Recovery`]). Closed segments
//! were synced before the next one began; a record there that fails its checksum is an
//! error when read, never skipped silently.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};

use super::{Appended, Fsync, Record, Recovery, Store, StoreConfig, StoreError, StreamInfo};

/// Bytes before a record's body: its length and checksum.
const HEADER: usize = 8;
/// The fixed part of a body: seq, time, id length.
const FIXED: usize = 8 + 8 + 2;
/// The longest `"id"` a record keeps.
pub const MAX_ID: usize = 128;
/// The longest record body: a frame is at most a few MiB; past this is corruption.
const MAX_BODY: usize = 256 << 20;
/// Appends committed in one batch at most (one write and one fsync per file).
const MAX_BATCH: usize = 4096;
/// One index entry per this many records: reads start near their seq.
const INDEX_EVERY: u64 = 256;

/// One segment file.
#[derive(Debug, Clone)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    /// Records in it, and its size in bytes.
    events: u64,
    bytes: u64,
    /// Every [`INDEX_EVERY`]th record's (seq, offset); empty until needed.
    index: Vec<(u64, u64)>,
}

/// What readers and the writer share about one stream.
#[derive(Debug)]
struct Meta {
    dir: PathBuf,
    /// Oldest first; the last is the active one.
    segments: Vec<Segment>,
    /// The last committed seq (readers never go past it).
    last_seq: u64,
}

impl Meta {
    fn info(&self) -> StreamInfo {
        let first_seq = self
            .segments
            .first()
            .map_or(self.last_seq + 1, |s| s.first_seq);
        StreamInfo {
            first_seq,
            last_seq: self.last_seq,
            events: self.segments.iter().map(|s| s.events).sum(),
            bytes: self.segments.iter().map(|s| s.bytes).sum(),
        }
    }
}

type Streams = Arc<Mutex<HashMap<String, Meta>>>;

struct Op {
    /// Shared by the ops of one stream a thread gathers (see [`SegmentLog::gather`]).
    stream: Arc<str>,
    id: Option<Arc<str>>,
    line: Bytes,
    done: Appended,
}

/// Runs a commit's callbacks (the function it is given), around them whatever its
/// owner wants done once per commit: see [`SegmentLog::around_callbacks`].
pub type AroundCallbacks = Arc<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

/// The embedded store: see the module docs.
pub struct SegmentLog {
    streams: Streams,
    /// Set once, read by the writer for every commit.
    around: Arc<std::sync::OnceLock<AroundCallbacks>>,
    /// How long commits take and how many events each carries.
    commits: Arc<CommitStats>,
    /// Bytes of appends sent to the writer and not yet committed.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    /// Shared with threads gathering appends (see [`GatheredAppends`]): they send
    /// through it when they are done, and find it empty once the log is closed.
    ops: Arc<Mutex<Option<mpsc::Sender<Ops>>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// What the writer is sent: an append, or those a thread gathered (see
/// [`GatheredAppends`]).
enum Ops {
    One(Op),
    Many(Vec<Op>),
}

thread_local! {
    /// While a thread gathers its appends: per log (by address), its writer's channel,
    /// its queued-bytes counter and the appends, in order.
    static GATHERED: std::cell::RefCell<Option<Vec<Gathered>>> =
        const { std::cell::RefCell::new(None) };
}

struct Gathered {
    log: usize,
    ops: Arc<Mutex<Option<mpsc::Sender<Ops>>>>,
    queued: Arc<AtomicUsize>,
    appends: Vec<Op>,
}

/// While it lives, this thread's appends to any [`SegmentLog`] are held and sent to
/// each log's writer together when it is dropped: one send and one wake-up for all
/// the events of a read, so that the writer commits them together. (A publisher
/// whose events were sent one by one had the writer wake for the first of them and
/// commit 8 events at a time.) Nested, only the outermost sends. Hold it only for
/// work that does not wait: nothing is sent before it is dropped.
pub(crate) struct GatheredAppends {
    outermost: bool,
}

impl GatheredAppends {
    pub(crate) fn begin() -> Self {
        let outermost = GATHERED.with_borrow_mut(|gathered| {
            if gathered.is_some() {
                return false;
            }
            *gathered = Some(Vec::new());
            true
        });
        GatheredAppends { outermost }
    }
}

/// Sends `ops` to the writer behind `slot`; if the log is closed, each fails `Closed`
/// and no longer counts as queued.
fn send(slot: &Mutex<Option<mpsc::Sender<Ops>>>, queued: &AtomicUsize, ops: Ops) {
    let refused = match lock(slot).as_ref() {
        Some(tx) => match tx.send(ops) {
            Ok(()) => return,
            Err(mpsc::SendError(ops)) => ops,
        },
        None => ops,
    };
    let refused = match refused {
        Ops::One(op) => vec![op],
        Ops::Many(ops) => ops,
    };
    for op in refused {
        queued.fetch_sub(op_size(&op.line, op.id.as_deref()), Ordering::AcqRel);
        (op.done)(Err(StoreError::Closed));
    }
}

impl Drop for GatheredAppends {
    fn drop(&mut self) {
        if !self.outermost {
            return;
        }
        let Some(gathered) = GATHERED.take() else {
            return;
        };
        for Gathered {
            ops,
            queued,
            appends,
            ..
        } in gathered
        {
            // Closed meanwhile: as appends made after the close.
            send(&ops, &queued, Ops::Many(appends));
        }
    }
}

impl SegmentLog {
    /// Opens (or creates) the store in `config.dir`, repairing torn tails.
    ///
    /// # Errors
    ///
    /// When the directory cannot be created or read.
    pub fn open(config: StoreConfig) -> Result<(Self, Recovery), StoreError> {
        let root = config.dir.join("streams");
        fs::create_dir_all(&root)
            .map_err(|e| StoreError::io(format!("creating {}", root.display()), e))?;
        let mut recovery = Recovery::default();
        let streams = scan(&root, Some(&mut recovery))?;
        let streams: Streams = Arc::new(Mutex::new(streams));
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let max_queued = config.max_queued;
        let commits = Arc::new(CommitStats::default());
        let around = Arc::new(std::sync::OnceLock::new());
        let writer = Writer {
            around: Arc::clone(&around),
            commits: Arc::clone(&commits),
            config,
            root,
            streams: Arc::clone(&streams),
            files: HashMap::new(),
            queued: Arc::clone(&queued),
        };
        let handle = std::thread::Builder::new()
            .name("hubcast-store".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::io("starting the store's writer thread", e))?;
        Ok((
            SegmentLog {
                streams,
                around,
                commits,
                queued,
                max_queued,
                ops: Arc::new(Mutex::new(Some(tx))),
                writer: Mutex::new(Some(handle)),
            },
            recovery,
        ))
    }

    /// Opens the store in `dir` to read only, changing nothing: safe beside a hub that
    /// is writing to it (what that hub has not finished writing is not read). Appends
    /// fail with [`StoreError::Closed`].
    ///
    /// # Errors
    ///
    /// When `dir` holds no store, or cannot be read.
    pub fn open_read_only(dir: &Path) -> Result<Self, StoreError> {
        let root = dir.join("streams");
        let streams = scan(&root, None)?;
        Ok(SegmentLog {
            streams: Arc::new(Mutex::new(streams)),
            around: Arc::default(),
            commits: Arc::default(),
            queued: Arc::default(),
            max_queued: 0,
            ops: Arc::new(Mutex::new(None)),
            writer: Mutex::new(None),
        })
    }

    /// Has the writer run each commit's callbacks inside `around` (on its own thread,
    /// once per commit): a caller whose callbacks each queue a little work can gather
    /// it and do it once per commit. Set once; later calls change nothing and return
    /// `false`.
    pub fn around_callbacks(&self, around: AroundCallbacks) -> bool {
        self.around.set(around).is_ok()
    }

    /// How its group commits went so far.
    pub fn commit_stats(&self) -> &CommitStats {
        &self.commits
    }

    /// The streams the store holds, by name.
    pub fn streams(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.streams).keys().cloned().collect();
        names.sort();
        names
    }
}

/// Reads every stream's segment list under `root`; with `recovery`, repairs torn tails.
fn scan(
    root: &Path,
    mut recovery: Option<&mut Recovery>,
) -> Result<HashMap<String, Meta>, StoreError> {
    let mut streams = HashMap::new();
    let entries =
        fs::read_dir(root).map_err(|e| StoreError::io(format!("reading {}", root.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("listing streams", e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if check_name(&name).is_err() || !entry.path().is_dir() {
            continue;
        }
        let meta = open_stream(&entry.path(), &name, recovery.as_deref_mut())?;
        streams.insert(name, meta);
    }
    Ok(streams)
}

impl SegmentLog {
    /// Adds index entries a read found past what a segment's index knew.
    fn learn(&self, stream: &str, first_seq: u64, learned: Vec<(u64, u64)>) {
        if learned.is_empty() {
            return;
        }
        let mut streams = lock(&self.streams);
        let Some(segment) = streams
            .get_mut(stream)
            .and_then(|m| m.segments.iter_mut().find(|s| s.first_seq == first_seq))
        else {
            return;
        };
        // The writer may have indexed the active segment further meanwhile.
        let last = segment.index.last().map_or(0, |&(s, _)| s);
        segment
            .index
            .extend(learned.into_iter().filter(|&(s, _)| s > last));
    }

    /// Deletes `stream`'s closed segments that hold only records before `seq`, as
    /// retention does; returns how many records went. For logs whose older records a
    /// later one supersedes (the hub's consumer log).
    ///
    /// # Errors
    ///
    /// When a segment file cannot be deleted (what was deleted before it stays so).
    pub fn trim(&self, stream: &str, seq: u64) -> Result<u64, StoreError> {
        let mut streams = lock(&self.streams);
        let Some(meta) = streams.get_mut(stream) else {
            return Ok(0);
        };
        let mut removed = 0;
        while meta.segments.len() > 1 && meta.segments[1].first_seq <= seq {
            let path = meta.segments[0].path.clone();
            fs::remove_file(&path)
                .map_err(|e| StoreError::io(format!("deleting {}", path.display()), e))?;
            removed += meta.segments.remove(0).events;
        }
        Ok(removed)
    }

    /// Commits what was appended, then stops the writer. Later appends fail.
    pub fn close(&self) {
        drop(lock(&self.ops).take());
        if let Some(handle) = lock(&self.writer).take() {
            // Closed from one of its own callbacks (the last owner of the store let go
            // there): the writer ends by itself once the batch is done.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

impl Drop for SegmentLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stream names become directory names: letters, digits, `-`, `_` and `.` (not
/// leading), at most 64 bytes.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "stream name {name:?}: use at most 64 letters, digits, '-', '_' or '.' (not first)"
        )))
    }
}

impl SegmentLog {
    /// Holds the op `make` builds for `stream` among this thread's gathered appends,
    /// if it gathers them (see [`GatheredAppends`]); hands it back otherwise, or if
    /// the log is closed. Gathered ops of one stream share its name.
    fn gather(&self, stream: &str, make: impl FnOnce(Arc<str>) -> Op) -> Option<Op> {
        let log = self as *const SegmentLog as usize;
        GATHERED.with_borrow_mut(|gathered| {
            let Some(gathered) = gathered else {
                return Some(make(stream.into()));
            };
            // Mostly one log per thread at a time: the last one is looked at first.
            if let Some(mine) = gathered.iter_mut().rev().find(|g| g.log == log) {
                let name = match mine.appends.last() {
                    Some(last) if *last.stream == *stream => Arc::clone(&last.stream),
                    _ => stream.into(),
                };
                mine.appends.push(make(name));
                return None;
            }
            let op = make(stream.into());
            if lock(&self.ops).is_none() {
                return Some(op);
            }
            gathered.push(Gathered {
                log,
                ops: Arc::clone(&self.ops),
                queued: Arc::clone(&self.queued),
                appends: vec![op],
            });
            None
        })
    }
}

impl Store for SegmentLog {
    fn append(&self, stream: &str, id: Option<Arc<str>>, line: Bytes, done: Appended) {
        if let Err(e) = check_name(stream) {
            return done(Err(e));
        }
        if id.as_ref().is_some_and(|id| id.len() > MAX_ID) {
            return done(Err(StoreError::Invalid(format!(
                "an id is at most {MAX_ID} bytes"
            ))));
        }
        let size = op_size(&line, id.as_deref());
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        if before + size > self.max_queued && before > 0 {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            return done(Err(StoreError::Behind(before)));
        }
        let make = |stream| Op {
            stream,
            id,
            line,
            done,
        };
        let Some(op) = self.gather(stream, make) else {
            return;
        };
        send(&self.ops, &self.queued, Ops::One(op));
    }

    fn read(&self, stream: &str, seq: u64, max: usize) -> Result<Vec<Record>, StoreError> {
        // A snapshot: the writer may go on while we read files.
        let (segments, last_seq) = {
            let streams = lock(&self.streams);
            let Some(meta) = streams.get(stream) else {
                return Ok(Vec::new());
            };
            let from = meta
                .segments
                .partition_point(|s| s.first_seq <= seq)
                .saturating_sub(1);
            (meta.segments[from..].to_vec(), meta.last_seq)
        };
        let mut out = Vec::new();
        for (i, segment) in segments.iter().enumerate() {
            if out.len() >= max || seq > last_seq {
                break;
            }
            let start = segment
                .index
                .iter()
                .take_while(|(s, _)| *s <= seq)
                .last()
                .map_or(0, |&(_, offset)| offset);
            let mut reader = RecordReader::open(&segment.path, start)?;
            // A closed segment's index is built by the reads that pass through it, so
            // a reader going through a stream in batches does not rescan each segment
            // from its start for every batch.
            let known = segment.index.last().map_or(0, |&(s, _)| s);
            let mut learned = Vec::new();
            while out.len() < max {
                let offset = reader.offset;
                let next = reader.next();
                if let Ok(Some(record)) = &next {
                    if record.seq > known
                        && (record.seq - segment.first_seq).is_multiple_of(INDEX_EVERY)
                    {
                        learned.push((record.seq, offset));
                    }
                }
                match next {
                    Ok(Some(record)) if record.seq > last_seq => break,
                    Ok(Some(record)) if record.seq >= seq => out.push(record),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(bad) if i + 1 == segments.len() && bad.torn => break,
                    Err(bad) => {
                        return Err(StoreError::Invalid(format!(
                            "{} is corrupted at byte {}: {}",
                            segment.path.display(),
                            bad.offset,
                            bad.why
                        )))
                    }
                }
            }
            self.learn(stream, segment.first_seq, learned);
        }
        Ok(out)
    }

    fn info(&self, stream: &str) -> Option<StreamInfo> {
        lock(&self.streams).get(stream).map(Meta::info)
    }
}

/// Why a record could not be read.
#[derive(Debug)]
struct BadRecord {
    offset: u64,
    why: String,
    /// It ends short (the file ends inside it): a torn write, if this is the tail.
    torn: bool,
}

/// Reads records one after another from a segment file, in large chunks: each record
/// is a slice of its chunk (no allocation or copy per record).
struct RecordReader {
    file: File,
    /// Read from the file and not yet returned.
    chunk: BytesMut,
    offset: u64,
    len: u64,
}

/// How much a reader takes from its file at a time.
const CHUNK: usize = 256 << 10;

impl RecordReader {
    fn open(path: &Path, offset: u64) -> Result<Self, StoreError> {
        let mut file = File::open(path)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?
            .len();
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        Ok(RecordReader {
            file,
            chunk: BytesMut::new(),
            offset,
            len,
        })
    }

    /// Makes sure `n` bytes from the current offset are in the chunk (the caller has
    /// checked that the file holds them).
    fn fill(&mut self, n: usize) -> std::io::Result<()> {
        if self.chunk.len() >= n {
            return Ok(());
        }
        let want = n.max(CHUNK);
        let have = self.chunk.len();
        self.chunk.reserve(want - have);
        // Read at most what the file holds past the chunk.
        let left = (self.len - self.offset) as usize - have;
        let goal = want.min(have + left).max(n);
        while self.chunk.len() < goal {
            let start = self.chunk.len();
            self.chunk.resize(goal, 0);
            let read = self.file.read(&mut self.chunk[start..])?;
            self.chunk.truncate(start + read);
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    /// The next record, `None` at the end of the file.
    fn next(&mut self) -> Result<Option<Record>, BadRecord> {
        let at = self.offset;
        let bad = |why: String, torn: bool| BadRecord {
            offset: at,
            why,
            torn,
        };
        if at == self.len {
            return Ok(None);
        }
        if self.len - at < HEADER as u64 {
            return Err(bad("a record header cut short".into(), true));
        }
        self.fill(HEADER).map_err(|e| bad(e.to_string(), false))?;
        let body_len = u32::from_le_bytes(self.chunk[..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(self.chunk[4..HEADER].try_into().unwrap());
        if !(FIXED..=MAX_BODY).contains(&body_len) {
            return Err(bad(format!("a record length of {body_len} bytes"), false));
        }
        if self.len - at - (HEADER as u64) < body_len as u64 {
            return Err(bad(
                format!("a {body_len}-byte record cut short at the end of the file"),
                true,
            ));
        }
        self.fill(HEADER + body_len)
            .map_err(|e| bad(e.to_string(), false))?;
        if crc32fast::hash(&self.chunk[HEADER..HEADER + body_len]) != crc {
            return Err(bad("a checksum mismatch".into(), false));
        }
        let mut body = self.chunk.split_to(HEADER + body_len).freeze();
        let body = body.split_off(HEADER);
        let record = decode(body).map_err(|why| bad(why, false))?;
        self.offset = at + (HEADER + body_len) as u64;
        Ok(Some(record))
    }
}

fn encode(out: &mut Vec<u8>, seq: u64, time_ms: u64, id: Option<&str>, line: &[u8]) {
    let id = id.unwrap_or("").as_bytes();
    let body_len = FIXED + id.len() + line.len();
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time_ms.to_le_bytes());
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(line);
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
}

fn decode(body: Bytes) -> Result<Record, String> {
    let seq = u64::from_le_bytes(body[..8].try_into().unwrap());
    let time_ms = u64::from_le_bytes(body[8..16].try_into().unwrap());
    let id_len = u16::from_le_bytes(body[16..18].try_into().unwrap()) as usize;
    if FIXED + id_len > body.len() {
        return Err(format!("an id of {id_len} bytes in a shorter record"));
    }
    let id = match id_len {
        0 => None,
        _ => Some(
            std::str::from_utf8(&body[FIXED..FIXED + id_len])
                .map_err(|_| "an id that is not UTF-8".to_string())?
                .to_owned(),
        ),
    };
    Ok(Record {
        seq,
        time_ms,
        id,
        line: body.slice(FIXED + id_len..),
    })
}

/// What one waiting append counts against [`StoreConfig::max_queued`].
fn op_size(line: &[u8], id: Option<&str>) -> usize {
    line.len() + id.map_or(0, str::len) + 64
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

/// Lists a stream's segments and checks its active (last) one record by record,
/// cutting a torn or corrupted tail.
fn open_stream(
    dir: &Path,
    name: &str,
    recovery: Option<&mut Recovery>,
) -> Result<Meta, StoreError> {
    let listing =
        fs::read_dir(dir).map_err(|e| StoreError::io(format!("reading {}", dir.display()), e))?;
    let mut segments = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| StoreError::io(format!("reading {}", dir.display()), e))?;
        let file_name = entry.file_name();
        let Some(first_seq) = file_name
            .to_str()
            .and_then(|f| f.strip_suffix(".log"))
            .and_then(|f| f.parse::<u64>().ok())
        else {
            continue;
        };
        let bytes = entry
            .metadata()
            .map_err(|e| StoreError::io(format!("reading {}", entry.path().display()), e))?
            .len();
        segments.push(Segment {
            first_seq,
            path: entry.path(),
            events: 0,
            bytes,
            index: Vec::new(),
        });
    }
    segments.sort_by_key(|s| s.first_seq);
    // Closed segments hold exactly the seqs up to the next one's first.
    for i in 1..segments.len() {
        segments[i - 1].events = segments[i].first_seq - segments[i - 1].first_seq;
    }
    let mut last_seq = segments.last().map_or(0, |s| s.first_seq - 1);
    if let Some(active) = segments.last_mut() {
        let mut reader = RecordReader::open(&active.path, 0)?;
        let mut expected = active.first_seq;
        let cut = loop {
            let offset = reader.offset;
            match reader.next() {
                Ok(Some(record)) if record.seq == expected => {
                    if (record.seq - active.first_seq).is_multiple_of(INDEX_EVERY) {
                        active.index.push((record.seq, offset));
                    }
                    expected += 1;
                }
                Ok(Some(record)) => {
                    break Some((
                        offset,
                        format!("seq {} where {expected} was due", record.seq),
                    ))
                }
                Ok(None) => break None,
                Err(bad) => break Some((bad.offset, bad.why)),
            }
        };
        active.events = expected - active.first_seq;
        last_seq = expected - 1;
        // Read-only: the tail is left as it is (a writer may be in the middle of it).
        if let (Some((offset, why)), Some(recovery)) = (cut, recovery) {
            let file = OpenOptions::new()
                .write(true)
                .open(&active.path)
                .map_err(|e| StoreError::io(format!("repairing {}", active.path.display()), e))?;
            file.set_len(offset)
                .and_then(|()| file.sync_all())
                .map_err(|e| StoreError::io(format!("repairing {}", active.path.display()), e))?;
            recovery.repairs.push(format!(
                "stream {name}: cut {} bytes after seq {last_seq} at the end of {} ({why})",
                active.bytes - offset,
                active.path.display()
            ));
            active.bytes = offset;
        }
    }
    Ok(Meta {
        dir: dir.to_owned(),
        segments,
        last_seq,
    })
}

/// How the writer's group commits went: for `/metrics`.
#[derive(Debug)]
pub struct CommitStats {
    /// Seconds per commit (the write, and the fsync when `--fsync always`).
    pub latency: crate::metrics::Histogram,
    /// Events per commit.
    pub batch: crate::metrics::Histogram,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            latency: crate::metrics::Histogram::new(crate::metrics::COMMIT_BUCKETS),
            batch: crate::metrics::Histogram::new(crate::metrics::BATCH_BUCKETS),
        }
    }
}

/// The writer thread's state: the active segment of each stream it has written to.
struct Writer {
    around: Arc<std::sync::OnceLock<AroundCallbacks>>,
    commits: Arc<CommitStats>,
    config: StoreConfig,
    root: PathBuf,
    streams: Streams,
    files: HashMap<String, File>,
    /// The log's count of bytes waiting, given back as batches are taken.
    queued: Arc<AtomicUsize>,
}

/// One batch's records for one stream.
struct Pending {
    bytes: Vec<u8>,
    /// (seq, offset in `bytes`) of each record.
    records: Vec<(u64, usize)>,
    done: Vec<(u64, Appended)>,
    /// The stream's last seq before this batch.
    base: u64,
}

/// Adds what the writer was sent to its batch.
fn take(batch: &mut Vec<Op>, ops: Ops) {
    match ops {
        Ops::One(op) => batch.push(op),
        Ops::Many(ops) if batch.is_empty() => *batch = ops,
        Ops::Many(ops) => batch.extend(ops),
    }
}

impl Writer {
    fn run(mut self, ops: mpsc::Receiver<Ops>) {
        // Blocks for the first append, then takes whatever else is waiting: everything
        // that arrived during the last fsync shares the next one.
        while let Ok(first) = ops.recv() {
            let mut batch = Vec::new();
            take(&mut batch, first);
            while batch.len() < MAX_BATCH {
                match ops.try_recv() {
                    Ok(more) => take(&mut batch, more),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Op>) {
        let taken: usize = batch
            .iter()
            .map(|op| op_size(&op.line, op.id.as_deref()))
            .sum();
        self.queued.fetch_sub(taken, Ordering::AcqRel);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as u64;
        // Per stream, in the order first met. A batch is mostly of one stream, so each
        // op is first compared with the one before it: no hashing per op.
        let mut pending: Vec<(Arc<str>, Pending)> = Vec::new();
        let mut index: HashMap<Arc<str>, usize, foldhash::fast::RandomState> = HashMap::default();
        let mut last = usize::MAX;
        {
            // Seqs are handed out under the lock; readers see them only once committed
            // (`last_seq` moves after the write).
            let mut streams = lock(&self.streams);
            for op in batch {
                let same = pending
                    .get(last)
                    .is_some_and(|(name, _)| **name == *op.stream);
                if !same {
                    if let Some(&at) = index.get(&*op.stream) {
                        last = at;
                    } else {
                        let base = match self.last_seq_of(&mut streams, &op.stream) {
                            Ok(base) => base,
                            Err(e) => {
                                (op.done)(Err(e));
                                continue;
                            }
                        };
                        last = pending.len();
                        index.insert(Arc::clone(&op.stream), last);
                        let batch = Pending {
                            bytes: Vec::new(),
                            records: Vec::new(),
                            done: Vec::new(),
                            base,
                        };
                        pending.push((op.stream, batch));
                    }
                }
                let entry = &mut pending[last].1;
                let seq = entry.base + 1 + entry.records.len() as u64;
                entry.records.push((seq, entry.bytes.len()));
                encode(&mut entry.bytes, seq, now, op.id.as_deref(), &op.line);
                entry.done.push((seq, op.done));
            }
        }
        let mut results = Vec::with_capacity(pending.len());
        let began = std::time::Instant::now();
        let mut events = 0;
        for (stream, batch) in &pending {
            events += batch.records.len() as u64;
            results.push(self.write(stream, batch));
        }
        if events > 0 {
            self.commits.latency.record(began.elapsed());
            self.commits.batch.record_count(events);
        }
        // Only now (written, and synced if asked) does anyone hear of it: readers see
        // the new records, then the callbacks run, without the lock (a callback may
        // read or trim this very log).
        let mut outcomes = Vec::with_capacity(pending.len());
        {
            let mut streams = lock(&self.streams);
            for ((stream, batch), result) in pending.into_iter().zip(results) {
                match result {
                    Ok(()) => {
                        if let Some(meta) = streams.get_mut(&*stream) {
                            meta.last_seq += batch.records.len() as u64;
                            self.retain(&stream, meta, now);
                        }
                        outcomes.push((Ok(()), batch.done));
                    }
                    Err(e) => {
                        // Nothing of the batch counts: the file is cut back on the next
                        // open, and the next batch starts a new segment.
                        self.files.remove(&*stream);
                        outcomes.push((Err(e), batch.done));
                    }
                }
            }
        }
        let mut outcomes = Some(outcomes);
        let mut run = || {
            for (result, done) in outcomes.take().into_iter().flatten() {
                for (seq, done) in done {
                    done(result.clone().map(|()| seq));
                }
            }
        };
        if let Some(around) = self.around.get() {
            around(&mut run);
        }
        // Whatever `around` did, every callback runs (once: `outcomes` is taken).
        run();
    }

    /// The last seq of `stream`, created (its directory) if it is new.
    fn last_seq_of(
        &self,
        streams: &mut HashMap<String, Meta>,
        stream: &str,
    ) -> Result<u64, StoreError> {
        if let Some(meta) = streams.get(stream) {
            return Ok(meta.last_seq);
        }
        let dir = self.root.join(stream);
        fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        let meta = Meta {
            dir,
            segments: Vec::new(),
            last_seq: 0,
        };
        streams.insert(stream.to_owned(), meta);
        Ok(0)
    }

    /// Writes one stream's part of a batch to its active segment (starting a new one
    /// if it is full), then syncs it if the policy says so.
    fn write(&mut self, stream: &str, batch: &Pending) -> Result<(), StoreError> {
        let first_seq = batch.records[0].0;
        let (path, offset) = {
            let mut streams = lock(&self.streams);
            let meta = streams
                .get_mut(stream)
                .expect("created with its first append");
            let full = meta
                .segments
                .last()
                .is_none_or(|s| s.bytes >= self.config.segment_bytes);
            if full || !self.files.contains_key(stream) {
                if let Some(file) = self.files.remove(stream) {
                    // Closed segments are on disk before the next one begins.
                    file.sync_all()
                        .map_err(|e| StoreError::io(format!("syncing stream {stream}"), e))?;
                }
            }
            if full {
                meta.segments.push(Segment {
                    first_seq,
                    path: segment_path(&meta.dir, first_seq),
                    events: 0,
                    bytes: 0,
                    index: Vec::new(),
                });
            }
            let active = meta.segments.last().expect("pushed above");
            (active.path.clone(), active.bytes)
        };
        if !self.files.contains_key(stream) {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
            // A failed batch may have left bytes past what was committed.
            file.set_len(offset)
                .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
            if offset == 0 {
                sync_dir(path.parent().expect("a segment is in a directory"))?;
            }
            self.files.insert(stream.to_owned(), file);
        }
        let file = self.files.get_mut(stream).expect("opened above");
        file.write_all(&batch.bytes)
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        if self.config.fsync == Fsync::Always {
            file.sync_data()
                .map_err(|e| StoreError::io(format!("syncing {}", path.display()), e))?;
        }
        let mut streams = lock(&self.streams);
        let active = streams
            .get_mut(stream)
            .and_then(|m| m.segments.last_mut())
            .expect("the active segment");
        for &(seq, at) in &batch.records {
            if (seq - active.first_seq).is_multiple_of(INDEX_EVERY) {
                active.index.push((seq, offset + at as u64));
            }
        }
        active.events += batch.records.len() as u64;
        active.bytes += batch.bytes.len() as u64;
        Ok(())
    }

    /// Deletes a stream's oldest segments (never the active one) while it is over a
    /// retention limit.
    fn retain(&self, stream: &str, meta: &mut Meta, now_ms: u64) {
        let limits = self.config.retention_of(stream);
        while meta.segments.len() > 1 {
            let info = meta.info();
            let oldest = &meta.segments[0];
            let too_old = limits.max_age.is_some_and(|age| {
                fs::metadata(&oldest.path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .is_some_and(|t| (t.as_millis() as u64) + (age.as_millis() as u64) < now_ms)
            });
            if info.events <= limits.max_events && info.bytes <= limits.max_bytes && !too_old {
                break;
            }
            let oldest = meta.segments.remove(0);
            // A failed delete is retried at the next commit; the records stay readable.
            if fs::remove_file(&oldest.path).is_err() {
                meta.segments.insert(0, oldest);
                break;
            }
        }
    }
}

/// Makes a new file's name durable (its directory entry).
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("syncing {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "hubcast-store-{tag}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn line(n: u64) -> Bytes {
        Bytes::from(format!("{{\"event\":\"e\",\"payload\":{n}}}\n"))
    }

    /// Appends `lines` to `stream` and waits until all are stored; returns their seqs.
    fn append_all(log: &SegmentLog, stream: &str, lines: impl Iterator<Item = Bytes>) -> Vec<u64> {
        let (tx, rx) = channel();
        let mut count = 0;
        for line in lines {
            let tx = tx.clone();
            log.append(
                stream,
                Some(format!("id-{count}").into()),
                line,
                Box::new(move |r| {
                    tx.send(r).unwrap();
                }),
            );
            count += 1;
        }
        (0..count).map(|_| rx.recv().unwrap().unwrap()).collect()
    }

    /// The hook set with `around_callbacks` wraps each commit's callbacks: every
    /// callback runs inside it, once; a hook that forgets to run them loses none.
    #[test]
    fn callbacks_run_inside_the_around_hook_and_never_get_lost() {
        thread_local! {
            static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        let dir = temp_dir("around");
        let (log, _) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
        let commits = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&commits);
        assert!(log.around_callbacks(Arc::new(move |run: &mut dyn FnMut()| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            // Every other commit, the hook does not run them itself.
            if n.is_multiple_of(2) {
                INSIDE.set(true);
                run();
                INSIDE.set(false);
            }
        })));
        assert!(!log.around_callbacks(Arc::new(|run: &mut dyn FnMut()| run())));
        let (tx, rx) = channel();
        let mut heard = Vec::new();
        // One commit at a time: the first runs its callback inside the hook, the
        // second's hook does not run it, and it runs all the same.
        for n in 0..4 {
            let tx = tx.clone();
            log.append(
                "orders",
                None,
                line(n),
                Box::new(move |r| tx.send((r.unwrap(), INSIDE.get())).unwrap()),
            );
            heard.push(rx.recv().unwrap());
        }
        assert_eq!(heard, [(1, true), (2, false), (3, true), (4, false)]);
        assert_eq!(commits.load(Ordering::SeqCst), 4);
        assert!(rx.try_recv().is_err(), "each callback once");
        log.close();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn appends_get_consecutive_seqs_and_read_back_across_a_reopen() {
        let dir = temp_dir("reopen");
        let mut config = StoreConfig::new(&dir);
        config.segment_bytes = 4096; // several segments
        let (log, recovery) = SegmentLog::open(config.clone()).unwrap();
        assert!(recovery.repairs.is_empty());
        let mut seqs = append_all(&log, "orders", (0..1000).map(line));
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
        let info = log.info("orders").unwrap();
        assert_eq!(
            (info.first_seq, info.last_seq, info.events),
            (1, 1000, 1000)
        );
        log.close();

        let (log, recovery) = SegmentLog::open(config).unwrap();
        assert!(recovery.repairs.is_empty(), "{:?}", recovery.repairs);
        assert_eq!(log.info("orders").unwrap().last_seq, 1000);
        let records = log.read("orders", 500, 10).unwrap();
        assert_eq!(records.len(), 10);
        assert_eq!(records[0].seq, 500);
        // One appender: seqs follow the order of its appends.
        assert_eq!(records[0].line, line(499));
        assert_eq!(records[0].id.as_deref(), Some("id-499"));
        // The next append continues the sequence.
        assert_eq!(append_all(&log, "orders", std::iter::once(line(7))), [1001]);
        let all = log.read("orders", 1, usize::MAX).unwrap();
        assert_eq!(all.len(), 1001);
        assert!(all.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        let _ = fs::remove_dir_all(&dir);
    }

    fn active_segment(dir: &Path, stream: &str) -> PathBuf {
        let mut files: Vec<_> = fs::read_dir(dir.join("streams").join(stream))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files.pop().unwrap()
    }

    /// A torn write (the file ends inside the last record) is cut on open, the valid
    /// prefix kept, the cut reported; the stream goes on from the last valid seq.
    #[test]
    fn a_torn_tail_is_cut_and_reported() {
        let dir = temp_dir("torn");
        let config = StoreConfig::new(&dir);
        let (log, _) = SegmentLog::open(config.clone()).unwrap();
        append_all(&log, "s", (0..10).map(line));
        log.close();
        let path = active_segment(&dir, "s");
        for cut in [1, 5, HEADER as u64 + 3] {
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            let before = fs::metadata(&path).unwrap().len();
            file.set_len(before - cut).unwrap();
            drop(file);
            let (log, recovery) = SegmentLog::open(config.clone()).unwrap();
            assert_eq!(recovery.repairs.len(), 1, "{:?}", recovery.repairs);
            assert!(
                recovery.repairs[0].contains("cut short"),
                "{:?}",
                recovery.repairs
            );
            let info = log.info("s").unwrap();
            let records = log.read("s", 1, usize::MAX).unwrap();
            assert_eq!(records.len() as u64, info.last_seq);
            assert_eq!(records.last().unwrap().line, line(info.last_seq - 1));
            // Appending again after the repair continues the sequence.
            assert_eq!(
                append_all(&log, "s", std::iter::once(line(99))),
                [info.last_seq + 1]
            );
            log.close();
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// A flipped byte in the tail fails its checksum: the record and what follows are
    /// cut, never returned.
    #[test]
    fn a_corrupted_tail_fails_its_checksum_and_is_cut() {
        let dir = temp_dir("crc");
        let config = StoreConfig::new(&dir);
        let (log, _) = SegmentLog::open(config.clone()).unwrap();
        append_all(&log, "s", (0..10).map(line));
        log.close();
        let path = active_segment(&dir, "s");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x20;
        // And garbage after it, as a half-written next record might leave.
        bytes.extend_from_slice(&[0xff; 7]);
        fs::write(&path, &bytes).unwrap();
        let (log, recovery) = SegmentLog::open(config).unwrap();
        assert!(
            recovery.repairs[0].contains("checksum"),
            "{:?}",
            recovery.repairs
        );
        assert_eq!(log.info("s").unwrap().last_seq, 9);
        assert_eq!(log.read("s", 1, 100).unwrap().len(), 9);
        let _ = fs::remove_dir_all(&dir);
    }

    /// The numbers appender `t` wrote (as lines `t:n`), in the order `records` has them.
    fn appended_by(records: &[Record], t: usize) -> Vec<usize> {
        records
            .iter()
            .filter_map(|r| {
                let text = std::str::from_utf8(&r.line).unwrap();
                let (who, n) = text.trim().split_once(':').unwrap();
                (who == t.to_string()).then(|| n.parse().unwrap())
            })
            .collect()
    }

    /// Appenders on several threads share batches: every append is stored exactly
    /// once, seqs have no gap and no duplicate, and each appender's records keep its
    /// order.
    #[test]
    fn concurrent_appends_share_commits_without_gaps() {
        let dir = temp_dir("concurrent");
        let (log, _) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
        let log = Arc::new(log);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let lines = (0..500).map(move |n| Bytes::from(format!("{t}:{n}\n")));
                    append_all(&log, "s", lines)
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=2000).collect::<Vec<_>>());
        let records = log.read("s", 1, usize::MAX).unwrap();
        for t in 0..4 {
            assert_eq!(appended_by(&records, t), (0..500).collect::<Vec<_>>());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// Appends gathered by a thread reach the writer together when the outermost
    /// scope ends (a nested one sends nothing), in order, and are committed at once;
    /// an append gathered for a log closed before the scope ends fails `Closed`.
    #[test]
    fn gathered_appends_are_committed_together_when_the_scope_ends() {
        let dir = temp_dir("gathered");
        let (log, _) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
        let (tx, rx) = mpsc::channel();
        let outer = GatheredAppends::begin();
        {
            let _inner = GatheredAppends::begin();
            for n in 0..100 {
                let tx = tx.clone();
                log.append("s", None, line(n), Box::new(move |r| tx.send(r).unwrap()));
            }
        }
        // Nothing was sent: the writer cannot have stored any of it.
        assert!(rx.try_recv().is_err());
        assert_eq!(log.info("s"), None);
        drop(outer);
        let seqs: Vec<u64> = (0..100).map(|_| rx.recv().unwrap().unwrap()).collect();
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        let snapshot = log.commit_stats().batch.snapshot();
        assert_eq!((snapshot.count, snapshot.sum), (1, 100.0));
        let records = log.read("s", 1, 1000).unwrap();
        assert_eq!(records.len(), 100);
        assert!(records
            .iter()
            .enumerate()
            .all(|(n, r)| r.line == line(n as u64)));
        // Closed while gathered: refused, not lost silently.
        let gathering = GatheredAppends::begin();
        let tx2 = tx.clone();
        log.append(
            "s",
            None,
            line(100),
            Box::new(move |r| tx2.send(r).unwrap()),
        );
        log.close();
        drop(gathering);
        assert!(matches!(rx.recv().unwrap(), Err(StoreError::Closed)));
        let _ = fs::remove_dir_all(&dir);
    }

    /// Batches that mix streams (each append to the next of three, from four
    /// threads): each stream's seqs have no gap and no duplicate, and hold its own
    /// records in each appender's order.
    #[test]
    fn appends_to_several_streams_in_one_batch_keep_each_stream_whole() {
        let dir = temp_dir("mixed");
        let (log, _) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
        let log = Arc::new(log);
        let names = ["a", "b", "c"];
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let (tx, rx) = mpsc::channel();
                    for n in 0..600 {
                        let tx = tx.clone();
                        let line = Bytes::from(format!("{t}:{n}\n"));
                        log.append(
                            names[n % 3],
                            None,
                            line,
                            Box::new(move |r| {
                                tx.send(r.unwrap()).unwrap();
                            }),
                        );
                    }
                    drop(tx);
                    rx.iter().count()
                })
            })
            .collect();
        let stored: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(stored, 2400);
        for (s, name) in names.iter().enumerate() {
            let records = log.read(name, 1, usize::MAX).unwrap();
            let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, (1..=800).collect::<Vec<_>>(), "{name}");
            for t in 0..4 {
                let expected: Vec<usize> = (0..600).filter(|n| n % 3 == s).collect();
                assert_eq!(appended_by(&records, t), expected, "{name}, appender {t}");
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// Past `max_events`, whole old segments go; reads start at the oldest kept seq.
    #[test]
    fn retention_deletes_the_oldest_segments() {
        let dir = temp_dir("retention");
        let mut config = StoreConfig::new(&dir);
        config.segment_bytes = 2048;
        config.retention.max_events = 100;
        config.fsync = Fsync::Never;
        let (log, _) = SegmentLog::open(config.clone()).unwrap();
        for chunk in 0..10 {
            append_all(&log, "s", (chunk * 50..chunk * 50 + 50).map(line));
        }
        let info = log.info("s").unwrap();
        assert_eq!(info.last_seq, 500);
        assert!(info.events <= 100 + 60, "{info:?}");
        assert!(info.first_seq > 300, "{info:?}");
        let records = log.read("s", 1, usize::MAX).unwrap();
        assert_eq!(records.first().unwrap().seq, info.first_seq);
        assert_eq!(records.len() as u64, info.events);
        log.close();
        let (log, _) = SegmentLog::open(config).unwrap();
        assert_eq!(log.info("s").unwrap(), info);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stream_with_limits_of_its_own_keeps_to_them_and_the_others_to_the_hub_wide() {
        let dir = temp_dir("stream-retention");
        let mut config = StoreConfig::new(&dir);
        config.segment_bytes = 2048;
        config.fsync = Fsync::Never;
        config.retention.max_events = 1_000;
        let mut short = config.retention.clone();
        short.max_events = 100;
        config.stream_retention.insert("short".into(), short);
        let (log, _) = SegmentLog::open(config).unwrap();
        for chunk in 0..10 {
            append_all(&log, "short", (chunk * 50..chunk * 50 + 50).map(line));
            append_all(&log, "long", (chunk * 50..chunk * 50 + 50).map(line));
        }
        let short = log.info("short").unwrap();
        assert!(
            short.events <= 100 + 60 && short.first_seq > 300,
            "{short:?}"
        );
        // The hub-wide 1,000 keeps all 500 of the other stream.
        let long = log.info("long").unwrap();
        assert_eq!((long.first_seq, long.events), (1, 500), "{long:?}");
        log.close();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_names_and_ids_are_refused_and_a_closed_store_says_so() {
        let dir = temp_dir("refusals");
        let (log, _) = SegmentLog::open(StoreConfig::new(&dir)).unwrap();
        let outcome = |stream: &str, id: Option<Arc<str>>| {
            let (tx, rx) = channel();
            log.append(stream, id, line(0), Box::new(move |r| tx.send(r).unwrap()));
            rx.recv().unwrap()
        };
        for name in ["", "../x", ".hidden", "a/b", &"n".repeat(65)] {
            assert!(
                matches!(outcome(name, None), Err(StoreError::Invalid(_))),
                "{name}"
            );
        }
        assert!(matches!(
            outcome("s", Some("i".repeat(MAX_ID + 1).into())),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(outcome("s", Some("i".repeat(MAX_ID).into())).unwrap(), 1);
        log.close();
        assert!(matches!(outcome("s", None), Err(StoreError::Closed)));
        let _ = fs::remove_dir_all(&dir);
    }

    /// Closed segments get their index from the reads that pass through them: reading
    /// a reopened stream in batches gives every record once, in order, and indexes it.
    #[test]
    fn reading_a_reopened_stream_in_batches_indexes_its_closed_segments() {
        let dir = temp_dir("index");
        let mut config = StoreConfig::new(&dir);
        config.segment_bytes = 64 << 10;
        config.fsync = Fsync::Never;
        let (log, _) = SegmentLog::open(config.clone()).unwrap();
        // In batches: a segment closes at a batch's end once past its size.
        for chunk in 0..50 {
            append_all(&log, "s", (chunk * 100..chunk * 100 + 100).map(line));
        }
        log.close();
        let (log, _) = SegmentLog::open(config).unwrap();
        let mut next = 1;
        let mut seen = 0;
        while let Some(last) = log.read("s", next, 100).unwrap().last() {
            seen += last.seq + 1 - next;
            next = last.seq + 1;
        }
        assert_eq!((seen, next), (5000, 5001));
        let streams = lock(&log.streams);
        let segments = &streams["s"].segments;
        assert!(segments.len() > 2);
        for segment in &segments[..segments.len() - 1] {
            assert!(!segment.index.is_empty(), "{segment:?}");
            assert!(segment.index.windows(2).all(|w| w[0].0 < w[1].0));
        }
        drop(streams);
        // An indexed read starts at the right record.
        assert_eq!(log.read("s", 4321, 1).unwrap()[0].line, line(4320));
        let _ = fs::remove_dir_all(&dir);
    }

    /// Appends arriving faster than the writer takes them are refused at once past
    /// A callback may use its own log (read it, trim it, append to it): the writer
    /// calls back without holding the log's lock (it used to, and a consumer-log
    /// snapshot that trimmed from its callback would have hung the writer).
    #[test]
    fn a_callback_may_read_trim_and_append_to_its_own_log() {
        let dir = temp_dir("reentrant");
        let mut config = StoreConfig::new(&dir);
        config.segment_bytes = 256;
        let (log, _) = SegmentLog::open(config).unwrap();
        let log = Arc::new(log);
        append_all(&log, "s", (0..20).map(line));
        let (tx, rx) = channel();
        let inner = Arc::clone(&log);
        log.append(
            "s",
            None,
            line(20),
            Box::new(move |stored| {
                let seq = stored.unwrap();
                let read = inner.read("s", seq, 1).unwrap();
                let trimmed = inner.trim("s", seq).unwrap();
                let again = Arc::clone(&inner);
                let tx2 = tx.clone();
                inner.append(
                    "s",
                    None,
                    line(21),
                    Box::new(move |r| {
                        let _ = tx2.send(("appended", r.unwrap(), 0));
                        drop(again);
                    }),
                );
                let _ = tx.send(("read", read[0].seq, trimmed));
            }),
        );
        let first = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer hung");
        assert_eq!((first.0, first.1), ("read", 21));
        assert!(first.2 > 0, "older segments were trimmed");
        let second = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer hung");
        assert_eq!((second.0, second.1), ("appended", 22));
        assert!(log.info("s").unwrap().first_seq > 1);
        log.close();
        let _ = fs::remove_dir_all(&dir);
    }

    /// `max_queued` (memory stays bounded); the ones accepted are all stored.
    #[test]
    fn a_writer_that_falls_behind_refuses_rather_than_queues_without_bound() {
        let dir = temp_dir("behind");
        let mut config = StoreConfig::new(&dir);
        config.max_queued = 10_000;
        let (log, _) = SegmentLog::open(config).unwrap();
        let (tx, rx) = channel();
        let mut accepted = 0;
        let mut behind = None;
        {
            // The writer needs this lock to commit: while it is held, nothing drains.
            let _stalled = lock(&log.streams);
            for n in 0..1000 {
                let tx = tx.clone();
                let (seen_tx, seen_rx) = channel();
                log.append(
                    "s",
                    None,
                    line(n),
                    Box::new(move |r| {
                        let _ = seen_tx.send(r.is_ok());
                        let _ = tx.send(r);
                    }),
                );
                match seen_rx.try_recv() {
                    // Refused at once, in this thread.
                    Ok(false) => {
                        behind = Some((n, log.queued.load(Ordering::Acquire)));
                        break;
                    }
                    _ => accepted += 1,
                }
            }
        }
        // The writer may have taken one batch off the queue before it stalled (how
        // many depends on timing); past that, what waits stays within the bound.
        let (behind, queued) = behind.expect("refused before 1,000 appends of ~100 bytes");
        assert!(behind > 10, "{behind}");
        assert!(queued <= 10_000, "{queued} bytes waiting");
        let mut stored = 0;
        let mut refused = 0;
        for _ in 0..=accepted {
            match rx.recv().unwrap() {
                Ok(_) => stored += 1,
                Err(StoreError::Behind(_)) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((stored, refused), (accepted, 1));
        assert_eq!(log.info("s").unwrap().last_seq, accepted as u64);
        let _ = fs::remove_dir_all(&dir);
    }
}
