//! What the hub counts for `/metrics` and the dashboard beyond [`Stats`](crate::Stats):
//! bytes, connections by transport, rejections by error code, the busiest event names,
//! and how long fan-out takes.
//!
//! Counting is atomics on the hot path, nothing else; the per-name counts and the
//! fan-out histogram run only once metrics are turned on (`Metrics::enable`, which
//! `--http` does), so a hub nobody scrapes pays nothing for them. Rendering happens at
//! scrape time (`http.rs`), from these and from the hub's own state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use crate::protocol::ErrorCode;

/// How a connection reached the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
#[repr(u8)]
pub enum TransportKind {
    #[default]
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// WebSocket (the `--http` listener's `/ws`).
    Ws,
}

impl TransportKind {
    /// Every transport, in label order.
    pub const ALL: [TransportKind; 3] = [TransportKind::Tcp, TransportKind::Tls, TransportKind::Ws];

    /// Its label in metrics: `tcp`, `tls`, `ws`.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
            TransportKind::Ws => "ws",
        }
    }
}

/// Distinct event names counted one by one; the rest are counted as `other`.
pub const MAX_NAMED_EVENTS: usize = 100;

/// Upper bounds of the fan-out latency buckets, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 5e-2, 0.25,
];

/// Upper bounds of the store's commit (write + fsync) latency buckets, in seconds.
pub const COMMIT_BUCKETS: &[f64] = &[
    1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
];

/// Upper bounds of the store's batch size buckets (events per commit).
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0, 4096.0];

#[derive(Default)]
pub(crate) struct ConnectionCounts {
    /// Connections accepted (and not refused at a limit).
    pub(crate) accepted: AtomicU64,
}

/// The hub's extra counters.
pub(crate) struct Metrics {
    enabled: AtomicBool,
    pub(crate) bytes_in: Sharded,
    pub(crate) bytes_out: Sharded,
    pub(crate) connections: [ConnectionCounts; 3],
    rejected: Box<[AtomicU64]>,
    names: RwLock<HashMap<Box<str>, AtomicU64>>,
    other_names: AtomicU64,
    latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: AtomicBool::new(false),
            bytes_in: Sharded::default(),
            bytes_out: Sharded::default(),
            connections: Default::default(),
            rejected: ErrorCode::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            names: RwLock::default(),
            other_names: AtomicU64::new(0),
            latency: Histogram::new(LATENCY_BUCKETS),
        }
    }
}

impl Metrics {
    /// Turns on the counts that cost something on the hot path.
    pub(crate) fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub(crate) fn transport(&self, kind: TransportKind) -> &ConnectionCounts {
        &self.connections[kind as usize]
    }

    pub(crate) fn rejected(&self, code: ErrorCode) {
        if let Some(counter) = self.rejected.get(code as usize) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Frames rejected, by error code (codes never seen are left out).
    pub(crate) fn rejected_by_code(&self) -> Vec<(ErrorCode, u64)> {
        ErrorCode::ALL
            .iter()
            .zip(self.rejected.iter())
            .map(|(&code, n)| (code, n.load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// Counts `n` events named `name` (when enabled).
    pub(crate) fn named(&self, name: &str, n: u64) {
        if !self.enabled() {
            return;
        }
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = names.get(name) {
            counter.fetch_add(n, Ordering::Relaxed);
            return;
        }
        let full = names.len() >= MAX_NAMED_EVENTS;
        drop(names);
        if full {
            self.other_names.fetch_add(n, Ordering::Relaxed);
            return;
        }
        let mut names = self.names.write().unwrap_or_else(|e| e.into_inner());
        if names.len() >= MAX_NAMED_EVENTS && !names.contains_key(name) {
            drop(names);
            self.other_names.fetch_add(n, Ordering::Relaxed);
            return;
        }
        names
            .entry(name.into())
            .or_insert_with(|| AtomicU64::new(0))
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Events by name, busiest first, with `other` last when names were capped.
    pub(crate) fn names(&self) -> Vec<(String, u64)> {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, u64)> = names
            .iter()
            .map(|(name, n)| (name.to_string(), n.load(Ordering::Relaxed)))
            .collect();
        drop(names);
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other = self.other_names.load(Ordering::Relaxed);
        if other > 0 {
            out.push(("other".to_string(), other));
        }
        out
    }

    /// Records how long fanning one event or run out took (when enabled).
    pub(crate) fn fanout_took(&self, took: Duration) {
        self.latency.record(took);
    }

    pub(crate) fn latency(&self) -> HistogramSnapshot {
        self.latency.snapshot()
    }
}

/// A counter every connection adds to, in cache-line-sized shards picked by client
/// id, so that connections on different threads do not contend for one line.
#[derive(Default)]
pub(crate) struct Sharded([Padded; 16]);

#[derive(Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

impl Sharded {
    pub(crate) fn add(&self, shard: u64, n: u64) {
        self.0[(shard % 16) as usize]
            .0
            .fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sum(&self) -> u64 {
        self.0.iter().map(|p| p.0.load(Ordering::Relaxed)).sum()
    }
}

/// A fixed-bucket histogram of atomics (no lock on the hot path).
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum of the values, in billionths.
    sum_nanos: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A histogram read at one moment: cumulative counts per bucket bound.
#[derive(Debug, Clone, Default)]
pub struct HistogramSnapshot {
    /// The sum of the values recorded.
    pub sum: f64,
    /// How many were recorded.
    pub count: u64,
    /// (upper bound, values at or below it), the last bound infinite.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// An empty histogram with these bucket bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records a duration, in seconds.
    pub fn record(&self, took: Duration) {
        self.add(
            took.as_secs_f64(),
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
        );
    }

    /// Records a count.
    pub fn record_count(&self, n: u64) {
        self.add(n as f64, n.saturating_mul(1_000_000_000));
    }

    fn add(&self, value: f64, nanos: u64) {
        if let Some(i) = self.bounds.iter().position(|&b| value <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// What it holds now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (bound, cumulative)
            })
            .collect();
        let count = self.count.load(Ordering::Relaxed).max(cumulative);
        buckets.push((f64::INFINITY, count));
        HistogramSnapshot {
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        }
    }
}

/// What `$stats` answers: the counters, connections by transport, the busiest names,
/// and the streams and consumers.
pub(crate) fn stats_payload(hub: &crate::Hub) -> serde_json::Value {
    let stats = hub.stats();
    let metrics = hub.metrics();
    let (open, subscriptions, rooms) = hub.gauges();
    let connections: serde_json::Map<String, serde_json::Value> = TransportKind::ALL
        .iter()
        .map(|&k| (k.as_str().to_string(), open[k as usize].into()))
        .collect();
    let names: Vec<serde_json::Value> = metrics
        .names()
        .into_iter()
        .take(20)
        .map(|(name, n)| serde_json::json!({"event": name, "count": n}))
        .collect();
    let (streams, consumers) = if hub.durable().has_streams() {
        hub.durable().live_info()
    } else {
        Default::default()
    };
    let streams: Vec<serde_json::Value> = streams
        .into_iter()
        .map(|(name, last_seq)| serde_json::json!({"stream": name, "last_seq": last_seq}))
        .collect();
    let consumers: Vec<serde_json::Value> = consumers
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "stream": c.stream, "consumer": c.name, "pending": c.pending,
                "ack_pending": c.in_flight, "ack_floor": c.ack_floor,
                "redelivered": c.redelivered, "dead_lettered": c.dead_lettered,
            })
        })
        .collect();
    serde_json::json!({
        "clients": hub.clients(),
        "connections": connections,
        "events": stats.events,
        "deliveries": stats.deliveries,
        "bytes_in": metrics.bytes_in.sum(),
        "bytes_out": metrics.bytes_out.sum(),
        "rejected": stats.rejected,
        "slow_consumers": stats.slow_consumers,
        "dropped": stats.dropped,
        "refused": stats.refused,
        "subscriptions": subscriptions,
        "rooms": rooms,
        "names": names,
        "streams": streams,
        "consumers": consumers,
        "backplane": hub.backplane_status().map(|link| serde_json::json!({
            "engine": link.engine, "node": link.node, "connected": link.connected,
            "server": link.server, "published": link.published, "received": link.received,
            "dropped": link.dropped, "reconnects": link.reconnects,
            "subscriptions": link.subscriptions,
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_capped_and_the_rest_are_other() {
        let m = Metrics::default();
        m.named("off", 1);
        assert!(m.names().is_empty(), "nothing counted while disabled");
        m.enable();
        for i in 0..MAX_NAMED_EVENTS + 5 {
            m.named(&format!("e{i}"), 1);
        }
        m.named("e0", 10);
        let names = m.names();
        assert_eq!(names.len(), MAX_NAMED_EVENTS + 1);
        assert_eq!(names[0], ("e0".to_string(), 11));
        assert_eq!(names.last().unwrap(), &("other".to_string(), 5));
    }

    #[test]
    fn the_histogram_is_cumulative() {
        let h = Histogram::new(LATENCY_BUCKETS);
        h.record(Duration::from_nanos(500));
        h.record(Duration::from_micros(20));
        h.record(Duration::from_secs(1));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (1e-6, 1));
        let at_25us = s.buckets.iter().find(|b| b.0 == 2.5e-5).unwrap();
        assert_eq!(at_25us.1, 2);
        assert_eq!(s.buckets.last().unwrap().1, 3);
        assert!((s.sum - 1.0000205).abs() < 1e-9);
    }
}
