//! Test support: real network namespaces, veth/bridge/vxlan devices, the real
//! agent binary and the real kernel object. Everything made here is removed on drop.
pub mod capture;
pub mod etcd;
pub mod frames;
pub mod kube_api;
pub mod lab;
pub mod membership6;
pub mod netns;
pub mod prereq;
pub mod progs;
pub mod traffic;

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The kernel object `cargo xtask build-ebpf` produces.
pub fn object_path() -> PathBuf {
    root().join("target/flannel-ebpf.o")
}

/// The agent binary the labs run: the release build that ships, which
/// `cargo xtask test` builds once and names in `FLANNEL_AGENT`.
pub fn agent_path() -> PathBuf {
    std::env::var_os("FLANNEL_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/flannel-agent"))
}

/// Run a shell command line, failing with its output when it fails.
pub fn sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("bash")
        .args(["-c", cmd])
        .output()
        .with_context(|| format!("starting `{cmd}`"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One line of `cargo xtask chaos`'s report: a fault and the pings it cost.
pub fn chaos(fault: &str, sent: u32, received: u32) {
    eprintln!(
        "chaos: {fault}: lost {} of {sent} pings",
        sent.saturating_sub(received)
    );
}

/// Poll `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
