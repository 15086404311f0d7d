//! Puts the git revision in `hubcast --version` (`HUBCAST_GIT_REV`; "unknown" outside a
//! git checkout, e.g. a source tarball; a packager may set HUBCAST_GIT_REV itself).

fn main() {
    println!("cargo:rerun-if-env-changed=HUBCAST_GIT_REV");
    let rev = std::env::var("HUBCAST_GIT_REV").ok().or_else(|| {
        let out = std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        let rev = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !rev.is_empty()).then_some(rev)
    });
    if std::path::Path::new(".git").exists() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        println!("cargo:rerun-if-changed=.git/refs/heads");
        println!("cargo:rerun-if-changed=.git/packed-refs");
    }
    println!(
        "cargo:rustc-env=HUBCAST_GIT_REV={}",
        rev.as_deref().unwrap_or("unknown")
    );
}
