//! Builds `devbox-agent` as a static executable and hands its path to lib.rs.
//!
//! Why a nested cargo: `-C target-feature=+crt-static` cannot be set for one binary through
//! Cargo.toml, and setting it globally breaks proc-macros on the gnu target. `cargo rustc`
//! applies it to the agent's final link only. A separate target dir avoids the outer lock.
//!
//! `DEVBOX_AGENT_PREBUILT=/path` skips the nested build (packagers, cross builds).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().parent().unwrap().to_path_buf();
    println!("cargo:rerun-if-env-changed=DEVBOX_AGENT_PREBUILT");
    for dir in [
        "crates/agent/src",
        "crates/agent/Cargo.toml",
        "crates/protocol/src",
        "crates/protocol/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    if let Ok(pre) = std::env::var("DEVBOX_AGENT_PREBUILT") {
        println!("cargo:rustc-env=DEVBOX_AGENT_PATH={pre}");
        return;
    }
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join("agent-static");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["rustc", "--release", "-p", "devbox-agent", "--bin", "devbox-agent", "--target-dir"])
        .arg(&target_dir)
        .args(["--", "-C", "target-feature=+crt-static"]);
    // Do not leak the outer build's settings (clippy wrappers, flags meant for other crates).
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k == "RUSTC_WRAPPER"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k == "RUSTFLAGS"
        {
            cmd.env_remove(k);
        }
    }
    let status = cmd.status().expect("run nested cargo for devbox-agent");
    assert!(status.success(), "building the static devbox-agent failed");
    let bin = target_dir.join("release/devbox-agent");
    println!("cargo:rustc-env=DEVBOX_AGENT_PATH={}", bin.display());
}
