//! The ingest pipeline: the one place where a validated client event passes from its
//! connection into the hub.
//!
//! ```text
//!  connection ──▶ authorize ──▶ store ──▶ backplane ──▶ fan out ──▶ members' outboxes
//!  (validated)    may this      append to  hand to the   queue to those
//!                 sender send   matching   other hubs    here who should
//!                 this?         streams                  hear it
//! ```
//!
//! Today the store stage (`durable.rs`: streams, `$stored`, deduplication) and fan-out
//! act: every sender may send everything, and there are no other hubs. Each stage has its place here, in this order, so that
//! the features that fill them (permissions, durable streams, the cluster) change this
//! module and nothing upstream of it: the connection loop hands over a single event
//! ([`event`]) or a run of plain events ([`run`]), never reaching the hub around it.
//!
//! A run goes through the stages as a whole (one check per run, not per event), which
//! is what keeps runs of plain events as fast through the pipeline as they were before
//! it (measured: BENCHMARKS.md, "the seams").
//!
//! Events the embedding program sends ([`Hub::broadcast`], [`Hub::send_to`]) do not
//! pass through here: they come from the hub's owner, not from a client.

use std::time::Instant;

use crate::durable::Verdict;
use crate::event::Event;
use crate::frame::Run;
use std::sync::Arc;

use crate::hub::{ClientId, Hub, Member, RunProgress};

/// Takes one client event into the hub: through the stages, then out to its
/// receivers.
pub(crate) fn event(hub: &Hub, sender: &Arc<Member>, event: Event) {
    let from = sender.id;
    // authorize: everyone may send everything (no identities yet).
    // store: append to the stream it matches; confirm its id; drop a resent id.
    let Verdict::Deliver(confirmation) = hub.durable().store(hub, sender, &event) else {
        return;
    };
    // backplane: the other nodes of a cluster, if any.
    if let Some(backplane) = hub.backplane() {
        backplane.publish(
            event.name().as_str(),
            event.room().map(crate::event::RoomName::as_str),
            event.line(),
        );
    }
    let metrics = hub.metrics();
    if metrics.enabled() {
        metrics.named(event.name().as_str(), 1);
        let began = Instant::now();
        hub.publish(from, event);
        metrics.fanout_took(began.elapsed());
    } else {
        hub.publish(from, event);
    }
    // Live only: confirmed once fanned out (after the sender's own echo).
    if let Some(frame) = confirmation {
        hub.reply(from, frame);
    }
}

/// Takes a run of a client's plain events into the hub, resumably: routing stops at
/// `deadline` and says (by returning `false`) that the rest of the run is still to go;
/// call again with the same `progress` (see [`Hub::publish_run`]).
pub(crate) fn run(
    hub: &Hub,
    from: ClientId,
    run: &Run,
    progress: &mut RunProgress,
    deadline: Instant,
) -> bool {
    // authorize, store and backplane take the run whole, once, before any of it fans
    // out (`progress` says whether this is the first call for the run).
    // store: a run's events have no id (those with one are decoded one by one), so
    // each is only appended to its stream, if any.
    let durable = hub.durable();
    if progress.is_new() && durable.has_streams() {
        for index in 0..run.len() {
            durable.store_plain(hub, run.name(index), || run.line(index));
        }
    }
    // backplane: each event on its subject, in order, before any of it fans out here.
    if progress.is_new() {
        if let Some(backplane) = hub.backplane() {
            for index in 0..run.len() {
                backplane.publish(run.name(index), None, run.line_slice(index));
            }
        }
    }
    let metrics = hub.metrics();
    if !metrics.enabled() {
        return hub.publish_run(from, run, progress, deadline);
    }
    if progress.is_new() {
        // One count per stretch of equal names, not one per event.
        run.name_stretches(|name, count| metrics.named(name, count));
    }
    let began = Instant::now();
    let done = hub.publish_run(from, run, progress, deadline);
    metrics.fanout_took(began.elapsed());
    done
}
