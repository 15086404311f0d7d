//! `hubcast sub`: print the events the hub broadcasts, one JSON line each.

use std::io::Write;
use std::process::ExitCode;

use hubcast::client::ClientEvent;

use crate::hub_client::HubAddr;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    hub: HubAddr,
    /// Print only events matching these patterns (default: all). Names split on '.';
    /// '*' matches one segment, '>' at the end one or more: `order.*`, `order.>`.
    #[arg(value_parser = parse_pattern)]
    events: Vec<String>,
    /// Join this room, to also hear events sent to it (repeatable).
    #[arg(long = "room", value_name = "ROOM")]
    rooms: Vec<String>,
    /// Pretty-print each event over several lines, for people.
    #[arg(long)]
    pretty: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let patterns: Vec<&str> = args.events.iter().map(String::as_str).collect();
    let mut builder = args.hub.builder().subscribe(&patterns);
    for room in &args.rooms {
        builder = builder.join(room);
    }
    let mut events = builder.events();
    let _client = args.hub.connect(builder).await?;
    let stdout_closed = crate::output::closed();
    tokio::pin!(stdout_closed);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let next = tokio::select! {
            // `hubcast sub | head -3`: leave as soon as the reader is gone.
            _ = &mut stdout_closed => return Ok(ExitCode::SUCCESS),
            next = events.next() => next,
        };
        let Some(mut next) = next else {
            anyhow::bail!("lost the connection to the hub at {}", args.hub.addr());
        };
        // Write everything that is ready, then flush once.
        loop {
            print(&mut out, &next, &args)?;
            match events.try_next() {
                Some(more) => next = more,
                None => break,
            }
        }
        out.flush()?;
    }
}

fn parse_pattern(text: &str) -> Result<String, String> {
    hubcast::routing::Pattern::parse(text)
        .map(|p| p.to_string())
        .map_err(|e| e.message)
}

fn print(out: &mut impl Write, next: &ClientEvent, args: &Args) -> anyhow::Result<()> {
    let ClientEvent::Event(event) = next else {
        return Ok(());
    };
    if args.pretty {
        let value: serde_json::Value = serde_json::from_slice(event.line())?;
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        out.write_all(event.line())?;
    }
    Ok(())
}
