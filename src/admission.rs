//! Who may open a connection, per address: at most `--max-conns-per-ip` open at once,
//! and at most `--accept-rate` attempts per second. Both off by default, and then
//! nothing is tracked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::protocol::{ErrorCode, ProtocolError};

/// Most addresses tracked; past it, addresses with no open connection and no attempt
/// this second are forgotten.
const MAX_TRACKED: usize = 100_000;
/// Refusals per address per second that a TLS listener answers in words (which takes
/// a full handshake); past them it closes before the handshake.
pub(crate) const ANSWERED_TLS_REFUSALS: u32 = 4;

#[derive(Default)]
struct Entry {
    open: usize,
    /// The second (since `start`) the attempts count in.
    window: u64,
    attempts: u32,
    /// The second (since `start`) `answered` counts in.
    answered_window: u64,
    /// Refusals answered after a handshake in that second.
    answered: u32,
}

/// The per-address limits and what each address holds.
pub(crate) struct Admission {
    per_ip: Option<usize>,
    rate: Option<u32>,
    start: Instant,
    addresses: Mutex<HashMap<IpAddr, Entry>>,
}

/// An admitted connection's place in its address's count, given back when dropped.
pub(crate) struct Ticket {
    /// Boxed: every connection task carries a ticket, and without limits it is empty.
    admission: Option<Box<(Arc<Admission>, IpAddr)>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(held) = self.admission.take() else {
            return;
        };
        let (admission, ip) = *held;
        let mut map = admission.lock();
        if let Some(entry) = map.get_mut(&ip) {
            entry.open = entry.open.saturating_sub(1);
            if entry.open == 0 && admission.rate.is_none() {
                map.remove(&ip);
            }
        }
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.admission {
            Some(held) => write!(f, "Ticket({})", held.1),
            None => f.write_str("Ticket"),
        }
    }
}

/// Why an address may not connect now.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// It has `--max-conns-per-ip` open.
    PerIp(ProtocolError),
    /// It made `--accept-rate` attempts this second.
    Rate(ProtocolError),
}

impl Admission {
    pub(crate) fn new(per_ip: Option<usize>, rate: Option<u32>) -> Arc<Self> {
        Arc::new(Admission {
            per_ip,
            rate,
            start: Instant::now(),
            addresses: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a connection from `ip`, or says why not.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        if self.per_ip.is_none() && self.rate.is_none() {
            return Ok(Ticket { admission: None });
        }
        let elapsed = self.start.elapsed();
        let second = elapsed.as_secs();
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, e| e.open > 0 || e.window == second);
        }
        let entry = map.entry(ip).or_default();
        if let Some(rate) = self.rate {
            if count_in_second(&mut entry.window, &mut entry.attempts, second) > rate {
                let wait = Duration::from_secs(second + 1).saturating_sub(elapsed);
                return Err(Refusal::Rate(
                    ProtocolError::new(
                        ErrorCode::TooManyConnections,
                        format!(
                            "more than {rate} connection attempts from {ip} within a second; try again in {} ms",
                            wait.as_millis().max(1)
                        ),
                    )
                    .with_retry_after(wait.max(Duration::from_millis(1))),
                ));
            }
        }
        if let Some(max) = self.per_ip {
            if entry.open >= max {
                return Err(Refusal::PerIp(ProtocolError::new(
                    ErrorCode::TooManyConnections,
                    format!(
                        "{ip} already has {max} connections open, the most one address may have"
                    ),
                )));
            }
        }
        entry.open += 1;
        Ok(Ticket {
            admission: Some(Box::new((Arc::clone(self), ip))),
        })
    }

    /// Whether a refusal of `ip` just made may be answered after a TLS handshake: the
    /// first [`ANSWERED_TLS_REFUSALS`] of each second are, so that a client over the
    /// limit learns why (and when to retry); past them the listener closes at once,
    /// so that one address cannot make the hub run a handshake per attempt.
    pub(crate) fn answer_refusal(&self, ip: IpAddr) -> bool {
        let second = self.start.elapsed().as_secs();
        let mut map = self.lock();
        // A refused address has an entry (it is over its rate, or has connections
        // open), unless its last connection closed meanwhile: then answer.
        let Some(entry) = map.get_mut(&ip) else {
            return true;
        };
        count_in_second(&mut entry.answered_window, &mut entry.answered, second)
            <= ANSWERED_TLS_REFUSALS
    }
}

/// Counts one more in `second`, starting again from zero when `window` (the second the
/// count is for) is an earlier one; gives the count.
fn count_in_second(window: &mut u64, count: &mut u32, second: u64) -> u32 {
    if *window != second {
        *window = second;
        *count = 0;
    }
    *count = count.saturating_add(1);
    *count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn addresses_are_limited_each_on_its_own() {
        let admission = Admission::new(Some(2), Some(3));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let first = admission.admit(a).ok().unwrap();
        let _second = admission.admit(a).ok().unwrap();
        assert!(matches!(admission.admit(a), Err(Refusal::PerIp(_))));
        assert!(admission.admit(b).is_ok());
        drop(first);
        // The fourth attempt this second is over the rate, whatever is open.
        match admission.admit(a) {
            Err(Refusal::Rate(e)) => assert!(e.retry_after_ms.unwrap() >= 1),
            _ => panic!("expected a rate refusal"),
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(admission.admit(a).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_first_refusals_of_a_second_are_answered() {
        let admission = Admission::new(None, Some(1));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let _kept = admission.admit(a).ok().unwrap();
        for _ in 0..ANSWERED_TLS_REFUSALS {
            assert!(admission.admit(a).is_err());
            assert!(admission.answer_refusal(a));
        }
        assert!(admission.admit(a).is_err());
        assert!(!admission.answer_refusal(a));
        // Another address has its own allowance.
        let _other = admission.admit(b).ok().unwrap();
        assert!(admission.admit(b).is_err());
        assert!(admission.answer_refusal(b));
        // And the next second starts afresh.
        tokio::time::advance(Duration::from_secs(1)).await;
        let _again = admission.admit(a).ok().unwrap();
        assert!(admission.admit(a).is_err());
        assert!(admission.answer_refusal(a));
    }
}
