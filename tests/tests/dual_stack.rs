//! Dual-stack overlays as Flannel builds them (EnableIPv6): IPv4 over
//! flannel.1, IPv6 over flannel-v6.1 on the IPv6 underlay, next to stock
//! nodes whose flannel-v6.1 is the kernel's VXLAN device programmed exactly
//! as flanneld programs it.
use std::{fs, time::Duration};

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    membership6::all_pairs_reach,
    prereq,
    traffic::{ping, tcp_exchange},
};

#[test]
fn dual_stack_node_talks_to_a_stock_dual_stack_node() {
    if !prereq::ready("dual_stack_with_stock") {
        return;
    }
    let mut lab = Lab::new_dual("ds2", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.nodes[0].agent_args = vec!["--metrics-port".into(), "9466".into()];
    lab.start_stock(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    let (ours, stock) = (&lab.nodes[0], &lab.nodes[1]);

    // subnet.env for the CNI plugin, as flanneld writes it for dual-stack.
    let env = fs::read_to_string(&ours.subnet_file).unwrap();
    assert!(
        env.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"),
        "{env}"
    );
    let subnet6 = ours.subnet6.clone().unwrap();
    assert!(
        subnet6.starts_with("fd00:10:244:") && subnet6.ends_with("::/64"),
        "{subnet6}"
    );
    // The MTU fits VXLAN over IPv6 (70 bytes) as well as over IPv4.
    assert!(env.contains("FLANNEL_MTU=1430\n"), "{env}");
    // Our lease, as a stock node reads it: the dual-stack key and both halves.
    let key = format!(
        "{}&{}",
        ours.subnet.as_deref().unwrap().replace('/', "-"),
        subnet6.replace('/', "-")
    );
    let lease = fs::read_to_string(lab.lease_dir().join("subnets").join(&key))
        .unwrap_or_else(|e| panic!("lease {key}: {e}\n{}", lab.logs()));
    let v: serde_json::Value = serde_json::from_str(&lease).unwrap();
    assert_eq!(
        v["PublicIPv6"],
        ours.public_ipv6.unwrap().to_string(),
        "{lease}"
    );
    assert_eq!(
        v["BackendV6Data"]["VtepMAC"],
        ours.vtep_mac6.clone().unwrap(),
        "{lease}"
    );
    assert_eq!(v["BackendV6Data"]["VNI"], 1, "{lease}");

    // flannel-v6.1 on our node, programmed as flanneld programs it.
    let dev = ours.ns.sh("ip -d link show flannel-v6.1").unwrap();
    assert!(dev.contains("vxlan id 1"), "{dev}");
    assert!(
        dev.contains(&format!("local {}", ours.public_ipv6.unwrap())),
        "{dev}"
    );
    assert!(
        dev.contains("dstport 8472") && dev.contains("nolearning"),
        "{dev}"
    );
    let vtep6 = stock.subnet6_base();
    let subnet6_stock = stock.subnet6.clone().unwrap();
    let routes = ours.ns.sh("ip -6 route show dev flannel-v6.1").unwrap();
    assert!(
        routes.contains(&format!("{subnet6_stock} via {vtep6} metric 1024 onlink")),
        "{routes}"
    );
    let neigh = ours.ns.sh("ip -6 neigh show dev flannel-v6.1").unwrap();
    assert!(
        neigh.contains(&format!(
            "{vtep6} lladdr {} PERMANENT",
            stock.vtep_mac6.clone().unwrap()
        )),
        "{neigh}"
    );
    let fdb = ours.ns.sh("bridge fdb show dev flannel-v6.1").unwrap();
    assert!(
        fdb.contains(&format!(
            "{} dst {} self permanent",
            stock.vtep_mac6.clone().unwrap(),
            stock.public_ipv6.unwrap()
        )),
        "{fdb}"
    );

    // The programs' IPv6 members, as an operator lists them.
    let fdb6 = ours.show("fdb6").unwrap();
    assert!(
        fdb6.contains(&format!(
            "{} dev flannel-v6.1 dst {} self permanent  # {subnet6_stock}",
            stock.vtep_mac6.clone().unwrap(),
            stock.public_ipv6.unwrap()
        )),
        "{fdb6}"
    );
    all_pairs_reach(&lab);
    // IPv6 from the stock node is decapsulated by our programs, not by flannel-v6.
    let v6_rx = || lab.nodes[0].dev_stat("flannel-v6.1", "rx_packets");
    let (decap, kernel) = (lab.counter(0, "rx_decap"), v6_rx());
    assert_eq!(
        ping(&lab.nodes[1].pod, lab.nodes[0].pod_ip6(), 10, 0.02).unwrap(),
        (10, 10)
    );
    assert!(lab.counter(0, "rx_decap") - decap >= 10, "{}", lab.logs());
    assert_eq!(
        v6_rx() - kernel,
        0,
        "flannel-v6 decapsulated what the programs should have"
    );
    // And our programs encapsulate IPv6 towards it; its kernel decapsulates.
    let stock_rx = || lab.nodes[1].dev_stat("flannel-v6.1", "rx_packets");
    let (encap, theirs) = (lab.counter(0, "tx_encap"), stock_rx());
    let direct = (lab.counter(0, "tx_direct6"), lab.counter(0, "rx_direct6"));
    assert_eq!(
        ping(&lab.nodes[0].pod, lab.nodes[1].pod_ip6(), 10, 0.02).unwrap(),
        (10, 10)
    );
    assert!(lab.counter(0, "tx_encap") - encap >= 10, "{}", lab.logs());
    assert!(stock_rx() - theirs >= 10);
    // Both ways on the direct path: the stock node's kernel VXLAN and our
    // programs speak one wire.
    assert!(
        lab.counter(0, "tx_direct6") - direct.0 >= 10
            && lab.counter(0, "rx_direct6") - direct.1 >= 10,
        "IPv6 direct path with a stock peer\n{}",
        lab.logs()
    );
    // The outer UDP checksum as a receiver verifies it: no offloads on the
    // way (our underlay computes every checksum, the stock node's checks
    // every one), bulk TCP content-checked, and not one checksum error.
    // (The pod sends segments, not aggregates: those are flannel-v6's.)
    lab.nodes[0]
        .pod
        .sh("ethtool -K eth0 tso off gso off")
        .unwrap();
    ours.ns.sh("ethtool -K eth0 tx off").unwrap();
    stock.ns.sh("ethtool -K eth0 rx off").unwrap();
    let csum_errors = || -> u64 {
        let snmp = lab.nodes[1].ns.sh("cat /proc/net/snmp6").unwrap();
        snmp.lines()
            .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (errors, encap) = (csum_errors(), lab.counter(0, "tx_encap"));
    tcp_exchange(
        &lab.nodes[0].pod,
        &lab.nodes[1].pod,
        lab.nodes[1].pod_ip6(),
        5204,
        1 << 20,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_eq!(
        ping(&lab.nodes[0].pod, lab.nodes[1].pod_ip6(), 5, 0.02).unwrap(),
        (5, 5)
    );
    assert_eq!(
        csum_errors(),
        errors,
        "outer UDP checksum errors at the stock node"
    );
    assert!(
        lab.counter(0, "tx_encap") - encap > 100,
        "bulk TCP over our IPv6 encap"
    );
    // Metrics: the IPv6 peers, and the IPv6 reasons among the datapath's.
    let m = lab.nodes[0].ns.http_get(9466, "/metrics").unwrap();
    assert!(
        m.contains("flannel_ebpf_leases{state=\"applied_ipv6\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("flannel_ebpf_datapath_packets_total{reason=\"tx_fallback_ipv6_gso\"}"),
        "{m}"
    );
    // Neighbour discovery across the overlay: each pod resolved the other's gateway.
    let nd = lab.nodes[0].pod.sh("ip -6 neigh show dev eth0").unwrap();
    assert!(nd.contains("lladdr"), "{nd}");
    // Bulk TCP over IPv6 both ways, content checked.
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    tcp_exchange(&a.pod, &b.pod, b.pod_ip6(), 5201, 4 << 20).unwrap();
    tcp_exchange(&b.pod, &a.pod, a.pod_ip6(), 5202, 4 << 20).unwrap();
    // And IPv4 still over the eBPF data path.
    let tx = lab.counter(0, "tx_encap");
    tcp_exchange(&a.pod, &b.pod, b.pod_ip(), 5203, 1 << 20).unwrap();
    assert!(lab.counter(0, "tx_encap") > tx);
}

#[test]
fn three_dual_stack_nodes_over_a_routed_underlay() {
    if !prereq::ready("dual_stack_routed") {
        return;
    }
    let mut lab = Lab::new_dual(
        "ds3",
        Topology::Routed,
        &[Kind::Ebpf, Kind::Ebpf, Kind::Stock],
    )
    .unwrap();
    lab.start_stock(2, 9).unwrap();
    // One node decapsulates at XDP, the other at TC (veth's default).
    lab.nodes[1].agent_args = vec!["--decap".into(), "xdp".into()];
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.program_stock_peers().unwrap();
    all_pairs_reach(&lab);
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let decap = (lab.counter(0, "rx_decap"), lab.counter(1, "rx_decap"));
    tcp_exchange(&a.pod, &b.pod, b.pod_ip6(), 5211, 2 << 20).unwrap();
    tcp_exchange(&b.pod, &a.pod, a.pod_ip6(), 5212, 2 << 20).unwrap();
    // Both hooks decapsulated IPv6 (TC leaves GSO aggregates to flannel-v6).
    assert!(lab.counter(0, "rx_decap") > decap.0 && lab.counter(1, "rx_decap") > decap.1);
    // A node leaves: its IPv6 routes, neighbours and FDB entries go with it.
    let (s6, mac6) = (
        lab.nodes[1].subnet6.clone().unwrap(),
        lab.nodes[1].vtep_mac6.clone().unwrap(),
    );
    lab.nodes[1].stop_agent().unwrap();
    let entries = fs::read_dir(lab.lease_dir().join("subnets")).unwrap();
    for e in entries.flatten() {
        if e.file_name()
            .to_string_lossy()
            .contains(&s6.replace('/', "-"))
        {
            fs::remove_file(e.path()).unwrap();
        }
    }
    let n0 = &lab.nodes[0];
    flannel_tests::wait_for(
        "the departed node's IPv6 entries to go",
        Duration::from_secs(10),
        || {
            let r = n0.ns.sh("ip -6 route show dev flannel-v6.1").ok()?;
            let f = n0.ns.sh("bridge fdb show dev flannel-v6.1").ok()?;
            (!r.contains(&s6) && !f.contains(&mac6)).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    // The stock node is still reached.
    assert_eq!(
        ping(&n0.pod, lab.nodes[2].pod_ip6(), 3, 0.05).unwrap(),
        (3, 3)
    );
}

#[test]
fn only_members_reach_flannel_v6() {
    if !prereq::ready("dual_stack_membership") {
        return;
    }
    const PORT: u16 = 5556;
    let mut lab = Lab::new_dual("ds6g", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    flannel_tests::membership6::only_members_reach_flannel_v6(&lab, PORT);
}

#[test]
fn a_pin_root_from_before_ipv6_is_shown_uninstalled_and_upgraded() {
    if !prereq::ready("pins_before_ipv6") {
        return;
    }
    let mut lab = Lab::new("ds6up", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    lab.nodes[0].stop_agent().unwrap();
    // What an earlier version pinned: no IPv6 maps, no pod delivery cache,
    // no IPv6 direct path.
    let root = lab.nodes[0].pin_root.clone();
    let added = [
        "config6",
        "fdb6",
        "next_hops6",
        "pod_hops",
        "route6",
        "stack_flows6",
        "pod_ports",
    ];
    for m in added {
        fs::remove_file(root.join(m)).unwrap();
    }
    let routes = lab.nodes[0].show("routes").unwrap();
    assert!(routes.contains("10.244.2.0/24"), "{routes}");
    assert_eq!(lab.nodes[0].show("fdb6").unwrap().trim(), "");
    // The version in between: CONFIG6 before the IPv6 direct path (44 bytes).
    let old_config6 = |lab: &Lab| {
        let _ = fs::remove_file(root.join("config6"));
        lab.nodes[0]
            .ns
            .nsenter(&format!(
                "bpftool map create {} type array key 4 value 44 entries 1 name config6",
                root.join("config6").display()
            ))
            .unwrap_or_else(|e| panic!("bpftool map create: {e}"));
    };
    old_config6(&lab);
    let routes = lab.nodes[0].show("routes").unwrap();
    assert!(routes.contains("10.244.2.0/24"), "{routes}");
    // The agent of this version adds them, replaces the old layout and carries on.
    lab.spawn_agent(0).unwrap();
    flannel_tests::wait_for(
        "the maps added since to be pinned",
        Duration::from_secs(10),
        || added.iter().all(|m| root.join(m).exists()).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let config6 = lab.nodes[0]
        .ns
        .nsenter(&format!(
            "bpftool map show pinned {}",
            root.join("config6").display()
        ))
        .unwrap();
    assert!(
        config6.contains("value 64B"),
        "CONFIG6 not replaced: {config6}"
    );
    lab.nodes[0].stop_agent().unwrap();
    fs::remove_file(root.join("fdb6")).unwrap();
    old_config6(&lab);
    // Uninstall hands the peers back to the kernel all the same.
    let out = lab.nodes[0]
        .ns
        .nsenter(&format!(
            "{} uninstall --pin-root {}",
            flannel_tests::agent_path().display(),
            root.display()
        ))
        .unwrap_or_else(|e| panic!("uninstall: {e}"));
    let _ = out;
    let fdb = lab.nodes[0].ns.sh("bridge fdb show dev flannel.1").unwrap();
    assert!(fdb.contains("dst 10.1.5.12 self permanent"), "{fdb}");
    assert!(!root.exists(), "pin root left behind");
}
