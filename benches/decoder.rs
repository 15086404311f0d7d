//! The frame decoder's throughput on a stream of 128-byte events, delimited by
//! newlines and with no delimiter at all, fully validated (UTF-8, JSON, event shape).
//!
//! Run: `cargo bench --bench decoder`.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hubcast::frame::{Frame, FrameDecoder};

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

fn decode_all(input: &[u8]) -> usize {
    let mut decoder = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::from(input);
    let mut events = 0;
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        if let Frame::Event(event) = frame {
            black_box(&event);
            events += 1;
        }
    }
    events
}

fn decoder(c: &mut Criterion) {
    let mut group = c.benchmark_group("decoder");
    for (label, newline) in [("newline-delimited", true), ("no delimiter", false)] {
        let input = stream(newline);
        assert_eq!(decode_all(&input), 10_000);
        group.throughput(Throughput::Bytes(input.len() as u64));
        group.bench_function(format!("10k 128 B events, {label}"), |b| {
            b.iter(|| decode_all(black_box(&input)))
        });
    }
    group.finish();
}

criterion_group!(benches, decoder);
criterion_main!(benches);
