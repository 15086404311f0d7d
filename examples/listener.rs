//! A minimal listener in the Node class's style: `on(event, handler)` for the events it
//! cares about, plus a look at the connection's lifecycle.
//!
//! Run a hub (`cargo run -- serve`), then: `cargo run --example listener`. Stop with Ctrl-C.

use hubcast::client::{Client, ClientEvent, Reconnect};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::builder()
        // Like `socket.on('connect' | 'close' | ...)`.
        .on_any(|event| match event {
            ClientEvent::Connect { addr } => println!("connected to {addr}"),
            ClientEvent::Close { had_error } => println!("closed (had_error: {had_error})"),
            ClientEvent::HubError(error) => println!("the hub says: {error}"),
            _ => {}
        })
        .reconnect(Reconnect::default())
        .connect("127.0.0.1:3000")
        .await?;
    // Like `socket.on('data', ...)`, for one event name.
    client.on("pickup", |event| println!("pickup: {}", event.payload()));
    tokio::signal::ctrl_c().await?;
    client.close().await;
    Ok(())
}
