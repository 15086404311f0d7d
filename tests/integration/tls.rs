//! Issue #13: TLS. Certificates are made here by rcgen (no private key is committed):
//! the library client, Node's `tls.connect` in the class's style, and `openssl
//! s_client` against a TLS hub; mutual TLS naming identities; expired and untrusted
//! certificates failing with a clear client error; reload without dropping anyone.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use hubcast::auth::{AuthFile, Authenticator};
use hubcast::client::{ClientError, ClientEvent};
use hubcast::tls::{ServerTls, TlsSettings};
use hubcast::{Client, Config};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::support::{require, within, TestHub};

/// A CA, and files under a directory removed when dropped.
pub struct Pki {
    pub dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("hubcast-tls-{name}-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("hubcast test CA {name}"));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate signed by this CA: for `localhost` and 127.0.0.1 (a server), or
    /// with subject CN `cn` (a client). Returns (cert, key) paths.
    pub fn issue(&self, file: &str, cn: Option<&str>, expired: bool) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }

    pub fn server(&self, client_ca: Option<&Path>) -> ServerTls {
        let (cert, key) = self.issue("server", None, false);
        ServerTls::new(TlsSettings {
            cert,
            key,
            client_ca: client_ca.map(Path::to_path_buf),
        })
        .unwrap()
    }
}

async fn tls_client(
    hub: &TestHub,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<(Client, hubcast::client::Events), ClientError> {
    let config = hubcast::tls::client_config(Some(ca), identity).unwrap();
    let builder = Client::builder().tls(config);
    let events = builder.events();
    let client = builder
        .connect(format!("localhost:{}", hub.addr.port()))
        .await?;
    Ok((client, events))
}

async fn next_event(events: &mut hubcast::client::Events) -> ClientEvent {
    loop {
        match within(events.next()).await.expect("stream ended") {
            ClientEvent::Lookup { .. } | ClientEvent::Connect { .. } => continue,
            other => return other,
        }
    }
}

#[tokio::test]
async fn library_clients_talk_over_tls_and_plain_tcp_gets_nothing() {
    let pki = Pki::new("basic");
    let hub = TestHub::start_tls(Config::default(), pki.server(None)).await;
    let (a, _) = tls_client(&hub, &pki.ca(), None).await.unwrap();
    let (_b, mut b_events) = tls_client(&hub, &pki.ca(), None).await.unwrap();
    hub.wait_clients(2).await;
    a.emit("pickup", &json!({"orderID": 1})).await.unwrap();
    match next_event(&mut b_events).await {
        ClientEvent::Event(e) => {
            assert_eq!(e.name().as_str(), "pickup");
            assert_eq!(e.payload(), r#"{"orderID":1}"#);
        }
        other => panic!("{other:?}"),
    }
    // A plain TCP client's JSON is not TLS: it is told so, in plain, and nothing is
    // routed.
    let mut plain = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    plain
        .write_all(b"{\"event\":\"pickup\",\"payload\":2}\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = within(tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut rest)).await;
    let answer = String::from_utf8_lossy(&rest);
    assert!(answer.contains("\"code\":\"tls_required\""), "{answer}");
    assert!(!answer.contains("pickup"));
    assert_eq!(hub.hub.stats().events, 1);
}

/// A TLS client that ends its connection without `close_notify` (dropping the socket,
/// as many clients do) has closed its side, as a plain client closing its socket has:
/// what it sent is delivered, and the hub reports a close without error, as Node does.
#[tokio::test]
async fn a_client_ending_without_close_notify_has_closed_its_side() {
    let pki = Pki::new("no-close-notify");
    let hub = TestHub::start_tls(Config::default(), pki.server(None)).await;
    let (_listener, mut events) = tls_client(&hub, &pki.ca(), None).await.unwrap();
    hub.wait_clients(1).await;
    let config = hubcast::tls::client_config(Some(&pki.ca()), None).unwrap();
    let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    hub.wait_clients(2).await;
    // The class's style: one JSON object, no newline.
    tls.write_all(br#"{"event":"delivered","payload":{"orderID":7}}"#)
        .await
        .unwrap();
    tls.flush().await.unwrap();
    // Read up to the hub's echo of it (a client that never subscribed hears
    // everything), so that nothing unread makes the kernel reset the connection.
    let mut heard = Vec::new();
    while !heard.ends_with(b"\n") {
        let mut byte = [0u8; 1];
        assert_eq!(within(tls.read(&mut byte)).await.unwrap(), 1);
        heard.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&heard).contains("delivered"));
    let (tcp, _) = tls.into_inner();
    drop(tcp);
    match next_event(&mut events).await {
        ClientEvent::Event(e) => assert_eq!(e.name().as_str(), "delivered"),
        other => panic!("{other:?}"),
    }
    match hub
        .wait_for(|e| matches!(e, hubcast::HubEvent::Close { .. }))
        .await
    {
        hubcast::HubEvent::Close {
            had_error, reason, ..
        } => {
            assert_eq!(reason, hubcast::CloseReason::PeerClosed);
            assert!(!had_error);
        }
        other => unreachable!("{other:?}"),
    }
}

#[tokio::test]
async fn untrusted_and_expired_certificates_fail_with_a_clear_client_error() {
    let pki = Pki::new("server");
    let hub = TestHub::start_tls(Config::default(), pki.server(None)).await;
    // Self-signed by a CA the client does not trust.
    let stranger = Pki::new("stranger");
    let err = tls_client(&hub, &stranger.ca(), None).await.unwrap_err();
    let text = format!("{:#}", anyhow_chain(&err));
    assert!(matches!(err, ClientError::Tls { .. }), "{text}");
    assert!(
        text.contains("UnknownIssuer") || text.contains("unknown"),
        "{text}"
    );

    let (cert, key) = pki.issue("expired", None, true);
    let expired = TestHub::start_tls(
        Config::default(),
        ServerTls::new(TlsSettings {
            cert,
            key,
            client_ca: None,
        })
        .unwrap(),
    )
    .await;
    let err = tls_client(&expired, &pki.ca(), None).await.unwrap_err();
    let text = anyhow_chain(&err);
    assert!(
        text.contains("Expired") || text.contains("expired"),
        "{text}"
    );
}

fn anyhow_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[tokio::test]
async fn mutual_tls_names_the_identity_and_refuses_other_certificates() {
    let pki = Pki::new("mtls");
    let (cert, key) = pki.issue("driver", Some("driver"), false);
    let hub = TestHub::start_tls(Config::default(), pki.server(Some(&pki.ca()))).await;
    let file: AuthFile = toml::from_str(
        "[[users]]\nname = \"driver\"\npublish = { allow = [\"in-transit\", \"delivered\"] }\nsubscribe = { allow = [\">\"] }\n",
    )
    .unwrap();
    hub.hub
        .set_authenticator(Authenticator::from_spec(&file, None).unwrap());
    let (driver, mut events) = tls_client(&hub, &pki.ca(), Some((&cert, &key)))
        .await
        .unwrap();
    hub.wait_for(
        |e| matches!(e, hubcast::HubEvent::Authenticated { user, .. } if user == "driver"),
    )
    .await;
    // No $hello needed: the certificate said who; its permissions apply.
    driver.emit("pickup", &1).await.unwrap();
    match next_event(&mut events).await {
        ClientEvent::HubError(e) => assert_eq!(e.code, hubcast::ErrorCode::PermissionDenied),
        other => panic!("{other:?}"),
    }
    driver.emit("delivered", &2).await.unwrap();
    match next_event(&mut events).await {
        ClientEvent::Event(e) => assert_eq!(e.name().as_str(), "delivered"),
        other => panic!("{other:?}"),
    }
    // A certificate from another CA, and none at all, are refused.
    let stranger = Pki::new("mtls-stranger");
    let (cert, key) = stranger.issue("mallory", Some("driver"), false);
    let refused = async |identity: Option<(&Path, &Path)>| {
        // TLS 1.3 reports a refused client certificate after the handshake: the first
        // read then fails, or the hub closes.
        match tls_client(&hub, &pki.ca(), identity).await {
            Err(_) => {}
            Ok((_client, mut events)) => loop {
                match next_event(&mut events).await {
                    ClientEvent::Close { .. } => break,
                    ClientEvent::Event(e) => panic!("refused client heard {e:?}"),
                    _ => {}
                }
            },
        }
    };
    refused(Some((&cert, &key))).await;
    refused(None).await;
    assert_eq!(hub.hub.clients(), 1);
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_clients_and_keeps_open_ones() {
    let old = Pki::new("old");
    let (cert, key) = old.issue("server", None, false);
    let settings = TlsSettings {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
    };
    let tls = ServerTls::new(settings).unwrap();
    let hub = TestHub::start_tls(Config::default(), tls.clone()).await;
    let (early, mut early_events) = tls_client(&hub, &old.ca(), None).await.unwrap();
    hub.wait_clients(1).await;
    // Rotate: a new CA's certificate at the same paths.
    let new = Pki::new("new");
    let (new_cert, new_key) = new.issue("server", None, false);
    std::fs::copy(new_cert, &cert).unwrap();
    std::fs::copy(new_key, &key).unwrap();
    tls.reload().unwrap();
    let (late, _) = tls_client(&hub, &new.ca(), None).await.unwrap();
    assert!(tls_client(&hub, &old.ca(), None).await.is_err());
    late.emit("rotated", &1).await.unwrap();
    match next_event(&mut early_events).await {
        ClientEvent::Event(e) => assert_eq!(e.name().as_str(), "rotated"),
        other => panic!("{other:?}"),
    }
    assert!(early.is_connected());
}

#[tokio::test]
async fn node_tls_connect_in_the_class_style_and_openssl_s_client_interoperate() {
    let pki = Pki::new("interop");
    let hub = TestHub::start_tls(Config::default(), pki.server(None)).await;
    let (listener, mut events) = tls_client(&hub, &pki.ca(), None).await.unwrap();
    hub.wait_clients(1).await;
    if require("node") {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/node/tls-client.js");
        let output = within(
            tokio::process::Command::new("node")
                .args([
                    script,
                    &hub.addr.port().to_string(),
                    pki.ca().to_str().unwrap(),
                ])
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("echo: pickup"), "{stdout}");
        match next_event(&mut events).await {
            ClientEvent::Event(e) => assert_eq!(e.payload(), r#"{"from":"node"}"#),
            other => panic!("{other:?}"),
        }
    }
    if require("openssl") {
        let mut child = tokio::process::Command::new("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
            .arg(format!("127.0.0.1:{}", hub.addr.port()))
            .args(["-servername", "localhost", "-CAfile"])
            .arg(pki.ca())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"{\"event\":\"pickup\",\"payload\":{\"from\":\"openssl\"}}\n")
            .await
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let echo = within(lines.next_line()).await.unwrap().unwrap();
        assert_eq!(echo, r#"{"event":"pickup","payload":{"from":"openssl"}}"#);
        drop(stdin);
        match next_event(&mut events).await {
            ClientEvent::Event(e) => assert_eq!(e.payload(), r#"{"from":"openssl"}"#),
            other => panic!("{other:?}"),
        }
        // `-quiet` ignores the end of its input: stop it.
        child.start_kill().unwrap();
        let _ = within(child.wait()).await;
    }
    drop(listener);
}

/// `--accept-rate` over TLS is decided before the handshake: past a few refusals
/// answered in words each second, an address's attempts are closed without one, so
/// that it cannot make the hub run a handshake per attempt. Every refusal is counted.
#[tokio::test]
async fn tls_attempts_over_the_accept_rate_are_closed_before_the_handshake() {
    let pki = Pki::new("rate");
    let config = Config::builder().accept_rate(Some(2)).build().unwrap();
    let hub = TestHub::start_tls(config, pki.server(None)).await;
    let client = hubcast::tls::client_config(Some(&pki.ca()), None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(client);
    let (mut kept, mut answered, mut closed) = (Vec::new(), Vec::new(), 0u64);
    let started = std::time::Instant::now();
    for _ in 0..40 {
        let tcp = tokio::net::TcpStream::connect(hub.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let Ok(mut tls) = within(connector.connect(name, tcp)).await else {
            closed += 1;
            continue;
        };
        // A refused client can still be closed before its first read succeeds;
        // only what it reads tells the two apart.
        if tls
            .write_all(b"{\"event\":\"$ping\",\"payload\":null}\n")
            .await
            .is_err()
        {
            closed += 1;
            continue;
        }
        let mut line = String::new();
        let mut reader = BufReader::new(tls);
        let _ = within(reader.read_line(&mut line)).await;
        if line.contains("$pong") {
            kept.push(reader);
        } else if line.contains("too_many_connections") {
            answered.push(line);
        } else {
            assert!(line.is_empty(), "{line}");
            closed += 1;
        }
    }
    // Each one-second window the attempts spanned lets in 2 and answers at most 4
    // refusals after a handshake; everything else was closed before one.
    let windows = started.elapsed().as_secs() + 2;
    assert!(
        !kept.is_empty() && kept.len() as u64 <= 2 * windows,
        "{}",
        kept.len()
    );
    assert!(!answered.is_empty(), "no refusal was answered");
    assert!(
        answered.len() as u64 <= 4 * windows,
        "{} refusals answered in {windows} windows",
        answered.len()
    );
    assert!(
        closed >= 40 - 6 * windows,
        "{closed} closed in {windows} windows"
    );
    let frame: serde_json::Value = serde_json::from_str(answered[0].trim()).unwrap();
    assert!(
        frame["payload"]["retry_after_ms"].as_u64().is_some(),
        "{frame}"
    );
    assert_eq!(
        hub.hub.stats().refused_accept_rate,
        answered.len() as u64 + closed
    );
}
