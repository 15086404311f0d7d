//! What a benchmark message carries, what each subscriber counts, and the publishers'
//! flow-control window.
//!
//! Every message body is a hubcast event of exactly `size` bytes, the same bytes for
//! every target:
//! `{"event":"bench","payload":{"m":"<8 hex publisher><16 hex sequence><16 hex µs>","x":"xxx…"}}`.
//! Fixed-width hex at a fixed offset lets a subscriber read the stamp without parsing
//! JSON, so the bench spends its (shared) CPU on the network, not on itself.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;
use tokio::sync::Notify;

const HEAD: &[u8] = br#"{"event":"bench","payload":{"m":""#;
const STAMP_LEN: usize = 40;
const MID: &[u8] = br#"","x":""#;
const TAIL: &[u8] = br#""}}"#;

/// The smallest body that holds a stamp.
pub const MIN_SIZE: usize = HEAD.len() + STAMP_LEN + MID.len() + TAIL.len();

/// Who sent a message, its place in that publisher's sequence, and when it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub publisher: u32,
    pub seq: u64,
    /// Microseconds since the bench's clock started.
    pub sent_us: u64,
}

/// Appends a body of exactly `size` bytes (at least [`MIN_SIZE`]) carrying `stamp`.
pub fn write_body(out: &mut Vec<u8>, size: usize, stamp: Stamp) {
    debug_assert!(size >= MIN_SIZE);
    out.extend_from_slice(HEAD);
    push_hex(out, u64::from(stamp.publisher), 8);
    push_hex(out, stamp.seq, 16);
    push_hex(out, stamp.sent_us, 16);
    out.extend_from_slice(MID);
    out.resize(out.len() + size - MIN_SIZE, b'x');
    out.extend_from_slice(TAIL);
}

/// Reads the stamp of a body written by [`write_body`]; `None` if it is not one of
/// ours or not `size` bytes long (a truncated or corrupted message).
pub fn read_stamp(body: &[u8], size: usize) -> Option<Stamp> {
    if body.len() != size || !body.starts_with(HEAD) || !body.ends_with(TAIL) {
        return None;
    }
    let stamp = body.get(HEAD.len()..HEAD.len() + STAMP_LEN)?;
    Some(Stamp {
        publisher: u32::try_from(parse_hex(&stamp[..8])?).ok()?,
        seq: parse_hex(&stamp[8..24])?,
        sent_us: parse_hex(&stamp[24..])?,
    })
}

fn push_hex(out: &mut Vec<u8>, value: u64, digits: u32) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..digits).rev() {
        out.push(HEX[((value >> (shift * 4)) & 0xf) as usize]);
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |acc, &d| {
        let nibble = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u64::from(nibble))
    })
}

/// Microseconds since `start`: the clock every stamp and every reading shares.
pub fn micros_since(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// Where a subscriber first found events missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    pub publisher: u32,
    /// The first missing sequence number.
    pub from: u64,
    /// How many in a row were missing there.
    pub missing: u64,
}

/// One subscriber's account of what it received.
pub struct Tally {
    /// The next sequence number expected from each publisher.
    next: Vec<u64>,
    pub received: u64,
    pub lost: u64,
    /// Duplicates and messages older than one already seen.
    pub out_of_order: u64,
    /// Messages that were not benchmark messages (or were truncated).
    pub malformed: u64,
    pub first_gap: Option<Gap>,
    /// Delivery latency in microseconds.
    pub latency: Histogram<u32>,
}

impl Tally {
    pub fn new(publishers: usize) -> Self {
        // Starts small and grows to the largest latency seen (a fixed 60 s range would
        // cost ~65 KB per subscriber).
        let mut latency = Histogram::new_with_bounds(1, 2, 3).expect("valid histogram bounds");
        latency.auto(true);
        Tally {
            next: vec![0; publishers],
            received: 0,
            lost: 0,
            out_of_order: 0,
            malformed: 0,
            first_gap: None,
            latency,
        }
    }

    /// Counts one message read at `now_us`; returns the sequence numbers whose delivery
    /// it settles for flow control (this one, and any it proves were skipped).
    pub fn record(&mut self, stamp: Stamp, now_us: u64) -> Option<std::ops::Range<u64>> {
        let Some(next) = self.next.get_mut(stamp.publisher as usize) else {
            self.malformed += 1;
            return None;
        };
        if stamp.seq < *next {
            self.out_of_order += 1;
            return None;
        }
        let settled = *next..stamp.seq + 1;
        if stamp.seq > *next {
            let missing = stamp.seq - *next;
            self.lost += missing;
            self.first_gap.get_or_insert(Gap {
                publisher: stamp.publisher,
                from: *next,
                missing,
            });
        }
        *next = stamp.seq + 1;
        self.received += 1;
        // `record` grows the histogram as needed (`saturating_record` would clamp to its
        // current range instead).
        let _ = self
            .latency
            .record(now_us.saturating_sub(stamp.sent_us).max(1));
        Some(settled)
    }

    /// Whether every publisher's last message (given how many each sent) has arrived.
    pub fn complete(&self, counts: &[u64]) -> bool {
        self.next
            .iter()
            .zip(counts)
            .all(|(next, count)| next >= count)
    }

    /// Counts as lost whatever never arrived at the end of each publisher's sequence.
    pub fn finish(&mut self, counts: &[u64]) {
        for (publisher, (next, &count)) in self.next.iter().zip(counts).enumerate() {
            if *next < count {
                self.lost += count - next;
                self.first_gap.get_or_insert(Gap {
                    publisher: publisher as u32,
                    from: *next,
                    missing: count - next,
                });
            }
        }
    }
}

/// One publisher's window: it may be at most `window` messages ahead of the slowest
/// subscriber. Slot `seq % window` counts the subscribers still to receive `seq`.
pub struct Flow {
    slots: Box<[AtomicU32]>,
    subscribers: u32,
    waiting: AtomicBool,
    wake: Notify,
}

impl Flow {
    pub fn new(window: usize, subscribers: usize) -> Self {
        Flow {
            slots: (0..window).map(|_| AtomicU32::new(0)).collect(),
            subscribers: subscribers as u32,
            waiting: AtomicBool::new(false),
            wake: Notify::new(),
        }
    }

    /// How many messages a publisher may be ahead.
    pub fn window(&self) -> u64 {
        self.slots.len() as u64
    }

    fn slot(&self, seq: u64) -> &AtomicU32 {
        &self.slots[(seq % self.slots.len() as u64) as usize]
    }

    /// Claims the window slot for `seq` if every subscriber has received `seq - window`.
    pub fn try_claim(&self, seq: u64) -> bool {
        let slot = self.slot(seq);
        if slot.load(Ordering::SeqCst) != 0 {
            return false;
        }
        slot.store(self.subscribers, Ordering::SeqCst);
        true
    }

    /// Waits until [`try_claim`](Self::try_claim) can succeed for `seq`.
    pub async fn wait_for(&self, seq: u64) {
        loop {
            if self.slot(seq).load(Ordering::SeqCst) == 0 {
                return;
            }
            // Announce the wait, then look again: a subscriber that settles the slot
            // after our look sees the flag (both sides use SeqCst) and wakes us.
            self.waiting.store(true, Ordering::SeqCst);
            if self.slot(seq).load(Ordering::SeqCst) == 0 {
                self.waiting.store(false, Ordering::SeqCst);
                return;
            }
            self.wake.notified().await;
            self.waiting.store(false, Ordering::SeqCst);
        }
    }

    /// One subscriber has received (or skipped past) `seq`.
    pub fn settle(&self, seq: u64) {
        if self.slot(seq).fetch_sub(1, Ordering::SeqCst) == 1 && self.waiting.load(Ordering::SeqCst)
        {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_at_every_size() {
        for size in [MIN_SIZE, 128, 4096] {
            let stamp = Stamp {
                publisher: 3,
                seq: 1 << 40,
                sent_us: 123_456_789,
            };
            let mut body = Vec::new();
            write_body(&mut body, size, stamp);
            assert_eq!(body.len(), size);
            serde_json::from_slice::<serde_json::Value>(&body).expect("valid JSON");
            assert_eq!(read_stamp(&body, size), Some(stamp));
            assert_eq!(read_stamp(&body[..size - 1], size), None);
        }
    }

    #[test]
    fn a_tally_finds_gaps_and_settles_what_it_skipped() {
        let mut tally = Tally::new(2);
        let stamp = |publisher, seq| Stamp {
            publisher,
            seq,
            sent_us: 0,
        };
        assert_eq!(tally.record(stamp(0, 0), 10), Some(0..1));
        assert_eq!(tally.record(stamp(0, 3), 10), Some(1..4));
        assert_eq!(tally.record(stamp(0, 2), 10), None);
        assert_eq!(tally.record(stamp(5, 0), 10), None);
        assert_eq!((tally.received, tally.lost, tally.out_of_order), (2, 2, 1));
        assert_eq!(tally.malformed, 1);
        assert_eq!(
            tally.first_gap,
            Some(Gap {
                publisher: 0,
                from: 1,
                missing: 2
            })
        );
        assert!(!tally.complete(&[4, 1]));
        tally.finish(&[4, 1]);
        assert_eq!(tally.lost, 3);
    }

    #[test]
    fn the_window_holds_a_publisher_until_every_subscriber_settles() {
        let flow = Flow::new(2, 2);
        assert!(flow.try_claim(0));
        assert!(flow.try_claim(1));
        assert!(!flow.try_claim(2));
        flow.settle(0);
        assert!(!flow.try_claim(2));
        flow.settle(0);
        assert!(flow.try_claim(2));
    }
}
