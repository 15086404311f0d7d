//! `hubcast pub EVENT [PAYLOAD]`: send one event, or one per line of standard input.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use hubcast::client::{Client, ClientEvent};
use hubcast::{Event, EventName};
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::hub_client::HubAddr;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    hub: HubAddr,
    /// The event's name.
    event: String,
    /// The payload, as JSON. Without it (or with `-`), payloads are read from standard
    /// input, one JSON value per line, and each is sent as its own event.
    payload: Option<String>,
}

/// Sends written ahead of their acknowledgements.
const IN_FLIGHT: usize = 512;

/// Standard input at least this large gets a progress bar (when stderr is a terminal).
const PROGRESS_FROM: u64 = 1 << 20;

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let name = match EventName::new(args.event.as_str()) {
        Ok(name) if name.is_reserved() => {
            return usage(&format!(
                "event names starting with '$' are reserved for the hub: {:?}",
                args.event
            ));
        }
        Ok(name) => name,
        Err(e) => {
            return usage(&format!(
                "invalid event name {:?}: {}",
                args.event, e.message
            ))
        }
    };
    let single = match args.payload.as_deref() {
        Some("-") | None => None,
        Some(text) => match parse_payload(text) {
            Ok(raw) => Some(raw),
            Err(e) => return usage(&format!("the payload is not valid JSON: {e}")),
        },
    };
    let rejected = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&rejected);
    let builder = args.hub.builder().on_any(move |event| {
        if matches!(event, ClientEvent::HubError(_)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let client = args.hub.connect(builder).await?;
    let mut code = ExitCode::SUCCESS;
    match single {
        Some(payload) => send(&client, &name, &payload).await?,
        None => {
            if let Err(message) = send_lines(&client, &name).await? {
                report!("hubcast: error: {message}");
                code = ExitCode::from(2);
            }
        }
    }
    // Returns once the hub has read everything and closed its side.
    client.close().await;
    let rejected = rejected.load(Ordering::Relaxed);
    if rejected > 0 {
        report!("hubcast: error: the hub rejected {rejected} event(s) (see the messages above)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(code)
}

fn usage(message: &str) -> anyhow::Result<ExitCode> {
    report!("hubcast: error: {message}");
    Ok(ExitCode::from(2))
}

fn parse_payload(text: &str) -> Result<Box<RawValue>, serde_json::Error> {
    serde_json::from_str(text.trim())
}

async fn send(client: &Client, name: &EventName, payload: &RawValue) -> anyhow::Result<()> {
    let event = Event::new(name.as_str(), payload).map_err(|e| anyhow::anyhow!("{e}"))?;
    client.send(&event).await.context("sending to the hub")
}

/// Sends one event per line of standard input, up to [`IN_FLIGHT`] at a time, in order.
/// Stops at the first line that is not JSON, sending nothing of it: `Ok(Err(message))`
/// names that line.
async fn send_lines(client: &Client, name: &EventName) -> anyhow::Result<Result<(), String>> {
    let progress = progress_bar();
    if std::io::stdin().is_terminal() {
        report!("reading payloads from standard input, one JSON value per line; end with Ctrl-D");
    }
    let mut sent = 0u64;
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = Vec::new();
    let mut in_flight = VecDeque::new();
    let mut verdict = Ok(());
    for number in 1u64.. {
        line.clear();
        let read = stdin
            .read_until(b'\n', &mut line)
            .await
            .context("reading standard input")?;
        if read == 0 {
            break;
        }
        if let Some(bar) = &progress {
            bar.inc(read as u64);
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            verdict = Err(format!("line {number}: not valid UTF-8"));
            break;
        };
        if text.trim().is_empty() {
            continue;
        }
        let payload = match parse_payload(text) {
            Ok(payload) => payload,
            Err(e) => {
                verdict = Err(format!("line {number}: invalid JSON: {e}"));
                break;
            }
        };
        let event = Event::new(name.as_str(), &payload)
            .map_err(|e| anyhow::anyhow!("line {number}: {e}"))?;
        in_flight.push_back(client.enqueue(&event).await.context("sending to the hub")?);
        sent += 1;
        if in_flight.len() >= IN_FLIGHT {
            if let Some(oldest) = in_flight.pop_front() {
                oldest.await.context("sending to the hub")?;
            }
        }
    }
    for delivery in in_flight {
        delivery.await.context("sending to the hub")?;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let plural = if sent == 1 { "" } else { "s" };
    report!("sent {sent} event{plural}");
    Ok(verdict)
}

/// A progress bar over standard input's size, when that is a large file and someone
/// is watching stderr.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    use std::os::fd::AsFd;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let fd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    if !meta.is_file() || meta.len() < PROGRESS_FROM {
        return None;
    }
    let bar = indicatif::ProgressBar::new(meta.len());
    let style = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .ok()?;
    bar.set_style(style);
    Some(bar)
}
