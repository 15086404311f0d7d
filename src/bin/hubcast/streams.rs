//! `hubcast streams` and `hubcast replay`: what the store holds, read from its files
//! (read-only: safe beside a running hub, which they never contact).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use hubcast::routing::Pattern;
use hubcast::store::{SegmentLog, Store};

#[derive(clap::Args)]
pub struct ListArgs {
    /// The hub's data directory (its --data-dir).
    #[arg(long, default_value = "hubcast-data")]
    data_dir: PathBuf,
    /// A cluster's streams instead, read from JetStream through these NATS servers
    /// (as `serve --cluster`): each stream's numbers, replicas and leader, and its
    /// consumers.
    #[arg(long, value_name = "URL[,URL...]", value_delimiter = ',', value_parser = crate::serve::parse_nats_url)]
    cluster: Vec<hubcast::cluster::nats::ServerUrl>,
    /// With --cluster: trust this CA (PEM) for the NATS servers' certificates.
    #[arg(long, value_name = "PEM", requires = "cluster")]
    cluster_ca: Option<PathBuf>,
    /// One JSON object per stream, then one per consumer (with a "consumer" key),
    /// instead of the tables.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// The stream to print.
    stream: String,
    /// The hub's data directory (its --data-dir).
    #[arg(long, default_value = "hubcast-data")]
    data_dir: PathBuf,
    /// Start at this seq (default: the oldest kept).
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Only events whose names match this pattern (as in `$subscribe`).
    #[arg(long, value_parser = parse_pattern)]
    filter: Option<Pattern>,
}

fn parse_pattern(text: &str) -> Result<Pattern, String> {
    Pattern::parse(text).map_err(|e| e.message)
}

fn open(dir: &std::path::Path) -> anyhow::Result<SegmentLog> {
    if !dir.join("streams").is_dir() {
        anyhow::bail!(
            "{} holds no streams (is it the hub's --data-dir?)",
            dir.display()
        );
    }
    SegmentLog::open_read_only(dir).with_context(|| format!("cannot read {}", dir.display()))
}

/// `hubcast streams --cluster`: what JetStream holds for the hubs.
async fn list_cluster(args: ListArgs) -> anyhow::Result<ExitCode> {
    let tls = match &args.cluster_ca {
        Some(ca) => Some(
            hubcast::tls::client_config(Some(ca), None)
                .map_err(|e| crate::UsageError(format!("--cluster-ca: {e}")))?,
        ),
        None => None,
    };
    let options = hubcast::cluster::jetstream::JetStreamOptions {
        urls: args.cluster.clone(),
        node: "hubcast streams".to_string(),
        tls,
        replicas: 1,
    };
    let streams = hubcast::cluster::jetstream::cluster_streams(&options)
        .await
        .map_err(anyhow::Error::msg)?;
    if streams.is_empty() {
        tracing::warn!("JetStream holds no hubcast streams (a hub makes them: serve --cluster ... --stream NAME=PATTERN)");
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        for stream in &streams {
            let mut line = serde_json::to_value(stream)?;
            if let Some(fields) = line.as_object_mut() {
                fields.remove("consumers");
            }
            writeln!(out, "{line}")?;
        }
        for stream in &streams {
            for consumer in &stream.consumers {
                let mut line = serde_json::to_value(consumer)?;
                line["stream"] = stream.stream.clone().into();
                writeln!(out, "{line}")?;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "{:<24} {:>12} {:>12} {:>12} {:>14} {:>8}  leader",
        "stream", "first seq", "last seq", "events", "bytes", "replicas"
    )?;
    for s in &streams {
        writeln!(
            out,
            "{:<24} {:>12} {:>12} {:>12} {:>14} {:>8}  {}",
            s.stream,
            s.first_seq,
            s.last_seq,
            s.events,
            s.bytes,
            s.replicas,
            s.leader.as_deref().unwrap_or("-")
        )?;
    }
    if streams.iter().any(|s| !s.consumers.is_empty()) {
        writeln!(
            out,
            "\n{:<24} {:<16} {:>10} {:>10} {:>12} {:>12}",
            "consumer", "stream", "ack floor", "waiting", "ack pending", "redelivered"
        )?;
    }
    for s in &streams {
        for c in &s.consumers {
            writeln!(
                out,
                "{:<24} {:<16} {:>10} {:>10} {:>12} {:>12}",
                // A name decoded from JetStream may hold any byte: shown escaped.
                hubcast::protocol::printable(&c.consumer),
                s.stream,
                c.ack_floor,
                c.waiting,
                c.ack_pending,
                c.redelivered
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    if !args.cluster.is_empty() {
        return list_cluster(args).await;
    }
    let store = open(&args.data_dir)?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        writeln!(
            out,
            "{:<24} {:>12} {:>12} {:>12} {:>14}",
            "stream", "first seq", "last seq", "events", "bytes"
        )?;
    }
    for name in store.streams() {
        let info = store.info(&name).expect("listed");
        if args.json {
            let line = serde_json::json!({
                "stream": name,
                "first_seq": info.first_seq,
                "last_seq": info.last_seq,
                "events": info.events,
                "bytes": info.bytes,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(
                out,
                "{name:<24} {:>12} {:>12} {:>12} {:>14}",
                info.first_seq, info.last_seq, info.events, info.bytes
            )?;
        }
    }
    let consumers = hubcast::store::consumers(&args.data_dir)
        .with_context(|| format!("cannot read the consumers in {}", args.data_dir.display()))?;
    if !args.json && !consumers.is_empty() {
        writeln!(
            out,
            "\n{:<24} {:<16} {:>10} {:>10} {:>10} {:>12} {:>13}",
            "consumer", "stream", "ack floor", "pending", "acked", "redelivered", "dead-lettered"
        )?;
    }
    for c in consumers {
        if args.json {
            let line = serde_json::json!({
                "consumer": c.name,
                "stream": c.stream,
                "ack_floor": c.ack_floor,
                "pending": c.pending,
                "acked": c.acked,
                "redelivered": c.redelivered,
                "dead_lettered": c.dead_lettered,
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(
                out,
                "{:<24} {:<16} {:>10} {:>10} {:>10} {:>12} {:>13}",
                c.name, c.stream, c.ack_floor, c.pending, c.acked, c.redelivered, c.dead_lettered
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.data_dir)?;
    if store.info(&args.stream).is_none() {
        anyhow::bail!(
            "no stream named {:?} in {} (streams: {})",
            args.stream,
            args.data_dir.display(),
            store.streams().join(", ")
        );
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut next = args.from;
    loop {
        let records = store.read(&args.stream, next, 4096)?;
        let Some(last) = records.last() else {
            break;
        };
        next = last.seq + 1;
        for record in &records {
            let wanted = match &args.filter {
                None => true,
                Some(pattern) => hubcast::Event::from_line(record.line.clone())
                    .is_ok_and(|e| pattern.matches(e.name().as_str())),
            };
            if wanted {
                out.write_all(&record.line)?;
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
