//! Streams in JetStream: what `--stream` means on a cluster node (issue #16).
//!
//! On a single hub the streams live in the embedded segment log. On a cluster node
//! they live in JetStream, so that every node stores to and consumes from the same
//! replicated streams:
//!
//! * **Streams.** Each declared stream (and its dead-letter stream, `NAME.dead`) is a
//!   JetStream stream of the same name (`.` written `~`: `orders~dead`) holding the
//!   subjects `hubcast.s.NAME.>` ([`subject::stored_subject`]), with `--replicas`,
//!   file storage, the retention limits and the dedup window. `serve` creates it, or
//!   checks and updates it, before it takes clients; a stream of that name that holds
//!   other subjects is refused.
//! * **Confirms.** An event is published to its stream's subject (with `Nats-Msg-Id`
//!   when it has an `"id"`); its `$stored` is sent once JetStream acknowledged it,
//!   with JetStream's seq. JetStream deduplicates ids within the window whichever node
//!   they came through: a resend through another node is answered
//!   `"duplicate": true` and not stored again. (It is still delivered live by the
//!   node it came through: live delivery is at most once per node's dedup map.)
//! * **Consumers.** A hubcast consumer is a durable pull consumer of the same name
//!   ([`subject::jetstream_consumer`]) with explicit acks, `ack_wait`, `max_deliver`
//!   and filter subjects from its filter and room; the hubcast settings are kept in
//!   its metadata, so any node checks a later `$consume` against them
//!   (`consumer_mismatch`). Each node with members pulls for as many events as its
//!   members have room for and hands each to one of them: members on different nodes
//!   share the consumer as JetStream's own pull clients do. `$ack` and `$nack` are
//!   JetStream's `+ACK` and `-NAK`; a member that leaves has its deliveries `-NAK`ed
//!   at once; a node that dies has its deliveries redelivered after `ack_wait`.
//! * **Dead letters.** JetStream announces an event that reached `max_deliver`
//!   (`$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES`); one node (a queue group) copies it
//!   to the dead-letter stream with the `dead_letter` field a single hub adds, under a
//!   `Nats-Msg-Id` that makes a second copy a duplicate.
//!
//! The engine uses `async-nats` on its own connection: JetStream's API is
//! request/reply, which the live backplane's ordered connection ([`super::nats`])
//! does not need.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::{Acker, PublishMessage as Publish};
use async_nats::jetstream::stream;
use async_nats::jetstream::AckKind;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::nats::ServerUrl;
use super::subject;
use crate::config::Streams;
use crate::durable::consumer::{delivery, mismatch, settled, with_fields, Held, Request};
use crate::durable::ledger::{Spec, Start};
use crate::event::Event;
use crate::hub::{ClientId, Hub, Member};
use crate::protocol::{ErrorCode, ProtocolError};
use crate::store::{Appended, ConsumerInfo, Record, Store, StoreError, StreamInfo};

/// How long one pull request waits for events before the next is sent.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// The most events one pull request asks for.
const MAX_PULL: usize = 256;
/// How long a JetStream request (create a stream, a consumer, ...) may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a publish may wait for JetStream's acknowledgement before the publisher
/// is told it may not be stored (and may resend with the same id).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `serve` waits for JetStream to make or check the streams at start.
const STARTUP_PATIENCE: Duration = Duration::from_secs(30);
/// How often the streams' and consumers' numbers are read for `/metrics`.
const INFO_EVERY: Duration = Duration::from_secs(2);
/// The key of a JetStream consumer's metadata that holds its hubcast settings.
const SPEC_KEY: &str = "hubcast_spec";
/// The queue group of the nodes that copy events to dead-letter streams.
const DEAD_LETTER_GROUP: &str = "hubcast-dead-letters";

/// How a node reaches JetStream.
#[derive(Debug, Clone)]
pub struct JetStreamOptions {
    /// The NATS servers (as `--cluster`).
    pub urls: Vec<ServerUrl>,
    /// This node's name (the connection's name in NATS's monitoring).
    pub node: String,
    /// TLS settings (as for the backplane), when given.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// How many servers keep each stream (`--replicas`, 1 to 5).
    pub replicas: usize,
}

/// A handle on the engine for [`Streams::jetstream`]: compares by identity.
#[derive(Clone)]
pub struct Engine(pub(crate) Arc<JetStream>);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JetStream")
    }
}

impl PartialEq for Engine {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Engine {}

/// The streams of a cluster node, in JetStream.
pub struct JetStream {
    context: async_nats::jetstream::Context,
    /// hubcast's stream names: the declared ones, then their dead-letter streams (as
    /// the hub numbers them).
    names: Vec<String>,
    streams: Vec<stream::Stream>,
    publishes: mpsc::UnboundedSender<Pending>,
    /// Bytes of events handed over and not acknowledged yet.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    infos: Mutex<Vec<Option<StreamInfo>>>,
    consumers: Mutex<HashMap<Arc<str>, Arc<Consumer>>>,
    by_client: Held<Consumer>,
    consumer_infos: Mutex<HashMap<Arc<str>, ConsumerInfo>>,
}

/// An event on its way to JetStream.
struct Pending {
    subject: String,
    id: Option<Arc<str>>,
    line: Bytes,
    done: Appended,
}

impl JetStream {
    /// Connects to JetStream through `options.urls`, creates (or checks and updates)
    /// the declared streams and their dead-letter streams, and starts the tasks that
    /// publish, copy dead letters and read the numbers. Put the result in
    /// [`Streams::jetstream`] before the hub is made.
    ///
    /// # Errors
    ///
    /// A message saying what failed: no NATS server answered, JetStream is not
    /// enabled, a stream of that name holds other subjects, ...
    pub async fn connect(options: JetStreamOptions, streams: &Streams) -> Result<Engine, String> {
        let (client, context) = jetstream_context(&options).await?;
        let mut names: Vec<String> = streams.declared.iter().map(|s| s.name.clone()).collect();
        let dead: Vec<String> = names
            .iter()
            .map(|n| format!("{n}{}", crate::config::DEAD_SUFFIX))
            .collect();
        names.extend(dead);
        let mut handles = Vec::with_capacity(names.len());
        // A NATS cluster that has just started elects its JetStream leader first:
        // until then requests fail, so they are tried again for a while.
        let deadline = Instant::now() + STARTUP_PATIENCE;
        for name in &names {
            let handle = loop {
                match ensure_stream(&context, name, streams, options.replicas).await {
                    Ok(handle) => break handle,
                    Err(Ensure::Refused(e)) => return Err(e),
                    Err(Ensure::NotYet(e)) if Instant::now() >= deadline => return Err(e),
                    Err(Ensure::NotYet(e)) => {
                        debug!(stream = %name, error = %e, "JetStream not ready; trying again");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            };
            handles.push(handle);
        }
        let (publishes, receiver) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let engine = Arc::new(JetStream {
            context: context.clone(),
            infos: Mutex::new(vec![None; names.len()]),
            names,
            streams: handles,
            publishes,
            queued: Arc::clone(&queued),
            max_queued: 64 << 20,
            consumers: Mutex::default(),
            by_client: Held::default(),
            consumer_infos: Mutex::default(),
        });
        let (acks, acks_in) = mpsc::unbounded_channel();
        tokio::spawn(publish_loop(context, receiver, acks, Arc::clone(&queued)));
        tokio::spawn(ack_loop(acks_in, queued));
        let declared = streams.declared.len();
        for stream in 0..declared {
            let subject = format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
                subject::jetstream_stream(&engine.names[stream])
            );
            let advisories = client
                .queue_subscribe(subject, DEAD_LETTER_GROUP.to_string())
                .await
                .map_err(|e| format!("cannot listen for JetStream's advisories: {e}"))?;
            tokio::spawn(dead_letters(
                Arc::downgrade(&engine),
                stream,
                declared + stream,
                advisories,
            ));
        }
        tokio::spawn(read_numbers(Arc::downgrade(&engine)));
        info!(
            streams = declared,
            replicas = options.replicas,
            "streams live in JetStream"
        );
        Ok(Engine(engine))
    }

    fn index(&self, stream: &str) -> Option<usize> {
        self.names.iter().position(|n| n == stream)
    }

    /// What every consumer this node knows of holds, as JetStream last said.
    pub(crate) fn consumer_infos(&self) -> Vec<ConsumerInfo> {
        let mut infos: Vec<ConsumerInfo> = lock(&self.consumer_infos).values().cloned().collect();
        infos.sort_by(|a, b| a.name.cmp(&b.name));
        infos
    }

    /// `$consume` on a cluster node: the JetStream consumer is found (and checked) or
    /// made in a task, which then answers `$consuming` (or the `$error`) and starts
    /// pulling for this node's members.
    pub(crate) fn consume(
        self: &Arc<Self>,
        hub: &Hub,
        member: &Arc<Member>,
        name: &str,
        stream: usize,
        request: Request,
    ) -> Result<(), ProtocolError> {
        self.by_client.room_for(member.id, |c| &*c.name == name)?;
        let (engine, hub, member, name) = (
            Arc::clone(self),
            hub.clone(),
            Arc::clone(member),
            Arc::<str>::from(name),
        );
        tokio::spawn(async move {
            let result = engine.join(&hub, &member, &name, stream, request).await;
            if let Err(e) = result {
                member.outbox.push(e.with_consumer(&name).to_frame());
            }
        });
        Ok(())
    }

    async fn join(
        self: &Arc<Self>,
        hub: &Hub,
        member: &Arc<Member>,
        name: &Arc<str>,
        stream: usize,
        request: Request,
    ) -> Result<(), ProtocolError> {
        let consumer = self.find_or_make(name, stream, &request).await?;
        if member.outbox.closed().is_some() {
            return Ok(()); // gone while JetStream answered
        }
        // As on a single hub: a consuming connection hears live events only through
        // its subscriptions.
        hub.subscribe(member.id, &[])?;
        let pending = consumer
            .pull
            .clone()
            .info()
            .await
            .map(|i| i.num_pending + i.num_ack_pending as u64)
            .unwrap_or(0);
        self.by_client.hold(member.id, &consumer)?;
        let start = {
            let mut live = consumer.lock();
            if !live.members.iter().any(|s| s.member.id == member.id) {
                live.members.push(Slot {
                    member: Arc::clone(member),
                    out: 0,
                });
            }
            let answer = json!({
                "stream": self.names[stream],
                "consumer": &**name,
                "pending": pending,
            });
            // Under the consumer's lock: ahead of any delivery to this member.
            member
                .outbox
                .push(crate::control::reply("$consuming", &answer)?);
            !std::mem::replace(&mut live.pumping, true)
        };
        consumer.wake.notify_one();
        if start {
            tokio::spawn(Arc::clone(&consumer).pump(hub.clone(), Arc::clone(self)));
        }
        Ok(())
    }

    /// The consumer `name` of this node, or JetStream's (checked against `request`),
    /// or a new one.
    async fn find_or_make(
        &self,
        name: &Arc<str>,
        stream: usize,
        request: &Request,
    ) -> Result<Arc<Consumer>, ProtocolError> {
        if let Some(consumer) = lock(&self.consumers).get(name).cloned() {
            mismatch(name, &consumer.spec, request)?;
            return Ok(consumer);
        }
        let js_name = subject::jetstream_consumer(name);
        let handle = &self.streams[stream];
        let engine_error = |what: &str, e: &dyn std::fmt::Display| {
            ProtocolError::new(
                ErrorCode::Storage,
                format!("JetStream could not {what} consumer {name:?}: {e}"),
            )
        };
        let existing = handle.get_consumer::<pull::Config>(&js_name).await;
        let (pull, spec) = match existing {
            Ok(mut pull) => {
                let spec = stored_spec(pull.cached_info()).ok_or_else(|| {
                    ProtocolError::new(
                        ErrorCode::ConsumerMismatch,
                        format!(
                            "JetStream consumer {js_name:?} of stream {:?} was not made by hubcast",
                            subject::jetstream_stream(&self.names[stream])
                        ),
                    )
                })?;
                mismatch(name, &spec, request)?;
                let _ = pull.info().await;
                (pull, spec)
            }
            // Not there (or not readable): made, unless another node made it meanwhile.
            Err(_) => {
                let config = consumer_config(&js_name, &self.names[stream], &request.spec);
                match handle.create_consumer(config).await {
                    Ok(pull) => (pull, request.spec.clone()),
                    Err(e) => {
                        // Made by another node meanwhile, perhaps with other settings.
                        let mut pull = handle
                            .get_consumer::<pull::Config>(&js_name)
                            .await
                            .map_err(|_| engine_error("make", &e))?;
                        let spec = stored_spec(pull.cached_info())
                            .ok_or_else(|| engine_error("make", &e))?;
                        mismatch(name, &spec, request)?;
                        let _ = pull.info().await;
                        (pull, spec)
                    }
                }
            }
        };
        let mut consumers = lock(&self.consumers);
        let consumer = consumers.entry(Arc::clone(name)).or_insert_with(|| {
            Arc::new(Consumer {
                name: Arc::clone(name),
                stream,
                spec,
                pull,
                live: Mutex::default(),
                wake: Notify::new(),
            })
        });
        Ok(Arc::clone(consumer))
    }

    /// The consumer `name`, consumed by `client`.
    fn held(&self, client: ClientId, name: &str) -> Result<Arc<Consumer>, ProtocolError> {
        self.by_client
            .find(client, |c| &*c.name == name)
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::NotConsuming,
                    format!(
                        "this connection does not consume {:?}; send $consume first",
                        crate::protocol::printable(name)
                    ),
                )
            })
    }

    /// `$ack`: JetStream's `+ACK` for each seq out to this consumer's members here;
    /// with `confirm`, `$acked` once JetStream confirmed them.
    pub(crate) fn ack(
        &self,
        hub: &Hub,
        client: ClientId,
        name: &str,
        seqs: &[u64],
        confirm: bool,
    ) -> Result<(), ProtocolError> {
        let consumer = self.held(client, name)?;
        let Taken {
            ackers,
            found: acked,
            bad,
            delivered_below,
        } = consumer.take(seqs);
        consumer.wake.notify_one();
        if !ackers.is_empty() || confirm {
            let (hub, name) = (hub.clone(), consumer.name.clone());
            tokio::spawn(async move {
                let mut failed = None;
                for acker in ackers {
                    let sent = if confirm {
                        acker.double_ack().await
                    } else {
                        acker.ack().await
                    };
                    if let Err(e) = sent {
                        failed = Some(e.to_string());
                    }
                }
                let frame = match failed {
                    Some(e) => Some(
                        ProtocolError::new(
                            ErrorCode::Storage,
                            format!("acks for {name:?} were not confirmed by JetStream: {e}"),
                        )
                        .to_frame(),
                    ),
                    None if confirm => {
                        crate::control::reply("$acked", &json!({"consumer": &*name, "seq": acked}))
                            .ok()
                    }
                    None => None,
                };
                if let Some(frame) = frame {
                    hub.reply(client, frame);
                }
            });
        }
        settled("$ack", name, seqs, &bad, delivered_below)
    }

    /// `$nack`: JetStream's `-NAK` (with the delay, if any) for each seq.
    pub(crate) fn nack(
        &self,
        client: ClientId,
        name: &str,
        seqs: &[u64],
        delay: Duration,
    ) -> Result<(), ProtocolError> {
        let consumer = self.held(client, name)?;
        let Taken {
            ackers,
            bad,
            delivered_below,
            ..
        } = consumer.take(seqs);
        consumer.wake.notify_one();
        nak_all(ackers, (!delay.is_zero()).then_some(delay));
        settled("$nack", name, seqs, &bad, delivered_below)
    }

    /// `$unconsume`: no more deliveries to this connection; what was out to it goes
    /// back to JetStream at once.
    pub(crate) fn unconsume(&self, client: ClientId, name: &str) -> Result<(), ProtocolError> {
        let consumer = self.held(client, name)?;
        self.by_client.release(client, &consumer);
        consumer.detach(client);
        Ok(())
    }

    /// A connection closed: what was out to it goes back to JetStream at once.
    pub(crate) fn left(&self, client: ClientId) {
        for consumer in self.by_client.take(client) {
            consumer.detach(client);
        }
    }
}

impl Store for JetStream {
    fn append(&self, stream: &str, id: Option<Arc<str>>, line: Bytes, done: Appended) {
        let Some(index) = self.index(stream) else {
            return done(Err(StoreError::Invalid(format!(
                "no stream is named {stream:?}"
            ))));
        };
        let event = match Event::from_line(line.clone()) {
            Ok(event) => event,
            Err(e) => return done(Err(StoreError::Invalid(e.message))),
        };
        let subject = subject::stored_subject(
            &self.names[index],
            event.name().as_str(),
            event.room().map(crate::event::RoomName::as_str),
        );
        let queued = self.queued.fetch_add(line.len(), Ordering::AcqRel);
        if queued > self.max_queued {
            self.queued.fetch_sub(line.len(), Ordering::AcqRel);
            return done(Err(StoreError::Behind(queued)));
        }
        let pending = Pending {
            subject,
            id,
            line,
            done,
        };
        if let Err(mpsc::error::SendError(pending)) = self.publishes.send(pending) {
            self.queued.fetch_sub(pending.line.len(), Ordering::AcqRel);
            (pending.done)(Err(StoreError::Closed));
        }
    }

    fn read(&self, _stream: &str, _seq: u64, _max: usize) -> Result<Vec<Record>, StoreError> {
        Err(StoreError::Invalid(
            "streams in JetStream are read through their consumers".into(),
        ))
    }

    fn info(&self, stream: &str) -> Option<StreamInfo> {
        let index = self.index(stream)?;
        lock(&self.infos)[index]
    }
}

/// Connects to the NATS servers of `options` for JetStream (as `serve --cluster`).
async fn jetstream_context(
    options: &JetStreamOptions,
) -> Result<(async_nats::Client, async_nats::jetstream::Context), String> {
    let mut connect = async_nats::ConnectOptions::new()
        .name(format!("hubcast {} (streams)", options.node))
        .connection_timeout(API_TIMEOUT)
        .request_timeout(Some(API_TIMEOUT));
    if let Some(first) = options.urls.first() {
        if let Some((user, pass)) = first.user_pass() {
            connect = connect.user_and_password(user.to_string(), pass.to_string());
        } else if let Some(token) = first.token() {
            connect = connect.token(token.to_string());
        }
    }
    if let Some(tls) = &options.tls {
        connect = connect.tls_client_config((**tls).clone());
    }
    if options.urls.iter().any(ServerUrl::requires_tls) {
        connect = connect.require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = options
        .urls
        .iter()
        .map(|url| {
            format!("nats://{}", url.addr)
                .parse()
                .map_err(|e| format!("{url}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let listed = options
        .urls
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let client = connect
        .connect(addrs)
        .await
        .map_err(|e| format!("cannot reach NATS at {listed} for the streams: {e}"))?;
    let context = async_nats::jetstream::ContextBuilder::new()
        .timeout(API_TIMEOUT)
        .ack_timeout(ACK_TIMEOUT)
        .build(client.clone());
    Ok((client, context))
}

/// A hubcast stream kept in JetStream, as `hubcast streams --cluster` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterStream {
    /// Its hubcast name (`orders`, `orders.dead`).
    pub stream: String,
    /// Its JetStream name (`orders`, `orders~dead`).
    pub jetstream: String,
    /// The oldest seq it keeps.
    pub first_seq: u64,
    /// The newest seq it has.
    pub last_seq: u64,
    /// Events it holds.
    pub events: u64,
    /// Bytes it holds (on each replica).
    pub bytes: u64,
    /// The servers keeping it (`--replicas`).
    pub replicas: usize,
    /// The server leading it (its RAFT group's leader), when JetStream says.
    pub leader: Option<String>,
    /// Its consumers, by name.
    pub consumers: Vec<ClusterConsumer>,
}

/// A hubcast consumer kept in JetStream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterConsumer {
    /// Its hubcast name (its JetStream name when it is not one hubcast made).
    pub consumer: String,
    /// Every seq up to this one is acknowledged.
    pub ack_floor: u64,
    /// Events not delivered yet.
    pub waiting: u64,
    /// Events delivered and not acknowledged yet.
    pub ack_pending: u64,
    /// Events delivered more than once and not acknowledged yet.
    pub redelivered: u64,
}

/// The hubcast streams (and their consumers) in the JetStream of `options`' servers:
/// those whose only subject is the one a hub gives them (`hubcast.s.NAME.>`).
///
/// # Errors
///
/// A message saying what failed: no NATS server answered, JetStream is not enabled.
pub async fn cluster_streams(options: &JetStreamOptions) -> Result<Vec<ClusterStream>, String> {
    let (_client, context) = jetstream_context(options).await?;
    let failed = |e: &dyn std::fmt::Display| {
        format!(
            "JetStream did not list its streams (is JetStream enabled on the NATS servers?): {e}"
        )
    };
    let mut listed = context.streams();
    let mut out = Vec::new();
    while let Some(info) = listed.next().await {
        let info = info.map_err(|e| failed(&e))?;
        let name = info.config.name.replace('~', ".");
        if info.config.subjects != [subject::stream_subjects(&name)] {
            continue;
        }
        let stream = context
            .get_stream(&info.config.name)
            .await
            .map_err(|e| failed(&e))?;
        let mut consumers = Vec::new();
        let mut listed = stream.consumers();
        while let Some(consumer) = listed.next().await {
            let consumer = consumer.map_err(|e| failed(&e))?;
            consumers.push(ClusterConsumer {
                consumer: subject::consumer_from_jetstream(&consumer.name)
                    .unwrap_or_else(|| consumer.name.clone()),
                ack_floor: consumer.ack_floor.stream_sequence,
                waiting: consumer.num_pending,
                ack_pending: consumer.num_ack_pending as u64,
                redelivered: consumer.num_redelivered as u64,
            });
        }
        consumers.sort_by(|a, b| a.consumer.cmp(&b.consumer));
        out.push(ClusterStream {
            stream: name,
            jetstream: info.config.name.clone(),
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            events: info.state.messages,
            bytes: info.state.bytes,
            replicas: info.config.num_replicas,
            leader: info.cluster.as_ref().and_then(|c| c.leader.clone()),
            consumers,
        });
    }
    out.sort_by(|a, b| a.stream.cmp(&b.stream));
    Ok(out)
}

/// Why a stream is not ready.
enum Ensure {
    /// JetStream did not answer, or not yet (tried again for a while).
    NotYet(String),
    /// It answered no: a stream of that name holds other subjects.
    Refused(String),
}

/// Creates `name`'s JetStream stream, or checks that the one there holds its
/// subjects and updates its limits.
async fn ensure_stream(
    context: &async_nats::jetstream::Context,
    name: &str,
    streams: &Streams,
    replicas: usize,
) -> Result<stream::Stream, Ensure> {
    let js_name = subject::jetstream_stream(name);
    let subjects = vec![subject::stream_subjects(name)];
    let retention = &streams.retention_of(name);
    let max_age = retention.max_age.unwrap_or(Duration::ZERO);
    // JetStream refuses a duplicate window longer than the streams' max age.
    let window = match retention.max_age {
        Some(age) if age < streams.dedup_window => age,
        _ => streams.dedup_window,
    };
    let config = stream::Config {
        name: js_name.clone(),
        description: Some(format!("hubcast stream {name}")),
        subjects: subjects.clone(),
        max_messages: i64::try_from(retention.max_events).unwrap_or(i64::MAX),
        max_bytes: i64::try_from(retention.max_bytes).unwrap_or(i64::MAX),
        max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: window,
        discard: stream::DiscardPolicy::Old,
        retention: stream::RetentionPolicy::Limits,
        allow_direct: true,
        ..Default::default()
    };
    match context.get_stream(&js_name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| Ensure::NotYet(format!("JetStream stream {js_name:?}: {e}")))?;
            if info.config.subjects != subjects {
                return Err(Ensure::Refused(format!(
                    "JetStream stream {js_name:?} exists with subjects {:?}; hubcast stream {name:?} needs {:?} (delete it or choose another name)",
                    info.config.subjects, subjects
                )));
            }
            let same = info.config.num_replicas == replicas
                && info.config.max_messages == config.max_messages
                && info.config.max_bytes == config.max_bytes
                && info.config.max_age == config.max_age
                && info.config.duplicate_window == config.duplicate_window;
            if !same {
                context.update_stream(config).await.map_err(|e| {
                    Ensure::Refused(format!(
                        "cannot update JetStream stream {js_name:?} to these settings: {e}"
                    ))
                })?;
                info!(stream = name, "JetStream stream updated to these settings");
            }
            context
                .get_stream(&js_name)
                .await
                .map_err(|e| Ensure::NotYet(format!("JetStream stream {js_name:?}: {e}")))
        }
        Err(e)
            if matches!(
                e.kind(),
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            context.create_stream(config).await.map_err(|e| {
                let message = format!("cannot create JetStream stream {js_name:?}: {e}");
                match e.kind() {
                    // An answer that settles it (no room for it, a bad setting): said
                    // at once. The cluster still forming: tried again.
                    async_nats::jetstream::context::CreateStreamErrorKind::JetStream(j)
                        if !(10004..=10009).contains(&j.error_code().0) =>
                    {
                        Ensure::Refused(message)
                    }
                    _ => Ensure::NotYet(message),
                }
            })
        }
        Err(e) => Err(Ensure::NotYet(format!(
            "JetStream did not answer for stream {js_name:?} (is JetStream enabled on the NATS servers?): {e}"
        ))),
    }
}

/// Hands events to JetStream in the order they were appended.
async fn publish_loop(
    context: async_nats::jetstream::Context,
    mut pending: mpsc::UnboundedReceiver<Pending>,
    acks: mpsc::UnboundedSender<(
        async_nats::jetstream::context::PublishAckFuture,
        Appended,
        usize,
    )>,
    queued: Arc<AtomicUsize>,
) {
    while let Some(event) = pending.recv().await {
        let size = event.line.len();
        let mut publish = Publish::build().payload(event.line);
        if let Some(id) = &event.id {
            publish = publish.message_id(id);
        }
        match context.send_publish(event.subject, publish).await {
            Ok(ack) => {
                let _ = acks.send((ack, event.done, size));
            }
            Err(e) => {
                queued.fetch_sub(size, Ordering::AcqRel);
                (event.done)(Err(StoreError::Engine(format!(
                    "JetStream did not take it: {e}"
                ))));
            }
        }
    }
}

/// Confirms events as JetStream acknowledges them, in order.
async fn ack_loop(
    mut acks: mpsc::UnboundedReceiver<(
        async_nats::jetstream::context::PublishAckFuture,
        Appended,
        usize,
    )>,
    queued: Arc<AtomicUsize>,
) {
    while let Some((ack, done, size)) = acks.recv().await {
        let result = ack.await;
        queued.fetch_sub(size, Ordering::AcqRel);
        done(match result {
            Ok(ack) if ack.duplicate => Err(StoreError::Duplicate(ack.sequence)),
            Ok(ack) => Ok(ack.sequence),
            // async-nats reads "no responders" as "no stream": while a stream
            // elects a new leader (its server lost) nobody answers for a moment.
            Err(e) if e.kind() == async_nats::jetstream::context::PublishErrorKind::StreamNotFound => Err(StoreError::Engine(
                "JetStream did not confirm it: no server answered for the stream (its leader may be changing; send it again)".to_string(),
            )),
            Err(e) => Err(StoreError::Engine(format!(
                "JetStream did not confirm it: {e}"
            ))),
        });
    }
}

/// Copies the events JetStream announces as past `max_deliver` to the dead-letter
/// stream (one node of the queue group gets each announcement).
async fn dead_letters(
    engine: std::sync::Weak<JetStream>,
    stream: usize,
    dead: usize,
    mut advisories: async_nats::Subscriber,
) {
    #[derive(serde::Deserialize)]
    struct Advisory {
        consumer: String,
        stream_seq: u64,
        deliveries: u64,
    }
    while let Some(message) = advisories.next().await {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let Ok(advisory) = serde_json::from_slice::<Advisory>(&message.payload) else {
            continue;
        };
        let consumer = subject::consumer_from_jetstream(&advisory.consumer)
            .unwrap_or_else(|| advisory.consumer.clone());
        let seq = advisory.stream_seq;
        let stored = match engine.streams[stream].get_raw_message(seq).await {
            Ok(stored) => stored,
            Err(e) => {
                // Deleted by retention meanwhile: nothing left to move.
                debug!(seq, error = %e, "a dead letter was no longer in its stream");
                continue;
            }
        };
        let line = with_fields(
            &stored.payload,
            &[(
                "dead_letter",
                json!({
                    "stream": engine.names[stream],
                    "seq": seq,
                    "consumer": consumer,
                    "attempts": advisory.deliveries,
                }),
            )],
        );
        let Ok(event) = Event::from_line(line.clone()) else {
            continue;
        };
        let subject = subject::stored_subject(
            &engine.names[dead],
            event.name().as_str(),
            event.room().map(crate::event::RoomName::as_str),
        );
        let publish = Publish::build()
            .payload(line)
            .message_id(format!("dead:{}:{seq}", advisory.consumer));
        let stored = match engine.context.send_publish(subject, publish).await {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => {
                if let Some(info) = lock(&engine.consumer_infos).get_mut(consumer.as_str()) {
                    info.dead_lettered += 1;
                }
            }
            Err(e) => warn!(
                seq,
                consumer = %consumer,
                error = %e,
                "could not move an event to its dead-letter stream"
            ),
        }
    }
}

/// Reads the streams' and consumers' numbers from JetStream now and then, for
/// `/metrics`, `$stats` and the dashboard.
async fn read_numbers(engine: std::sync::Weak<JetStream>) {
    loop {
        tokio::time::sleep(INFO_EVERY).await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        for (index, handle) in engine.streams.iter().enumerate() {
            let mut handle = handle.clone();
            if let Ok(info) = handle.info().await {
                let state = &info.state;
                lock(&engine.infos)[index] = Some(StreamInfo {
                    first_seq: state.first_sequence,
                    last_seq: state.last_sequence,
                    events: state.messages,
                    bytes: state.bytes,
                });
            }
        }
        let consumers: Vec<Arc<Consumer>> = lock(&engine.consumers).values().cloned().collect();
        for consumer in consumers {
            let Ok(info) = consumer.pull.clone().info().await.cloned() else {
                continue;
            };
            let in_flight = consumer.lock().out.values().filter(|o| o.counted).count() as u64;
            let mut infos = lock(&engine.consumer_infos);
            let entry = infos
                .entry(consumer.name.clone())
                .or_insert_with(|| ConsumerInfo {
                    name: consumer.name.to_string(),
                    stream: engine.names[consumer.stream].clone(),
                    ack_floor: 0,
                    pending: 0,
                    in_flight: 0,
                    acked: 0,
                    redelivered: 0,
                    dead_lettered: 0,
                });
            entry.ack_floor = info.ack_floor.stream_sequence;
            entry.pending = info.num_pending + info.num_ack_pending as u64;
            entry.in_flight = in_flight;
            entry.redelivered = info.num_redelivered as u64;
        }
    }
}

/// A JetStream consumer as this node sees it.
pub(crate) struct Consumer {
    name: Arc<str>,
    stream: usize,
    /// Its hubcast settings (the first `$consume`'s, kept in JetStream).
    spec: Spec,
    pull: PullConsumer,
    live: Mutex<Live>,
    wake: Notify,
}

#[derive(Default)]
struct Live {
    /// This node's members.
    members: Vec<Slot>,
    /// Deliveries out to them, by stream seq.
    out: HashMap<u64, Out>,
    /// The member the next delivery is offered to first.
    next: usize,
    pumping: bool,
    /// One past the highest seq delivered here: an ack under it that finds nothing
    /// out raced a redelivery (or repeats an ack), and is not held against the client.
    delivered_below: u64,
}

struct Slot {
    member: Arc<Member>,
    out: usize,
}

/// What an `$ack` or `$nack` found out here.
struct Taken {
    ackers: Vec<Acker>,
    found: Vec<u64>,
    /// The seqs that were not out here.
    bad: Vec<u64>,
    delivered_below: u64,
}

struct Out {
    client: ClientId,
    acker: Acker,
    at: Instant,
    /// Whether it holds a place of its member's `max_in_flight` (not once `ack_wait`
    /// passed: JetStream delivers it again then, but a late ack still counts).
    counted: bool,
}

impl Consumer {
    fn lock(&self) -> MutexGuard<'_, Live> {
        lock(&self.live)
    }

    /// Takes the deliveries of `seqs` out (for an ack or a nack): their ackers, the
    /// seqs found, and those not out here.
    fn take(&self, seqs: &[u64]) -> Taken {
        let mut live = self.lock();
        let (mut ackers, mut found, mut bad) = (Vec::new(), Vec::new(), Vec::new());
        for &seq in seqs {
            match live.out.remove(&seq) {
                Some(out) => {
                    if out.counted {
                        release(&mut live, out.client);
                    }
                    ackers.push(out.acker);
                    found.push(seq);
                }
                None => bad.push(seq),
            }
        }
        Taken {
            ackers,
            found,
            bad,
            delivered_below: live.delivered_below,
        }
    }

    /// `client` is no longer a member here: its deliveries go back to JetStream.
    fn detach(&self, client: ClientId) {
        let ackers: Vec<Acker> = {
            let mut live = self.lock();
            live.members.retain(|s| s.member.id != client);
            let seqs: Vec<u64> = live
                .out
                .iter()
                .filter(|(_, o)| o.client == client)
                .map(|(seq, _)| *seq)
                .collect();
            seqs.iter()
                .filter_map(|seq| live.out.remove(seq))
                .map(|o| o.acker)
                .collect()
        };
        nak_all(ackers, None);
        self.wake.notify_one();
    }

    /// Pulls for this node's members while it has any.
    async fn pump(self: Arc<Self>, hub: Hub, engine: Arc<JetStream>) {
        let ack_wait = self.spec.ack_wait();
        let half = hub.config().limits.max_pending / 2;
        loop {
            let room = {
                let mut live = self.lock();
                // JetStream redelivers what was not acked within ack_wait: those
                // deliveries no longer hold their member's room (a late ack is still
                // passed on, until long after).
                let now = Instant::now();
                let stale: Vec<(u64, ClientId)> = live
                    .out
                    .iter_mut()
                    .filter(|(_, o)| o.counted && now.duration_since(o.at) > ack_wait)
                    .map(|(seq, o)| {
                        o.counted = false;
                        (*seq, o.client)
                    })
                    .collect();
                for (_, client) in stale {
                    release(&mut live, client);
                }
                let forget = ack_wait * 10 + Duration::from_secs(60);
                live.out
                    .retain(|_, o| o.counted || now.duration_since(o.at) < forget);
                if live.members.is_empty() {
                    live.pumping = false;
                    return;
                }
                let max = self.spec.max_in_flight as usize;
                live.members
                    .iter()
                    .filter(|s| s.member.outbox.pending() < half)
                    .map(|s| max.saturating_sub(s.out))
                    .sum::<usize>()
            };
            if room == 0 {
                let _ = tokio::time::timeout(PULL_EXPIRES, self.wake.notified()).await;
                continue;
            }
            let batch = self
                .pull
                .batch()
                .max_messages(room.min(MAX_PULL))
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut messages = match batch {
                Ok(messages) => messages,
                Err(e) => {
                    debug!(consumer = %self.name, error = %e, "pull failed; trying again");
                    let _ = tokio::time::timeout(PULL_EXPIRES, self.wake.notified()).await;
                    continue;
                }
            };
            // A pull whose server went away ends by this timeout, not by an answer.
            while let Ok(Some(message)) =
                tokio::time::timeout(PULL_EXPIRES * 3, messages.next()).await
            {
                match message {
                    Ok(message) => self.deliver(&engine, message),
                    Err(e) => {
                        debug!(consumer = %self.name, error = %e, "pull ended");
                        break;
                    }
                }
            }
        }
    }

    /// Hands one event from JetStream to a member with room (or back to JetStream).
    fn deliver(&self, engine: &JetStream, message: async_nats::jetstream::Message) {
        let Ok((seq, attempt)) = message.info().map(|i| {
            (
                i.stream_sequence,
                u32::try_from(i.delivered).unwrap_or(u32::MAX),
            )
        }) else {
            return;
        };
        let (message, acker) = message.split();
        let mut live = self.lock();
        let max = self.spec.max_in_flight as usize;
        let count = live.members.len();
        let start = live.next;
        let pick = (0..count)
            .map(|i| (start + i) % count.max(1))
            .find(|&i| live.members[i].out < max);
        let Some(i) = pick else {
            drop(live);
            nak_all(vec![acker], None);
            return;
        };
        live.next = (i + 1) % count;
        live.delivered_below = live.delivered_below.max(seq + 1);
        let frame = delivery(
            &message.payload,
            &engine.names[self.stream],
            seq,
            &self.name,
            attempt,
        );
        let slot = &mut live.members[i];
        slot.out += 1;
        let client = slot.member.id;
        slot.member.outbox.push_events(frame, 1);
        let out = Out {
            client,
            acker,
            at: Instant::now(),
            counted: true,
        };
        if let Some(old) = live.out.insert(seq, out) {
            // Redelivered here while an older delivery was still counted.
            if old.counted {
                release(&mut live, old.client);
            }
        }
    }
}

/// One fewer delivery out to `client`.
fn release(live: &mut Live, client: ClientId) {
    if let Some(slot) = live.members.iter_mut().find(|s| s.member.id == client) {
        slot.out = slot.out.saturating_sub(1);
    }
}

/// Gives deliveries back to JetStream (`-NAK`), in a task.
fn nak_all(ackers: Vec<Acker>, delay: Option<Duration>) {
    if ackers.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for acker in ackers {
            let _ = acker.ack_with(AckKind::Nak(delay)).await;
        }
    });
}

/// The JetStream consumer for hubcast consumer settings `spec`.
fn consumer_config(js_name: &str, stream: &str, spec: &Spec) -> pull::Config {
    let filter_subjects =
        subject::consumer_filters(stream, spec.filter.as_deref(), spec.room.as_deref());
    let deliver_policy = match spec.start {
        Start::All => DeliverPolicy::All,
        Start::New => DeliverPolicy::New,
        Start::Seq(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        },
    };
    let mut metadata = HashMap::new();
    metadata.insert(
        SPEC_KEY.to_string(),
        serde_json::to_string(spec).expect("a spec serialises"),
    );
    pull::Config {
        durable_name: Some(js_name.to_string()),
        description: Some("hubcast consumer".into()),
        deliver_policy,
        ack_policy: AckPolicy::Explicit,
        ack_wait: spec.ack_wait(),
        max_deliver: i64::from(spec.max_deliver),
        filter_subjects,
        max_ack_pending: -1,
        metadata,
        ..Default::default()
    }
}

/// The hubcast settings kept in a JetStream consumer's metadata.
fn stored_spec(info: &async_nats::jetstream::consumer::Info) -> Option<Spec> {
    serde_json::from_str(info.config.metadata.get(SPEC_KEY)?).ok()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
