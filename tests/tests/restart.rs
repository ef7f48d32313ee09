//! The data path is pinned: killing the agent loses no packet, and a new
//! agent adopts what is pinned and converges.
use std::time::Duration;

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    prereq,
    traffic::{BackgroundPing, wait_reachable},
};

#[test]
fn sigkill_during_a_10ms_ping_loses_nothing() {
    if !prereq::ready("sigkill") {
        return;
    }
    let mut lab = Lab::new("kill", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    lab.wait_fdb_entries(1, 1).unwrap();
    let dst = lab.nodes[1].pod_ip();
    wait_reachable(&lab.nodes[0].pod, dst, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    // 400 pings, one every 10 ms: 4 s of traffic across the kill and the restart.
    let bg = BackgroundPing::start(&lab.nodes[0].pod, dst, 400, 10).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.nodes[0].kill_agent();
    lab.nodes[1].kill_agent();
    std::thread::sleep(Duration::from_millis(800));
    let fdb_before = lab.fdb(0);
    lab.spawn_agent(0).unwrap();
    lab.spawn_agent(1).unwrap();
    let (sent, received) = bg.finish().unwrap();
    flannel_tests::chaos("agent SIGKILL and restart, file source", sent, received);
    assert_eq!(sent, 400);
    assert_eq!(
        received,
        sent,
        "lost {} replies across SIGKILL and restart\n{}",
        sent - received,
        lab.logs()
    );

    // The restarted agents adopted the pinned links and kept the same tables.
    for i in 0..2 {
        assert!(lab.nodes[i].agent_running(), "{}", lab.logs());
    }
    flannel_tests::wait_for(
        "the restarted agent to report",
        Duration::from_secs(10),
        || {
            lab.nodes[0]
                .log_text()
                .contains("adopted from the pin")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_eq!(lab.fdb(0), fdb_before);
    let log = lab.nodes[0].log_text();
    assert!(log.contains("reusing lease"), "{log}");
}

/// A second agent on a node whose pin root is held refuses, naming why, and
/// leaves the running one's data path alone.
#[test]
fn a_second_agent_on_the_same_pin_root_refuses() {
    if !prereq::ready("second_agent") {
        return;
    }
    let mut lab = Lab::new("twice", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    let dst = lab.nodes[1].pod_ip();
    wait_reachable(&lab.nodes[0].pod, dst, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let fdb_before = lab.fdb(0);
    let pin_root = lab.nodes[0].pin_root.clone();
    let pinned_links = || {
        ["link_encap", "link_decap_tc"].map(|l| {
            let p = pin_root.join(l);
            flannel_tests::sh(&format!("bpftool link show pinned {}", p.display())).unwrap()
        })
    };
    let links_before = pinned_links();
    let lease_dir = lab.lease_dir().join("subnets");
    let leases = || -> Vec<(String, String)> {
        let mut v: Vec<_> = std::fs::read_dir(&lease_dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(e.path()).unwrap_or_default())
            })
            .collect();
        v.sort();
        v
    };
    let leases_before = leases();
    let bg =
        flannel_tests::traffic::BackgroundPing::start(&lab.nodes[0].pod, dst, 200, 10).unwrap();

    let n = &lab.nodes[0];
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", n.ns.name))
        .arg(flannel_tests::agent_path())
        .args(["run", "--subnet-mgr", "file", "--subnet-dir"])
        .arg(lab.lease_dir())
        .args(["--iface", "eth0", "--pin-root"])
        .arg(&n.pin_root)
        .arg("--bpf-object")
        .arg(flannel_tests::object_path())
        .arg("--subnet-file")
        .arg(lab.dir.join("second.env"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent ran: {err}");
    assert!(
        err.contains("another flannel-agent is running with pin root"),
        "{err}"
    );
    assert!(lab.nodes[0].agent_running(), "{}", lab.logs());
    assert_eq!(lab.fdb(0), fdb_before);
    assert_eq!(
        pinned_links(),
        links_before,
        "the second agent changed the links"
    );
    // It refused before writing anything: no lease, no subnet.env.
    assert_eq!(
        leases(),
        leases_before,
        "the second agent wrote the lease store"
    );
    assert!(!lab.dir.join("second.env").exists());
    let (sent, received) = bg.finish().unwrap();
    flannel_tests::chaos("a second agent on the node", sent, received);
    assert_eq!((sent, received), (200, 200), "{}", lab.logs());
}

/// Restarts (SIGKILL, SIGTERM, an upgrade) on the file source lose no ping
/// and retransmit no TCP segment.
#[test]
fn file_source_restarts_under_traffic_lose_nothing() {
    if !prereq::ready("file_restarts") {
        return;
    }
    let mut lab = Lab::new("filers", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    lab.wait_fdb_entries(1, 1).unwrap();
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let cost = lab.restarts_under_traffic(0, 1).unwrap();
    flannel_tests::chaos(
        "agent restarts (SIGKILL, SIGTERM, upgrade), file source",
        cost.pings_sent,
        cost.pings_received,
    );
    assert_eq!(
        (cost.pings_sent, cost.pings_received, cost.retransmits),
        (500, 500, 0),
        "{}",
        lab.logs()
    );
}
