//! Leases added, changed (new VtepMAC, new public IP) and removed while the
//! agent runs: traffic follows within a second and nothing stale is left in
//! the maps or in the kernel's tables.
use std::time::{Duration, Instant};

use flannel_tests::{
    lab::{Kind, Lab, NETWORK, Topology},
    prereq, sh,
    traffic::{ping, wait_reachable},
    wait_for,
};

/// Everything node 0 holds about peers: maps and kernel tables on flannel.1.
fn state(lab: &Lab) -> (Vec<(String, String)>, usize, usize, String, String) {
    let n = &lab.nodes[0];
    let (routes, neigh) = n.vtep_kernel_tables();
    (
        lab.fdb(0),
        lab.map_len(0, "arp"),
        lab.map_len(0, "route"),
        routes,
        neigh,
    )
}

fn within_a_second(lab: &Lab, what: &str, ok: impl Fn(&Lab) -> bool) {
    let t0 = Instant::now();
    wait_for(what, Duration::from_secs(1), || ok(lab).then_some(()))
        .unwrap_or_else(|e| panic!("{e}: state {:?}\n{}", state(lab), lab.logs()));
    eprintln!("{what}: {:?}", t0.elapsed());
}

#[test]
fn lease_added_changed_removed_while_traffic_runs() {
    if !prereq::ready("lease_churn") {
        return;
    }
    let mut lab = Lab::new(
        "churn",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    let a = 0;
    wait_reachable(
        &lab.nodes[a].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap();

    // Added: a new stock node's lease appears.
    lab.start_stock(2, 3).unwrap();
    lab.program_stock_peers().unwrap();
    within_a_second(&lab, "lease added", |l| {
        l.fdb(0).len() == 2 && l.map_len(0, "route") == 2
    });
    assert_eq!(
        ping(&lab.nodes[a].pod, lab.nodes[2].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );

    // Changed VtepMAC: node 2 gets a new MAC, as after a re-created flannel.1.
    let old_mac = lab.nodes[1].vtep_mac.clone().unwrap();
    let new_mac = "02:42:8f:11:22:99".to_string();
    lab.nodes[1]
        .ns
        .sh(&format!("ip link set flannel.1 address {new_mac}"))
        .unwrap();
    lab.nodes[1].vtep_mac = Some(new_mac.clone());
    lab.program_stock_peers().unwrap();
    lab.write_lease(1).unwrap();
    within_a_second(&lab, "VtepMAC changed", |l| {
        let fdb = l.fdb(0);
        fdb.iter().any(|(m, _)| *m == new_mac) && !fdb.iter().any(|(m, _)| *m == old_mac)
    });
    let arp = lab.nodes[a].show("arp").unwrap();
    assert!(arp.contains(&new_mac) && !arp.contains(&old_mac), "{arp}");
    // However the peers change, the kernel's tables do not.
    assert!(
        lab.nodes[a].has_one_kernel_route(),
        "{:?}",
        lab.nodes[a].vtep_kernel_tables()
    );
    assert_eq!(
        ping(&lab.nodes[a].pod, lab.nodes[1].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );

    // Changed public IP: node 2 moves to 10.1.5.50 (flannel.1 re-created with the new local address).
    {
        let n = &lab.nodes[1];
        let old_ip = n.public_ip;
        // Old address first: deleting a primary address takes its secondaries with it.
        n.ns.sh(&format!("ip addr del {old_ip}/24 dev eth0"))
            .unwrap();
        n.ns.sh("ip addr add 10.1.5.50/24 dev eth0").unwrap();
        n.ns.sh("ip link del flannel.1").unwrap();
        n.ns.sh("ip link add flannel.1 type vxlan id 1 local 10.1.5.50 dev eth0 dstport 8472 nolearning")
        .unwrap();
        n.ns.sh(&format!(
            "ip link set flannel.1 address {new_mac} mtu 1450 up"
        ))
        .unwrap();
        n.ns.sh(&format!("ip addr add {}/32 dev flannel.1", n.subnet_base()))
            .unwrap();
    }
    lab.nodes[1].public_ip = "10.1.5.50".parse().unwrap();
    lab.program_stock_peers().unwrap();
    lab.write_lease(1).unwrap();
    within_a_second(&lab, "public IP changed", |l| {
        l.fdb(0)
            .iter()
            .any(|(m, ip)| *m == new_mac && ip == "10.1.5.50")
    });

    assert_eq!(
        ping(&lab.nodes[a].pod, lab.nodes[1].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );

    // Removed: node 2's lease goes away; nothing of it may remain anywhere.
    let gone = lab.nodes[1].subnet.clone().unwrap();
    std::fs::remove_file(lab.lease_dir().join("subnets").join(gone.replace('/', "-"))).unwrap();
    within_a_second(&lab, "lease removed", |l| l.fdb(0).len() == 1);
    let (fdb, arp, route, routes, neigh) = state(&lab);
    assert_eq!((fdb.len(), arp, route), (1, 1, 1), "{fdb:?}");
    assert!(!routes.contains(&gone), "stale kernel route: {routes}");
    assert!(!neigh.contains(&new_mac), "stale kernel neighbour: {neigh}");
    assert!(!lab.nodes[0].overlay_routes().contains(&gone));
    assert!(lab.nodes[0].has_one_kernel_route(), "{routes}{neigh}");
    assert!(!fdb.iter().any(|(m, _)| *m == new_mac || *m == old_mac));
    // The remaining peer still works.
    assert_eq!(
        ping(&lab.nodes[a].pod, lab.nodes[2].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );
}

#[test]
fn drift_is_repaired_by_the_periodic_resync() {
    if !prereq::ready("drift") {
        return;
    }
    let mut lab = Lab::new("drift", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    let subnet = lab.nodes[1].subnet.clone().unwrap();
    // Someone deletes the kernel's Network route, and the peer's entry in
    // the route map, by hand.
    let n = &lab.nodes[0];
    n.ns.sh(&format!("ip route del {NETWORK}")).unwrap();
    let addr: Vec<String> = subnet.split(['.', '/']).take(4).map(String::from).collect();
    sh(&format!(
        "bpftool map delete pinned {}/route key 24 0 0 0 {}",
        n.pin_root.display(),
        addr.join(" ")
    ))
    .unwrap();
    assert!(!n.overlay_routes().contains(&subnet));
    // Resync runs every 10 s by default, and reads the maps back.
    wait_for("the routes to come back", Duration::from_secs(15), || {
        (n.overlay_routes().contains(&subnet) && n.has_one_kernel_route()).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", n.vtep_kernel_tables(), lab.logs()));
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(5),
    )
    .unwrap();
}

fn write_peer(lab: &Lab, subnet: &str, ip: &str, mac: &str) {
    let v = format!(
        r#"{{"PublicIP":"{ip}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    );
    let dir = lab.lease_dir().join("subnets");
    let tmp = dir.join(format!(".t-{subnet}"));
    std::fs::write(&tmp, v).unwrap();
    std::fs::rename(&tmp, dir.join(subnet)).unwrap();
}

fn peer_json(lab: &Lab, ip: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&lab.nodes[0].show("peers --json").ok()?).ok()?;
    v.as_array()?.iter().find(|p| p["public_ip"] == ip).cloned()
}

/// 1000 add/change/remove cycles of one peer's lease while traffic to
/// another peer runs: nothing lost to it, nothing stale at the end, and a
/// node that takes over a departed node's stats slot starts from zero.
#[test]
fn a_thousand_lease_cycles_leave_other_peers_and_counters_alone() {
    if !prereq::ready("lease_cycles") {
        return;
    }
    let mut lab = Lab::new("cycle", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    // A fast poll, so that the agent applies most of the cycles' states
    // rather than the few it would sample at 200 ms.
    lab.nodes[0].agent_args = ["--poll-interval-ms", "5", "--metrics-port", "9471"]
        .map(String::from)
        .to_vec();
    lab.start_stock(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    let dst = lab.nodes[1].pod_ip();
    wait_reachable(&lab.nodes[0].pod, dst, Duration::from_secs(10)).unwrap();
    let baseline = state(&lab);

    let changes = |lab: &Lab| -> u64 {
        let m = lab.nodes[0]
            .ns
            .http_get(9471, "/metrics")
            .unwrap_or_default();
        ["added", "changed", "removed"]
            .iter()
            .filter_map(|k| {
                let key = format!("flannel_ebpf_lease_changes_total{{kind=\"{k}\"}} ");
                m.lines()
                    .find_map(|l| l.strip_prefix(key.as_str())?.parse::<u64>().ok())
            })
            .sum()
    };
    let changes_before = changes(&lab);
    let bg =
        flannel_tests::traffic::BackgroundPing::start(&lab.nodes[0].pod, dst, 3000, 10).unwrap();
    let subnets = lab.lease_dir().join("subnets");
    let pause = Duration::from_millis(6);
    for i in 0..1000u32 {
        let mac = format!("02:42:77:00:{:02x}:{:02x}", i >> 8, i & 0xff);
        write_peer(&lab, "10.244.9.0-24", "10.1.5.99", &mac);
        std::thread::sleep(pause);
        write_peer(&lab, "10.244.9.0-24", "10.1.5.98", &mac);
        std::thread::sleep(pause);
        std::fs::remove_file(subnets.join("10.244.9.0-24")).unwrap();
        std::thread::sleep(pause);
    }
    // The agent applied the churn, not a sample of it: of the 3000 states
    // written, a 200 ms poll would see under 100; a busy 2-core machine
    // running other labs still applies several hundred.
    let applied = changes(&lab) - changes_before;
    eprintln!("{applied} of 3000 lease changes applied");
    assert!(
        applied >= 300,
        "only {applied} lease changes applied\n{}",
        lab.logs()
    );
    let (sent, received) = bg.finish().unwrap();
    flannel_tests::chaos("1000 lease cycles of another peer", sent, received);
    assert_eq!((sent, received), (3000, 3000), "{}", lab.logs());
    within_a_second(&lab, "no stale entry after 1000 cycles", |l| {
        state(l) == baseline
    });

    // A peer that gets traffic (to an address behind it; nobody answers)...
    write_peer(&lab, "10.244.9.0-24", "10.1.5.99", "02:42:77:00:aa:01");
    within_a_second(&lab, "the churned peer back", |l| {
        peer_json(l, "10.1.5.99").is_some()
    });
    let _ = ping(
        &lab.nodes[0].pod,
        "10.244.9.5".parse::<std::net::Ipv4Addr>().unwrap(),
        5,
        0.02,
    );
    let old = peer_json(&lab, "10.1.5.99").unwrap();
    assert!(old["tx_packets"].as_u64().unwrap() >= 5, "{old}");
    // ...leaves while another arrives, in one pass: the newcomer starts at zero.
    write_peer(&lab, "10.244.8.0-24", "10.1.5.97", "02:42:77:00:bb:01");
    std::fs::remove_file(subnets.join("10.244.9.0-24")).unwrap();
    within_a_second(&lab, "the newcomer in, the leaver out", |l| {
        peer_json(l, "10.1.5.97").is_some() && peer_json(l, "10.1.5.99").is_none()
    });
    let new = peer_json(&lab, "10.1.5.97").unwrap();
    assert_eq!(new["tx_packets"], 0, "{new}");
    assert_eq!(new["tx_bytes"], 0, "{new}");
    // And on a later pass, when the freed slot is reused, too.
    std::fs::remove_file(subnets.join("10.244.8.0-24")).unwrap();
    within_a_second(&lab, "the newcomer gone", |l| {
        peer_json(l, "10.1.5.97").is_none()
    });
    write_peer(&lab, "10.244.7.0-24", "10.1.5.96", "02:42:77:00:cc:01");
    within_a_second(&lab, "a third peer in", |l| {
        peer_json(l, "10.1.5.96").is_some()
    });
    let third = peer_json(&lab, "10.1.5.96").unwrap();
    assert_eq!(third["tx_packets"], 0, "{third}");
}
