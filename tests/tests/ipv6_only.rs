//! IPv6-only overlays as Flannel builds them (EnableIPv4 false): no IPv4
//! anywhere — underlay, pods, overlay — and flannel-v6.1 the only VTEP, next
//! to stock nodes whose flannel-v6.1 is the kernel's VXLAN device programmed
//! as flanneld programs it.
use std::{fs, time::Duration};

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    membership6::all_pairs_reach,
    prereq,
    traffic::{ping, tcp_exchange, wait_reachable},
};

#[test]
fn ipv6_only_node_talks_to_a_stock_ipv6_only_node() {
    if !prereq::ready("ipv6_only_with_stock") {
        return;
    }
    let mut lab = Lab::new_v6_only("v6o2", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.nodes[0].agent_args = vec!["--metrics-port".into(), "9467".into()];
    lab.start_stock(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    let (ours, stock) = (&lab.nodes[0], &lab.nodes[1]);

    // subnet.env as flanneld writes it with EnableIPv4 false: no IPv4 pair.
    let env = fs::read_to_string(&ours.subnet_file).unwrap();
    assert!(!env.contains("FLANNEL_NETWORK="), "{env}");
    assert!(!env.contains("FLANNEL_SUBNET="), "{env}");
    assert!(
        env.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"),
        "{env}"
    );
    // The MTU flannel-v6 carries (underlay - 70); flanneld writes underlay
    // - 50 here, more than its own flannel-v6 takes.
    assert!(env.contains("FLANNEL_MTU=1430\n"), "{env}");
    // Our lease, as a stock IPv6-only node writes and reads it.
    let subnet6 = ours.subnet6.clone().unwrap();
    let key = format!("0.0.0.0-0&{}", subnet6.replace('/', "-"));
    let lease = fs::read_to_string(lab.lease_dir().join("subnets").join(&key))
        .unwrap_or_else(|e| panic!("lease {key}: {e}\n{}", lab.logs()));
    let v: serde_json::Value = serde_json::from_str(&lease).unwrap();
    assert_eq!(v["PublicIP"], "0.0.0.0", "{lease}");
    assert_eq!(
        v["PublicIPv6"],
        ours.public_ipv6.unwrap().to_string(),
        "{lease}"
    );
    assert!(v.get("BackendData").is_none(), "{lease}");
    assert_eq!(
        v["BackendV6Data"]["VtepMAC"],
        ours.vtep_mac6.clone().unwrap(),
        "{lease}"
    );
    // No IPv4 VTEP: flannel-v6.1 only, programmed as flanneld programs it.
    assert!(ours.ns.sh("ip link show flannel.1").is_err());
    let dev = ours.ns.sh("ip -d link show flannel-v6.1").unwrap();
    assert!(
        dev.contains("vxlan id 1") && dev.contains(&format!("local {}", ours.public_ipv6.unwrap())),
        "{dev}"
    );
    let vtep6 = stock.subnet6_base();
    let stock6 = stock.subnet6.clone().unwrap();
    let routes = ours.ns.sh("ip -6 route show dev flannel-v6.1").unwrap();
    assert!(
        routes.contains(&format!("{stock6} via {vtep6} metric 1024 onlink")),
        "{routes}"
    );
    let fdb6 = ours.show("fdb6").unwrap();
    assert!(
        fdb6.contains(&format!(
            "{} dev flannel-v6.1 dst {} self permanent  # {stock6}",
            stock.vtep_mac6.clone().unwrap(),
            stock.public_ipv6.unwrap()
        )),
        "{fdb6}"
    );
    // The decap program on the underlay, no IPv4 encap link, encap6 on flannel-v6.
    use flannel_agent::ebpf::datapath::{LINK_DECAP_TC, LINK_ENCAP, LINK_ENCAP6};
    for (link, pinned) in [
        (LINK_DECAP_TC, true),
        (LINK_ENCAP6, true),
        (LINK_ENCAP, false),
    ] {
        assert_eq!(
            ours.pin_root.join(link).exists(),
            pinned,
            "{link} under {}",
            ours.pin_root.display()
        );
    }

    all_pairs_reach(&lab);
    // IPv6 from the stock node is decapsulated by our programs and handed
    // straight to the pod's bridge (the direct path, on by default).
    let (decap, direct_in, kernel) = (
        lab.counter(0, "rx_decap"),
        lab.counter(0, "rx_direct6"),
        ours.dev_stat("flannel-v6.1", "rx_packets"),
    );
    assert_eq!(
        ping(&stock.pod, ours.pod_ip6(), 10, 0.02).unwrap(),
        (10, 10)
    );
    assert!(lab.counter(0, "rx_decap") - decap >= 10, "{}", lab.logs());
    assert!(
        lab.counter(0, "rx_direct6") - direct_in >= 10,
        "{}",
        lab.logs()
    );
    assert_eq!(ours.dev_stat("flannel-v6.1", "rx_packets") - kernel, 0);
    // And encapsulated by them towards it at the pod bridge, flannel-v6
    // never seeing it; its kernel decapsulates.
    let (encap, direct_out, sent, theirs) = (
        lab.counter(0, "tx_encap"),
        lab.counter(0, "tx_direct6"),
        ours.dev_stat("flannel-v6.1", "tx_packets"),
        stock.dev_stat("flannel-v6.1", "rx_packets"),
    );
    assert_eq!(
        ping(&ours.pod, stock.pod_ip6(), 10, 0.02).unwrap(),
        (10, 10)
    );
    assert!(lab.counter(0, "tx_encap") - encap >= 10, "{}", lab.logs());
    assert!(
        lab.counter(0, "tx_direct6") - direct_out >= 10,
        "{}",
        lab.logs()
    );
    assert_eq!(ours.dev_stat("flannel-v6.1", "tx_packets") - sent, 0);
    assert!(stock.dev_stat("flannel-v6.1", "rx_packets") - theirs >= 10);
    // Bulk TCP both ways, content checked.
    tcp_exchange(&ours.pod, &stock.pod, stock.pod_ip6(), 5301, 4 << 20)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    tcp_exchange(&stock.pod, &ours.pod, ours.pod_ip6(), 5302, 4 << 20)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    // Per-peer counters: the stock node has its own stats slot, both ways.
    let peers: serde_json::Value =
        serde_json::from_str(&ours.show("peers --json").unwrap()).unwrap();
    let peer = peers
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|p| p["public_ip"] == stock.public_ipv6.unwrap().to_string())
        })
        .unwrap_or_else(|| panic!("no IPv6-only peer in {peers}"));
    assert_eq!(peer["subnets"][0], stock6, "{peer}");
    assert!(peer["tx_packets"].as_u64().unwrap() >= 10, "{peer}");
    assert!(peer["rx_packets"].as_u64().unwrap() >= 10, "{peer}");
    // Neighbour discovery across the overlay.
    let nd = ours.pod.sh("ip -6 neigh show dev eth0").unwrap();
    assert!(nd.contains("lladdr"), "{nd}");
    let m = ours.ns.http_get(9467, "/metrics").unwrap();
    assert!(
        m.contains("flannel_ebpf_leases{state=\"applied_ipv6\"} 1"),
        "{m}"
    );
    // flannel-v6.1 deleted under the agent: start-up runs again and rebuilds it.
    let index = ours
        .ns
        .sh("cat /sys/class/net/flannel-v6.1/ifindex")
        .unwrap();
    ours.ns.sh("ip link del flannel-v6.1").unwrap();
    flannel_tests::wait_for(
        "flannel-v6.1 to be re-created",
        Duration::from_secs(20),
        || {
            let now = ours.ns.sh("cat /sys/class/net/flannel-v6.1/ifindex").ok()?;
            (now != index).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_reachable(&stock.pod, ours.pod_ip6(), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    let logs = lab.logs();
    assert!(lab.nodes[0].agent_running(), "{logs}");
    assert!(
        lab.nodes[0].log_text().contains("flannel-v6.1 was deleted"),
        "{logs}"
    );
}

#[test]
fn three_ipv6_only_nodes_over_a_routed_underlay() {
    if !prereq::ready("ipv6_only_routed") {
        return;
    }
    let mut lab = Lab::new_v6_only(
        "v6o3",
        Topology::Routed,
        &[Kind::Ebpf, Kind::Ebpf, Kind::Stock],
    )
    .unwrap();
    lab.start_stock(2, 9).unwrap();
    // One node decapsulates at XDP, the other at TC.
    lab.nodes[1].agent_args = vec!["--decap".into(), "xdp".into()];
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.program_stock_peers().unwrap();
    // Nothing of IPv4 on the nodes: the underlay has IPv6 alone.
    let v4 = lab.nodes[0].ns.sh("ip -4 addr show dev eth0").unwrap();
    assert!(!v4.contains("inet "), "{v4}");
    all_pairs_reach(&lab);
    let (a, b, c) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    let decap = (lab.counter(0, "rx_decap"), lab.counter(1, "rx_decap"));
    tcp_exchange(&a.pod, &b.pod, b.pod_ip6(), 5311, 2 << 20).unwrap();
    tcp_exchange(&b.pod, &a.pod, a.pod_ip6(), 5312, 2 << 20).unwrap();
    tcp_exchange(&c.pod, &a.pod, a.pod_ip6(), 5313, 1 << 20).unwrap();
    tcp_exchange(&b.pod, &c.pod, c.pod_ip6(), 5314, 1 << 20).unwrap();
    assert!(lab.counter(0, "rx_decap") > decap.0 && lab.counter(1, "rx_decap") > decap.1);
    // A restarted agent keeps its lease (by its public IPv6) and the traffic flows.
    let before = lab.nodes[0].subnet6.clone();
    lab.nodes[0].stop_agent().unwrap();
    lab.start_agent(0).unwrap();
    assert_eq!(lab.nodes[0].subnet6, before);
    let leases = fs::read_dir(lab.lease_dir().join("subnets"))
        .unwrap()
        .count();
    assert_eq!(leases, 3, "one lease per node");
    all_pairs_reach(&lab);
    // A node leaves: its IPv6 routes and FDB entries go with it.
    let (s6, mac6) = (
        lab.nodes[1].subnet6.clone().unwrap(),
        lab.nodes[1].vtep_mac6.clone().unwrap(),
    );
    lab.nodes[1].stop_agent().unwrap();
    fs::remove_file(
        lab.lease_dir()
            .join("subnets")
            .join(format!("0.0.0.0-0&{}", s6.replace('/', "-"))),
    )
    .unwrap();
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
    assert_eq!(
        ping(&n0.pod, lab.nodes[2].pod_ip6(), 3, 0.05).unwrap(),
        (3, 3)
    );
    // Handed back to the kernel: the pins go, flannel-v6.1 carries on alone.
    lab.nodes[0].stop_agent().unwrap();
    let n0 = &lab.nodes[0];
    n0.ns
        .nsenter(&format!(
            "{} uninstall --pin-root {}",
            flannel_tests::agent_path().display(),
            n0.pin_root.display()
        ))
        .unwrap_or_else(|e| panic!("uninstall: {e}"));
    assert!(!n0.pin_root.exists(), "pin root left behind");
    // The replies are decapsulated by n1's own flannel-v6.1 now.
    let rx = n0.dev_stat("flannel-v6.1", "rx_packets");
    assert_eq!(
        ping(&n0.pod, lab.nodes[2].pod_ip6(), 3, 0.05).unwrap(),
        (3, 3)
    );
    assert!(n0.dev_stat("flannel-v6.1", "rx_packets") >= rx + 3);
}

/// The membership promise on an IPv6-only node: VXLAN from a host that is
/// not a member (whole, fragmented, to other local addresses) and a
/// member's packet spoofed inside never reach the pod.
#[test]
fn only_members_reach_an_ipv6_only_node() {
    if !prereq::ready("ipv6_only_membership") {
        return;
    }
    const PORT: u16 = 5557;
    let mut lab = Lab::new_v6_only("v6og", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    flannel_tests::membership6::only_members_reach_flannel_v6(&lab, PORT);
}
