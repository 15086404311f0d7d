//! Backoff for addresses that fail to authenticate: after a failure, that address's
//! next attempt is read only after a wait that doubles with each failure (from
//! [`FIRST_WAIT`], capped at [`MAX_WAIT`]), and its attempts are spaced by that wait
//! however many connections it opens. Other addresses are not affected. An address is
//! forgotten [`FORGET_AFTER`] after its last failure.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The wait after one failure.
pub(crate) const FIRST_WAIT: Duration = Duration::from_millis(50);
/// The longest wait.
pub(crate) const MAX_WAIT: Duration = Duration::from_secs(2);
/// How long an address's failures are remembered.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most addresses remembered (an attacker with many addresses cannot grow the map
/// past this; past it, new addresses are not penalised until old ones are forgotten).
const MAX_ADDRESSES: usize = 100_000;

struct Entry {
    failures: u32,
    last_failure: Instant,
    /// When the next attempt from this address may be read.
    next_slot: Instant,
}

/// Addresses that failed to authenticate recently.
#[derive(Default)]
pub(crate) struct Penalties {
    addresses: Mutex<HashMap<IpAddr, Entry>>,
}

impl Penalties {
    /// Records a failed attempt from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&ip) {
            map.retain(|_, e| now.duration_since(e.last_failure) < FORGET_AFTER);
            if map.len() >= MAX_ADDRESSES {
                return;
            }
        }
        let entry = map.entry(ip).or_insert(Entry {
            failures: 0,
            last_failure: now,
            next_slot: now,
        });
        entry.failures = entry.failures.saturating_add(1);
        entry.last_failure = now;
    }

    /// When a new attempt from `ip` may be read (`None`: at once), reserving that
    /// moment for it: attempts from a penalised address are spaced by its wait.
    pub(crate) fn slot(&self, ip: IpAddr) -> Option<Instant> {
        let now = Instant::now();
        let mut map = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.get_mut(&ip)?;
        if now.duration_since(entry.last_failure) >= FORGET_AFTER {
            map.remove(&ip);
            return None;
        }
        let wait = wait_after(entry.failures);
        // The first attempt after a failure waits too; each later one a wait more.
        let slot = entry.next_slot.max(now).max(entry.last_failure + wait);
        entry.next_slot = slot + wait;
        (slot > now).then_some(slot)
    }

    /// How many addresses are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.addresses.lock().unwrap().len()
    }
}

/// The wait after `failures` failures.
pub(crate) fn wait_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_WAIT.saturating_mul(1 << doublings).min(MAX_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_and_are_capped() {
        assert_eq!(wait_after(1), FIRST_WAIT);
        assert_eq!(wait_after(2), FIRST_WAIT * 2);
        assert_eq!(wait_after(3), FIRST_WAIT * 4);
        assert_eq!(wait_after(100), MAX_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_from_a_failing_address_are_spaced_and_others_are_not() {
        let p = Penalties::default();
        let bad: IpAddr = [10, 0, 0, 1].into();
        let good: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(p.slot(bad), None);
        for _ in 0..3 {
            p.failed(bad);
        }
        let now = Instant::now();
        let first = p.slot(bad).unwrap();
        let second = p.slot(bad).unwrap();
        assert!(first >= now + wait_after(3));
        assert!(second >= first + wait_after(3));
        assert_eq!(p.slot(good), None);
        tokio::time::advance(FORGET_AFTER).await;
        assert_eq!(p.slot(bad), None);
        assert_eq!(p.len(), 0);
    }
}
