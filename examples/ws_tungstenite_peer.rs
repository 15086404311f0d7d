//! The reference the WebSocket gateway's design was measured against (issue #14): an
//! echo server on tokio-tungstenite's own `WebSocketStream`, with its default settings
//! and mimalloc as hubcast uses, one task per connection waiting on `next()`.
//! `scripts/compare-ws` opens 10,000 idle connections to it, as to the hub's `/ws`, and
//! compares memory per connection.
//!
//! `cargo run --release --example ws_tungstenite_peer -- PORT`

use futures_util::{SinkExt, StreamExt};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                if message.is_text() && ws.send(message).await.is_err() {
                    break;
                }
            }
        });
    }
}
