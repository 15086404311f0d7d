//! Appends to the embedded store as fast as it confirms, and reports records/s:
//! how `hubcast::store::SegmentLog`'s group commit holds up with 1..N appenders
//! each waiting for its confirmation before sending more (at most WINDOW in flight,
//! as a publisher waiting for `$stored` would).
//!
//! ```console
//! cargo run --release --example store_throughput -- [DIR] [--never]
//! ```

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use hubcast::store::{Fsync, SegmentLog, Store, StoreConfig};

const RECORD: usize = 200;
const WINDOW: usize = 64;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .filter(|a| !a.starts_with("--"))
        .unwrap_or_else(|| {
            std::env::temp_dir()
                .join("hubcast-store-throughput")
                .display()
                .to_string()
        });
    let never = std::env::args().any(|a| a == "--never");
    for appenders in [1, 4, 16] {
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = StoreConfig::new(&dir);
        config.fsync = if never { Fsync::Never } else { Fsync::Always };
        let (log, _) = SegmentLog::open(config).expect("open the store");
        let log = Arc::new(log);
        let per = if never { 200_000 } else { 20_000 } / appenders;
        let started = Instant::now();
        let threads: Vec<_> = (0..appenders)
            .map(|_| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let line = Bytes::from(vec![b'x'; RECORD]);
                    let (tx, rx) = mpsc::channel::<Result<u64, hubcast::store::StoreError>>();
                    let mut in_flight = 0;
                    for _ in 0..per {
                        if in_flight == WINDOW {
                            rx.recv().unwrap().expect("stored");
                            in_flight -= 1;
                        }
                        let tx = tx.clone();
                        log.append(
                            "bench",
                            None,
                            line.clone(),
                            Box::new(move |r| {
                                let _ = tx.send(r);
                            }),
                        );
                        in_flight += 1;
                    }
                    for _ in 0..in_flight {
                        rx.recv().unwrap().expect("stored");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let seconds = started.elapsed().as_secs_f64();
        let total = per * appenders;
        println!(
            "fsync {:6} appenders {appenders:2}: {total} records of {RECORD} B in {seconds:.2} s = {:.0} confirmed/s",
            if never { "never" } else { "always" },
            total as f64 / seconds
        );
        log.close();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
