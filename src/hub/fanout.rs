//! Fan-out: queuing events to the members of the pool that should hear them.
//!
//! Two paths: [`Hub::fan_out`] for one event (a room, a control-free single frame, or
//! the embedding program's broadcast), and [`Hub::publish_run`] for a run of plain
//! events from one sender (the whole chunk to everyone who hears everything, event by
//! event to matching subscribers). Both push through [`Tally::offer`] and ask the pool
//! the same questions ([`Pool::wants`](super::pool::Pool::wants),
//! [`Pool::echo_skip`](super::pool::Pool::echo_skip)).

use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::event::Event;
use crate::frame::Run;
use crate::outbox::Push;

use super::pool::Member;
use super::{ClientId, Hub, HubEvent, SendError};

/// Events routed per hold of the pool's read lock: matching is bounded per event
/// (see `Limits::max_pattern_segments`), so this bounds how long a writer waits.
const EVENTS_PER_LOCK: usize = 16;

/// How far [`Hub::publish_run`] got with a run.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RunProgress {
    /// The next event to match.
    next: usize,
    /// How many clients took the whole chunk (those that hear everything).
    everyone: usize,
}

/// What the pushes of one fan-out did.
#[derive(Default)]
struct Tally {
    /// Pushes queued (of whole runs or single events).
    queued: usize,
    /// Events discarded under the drop policy.
    dropped: usize,
    /// Clients whose drop episode ended, with how many events they missed.
    resumed: Vec<(ClientId, usize)>,
}

impl RunProgress {
    /// Whether routing of this run has not begun.
    pub(crate) fn is_new(&self) -> bool {
        // Each call routes at least one event of a non-empty run.
        self.next == 0
    }
}

impl Tally {
    /// Queues `bytes` (`events` whole event lines, made only if needed) to `member`,
    /// unless it is `skip` (a sender with its echo off), and counts what happened.
    fn offer(
        &mut self,
        member: &Member,
        skip: Option<ClientId>,
        bytes: impl FnOnce() -> Bytes,
        events: usize,
    ) {
        if Some(member.id) != skip {
            let push = member.outbox.push_events(bytes(), events);
            self.count(member, push, events);
        }
    }

    fn count(&mut self, client: &Member, push: Push, events: usize) {
        match push {
            Push::Queued => self.queued += 1,
            Push::Resumed(missed) => {
                self.queued += 1;
                self.resumed.push((client.id, missed));
            }
            Push::Dropped => self.dropped += events,
            Push::ResumedThenDropped(missed) => {
                self.dropped += events;
                self.resumed.push((client.id, missed));
            }
            Push::Overflow | Push::Closed => {}
        }
    }
}

/// Offers a run to the guarded clients (see `Pool::guarded`): the whole chunk to
/// each whose rules allow every event in it (one `Tally::offer`, counted with those
/// who hear everything), else each event it may hear on its own. Rules are checked
/// once per set of rules (clients of one identity share theirs) and per distinct name
/// in a row, not per client and event. Returns the deliveries made event by event.
fn offer_guarded(
    pool: &super::pool::Pool,
    run: &Run,
    skip: Option<ClientId>,
    tally: &mut Tally,
) -> usize {
    // (rules, which events of the run they allow: None = all).
    type Verdict = (std::sync::Arc<crate::auth::Permissions>, Option<Vec<bool>>);
    let mut verdicts: Vec<Verdict> = Vec::new();
    let mut partial = 0;
    for client in pool.guarded.values() {
        let Some(rules) = client.access.permissions() else {
            tally.offer(client, skip, || run.bytes().clone(), run.len());
            continue;
        };
        let known = verdicts
            .iter()
            .position(|(r, _)| std::sync::Arc::ptr_eq(r, &rules));
        let index = known.unwrap_or_else(|| {
            let allowed: Vec<bool> = rules
                .subscribe
                .allows_each((0..run.len()).map(|i| run.name(i)))
                .collect();
            let all = allowed.iter().all(|&a| a);
            verdicts.push((rules, (!all).then_some(allowed)));
            verdicts.len() - 1
        });
        match &verdicts[index].1 {
            None => tally.offer(client, skip, || run.bytes().clone(), run.len()),
            Some(allowed) => {
                for (i, _) in allowed.iter().enumerate().filter(|(_, &a)| a) {
                    let before = tally.queued;
                    tally.offer(client, skip, || run.line(i), 1);
                    partial += tally.queued - before;
                }
            }
        }
    }
    // Those pushes were counted as queued: `everyone` must count only whole runs.
    tally.queued -= partial;
    partial
}

impl Hub {
    /// Queues `event` to one client, through its bounded queue.
    ///
    /// # Errors
    ///
    /// [`SendError`] when the client is gone, closing, or over its queue limit (in which
    /// case it is disconnected as a slow consumer, as for any other event).
    pub fn send_to(&self, client: ClientId, event: &Event) -> Result<(), SendError> {
        let target = self.read_pool().clients.get(&client).cloned();
        let target = target.ok_or(SendError::NoSuchClient(client))?;
        let push = target.outbox.push(event.line().clone());
        if let Push::Resumed(count) | Push::ResumedThenDropped(count) = push {
            self.report(|| HubEvent::EventsDropped { client, count });
        }
        match push {
            Push::Queued | Push::Resumed(_) => {
                self.state
                    .counters
                    .deliveries
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Push::Overflow => Err(SendError::SlowConsumer(client)),
            Push::Dropped | Push::ResumedThenDropped(_) => {
                self.state.counters.dropped.fetch_add(1, Ordering::Relaxed);
                Err(SendError::Dropped(client))
            }
            Push::Closed => Err(SendError::Closing(client)),
        }
    }

    /// Queues `event` to every client; returns how many it was queued to.
    pub fn broadcast(&self, event: &Event) -> usize {
        self.fan_out(None, event)
    }

    /// Queues a client's event to everyone who should hear it: the members of its room
    /// if it names one, else everyone who never subscribed plus every matching
    /// subscriber; the sender too if its echo is on.
    pub(crate) fn publish(&self, from: ClientId, event: Event) {
        let receivers = self.fan_out(Some(from), &event);
        self.state.counters.events.fetch_add(1, Ordering::Relaxed);
        self.report(|| HubEvent::Event {
            client: from,
            event,
            receivers,
        });
    }

    /// Queues a run of a client's plain events (see [`Run`]): the whole chunk to each
    /// client that hears everything, and event by event to subscribers that match.
    ///
    /// Matching can be costly (many wildcard patterns), so it stops once `deadline`
    /// has passed and says where it got to: the caller lets other tasks run, then calls
    /// again with the same `progress` until it returns `true`.
    pub(crate) fn publish_run(
        &self,
        from: ClientId,
        run: &Run,
        progress: &mut RunProgress,
        deadline: std::time::Instant,
    ) -> bool {
        self.publish_run_from(Some(from), run, progress, deadline)
    }

    /// [`Hub::publish_run`] for a sender here (`Some`), or for events from other nodes
    /// (`None`: no echo to skip; not counted as received here, not reported).
    pub(crate) fn publish_run_from(
        &self,
        from: Option<ClientId>,
        run: &Run,
        progress: &mut RunProgress,
        deadline: std::time::Instant,
    ) -> bool {
        let events = run.len();
        let mut pool = self.read_pool();
        let skip = from.and_then(|from| pool.echo_skip(from));
        let mut tally = Tally::default();
        let first = progress.next;
        // Deliveries to guarded clients that may hear only part of the run.
        let mut partial = 0;
        if first == 0 {
            for client in pool.unfiltered.values() {
                tally.offer(client, skip, || run.bytes().clone(), events);
            }
            if !pool.guarded.is_empty() {
                partial = offer_guarded(&pool, run, skip, &mut tally);
            }
            progress.everyone = tally.queued;
        }
        // Subscribers are matched per event; most hubs have none. The read lock is let
        // go every few events, so that joins, leaves and subscribes (which wait for the
        // write lock, and block a worker thread meanwhile) never wait for a whole run.
        let mut matched_counts = Vec::new();
        let mut index = first;
        if !pool.router.is_empty() {
            let mut matched = Vec::new();
            while index < events {
                if index > first && (index - first).is_multiple_of(EVENTS_PER_LOCK) {
                    drop(pool);
                    if std::time::Instant::now() >= deadline {
                        break;
                    }
                    pool = self.read_pool();
                }
                let before = tally.queued;
                matched.clear();
                pool.router.matches(run.name(index), &mut matched);
                // One copy of the line per event, shared by its matching receivers.
                let mut line = None;
                for id in &matched {
                    let name = run.name(index);
                    if let Some(client) = pool.clients.get(id).filter(|c| c.access.may_hear(name)) {
                        tally.offer(
                            client,
                            skip,
                            || line.get_or_insert_with(|| run.line(index)).clone(),
                            1,
                        );
                    }
                }
                matched_counts.push(tally.queued - before);
                index += 1;
            }
        } else {
            index = events;
        }
        let done = index - first;
        let everyone = progress.everyone;
        self.settle(
            &tally,
            everyone * done + matched_counts.iter().sum::<usize>() + partial,
        );
        let Some(from) = from else {
            progress.next = index;
            return index >= events;
        };
        let counters = &self.state.counters;
        counters.events.fetch_add(done as u64, Ordering::Relaxed);
        if self.state.observer.is_some() {
            for (offset, index) in (first..index).enumerate() {
                let receivers = everyone + matched_counts.get(offset).copied().unwrap_or(0);
                self.report(|| HubEvent::Event {
                    client: from,
                    event: run.event(index),
                    receivers,
                });
            }
        }
        progress.next = index;
        index >= events
    }

    /// Reports and counts what a fan-out's pushes did.
    fn settle(&self, tally: &Tally, deliveries: usize) {
        for &(client, count) in &tally.resumed {
            self.report(|| HubEvent::EventsDropped { client, count });
        }
        let counters = &self.state.counters;
        counters
            .deliveries
            .fetch_add(deliveries as u64, Ordering::Relaxed);
        if tally.dropped > 0 {
            counters
                .dropped
                .fetch_add(tally.dropped as u64, Ordering::Relaxed);
        }
    }

    pub(super) fn fan_out(&self, from: Option<ClientId>, event: &Event) -> usize {
        let line = event.line();
        let name = event.name().as_str();
        let pool = self.read_pool();
        let skip = from.and_then(|from| pool.echo_skip(from));
        let mut tally = Tally::default();
        let mut deliver = |client: &Member| tally.offer(client, skip, || line.clone(), 1);
        if let Some(room) = event.room() {
            for id in pool.rooms.get(room).into_iter().flatten() {
                if let Some(client) = pool
                    .clients
                    .get(id)
                    .filter(|c| pool.wants(*id, name) && c.access.may_hear(name))
                {
                    deliver(client);
                }
            }
        } else {
            for client in pool.unfiltered.values() {
                deliver(client);
            }
            for client in pool.guarded.values() {
                if client.access.may_hear(name) {
                    deliver(client);
                }
            }
            if !pool.router.is_empty() {
                let mut matched = Vec::new();
                pool.router.matches(name, &mut matched);
                for id in matched {
                    if let Some(client) = pool.clients.get(&id).filter(|c| c.access.may_hear(name))
                    {
                        deliver(client);
                    }
                }
            }
        }
        drop(pool);
        self.settle(&tally, tally.queued);
        tally.queued
    }
}
