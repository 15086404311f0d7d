//! The frame decoder's throughput on a stream of 128-byte events, delimited by
//! newlines and with no delimiter at all, fully validated (UTF-8, JSON, event shape).
//! Two ways: `decode`, one `Event` per frame (the library API), and `decode_run`, runs
//! of plain events as shared chunks (what a connection does with such traffic).
//!
//! Run: `cargo bench --bench decoder`.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hubcast::frame::{Frame, FrameDecoder, Run};

/// 10,000 events of exactly 128 bytes each (newline included when `newline`).
fn stream(newline: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..10_000u32 {
        let head =
            format!(r#"{{"event":"order.created","payload":{{"id":{i:>6},"store":"acme","note":""#);
        let tail = if newline { "\"}}\n" } else { "\"}}" };
        let pad = 128 - head.len() - tail.len() + usize::from(!newline);
        out.extend_from_slice(head.as_bytes());
        out.extend(std::iter::repeat_n(b'x', pad));
        out.extend_from_slice(tail.as_bytes());
    }
    out
}

/// A connection reads at most this much at a time.
const READ: usize = 64 * 1024;

/// The state a connection keeps between reads, reused across iterations as a
/// connection reuses it across reads.
struct Conn {
    buf: BytesMut,
    run: Run,
}

impl Conn {
    fn new() -> Self {
        Conn {
            buf: BytesMut::with_capacity(READ),
            run: Run::default(),
        }
    }

    /// Feeds `input` in reads of [`READ`] bytes; decodes after each read with `step`
    /// (which returns how many events it took, 0 when it needs more bytes).
    fn feed(
        &mut self,
        input: &[u8],
        mut step: impl FnMut(&mut FrameDecoder, &mut Self) -> usize,
    ) -> usize {
        let mut decoder = FrameDecoder::new(1 << 20);
        let mut events = 0;
        for read in input.chunks(READ) {
            self.buf.extend_from_slice(read);
            loop {
                match step(&mut decoder, self) {
                    0 => break,
                    n => events += n,
                }
            }
        }
        events
    }
}

/// One `Event` per frame.
fn decode_all(conn: &mut Conn, input: &[u8]) -> usize {
    conn.feed(input, |decoder, conn| loop {
        match decoder.decode(&mut conn.buf) {
            Ok(Some(Frame::Event(event))) => {
                black_box(&event);
                return 1;
            }
            Ok(Some(Frame::Rejected(_))) => continue,
            Ok(None) | Err(_) => return 0,
        }
    })
}

/// As a connection decodes: runs first, frame by frame only when a run cannot start.
fn decode_runs(conn: &mut Conn, input: &[u8]) -> usize {
    conn.feed(input, |decoder, conn| {
        if decoder.decode_run(&mut conn.buf, &mut conn.run) {
            black_box(conn.run.bytes());
            let n = conn.run.len();
            conn.run.clear();
            return n;
        }
        match decoder.decode(&mut conn.buf) {
            Ok(Some(Frame::Event(event))) => {
                black_box(&event);
                1
            }
            _ => 0,
        }
    })
}

fn decoder(c: &mut Criterion) {
    let mut group = c.benchmark_group("decoder");
    for (label, newline) in [("newline-delimited", true), ("no delimiter", false)] {
        let input = stream(newline);
        let mut conn = Conn::new();
        assert_eq!(decode_all(&mut conn, &input), 10_000);
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(format!("10k 128 B events, {label}"), |b| {
            b.iter(|| decode_all(&mut conn, black_box(&input)))
        });
        assert_eq!(decode_runs(&mut conn, &input), 10_000);
        group.bench_function(format!("10k 128 B events, {label}, in runs"), |b| {
            b.iter(|| decode_runs(&mut conn, black_box(&input)))
        });
    }
    group.finish();
}

criterion_group!(benches, decoder);
criterion_main!(benches);
