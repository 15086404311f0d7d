//! `hubcast driver`: the lab's driver. On each `pickup` it waits, announces
//! `in-transit`, waits again, and announces `delivered`, many orders at once.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use hubcast::client::{Client, ClientEvent};
use hubcast::Event;
use serde_json::value::RawValue;

use crate::args::parse_duration;
use crate::hub_client::HubAddr;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    hub: HubAddr,
    /// Time from hearing a pickup to picking it up.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pickup_delay: Duration,
    /// Time from picking an order up to delivering it.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    deliver_delay: Duration,
    /// Take orders from stream `orders` as a member of the work queue `drivers`: each
    /// order goes to one driver, and is acknowledged only once its `delivered` is
    /// confirmed stored (a driver that dies leaves its orders to the others).
    #[arg(long)]
    durable: bool,
    /// With --durable: the most orders this driver carries at once.
    #[arg(long, default_value_t = 100, requires = "durable", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    capacity: u32,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.durable {
        return durable(args).await;
    }
    let builder = args.hub.builder()?;
    let mut events = builder.events();
    let client = args.hub.connect(builder).await?;
    while let Some(next) = events.next().await {
        let ClientEvent::Event(event) = next else {
            continue;
        };
        if event.name().as_str() == "pickup" {
            // Each order on its own timer.
            tokio::spawn(deliver(
                client.clone(),
                event,
                args.pickup_delay,
                args.deliver_delay,
            ));
        }
    }
    anyhow::bail!("lost the connection to the hub at {}", args.hub.addr())
}

async fn deliver(client: Client, pickup: Event, pickup_delay: Duration, deliver_delay: Duration) {
    if let Err(e) = try_deliver(&client, &pickup, pickup_delay, deliver_delay, false).await {
        tracing::warn!("order not delivered: {e:#}");
    }
}

/// `hubcast driver --durable`.
async fn durable(args: Args) -> anyhow::Result<ExitCode> {
    let client = args.hub.connect(args.hub.builder()?).await?;
    // Longer than a delivery takes, so a slow one is not given to a second driver.
    let ack_wait = (args.pickup_delay + args.deliver_delay) * 2 + Duration::from_secs(10);
    let options = hubcast::client::ConsumeOptions::new(crate::vendor::ORDERS, "drivers")
        .filter("pickup")
        .max_in_flight(args.capacity)
        .ack_wait(ack_wait);
    let mut orders = match client.consume(options).await {
        Ok(consumer) => consumer,
        // A work queue made with other settings: join it as it is.
        Err(hubcast::client::ClientError::Hub(refused))
            if refused.code == hubcast::ErrorCode::ConsumerMismatch =>
        {
            let plain = hubcast::client::ConsumeOptions::new(crate::vendor::ORDERS, "drivers");
            client.consume(plain).await?
        }
        Err(hubcast::client::ClientError::Hub(refused)) => anyhow::bail!(
            "the hub refused the durable driver ({}); start it with --stream {}=pickup,in-transit,delivered",
            refused.message,
            crate::vendor::ORDERS
        ),
        Err(e) => return Err(e.into()),
    };
    while let Some(order) = orders.next().await {
        let client = client.clone();
        let (pickup_delay, deliver_delay) = (args.pickup_delay, args.deliver_delay);
        tokio::spawn(async move {
            if order.attempt > 1 {
                tracing::info!(seq = order.seq, attempt = order.attempt, "an order again");
            }
            match try_deliver(&client, &order.event, pickup_delay, deliver_delay, true).await {
                // Done only once `delivered` is stored: a crash before this leaves the
                // order to another driver.
                Ok(()) => {
                    let _ = order.ack().await;
                }
                Err(e) => {
                    tracing::warn!("order not delivered, given back: {e:#}");
                    let _ = order.nack(Some(Duration::from_secs(1))).await;
                }
            }
        });
    }
    anyhow::bail!("lost the connection to the hub at {}", args.hub.addr())
}

async fn try_deliver(
    client: &Client,
    pickup: &Event,
    pickup_delay: Duration,
    deliver_delay: Duration,
    confirmed: bool,
) -> anyhow::Result<()> {
    let order = serde_json::from_str::<serde_json::Value>(pickup.payload())?;
    // Updates go to the store's room: only that store's vendor hears them.
    let store = order
        .get("store")
        .and_then(|s| s.as_str())
        .map(str::to_string);
    let order_id = order
        .get("orderID")
        .map(|id| {
            id.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| id.to_string())
        })
        .unwrap_or_else(|| "(no orderID)".to_string());
    // The same payload, byte for byte, travels on with each announcement.
    let payload = RawValue::from_string(pickup.payload().to_string())?;
    tokio::time::sleep(pickup_delay).await;
    writeln!(std::io::stdout(), "DRIVER: picked up {order_id}")?;
    announce(client, store.as_deref(), "in-transit", &payload).await?;
    tokio::time::sleep(deliver_delay).await;
    writeln!(std::io::stdout(), "DRIVER: delivered {order_id}")?;
    if confirmed {
        // Stored before the order counts as done; the id makes a retry a duplicate.
        let id = format!("delivered-{order_id}");
        match store
            .as_deref()
            .filter(|s| hubcast::RoomName::new(*s).is_ok())
        {
            Some(store) => {
                client
                    .emit_to_with_id(store, "delivered", &payload, &id)
                    .await?
            }
            None => client.emit_with_id("delivered", &payload, &id).await?,
        };
        return Ok(());
    }
    announce(client, store.as_deref(), "delivered", &payload).await?;
    Ok(())
}

/// Sends to the store's room when the order names a store, else to everyone.
async fn announce(
    client: &Client,
    store: Option<&str>,
    name: &str,
    payload: &RawValue,
) -> anyhow::Result<()> {
    match store.filter(|s| hubcast::RoomName::new(*s).is_ok()) {
        Some(store) => client.emit_to(store, name, payload).await?,
        None => client.emit(name, payload).await?,
    }
    Ok(())
}
