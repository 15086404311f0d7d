//! Memory for what clients have sent and the hub has not consumed yet: each
//! connection's read buffer, and the hub-wide budget they all draw on.
//!
//! A read buffer grows while a frame arrives (up to `--max-frame`) and is given back
//! when the connection goes quiet. Its allocation is exact (never the doubling of
//! `Vec::reserve`, which made a ~1 MiB partial frame cost ~2.3 MiB) and charged to an
//! [`InboundBudget`] (`--max-inbound-memory`). Issue #10 found 190 connections each
//! holding a ~1 MiB partial frame taking the hub to 440 MB.
//!
//! The budget has two halves, so that a bound never becomes a deadlock:
//!
//! * **Ordinary buffers** (a read's worth, up to [`MAX_READ`]) share one half. Past
//!   it, a connection with an empty buffer still reads, [`MIN_READ`] bytes at a time,
//!   so small frames keep flowing.
//! * **Large frames** take a *slot* from the other half: each slot is `--max-frame`
//!   bytes, so its holder can always finish its frame without asking again. A frame
//!   that needs more than the ordinary half allows and finds no free slot is not read
//!   until a slot frees (TCP back-pressure: its client waits, nothing is dropped).
//!
//! Without slots, when every frame in progress waits for memory that only another
//! waiting frame could free, none ever completes. With them, some frame always
//! completes; a client that holds a slot and never finishes its frame delays other
//! large frames (not small ones) until it goes away.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// The first read size: small, so idle connections hold little memory. Also what a
/// connection may always allocate, budget or not.
pub(crate) const MIN_READ: usize = 512;
/// Reads grow (doubling each time one fills the space offered) up to this size.
pub(crate) const MAX_READ: usize = 64 * 1024;

/// The hub-wide budget for read buffers.
#[derive(Debug)]
pub(crate) struct InboundBudget {
    /// Bytes held by all read buffers (for stats).
    used: AtomicUsize,
    /// Bytes held by buffers without a slot, against `ordinary_limit`.
    ordinary: AtomicUsize,
    ordinary_limit: usize,
    /// Slots in use, of `max_slots`.
    slots: AtomicUsize,
    max_slots: usize,
    limit: usize,
    /// Connections waiting for memory: only then is a release worth a wake-up.
    waiting: AtomicUsize,
    freed: Notify,
}

impl InboundBudget {
    /// A budget of `limit` bytes for connections whose frames may reach `max_frame`.
    pub(crate) fn new(limit: usize, max_frame: usize) -> Self {
        let half = limit / 2;
        InboundBudget {
            used: AtomicUsize::new(0),
            ordinary: AtomicUsize::new(0),
            ordinary_limit: limit - half,
            slots: AtomicUsize::new(0),
            max_slots: (half / (max_frame + 1)).max(1),
            limit,
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Bytes held in read buffers now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Takes `n` ordinary bytes if they fit.
    fn try_take(&self, n: usize) -> bool {
        let ok = self
            .ordinary
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.ordinary_limit).then_some(used + n)
            })
            .is_ok();
        if ok {
            self.used.fetch_add(n, Ordering::Relaxed);
        }
        ok
    }

    /// Takes `n` bytes whatever the limit: [`MIN_READ`]-sized buffers (`ordinary`), or
    /// growth within a slot (already reserved).
    fn take(&self, n: usize, ordinary: bool) {
        if ordinary {
            self.ordinary.fetch_add(n, Ordering::AcqRel);
        }
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn give_back(&self, n: usize, ordinary: bool) {
        if n == 0 {
            return;
        }
        if ordinary {
            self.ordinary.fetch_sub(n, Ordering::AcqRel);
        }
        self.used.fetch_sub(n, Ordering::Relaxed);
        self.wake();
    }

    fn try_slot(&self) -> bool {
        self.slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_slots).then_some(n + 1)
            })
            .is_ok()
    }

    fn release_slot(&self) {
        self.slots.fetch_sub(1, Ordering::AcqRel);
        self.wake();
    }

    fn wake(&self) {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Completes after the next release of memory. Made *before* a connection
    /// retries, so a release in between is not missed (`notify_waiters` reaches every
    /// `Notified` made before it, polled or not).
    pub(crate) fn freed(&self) -> Notified<'_> {
        self.freed.notified()
    }

    /// Counts a connection as waiting; returns how many wait now (1: the first).
    fn start_waiting(&self) -> usize {
        self.waiting.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn stop_waiting(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What [`ReadBuffer::prepare`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prepared {
    /// Read at most this many bytes into [`ReadBuffer::buf`].
    Read(usize),
    /// Nothing buffered and nothing to read yet: wait for the socket to be readable
    /// without holding a buffer.
    Parked,
    /// The frame in progress needs more memory than the budget has: wait for
    /// [`InboundBudget::freed`]. `first` is true when no other connection was waiting.
    Starved {
        /// Whether this connection is the first to wait in this episode.
        first: bool,
    },
}

/// One connection's read buffer, charged to the hub's budget.
#[derive(Debug)]
pub(crate) struct ReadBuffer {
    buf: BytesMut,
    /// What `buf`'s allocation is charged (its capacity when it was allocated).
    charged: usize,
    /// Holds a large-frame slot: may grow to the frame limit without asking.
    slot: bool,
    /// How much to offer the next read: grows with the client's traffic.
    read_size: usize,
    /// The socket said it has bytes: take a buffer and read them.
    readable: bool,
    /// Counted as waiting for memory.
    starved: bool,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            buf: BytesMut::new(),
            charged: 0,
            slot: false,
            read_size: MIN_READ,
            readable: false,
            starved: false,
        }
    }
}

impl ReadBuffer {
    /// The bytes received and not consumed yet.
    pub(crate) fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// What the buffer's allocation is charged.
    #[cfg(test)]
    pub(crate) fn charged(&self) -> usize {
        self.charged
    }

    /// Whether the connection waits for memory.
    pub(crate) fn is_starved(&self) -> bool {
        self.starved
    }

    /// The socket has bytes: the next [`prepare`](Self::prepare) takes a buffer.
    pub(crate) fn set_readable(&mut self) {
        self.readable = true;
    }

    /// Makes room for the next read of at most `room` bytes (what the frame limit
    /// still allows).
    pub(crate) fn prepare(&mut self, budget: &InboundBudget, room: usize) -> Prepared {
        let prepared = self.make_room(budget, room);
        let starved = matches!(prepared, Prepared::Starved { .. });
        let first = starved && !self.starved && budget.start_waiting() == 1;
        if self.starved && !starved {
            budget.stop_waiting();
        }
        self.starved = starved;
        match prepared {
            Prepared::Starved { .. } => Prepared::Starved { first },
            other => other,
        }
    }

    fn make_room(&mut self, budget: &InboundBudget, room: usize) -> Prepared {
        let len = self.buf.len();
        if len == 0 && !self.readable && self.charged == 0 {
            return Prepared::Parked;
        }
        let want = self.read_size.min(room).max(1);
        let free = self.buf.capacity() - len;
        if free >= (want / 4).max(1) {
            return Prepared::Read(free.min(room));
        }
        if len == 0 {
            // A fresh buffer: past MIN_READ it needs the budget; without it, read a
            // little at a time rather than not at all.
            let size = if self.recharge(budget, want) {
                want
            } else {
                let small = MIN_READ.min(want);
                self.recharge(budget, small);
                small
            };
            self.buf = BytesMut::with_capacity(size);
            return Prepared::Read(size.min(room));
        }
        // A frame in progress needs more: grow by half (so a big frame is copied a
        // bounded number of times), at least by one read, at most to the frame limit.
        let size = (len + want)
            .max(self.charged + self.charged / 2)
            .min(len + room);
        if !self.recharge(budget, size) {
            if self.slot || !budget.try_slot() {
                return Prepared::Starved { first: false };
            }
            // The slot reserves a whole frame: what is held moves out of the ordinary half.
            self.slot = true;
            budget.ordinary.fetch_sub(self.charged, Ordering::AcqRel);
            self.recharge(budget, size);
        }
        let mut grown = BytesMut::with_capacity(size);
        grown.extend_from_slice(&self.buf);
        self.buf = grown;
        Prepared::Read((size - len).min(room))
    }

    /// Charges the budget for an allocation of `size` instead of the current one;
    /// `false` (and nothing changed) if the ordinary half cannot take it. Buffers up
    /// to MIN_READ, and growth within a slot, are always allowed.
    fn recharge(&mut self, budget: &InboundBudget, size: usize) -> bool {
        let ordinary = !self.slot;
        if size > self.charged {
            let more = size - self.charged;
            if self.slot || size <= MIN_READ {
                budget.take(more, ordinary);
            } else if !budget.try_take(more) {
                return false;
            }
        } else {
            budget.give_back(self.charged - size, ordinary);
        }
        self.charged = size;
        true
    }

    /// Records a read of `n` bytes into a space of `offered`.
    pub(crate) fn read(&mut self, n: usize, offered: usize) {
        self.readable = false;
        if n >= offered {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
    }

    /// After the frames in the buffer were consumed. An empty buffer goes back: a
    /// connection waits for its next bytes without one (if the read filled what was
    /// offered, more is probably there, and the next turn reads at once; if not, the
    /// next read is offered less). A big buffer holding only the start of the next
    /// frame is shrunk, and gives its slot back.
    pub(crate) fn settle(&mut self, budget: &InboundBudget, filled: bool) {
        let len = self.buf.len();
        if len == 0 {
            self.release(budget);
            if filled {
                self.readable = true;
            } else {
                self.read_size = (self.read_size / 2).max(MIN_READ);
            }
        } else if !filled && self.charged > MAX_READ && len * 4 < self.charged {
            let size = (len * 2).max(MAX_READ);
            let mut smaller = BytesMut::with_capacity(size);
            smaller.extend_from_slice(&self.buf);
            self.buf = smaller;
            self.recharge(budget, size);
            self.leave_slot(budget);
        }
    }

    /// Back to the ordinary half once the buffer is no bigger than a read.
    fn leave_slot(&mut self, budget: &InboundBudget) {
        if self.slot && self.charged <= MAX_READ {
            self.slot = false;
            budget.ordinary.fetch_add(self.charged, Ordering::AcqRel);
            budget.release_slot();
        }
    }

    /// A read found nothing there: the socket is drained; give an empty buffer back.
    pub(crate) fn drained(&mut self, budget: &InboundBudget) {
        self.readable = false;
        if self.buf.is_empty() {
            self.release(budget);
        }
    }

    /// Gives the buffer and its charge back (a quiet connection, or one closing).
    pub(crate) fn release(&mut self, budget: &InboundBudget) {
        self.buf = BytesMut::new();
        self.recharge(budget, 0);
        self.leave_slot(budget);
        if std::mem::take(&mut self.starved) {
            budget.stop_waiting();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_connection_holds_nothing_and_a_busy_one_gives_back_when_drained() {
        let budget = InboundBudget::new(1 << 20, 1 << 16);
        let mut rb = ReadBuffer::default();
        assert_eq!(rb.prepare(&budget, usize::MAX), Prepared::Parked);
        rb.set_readable();
        let Prepared::Read(offered) = rb.prepare(&budget, usize::MAX) else {
            panic!()
        };
        assert_eq!(offered, MIN_READ);
        // Reads that fill the space grow the next offer.
        for _ in 0..10 {
            let Prepared::Read(offered) = rb.prepare(&budget, usize::MAX) else {
                panic!()
            };
            rb.buf().extend_from_slice(&vec![b' '; offered]);
            rb.read(offered, offered);
            rb.buf().clear();
        }
        assert_eq!(rb.read_size, MAX_READ);
        assert!(budget.used() >= MAX_READ / 2);
        // Drained by a read that did not fill: the buffer goes back.
        rb.read(10, 100);
        rb.settle(&budget, false);
        assert_eq!(budget.used(), 0);
        assert_eq!(rb.charged(), 0);
    }

    /// Fills `rb` with what one read offers, as a frame in progress.
    fn fill(rb: &mut ReadBuffer, budget: &InboundBudget, room: usize) -> Prepared {
        let prepared = rb.prepare(budget, room);
        if let Prepared::Read(n) = prepared {
            rb.buf().extend_from_slice(&vec![b'x'; n]);
            rb.read(n, n);
        }
        prepared
    }

    fn busy() -> ReadBuffer {
        ReadBuffer {
            read_size: MAX_READ,
            readable: true,
            ..ReadBuffer::default()
        }
    }

    /// Issue #10: two frames in progress, the ordinary half full, one slot. The first
    /// to need more takes the slot and can finish; the other waits (never both, which
    /// would deadlock), and goes on when the slot frees.
    #[test]
    fn large_frames_take_turns_and_one_always_finishes() {
        // Halves of 4 reads; a frame of up to 4 reads: one slot.
        let max_frame = 4 * MAX_READ - 1;
        let budget = InboundBudget::new(8 * MAX_READ, max_frame);
        assert_eq!(budget.max_slots, 1);
        // What the frame limit still allows, as the decoder says.
        let room = |rb: &mut ReadBuffer| max_frame + 1 - rb.buf().len();
        let (mut a, mut b, mut c, mut d) = (busy(), busy(), busy(), busy());
        for rb in [&mut a, &mut b, &mut c, &mut d] {
            let r = room(rb);
            assert_eq!(fill(rb, &budget, r), Prepared::Read(MAX_READ));
        }
        // `a` needs more: the ordinary half is spent, so it takes the slot.
        let r = room(&mut a);
        assert!(matches!(fill(&mut a, &budget, r), Prepared::Read(_)));
        assert!(a.slot);
        // What `a` held left the ordinary half with it: `b` grows into that, then needs
        // more; no slot is left, so it waits (the first of this episode).
        let r = room(&mut b);
        assert!(matches!(fill(&mut b, &budget, r), Prepared::Read(_)));
        assert!(b.buf().len() < max_frame);
        let r = room(&mut b);
        assert_eq!(b.prepare(&budget, r), Prepared::Starved { first: true });
        // `a` can always finish its frame.
        while a.buf().len() < max_frame {
            let r = room(&mut a);
            assert!(matches!(fill(&mut a, &budget, r), Prepared::Read(_)));
        }
        assert!(a.charged() <= max_frame + 1);
        // Its frame is consumed and it goes quiet: the slot frees, `b` goes on.
        a.buf().clear();
        a.settle(&budget, false);
        assert!(!a.slot && a.charged() == 0);
        let r = room(&mut b);
        assert!(matches!(fill(&mut b, &budget, r), Prepared::Read(_)));
        assert!(b.slot && !b.is_starved());
        for rb in [&mut b, &mut c, &mut d] {
            rb.release(&budget);
        }
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.ordinary.load(Ordering::Relaxed), 0);
        assert_eq!(budget.slots.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn an_empty_buffer_still_reads_a_little_when_the_budget_is_spent() {
        let budget = InboundBudget::new(2 * MAX_READ, MAX_READ);
        let mut hog = busy();
        assert_eq!(fill(&mut hog, &budget, 1 << 20), Prepared::Read(MAX_READ));
        let mut rb = busy();
        assert_eq!(rb.prepare(&budget, 1 << 20), Prepared::Read(MIN_READ));
        hog.release(&budget);
        rb.release(&budget);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn growth_is_exact_and_bounded_by_the_frame_limit() {
        let budget = InboundBudget::new(usize::MAX / 2, 300_000);
        let mut rb = busy();
        let max_frame = 300_000;
        loop {
            let room = max_frame + 1 - rb.buf().len();
            let Prepared::Read(n) = rb.prepare(&budget, room) else {
                panic!()
            };
            if n == 0 || rb.buf().len() + n > max_frame {
                break;
            }
            rb.buf().extend_from_slice(&vec![b'x'; n]);
            rb.read(n, n);
        }
        assert!(rb.charged() <= max_frame + 1, "{}", rb.charged());
        assert_eq!(budget.used(), rb.charged());
    }
}
