//! What start-up set on a node, changed under a running agent or between two
//! runs: the agent notices, builds it again, and traffic flows again.
use std::time::Duration;

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    prereq,
    traffic::{ping, wait_reachable},
    wait_for,
};

fn two_nodes(prefix: &str) -> Lab {
    let mut lab = Lab::new(prefix, Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
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
    lab
}

/// Wait for node 0's log to say `what`, then for the pods to reach each
/// other; report how long `fault` (just done) cut the traffic.
fn recovers(lab: &mut Lab, what: &str, fault: &str) {
    let t0 = std::time::Instant::now();
    wait_for(what, Duration::from_secs(15), || {
        lab.nodes[0].log_text().contains(what).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    eprintln!("chaos: {fault}: traffic back after {:?}", t0.elapsed());
    // Our programs carry it again (encap on the live flannel.1).
    let before = lab.counter(0, "tx_encap");
    assert_eq!(
        ping(&lab.nodes[0].pod, lab.nodes[1].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );
    assert!(lab.counter(0, "tx_encap") >= before + 5, "{}", lab.logs());
    assert!(lab.nodes[0].agent_running(), "{}", lab.logs());
    assert_eq!(lab.map_len(0, "fdb"), 1, "{}", lab.logs());
}

#[test]
fn flannel1_deleted_while_running_is_rebuilt() {
    if !prereq::ready("vtep_deleted") {
        return;
    }
    let mut lab = two_nodes("vdel");
    lab.nodes[0].ns.sh("ip link del flannel.1").unwrap();
    recovers(
        &mut lab,
        "flannel.1 was deleted: running start-up again",
        "flannel.1 deleted while running",
    );
}

#[test]
fn pinned_link_removed_while_running_is_rebuilt() {
    if !prereq::ready("pin_removed") {
        return;
    }
    let mut lab = two_nodes("pinrm");
    let link = lab.nodes[0].pin_root.join("link_encap");
    std::fs::remove_file(&link).unwrap();
    recovers(
        &mut lab,
        "link_encap is gone",
        "encap link unpinned while running",
    );
    assert!(link.exists());
}

#[test]
fn underlay_mtu_change_is_applied() {
    if !prereq::ready("mtu_change") {
        return;
    }
    let mut lab = two_nodes("mtu");
    lab.nodes[0].ns.sh("ip link set eth0 mtu 1400").unwrap();
    recovers(
        &mut lab,
        "MTU changed (1500 → 1400)",
        "underlay MTU changed while running",
    );
    let mtu = lab.nodes[0]
        .ns
        .sh("cat /sys/class/net/flannel.1/mtu")
        .unwrap();
    assert_eq!(mtu.trim(), "1350");
    wait_for(
        "subnet.env with the new MTU",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&lab.nodes[0].subnet_file)
                .ok()
                .filter(|s| s.contains("FLANNEL_MTU=1350"))
        },
    )
    .unwrap();
}

/// flannel.1 re-created by hand between two runs: the pinned encap link is
/// defunct (its device is gone); the new agent attaches to the live device
/// instead of adopting it.
#[test]
fn restart_after_flannel1_was_recreated_attaches_to_the_live_device() {
    if !prereq::ready("vtep_recreated") {
        return;
    }
    let mut lab = two_nodes("vrec");
    lab.nodes[0].kill_agent();
    let n = &lab.nodes[0].ns;
    let mac = n.sh("cat /sys/class/net/flannel.1/address").unwrap();
    n.sh("ip link del flannel.1").unwrap();
    n.sh("ip link add flannel.1 type vxlan id 1 local 10.1.5.11 dev eth0 dstport 8472 nolearning")
        .unwrap();
    n.sh(&format!(
        "ip link set flannel.1 address {} mtu 1450 up",
        mac.trim()
    ))
    .unwrap();
    lab.spawn_agent(0).unwrap();
    recovers(
        &mut lab,
        "attaching anew",
        "flannel.1 re-created between two runs",
    );
}

/// Restart node 0's agent with net-conf.json saying VNI 2; wait for it to
/// refuse, and check it created no flannel.2. Returns its log, and the
/// config's path and old text to put back.
fn restart_with_vni_2(lab: &mut Lab) -> (String, std::path::PathBuf, String) {
    lab.nodes[0].stop_agent().unwrap();
    let config = lab.lease_dir().join("config");
    let before = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        before.replace(r#""Type":"vxlan""#, r#""Type":"vxlan","VNI":2"#),
    )
    .unwrap();
    lab.spawn_agent(0).unwrap();
    wait_for("the agent to refuse", Duration::from_secs(10), || {
        (!lab.nodes[0].agent_running()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(
        lab.nodes[0].ns.sh("ip link show flannel.2").is_err(),
        "flannel.2 was created"
    );
    (lab.nodes[0].log_text(), config, before)
}

/// A VNI change in net-conf.json while a data path is pinned for the old
/// one: refused at start with the way to do it, the old path left running.
#[test]
fn a_vni_change_is_refused_not_half_applied() {
    if !prereq::ready("vni_change") {
        return;
    }
    let mut lab = two_nodes("vni");
    let (log, config, before) = restart_with_vni_2(&mut lab);
    assert!(
        log.contains("net-conf.json says VNI 2 (flannel.2), but the data path pinned under")
            && log.contains("flannel-agent uninstall"),
        "{log}"
    );
    assert_eq!(
        ping(&lab.nodes[0].pod, lab.nodes[1].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );
    std::fs::write(&config, before).unwrap();
}

/// The node's underlay address changes under the running agent: it starts
/// up again on the new address, and its lease moves with it (same subnet,
/// new PublicIP) instead of being orphaned for a new subnet.
#[test]
fn underlay_address_change_moves_the_lease() {
    if !prereq::ready("addr_change") {
        return;
    }
    let mut lab = two_nodes("addrch");
    let subnet = lab.nodes[0].subnet.clone().unwrap();
    let n = &lab.nodes[0].ns;
    // The new address first (kept when the old one goes), as a DHCP renewal would.
    n.sh("sysctl -qw net.ipv4.conf.eth0.promote_secondaries=1")
        .unwrap();
    n.sh("ip addr add 10.1.5.31/24 dev eth0").unwrap();
    n.sh("ip addr del 10.1.5.11/24 dev eth0").unwrap();
    let key = subnet.replace('/', "-");
    let t0 = std::time::Instant::now();
    wait_for(
        "the lease to carry the new address",
        Duration::from_secs(15),
        || {
            std::fs::read_to_string(lab.lease_dir().join("subnets").join(&key))
                .ok()
                .filter(|v| v.contains(r#""PublicIP":"10.1.5.31""#))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    // Node 2 sends to the new address.
    wait_for(
        "node 2's FDB to name 10.1.5.31",
        Duration::from_secs(10),
        || {
            lab.fdb(1)
                .iter()
                .any(|(_, ip)| ip == "10.1.5.31")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    recovers(
        &mut lab,
        "the public IP 10.1.5.11 is no longer on the underlay eth0",
        "underlay address changed while running",
    );
    eprintln!(
        "chaos: address change: lease moved after {:?}",
        t0.elapsed()
    );
    let leases = std::fs::read_dir(lab.lease_dir().join("subnets"))
        .unwrap()
        .count();
    assert_eq!(leases, 2, "a lease was orphaned\n{}", lab.logs());
    assert!(
        lab.nodes[0].log_text().contains("moves with it"),
        "{}",
        lab.logs()
    );
}

/// net-conf.json's Port and MTU changed between runs (every node together):
/// flannel.1 is re-created on the new port, the programs follow it (the
/// pinned config), subnet.env carries the new MTU, and pods talk again.
#[test]
fn a_port_and_mtu_change_is_applied_whole() {
    if !prereq::ready("port_change") {
        return;
    }
    let mut lab = two_nodes("portch");
    lab.nodes[0].stop_agent().unwrap();
    lab.nodes[1].stop_agent().unwrap();
    let config = lab.lease_dir().join("config");
    let before = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        before.replace(
            r#""Type":"vxlan""#,
            r#""Type":"vxlan","Port":4789,"MTU":1400"#,
        ),
    )
    .unwrap();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    for i in 0..2 {
        let n = &lab.nodes[i];
        let link = n.ns.sh("ip -d link show flannel.1").unwrap();
        assert!(
            link.contains("dstport 4789") && link.contains("mtu 1400"),
            "{link}"
        );
        let env = std::fs::read_to_string(&n.subnet_file).unwrap();
        assert!(env.contains("FLANNEL_MTU=1400"), "{env}");
    }
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let (tx, rx) = (lab.counter(0, "tx_encap"), lab.counter(1, "rx_decap"));
    assert_eq!(
        ping(&lab.nodes[0].pod, lab.nodes[1].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );
    // Sent by our encap to the new port and taken by the peer's decap there.
    assert!(lab.counter(0, "tx_encap") >= tx + 5, "{}", lab.logs());
    assert!(lab.counter(1, "rx_decap") >= rx + 5, "{}", lab.logs());
    std::fs::write(&config, before).unwrap();
}

/// The same refusal on the kernel data path, where nothing is pinned: the
/// old flannel.1 is what would be left half-applied.
#[test]
fn a_vni_change_on_the_kernel_data_path_is_refused() {
    if !prereq::ready("vni_change_kernel") {
        return;
    }
    let mut lab = Lab::new("vnik", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    lab.nodes[0].agent_args = ["--datapath", "kernel"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let (log, config, before) = restart_with_vni_2(&mut lab);
    assert!(
        log.contains("net-conf.json says VNI 2 (flannel.2), but flannel.1 (VNI 1) from an earlier run remains"),
        "{log}"
    );
    std::fs::write(&config, before).unwrap();
}
