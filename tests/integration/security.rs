//! Issue #13: authentication, permissions, JWTs, reload and brute-force backoff, over
//! real sockets. Every denial is checked both ways: the `$error`, and that a listener
//! with full rights saw nothing of what was denied.

use std::time::Duration;

use hubcast::auth::{AuthFile, Authenticator, JwtKey, PermissionSpec, RuleSpec, TokenHash};
use hubcast::Config;
use serde_json::{json, Value};

use crate::support::{event, within, TestClient, TestHub};

/// Users: `admin` (everything), `vendor-acme` (the example), `driver`
/// (everything but `secret.>`), each with the token `<name>-token`.
fn auth_file() -> AuthFile {
    let user = |name: &str, extra: &str| {
        format!(
            "[[users]]\nname = \"{name}\"\ntoken_hash = \"{}\"\n{extra}\n",
            TokenHash::new(format!("{name}-token").as_bytes())
        )
    };
    let text = [
        user(
            "admin",
            "publish = { allow = [\">\"] }\nsubscribe = { allow = [\">\"] }\nrooms = { allow = [\">\"] }\nconsume = { allow = [\">\"] }\nadmin = true",
        ),
        user(
            "vendor-acme",
            "publish = { allow = [\"pickup\"], deny = [] }\nsubscribe = { allow = [\"delivered\"] }\nrooms = { allow = [\"acme\"] }\nconsume = { allow = [\"orders/{user}\"] }",
        ),
        user(
            "driver",
            "publish = { allow = [\">\"] }\nsubscribe = { allow = [\">\"], deny = [\"secret.>\"] }\nrooms = { allow = [\"room.{user}\"] }",
        ),
    ]
    .concat();
    toml::from_str(&text).unwrap()
}

async fn secured(config: Config) -> TestHub {
    let hub = TestHub::start(config).await;
    hub.hub
        .set_authenticator(Authenticator::from_spec(&auth_file(), None).unwrap());
    hub
}

/// Connects and authenticates as `user` (token `<user>-token`); returns the client
/// and its `$welcome`.
async fn login(hub: &TestHub, user: &str) -> (TestClient, Value) {
    let mut client = hub.connect().await;
    let welcome = hello(
        &mut client,
        json!({"user": user, "token": format!("{user}-token")}),
    )
    .await;
    (client, welcome)
}

async fn hello(client: &mut TestClient, payload: Value) -> Value {
    client.send(event("$hello", payload) + "\n").await;
    let welcome = client.json().await;
    assert_eq!(welcome["event"], "$welcome", "{welcome}");
    welcome
}

/// Sends a marker event (named `name`, which `client` may hear) from `admin` and
/// returns every line `client` got before it.
async fn until_marker(admin: &mut TestClient, client: &mut TestClient) -> Vec<Value> {
    until_named_marker(admin, client, "marker").await
}

async fn until_named_marker(
    admin: &mut TestClient,
    client: &mut TestClient,
    name: &str,
) -> Vec<Value> {
    admin.send(event(name, json!("MARK")) + "\n").await;
    let mut seen = Vec::new();
    loop {
        let frame = client.json().await;
        if frame["event"] == name && frame["payload"] == "MARK" {
            return seen;
        }
        seen.push(frame);
    }
}

#[tokio::test]
async fn a_first_frame_other_than_hello_is_refused_and_nothing_leaks() {
    let hub = secured(Config::default()).await;
    let (mut admin, _) = login(&hub, "admin").await;
    let mut stranger = hub.connect().await;
    stranger
        .send(event("pickup", json!({"orderID": 1})) + "\n")
        .await;
    stranger.expect_error("auth_required").await;
    stranger.expect_eof().await;
    // Nor does a stranger hear anything before it authenticates.
    let mut quiet = hub.connect().await;
    admin.send(event("pickup", json!(2)) + "\n").await;
    assert_eq!(admin.json().await["payload"], 2);
    let seen = until_marker(&mut admin, &mut admin_listener(&hub).await).await;
    assert!(seen.is_empty(), "{seen:?}");
    quiet.send(event("$hello", json!({})) + "\n").await;
    quiet.expect_error("auth_required").await;
    quiet.expect_eof().await;
    assert_eq!(hub.hub.stats().events, 2, "only the admin's events went in");
}

async fn admin_listener(hub: &TestHub) -> TestClient {
    login(hub, "admin").await.0
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_closed() {
    let hub = secured(Config::default()).await;
    for payload in [
        json!({"user": "admin", "token": "nope"}),
        json!({"user": "nobody", "token": "admin-token"}),
        json!({"token": "nope"}),
    ] {
        let mut client = hub.connect().await;
        client.send(event("$hello", payload) + "\n").await;
        let message = client.expect_error("auth_failed").await;
        assert!(!message.contains("admin-token"), "{message}");
        client.expect_eof().await;
    }
}

#[tokio::test]
async fn no_hello_within_the_auth_timeout_closes() {
    let config = Config::builder()
        .auth_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let hub = secured(config).await;
    let mut client = hub.connect().await;
    client.expect_error("auth_timeout").await;
    client.expect_eof().await;
}

#[tokio::test]
async fn welcome_names_the_identity_and_a_token_alone_says_who() {
    let hub = secured(Config::default()).await;
    let (_, welcome) = login(&hub, "vendor-acme").await;
    assert_eq!(welcome["payload"]["user"], "vendor-acme");
    assert_eq!(welcome["payload"]["auth"], "token");
    let mut client = hub.connect().await;
    let welcome = hello(&mut client, json!({"token": "admin-token"})).await;
    assert_eq!(welcome["payload"]["user"], "admin");
    assert_eq!(welcome["payload"]["admin"], true);
}

#[tokio::test]
async fn denied_publishes_are_answered_and_never_forwarded() {
    let hub = secured(Config::default()).await;
    let (mut admin, _) = login(&hub, "admin").await;
    let (mut vendor, _) = login(&hub, "vendor-acme").await;
    // One write: a run of plain events with one denied among allowed ones.
    vendor
        .send(
            [
                event("pickup", json!(1)),
                event("delivered", json!("forged")),
                event("pickup", json!(2)),
            ]
            .join("\n")
                + "\n",
        )
        .await;
    let message = vendor.expect_error("permission_denied").await;
    assert!(message.contains("delivered"), "{message}");
    // To a room it may not send to, and to one it may.
    vendor
        .send(json!({"event": "pickup", "payload": 3, "room": "other"}).to_string() + "\n")
        .await;
    let message = vendor.expect_error("permission_denied").await;
    assert!(message.contains("other"), "{message}");
    let seen = until_marker(&mut admin, &mut admin_listener(&hub).await).await;
    assert!(seen.is_empty());
    let heard: Vec<Value> = [admin.json().await, admin.json().await]
        .into_iter()
        .map(|f| f["payload"].clone())
        .collect();
    assert_eq!(heard, [json!(1), json!(2)]);
    // The connection stays.
    vendor
        .send(event("$ping", json!("still here")) + "\n")
        .await;
    assert_eq!(vendor.json().await["event"], "$pong");
}

#[tokio::test]
async fn a_client_that_never_subscribes_hears_only_what_it_may() {
    let hub = secured(Config::default()).await;
    let (mut admin, _) = login(&hub, "admin").await;
    let (mut vendor, _) = login(&hub, "vendor-acme").await;
    let (mut driver, _) = login(&hub, "driver").await;
    for name in ["pickup", "delivered", "secret.plans", "in-transit"] {
        admin.send(event(name, json!(name)) + "\n").await;
    }
    let names = |frames: Vec<Value>| -> Vec<String> {
        frames
            .iter()
            .map(|f| f["event"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(until_named_marker(&mut admin, &mut vendor, "delivered").await),
        ["delivered"]
    );
    // Deny wins over allow.
    // (The vendor's marker was a `delivered` too.)
    assert_eq!(
        names(until_marker(&mut admin, &mut driver).await),
        ["pickup", "delivered", "in-transit", "delivered"]
    );
}

#[tokio::test]
async fn subscriptions_rooms_and_consumers_beyond_the_rules_are_denied() {
    let hub = secured(Config::default()).await;
    let (mut admin, _) = login(&hub, "admin").await;
    let (mut driver, _) = login(&hub, "driver").await;
    // `>` could match secret.x; `secret.*` is denied outright.
    for pattern in [">", "secret.*", "*.plans"] {
        driver
            .send(event("$subscribe", json!({"events": [pattern]})) + "\n")
            .await;
        let message = driver.expect_error("permission_denied").await;
        assert!(message.contains(pattern), "{message}");
    }
    driver
        .send(event("$subscribe", json!({"events": ["order.*"]})) + "\n")
        .await;
    assert_eq!(driver.json().await["event"], "$subscribed");
    driver
        .send(event("$join", json!({"room": "room.other"})) + "\n")
        .await;
    driver.expect_error("permission_denied").await;
    driver
        .send(event("$join", json!({"room": "room.driver"})) + "\n")
        .await;
    assert_eq!(driver.json().await["event"], "$joined");
    // A room event to room.other reaches nobody there through the driver.
    admin
        .send(json!({"event": "order.x", "payload": 1, "room": "room.other"}).to_string() + "\n")
        .await;
    admin.send(event("order.y", json!(2)) + "\n").await;
    let seen = until_named_marker(&mut admin, &mut driver, "order.marker").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["event"], "order.y");
}

#[tokio::test]
async fn consumers_are_permitted_by_stream_and_name() {
    let dir = tempfile_dir();
    let config = Config::builder()
        .streams(vec![hubcast::StreamSpec::new("orders", &["pickup"])])
        .data_dir(dir.clone())
        .build()
        .unwrap();
    let hub = secured(config).await;
    let (mut vendor, _) = login(&hub, "vendor-acme").await;
    vendor
        .send(
            event(
                "$consume",
                json!({"stream": "orders", "consumer": "drivers"}),
            ) + "\n",
        )
        .await;
    let frame = vendor.json().await;
    assert_eq!(frame["payload"]["code"], "permission_denied", "{frame}");
    assert_eq!(frame["payload"]["consumer"], "drivers");
    vendor
        .send(
            event(
                "$consume",
                json!({"stream": "orders", "consumer": "vendor-acme"}),
            ) + "\n",
        )
        .await;
    let frame = vendor.json().await;
    assert_eq!(frame["event"], "$consuming", "{frame}");
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "hubcast-security-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ))
}

fn jwt_secret() -> (std::path::PathBuf, JwtKey) {
    let path = tempfile_dir().with_extension("secret");
    std::fs::write(&path, "an HS256 secret of at least 32 bytes, for tests\n").unwrap();
    let key = JwtKey::load(&path).unwrap();
    (path, key)
}

fn mint(key: &std::path::Path, sub: &str, ttl: Duration, spec: &PermissionSpec) -> String {
    hubcast::auth::mint_token(key, sub, Some(ttl), spec).unwrap()
}

fn may_publish(patterns: &[&str]) -> PermissionSpec {
    PermissionSpec {
        publish: Some(RuleSpec {
            allow: patterns.iter().map(|p| p.to_string()).collect(),
            deny: vec![],
        }),
        subscribe: Some(RuleSpec {
            allow: vec![">".into()],
            deny: vec![],
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn jwts_carry_identity_and_permissions_and_expire() {
    let (path, key) = jwt_secret();
    let hub = TestHub::start(Config::default()).await;
    hub.hub
        .set_authenticator(Authenticator::from_spec(&AuthFile::default(), Some(key)).unwrap());
    let token = mint(
        &path,
        "alice",
        Duration::from_secs(600),
        &may_publish(&["chat.{user}"]),
    );
    let mut alice = hub.connect().await;
    let welcome = hello(&mut alice, json!({"token": token})).await;
    assert_eq!(welcome["payload"]["user"], "alice");
    assert_eq!(welcome["payload"]["auth"], "jwt");
    alice.send(event("chat.bob", json!(1)) + "\n").await;
    alice.expect_error("permission_denied").await;
    alice.send(event("chat.alice", json!(2)) + "\n").await;
    assert_eq!(alice.json().await["payload"], 2);

    // A token for someone else, or forged, is refused.
    let mut mallory = hub.connect().await;
    let mut forged = mint(
        &path,
        "mallory",
        Duration::from_secs(600),
        &may_publish(&[">"]),
    );
    forged.replace_range(forged.len() - 3.., "AAA");
    mallory
        .send(event("$hello", json!({"token": forged})) + "\n")
        .await;
    mallory.expect_error("auth_failed").await;
    mallory.expect_eof().await;

    // A token that expires while connected closes the connection, within 1 s of exp.
    let short = mint(&path, "carol", Duration::from_secs(1), &may_publish(&[">"]));
    let mut carol = hub.connect().await;
    let welcome = hello(&mut carol, json!({"token": short})).await;
    let exp = welcome["payload"]["expires"].as_u64().unwrap();
    carol.expect_error("token_expired").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        now < exp as f64 + 1.0 + 0.5,
        "closed {}s after exp",
        now - exp as f64
    );
    carol.expect_eof().await;

    // A fresh token sent in time keeps it open.
    let short = mint(&path, "dave", Duration::from_secs(1), &may_publish(&[">"]));
    let mut dave = hub.connect().await;
    hello(&mut dave, json!({"token": short})).await;
    let fresh = mint(
        &path,
        "dave",
        Duration::from_secs(600),
        &may_publish(&[">"]),
    );
    hello(&mut dave, json!({"token": fresh})).await;
    // Another identity on the same connection is refused.
    let eve = mint(&path, "eve", Duration::from_secs(600), &may_publish(&[">"]));
    // (Checked on a second connection of dave's, to keep this one.)
    let mut dave2 = hub.connect().await;
    hello(
        &mut dave2,
        json!({"token": mint(&path, "dave", Duration::from_secs(600), &may_publish(&[">"]))}),
    )
    .await;
    dave2
        .send(event("$hello", json!({"token": eve})) + "\n")
        .await;
    dave2.expect_error("auth_failed").await;
    // Past the first token's expiry, dave is still here.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    dave.send(event("$ping", json!(null)) + "\n").await;
    assert_eq!(dave.json().await["event"], "$pong");
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn a_reload_closes_removed_identities_and_narrows_the_others() {
    let hub = secured(Config::default()).await;
    let (mut admin, _) = login(&hub, "admin").await;
    let (mut vendor, _) = login(&hub, "vendor-acme").await;
    let (mut driver, _) = login(&hub, "driver").await;
    driver
        .send(event("$subscribe", json!({"events": ["order.*", "pickup"]})) + "\n")
        .await;
    assert_eq!(driver.json().await["event"], "$subscribed");
    // The new file: vendor-acme removed; driver may hear pickup only.
    let mut spec = auth_file();
    spec.users.retain(|u| u.name != "vendor-acme");
    for user in &mut spec.users {
        if user.name == "driver" {
            user.permissions.subscribe = Some(RuleSpec {
                allow: vec!["pickup".into()],
                deny: vec![],
            });
        }
    }
    let closed = hub
        .hub
        .set_authenticator(Authenticator::from_spec(&spec, None).unwrap());
    assert_eq!(closed, 1);
    vendor.expect_error("auth_revoked").await;
    vendor.expect_eof().await;
    let message = driver.expect_error("permission_denied").await;
    assert!(message.contains("order.*"), "{message}");
    admin.send(event("order.x", json!(1)) + "\n").await;
    admin.send(event("pickup", json!(2)) + "\n").await;
    let seen = until_named_marker(&mut admin, &mut driver, "pickup").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["event"], "pickup");
}

#[tokio::test]
async fn wrong_tokens_slow_their_address_down_and_no_one_else() {
    let hub = secured(Config::default()).await;
    let bad = std::net::Ipv4Addr::new(127, 0, 0, 1);
    // Six failures: the next attempt from that address waits 50 ms · 2^5 = 1.6 s.
    let started = std::time::Instant::now();
    for _ in 0..6 {
        let mut client = hub.connect_from(bad).await;
        client
            .send(event("$hello", json!({"user": "admin", "token": "guess"})) + "\n")
            .await;
        client.expect_error("auth_failed").await;
        client.expect_eof().await;
    }
    // The waits so far: 50 + 100 + 200 + 400 + 800 ms after the first failure.
    let failing = started.elapsed();
    assert!(failing >= Duration::from_millis(1550), "{failing:?}");
    // The next attempt from that address is read only after its wait; meanwhile
    // another address is served at once.
    let addr = hub.addr;
    let penalised = tokio::spawn(async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(
                (event("$hello", json!({"user": "admin", "token": "admin-token"})) + "\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = within(stream.read(&mut buf)).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    });
    let mut other = hub
        .connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2))
        .await;
    let welcome = hello(
        &mut other,
        json!({"user": "driver", "token": "driver-token"}),
    )
    .await;
    assert_eq!(welcome["payload"]["user"], "driver");
    assert!(
        !penalised.is_finished(),
        "the penalised address was served first"
    );
    // A right token from the penalised address is still accepted once its turn comes.
    let answer = penalised.await.unwrap();
    assert!(answer.contains("$welcome"), "{answer}");
}

/// One write from a publisher is a run of events routed as a whole; a client whose
/// rules deny some of them gets the others, in order, and one that may hear them all
/// gets the run whole.
#[tokio::test]
async fn a_run_with_denied_events_reaches_guarded_clients_in_part() {
    let hub = secured(Config::default()).await;
    let (mut admin, _) = login(&hub, "admin").await;
    let (mut driver, _) = login(&hub, "driver").await;
    let (mut vendor, _) = login(&hub, "vendor-acme").await;
    let run: String = ["a", "secret.x", "b", "secret.y", "delivered"]
        .iter()
        .map(|name| event(name, json!(name)) + "\n")
        .collect();
    admin.send(run).await;
    let driver_heard: Vec<Value> = until_marker(&mut admin, &mut driver)
        .await
        .into_iter()
        .map(|f| f["payload"].clone())
        .collect();
    assert_eq!(driver_heard, [json!("a"), json!("b"), json!("delivered")]);
    let vendor_heard = until_named_marker(&mut admin, &mut vendor, "delivered").await;
    assert_eq!(vendor_heard.len(), 1, "{vendor_heard:?}");
    assert_eq!(vendor_heard[0]["payload"], "delivered");
    assert_eq!(hub.hub.stats().events, 7);
}

/// Bad `$hello`s to a hub that requires a token: wrong types, a huge token, escapes,
/// a user that does not exist: each a clear `$error` and a close, never a panic, and
/// the hub serves the next client.
#[tokio::test]
async fn malformed_credentials_are_refused_clearly() {
    let hub = secured(Config::default()).await;
    for (payload, code) in [
        (json!({"token": 123}), "auth_required"),
        (
            json!({"user": ["admin"], "token": "admin-token"}),
            "auth_required",
        ),
        (json!("admin-token"), "auth_required"),
        (json!(null), "auth_required"),
        (json!({"token": "x".repeat(100_000)}), "auth_failed"),
        (
            json!({"user": "adm\u{0}in", "token": "admin-token"}),
            "auth_failed",
        ),
        (
            json!({"user": "admin", "token": "admin-token\n"}),
            "auth_failed",
        ),
        (json!({"token": "eyJ.eyJ.sig"}), "auth_failed"),
    ] {
        let mut client = hub.connect().await;
        client.send(event("$hello", payload.clone()) + "\n").await;
        let frame = client.json().await;
        assert_eq!(frame["payload"]["code"], code, "{payload:.80}: {frame}");
        client.expect_eof().await;
    }
    let (_, welcome) = login(&hub, "admin").await;
    assert_eq!(welcome["payload"]["user"], "admin");
}
