//! The `hubcast` command line: a thin layer over the library, one module per subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Writes one line to standard error, never panicking: `eprintln!` panics when stderr
/// is a closed pipe (`hubcast ... 2>&1 | head`).
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// mimalloc: steadier memory than glibc's malloc under churn, and it can hand cached
/// memory back when the hub goes idle (`memory.rs`); see docs/testing.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod args;
mod auth;
mod bench;
mod config_file;
mod driver;
mod hub_client;
mod logging;
mod memory;
mod output;
mod publish;
mod serve;
mod streams;
mod sub;
mod vendor;

/// `hubcast --version`: the package version and the git revision it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("HUBCAST_GIT_REV"),
    ")"
);

/// A small, fast TCP event hub: clients send JSON events, the hub broadcasts them.
#[derive(Parser)]
#[command(name = "hubcast", version = VERSION, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub.
    Serve(Box<serve::Args>),
    /// Print the events the hub broadcasts, one JSON line each.
    Sub(sub::Args),
    /// Send an event (or one per line of standard input) to the hub.
    Pub(publish::Args),
    /// The delivery demo's store: post orders, thank the driver for deliveries.
    Vendor(vendor::Args),
    /// The delivery demo's driver: pick up and deliver every order.
    Driver(driver::Args),
    /// Measure fan-out throughput and latency (against a hub, nats-server or Redis).
    Bench(bench::Args),
    /// List the streams in a hub's data directory (read-only), or a cluster's in
    /// JetStream (--cluster).
    Streams(streams::ListArgs),
    /// Print a stream's stored events, one JSON line each (read-only).
    Replay(streams::ReplayArgs),
    /// Authentication helpers: `hubcast auth hash` prints a token's hash.
    Auth(auth::AuthArgs),
    /// Mint a JWT for testing, signed with a key (`--jwt-key` verifies it).
    Token(auth::TokenArgs),
    /// Config file helpers: `hubcast config check FILE` checks one without starting.
    Config(config_file::ConfigArgs),
    /// Print a shell completion script: `hubcast completions bash > /etc/bash_completion.d/hubcast`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `hubcast man > hubcast.1; man ./hubcast.1`.
    Man,
}

fn main() -> ExitCode {
    // Bad flags: clap prints the problem and exits with code 2.
    let cli = match with_config_file(Cli::parse()) {
        Ok(cli) => cli,
        Err(message) => {
            report!("hubcast: error: {message}");
            return ExitCode::from(2);
        }
    };
    let outcome = run(cli);
    // The last log lines (a hub's totals) are written before the process ends.
    logging::flush(std::time::Duration::from_secs(2));
    match outcome {
        Ok(code) => code,
        // Whoever read our output has gone (`hubcast sub | head`): not an error.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        // Flags that parse but cannot work together: misuse, as clap's own errors.
        Err(err) if err.downcast_ref::<UsageError>().is_some() => {
            report!("hubcast: error: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            report!("hubcast: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Command-line misuse found after parsing (settings that cannot work together): the
/// process exits with code 2 and this one line, as for a flag clap refuses.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // A listing prints what it read; the NATS client's connection notices are noise.
    init_logging(match cli.command {
        Command::Streams(_) => "info,async_nats=warn",
        _ => "info",
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(memory::on_park)
        .build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Sub(args) => sub::run(args).await,
            Command::Pub(args) => publish::run(args).await,
            Command::Vendor(args) => vendor::run(args).await,
            Command::Driver(args) => driver::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Streams(args) => streams::list(args).await,
            Command::Replay(args) => streams::replay(args),
            Command::Auth(args) => auth::auth(args),
            Command::Token(args) => auth::token(args),
            Command::Config(args) => {
                use clap::CommandFactory;
                config_file::config(args, &Cli::command())
            }
            Command::Completions { shell } => {
                use clap::CommandFactory;
                let mut out = Vec::new();
                clap_complete::generate(shell, &mut Cli::command(), "hubcast", &mut out);
                std::io::Write::write_all(&mut std::io::stdout().lock(), &out)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Man => {
                use clap::CommandFactory;
                let mut out = Vec::new();
                clap_mangen::Man::new(Cli::command()).render(&mut out)?;
                std::io::Write::write_all(&mut std::io::stdout().lock(), &out)?;
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// `serve --config FILE`: parses again with the file's settings in front of the
/// command line's, which win (config_file.rs). A bad file is one line naming the file,
/// line and key, exit 2.
fn with_config_file(cli: Cli) -> Result<Cli, String> {
    let Command::Serve(serve) = &cli.command else {
        return Ok(cli);
    };
    let Some(path) = serve.config.clone() else {
        return Ok(cli);
    };
    use clap::CommandFactory;
    let command = Cli::command();
    let serve = command
        .find_subcommand("serve")
        .ok_or("no serve subcommand")?;
    let entries = config_file::read(&path, serve)?;
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let at = argv
        .iter()
        .position(|a| a == "serve")
        .ok_or("cannot find `serve` among the arguments")?;
    let mut merged = argv[..=at].to_vec();
    merged.extend(config_file::merge(&entries, serve, &argv[at + 1..]));
    match Cli::try_parse_from(merged) {
        Ok(cli) => Ok(cli),
        Err(e) => Err(format!(
            "{} (with the settings of {})",
            e.to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: "),
            path.display()
        )),
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Logs go to stderr, through a bounded queue and a writer thread (`logging.rs`);
/// `RUST_LOG` sets levels (default: `default`, `info` but for `hubcast streams`).
fn init_logging(default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(logging::LogQueue::to_stderr())
        .with_ansi(std::io::stderr().is_terminal())
        // A failed write is not reported with `eprintln!` (which panics on EPIPE).
        .log_internal_errors(false)
        .init();
}
