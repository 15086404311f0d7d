//! The settings file: `hubcast serve --config FILE` and `hubcast config check FILE`.
//!
//! Every `serve` flag has a key, in sections that follow `Config`'s (`limits`,
//! `delivery`, `timeouts`, `streams`) plus the binary's own (`listen`, `auth`, `tls`,
//! `security`, `logging`); [`KEYS`] is the one table of them. A file is read into the
//! flags it stands for, each value checked with that flag's own parser (so the file
//! and the command line accept exactly the same values), and an error names the file,
//! the line and the key. Precedence: flags on the command line, then `HUBCAST_*` (and
//! `PORT`) environment variables, then the file, then the defaults. Relative paths in
//! the file are relative to the file's own directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

/// How a key's value becomes flags.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// `--flag VALUE`.
    Value,
    /// A path: `--flag PATH`, relative to the file's directory.
    Path,
    /// `key = true` → `--flag`; `false` → nothing.
    Switch,
    /// `key = false` → `--flag` (a `--no-...` flag); `true` → nothing.
    InvertedSwitch,
    /// An array: `--flag VALUE` for each element.
    List,
}

/// Every key of the file, with the `serve` flag it sets.
pub const KEYS: &[(&str, &str, Kind)] = &[
    ("listen.host", "host", Kind::Value),
    ("listen.port", "port", Kind::Value),
    ("listen.http", "http", Kind::Value),
    ("limits.max_frame", "max-frame", Kind::Value),
    ("limits.max_pending", "max-pending", Kind::Value),
    (
        "limits.max_inbound_memory",
        "max-inbound-memory",
        Kind::Value,
    ),
    ("limits.max_connections", "max-conns", Kind::Value),
    ("limits.max_subscriptions", "max-subscriptions", Kind::Value),
    (
        "limits.max_pattern_segments",
        "max-pattern-segments",
        Kind::Value,
    ),
    ("limits.max_pattern_bytes", "max-pattern-bytes", Kind::Value),
    ("limits.max_rooms", "max-rooms", Kind::Value),
    ("limits.max_errors", "max-errors", Kind::Value),
    ("limits.error_window", "error-window", Kind::Value),
    ("limits.max_rate", "max-rate", Kind::Value),
    ("limits.max_bytes_rate", "max-bytes-rate", Kind::Value),
    ("limits.max_conns_per_ip", "max-conns-per-ip", Kind::Value),
    ("limits.accept_rate", "accept-rate", Kind::Value),
    ("delivery.echo", "no-echo", Kind::InvertedSwitch),
    ("delivery.slow_consumer", "slow-consumer", Kind::Value),
    ("timeouts.idle", "idle-timeout", Kind::Value),
    ("timeouts.drain", "drain-timeout", Kind::Value),
    ("timeouts.auth", "auth-timeout", Kind::Value),
    ("timeouts.ws_ping", "ws-ping", Kind::Value),
    ("streams.declared", "stream", Kind::List),
    ("streams.data_dir", "data-dir", Kind::Path),
    ("streams.fsync", "fsync", Kind::Value),
    ("streams.dedup_window", "dedup-window", Kind::Value),
    ("streams.max_events", "max-stream-events", Kind::Value),
    ("streams.max_bytes", "max-stream-bytes", Kind::Value),
    ("streams.max_age", "max-stream-age", Kind::Value),
    ("streams.limits", "stream-limits", Kind::List),
    ("auth.file", "auth", Kind::Path),
    ("auth.jwt_key", "jwt-key", Kind::Path),
    ("tls.cert", "tls-cert", Kind::Path),
    ("tls.key", "tls-key", Kind::Path),
    ("tls.client_ca", "tls-client-ca", Kind::Path),
    ("security.insecure", "insecure", Kind::Switch),
    ("cluster.urls", "cluster", Kind::List),
    ("cluster.node", "node", Kind::Value),
    ("cluster.ca", "cluster-ca", Kind::Path),
    ("cluster.cert", "cluster-cert", Kind::Path),
    ("cluster.key", "cluster-key", Kind::Path),
    ("cluster.replicas", "replicas", Kind::Value),
    ("logging.quiet", "quiet", Kind::Switch),
];

/// One setting read from the file.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its key (`limits.max_frame`).
    pub key: String,
    /// The flag it sets (`max-frame`).
    pub flag: &'static str,
    /// The flag's arguments (`--max-frame`, `1MiB`).
    pub args: Vec<OsString>,
}

/// Reads `path` into the `serve` flags it stands for, checking every key and value
/// against `serve` (the subcommand's clap definition).
///
/// # Errors
///
/// One line naming the file, the line and the key: a file that cannot be read, TOML
/// that does not parse, an unknown section or key, a value of the wrong type or that
/// the flag's parser refuses.
pub fn read(path: &Path, serve: &clap::Command) -> Result<Vec<Entry>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let shown = path.display().to_string();
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let table = DeTable::parse(&text).map_err(|e| {
        let line = e.span().map_or(0, |span| line_of(&text, span.start));
        format!("{shown}:{line}: {}", e.message().trim())
    })?;
    let at = |span: std::ops::Range<usize>| format!("{shown}:{}", line_of(&text, span.start));
    let mut entries = Vec::new();
    for (section, value) in table.get_ref() {
        let section_name = section.get_ref().as_ref();
        let DeValue::Table(keys) = value.get_ref() else {
            return Err(format!(
                "{}: `{section_name}` must be a section ([{section_name}]), with keys {}",
                at(section.span()),
                keys_of(section_name)
                    .unwrap_or_else(|| "(none: it is not a section hubcast knows)".into())
            ));
        };
        let Some(known) = keys_of(section_name) else {
            return Err(format!(
                "{}: unknown section [{section_name}] (known: {})",
                at(section.span()),
                sections().join(", ")
            ));
        };
        for (key, value) in keys {
            let full = format!("{section_name}.{}", key.get_ref().as_ref());
            let Some(&(_, flag, how)) = KEYS.iter().find(|(k, _, _)| *k == full) else {
                return Err(format!(
                    "{}: unknown key `{full}` (keys in [{section_name}]: {known})",
                    at(key.span())
                ));
            };
            let here = at(value.span());
            let args = to_args(flag, how, value.get_ref(), &base)
                .map_err(|why| format!("{here}: {full}: {why}"))?;
            check(serve, flag, &args).map_err(|why| format!("{here}: {full}: {why}"))?;
            entries.push(Entry {
                key: full,
                flag,
                args,
            });
        }
    }
    Ok(entries)
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn sections() -> Vec<&'static str> {
    let mut names: Vec<&str> = KEYS
        .iter()
        .map(|(k, _, _)| k.split('.').next().unwrap_or(k))
        .collect();
    names.dedup();
    names
}

fn keys_of(section: &str) -> Option<String> {
    let keys: Vec<&str> = KEYS
        .iter()
        .filter_map(|(k, _, _)| k.strip_prefix(section)?.strip_prefix('.'))
        .collect();
    (!keys.is_empty()).then(|| keys.join(", "))
}

/// The flag's arguments for a value of the file.
fn to_args(
    flag: &str,
    kind: Kind,
    value: &DeValue<'_>,
    base: &Path,
) -> Result<Vec<OsString>, String> {
    let long = OsString::from(format!("--{flag}"));
    let scalar = |value: &DeValue<'_>| -> Result<String, String> {
        match value {
            DeValue::String(s) => Ok(s.to_string()),
            DeValue::Integer(i) => Ok(i.as_str().replace('_', "")),
            DeValue::Float(f) => Ok(f.as_str().to_string()),
            DeValue::Boolean(b) => Ok(b.to_string()),
            _ => Err("expected a string or a number".to_string()),
        }
    };
    Ok(match kind {
        Kind::Value => vec![long, scalar(value)?.into()],
        Kind::Path => {
            let DeValue::String(s) = value else {
                return Err("expected a path (a string)".into());
            };
            let path = PathBuf::from(s.as_ref());
            let path = if path.is_relative() {
                base.join(path)
            } else {
                path
            };
            vec![long, path.into_os_string()]
        }
        Kind::Switch | Kind::InvertedSwitch => {
            let DeValue::Boolean(on) = value else {
                return Err("expected true or false".into());
            };
            if *on == (kind == Kind::Switch) {
                vec![long]
            } else {
                Vec::new()
            }
        }
        Kind::List => {
            let DeValue::Array(items) = value else {
                return Err("expected an array of strings".into());
            };
            let mut args = Vec::new();
            for item in items {
                args.push(long.clone());
                args.push(scalar(item.get_ref())?.into());
            }
            args
        }
    })
}

/// Checks each value with the flag's own parser.
fn check(serve: &clap::Command, flag: &str, args: &[OsString]) -> Result<(), String> {
    let Some(arg) = serve.get_arguments().find(|a| a.get_long() == Some(flag)) else {
        return Err(format!("no flag --{flag} (a bug: the key table names it)"));
    };
    // The flag alone in a command of its own: its parser and its possible values, not
    // the rules that tie it to other flags (checked once all are read).
    let alone = clap::Command::new("hubcast").no_binary_name(true).arg(
        arg.clone()
            .requires(clap::builder::Resettable::<clap::Id>::Reset)
            .required(false),
    );
    alone
        .try_get_matches_from(args)
        .map(|_| ())
        .map_err(|e| clap_message(&e))
}

/// clap's error as one line, without its `error: ` prefix and usage.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.trim_start_matches("error: ").to_string()
}

/// The `serve` arguments with the file's settings in front of the user's own: those
/// the user gave (on the command line, or in the flag's environment variable) win.
pub fn merge(entries: &[Entry], serve: &clap::Command, user: &[OsString]) -> Vec<OsString> {
    let given = |flag: &str| {
        let long = format!("--{flag}");
        let on_line = user.iter().any(|a| {
            let a = a.to_string_lossy();
            a == long || a.starts_with(&format!("{long}="))
        });
        let in_env = serve
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .and_then(|a| a.get_env())
            .is_some_and(|var| std::env::var_os(var).is_some());
        on_line || in_env
    };
    let mut args: Vec<OsString> = entries
        .iter()
        .filter(|e| !given(e.flag))
        .flat_map(|e| e.args.iter().cloned())
        .collect();
    args.extend(user.iter().cloned());
    args
}

/// `hubcast config`.
#[derive(clap::Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(clap::Subcommand)]
enum ConfigCommand {
    /// Check a config file as `serve --config FILE` would read it (keys, values, the
    /// settings together, the auth and TLS files it names), without starting a hub.
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// `hubcast config check FILE`: exit 0 and a summary, or 2 and the problem.
pub fn config(args: ConfigArgs, cli: &clap::Command) -> anyhow::Result<std::process::ExitCode> {
    let ConfigCommand::Check { file } = args.command;
    let serve = cli
        .find_subcommand("serve")
        .ok_or_else(|| anyhow::anyhow!("no serve subcommand"))?;
    let entries = read(&file, serve).map_err(crate::UsageError)?;
    let argv: Vec<OsString> = std::iter::once(OsString::from("serve"))
        .chain(merge(&entries, serve, &[]))
        .collect();
    let matches = serve
        .clone()
        .no_binary_name(true)
        .try_get_matches_from(&argv[1..])
        .map_err(|e| crate::UsageError(format!("{}: {}", file.display(), clap_message(&e))))?;
    let serve_args = <crate::serve::Args as clap::FromArgMatches>::from_arg_matches(&matches)
        .map_err(|e| crate::UsageError(clap_message(&e)))?;
    crate::serve::prepare(&serve_args)
        .map_err(|e| crate::UsageError(format!("{}: {e:#}", file.display())))?;
    use std::io::Write;
    let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    let _ = writeln!(
        std::io::stdout(),
        "{}: OK ({} setting{}: {})",
        file.display(),
        entries.len(),
        if entries.len() == 1 { "" } else { "s" },
        keys.join(", ")
    );
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_names_a_serve_flag_and_every_flag_has_a_key() {
        use clap::CommandFactory;
        let cli = crate::Cli::command();
        let serve = cli.find_subcommand("serve").unwrap();
        for (key, flag, _) in KEYS {
            assert!(
                serve.get_arguments().any(|a| a.get_long() == Some(flag)),
                "{key} → --{flag}"
            );
        }
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["config", "help", "version"].contains(&long) {
                continue;
            }
            assert!(
                KEYS.iter().any(|(_, flag, _)| *flag == long),
                "--{long} has no key in the config file"
            );
        }
    }
}
