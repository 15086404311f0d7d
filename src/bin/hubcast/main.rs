//! The `hubcast` command line: a thin layer over the library, one module per subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod args;
mod serve;

/// A small, fast TCP event hub: clients send JSON events, the hub broadcasts them.
#[derive(Parser)]
#[command(name = "hubcast", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub.
    Serve(serve::Args),
}

fn main() -> ExitCode {
    // Bad flags: clap prints the problem and exits with code 2.
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hubcast: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
        }
    })
}

/// Logs go to stderr; `RUST_LOG` sets levels (default `info`).
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
