//! `hubcast pub EVENT [PAYLOAD]`: send one event, or one per line of standard input.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use hubcast::client::{Client, ClientError, ClientEvent, Stored};
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
    /// Wait until the hub confirms each event (`$stored`): stored in a stream, or
    /// delivered live when none matches; exit 1 if any could not be stored.
    #[arg(long)]
    confirm: bool,
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
    let builder = args.hub.builder()?.on_any(move |event| {
        if matches!(event, ClientEvent::HubError(_)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let client = args.hub.connect(builder).await?;
    let mut code = ExitCode::SUCCESS;
    let mut confirmations = args.confirm.then(Confirmations::default);
    match single {
        Some(payload) => match &mut confirmations {
            Some(tally) => {
                let stored = client.emit_confirmed(name.as_str(), &*payload).await;
                tally.count(stored);
            }
            None => send(&client, &name, &payload).await?,
        },
        None => {
            if let Err(message) = send_lines(&client, &name, confirmations.as_mut()).await? {
                report!("hubcast: error: {message}");
                code = ExitCode::from(2);
            }
        }
    }
    if let Some(tally) = &confirmations {
        report!(
            "confirmed: {} stored, {} delivered live only (no stream matched), {} not stored",
            tally.stored,
            tally.live,
            tally.failed
        );
        if tally.failed > 0 && code == ExitCode::SUCCESS {
            code = ExitCode::FAILURE;
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

/// What `--confirm` heard back.
#[derive(Default)]
struct Confirmations {
    stored: u64,
    live: u64,
    failed: u64,
}

impl Confirmations {
    fn count(&mut self, answer: Result<Stored, ClientError>) {
        match answer {
            Ok(stored) if stored.stream.is_some() => self.stored += 1,
            Ok(_) => self.live += 1,
            Err(e) => {
                report!("hubcast: error: {:#}", anyhow::Error::new(e));
                self.failed += 1;
            }
        }
    }
}

/// One send in flight: written, or (with `--confirm`) confirmed.
enum InFlight {
    Written(hubcast::client::Delivery),
    Confirmed(hubcast::client::Confirmation),
}

/// Waits for one send in flight, and counts its confirmation.
async fn settle(sent: InFlight, tally: Option<&mut Confirmations>) -> anyhow::Result<()> {
    match sent {
        InFlight::Written(delivery) => delivery.await.context("sending to the hub"),
        InFlight::Confirmed(answer) => {
            let answer = answer.await;
            if let Some(tally) = tally {
                tally.count(answer);
            }
            Ok(())
        }
    }
}

/// Sends one event per line of standard input, up to [`IN_FLIGHT`] at a time, in order.
/// Stops at the first line that is not JSON, sending nothing of it: `Ok(Err(message))`
/// names that line. With `confirmations`, each event carries an id and is waited for.
async fn send_lines(
    client: &Client,
    name: &EventName,
    mut confirmations: Option<&mut Confirmations>,
) -> anyhow::Result<Result<(), String>> {
    // Ids unique to this run: a rerun of the same file is stored again.
    let run = format!("{:016x}", fastrand::u64(..));

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
        let next = if confirmations.is_some() {
            let id = format!("{run}-{number}");
            let answer = client
                .enqueue_with_id(name.as_str(), &payload, &id)
                .await
                .context("sending to the hub")?;
            InFlight::Confirmed(answer)
        } else {
            let event = Event::new(name.as_str(), &payload)
                .map_err(|e| anyhow::anyhow!("line {number}: {e}"))?;
            InFlight::Written(client.enqueue(&event).await.context("sending to the hub")?)
        };
        in_flight.push_back(next);
        sent += 1;
        if in_flight.len() >= IN_FLIGHT {
            if let Some(oldest) = in_flight.pop_front() {
                settle(oldest, confirmations.as_deref_mut()).await?;
            }
        }
    }
    for sent in in_flight {
        settle(sent, confirmations.as_deref_mut()).await?;
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
