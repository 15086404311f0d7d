//! Issue #13 through the binary: protected mode, `hubcast auth hash`, `hubcast token`,
//! the client subcommands' `--token`, and SIGHUP reloading the auth file.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use crate::support::{within, HubProcess};

async fn run(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubcast"))
        .args(args)
        .env_remove("PORT")
        .env_remove("HUBCAST_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    within(child.wait_with_output()).await.unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn protected_mode_refuses_to_listen_beyond_loopback_without_auth() {
    // Refused before anything listens: exit 2, one line naming --insecure.
    let out = run(&["serve", "--host", "0.0.0.0", "--port", "0"], "").await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains("protected mode"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[tokio::test]
async fn auth_hash_reads_stdin_without_its_newline_and_refuses_nothing() {
    let out = run(&["auth", "hash"], "s3cret\n").await;
    assert!(out.status.success());
    let hash = text(&out.stdout).trim().to_string();
    let parsed = hubcast::auth::TokenHash::parse(&hash).unwrap();
    assert!(parsed.verify(b"s3cret"));
    let out = run(&["auth", "hash"], "").await;
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["auth", "hash", "--new"], "").await;
    let printed = text(&out.stdout);
    let token = printed
        .lines()
        .next()
        .unwrap()
        .strip_prefix("token: ")
        .unwrap();
    let hash = printed
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("token_hash: ")
        .unwrap();
    assert!(hubcast::auth::TokenHash::parse(hash)
        .unwrap()
        .verify(token.as_bytes()));
}

/// The README's secured demo, end to end: an auth file made with `auth hash`, a hub
/// with --auth, `sub` and `pub` with --token; a denied publish is reported by `pub`;
/// SIGHUP with a user removed closes its connection.
#[tokio::test]
async fn clients_authenticate_with_token_and_sighup_reloads_the_file() {
    let dir = std::env::temp_dir().join(format!("hubcast-auth-cli-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let hash = |secret: &str| hubcast::auth::TokenHash::new(secret.as_bytes()).to_string();
    let file = dir.join("auth.toml");
    let listener = format!(
        "[[users]]\nname = \"listener\"\ntoken_hash = \"{}\"\nsubscribe = {{ allow = [\">\"] }}\n",
        hash("listen")
    );
    let vendor = format!(
        "[[users]]\nname = \"vendor\"\ntoken_hash = \"{}\"\npublish = {{ allow = [\"pickup\"] }}\n",
        hash("vend")
    );
    std::fs::write(&file, format!("{listener}{vendor}")).unwrap();
    let mut hub = HubProcess::spawn(HubProcess::command(&[
        "serve",
        "--port",
        "0",
        "--auth",
        file.to_str().unwrap(),
    ]))
    .await;
    let port = hub.port.to_string();
    let sub = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubcast"))
        .args([
            "sub",
            "--port",
            &port,
            "--token",
            "listen",
            "--no-reconnect",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    hub.wait_log("authenticated", 1).await;
    let out = run(
        &[
            "pub",
            "--port",
            &port,
            "--user",
            "vendor",
            "--token",
            "vend",
            "pickup",
            "{\"orderID\":7}",
        ],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(
        &["pub", "--port", &port, "--token", "vend", "delivered", "1"],
        "",
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(stderr.contains("permission_denied"), "{stderr}");
    let out = run(
        &["pub", "--port", &port, "--token", "wrong", "pickup", "1"],
        "",
    )
    .await;
    assert!(
        text(&out.stderr).contains("auth_failed"),
        "{}",
        text(&out.stderr)
    );

    // The listener is removed: SIGHUP closes its connection (`sub` ends).
    std::fs::write(&file, &vendor).unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &hub.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    hub.wait_log("auth settings reloaded", 1).await;
    let output = within(sub.wait_with_output()).await.unwrap();
    let printed = text(&output.stdout);
    assert!(printed.contains("\"orderID\":7"), "{printed}");
    assert!(!printed.contains("delivered"), "{printed}");
    assert!(
        text(&output.stderr).contains("auth_revoked"),
        "{}",
        text(&output.stderr)
    );
    // A file that no longer parses is refused on SIGHUP; the hub keeps the old one.
    std::fs::write(&file, "[[users]]\nnme = 1\n").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &hub.pid().to_string()])
        .status()
        .unwrap();
    hub.wait_log("not reloaded", 1).await;
    let out = run(
        &["pub", "--port", &port, "--token", "vend", "pickup", "2"],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    hub.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// TLS through the binary: `serve --tls-cert/--tls-key`, `sub`/`pub --ca`; SIGHUP with
/// a certificate from a new CA keeps `sub` connected and serves new clients with it.
#[tokio::test]
async fn serve_tls_and_reload_the_certificate_on_sighup() {
    let old = crate::tls::Pki::new("cli-old");
    let (cert, key) = old.issue("server", None, false);
    let mut hub = HubProcess::spawn(HubProcess::command(&[
        "serve",
        "--port",
        "0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]))
    .await;
    let port = hub.port.to_string();
    let ca = old.ca();
    let mut sub = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubcast"))
        .args([
            "sub",
            "--host",
            "localhost",
            "--port",
            &port,
            "--no-reconnect",
            "--ca",
        ])
        .arg(&ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    hub.wait_log("connection", 1).await;
    let publish = |ca: std::path::PathBuf, payload: &'static str| {
        let port = port.clone();
        async move {
            run(
                &[
                    "pub",
                    "--host",
                    "localhost",
                    "--port",
                    &port,
                    "--ca",
                    ca.to_str().unwrap(),
                    "pickup",
                    payload,
                ],
                "",
            )
            .await
        }
    };
    let out = publish(ca.clone(), "1").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Plain TCP to a TLS hub is told so; TLS with the wrong CA fails.
    let out = run(
        &["pub", "--host", "localhost", "--port", &port, "pickup", "8"],
        "",
    )
    .await;
    assert!(
        text(&out.stderr).contains("tls_required"),
        "{}",
        text(&out.stderr)
    );
    let out = run(
        &[
            "pub",
            "--host",
            "localhost",
            "--port",
            &port,
            "--tls",
            "pickup",
            "9",
        ],
        "",
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("TLS handshake"),
        "{}",
        text(&out.stderr)
    );
    // Rotate the certificate: a new CA's, at the same paths.
    let new = crate::tls::Pki::new("cli-new");
    let (new_cert, new_key) = new.issue("server", None, false);
    std::fs::copy(new_cert, &cert).unwrap();
    std::fs::copy(new_key, &key).unwrap();
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &hub.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    hub.wait_log("TLS certificate reloaded", 1).await;
    let out = publish(new.ca(), "2").await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = publish(ca.clone(), "3").await;
    assert!(!out.status.success(), "the old CA no longer matches");
    // The subscriber connected before the rotation heard both, on its old session.
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
    for expected in ["1", "2"] {
        let line = within(lines.next_line()).await.unwrap().unwrap();
        assert_eq!(
            line,
            format!("{{\"event\":\"pickup\",\"payload\":{expected}}}")
        );
    }
    hub.stop().await;
}

/// `hubcast token` mints a JWT the hub's key verifies, with the permissions asked for;
/// a key that is no key is a usage error.
#[tokio::test]
async fn token_mints_a_jwt_the_hub_verifies() {
    let dir = std::env::temp_dir().join(format!("hubcast-token-cli-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("jwt.secret");
    std::fs::write(
        &secret,
        "a secret of at least thirty-two bytes for tokens\n",
    )
    .unwrap();
    let out = run(
        &[
            "token",
            "--key",
            secret.to_str().unwrap(),
            "--sub",
            "alice",
            "--ttl",
            "5m",
            "--publish",
            "chat.{user}",
            "--subscribe",
            "chat.>",
        ],
        "",
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_string();
    let identity = hubcast::auth::JwtKey::load(&secret)
        .unwrap()
        .verify(&token)
        .unwrap();
    assert_eq!(identity.name, "alice");
    assert!(identity.permissions.publish.allows("chat.alice"));
    assert!(!identity.permissions.publish.allows("chat.bob"));
    assert!(identity.permissions.subscribe.allows("chat.bob"));
    let pem = dir.join("bad.pem");
    std::fs::write(
        &pem,
        "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let out = run(
        &["token", "--key", pem.to_str().unwrap(), "--sub", "alice"],
        "",
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("bad.pem"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}
