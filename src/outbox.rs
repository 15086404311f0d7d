//! A client's outbound queue: bounded in bytes, filled by any task, drained by one.
//!
//! Publishers push shared [`Bytes`] without waiting: pushing takes a short lock and
//! never blocks on the client's socket. What the bound counts is what the queue keeps
//! alive: each frame's own allocation plus [`ENTRY_OVERHEAD`]. That is only true if no
//! queued frame is a slice of something larger (a read buffer, a run of events), so
//! the framing code copies what it hands out (issue #10: a 1 KiB slice once pinned a
//! 64 KiB read buffer, and `--max-pending` bounded nothing). The client's own connection task takes
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

/// What one queued frame costs besides its bytes: its slot in the queue (a `Bytes` is
/// 32 bytes) and its allocation's header and rounding.
pub(crate) const ENTRY_OVERHEAD: usize = 64;

/// What `len` bytes queued as one frame count against the bound.
pub(crate) fn cost(len: usize) -> usize {
    len + ENTRY_OVERHEAD
}

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
    /// A drop episode of this many events ended (its notice is queued), and this push
    /// did not fit after the notice, so it was discarded and begins a new episode. The
    /// ended episode must still be reported: its notice is on its way to the client.
    ResumedThenDropped(usize),
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
    /// The [`cost`] of the frames pushed and not yet completely written to the socket
    /// (the batch being written included). Only the connection task decreases it.
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
    /// `bytes` must own its allocation (not be a slice of something larger): the bound
    /// counts its length.
    pub(crate) fn push(&self, bytes: Bytes) -> Push {
        self.push_events(bytes, 1)
    }

    /// Queues `bytes`, which hold `events` whole event lines, as one unit: all of them
    /// or (past the limit) none. A dropped unit counts as `events` missed events.
    pub(crate) fn push_events(&self, bytes: Bytes, events: usize) -> Push {
        let len = cost(bytes.len());
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
                return match resumed {
                    Some(count) => Push::ResumedThenDropped(count),
                    None => Push::Dropped,
                };
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
        self.pending.fetch_add(cost(bytes.len()), Ordering::AcqRel);
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

    /// Gives an empty queue's allocation back (a connection gone quiet).
    pub(crate) fn shrink(&self) {
        let mut state = self.lock();
        if state.queue.is_empty() {
            state.queue = VecDeque::new();
        }
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

    /// Records that frames of this total [`cost`] were completely written (their
    /// memory is free). Saturating: after an overflow the queue was dropped wholesale,
    /// and the last frames written (the final `$error`) were never counted.
    pub(crate) fn written(&self, cost: usize) {
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(cost))
            });
    }

    /// The cost of what is queued or being written.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Completes after the next push into an empty queue, or an overflow.
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }

    /// Wakes the connection without a push (to see that its access was revoked).
    pub(crate) fn notify(&self) {
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `n` bytes.
    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn bounded_by_cost_and_overflow_frees_the_queue() {
        let outbox = Outbox::new(2 * cost(5), false);
        assert_eq!(outbox.push(frame(5)), Push::Queued);
        assert_eq!(outbox.push(frame(5)), Push::Queued);
        assert_eq!(outbox.pending(), 2 * cost(5));
        assert_eq!(outbox.push(frame(1)), Push::Overflow);
        assert_eq!(outbox.push(frame(1)), Push::Closed);
        let mut batch = VecDeque::new();
        assert_eq!(outbox.take(&mut batch), Some(Closed::Overflow));
        assert!(batch.is_empty());
    }

    /// Issue #10: many small frames cost more than their bytes (each has a queue slot
    /// and an allocation), so the bound holds for them too.
    #[test]
    fn tiny_frames_are_charged_their_overhead() {
        let outbox = Outbox::new(100 * cost(1), false);
        for _ in 0..100 {
            assert_eq!(outbox.push(frame(1)), Push::Queued);
        }
        assert_eq!(outbox.push(frame(1)), Push::Overflow);
    }

    #[test]
    fn writes_make_room() {
        let outbox = Outbox::new(cost(10), false);
        outbox.push(frame(10));
        let mut batch = VecDeque::new();
        assert_eq!(outbox.take(&mut batch), None);
        assert_eq!(batch.len(), 1);
        assert_eq!(outbox.push(frame(1)), Push::Overflow);
        let outbox = Outbox::new(cost(10), false);
        outbox.push(frame(10));
        outbox.take(&mut batch);
        outbox.written(cost(10));
        assert_eq!(outbox.push(frame(5)), Push::Queued);
        outbox.close();
        assert_eq!(outbox.take(&mut batch), Some(Closed::Closing));
        assert_eq!(batch.len(), 3);
    }

    /// Issue #11 (8): releasing more than was counted (the final `$error` after an
    /// overflow) never wraps below zero.
    #[test]
    fn pending_never_goes_below_zero() {
        let outbox = Outbox::new(cost(10), false);
        outbox.push(frame(10));
        outbox.written(cost(10) + cost(80));
        assert_eq!(outbox.pending(), 0);
        assert_eq!(outbox.push(frame(10)), Push::Queued);
    }

    #[test]
    fn the_drop_policy_reports_each_gap_where_it_is() {
        let outbox = Outbox::new(cost(10), true);
        assert_eq!(outbox.push(frame(10)), Push::Queued);
        assert_eq!(outbox.push(frame(1)), Push::Dropped);
        let mut batch = VecDeque::new();
        assert_eq!(outbox.take(&mut batch), None, "still open");
        assert_eq!(
            outbox.end_drops_if_drained(),
            None,
            "more than half still queued"
        );
        assert_eq!(outbox.push(frame(1)), Push::Dropped);
        outbox.written(cost(10));
        // Drained: the next event goes out right after the notice for the gap.
        assert_eq!(outbox.push(frame(4)), Push::Resumed(2));
        outbox.take(&mut batch);
        let notice = String::from_utf8(batch[1].to_vec()).unwrap();
        assert!(
            notice.contains("events_dropped") && notice.contains("\"count\":2"),
            "{notice}"
        );
        assert_eq!(&batch[2][..], b"xxxx");
    }

    #[test]
    fn a_gap_at_the_end_is_reported_once_drained() {
        let outbox = Outbox::new(cost(10), true);
        outbox.push(frame(10));
        assert_eq!(outbox.push(frame(1)), Push::Dropped);
        assert_eq!(outbox.end_drops_if_drained(), None);
        outbox.written(cost(10));
        assert_eq!(outbox.end_drops_if_drained(), Some(1));
        assert_eq!(outbox.end_drops_if_drained(), None);
    }

    /// Issue #11 (8): an episode that ends on a push too big to follow its notice is
    /// still reported, and the push begins the next episode.
    #[test]
    fn an_episode_ended_by_a_push_that_does_not_fit_is_still_reported() {
        let outbox = Outbox::new(cost(100), true);
        assert_eq!(outbox.push(frame(10)), Push::Queued);
        assert_eq!(outbox.push(frame(100)), Push::Dropped);
        // Under half full, so the episode ends; but this frame does not fit beside
        // what is queued, so it is dropped in turn.
        assert_eq!(outbox.push(frame(100)), Push::ResumedThenDropped(1));
        let mut batch = VecDeque::new();
        outbox.take(&mut batch);
        assert_eq!(batch.len(), 2, "the first frame, then the notice");
        assert!(String::from_utf8_lossy(&batch[1]).contains("\"count\":1"));
        outbox.written(outbox.pending());
        assert_eq!(outbox.end_drops_if_drained(), Some(1), "the next episode");
    }
}
