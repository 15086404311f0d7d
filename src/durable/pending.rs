//! A consumer's deliveries waiting for their ack, by seq.
//!
//! A consumer delivers in seq order and its acks come back mostly in that order, so
//! the seqs it holds are nearly a run: a sorted [`VecDeque`] of slots in which an
//! acked seq leaves a hole (no shifting) finds a seq by its distance from either end
//! in one look, appends at the back and drops holes from the front as they reach it.
//! A `BTreeMap` spent ~7% of the hub's time on these inserts and removals when one
//! fast consumer replayed a stream. What is out of order (a retry logged after a
//! restart, acks that leave the first seq waiting) falls back to a binary search,
//! and holes are swept away when they outnumber the seqs held.

use std::collections::VecDeque;

use super::ledger::Pending;

/// Seqs to their [`Pending`], in seq order.
#[derive(Debug, Clone, Default)]
pub(crate) struct PendingMap {
    /// Sorted by seq; `None` is a hole left by a removal.
    slots: VecDeque<(u64, Option<Pending>)>,
    /// Slots that are not holes.
    len: usize,
}

impl PendingMap {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where `seq`'s slot is (`Ok`) or would go (`Err`).
    fn position(&self, seq: u64) -> Result<usize, usize> {
        let (Some(&(first, _)), Some(&(last, _))) = (self.slots.front(), self.slots.back()) else {
            return Err(0);
        };
        if seq > last {
            return Err(self.slots.len());
        }
        if seq < first {
            return Err(0);
        }
        // A run from either end: one look.
        let from_front = (seq - first) as usize;
        if self.slots.get(from_front).is_some_and(|s| s.0 == seq) {
            return Ok(from_front);
        }
        let from_back = (last - seq) as usize;
        if let Some(i) = (self.slots.len() - 1).checked_sub(from_back) {
            if self.slots[i].0 == seq {
                return Ok(i);
            }
        }
        self.slots.binary_search_by_key(&seq, |s| s.0)
    }

    pub(crate) fn get(&self, seq: u64) -> Option<&Pending> {
        let i = self.position(seq).ok()?;
        self.slots[i].1.as_ref()
    }

    pub(crate) fn get_mut(&mut self, seq: u64) -> Option<&mut Pending> {
        let i = self.position(seq).ok()?;
        self.slots[i].1.as_mut()
    }

    pub(crate) fn contains_key(&self, seq: u64) -> bool {
        self.get(seq).is_some()
    }

    /// Sets `seq`'s pending; returns what it replaced.
    pub(crate) fn insert(&mut self, seq: u64, pending: Pending) -> Option<Pending> {
        match self.position(seq) {
            Ok(i) => {
                let old = self.slots[i].1.replace(pending);
                self.len += usize::from(old.is_none());
                old
            }
            Err(i) => {
                if i == self.slots.len() {
                    self.slots.push_back((seq, Some(pending)));
                } else {
                    self.slots.insert(i, (seq, Some(pending)));
                }
                self.len += 1;
                None
            }
        }
    }

    pub(crate) fn remove(&mut self, seq: u64) -> Option<Pending> {
        let i = self.position(seq).ok()?;
        let old = self.slots[i].1.take()?;
        self.len -= 1;
        self.tidy();
        Some(old)
    }

    /// Drops holes at both ends, and all holes once they outnumber the seqs held
    /// (amortised: each sweep follows at least as many removals as it looks at).
    fn tidy(&mut self) {
        while self.slots.front().is_some_and(|s| s.1.is_none()) {
            self.slots.pop_front();
        }
        while self.slots.back().is_some_and(|s| s.1.is_none()) {
            self.slots.pop_back();
        }
        if self.slots.len() > 2 * self.len + 64 {
            self.slots.retain(|s| s.1.is_some());
        }
    }

    /// The lowest seq held.
    pub(crate) fn first_seq(&self) -> Option<u64> {
        // Holes never stay at the front.
        self.slots.front().map(|s| s.0)
    }

    /// Seqs held at or above `seq`.
    pub(crate) fn count_from(&self, seq: u64) -> usize {
        let start = self.position(seq).unwrap_or_else(|i| i);
        self.slots.range(start..).filter(|s| s.1.is_some()).count()
    }

    /// Forgets every seq below `seq`.
    pub(crate) fn forget_below(&mut self, seq: u64) {
        let start = self.position(seq).unwrap_or_else(|i| i);
        for (_, pending) in self.slots.drain(..start) {
            self.len -= usize::from(pending.is_some());
        }
        self.tidy();
    }

    /// In seq order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Pending)> {
        self.slots
            .iter()
            .filter_map(|(seq, p)| p.as_ref().map(|p| (*seq, p)))
    }

    /// In seq order.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (u64, &mut Pending)> {
        self.slots
            .iter_mut()
            .filter_map(|(seq, p)| p.as_mut().map(|p| (*seq, p)))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Pending> {
        self.iter().map(|(_, p)| p)
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut Pending> {
        self.iter_mut().map(|(_, p)| p)
    }

    /// The seqs held, in order.
    #[cfg(test)]
    pub(crate) fn seqs(&self) -> Vec<u64> {
        self.iter().map(|(seq, _)| seq).collect()
    }
}

impl PartialEq for PendingMap {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl FromIterator<(u64, Pending)> for PendingMap {
    fn from_iter<I: IntoIterator<Item = (u64, Pending)>>(items: I) -> Self {
        let mut map = PendingMap::new();
        for (seq, pending) in items {
            map.insert(seq, pending);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::durable::ledger::Where;

    fn pending(attempts: u32) -> Pending {
        Pending {
            attempts,
            at: Where::Due,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32),
        Remove(u64),
        ForgetBelow(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Small seqs, so that inserts, removals and look-ups meet; the run of
        // appends a consumer makes is mixed in through `prop_oneof` weights.
        prop_oneof![
            4 => (0u64..200, 1u32..5).prop_map(|(s, a)| Op::Insert(s, a)),
            4 => (0u64..200).prop_map(Op::Remove),
            1 => (0u64..200).prop_map(Op::ForgetBelow),
        ]
    }

    proptest! {
        /// Every operation answers as a `BTreeMap` does, and leaves the same contents.
        #[test]
        fn behaves_as_a_btreemap(ops in proptest::collection::vec(op(), 0..400)) {
            let mut map = PendingMap::new();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(seq, a) => {
                        prop_assert_eq!(map.insert(seq, pending(a)), model.insert(seq, pending(a)));
                    }
                    Op::Remove(seq) => prop_assert_eq!(map.remove(seq), model.remove(&seq)),
                    Op::ForgetBelow(seq) => {
                        map.forget_below(seq);
                        model = model.split_off(&seq);
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                prop_assert_eq!(map.first_seq(), model.keys().next().copied());
                for probe in [0, 50, 100, 150, 199] {
                    prop_assert_eq!(map.get(probe), model.get(&probe));
                    prop_assert_eq!(map.count_from(probe), model.range(probe..).count());
                }
            }
            prop_assert_eq!(map.seqs(), model.keys().copied().collect::<Vec<_>>());
        }
    }

    #[test]
    fn in_order_acks_keep_it_small_and_a_stuck_first_seq_does_not_pile_up_holes() {
        let mut map = PendingMap::new();
        for seq in 1..=1000 {
            map.insert(seq, pending(1));
        }
        for seq in 1..=900 {
            map.remove(seq);
        }
        assert_eq!((map.len(), map.slots.len()), (100, 100));
        // Seqs 901..=950 never acked; 100,000 more delivered and acked behind them.
        for seq in 1001..101_001 {
            map.insert(seq, pending(1));
            map.remove(seq - 50);
        }
        assert!(
            map.slots.len() <= 3 * map.len() + 64,
            "{} slots",
            map.slots.len()
        );
        assert_eq!(map.first_seq(), Some(901));
        assert_eq!(map.get(101_000), Some(&pending(1)));
    }
}
