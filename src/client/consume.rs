//! Durable consumers from the client's side: [`Client::consume`], the [`Consumer`]
//! it returns, and the [`Message`]s it yields, each to [`Message::ack`] or
//! [`Message::nack`].

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use super::{Client, ClientError};
use crate::event::Event;
use crate::protocol::ProtocolError;

/// What [`Client::consume`] asks the hub for. Settings left out take the hub's
/// defaults (or, for a consumer that exists, its settings).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use hubcast::client::ConsumeOptions;
/// let options = ConsumeOptions::new("orders", "drivers")
///     .filter("pickup")
///     .ack_wait(Duration::from_secs(10))
///     .max_in_flight(1);
/// # drop(options);
/// ```
#[derive(Debug, Clone)]
pub struct ConsumeOptions {
    stream: String,
    consumer: String,
    payload: serde_json::Map<String, serde_json::Value>,
}

impl ConsumeOptions {
    /// Consumer `consumer` of stream `stream` (created on first use; connections
    /// using the same name share its events, as a work queue).
    pub fn new(stream: &str, consumer: &str) -> Self {
        ConsumeOptions {
            stream: stream.to_owned(),
            consumer: consumer.to_owned(),
            payload: serde_json::Map::new(),
        }
    }

    fn set(mut self, key: &str, value: serde_json::Value) -> Self {
        self.payload.insert(key.to_owned(), value);
        self
    }

    /// Only events whose names match `pattern`.
    pub fn filter(self, pattern: &str) -> Self {
        self.set("filter", json!(pattern))
    }

    /// Only events sent to `room`.
    pub fn room(self, room: &str) -> Self {
        self.set("room", json!(room))
    }

    /// A new consumer starts with the next event stored (the default is the oldest).
    pub fn start_new(self) -> Self {
        self.set("start", json!("new"))
    }

    /// A new consumer starts at `seq`.
    pub fn start_at(self, seq: u64) -> Self {
        self.set("start", json!(seq))
    }

    /// Redeliver what is not acknowledged within `wait` (the hub's default is 30 s).
    pub fn ack_wait(self, wait: Duration) -> Self {
        self.set("ack_wait", json!(format!("{}ms", wait.as_millis().max(1))))
    }

    /// After `attempts` deliveries, move an event to the dead-letter stream.
    pub fn max_deliver(self, attempts: u32) -> Self {
        self.set("max_deliver", json!(attempts))
    }

    /// At most `n` unacknowledged deliveries out to this connection at once.
    pub fn max_in_flight(self, n: u32) -> Self {
        self.set("max_in_flight", json!(n))
    }

    fn payload(&self) -> serde_json::Value {
        let mut payload = self.payload.clone();
        payload.insert("stream".into(), json!(self.stream));
        payload.insert("consumer".into(), json!(self.consumer));
        serde_json::Value::Object(payload)
    }

    fn window(&self) -> usize {
        let in_flight = self.payload.get("max_in_flight").and_then(|v| v.as_u64());
        in_flight.unwrap_or(100) as usize * 2 + 16
    }
}

/// A consumer this client holds, restored after a reconnect.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) payload: serde_json::Value,
    deliveries: mpsc::Sender<Message>,
    /// Waits for the first `$consuming` (or the `$error` about it).
    answer: Option<oneshot::Sender<Result<u64, ClientError>>>,
}

/// The fields the hub adds to a stored event when it delivers it.
#[derive(Deserialize)]
struct Meta {
    stream: String,
    seq: u64,
    consumer: String,
    attempt: u32,
}

/// Whether `event` may be for a consumer (cheap, before the session is locked).
pub(crate) fn may_route(event: &Event) -> bool {
    match event.name().as_str() {
        "$consuming" | "$error" => true,
        name if name.starts_with('$') => false,
        _ => memchr::memmem::find(event.line(), b"\"consumer\"").is_some(),
    }
}

/// The client task's part: routes deliveries and answers to their consumers.
pub(crate) fn route(state: &mut super::SessionState, event: &Event) {
    if state.consumers.is_empty() {
        return;
    }
    match event.name().as_str() {
        "$consuming" => {
            #[derive(Deserialize)]
            struct Answer {
                consumer: String,
                pending: u64,
            }
            if let Ok(answer) = serde_json::from_str::<Answer>(event.payload()) {
                if let Some(held) = state.consumers.get_mut(&answer.consumer) {
                    if let Some(waiter) = held.answer.take() {
                        let _ = waiter.send(Ok(answer.pending));
                    }
                }
            }
        }
        "$error" => {
            #[derive(Deserialize)]
            struct About {
                consumer: Option<String>,
                code: crate::protocol::ErrorCode,
                message: String,
            }
            let Ok(about) = serde_json::from_str::<About>(event.payload()) else {
                return;
            };
            let Some(name) = about.consumer else { return };
            let error = ProtocolError::new(about.code, about.message).with_consumer(&name);
            let refused = match state.consumers.get_mut(&name) {
                Some(held) => match held.answer.take() {
                    Some(waiter) => {
                        let _ = waiter.send(Err(ClientError::Hub(error)));
                        true
                    }
                    None => false,
                },
                None => false,
            };
            if refused {
                state.consumers.remove(&name);
            }
        }
        name if !name.starts_with('$') => {
            if memchr::memmem::find(event.line(), b"\"consumer\"").is_none() {
                return;
            }
            let Ok(meta) = serde_json::from_slice::<Meta>(event.line()) else {
                return;
            };
            let Some(held) = state.consumers.get(&meta.consumer) else {
                return;
            };
            let Some(shared) = state.handle.upgrade() else {
                return;
            };
            let client = Client { shared };
            // Full: the reader is far behind; the hub delivers it again after ack_wait.
            let _ = held.deliveries.try_send(Message {
                event: event.clone(),
                stream: meta.stream,
                seq: meta.seq,
                attempt: meta.attempt,
                consumer: meta.consumer,
                client,
            });
        }
        _ => {}
    }
}

/// A durable consumer held by this client: deliveries, in the order they came.
///
/// Dropping it does not stop the deliveries (they wait for `ack_wait` and go
/// elsewhere); [`Consumer::stop`] does.
#[derive(Debug)]
pub struct Consumer {
    name: String,
    client: Client,
    deliveries: mpsc::Receiver<Message>,
    pending: u64,
}

impl Consumer {
    /// The next delivery; `None` once the client is closed.
    pub async fn next(&mut self) -> Option<Message> {
        self.deliveries.recv().await
    }

    /// The next delivery if one is here already.
    pub fn try_next(&mut self) -> Option<Message> {
        self.deliveries.try_recv().ok()
    }

    /// Acknowledges several deliveries at once (one `$ack`).
    ///
    /// # Errors
    ///
    /// As [`Client::send`].
    pub async fn ack(&self, seqs: &[u64]) -> Result<(), ClientError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let ack = json!({ "consumer": self.name, "seq": seqs });
        self.client.emit("$ack", &ack).await
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many events were not acknowledged when the hub answered `$consume`.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Stops deliveries to this client (`$unconsume`): what it has not acknowledged
    /// goes to the consumer's other members, or waits for the next.
    ///
    /// # Errors
    ///
    /// As [`Client::send`].
    pub async fn stop(self) -> Result<(), ClientError> {
        self.client.lock_state().consumers.remove(&self.name);
        self.client
            .emit("$unconsume", &json!({ "consumer": self.name }))
            .await
    }
}

/// One event delivered by a durable consumer.
#[derive(Debug, Clone)]
pub struct Message {
    /// The stored event, with `"stream"`, `"seq"`, `"consumer"` and `"attempt"` in
    /// its line.
    pub event: Event,
    /// Its stream.
    pub stream: String,
    /// Its place in the stream.
    pub seq: u64,
    /// 1 on its first delivery, more when delivered again.
    pub attempt: u32,
    consumer: String,
    client: Client,
}

impl Message {
    /// The consumer that delivered it.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Acknowledges it: the consumer will not deliver it again.
    ///
    /// # Errors
    ///
    /// As [`Client::send`].
    pub async fn ack(&self) -> Result<(), ClientError> {
        let ack = json!({ "consumer": self.consumer, "seq": self.seq });
        self.client.emit("$ack", &ack).await
    }

    /// Gives it back to be delivered again, after `delay` if given (counts as an
    /// attempt towards `max_deliver`).
    ///
    /// # Errors
    ///
    /// As [`Client::send`].
    pub async fn nack(&self, delay: Option<Duration>) -> Result<(), ClientError> {
        let mut nack = json!({ "consumer": self.consumer, "seq": self.seq });
        if let Some(delay) = delay {
            nack["delay"] = json!(format!("{}ms", delay.as_millis()));
        }
        self.client.emit("$nack", &nack).await
    }
}

impl Client {
    /// Consumes a durable stream (`$consume`): returns once the hub has accepted,
    /// with the deliveries to come. Kept across reconnects (what was not acknowledged
    /// is delivered again).
    ///
    /// # Errors
    ///
    /// [`ClientError::Hub`] when the hub refuses (`unknown_stream`,
    /// `consumer_mismatch`, `invalid_payload`, ...); otherwise as [`Client::send`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: hubcast::Client) -> Result<(), hubcast::client::ClientError> {
    /// use hubcast::client::ConsumeOptions;
    /// let mut orders = client.consume(ConsumeOptions::new("orders", "drivers")).await?;
    /// while let Some(order) = orders.next().await {
    ///     println!("#{} {}", order.seq, order.event.payload());
    ///     order.ack().await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn consume(&self, options: ConsumeOptions) -> Result<Consumer, ClientError> {
        let (tx, deliveries) = mpsc::channel(options.window());
        let (answer, answered) = oneshot::channel();
        let payload = options.payload();
        self.lock_state().consumers.insert(
            options.consumer.clone(),
            Held {
                payload: payload.clone(),
                deliveries: tx,
                answer: Some(answer),
            },
        );
        if let Err(e) = self.emit("$consume", &payload).await {
            self.lock_state().consumers.remove(&options.consumer);
            return Err(e);
        }
        let pending = answered.await.map_err(|_| ClientError::Closed)??;
        Ok(Consumer {
            name: options.consumer,
            client: self.clone(),
            deliveries,
            pending,
        })
    }
}
