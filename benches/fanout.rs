//! The whole fan-out path in one process: a publisher's bytes are read, decoded and
//! validated, routed, queued once per subscriber and written to N loopback sockets,
//! which read them back. One iteration is a batch of 100 events of 128 bytes; its
//! throughput is in deliveries (events × subscribers).
//!
//! Run: `cargo bench --bench fanout`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hubcast::{Config, Hub, Server};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

const BATCH: usize = 100;
const SIZE: usize = 128;

/// A hub with `subscribers` reading connections and one publisher.
struct Rig {
    runtime: Runtime,
    publisher: TcpStream,
    /// Cumulative bytes each subscriber must have read; bumped once per iteration.
    target: watch::Sender<u64>,
    /// Subscribers still short of the target, and the wake-up when none is.
    remaining: Arc<(AtomicUsize, Notify)>,
    subscribers: usize,
    batch: Vec<u8>,
    stop: CancellationToken,
}

impl Rig {
    fn new(subscribers: usize) -> Rig {
        // Both ends of every connection live in this process.
        rlimit::increase_nofile_limit(4 * subscribers as u64 + 256).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let stop = CancellationToken::new();
        let (target, _) = watch::channel(0u64);
        let remaining = Arc::new((AtomicUsize::new(0), Notify::new()));
        let publisher = runtime.block_on(async {
            let server = Server::bind("127.0.0.1:0", Hub::new(Config::default()))
                .await
                .unwrap();
            let addr = server.local_addr().unwrap();
            tokio::spawn(server.run(stop.clone()));
            for _ in 0..subscribers {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                // The `$pong` proves the hub has the subscriber in its pool.
                stream
                    .write_all(b"{\"event\":\"$ping\",\"payload\":null}\n")
                    .await
                    .unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                assert!(line.contains("$pong"), "{line}");
                tokio::spawn(subscribe(
                    reader.into_inner(),
                    target.subscribe(),
                    Arc::clone(&remaining),
                ));
            }
            let mut publisher = TcpStream::connect(addr).await.unwrap();
            publisher
                .write_all(b"{\"event\":\"$hello\",\"payload\":{\"echo\":false}}\n")
                .await
                .unwrap();
            let mut welcome = [0; 512];
            let read = publisher.read(&mut welcome).await.unwrap();
            assert!(welcome[..read].starts_with(b"{\"event\":\"$welcome\""));
            publisher
        });
        let mut batch = Vec::with_capacity(BATCH * SIZE);
        for i in 0..BATCH {
            let head = format!(r#"{{"event":"order.created","payload":{{"id":{i:>6},"note":""#);
            let tail = "\"}}\n";
            batch.extend_from_slice(head.as_bytes());
            batch.resize(batch.len() + SIZE - head.len() - tail.len(), b'x');
            batch.extend_from_slice(tail.as_bytes());
        }
        Rig {
            runtime,
            publisher,
            target,
            remaining,
            subscribers,
            batch,
            stop,
        }
    }

    /// Publishes `iterations` batches, each once every subscriber has read the last.
    fn run(&mut self, iterations: u64) -> Duration {
        let Rig {
            runtime,
            publisher,
            target,
            remaining,
            subscribers,
            batch,
            ..
        } = self;
        runtime.block_on(async {
            let start = Instant::now();
            for _ in 0..iterations {
                remaining.0.store(*subscribers, Ordering::SeqCst);
                target.send_modify(|bytes| *bytes += batch.len() as u64);
                publisher.write_all(batch).await.unwrap();
                remaining.1.notified().await;
            }
            start.elapsed()
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn subscribe(
    mut stream: TcpStream,
    mut target: watch::Receiver<u64>,
    remaining: Arc<(AtomicUsize, Notify)>,
) {
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0u64;
    while target.changed().await.is_ok() {
        let want = *target.borrow_and_update();
        while total < want {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(read) => total += read as u64,
            }
        }
        if remaining.0.fetch_sub(1, Ordering::SeqCst) == 1 {
            remaining.1.notify_one();
        }
    }
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    for subscribers in [10, 100, 1000] {
        let mut rig = Rig::new(subscribers);
        group.throughput(Throughput::Elements((BATCH * subscribers) as u64));
        group.bench_function(
            format!("{BATCH} x 128 B events to {subscribers} subscribers"),
            |b| b.iter_custom(|iterations| rig.run(iterations)),
        );
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
