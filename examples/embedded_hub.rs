//! A hub embedded in another program: it watches the hub's lifecycle events, greets
//! each client as it connects (the Node class's `socket.write(...)` on `'connection'`),
//! and announces the time to everyone every few seconds, through the same bounded
//! queues the hub uses for client events.
//!
//! Run: `cargo run --example embedded_hub`, then `nc 127.0.0.1 3000` in another terminal.
//! Stop with Ctrl-C.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hubcast::{Config, Event, Hub, HubEvent, Server};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    // The observer runs on the hub's own tasks, so it only forwards what we care about.
    let (joined_tx, mut joined) = mpsc::unbounded_channel();
    let hub = Hub::with_observer(Config::default(), move |event| match event {
        HubEvent::Listening { addr } => println!("listening on {addr}"),
        HubEvent::Connection { client, peer } => {
            println!("connection: {client} from {peer}");
            let _ = joined_tx.send(*client);
        }
        HubEvent::Event { client, event, .. } => {
            println!("event {} from {client}: {}", event.name(), event.payload())
        }
        HubEvent::Close {
            client, had_error, ..
        } => println!("close: {client} (had_error: {had_error})"),
        HubEvent::Error { message } => eprintln!("error: {message}"),
        _ => {}
    });

    let server = Server::bind("127.0.0.1:3000", hub.clone()).await?;
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.run(shutdown.clone()));

    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            Some(client) = joined.recv() => {
                let greeting = Event::new("greeting", &json!({ "text": "Welcome to the hub!", "you": client.0 }))
                    .expect("a valid event");
                if let Err(err) = hub.send_to(client, &greeting) {
                    eprintln!("could not greet {client}: {err}");
                }
            }
            _ = ticker.tick() => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                let tick = Event::new("clock", &json!({ "unix": now.as_secs() })).expect("a valid event");
                let reached = hub.broadcast(&tick);
                println!("clock sent to {reached} client(s)");
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    shutdown.cancel();
    serving.await.expect("the server task panicked");
    Ok(())
}
