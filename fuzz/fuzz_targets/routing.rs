//! Fuzzing the router against a naive model (issue #10): random subscriptions are
//! added and removed, and every match must equal a scan of all live (pattern, key)
//! pairs with `Pattern::matches`. Inputs are bounded (at most 64 operations, patterns
//! and names of at most 16 segments from a four-letter alphabet that makes `*` and
//! `>` collide often), so every input runs in well under a millisecond.
#![no_main]

use std::collections::BTreeSet;

use hubcast::routing::{Pattern, Router};
use libfuzzer_sys::fuzz_target;

/// Turns bytes into dot-separated segments: each byte is one segment.
fn text(bytes: &[u8], wildcards: bool) -> String {
    let alphabet: &[&str] = if wildcards {
        &["a", "b", "*", ">"]
    } else {
        &["a", "b", "c", "a"]
    };
    bytes
        .iter()
        .take(16)
        .map(|b| alphabet[usize::from(b % 4)])
        .collect::<Vec<_>>()
        .join(".")
}

fuzz_target!(|data: &[u8]| {
    let mut router = Router::default();
    let mut model: BTreeSet<(String, u8)> = BTreeSet::new();
    for op in data.chunks(6).take(64) {
        let [kind, key, len, rest @ ..] = op else {
            continue;
        };
        let len = usize::from(len % 4) + 1;
        match kind % 3 {
            0 | 1 => {
                let Ok(pattern) = Pattern::parse(&text(&rest[..len.min(rest.len())], true)) else {
                    continue;
                };
                if kind % 3 == 0 {
                    let fresh = model.insert((pattern.as_str().to_string(), *key));
                    assert_eq!(router.insert(&pattern, *key), fresh);
                } else {
                    let held = model.remove(&(pattern.as_str().to_string(), *key));
                    assert_eq!(router.remove(&pattern, *key), held);
                }
            }
            _ => {
                let name = text(&rest[..len.min(rest.len())], false);
                if name.is_empty() {
                    continue;
                }
                let mut got = Vec::new();
                router.matches(&name, &mut got);
                got.sort_unstable();
                let want: BTreeSet<u8> = model
                    .iter()
                    .filter(|(p, _)| Pattern::parse(p).unwrap().matches(&name))
                    .map(|&(_, k)| k)
                    .collect();
                assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "{name}");
            }
        }
        assert_eq!(router.len(), model.len());
    }
});
