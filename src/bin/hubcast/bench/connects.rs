//! `hubcast bench --connects N`: how fast a server accepts authenticated connections.
//!
//! Workers (32 at once) each open a connection (TCP, then TLS if asked), send what
//! authenticates it (hubcast: `$hello {token}` and a `$ping`; NATS: CONNECT with the
//! token and a PING), wait for the server's answer, and close it; N connections in
//! all. Each worker is a client of its own: over TLS it resumes its sessions with the
//! tickets the server gave it, as a client reconnecting does. Reported: connects per
//! second, how many of them resumed, and the latency of each, open to accepted.

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;

use super::run::{handshake, Dial};
use super::wire::{Kind, Target};
use super::Args;

/// Connections opened at once.
const CONCURRENCY: usize = 32;

pub async fn main(args: &Args, target: &Target, count: usize) -> anyhow::Result<ExitCode> {
    if !matches!(target.kind, Kind::Hubcast | Kind::Nats) {
        return super::usage("--connects measures hubcast:// and nats:// targets");
    }
    let dial = Arc::new(Dial::new(args, target)?);
    let hello = match target.kind {
        Kind::Hubcast => {
            let mut hello = dial.hello(Kind::Hubcast, false).unwrap_or_default();
            hello.extend_from_slice(b"{\"event\":\"$ping\",\"payload\":null}\n");
            hello
        }
        _ => dial
            .publisher_hello(target.kind)
            .context("a NATS connection says CONNECT")?,
    };
    let next = Arc::new(AtomicUsize::new(0));
    let resumed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY.min(count) {
        let (target, dial, hello, next, resumed) = (
            target.clone(),
            dial.own_client(),
            hello.clone(),
            Arc::clone(&next),
            Arc::clone(&resumed),
        );
        workers.spawn(async move {
            let mut latencies = Histogram::<u64>::new(3).expect("a valid histogram");
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let opened = Instant::now();
                let (mut stream, _) = handshake(&target, &dial, &hello).await?;
                let _ = latencies.record(opened.elapsed().as_micros() as u64);
                if stream.resumed() == Some(true) {
                    resumed.fetch_add(1, Ordering::Relaxed);
                }
                let _ = stream.shutdown().await;
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Histogram::<u64>::new(3).expect("a valid histogram");
    while let Some(done) = workers.join_next().await {
        all.add(done.context("a worker failed")??)
            .expect("histograms of the same kind");
    }
    let elapsed = started.elapsed();
    let rate = count as f64 / elapsed.as_secs_f64();
    let resumed = dial.tls.is_some().then(|| resumed.load(Ordering::Relaxed));
    let report = serde_json::json!({
        "target": target.to_string(),
        "tls": dial.tls.is_some(),
        "token": dial.token.is_some(),
        "connects": count,
        "concurrency": CONCURRENCY,
        "seconds": elapsed.as_secs_f64(),
        "connects_per_sec": rate,
        "resumed": resumed,
        "latency_us": {
            "p50": all.value_at_quantile(0.5),
            "p99": all.value_at_quantile(0.99),
            "max": all.max(),
        },
    });
    let text = if args.json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        format!(
            "{target}: {count} connects{}{} in {:.2} s: {rate:.0}/s; latency p50 {} µs, p99 {} µs\n",
            match resumed {
                Some(resumed) => format!(", TLS ({resumed} resumed)"),
                None => String::new(),
            },
            if dial.token.is_some() { ", token" } else { "" },
            elapsed.as_secs_f64(),
            all.value_at_quantile(0.5),
            all.value_at_quantile(0.99),
        )
    };
    std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
