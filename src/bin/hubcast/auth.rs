//! `hubcast auth hash` (a token's hash for the auth file) and `hubcast token` (a JWT
//! for testing, signed with a key).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use hubcast::auth::{PermissionSpec, RuleSpec, TokenHash};

use crate::args::parse_positive_duration;

#[derive(clap::Args)]
pub struct AuthArgs {
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(clap::Subcommand)]
enum AuthCommand {
    /// Print the hash of a token read on standard input (a trailing newline is not
    /// part of it), for `token_hash` in the auth file.
    Hash {
        /// Make a new random token instead: print it, then its hash.
        #[arg(long)]
        new: bool,
    },
}

pub fn auth(args: AuthArgs) -> anyhow::Result<ExitCode> {
    let AuthCommand::Hash { new } = args.command;
    let mut out = std::io::stdout().lock();
    if new {
        let token = hubcast::auth::random_token();
        writeln!(out, "token: {token}")?;
        writeln!(out, "token_hash: {}", TokenHash::new(token.as_bytes()))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut secret = Vec::new();
    std::io::stdin().read_to_end(&mut secret)?;
    if secret.ends_with(b"\n") {
        secret.pop();
        if secret.ends_with(b"\r") {
            secret.pop();
        }
    }
    if secret.is_empty() {
        return Err(crate::UsageError(
            "no token on standard input (try: echo -n SECRET | hubcast auth hash, or hubcast auth hash --new)"
                .into(),
        )
        .into());
    }
    writeln!(out, "{}", TokenHash::new(&secret))?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct TokenArgs {
    /// The signing key: an HS256 secret (the file's contents), or an RSA, EC P-256 or
    /// Ed25519 private key PEM (the hub verifies with the public key).
    #[arg(long, value_name = "FILE", visible_alias = "jwt-key")]
    key: PathBuf,
    /// The identity (the `sub` claim).
    #[arg(long, visible_alias = "user")]
    sub: String,
    /// How long the token is valid (the `exp` claim), e.g. 30s, 10m, 1h.
    #[arg(long, default_value = "1h", value_parser = parse_positive_duration, visible_aliases = ["exp", "expires-in"])]
    ttl: Duration,
    /// Event-name patterns it may publish (repeatable).
    #[arg(long, value_name = "PATTERN")]
    publish: Vec<String>,
    /// Event-name patterns it may hear and subscribe to (repeatable).
    #[arg(long, value_name = "PATTERN")]
    subscribe: Vec<String>,
    /// Rooms it may join and send to (repeatable).
    #[arg(long, value_name = "PATTERN")]
    rooms: Vec<String>,
    /// Durable consumers it may use, as STREAM/CONSUMER (repeatable).
    #[arg(long, value_name = "STREAM/CONSUMER")]
    consume: Vec<String>,
    /// It may see the stats and the dashboard.
    #[arg(long)]
    admin: bool,
    /// The whole `hubcast` claim as JSON instead of the flags above, e.g.
    /// '{"publish":{"allow":[">"],"deny":["secret.>"]}}'.
    #[arg(long, value_name = "JSON", conflicts_with_all = ["publish", "subscribe", "rooms", "consume", "admin"])]
    claim: Option<String>,
}

pub fn token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let permissions = match &args.claim {
        Some(json) => serde_json::from_str::<PermissionSpec>(json)
            .map_err(|e| crate::UsageError(format!("--claim: {e}")))?,
        None => {
            let table = |allow: &[String]| {
                (!allow.is_empty()).then(|| RuleSpec {
                    allow: allow.to_vec(),
                    deny: Vec::new(),
                })
            };
            PermissionSpec {
                publish: table(&args.publish),
                subscribe: table(&args.subscribe),
                rooms: table(&args.rooms),
                consume: table(&args.consume),
                admin: args.admin,
            }
        }
    };
    let token = hubcast::auth::mint_token(&args.key, &args.sub, Some(args.ttl), &permissions)
        .map_err(crate::UsageError)?;
    writeln!(std::io::stdout(), "{token}")?;
    Ok(ExitCode::SUCCESS)
}
