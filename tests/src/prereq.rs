//! Tests that need root, the kernel object and the agent binary skip on a
//! developer's laptop without them, but fail under CI=true.
use crate::{agent_path, object_path};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn missing() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root".into());
    }
    if !object_path().exists() {
        return Some(format!(
            "{} is missing (run `cargo xtask build-ebpf`)",
            object_path().display()
        ));
    }
    if !agent_path().exists() {
        return Some(format!(
            "{} is missing (run `cargo xtask test`)",
            agent_path().display()
        ));
    }
    for tool in [
        "ip", "bridge", "ping", "nsenter", "iptables", "nft", "bpftool", "ethtool",
    ] {
        let found = std::process::Command::new("bash")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

/// True when the test can run. Panics under CI when it cannot.
pub fn ready(test: &str) -> bool {
    match missing() {
        None => true,
        Some(why) if in_ci() => panic!("{test}: prerequisite missing under CI: {why}"),
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}
