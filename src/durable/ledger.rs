//! What a durable consumer remembers, and the consumer log that keeps it.
//!
//! Every consumer of the hub shares one append-only log (a [`SegmentLog`] stream
//! beside the event streams). Each record is one JSON line naming its consumer:
//!
//! ```text
//! {"c":"drivers","state":{...}}     the whole ledger: written when the consumer is
//!                                    created, and for every consumer now and then
//!                                    (after which older records are deleted)
//! {"c":"drivers","floor":5,"ack":[4,5,9]}
//!                                    acknowledged (and all up to 5 is done)
//! {"c":"drivers","tries":[[7,2]]}    delivered again: seq 7 is on its 2nd attempt
//! {"c":"drivers","floor":9,"dead":[8]}
//!                                    moved to the dead-letter stream
//! ```
//!
//! Replaying the log in order rebuilds every ledger ([`replay`]): a `state` resets its
//! consumer, the others apply on top. Applying a record twice changes nothing, so a
//! `state` written while acks were still queued is safe to replay with them.
//!
//! [`SegmentLog`]: crate::store::SegmentLog

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::pending::PendingMap;
use crate::hub::ClientId;

/// Where a consumer starts in its stream when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// The oldest event still stored.
    All,
    /// The next event stored after the consumer is created.
    New,
    /// This seq (or the oldest stored, if that was deleted).
    Seq(u64),
}

impl Serialize for Start {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Start::All => s.serialize_str("all"),
            Start::New => s.serialize_str("new"),
            Start::Seq(seq) => s.serialize_u64(*seq),
        }
    }
}

impl<'de> Deserialize<'de> for Start {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Seq(u64),
            Word(String),
        }
        let wire = Wire::deserialize(d).map_err(|_| {
            serde::de::Error::custom("start must be \"all\", \"new\" or a seq of 1 or more")
        })?;
        match wire {
            Wire::Seq(0) => Err(serde::de::Error::custom(
                "start must be \"all\", \"new\" or a seq of 1 or more",
            )),
            Wire::Seq(seq) => Ok(Start::Seq(seq)),
            Wire::Word(w) if w == "all" => Ok(Start::All),
            Wire::Word(w) if w == "new" => Ok(Start::New),
            Wire::Word(w) => Err(serde::de::Error::custom(format!(
                "start must be \"all\", \"new\" or a seq of 1 or more, not {:?}",
                crate::protocol::printable(&w)
            ))),
        }
    }
}

/// A consumer's settings, fixed by its first `$consume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Spec {
    pub(crate) stream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) filter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) room: Option<String>,
    pub(crate) start: Start,
    pub(crate) ack_wait_ms: u64,
    pub(crate) max_deliver: u32,
    pub(crate) max_in_flight: u32,
}

impl Spec {
    pub(crate) fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms)
    }
}

/// Where a pending event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Where {
    /// Due for (re)delivery now.
    #[default]
    Due,
    /// Due again at this time (`$nack` with a delay).
    Later(Instant),
    /// With this client, until it acks or `deadline` passes.
    Out { client: ClientId, deadline: Instant },
    /// Past `max_deliver`: being written to the dead-letter stream.
    Dying,
}

/// An event delivered and not acknowledged yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pending {
    /// Deliveries so far (a first delivery cut short by a crash is not counted).
    pub(crate) attempts: u32,
    pub(crate) at: Where,
}

/// What a consumer remembers.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ledger {
    pub(crate) spec: Spec,
    /// The next seq of the stream not yet looked at.
    pub(crate) cursor: u64,
    /// Seqs before the cursor delivered and not acknowledged.
    pub(crate) pending: PendingMap,
    /// Seqs at or past the cursor already acknowledged (known after a restart only:
    /// acks logged after the last `state`). They are skipped when the cursor gets there.
    pub(crate) skip: BTreeSet<u64>,
    pub(crate) acked: u64,
    pub(crate) redelivered: u64,
    pub(crate) dead_lettered: u64,
}

/// A ledger as the log writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    spec: Spec,
    cursor: u64,
    /// (seq, attempts) of each pending event.
    #[serde(default)]
    pending: Vec<(u64, u32)>,
    #[serde(default)]
    skip: Vec<u64>,
    #[serde(default)]
    acked: u64,
    #[serde(default)]
    redelivered: u64,
    #[serde(default)]
    dead_lettered: u64,
}

/// One record of the consumer log.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) c: String,
    /// The ack floor once the operation was applied (with acks and dead letters):
    /// replaying it moves the cursor there, so a restart does not read again what
    /// was all done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) floor: Option<u64>,
    #[serde(flatten)]
    pub(crate) op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Op {
    State(Snapshot),
    Ack(Vec<u64>),
    Tries(Vec<(u64, u32)>),
    Dead(Vec<u64>),
}

impl Entry {
    /// The record's line in the log.
    pub(crate) fn line(&self) -> bytes::Bytes {
        let mut line = serde_json::to_vec(self).expect("a consumer log entry serialises");
        line.push(b'\n');
        line.into()
    }
}

impl Ledger {
    /// A new consumer's ledger, its cursor at `cursor`.
    pub(crate) fn new(spec: Spec, cursor: u64) -> Self {
        Ledger {
            spec,
            cursor,
            pending: PendingMap::new(),
            skip: BTreeSet::new(),
            acked: 0,
            redelivered: 0,
            dead_lettered: 0,
        }
    }

    /// Everything at or below this seq is acknowledged (or was not for this consumer).
    pub(crate) fn ack_floor(&self) -> u64 {
        let first_pending = self.pending.first_seq().unwrap_or(u64::MAX);
        first_pending.min(self.cursor).saturating_sub(1)
    }

    /// Events not acknowledged yet: pending, plus those from the cursor to `last_seq`
    /// (a filter is not applied to the latter: an upper bound when there is one).
    pub(crate) fn unacked(&self, last_seq: u64) -> u64 {
        let unread = (last_seq + 1).saturating_sub(self.cursor);
        // Past the cursor, acked (after a restart) or counted among the pending.
        let known = self.skip.range(self.cursor..).count() + self.pending.count_from(self.cursor);
        self.pending.len() as u64 + unread.saturating_sub(known as u64)
    }

    /// What `hubcast streams` shows of it.
    pub(crate) fn info(&self, name: &str, last_seq: u64) -> crate::store::ConsumerInfo {
        crate::store::ConsumerInfo {
            name: name.to_owned(),
            stream: self.spec.stream.clone(),
            ack_floor: self.ack_floor(),
            pending: self.unacked(last_seq),
            in_flight: self
                .pending
                .values()
                .filter(|p| matches!(p.at, Where::Out { .. }))
                .count() as u64,
            acked: self.acked,
            redelivered: self.redelivered,
            dead_lettered: self.dead_lettered,
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            spec: self.spec.clone(),
            cursor: self.cursor,
            pending: self.pending.iter().map(|(s, p)| (s, p.attempts)).collect(),
            skip: self.skip.iter().copied().collect(),
            acked: self.acked,
            redelivered: self.redelivered,
            dead_lettered: self.dead_lettered,
        }
    }

    /// The ledger a snapshot describes: every pending event due at once (the
    /// connections it was out to are gone).
    pub(crate) fn restore(snapshot: Snapshot) -> Self {
        Ledger {
            spec: snapshot.spec,
            cursor: snapshot.cursor,
            pending: snapshot
                .pending
                .into_iter()
                .map(|(seq, attempts)| {
                    let at = Where::Due;
                    (seq, Pending { attempts, at })
                })
                .collect(),
            skip: snapshot.skip.into_iter().collect(),
            acked: snapshot.acked,
            redelivered: snapshot.redelivered,
            dead_lettered: snapshot.dead_lettered,
        }
    }

    /// Marks `seq` acknowledged; whether it was pending (or, past the cursor, known).
    pub(crate) fn ack(&mut self, seq: u64) -> bool {
        if self.pending.remove(seq).is_some() {
            self.acked += 1;
            true
        } else if seq >= self.cursor {
            // Only replays get here: a live ack past the cursor is refused before.
            let fresh = self.skip.insert(seq);
            self.acked += u64::from(fresh);
            fresh
        } else {
            false
        }
    }

    /// Everything up to `floor` is done: the cursor moves past it.
    fn advance(&mut self, floor: u64) {
        if floor < self.cursor {
            return;
        }
        self.cursor = floor + 1;
        self.pending.forget_below(self.cursor);
        self.skip = self.skip.split_off(&self.cursor);
    }

    /// Applies one logged operation (not `state`, which replaces the ledger).
    fn apply(&mut self, op: Op) {
        match op {
            Op::State(snapshot) => *self = Ledger::restore(snapshot),
            Op::Ack(seqs) => {
                for seq in seqs {
                    self.ack(seq);
                }
            }
            Op::Tries(tries) => {
                for (seq, attempts) in tries {
                    self.redelivered += 1;
                    match self.pending.get_mut(seq) {
                        Some(p) => p.attempts = p.attempts.max(attempts),
                        None if seq < self.cursor => {}
                        None => {
                            // Delivered after the last `state`: the cursor moves past
                            // it only when it is read again, so keep the count for then.
                            self.pending.insert(
                                seq,
                                Pending {
                                    attempts,
                                    at: Where::Due,
                                },
                            );
                        }
                    }
                }
            }
            Op::Dead(seqs) => {
                for seq in seqs {
                    if self.pending.remove(seq).is_some() || seq >= self.cursor {
                        self.dead_lettered += 1;
                        self.skip.insert(seq);
                    }
                }
            }
        }
    }
}

/// Rebuilds every consumer's ledger from the consumer log's lines, in order. Lines
/// that cannot be read are skipped and described in the second result.
pub(crate) fn replay<'a>(
    lines: impl IntoIterator<Item = &'a [u8]>,
) -> (BTreeMap<String, Ledger>, Vec<String>) {
    let mut ledgers: BTreeMap<String, Ledger> = BTreeMap::new();
    let mut problems = Vec::new();
    for line in lines {
        let entry: Entry = match serde_json::from_slice(line) {
            Ok(entry) => entry,
            Err(e) => {
                problems.push(format!("an unreadable consumer record ({e})"));
                continue;
            }
        };
        match (entry.op, ledgers.get_mut(&entry.c)) {
            (Op::State(snapshot), _) => {
                ledgers.insert(entry.c, Ledger::restore(snapshot));
            }
            (op, Some(ledger)) => {
                ledger.apply(op);
                if let Some(floor) = entry.floor {
                    ledger.advance(floor);
                }
            }
            (_, None) => problems.push(format!(
                "records for consumer {:?} before its state",
                entry.c
            )),
        }
    }
    // Pending past the cursor came from `tries` after the last state: they will be
    // read again, so they are remembered only for their counts.
    (ledgers, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            stream: "orders".into(),
            filter: None,
            room: None,
            start: Start::All,
            ack_wait_ms: 30_000,
            max_deliver: 5,
            max_in_flight: 100,
        }
    }

    fn line(c: &str, op: Op) -> Vec<u8> {
        let mut line = Entry {
            c: c.into(),
            floor: None,
            op,
        }
        .line()
        .to_vec();
        line.pop();
        line
    }

    #[test]
    fn a_replayed_log_gives_back_floor_pending_and_counts() {
        let mut ledger = Ledger::new(spec(), 1);
        ledger.cursor = 6;
        for seq in 1..6 {
            ledger.pending.insert(
                seq,
                Pending {
                    attempts: 1,
                    at: Where::Due,
                },
            );
        }
        let lines = [
            line("drivers", Op::State(ledger.snapshot())),
            line("drivers", Op::Ack(vec![1, 2, 4])),
            line("drivers", Op::Tries(vec![(3, 2)])),
            // Acked past the cursor: delivered after the state was written.
            line("drivers", Op::Ack(vec![6, 7])),
            line("drivers", Op::Dead(vec![5])),
            // Applied twice: no change.
            line("drivers", Op::Ack(vec![1])),
        ];
        let (ledgers, problems) = replay(lines.iter().map(|l| &l[..]));
        assert!(problems.is_empty(), "{problems:?}");
        let ledger = &ledgers["drivers"];
        assert_eq!(ledger.ack_floor(), 2);
        assert_eq!(ledger.pending.seqs(), [3]);
        assert_eq!(ledger.pending.get(3).unwrap().attempts, 2);
        assert_eq!(ledger.skip.iter().copied().collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(
            (ledger.acked, ledger.redelivered, ledger.dead_lettered),
            (5, 1, 1)
        );
        // Stream up to 10: 3 pending, 8..=10 unread.
        assert_eq!(ledger.unacked(10), 1 + 3);
    }

    #[test]
    fn a_logged_floor_moves_the_cursor_past_what_is_done() {
        let ledger = Ledger::new(spec(), 1);
        let lines = [
            line("c", Op::State(ledger.snapshot())),
            line("c", Op::Ack(vec![1, 2])),
            br#"{"c":"c","floor":7,"ack":[7]}"#.to_vec(),
        ];
        let (ledgers, _) = replay(lines.iter().map(|l| &l[..]));
        let ledger = &ledgers["c"];
        assert_eq!((ledger.cursor, ledger.ack_floor()), (8, 7));
        assert!(ledger.skip.is_empty() && ledger.pending.is_empty());
        assert_eq!(ledger.acked, 3);
    }

    #[test]
    fn bad_lines_and_orphans_are_reported_not_fatal() {
        let lines: [&[u8]; 2] = [b"{not json", br#"{"c":"x","ack":[1]}"#];
        let (ledgers, problems) = replay(lines);
        assert!(ledgers.is_empty());
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn start_reads_words_and_seqs() {
        let parse = |s: &str| serde_json::from_str::<Start>(s).map_err(|e| e.to_string());
        assert_eq!(parse("\"all\""), Ok(Start::All));
        assert_eq!(parse("\"new\""), Ok(Start::New));
        assert_eq!(parse("42"), Ok(Start::Seq(42)));
        assert!(parse("0").unwrap_err().contains("seq of 1 or more"));
        assert!(parse("-1").is_err());
        assert!(parse("\"soon\"").unwrap_err().contains("soon"));
    }
}
