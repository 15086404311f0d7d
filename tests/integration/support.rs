//! The one shared helper: start a hub, connect clients, wait for what the hub reports.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hubcast::{ClientId, Config, Hub, HubEvent, Server};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any single wait may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A hub serving on a free loopback port.
pub struct TestHub {
    pub addr: SocketAddr,
    /// The `--http` listener's address, when started with one.
    pub http: Option<SocketAddr>,
    pub hub: Hub,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    log: Arc<Log>,
    /// The listening socket, kept for a successor (see `start_keeping_port`).
    kept: Option<std::net::TcpListener>,
}

/// What the observer saw: every event (unless `record` is off) and some counters.
struct Log {
    record: bool,
    events: Mutex<Vec<HubEvent>>,
    /// Bumped on every observed event, so waiters can wake and look again.
    seen: watch::Sender<u64>,
    accepted: watch::Sender<u64>,
}

impl TestHub {
    pub async fn start(config: Config) -> TestHub {
        Self::start_with(config, true).await
    }

    /// `record: false` keeps only counters: for tests that move 100,000s of events.
    pub async fn start_with(config: Config, record: bool) -> TestHub {
        let (hub, log) = Self::observed(config, record);
        let server = Server::bind("127.0.0.1:0", hub.clone()).await.unwrap();
        Self::serve(server, hub, log, None)
    }

    /// A hub that also serves HTTP (the WebSocket gateway, metrics, health).
    pub async fn start_http(config: Config) -> TestHub {
        let (hub, log) = Self::observed(config, true);
        let gateway = hubcast::http::Gateway::bind("127.0.0.1:0").await.unwrap();
        let http = gateway.local_addr().unwrap();
        let server = Server::bind("127.0.0.1:0", hub.clone())
            .await
            .unwrap()
            .with_http(gateway);
        let mut hub = Self::serve(server, hub, log, None);
        hub.http = Some(http);
        hub
    }

    /// A hub serving TLS with `tls`.
    pub async fn start_tls(config: Config, tls: hubcast::tls::ServerTls) -> TestHub {
        let (hub, log) = Self::observed(config, true);
        let server = Server::bind("127.0.0.1:0", hub.clone())
            .await
            .unwrap()
            .with_tls(tls);
        Self::serve(server, hub, log, None)
    }

    /// A hub whose listening socket outlives it: [`TestHub::successor`] brings a new
    /// hub up on the same port without binding it again (issue #11: a port let go and
    /// bound again could be taken by anything in between).
    pub async fn start_keeping_port(config: Config) -> TestHub {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::on_listener(listener, config)
    }

    /// A new hub on this one's listening socket, once this one has stopped: clients
    /// that reconnect meanwhile wait in the socket's backlog.
    pub fn successor(&mut self, config: Config) -> TestHub {
        let listener = self.kept.take().expect("started with start_keeping_port");
        Self::on_listener(listener, config)
    }

    fn on_listener(listener: std::net::TcpListener, config: Config) -> TestHub {
        let clone = listener.try_clone().unwrap();
        clone.set_nonblocking(true).unwrap();
        let (hub, log) = Self::observed(config, true);
        let server = Server::from_listener(
            tokio::net::TcpListener::from_std(clone).unwrap(),
            hub.clone(),
        );
        Self::serve(server, hub, log, Some(listener))
    }

    /// A hub whose observer records what it reports into a [`Log`].
    fn observed(config: Config, record: bool) -> (Hub, Arc<Log>) {
        let log = Arc::new(Log {
            record,
            events: Mutex::default(),
            seen: watch::Sender::new(0),
            accepted: watch::Sender::new(0),
        });
        let observer_log = Arc::clone(&log);
        let hub = Hub::with_observer(config, move |event| {
            if matches!(event, HubEvent::Event { .. }) {
                observer_log.accepted.send_modify(|n| *n += 1);
                if !observer_log.record {
                    return;
                }
            }
            observer_log.events.lock().unwrap().push(event.clone());
            observer_log.seen.send_modify(|n| *n += 1);
        });
        (hub, log)
    }

    fn serve(
        server: Server,
        hub: Hub,
        log: Arc<Log>,
        kept: Option<std::net::TcpListener>,
    ) -> TestHub {
        let addr = server.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        TestHub {
            addr,
            http: None,
            hub,
            shutdown,
            task: Some(task),
            log,
            kept,
        }
    }

    /// Begins a graceful shutdown; `stopped` waits for it to finish.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for `run` to return after a shutdown.
    pub async fn stopped(&mut self) {
        let task = self.task.take().expect("already stopped");
        within(task).await.unwrap();
    }

    /// Connects and waits until the hub has the client in its pool.
    pub async fn connect(&self) -> TestClient {
        let since = self.log_len();
        self.connect_stream(since, TcpStream::connect(self.addr).await.unwrap())
            .await
    }

    /// Connects with a tiny receive buffer: a client the hub can easily out-pace.
    pub async fn connect_small_window(&self) -> TestClient {
        let since = self.log_len();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        self.connect_stream(since, socket.connect(self.addr).await.unwrap())
            .await
    }

    /// Connects from a loopback address of our choice (127.0.0.2, ...) and waits until
    /// the hub has the client in its pool.
    pub async fn connect_from(&self, ip: std::net::Ipv4Addr) -> TestClient {
        let since = self.log_len();
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((ip, 0))).unwrap();
        self.connect_stream(since, socket.connect(self.addr).await.unwrap())
            .await
    }

    fn log_len(&self) -> usize {
        self.log.events.lock().unwrap().len()
    }

    /// Waits for the hub to report `stream` joining. Only events after `since` count:
    /// an earlier client may have had the same (since reused) port.
    async fn connect_stream(&self, since: usize, stream: TcpStream) -> TestClient {
        // Each write goes out at once: splits stay splits on the wire.
        stream.set_nodelay(true).unwrap();
        let local = stream.local_addr().unwrap();
        let joined = self
            .wait_for_since(
                since,
                |e| matches!(e, HubEvent::Connection { peer, .. } if *peer == local),
            )
            .await;
        let HubEvent::Connection { client, .. } = joined else {
            unreachable!()
        };
        let (read, write) = stream.into_split();
        TestClient {
            id: client,
            reader: BufReader::new(read),
            writer: write,
        }
    }

    /// Waits for (and returns) the first reported event matching `pred`, past or future.
    pub async fn wait_for(&self, pred: impl Fn(&HubEvent) -> bool) -> HubEvent {
        self.wait_for_since(0, pred).await
    }

    /// Like `wait_for`, looking only at events reported after the first `since`.
    async fn wait_for_since(&self, since: usize, pred: impl Fn(&HubEvent) -> bool) -> HubEvent {
        let mut seen = self.log.seen.subscribe();
        within(async {
            loop {
                seen.borrow_and_update();
                // The guard must be gone before the await: the hub's observer takes it too.
                let found = {
                    let log = self.log.events.lock().unwrap();
                    log.iter().skip(since).find(|e| pred(e)).cloned()
                };
                if let Some(e) = found {
                    return e;
                }
                seen.changed().await.unwrap();
            }
        })
        .await
    }

    /// Every reported event matching `pred` so far.
    pub fn events_matching(&self, pred: impl Fn(&HubEvent) -> bool) -> Vec<HubEvent> {
        let log = self.log.events.lock().unwrap();
        log.iter().filter(|e| pred(e)).cloned().collect()
    }

    /// Waits until the hub has accepted `n` valid events in all.
    pub async fn wait_accepted(&self, n: u64) {
        let mut accepted = self.log.accepted.subscribe();
        within(accepted.wait_for(|&seen| seen >= n)).await.unwrap();
    }

    /// Waits until the pool holds exactly `n` clients.
    pub async fn wait_clients(&self, n: usize) {
        let mut count = self.hub.watch_clients();
        within(count.wait_for(|&c| c == n)).await.unwrap();
    }

    /// Waits for the hub to report that `client` left; returns `(had_error, reason)`.
    pub async fn wait_close(&self, client: ClientId) -> (bool, hubcast::CloseReason) {
        let close = self
            .wait_for(|e| matches!(e, HubEvent::Close { client: c, .. } if *c == client))
            .await;
        match close {
            HubEvent::Close {
                had_error, reason, ..
            } => (had_error, reason),
            other => unreachable!("{other:?}"),
        }
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A raw TCP client, as `nc` or a Node `net.Socket` would be.
pub struct TestClient {
    pub id: ClientId,
    pub reader: BufReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
}

impl TestClient {
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.writer.write_all(bytes.as_ref()).await.unwrap();
    }

    /// The next line from the hub, without its `\n`; panics on end of stream.
    pub async fn line(&mut self) -> String {
        self.try_line()
            .await
            .expect("the hub closed the connection")
    }

    /// The next line, or `None` at end of stream.
    pub async fn try_line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = within(self.reader.read_line(&mut line)).await.unwrap();
        if n == 0 {
            return None;
        }
        assert!(line.ends_with('\n'), "unterminated line {line:?}");
        line.pop();
        Some(line)
    }

    /// The next line, parsed.
    pub async fn json(&mut self) -> Value {
        let line = self.line().await;
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    /// The next line must be a `$error` with `code`; returns its message.
    pub async fn expect_error(&mut self, code: &str) -> String {
        let frame = self.json().await;
        assert_eq!(frame["event"], "$error", "{frame}");
        assert_eq!(frame["payload"]["code"], code, "{frame}");
        frame["payload"]["message"].as_str().unwrap().to_string()
    }

    /// The hub must close the connection with nothing more to say.
    pub async fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        within(self.reader.read_to_end(&mut rest)).await.unwrap();
        assert!(
            rest.is_empty(),
            "unexpected bytes before EOF: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

/// Whether `program` (a tool the full suite needs: `node`, `nats-server`,
/// `redis-server`) is installed. One policy for every such test (issue #11): under
/// `CI=true` a missing tool fails the test (`.ci/run` installs them all); elsewhere the
/// test is skipped, with a line written straight to stderr so that `cargo test`
/// shows it (it captures only what `eprintln!` writes).
pub fn require(program: &str) -> bool {
    let installed = std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    installed || missing(program)
}

/// Like [`require`], for something installed as files: `path` exists, or the test is
/// skipped (failed under `CI=true`), naming `what`.
pub fn require_file(path: &std::path::Path, what: &str) -> bool {
    path.exists() || missing(&format!("{what} ({})", path.display()))
}

fn missing(what: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !ci,
        "{what} is not installed, and CI is set: the full suite needs it (.ci/run installs it)"
    );
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED: {what} is not installed (the README lists what the full suite needs)"
    );
    false
}

/// Runs `fut`, failing the test if it takes longer than [`PATIENCE`].
/// Connects to the hub process on `port` and returns once the connection is in the
/// pool (the answer to a `$ping` says so).
pub async fn connect_in_pool(port: u16) -> BufReader<TcpStream> {
    let mut stream = BufReader::new(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    stream
        .get_mut()
        .write_all(b"{\"event\":\"$ping\",\"payload\":0}\n")
        .await
        .unwrap();
    let mut pong = String::new();
    within(stream.read_line(&mut pong)).await.unwrap();
    assert!(pong.contains("$pong"), "{pong}");
    stream
}

pub async fn within<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .expect("timed out waiting")
}

/// An event line as a client would send it.
pub fn event(name: &str, payload: Value) -> String {
    serde_json::json!({ "event": name, "payload": payload }).to_string()
}

/// A `hubcast serve` process (or a shell that `exec`s one), its port, and its log,
/// read as it is written so that its pipe never fills.
pub struct HubProcess {
    child: tokio::process::Child,
    pub port: u16,
    log: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// Log lines seen so far.
    pub lines: Vec<String>,
}

impl HubProcess {
    /// `hubcast ARGS`, logging at `info`, without `$PORT` from the environment.
    pub fn command(args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubcast"));
        cmd.args(args).env("RUST_LOG", "info").env_remove("PORT");
        cmd
    }

    /// Starts `cmd` (which must print hubcast's "Server up on ..." banner) and
    /// returns it with its port, its stderr piped and left to the caller (for tests of
    /// what happens when nobody reads the log).
    pub async fn spawn_raw(mut cmd: tokio::process::Command) -> (tokio::process::Child, u16) {
        use std::process::Stdio;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut banner = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = within(banner.next_line()).await.unwrap().unwrap();
        let port = first.rsplit(':').next().unwrap().parse().unwrap();
        (child, port)
    }

    /// Starts `cmd` (which must print hubcast's "Server up on ..." banner). With
    /// `DEBUG_HUB_LOG` set, the hub's log is printed too (shown when a test fails).
    pub async fn spawn(cmd: tokio::process::Command) -> HubProcess {
        let (mut child, port) = Self::spawn_raw(cmd).await;
        let (tx, log) = tokio::sync::mpsc::unbounded_channel();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                if std::env::var_os("DEBUG_HUB_LOG").is_some() {
                    eprintln!("hub {port}: {line}");
                }
                let _ = tx.send(line);
            }
        });
        HubProcess {
            child,
            port,
            log,
            lines: Vec::new(),
        }
    }

    /// Waits until `n` log lines in all contain `needle`.
    pub async fn wait_log(&mut self, needle: &str, n: usize) {
        while self.lines.iter().filter(|l| l.contains(needle)).count() < n {
            let line = within(self.log.recv()).await.expect("the hub exited");
            self.lines.push(line);
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the hub exited")
    }

    /// Whether any log line so far contains `needle` (without waiting for more).
    pub fn log_contains(&mut self, needle: &str) -> bool {
        while let Ok(line) = self.log.try_recv() {
            self.lines.push(line);
        }
        self.lines.iter().any(|l| l.contains(needle))
    }

    /// Kills the hub with SIGKILL (no chance to flush or close anything) and waits.
    pub async fn kill9(mut self) {
        self.child.start_kill().unwrap();
        within(self.child.wait()).await.unwrap();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Stops the hub with SIGTERM, checks it exits 0, and returns its whole log.
    pub async fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().unwrap().to_string();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        assert!(kill.unwrap().success());
        let status = match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => {
                while let Ok(line) = self.log.try_recv() {
                    self.lines.push(line);
                }
                let tail = self.lines.len().saturating_sub(30);
                panic!(
                    "the hub did not exit after SIGTERM; its last log lines:\n{}",
                    self.lines[tail..].join("\n")
                );
            }
        };
        assert_eq!(status.code(), Some(0), "the hub must exit 0 after SIGTERM");
        while let Some(line) = self.log.recv().await {
            self.lines.push(line);
        }
        std::mem::take(&mut self.lines)
    }
}

/// A test that fails shows the last of each of its hubs' logs (what CI prints is
/// often all there is to go on); `DEBUG_HUB_LOG` has printed them whole already.
impl Drop for HubProcess {
    fn drop(&mut self) {
        if !std::thread::panicking() || std::env::var_os("DEBUG_HUB_LOG").is_some() {
            return;
        }
        while let Ok(line) = self.log.try_recv() {
            self.lines.push(line);
        }
        let tail = self.lines.len().saturating_sub(LOG_TAIL);
        eprintln!(
            "--- the last {} log lines of the hub on port {}:\n{}",
            self.lines.len() - tail,
            self.port,
            self.lines[tail..].join("\n")
        );
    }
}

/// How many log lines of each process a failed test shows.
pub const LOG_TAIL: usize = 12;

/// Runs `cmd` to its end within [`PATIENCE`] and returns what it printed; if it
/// takes longer, it is killed and the test fails showing what it had printed so far.
pub async fn output_within(cmd: &mut tokio::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let drain = |pipe: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let Some(mut pipe) = pipe else { return };
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf).await {
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (seen, task)
    };
    let (stdout, out_task) = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let (stderr, err_task) = drain(child.stderr.take().map(|p| Box::new(p) as _));
    match tokio::time::timeout(PATIENCE, child.wait()).await {
        Ok(status) => {
            let status = status.unwrap();
            let _ = out_task.await;
            let _ = err_task.await;
            let take = |seen: Arc<Mutex<Vec<u8>>>| std::mem::take(&mut *seen.lock().unwrap());
            std::process::Output {
                status,
                stdout: take(stdout),
                stderr: take(stderr),
            }
        }
        Err(_) => {
            let _ = child.start_kill();
            let text =
                |seen: &Mutex<Vec<u8>>| String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
            panic!(
                "{:?} did not finish within {PATIENCE:?}; its stdout:\n{}\nits stderr:\n{}",
                cmd.as_std(),
                text(&stdout),
                text(&stderr)
            );
        }
    }
}

/// A loopback port that was free a moment ago (bound, then let go), for a server
/// started as a separate process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
