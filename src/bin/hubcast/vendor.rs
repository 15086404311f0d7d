//! `hubcast vendor`: the lab's store. Posts a random order as `pickup` every interval
//! and thanks the driver for each of its orders that is `delivered`.

use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake::faker::address::en::{BuildingNumber, CityName, StateAbbr, StreetName, ZipCode};
use fake::faker::name::en::Name;
use fake::Fake;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::args::parse_positive_duration;
use crate::hub_client::HubAddr;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    hub: HubAddr,
    /// The store's name; the vendor only cares about this store's orders.
    #[arg(long)]
    store: String,
    /// Time between orders (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    interval: Duration,
    /// Send this many orders, then exit once all are delivered.
    #[arg(long, value_parser = parse_count)]
    count: Option<u64>,
    /// With --count: how long to wait for deliveries after the last order is sent.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    timeout: Duration,
    /// Durable orders: each `pickup` carries its orderID as its id and is confirmed
    /// stored in stream `orders` before the next is sent; `delivered` comes through the
    /// durable consumer `vendor-<store>`, so none is missed while the vendor or the
    /// hub is down. An order the hub could not store is sent again (same id) for up
    /// to --timeout. The hub needs `--stream orders=pickup,in-transit,delivered`.
    #[arg(long)]
    durable: bool,
}

/// The stream the durable demo keeps its orders in.
pub const ORDERS: &str = "orders";

/// A count of at least one (`--count 0` would send nothing and exit 0).
fn parse_count(text: &str) -> Result<u64, String> {
    crate::args::parse_positive(text).map(|n| n as u64)
}

/// An order, as the lab's vendor sends it.
#[derive(Serialize, Deserialize, Debug)]
pub struct Order {
    pub store: String,
    #[serde(rename = "orderID")]
    pub order_id: String,
    pub customer: String,
    pub address: String,
}

impl Order {
    fn random(store: &str) -> Order {
        let number: String = BuildingNumber().fake();
        let street: String = StreetName().fake();
        let city: String = CityName().fake();
        let state: String = StateAbbr().fake();
        let zip: String = ZipCode().fake();
        Order {
            store: store.to_string(),
            order_id: uuid::Uuid::new_v4().to_string(),
            customer: Name().fake(),
            address: format!("{number} {street}, {city}, {state} {zip}"),
        }
    }
}

/// Orders sent and not yet delivered.
#[derive(Default)]
struct Outstanding {
    orders: Mutex<HashSet<String>>,
    changed: Notify,
}

impl Outstanding {
    /// An order was sent: it is waited for.
    fn expect(&self, order_id: &str) {
        self.orders.lock().unwrap().insert(order_id.to_owned());
    }

    /// Waits up to `timeout` for every order sent to be delivered, then closes the
    /// client: success, or a line naming the missing orders.
    async fn wait(&self, client: &hubcast::Client, sent: u64, timeout: Duration) -> ExitCode {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let waiting = self.changed.notified();
            let missing: Vec<String> = self.orders.lock().unwrap().iter().cloned().collect();
            if missing.is_empty() {
                client.close().await;
                return ExitCode::SUCCESS;
            }
            if tokio::time::timeout_at(deadline, waiting).await.is_err() {
                report!(
                    "hubcast: error: {} of {sent} orders not delivered within {timeout:?}: {}",
                    missing.len(),
                    missing.join(", ")
                );
                return ExitCode::FAILURE;
            }
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.durable {
        return durable(args).await;
    }
    let outstanding = Arc::new(Outstanding::default());
    let seen = Arc::clone(&outstanding);
    let store = args.store.clone();
    let counting = args.count.is_some();
    // Its own room, and only `delivered`: the driver sends deliveries to the store's room.
    let builder = args
        .hub
        .builder()?
        .join(&args.store)
        .subscribe(&["delivered"]);
    let builder = builder.on("delivered", move |event| {
        let Ok(order) = serde_json::from_str::<Order>(event.payload()) else {
            return;
        };
        if order.store != store {
            return;
        }
        // Thank once per order (a repeated `delivered` is ignored); without --count,
        // thank for any order of this store.
        let ours = seen.orders.lock().unwrap().remove(&order.order_id);
        if ours || !counting {
            let _ = writeln!(
                std::io::stdout(),
                "Thank you for delivering order {}",
                order.order_id
            );
            seen.changed.notify_one();
        }
    });
    let client = args.hub.connect(builder).await?;
    let mut ticker = tokio::time::interval(args.interval);
    let mut sent = 0u64;
    while args.count.is_none_or(|count| sent < count) {
        ticker.tick().await;
        let order = Order::random(&args.store);
        outstanding.expect(&order.order_id);
        client.emit("pickup", &order).await?;
        sent += 1;
    }
    Ok(outstanding.wait(&client, sent, args.timeout).await)
}

/// Thanks for `order` once: says whether it was one to thank for now (an order of
/// this store not thanked before; with --count, one this vendor sent).
fn thank(
    outstanding: &Outstanding,
    thanked: &Mutex<HashSet<String>>,
    order: &Order,
    counting: bool,
) {
    let ours = outstanding.orders.lock().unwrap().remove(&order.order_id);
    let fresh = thanked.lock().unwrap().insert(order.order_id.clone());
    if (ours || !counting) && fresh {
        let _ = writeln!(
            std::io::stdout(),
            "Thank you for delivering order {}",
            order.order_id
        );
        outstanding.changed.notify_one();
    }
}

/// Sends `order` as a `pickup` until the hub confirms it stored. The orderID is the
/// id: a resend (after a reconnect, or after the hub could not store it for a moment,
/// as while a cluster elects a new JetStream leader) is never a second order. Gives up
/// when the hub has not stored it within `patience`.
async fn store_order(
    client: &hubcast::Client,
    order: &Order,
    patience: Duration,
) -> anyhow::Result<hubcast::client::Stored> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match client.emit_with_id("pickup", order, &order.order_id).await {
            Ok(stored) => return Ok(stored),
            // Why was logged as the hub said it.
            Err(hubcast::client::ClientError::Storage(_))
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::info!(order = %order.order_id, "not stored; sending it again in {STORE_RETRY:?}");
                tokio::time::sleep(STORE_RETRY).await;
            }
            Err(e) => anyhow::bail!("order {} was not stored: {e}", order.order_id),
        }
    }
}

/// How long the durable vendor waits before resending an order the hub could not store.
const STORE_RETRY: Duration = Duration::from_millis(500);

/// `hubcast vendor --durable`.
async fn durable(args: Args) -> anyhow::Result<ExitCode> {
    let outstanding = Arc::new(Outstanding::default());
    let counting = args.count.is_some();
    let client = args.hub.connect(args.hub.builder()?).await?;
    let options = hubcast::client::ConsumeOptions::new(ORDERS, &format!("vendor-{}", args.store))
        .filter("delivered")
        .room(&args.store);
    let mut delivered = match client.consume(options).await {
        Ok(consumer) => consumer,
        Err(hubcast::client::ClientError::Hub(refused)) => anyhow::bail!(
            "the hub refused the durable vendor ({}); start it with --stream {ORDERS}=pickup,in-transit,delivered",
            refused.message
        ),
        Err(e) => return Err(e.into()),
    };
    let seen = Arc::clone(&outstanding);
    let store = args.store.clone();
    tokio::spawn(async move {
        let thanked = Mutex::new(HashSet::new());
        while let Some(message) = delivered.next().await {
            if let Ok(order) = serde_json::from_str::<Order>(message.event.payload()) {
                if order.store == store {
                    thank(&seen, &thanked, &order, counting);
                }
            }
            // Thanked (or not ours): done with it either way.
            if message.ack().await.is_err() {
                break;
            }
        }
    });
    let mut ticker = tokio::time::interval(args.interval);
    let mut sent = 0u64;
    while args.count.is_none_or(|count| sent < count) {
        ticker.tick().await;
        let order = Order::random(&args.store);
        outstanding.expect(&order.order_id);
        let stored = store_order(&client, &order, args.timeout).await?;
        tracing::info!(
            order = %order.order_id,
            seq = ?stored.seq,
            "order stored"
        );
        sent += 1;
    }
    if counting {
        tracing::info!(orders = sent, "all orders stored");
    }
    Ok(outstanding.wait(&client, sent, args.timeout).await)
}
