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
    #[arg(long = "room", value_name = "ROOM", value_parser = parse_room)]
    rooms: Vec<String>,
    /// Pretty-print each event over several lines, for people.
    #[arg(long)]
    pretty: bool,
    /// Consume the stream given with --stream as this durable consumer: get what is
    /// stored (also while this was not running), and acknowledge each event once it
    /// is printed. A pattern given filters the stream; a --room, its room.
    #[arg(long, value_name = "CONSUMER", requires = "stream")]
    durable: Option<String>,
    /// The stream --durable consumes.
    #[arg(long, value_name = "STREAM", requires = "durable")]
    stream: Option<String>,
    /// Where a new --durable consumer starts: all (the oldest stored), new, or a seq.
    #[arg(long, value_name = "all|new|SEQ", requires = "durable", value_parser = parse_start)]
    start: Option<Start>,
}

#[derive(Debug, Clone, Copy)]
enum Start {
    All,
    New,
    Seq(u64),
}

fn parse_start(text: &str) -> Result<Start, String> {
    match text {
        "all" => Ok(Start::All),
        "new" => Ok(Start::New),
        seq => match seq.parse::<u64>() {
            Ok(seq) if seq > 0 => Ok(Start::Seq(seq)),
            _ => Err(format!("{seq:?}: expected all, new or a seq of 1 or more")),
        },
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let (Some(consumer), Some(stream)) = (&args.durable, &args.stream) {
        return durable(&args, stream, consumer).await;
    }
    let patterns: Vec<&str> = args.events.iter().map(String::as_str).collect();
    let mut builder = args.hub.builder()?.subscribe(&patterns);
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

/// `hubcast sub --durable`: prints deliveries, acknowledging each batch once it is
/// written out.
async fn durable(args: &Args, stream: &str, consumer: &str) -> anyhow::Result<ExitCode> {
    let mut options = hubcast::client::ConsumeOptions::new(stream, consumer);
    match args.events.as_slice() {
        [] => {}
        [pattern] => options = options.filter(pattern),
        _ => {
            return Err(crate::UsageError(
                "--durable takes at most one pattern (its filter)".into(),
            )
            .into())
        }
    }
    match args.rooms.as_slice() {
        [] => {}
        [room] => options = options.room(room),
        _ => return Err(crate::UsageError("--durable takes at most one --room".into()).into()),
    }
    options = match args.start {
        None => options,
        Some(Start::All) => options,
        Some(Start::New) => options.start_new(),
        Some(Start::Seq(seq)) => options.start_at(seq),
    };
    let client = args.hub.connect(args.hub.builder()?).await?;
    let mut deliveries = match client.consume(options).await {
        Ok(deliveries) => deliveries,
        Err(hubcast::client::ClientError::Hub(refused)) => {
            anyhow::bail!("the hub refused to consume {stream}: {}", refused.message)
        }
        Err(e) => return Err(e.into()),
    };
    let stdout_closed = crate::output::closed();
    tokio::pin!(stdout_closed);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut printed = Vec::new();
    loop {
        let next = tokio::select! {
            _ = &mut stdout_closed => return Ok(ExitCode::SUCCESS),
            next = deliveries.next() => next,
        };
        let Some(mut next) = next else {
            anyhow::bail!("lost the connection to the hub at {}", args.hub.addr());
        };
        loop {
            print(&mut out, &ClientEvent::Event(next.event.clone()), args)?;
            printed.push(next.seq);
            match deliveries.try_next() {
                Some(more) => next = more,
                None => break,
            }
        }
        // Acknowledged only once written: a crash before this gets them again.
        out.flush()?;
        deliveries.ack(&printed).await?;
        printed.clear();
    }
}

fn parse_room(text: &str) -> Result<String, String> {
    hubcast::RoomName::new(text)
        .map(|r| r.as_str().to_string())
        .map_err(|e| e.message)
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
    match args.pretty.then(|| pretty(event.line())).flatten() {
        Some(text) => writeln!(out, "{text}")?,
        // Not pretty-printing, or text the re-indenter cannot follow: as it came.
        None => out.write_all(event.line())?,
    }
    Ok(())
}

/// Re-indents JSON text, two spaces a level, without parsing it into values: so it
/// prints whatever the hub forwards (nesting of any depth, `1e400`, a lone surrogate
/// escape, none of which a `serde_json::Value` round trip survives) and keeps the
/// sender's key order (issue #11). `None` if the brackets do not balance.
fn pretty(line: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(line).ok()?.trim_end();
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let (mut in_string, mut escaped) = (false, false);
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    out.extend(chars.next());
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.checked_sub(1)?;
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    (depth == 0 && !in_string).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::pretty;

    #[test]
    fn pretty_matches_serde_for_ordinary_events_and_keeps_key_order() {
        let line = br#"{"event":"a","payload":{"z":1,"a":[1,2,{}],"s":"x:{,}\"y"}}"#;
        let value: serde_json::Value = serde_json::from_slice(line).unwrap();
        let ours = pretty(line).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&ours).unwrap(),
            value
        );
        assert!(
            ours.find("\"z\"").unwrap() < ours.find("\"a\": [").unwrap(),
            "{ours}"
        );
        assert!(ours.contains("\n    \"z\": 1,\n"), "{ours}");
        assert!(ours.contains("[]") || ours.contains("{}"), "{ours}");
    }

    /// Issue #11 (6): what `serde_json::Value` cannot hold is printed as it came.
    #[test]
    fn pretty_prints_what_a_value_cannot_hold() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for payload in [deep.as_str(), "1e400", r#""\ud800""#] {
            let line = format!(r#"{{"event":"a","payload":{payload}}}"#);
            let ours = pretty(line.as_bytes()).unwrap();
            let squeezed: String = ours.split_whitespace().collect();
            assert_eq!(squeezed, line.replace(' ', ""), "{payload}");
        }
        assert_eq!(pretty(b"{\"event\":\"a\"}}"), None);
    }
}
