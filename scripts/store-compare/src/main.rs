//! The same group-commit workload against hubcast's `SegmentLog` and against redb:
//! A appenders, each with at most 64 appends waiting for their confirmation (as a
//! publisher waiting for `$stored`), 200-byte records; one writer commits whatever is
//! waiting as one batch (redb: one write transaction, `Durability::Immediate` or
//! `None`; the log: one write and one `fsync`, or none). Prints confirmed records/s.
//!
//!     cargo run --release --manifest-path scripts/store-compare/Cargo.toml -- [DIR]

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hubcast::store::{Fsync, SegmentLog, Store, StoreConfig};

const RECORD: usize = 200;
const WINDOW: usize = 64;

type Done = Box<dyn FnOnce(u64) + Send>;

/// What each engine offers the workload: append and be called back once stored.
trait Engine: Send + Sync {
    fn append(&self, line: Bytes, done: Done);
}

impl Engine for SegmentLog {
    fn append(&self, line: Bytes, done: Done) {
        Store::append(
            self,
            "bench",
            None,
            line,
            Box::new(move |r| done(r.expect("stored"))),
        );
    }
}

/// redb behind the same kind of writer thread: each batch is one transaction.
struct Redb {
    tx: mpsc::Sender<(Bytes, Done)>,
}

impl Redb {
    fn open(path: &std::path::Path, durable: bool) -> Self {
        let db = redb::Database::create(path).expect("create redb");
        let (tx, rx) = mpsc::channel::<(Bytes, Done)>();
        std::thread::spawn(move || {
            let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("bench");
            let mut seq = 0u64;
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let mut txn = db.begin_write().expect("begin");
                txn.set_durability(if durable {
                    redb::Durability::Immediate
                } else {
                    redb::Durability::None
                });
                let mut seqs = Vec::with_capacity(batch.len());
                {
                    let mut t = txn.open_table(table).expect("table");
                    for (line, _) in &batch {
                        seq += 1;
                        t.insert(seq, &line[..]).expect("insert");
                        seqs.push(seq);
                    }
                }
                txn.commit().expect("commit");
                for ((_, done), seq) in batch.into_iter().zip(seqs) {
                    done(seq);
                }
            }
        });
        Redb { tx }
    }
}

impl Engine for Redb {
    fn append(&self, line: Bytes, done: Done) {
        self.tx.send((line, done)).expect("writer alive");
    }
}

fn run(engine: Arc<dyn Engine>, appenders: usize, total: usize) -> f64 {
    let per = total / appenders;
    let started = Instant::now();
    let threads: Vec<_> = (0..appenders)
        .map(|_| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || {
                let line = Bytes::from(vec![b'x'; RECORD]);
                let (tx, rx) = mpsc::channel::<u64>();
                let mut in_flight = 0;
                for _ in 0..per {
                    if in_flight == WINDOW {
                        rx.recv().unwrap();
                        in_flight -= 1;
                    }
                    let tx = tx.clone();
                    engine.append(
                        line.clone(),
                        Box::new(move |seq| {
                            let _ = tx.send(seq);
                        }),
                    );
                    in_flight += 1;
                }
                for _ in 0..in_flight {
                    rx.recv().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (per * appenders) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| {
        std::env::temp_dir()
            .join("hubcast-store-compare")
            .display()
            .to_string()
    }));
    println!("| durability | appenders | SegmentLog | redb | log/redb |");
    println!("|---|---:|---:|---:|---:|");
    for durable in [true, false] {
        let total = if durable { 20_000 } else { 200_000 };
        for appenders in [1, 4, 16] {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let mut config = StoreConfig::new(dir.join("log"));
            config.fsync = if durable { Fsync::Always } else { Fsync::Never };
            let (log, _) = SegmentLog::open(config).expect("open the log");
            let log = Arc::new(log);
            let ours = run(log.clone(), appenders, total);
            log.close();
            let theirs = run(
                Arc::new(Redb::open(&dir.join("redb"), durable)),
                appenders,
                total,
            );
            println!(
                "| {} | {appenders} | {ours:.0}/s | {theirs:.0}/s | {:.1}× |",
                if durable {
                    "fsync before confirm"
                } else {
                    "OS-buffered"
                },
                ours / theirs
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
