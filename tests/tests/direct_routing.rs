//! Backend.DirectRouting: peers whose public IP is on-link get a plain route
//! on the underlay and no VXLAN; when the topology changes so that a peer is
//! no longer on-link, it moves to VXLAN (Flannel never re-evaluates).
use std::time::Duration;

use flannel_tests::{
    lab::{Kind, Lab, NETWORK, NETWORK6, Topology},
    prereq,
    traffic::{ping, wait_reachable},
    wait_for,
};

#[test]
fn on_link_peers_are_routed_directly_and_re_evaluated() {
    if !prereq::ready("direct_routing") {
        return;
    }
    let mut lab = Lab::new(
        "drt",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    std::fs::write(
        lab.lease_dir().join("config"),
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan","DirectRouting":true}}}}"#),
    )
    .unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_stock(2, 3).unwrap();
    lab.nodes[0].agent_args = ["--resync-interval", "1"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    // The stock peers route back to us directly too (as flanneld with DirectRouting).
    for i in [1, 2] {
        lab.nodes[i]
            .ns
            .sh("ip route replace 10.244.1.0/24 via 10.1.5.11 dev eth0")
            .unwrap();
    }
    let n = &lab.nodes[0];
    wait_for("direct routes", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -4 route show").ok()?;
        (r.contains("10.244.2.0/24 via 10.1.5.12 dev eth0")
            && r.contains("10.244.3.0/24 via 10.1.5.13 dev eth0"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", n.ns.sh("ip -4 route").unwrap(), lab.logs()));
    // No VXLAN route for on-link peers; the kernel keeps only the Network route.
    assert!(
        n.overlay_routes().trim().is_empty(),
        "{}",
        n.overlay_routes()
    );
    assert!(n.has_one_kernel_route(), "{:?}", n.vtep_kernel_tables());
    assert!(lab.fdb(0).is_empty(), "no VXLAN entries for on-link peers");
    let tx = lab.counter(0, "tx_encap");
    for i in [1, 2] {
        wait_reachable(&n.pod, lab.nodes[i].pod_ip(), Duration::from_secs(10)).unwrap();
        assert_eq!(
            ping(&n.pod, lab.nodes[i].pod_ip(), 5, 0.05).unwrap(),
            (5, 5)
        );
    }
    assert_eq!(
        lab.counter(0, "tx_encap"),
        tx,
        "direct routing must not encapsulate"
    );

    // Node 3 is now reached through node 2 (a more specific route with a
    // gateway): no longer on-link, so it moves to VXLAN at the next pass.
    n.ns.sh("ip route add 10.1.5.13/32 via 10.1.5.12 dev eth0")
        .unwrap();
    wait_for("node 3 to move to VXLAN", Duration::from_secs(5), || {
        let r = n.overlay_routes();
        (r.contains("10.244.3.0/24 via 10.244.3.0") && lab.fdb(0).len() == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", n.ns.sh("ip -4 route").unwrap(), lab.logs()));
    assert!(
        n.ns.sh("ip -4 route show")
            .unwrap()
            .contains("10.244.2.0/24 via 10.1.5.12 dev eth0")
    );
    wait_reachable(&n.pod, lab.nodes[2].pod_ip(), Duration::from_secs(10)).unwrap();
    assert_eq!(
        ping(&n.pod, lab.nodes[2].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );
    assert!(
        lab.counter(0, "tx_encap") >= tx + 5,
        "node 3 now goes through VXLAN"
    );
}

/// Dual-stack with DirectRouting: on-link peers' IPv6 subnets are routed
/// `via <PublicIPv6>` on the underlay (no VXLAN over IPv6 either way), and a
/// peer that moves behind a router goes back to flannel-v6.
#[test]
fn on_link_ipv6_peers_are_routed_directly_and_re_evaluated() {
    if !prereq::ready("direct_routing_ipv6") {
        return;
    }
    let mut lab = Lab::new_dual(
        "drt6",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    std::fs::write(
        lab.lease_dir().join("config"),
        format!(
            r#"{{"Network":"{NETWORK}","EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{{"Type":"vxlan","DirectRouting":true}}}}"#
        ),
    )
    .unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_stock(2, 3).unwrap();
    lab.nodes[0].agent_args = ["--resync-interval", "1"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    // The stock peers route back to us directly (flanneld with DirectRouting).
    let (subnet, subnet6) = (
        lab.nodes[0].subnet.clone().unwrap(),
        lab.nodes[0].subnet6.clone().unwrap(),
    );
    let ip6 = lab.nodes[0].public_ipv6.unwrap();
    for i in [1, 2] {
        let ns = &lab.nodes[i].ns;
        ns.sh(&format!("ip route replace {subnet} via 10.1.5.11 dev eth0"))
            .unwrap();
        ns.sh(&format!("ip -6 route replace {subnet6} via {ip6} dev eth0"))
            .unwrap();
    }
    let n = &lab.nodes[0];
    let direct = |i: usize| {
        let p = &lab.nodes[i];
        format!(
            "{} via {} dev eth0",
            p.subnet6.clone().unwrap(),
            p.public_ipv6.unwrap()
        )
    };
    wait_for("IPv6 direct routes", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -6 route show").ok()?;
        (r.contains(&direct(1)) && r.contains(&direct(2))).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    // Nothing for them on flannel-v6: no route, neighbour or FDB entry.
    let on_vtep = n.ns.sh("ip -6 route show dev flannel-v6.1").unwrap();
    assert!(!on_vtep.contains(" via "), "{on_vtep}");
    let fdb = n.ns.sh("bridge fdb show dev flannel-v6.1").unwrap();
    assert!(!fdb.contains(" dst "), "{fdb}");
    let perm = n.ns.sh("ip -6 neigh show dev flannel-v6.1").unwrap();
    assert!(!perm.contains("PERMANENT"), "{perm}");
    for i in [1, 2] {
        let (rx, tx) = (
            lab.nodes[i].dev_stat("flannel-v6.1", "rx_packets"),
            lab.nodes[i].dev_stat("flannel-v6.1", "tx_packets"),
        );
        wait_reachable(&n.pod, lab.nodes[i].pod_ip6(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
        assert_eq!(
            ping(&n.pod, lab.nodes[i].pod_ip6(), 5, 0.05).unwrap(),
            (5, 5)
        );
        assert_eq!(
            ping(&lab.nodes[i].pod, n.pod_ip6(), 5, 0.05).unwrap(),
            (5, 5)
        );
        // Plain IPv6 on the underlay both ways: the peer's VXLAN device is idle.
        assert_eq!(
            (
                lab.nodes[i].dev_stat("flannel-v6.1", "rx_packets"),
                lab.nodes[i].dev_stat("flannel-v6.1", "tx_packets")
            ),
            (rx, tx),
            "node {} saw VXLAN over IPv6",
            i + 1
        );
    }

    // Node 3 is now reached through node 2: not on-link, so its IPv6 half
    // moves to flannel-v6 at the next pass (node 2 forwards the VXLAN).
    n.ns.sh("ip -6 route add fc00::13/128 via fc00::12 dev eth0")
        .unwrap();
    let s3 = lab.nodes[2].subnet6.clone().unwrap();
    let vtep3 = lab.nodes[2].subnet6_base();
    wait_for(
        "node 3 to move to flannel-v6",
        Duration::from_secs(5),
        || {
            let r = n.ns.sh("ip -6 route show").ok()?;
            (r.contains(&format!("{s3} via {vtep3} dev flannel-v6.1")) && !r.contains(&direct(2)))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert!(n.ns.sh("ip -6 route show").unwrap().contains(&direct(1)));
    let rx3 = lab.nodes[2].dev_stat("flannel-v6.1", "rx_packets");
    wait_reachable(&n.pod, lab.nodes[2].pod_ip6(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert_eq!(
        ping(&n.pod, lab.nodes[2].pod_ip6(), 5, 0.05).unwrap(),
        (5, 5)
    );
    assert!(
        lab.nodes[2].dev_stat("flannel-v6.1", "rx_packets") >= rx3 + 5,
        "node 3 is now reached over VXLAN"
    );

    // EnableIPv6 switched off (subnet.env kept, as on a node): the IPv6
    // direct routes go with flannel-v6; the IPv4 ones stay.
    let direct2 = direct(1);
    lab.nodes[0].stop_agent().unwrap();
    std::fs::write(
        lab.lease_dir().join("config"),
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan","DirectRouting":true}}}}"#),
    )
    .unwrap();
    lab.spawn_agent(0).unwrap();
    let n = &lab.nodes[0];
    wait_for(
        "the IPv6 direct routes to go",
        Duration::from_secs(10),
        || {
            let r = n.ns.sh("ip -6 route show").ok()?;
            (!r.contains(&direct2) && n.ns.sh("ip link show flannel-v6.1").is_err()).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert!(
        n.log_text()
            .contains("IPv6 off: removed 1 routes to fd00:10:244::/56 from eth0"),
        "{}",
        lab.logs()
    );
    assert!(n.ns.sh("ip -4 route show").unwrap().contains(&format!(
        "{} via 10.1.5.12 dev eth0",
        lab.nodes[1].subnet.clone().unwrap()
    )));
}
