//! A client's outbound queue: bounded in bytes, filled by any task, drained by one.
//!
//! Publishers push shared [`Bytes`] without waiting: pushing takes a short lock and
//! never blocks on the client's socket. The client's own connection task takes
//! everything queued in one go and writes it as one vectored write. A push that would
//! take the queue past its byte limit marks the client a slow consumer instead: the
//! queue is emptied (so its memory comes back at once) and the connection task is
//! woken to tell the client and close it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::protocol::events_dropped_frame;

/// The outcome of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    Queued,
    /// This push overflowed the queue: the client is now a slow consumer.
    Overflow,
    /// The queue is full and the policy is to drop: this push was discarded.
    Dropped,
    /// Queued, right after an `events_dropped` notice ending a drop episode of this
    /// many events.
    Resumed(usize),
    /// The client is closing; nothing more is accepted.
    Closed,
}

/// Why a queue stopped accepting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// A push overflowed it.
    Overflow,
    /// The connection is shutting down (end of stream, error, or hub shutdown).
    Closing,
}

pub(crate) struct Outbox {
    state: Mutex<State>,
    /// Bytes pushed but not yet written to the socket, including the batch being
    /// written. Only the connection task decreases it.
    pending: AtomicUsize,
    notify: Notify,
    max_pending: usize,
    /// Discard what does not fit instead of marking the client a slow consumer.
    drop_when_full: bool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    closed: Option<Closed>,
    /// Events discarded in the current drop episode (drop policy only). While it is
    /// non-zero the client gets nothing new until its queue drains to half; then the
    /// `events_dropped` notice goes in first, exactly where the gap is.
    dropped: usize,
}

impl Outbox {
    pub(crate) fn new(max_pending: usize, drop_when_full: bool) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            pending: AtomicUsize::new(0),
            notify: Notify::new(),
            max_pending,
            drop_when_full,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `bytes` (one frame) for the client unless that takes it past its limit.
    pub(crate) fn push(&self, bytes: Bytes) -> Push {
        self.push_events(bytes, 1)
    }

    /// Queues `bytes`, which hold `events` whole event lines, as one unit: all of them
    /// or (past the limit) none. A dropped unit counts as `events` missed events.
    pub(crate) fn push_events(&self, bytes: Bytes, events: usize) -> Push {
        let len = bytes.len();
        let mut state = self.lock();
        if state.closed.is_some() {
            return Push::Closed;
        }
        let pending = self.pending.load(Ordering::Acquire);
        let mut resumed = None;
        if state.dropped > 0 {
            if pending > self.max_pending / 2 {
                state.dropped += events;
                return Push::Dropped;
            }
            resumed = Some(self.end_drops(&mut state));
        }
        if pending + len > self.max_pending {
            if self.drop_when_full {
                state.dropped += events;
                return Push::Dropped;
            }
            state.closed = Some(Closed::Overflow);
            state.queue = VecDeque::new();
            drop(state);
            self.notify.notify_one();
            return Push::Overflow;
        }
        self.enqueue(&mut state, bytes);
        drop(state);
        match resumed {
            Some(count) => Push::Resumed(count),
            None => Push::Queued,
        }
    }

    /// Appends to the queue, waking the writer if it was empty. The caller holds the lock.
    fn enqueue(&self, state: &mut MutexGuard<'_, State>, bytes: Bytes) {
        self.pending.fetch_add(bytes.len(), Ordering::AcqRel);
        if state.queue.is_empty() {
            // The writer drains the whole queue each time, so one wake-up per batch is enough.
            self.notify.notify_one();
        }
        state.queue.push_back(bytes);
    }

    /// Ends a drop episode: queues the notice (past the byte limit: it is small, and
    /// one per episode); returns how many events the client missed.
    fn end_drops(&self, state: &mut MutexGuard<'_, State>) -> usize {
        let count = std::mem::take(&mut state.dropped);
        self.enqueue(state, events_dropped_frame(count));
        count
    }

    /// Ends a drop episode that no new event ended, once the queue has drained to
    /// half: for a client that missed the last events sent. Returns the count.
    pub(crate) fn end_drops_if_drained(&self) -> Option<usize> {
        // Called on every turn of the connection loop: without the drop policy there is
        // never an episode, so skip the lock.
        if !self.drop_when_full {
            return None;
        }
        let mut state = self.lock();
        if state.dropped == 0
            || state.closed.is_some()
            || self.pending.load(Ordering::Acquire) > self.max_pending / 2
        {
            return None;
        }
        Some(self.end_drops(&mut state))
    }

    /// Moves everything queued to the back of `batch`, and says whether the queue is closed.
    pub(crate) fn take(&self, batch: &mut VecDeque<Bytes>) -> Option<Closed> {
        let mut state = self.lock();
        if batch.is_empty() {
            std::mem::swap(batch, &mut state.queue);
        } else {
            batch.append(&mut state.queue);
        }
        state.closed
    }

    /// Whether (and why) the queue stopped accepting.
    pub(crate) fn closed(&self) -> Option<Closed> {
        self.lock().closed
    }

    /// Stops accepting pushes; what is queued stays for the final flush.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed.get_or_insert(Closed::Closing);
    }

    /// Records that `n` bytes reached the socket.
    pub(crate) fn written(&self, n: usize) {
        self.pending.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes queued or being written.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Completes after the next push into an empty queue, or an overflow.
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_bytes_and_overflow_frees_the_queue() {
        let outbox = Outbox::new(10, false);
        assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
        assert_eq!(outbox.pending(), 10);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Overflow);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Closed);
        let mut batch = VecDeque::new();
        assert_eq!(outbox.take(&mut batch), Some(Closed::Overflow));
        assert!(batch.is_empty());
    }

    #[test]
    fn writes_make_room() {
        let outbox = Outbox::new(10, false);
        outbox.push(Bytes::from_static(b"1234567890"));
        let mut batch = VecDeque::new();
        assert_eq!(outbox.take(&mut batch), None);
        assert_eq!(batch.len(), 1);
        outbox.written(10);
        assert_eq!(outbox.push(Bytes::from_static(b"12345")), Push::Queued);
        outbox.close();
        assert_eq!(outbox.take(&mut batch), Some(Closed::Closing));
        assert_eq!(batch.len(), 2);
    }

    #[test]
    fn the_drop_policy_reports_each_gap_where_it_is() {
        let outbox = Outbox::new(10, true);
        assert_eq!(outbox.push(Bytes::from_static(b"1234567890")), Push::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Dropped);
        outbox.written(4); // 6 pending: more than half, so still dropping
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Dropped);
        assert_eq!(outbox.end_drops_if_drained(), None);
        let mut batch = VecDeque::new();
        assert_eq!(outbox.take(&mut batch), None, "still open");
        outbox.written(6);
        // Drained: the next event goes out right after the notice for the gap.
        assert_eq!(outbox.push(Bytes::from_static(b"next")), Push::Resumed(2));
        outbox.take(&mut batch);
        let notice = String::from_utf8(batch[1].to_vec()).unwrap();
        assert!(
            notice.contains("events_dropped") && notice.contains("\"count\":2"),
            "{notice}"
        );
        assert_eq!(&batch[2][..], b"next");
    }

    #[test]
    fn a_gap_at_the_end_is_reported_once_drained() {
        let outbox = Outbox::new(10, true);
        outbox.push(Bytes::from_static(b"1234567890"));
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Dropped);
        assert_eq!(outbox.end_drops_if_drained(), None);
        outbox.written(10);
        assert_eq!(outbox.end_drops_if_drained(), Some(1));
        assert_eq!(outbox.end_drops_if_drained(), None);
    }
}
