//! The publisher ids seen within the dedup window, in two generations.
//!
//! Each id remembers when it was seen, so a look-up knows exactly whether it is within
//! the window. Forgetting is done a generation at a time, not an id at a time: new ids
//! go into the current generation; once it is as old as the window, or holds half
//! the most ids to remember, it becomes the previous one and the previous one is
//! dropped whole (an id still being stored is carried over: its publisher waits for
//! the answer). Every id in a dropped generation is older than the window, or at
//! least half the most are remembered, newer ones. Dropping a table whole walks it in order; forgetting the oldest id at
//! each insert (as a queue of ids did here before) probed a large, cold table at
//! random once per event: 7% of the hub's CPU with 4 publishers confirming.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::hub::ClientId;

/// What is known of an id.
#[derive(Debug, PartialEq)]
pub(crate) enum Seen {
    /// Being stored; these clients sent it again meanwhile and wait for the answer.
    Pending(Vec<ClientId>),
    /// Stored (or live only: `stream` is `None`).
    Done { stream: Option<usize>, seq: u64 },
}

struct Entry {
    at: Instant,
    seen: Seen,
}

/// Ids are chosen by clients: the hasher is seeded per process.
type Ids = HashMap<Arc<str>, Entry, foldhash::quality::RandomState>;

struct Generation {
    ids: Ids,
    /// When its first id came.
    since: Instant,
    /// How many of its ids are [`Seen::Pending`].
    pending: usize,
}

impl Generation {
    fn new(since: Instant) -> Self {
        Generation {
            ids: Ids::default(),
            since,
            pending: 0,
        }
    }
}

/// The ids seen within the window (see the module's description).
pub(crate) struct Window {
    current: Generation,
    previous: Generation,
    window: Duration,
    /// The most ids in a generation: half the most remembered.
    cap: usize,
}

/// What [`Window::check`] found.
pub(crate) enum Check<'a> {
    /// Not seen within the window: remembered now, as given.
    New,
    /// Seen within the window (or still being stored).
    Seen(&'a mut Seen),
}

impl Window {
    /// Remembers ids for `window`, but at most `most` of them (and at least the last
    /// half of that, whatever the rate).
    pub(crate) fn new(window: Duration, most: usize) -> Self {
        let now = Instant::now();
        Window {
            current: Generation::new(now),
            previous: Generation::new(now),
            window,
            cap: (most / 2).max(1),
        }
    }

    /// Looks `id` up at `now`: when it is not within the window, remembers it as
    /// `fresh` and says [`Check::New`].
    pub(crate) fn check(&mut self, id: &Arc<str>, now: Instant, fresh: Seen) -> Check<'_> {
        let window = self.window;
        let within = |entry: &Entry| {
            matches!(entry.seen, Seen::Pending(_)) || now.duration_since(entry.at) <= window
        };
        // Most ids are new: one probe in each generation. Found and within the
        // window, the borrow checker wants a second probe to hand out the entry.
        let in_current = self.current.ids.get(&**id).map(within);
        let in_previous = match in_current {
            Some(true) => {
                let entry = self.current.ids.get_mut(&**id).expect("just found");
                return Check::Seen(&mut entry.seen);
            }
            // Past the window (and done: pending is always within).
            Some(false) => {
                self.current.ids.remove(&**id);
                None
            }
            None => self.previous.ids.get(&**id).map(within),
        };
        match in_previous {
            Some(true) => {
                let entry = self.previous.ids.get_mut(&**id).expect("just found");
                return Check::Seen(&mut entry.seen);
            }
            Some(false) => {
                self.previous.ids.remove(&**id);
            }
            None => {}
        }
        self.insert_new(Arc::clone(id), now, fresh);
        Check::New
    }

    /// Remembers `id` as seen at `at` (which is not later than any id's to come),
    /// replacing what was known of it.
    pub(crate) fn insert(&mut self, id: Arc<str>, at: Instant, seen: Seen) {
        self.forget(&id);
        self.insert_new(id, at, seen);
    }

    /// [`Window::insert`] of an id known not to be remembered.
    fn insert_new(&mut self, id: Arc<str>, at: Instant, seen: Seen) {
        if self.current.ids.len() >= self.cap || at.duration_since(self.current.since) > self.window
        {
            self.rotate(at);
        }
        if matches!(seen, Seen::Pending(_)) {
            self.current.pending += 1;
        }
        self.current.ids.insert(id, Entry { at, seen });
    }

    /// The current generation becomes the previous one; the previous one's ids are
    /// dropped, but for those still being stored, and its table (at its size, with
    /// them) becomes the new current one: no allocation or growth once both
    /// generations have been filled.
    fn rotate(&mut self, now: Instant) {
        let mut old = std::mem::replace(&mut self.previous, Generation::new(now));
        if old.pending > 0 {
            old.ids
                .retain(|_, entry| matches!(entry.seen, Seen::Pending(_)));
        } else {
            old.ids.clear();
        }
        // Still being stored: seen before `now`, and within the window as long as
        // they are pending, as everywhere.
        old.since = now;
        self.previous = std::mem::replace(&mut self.current, old);
    }

    /// `id` is stored as `seq` in `stream`: the clients that sent it again meanwhile
    /// and wait for the answer. The window runs from now (when its publisher hears
    /// of it, and might resend); remembered again if it was forgotten.
    pub(crate) fn stored(
        &mut self,
        id: &Arc<str>,
        stream: usize,
        seq: u64,
        now: Instant,
    ) -> Vec<ClientId> {
        let done = Seen::Done {
            stream: Some(stream),
            seq,
        };
        if let Some(entry) = self.current.ids.get_mut(&**id) {
            entry.at = now;
            return match std::mem::replace(&mut entry.seen, done) {
                Seen::Pending(waiting) => {
                    self.current.pending -= 1;
                    waiting
                }
                Seen::Done { .. } => Vec::new(),
            };
        }
        // In the previous generation (or forgotten): into the current one, whose
        // ids are all seen no later than the next generation begins.
        let waiting = match self.forget(id) {
            Some(Seen::Pending(waiting)) => waiting,
            _ => Vec::new(),
        };
        self.insert_new(Arc::clone(id), now, done);
        waiting
    }

    /// Forgets `id` (it was not stored: a resend must be able to try again); what
    /// was known of it.
    pub(crate) fn forget(&mut self, id: &str) -> Option<Seen> {
        for generation in [&mut self.current, &mut self.previous] {
            if let Some(entry) = generation.ids.remove(id) {
                if matches!(entry.seen, Seen::Pending(_)) {
                    generation.pending -= 1;
                }
                return Some(entry.seen);
            }
        }
        None
    }

    /// How long an id is remembered.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// How many ids are remembered (some may be past the window already).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.ids.len() + self.previous.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(120);

    fn done(seq: u64) -> Seen {
        Seen::Done {
            stream: Some(0),
            seq,
        }
    }

    fn is_new(window: &mut Window, id: &str, now: Instant) -> bool {
        matches!(window.check(&id.into(), now, done(0)), Check::New)
    }

    #[test]
    fn an_id_is_seen_within_the_window_and_new_after_it() {
        let start = Instant::now();
        let mut window = Window::new(WINDOW, 1000);
        assert!(is_new(&mut window, "a", start));
        assert!(!is_new(&mut window, "a", start + WINDOW));
        // Past the window: new again (remembered afresh from then on).
        let later = start + WINDOW + Duration::from_millis(1);
        assert!(is_new(&mut window, "a", later));
        assert!(!is_new(&mut window, "a", later + WINDOW / 2));
    }

    #[test]
    fn a_generation_is_dropped_once_every_id_in_it_is_past_the_window() {
        let start = Instant::now();
        let mut window = Window::new(WINDOW, 1000);
        for i in 0..10 {
            assert!(is_new(&mut window, &format!("old-{i}"), start));
        }
        // Two windows on: the old ids went with their generation.
        let mut now = start + WINDOW + Duration::from_secs(1);
        assert!(is_new(&mut window, "x", now));
        now += WINDOW + Duration::from_secs(1);
        assert!(is_new(&mut window, "y", now));
        assert_eq!(window.len(), 2);
        assert!(is_new(&mut window, "old-3", now));
    }

    #[test]
    fn at_most_the_given_ids_are_remembered_and_at_least_the_last_half() {
        let now = Instant::now();
        let mut window = Window::new(WINDOW, 200);
        for i in 0..1000 {
            assert!(is_new(&mut window, &i.to_string(), now));
            assert!(window.len() <= 200);
        }
        for i in 900..1000 {
            assert!(!is_new(&mut window, &i.to_string(), now), "{i}");
        }
        assert!(is_new(&mut window, "0", now));
    }

    #[test]
    fn an_id_being_stored_outlives_its_generation_and_the_window() {
        let start = Instant::now();
        let mut window = Window::new(WINDOW, 20);
        let slow: Arc<str> = "slow".into();
        assert!(matches!(
            window.check(&slow, start, Seen::Pending(Vec::new())),
            Check::New
        ));
        for i in 0..100 {
            assert!(is_new(&mut window, &i.to_string(), start));
        }
        let late = start + 3 * WINDOW;
        match window.check(&slow, late, done(0)) {
            Check::Seen(Seen::Pending(waiting)) => waiting.push(ClientId(7)),
            _ => panic!("the pending id was forgotten"),
        }
        assert_eq!(window.stored(&slow, 0, 5, late), vec![ClientId(7)]);
        assert!(matches!(
            window.check(&slow, late, done(0)),
            Check::Seen(Seen::Done { seq: 5, .. })
        ));
        // No longer pending: it goes with its generation.
        assert_eq!(window.current.pending + window.previous.pending, 0);
    }

    #[test]
    fn a_forgotten_id_is_remembered_again_when_stored_and_a_failed_one_can_retry() {
        let now = Instant::now();
        let mut window = Window::new(WINDOW, 1000);
        let id: Arc<str> = "late".into();
        assert!(window.stored(&id, 1, 9, now).is_empty());
        assert!(matches!(
            window.check(&id, now, done(0)),
            Check::Seen(Seen::Done {
                stream: Some(1),
                seq: 9
            })
        ));
        let failed: Arc<str> = "failed".into();
        let _ = window.check(&failed, now, Seen::Pending(Vec::new()));
        assert_eq!(window.forget(&failed), Some(Seen::Pending(Vec::new())));
        assert!(is_new(&mut window, "failed", now));
    }
}
