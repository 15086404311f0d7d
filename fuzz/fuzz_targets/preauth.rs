//! Fuzzes the state before (and just after) authentication: arbitrary bytes on a
//! connection to a hub that requires a token, possibly with a valid `$hello` somewhere
//! in them. Never a panic, and never an event forwarded from the connection before the
//! hub reported it authenticated.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubcast::auth::{AuthFile, Authenticator, TokenHash};
use hubcast::{Config, Hub, HubEvent};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The valid credentials a input may carry (the seeds do; the fuzzer splices them).
const HELLO: &[u8] = b"{\"event\":\"$hello\",\"payload\":{\"user\":\"u\",\"token\":\"t0ken\"}}\n";

fuzz_target!(|data: &[u8]| {
    // The first byte: where in the input a valid `$hello` is spliced (255: nowhere).
    let Some((&at, data)) = data.split_first() else {
        return;
    };
    let mut input = data.to_vec();
    if at != 255 {
        let at = usize::from(at).min(input.len());
        input.splice(at..at, HELLO.iter().copied());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    runtime.block_on(run(input));
});

/// What the observer saw, in order: `true` for an event forwarded, `false` for the
/// authentication.
type Seen = Arc<Mutex<Vec<bool>>>;

async fn run(input: Vec<u8>) {
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    let config = Config::builder()
        .max_frame(4096)
        .max_pending(64 * 1024)
        .max_inbound_memory(64 * 1024)
        .auth_timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let hub = Hub::with_observer(config, move |event| match event {
        HubEvent::Event { .. } => log.lock().unwrap().push(true),
        HubEvent::Authenticated { .. } => log.lock().unwrap().push(false),
        _ => {}
    });
    let file: AuthFile = toml_file();
    hub.set_authenticator(Authenticator::from_spec(&file, None).unwrap());
    let (mut ours, theirs) = tokio::io::duplex(1 << 16);
    let task = tokio::spawn(hubcast::serve_connection(
        hub.clone(),
        theirs,
        "10.0.0.1:1".parse().unwrap(),
    ));
    let writer = async {
        let _ = ours.write_all(&input).await;
        let _ = ours.shutdown().await;
        let mut sink = Vec::new();
        let _ = ours.read_to_end(&mut sink).await;
    };
    // Paused time: the auth timeout and any backoff pass at once when idle.
    let _ = tokio::time::timeout(Duration::from_secs(60), writer).await;
    let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    let seen = seen.lock().unwrap();
    let authenticated = seen.iter().position(|&e| !e);
    if let Some(first_event) = seen.iter().position(|&e| e) {
        assert!(
            authenticated.is_some_and(|a| a < first_event),
            "an event was forwarded before authentication: {seen:?}"
        );
    }
}

fn toml_file() -> AuthFile {
    let hash = TokenHash::new(b"t0ken");
    let mut file = AuthFile::default();
    file.users.push(hubcast::auth::UserSpec {
        name: "u".into(),
        token_hash: Some(hash.to_string()),
        permissions: hubcast::auth::PermissionSpec::everything(),
    });
    file
}
