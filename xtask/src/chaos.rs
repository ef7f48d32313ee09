//! `cargo xtask chaos`: the fault tests (restarts on every lease source, the
//! lease store down, lease churn, devices and pins changed under the agent),
//! one at a time, and a table of what each fault cost the traffic.
use std::{path::Path, process::Command};

use anyhow::bail;

use crate::root;

/// Test-name filters of the fault tests; each prints `chaos: …` lines.
const FAULT_TESTS: &[&str] = &[
    "sigkill_during_a_10ms_ping_loses_nothing",
    "file_source_restarts_under_traffic_lose_nothing",
    "etcd_restarts_under_traffic_lose_nothing",
    "kube_restarts_under_traffic_lose_nothing",
    "api_server_outage_keeps_the_data_path_and_converges",
    "etcd_outage_keeps_the_data_path_and_converges",
    "a_thousand_lease_cycles_leave_other_peers_and_counters_alone",
    "flannel1_deleted_while_running_is_rebuilt",
    "pinned_link_removed_while_running_is_rebuilt",
    "underlay_mtu_change_is_applied",
    "restart_after_flannel1_was_recreated_attaches_to_the_live_device",
    "a_vni_change_is_refused_not_half_applied",
    "underlay_address_change_moves_the_lease",
    "a_second_agent_on_the_same_pin_root_refuses",
];

pub fn run(agent: &Path) -> anyhow::Result<()> {
    println!(
        "xtask: running {} fault tests, one at a time",
        FAULT_TESTS.len()
    );
    let out = Command::new("cargo")
        .current_dir(root())
        .env("FLANNEL_AGENT", agent)
        .env("CI", "true")
        .args(["test", "--locked", "--workspace", "--no-fail-fast", "--"])
        .args(["--test-threads", "1", "--nocapture", "--exact"])
        .args(FAULT_TESTS)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("\nfault                                              what it cost");
    for line in stderr.lines().chain(stdout.lines()) {
        if let Some(rest) = line.strip_prefix("chaos: ")
            && let Some((fault, cost)) = rest.split_once(": ")
        {
            println!("{fault:<50} {cost}");
        }
    }
    let failed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("test ") && l.ends_with("FAILED"))
        .collect();
    if !out.status.success() || !failed.is_empty() {
        eprintln!("{stdout}\n{stderr}");
        bail!("fault tests failed: {failed:?}");
    }
    println!("all {} fault tests passed", FAULT_TESTS.len());
    Ok(())
}
