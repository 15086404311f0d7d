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

/// The outcome of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Push {
    Queued,
    /// This push overflowed the queue: the client is now a slow consumer.
    Overflow,
    /// The queue is full and the policy is to drop: this push was discarded.
    Dropped,
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
    /// Pushes discarded since the client was last told.
    dropped: AtomicUsize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Bytes>,
    closed: Option<Closed>,
}

impl Outbox {
    pub(crate) fn new(max_pending: usize, drop_when_full: bool) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            pending: AtomicUsize::new(0),
            notify: Notify::new(),
            max_pending,
            drop_when_full,
            dropped: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `bytes` for the client unless that takes it past its limit.
    pub(crate) fn push(&self, bytes: Bytes) -> Push {
        let len = bytes.len();
        let mut state = self.lock();
        if state.closed.is_some() {
            return Push::Closed;
        }
        if self.pending.load(Ordering::Acquire) + len > self.max_pending {
            if self.drop_when_full {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return Push::Dropped;
            }
            state.closed = Some(Closed::Overflow);
            state.queue = VecDeque::new();
            drop(state);
            self.notify.notify_one();
            return Push::Overflow;
        }
        self.pending.fetch_add(len, Ordering::AcqRel);
        let was_empty = state.queue.is_empty();
        state.queue.push_back(bytes);
        drop(state);
        if was_empty {
            // The writer drains the whole queue each time, so one wake-up per batch is enough.
            self.notify.notify_one();
        }
        Push::Queued
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

    /// Queues a notice from the hub itself, past the byte limit: it is small and rare.
    pub(crate) fn push_notice(&self, bytes: Bytes) {
        let mut state = self.lock();
        if state.closed.is_some() {
            return;
        }
        self.pending.fetch_add(bytes.len(), Ordering::AcqRel);
        let was_empty = state.queue.is_empty();
        state.queue.push_back(bytes);
        drop(state);
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// How many pushes were dropped since the last call, once the queue has drained
    /// to half its limit (so the notice is not itself dropped, and an episode of
    /// drops is reported once).
    pub(crate) fn take_dropped(&self) -> Option<usize> {
        if self.dropped.load(Ordering::Relaxed) == 0
            || self.pending.load(Ordering::Acquire) > self.max_pending / 2
        {
            return None;
        }
        Some(self.dropped.swap(0, Ordering::Relaxed)).filter(|&n| n > 0)
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
    fn the_drop_policy_discards_and_reports_once_drained() {
        let outbox = Outbox::new(10, true);
        assert_eq!(outbox.push(Bytes::from_static(b"1234567890")), Push::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Dropped);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Dropped);
        assert_eq!(
            outbox.take_dropped(),
            None,
            "reported only once there is room"
        );
        let mut batch = VecDeque::new();
        assert_eq!(outbox.take(&mut batch), None, "still open");
        outbox.written(10);
        assert_eq!(outbox.take_dropped(), Some(2));
        assert_eq!(outbox.take_dropped(), None);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Queued);
    }
}
