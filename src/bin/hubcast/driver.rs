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
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let builder = args.hub.builder();
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
    if let Err(e) = try_deliver(&client, &pickup, pickup_delay, deliver_delay).await {
        tracing::warn!("order not delivered: {e:#}");
    }
}

async fn try_deliver(
    client: &Client,
    pickup: &Event,
    pickup_delay: Duration,
    deliver_delay: Duration,
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
