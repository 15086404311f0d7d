//! Issue #15: the JavaScript client (clients/js): its own `node --test` suite against
//! the Rust binary, the lab's apps written with it interoperating with the Rust ones
//! both ways, and the package `npm pack` makes installing and running from a clean
//! folder.

use std::path::Path;
use std::process::Stdio;

use hubcast::Config;
use tokio::process::Command;

use crate::support::{output_within, require, within, TestHub};

const JS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js");

async fn node(args: &[&str], dir: &Path) -> (bool, String) {
    // A run that overstays is killed and what it printed so far is shown.
    let output = output_within(
        Command::new("node")
            .args(args)
            .current_dir(dir)
            .env("HUBCAST_BIN", env!("CARGO_BIN_EXE_hubcast"))
            .stdin(Stdio::null()),
    )
    .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn the_js_client_suite_passes_against_the_rust_hub() {
    // Its WebSocket test needs `ws` on Node before 22 (a dev dependency: npm ci).
    if !require("node")
        || !crate::support::require_file(
            &Path::new(JS).join("node_modules/ws"),
            "ws (npm ci in clients/js)",
        )
    {
        return;
    }
    // The test file (and each test in it) has 18 s, under the harness's patience:
    // a test that fails and leaves a reconnecting client behind ends in a report that
    // names it, not in a process that never exits.
    let (ok, out) = node(&["--test", "--test-timeout=18000", "test/"], Path::new(JS)).await;
    assert!(ok, "{out}");
    assert!(out.contains("# fail 0"), "{out}");
}

/// The hand-written types agree with a TypeScript program using every call, and the
/// examples type-check through them (`tsc --noEmit`, a dev dependency: npm ci).
#[tokio::test]
async fn the_types_check_with_tsc() {
    let tsc = Path::new(JS).join("node_modules/typescript/bin/tsc");
    if !require("node") || !crate::support::require_file(&tsc, "typescript (npm ci in clients/js)")
    {
        return;
    }
    let (ok, out) = node(
        &[tsc.to_str().unwrap(), "-p", "tsconfig.json"],
        Path::new(JS),
    )
    .await;
    assert!(ok, "tsc found errors:\n{out}");
}

/// A JS vendor served by the Rust driver, and a Rust vendor served by the JS driver.
#[tokio::test]
async fn the_js_and_rust_apps_serve_each_other() {
    if !require("node") {
        return;
    }
    let hub = TestHub::start(Config::default()).await;
    let url = format!("tcp://127.0.0.1:{}", hub.addr.port());
    let port = hub.addr.port().to_string();

    // Rust driver, JS vendor.
    let mut driver = Command::new(env!("CARGO_BIN_EXE_hubcast"))
        .args(["driver", "--port", &port, "--pickup-delay", "10ms"])
        .args(["--deliver-delay", "10ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut clients = hub.hub.watch_clients();
    within(clients.wait_for(|&n| n == 1)).await.unwrap();
    let (ok, out) = node(
        &["examples/vendor.js", &url, "js-store", "3", "10"],
        Path::new(JS),
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(
        out.matches("VENDOR: Thank you for delivering").count(),
        3,
        "{out}"
    );
    driver.start_kill().unwrap();
    within(clients.wait_for(|&n| n == 0)).await.unwrap();

    // JS driver, Rust vendor.
    let mut js_driver = Command::new("node")
        .args(["examples/driver.js", &url, "10", "10"])
        .current_dir(JS)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    within(clients.wait_for(|&n| n == 1)).await.unwrap();
    let output = within(
        Command::new(env!("CARGO_BIN_EXE_hubcast"))
            .args(["vendor", "--port", &port, "--store", "rust-store"])
            .args(["--count", "3", "--interval", "10ms"])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert_eq!(
        stdout.matches("Thank you for delivering").count(),
        3,
        "{stdout}"
    );
    js_driver.start_kill().unwrap();
}

/// `npm pack` makes a package that installs into an empty folder and runs there.
#[tokio::test]
async fn the_packed_package_installs_and_runs_from_a_clean_folder() {
    if !require("node") || !require("npm") {
        return;
    }
    let hub = TestHub::start(Config::default()).await;
    let dir = std::env::temp_dir().join(format!("hubcast-npm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pack = within(
        Command::new("npm")
            .args(["pack", "--silent", "--pack-destination"])
            .arg(&dir)
            .current_dir(JS)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        pack.status.success(),
        "{}",
        String::from_utf8_lossy(&pack.stderr)
    );
    let tarball = String::from_utf8_lossy(&pack.stdout).trim().to_string();
    std::fs::write(
        dir.join("package.json"),
        r#"{"name":"app","type":"module"}"#,
    )
    .unwrap();
    let install = within(
        Command::new("npm")
            .args(["install", "--offline", "--no-audit", "--no-fund"])
            .arg(format!("./{tarball}"))
            .current_dir(&dir)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        install.status.success(),
        "{}",
        String::from_utf8_lossy(&install.stderr)
    );
    std::fs::write(
        dir.join("app.js"),
        format!(
            "import {{ connect }} from 'hubcast-client';\n\
             const hub = await connect('tcp://127.0.0.1:{}', {{ reconnect: false }});\n\
             hub.on('hello', (p) => {{ console.log('heard', p); hub.close(); }});\n\
             hub.emit('hello', 'from the package');\n",
            hub.addr.port()
        ),
    )
    .unwrap();
    let (ok, out) = node(&["app.js"], &dir).await;
    assert!(ok, "{out}");
    assert!(out.contains("heard from the package"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}
