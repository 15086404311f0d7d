//! Routing events among 100,000 subscriptions spread over 10,000 connections.
//!
//! Each connection holds 10 patterns: 6 exact names and 4 wildcards (`*` and `>`),
//! over a space of stores, users, hosts and chat rooms, so that a typical event matches
//! a handful of connections. Reported: events matched per second.
//!
//! Run: `cargo bench --bench routing`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hubcast::routing::{Pattern, Router};

const CONNECTIONS: u32 = 10_000;

fn build() -> Router<u32> {
    let mut router = Router::default();
    for c in 0..CONNECTIONS {
        let patterns = [
            format!("store{}.order.created", c % 1000),
            format!("store{}.order.paid", c % 1000),
            format!("user.{c}.notify"),
            format!("metrics.host{}.cpu", c % 2000),
            format!("chat.room{}", c % 500),
            format!("audit.{}", c % 3000),
            format!("store{}.order.*", c % 1000),
            format!("user.{c}.>"),
            format!("metrics.*.mem{}", c % 50),
            format!("chat.*.typing{}", c % 100),
        ];
        for p in &patterns {
            router.insert(&Pattern::parse(p).unwrap(), c);
        }
    }
    assert_eq!(router.len(), 100_000);
    router
}

fn names() -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..1000u32 {
        names.push(match i % 6 {
            0 => format!("store{}.order.created", i * 7 % 1000),
            1 => format!("user.{}.notify.email", i * 13 % CONNECTIONS),
            2 => format!("metrics.host{}.cpu", i * 3 % 2000),
            3 => format!("chat.room{}", i % 500),
            4 => format!("metrics.host{}.mem{}", i % 2000, i % 50),
            _ => format!("nobody.listens.{i}"),
        });
    }
    names
}

fn routing(c: &mut Criterion) {
    let router = build();
    let names = names();
    let mut matched = Vec::with_capacity(1024);
    let mut total = 0usize;
    for name in &names {
        matched.clear();
        router.matches(name, &mut matched);
        total += matched.len();
    }
    println!(
        "{} subscriptions over {CONNECTIONS} connections; {:.1} matches per event on average",
        router.len(),
        total as f64 / names.len() as f64
    );
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(names.len() as u64));
    group.bench_function("match 1000 events among 100k subscriptions", |b| {
        b.iter(|| {
            for name in &names {
                matched.clear();
                router.matches(black_box(name), &mut matched);
                black_box(&matched);
            }
        })
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
