//! A minimal publisher: sends a few `pickup` orders to the hub, then closes.
//!
//! Run a hub (`cargo run -- serve`) and a listener (`cargo run --example listener`),
//! then: `cargo run --example publisher`.

use hubcast::client::Client;
use serde::Serialize;

#[derive(Serialize)]
struct Order<'a> {
    store: &'a str,
    #[serde(rename = "orderID")]
    order_id: u32,
    customer: &'a str,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::connect("127.0.0.1:3000").await?;
    for order_id in 1..=3 {
        let order = Order {
            store: "acme",
            order_id,
            customer: "Ann",
        };
        // Returns once the event is written to the socket.
        client.emit("pickup", &order).await?;
        println!("sent order {order_id}");
    }
    // Flushes, then waits for the hub to close its side: everything was received.
    client.close().await;
    Ok(())
}
