//! Backend host-gw: routes only. Peers announced as host-gw (ours and stock
//! flanneld's lease shape) get `<subnet> via <PublicIP>` on the underlay, no
//! VXLAN device and no eBPF programs; a peer that is not on-link is named in
//! an error and gets no route; a vxlan lease is ignored with a reason.
use std::{fs, time::Duration};

use flannel_tests::{
    lab::{Kind, Lab, NETWORK, NETWORK6, Topology},
    prereq,
    traffic::{ping, tcp_exchange, wait_reachable},
    wait_for,
};

#[test]
fn host_gw_routes_on_link_peers_and_names_the_others() {
    if !prereq::ready("host_gw") {
        return;
    }
    let mut lab = Lab::new(
        "hgw",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Ebpf, Kind::Stock],
    )
    .unwrap();
    fs::write(
        lab.lease_dir().join("config"),
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"host-gw"}}}}"#),
    )
    .unwrap();
    // Node 3 is stock flanneld with host-gw: its lease exactly as flanneld
    // writes it, its routes as flanneld programs them.
    lab.start_plain(2, 9).unwrap();
    fs::write(
        lab.lease_dir().join("subnets/10.244.9.0-24"),
        r#"{"PublicIP":"10.1.5.13","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#,
    )
    .unwrap();
    // Node 2 ran vxlan before: its flannel.1 is still there.
    lab.nodes[1]
        .ns
        .sh("ip link add flannel.1 type vxlan id 1 dstport 8472 nolearning")
        .unwrap();
    for i in [0, 1] {
        lab.nodes[i].agent_args = ["--resync-interval", "1"].map(String::from).to_vec();
        lab.start_agent(i).unwrap();
    }
    let log = lab.nodes[1].log_text();
    assert!(
        log.contains("flannel.1 or pins under")
            && log.contains("remain from a vxlan run")
            && log.contains("ip link del flannel.1"),
        "{log}"
    );
    assert!(
        !lab.nodes[0].log_text().contains("remain from a vxlan run"),
        "a clean node is not warned"
    );
    for i in [0, 1] {
        let peer = &lab.nodes[i];
        let subnet = peer.subnet.clone().unwrap();
        lab.nodes[2]
            .ns
            .sh(&format!(
                "ip route replace {subnet} via {} dev eth0",
                peer.public_ip
            ))
            .unwrap();
    }

    // Our leases say host-gw in flanneld's shape; subnet.env has the underlay MTU.
    let key = lab.nodes[0].subnet.clone().unwrap().replace('/', "-");
    let ours = fs::read_to_string(lab.lease_dir().join("subnets").join(key)).unwrap();
    assert_eq!(
        ours,
        r#"{"PublicIP":"10.1.5.11","BackendType":"host-gw","BackendData":null}"#
    );
    let env = fs::read_to_string(&lab.nodes[0].subnet_file).unwrap();
    assert!(env.contains("FLANNEL_MTU=1500"), "{env}");

    let n = &lab.nodes[0];
    let n2 = lab.nodes[1].subnet.clone().unwrap();
    wait_for("host-gw routes", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -4 route show").ok()?;
        (r.contains(&format!("{n2} via 10.1.5.12 dev eth0"))
            && r.contains("10.244.9.0/24 via 10.1.5.13 dev eth0"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", n.ns.sh("ip -4 route").unwrap(), lab.logs()));
    assert!(
        n.ns.sh("ip link show flannel.1").is_err(),
        "host-gw must not create a VXLAN device"
    );
    assert!(!n.pin_root.exists(), "host-gw must not pin eBPF objects");
    for i in [1, 2] {
        wait_reachable(&n.pod, lab.nodes[i].pod_ip(), Duration::from_secs(10)).unwrap();
        assert_eq!(
            ping(&n.pod, lab.nodes[i].pod_ip(), 5, 0.05).unwrap(),
            (5, 5),
            "pod on node 1 to pod on node {}",
            i + 1
        );
    }

    // A vxlan node in a host-gw cluster is ignored, with the reason logged.
    fs::write(
        lab.lease_dir().join("subnets/10.244.20.0-24"),
        r#"{"PublicIP":"10.1.5.20","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:42:8f:11:22:99"}}"#,
    )
    .unwrap();
    // Node 3 is now behind node 2 (a route with a gateway): host-gw cannot
    // reach it, the operator is told which node and why, and its route goes.
    n.ns.sh("ip route add 10.1.5.13/32 via 10.1.5.12 dev eth0")
        .unwrap();
    let log = wait_for("the not-on-link error", Duration::from_secs(5), || {
        let log = n.log_text();
        (log.contains("host-gw cannot reach node 10.1.5.13")
            && log.contains("not on-link on eth0")
            && log.contains("BackendType vxlan differs"))
        .then_some(log)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", lab.logs()));
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("lease 10.244.9.0/24 skipped")),
        "{log}"
    );
    wait_for("node 3's route to go", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -4 route show").ok()?;
        (!r.contains("10.244.9.0/24") && !r.contains("10.244.20.0/24")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", n.ns.sh("ip -4 route").unwrap()));
    assert_eq!(
        ping(&n.pod, lab.nodes[1].pod_ip(), 3, 0.05).unwrap(),
        (3, 3),
        "the on-link peer keeps its route"
    );
    // On-link again: the route comes back at the next pass.
    n.ns.sh("ip route del 10.1.5.13/32").unwrap();
    wait_for("node 3's route to return", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -4 route show").ok()?;
        r.contains("10.244.9.0/24 via 10.1.5.13 dev eth0")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", n.ns.sh("ip -4 route").unwrap()));
}

/// Dual-stack host-gw: the IPv6 halves get `<subnet6> via <PublicIPv6>` on
/// the underlay too (no flannel-v6), our lease is flanneld's host-gw shape
/// with PublicIPv6, and an IPv6 peer behind a router is named and unrouted.
#[test]
fn host_gw_routes_ipv6_halves_in_a_dual_stack_cluster() {
    if !prereq::ready("host_gw_ipv6") {
        return;
    }
    let mut lab = Lab::new_dual(
        "hgw6",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    fs::write(
        lab.lease_dir().join("config"),
        format!(
            r#"{{"Network":"{NETWORK}","EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{{"Type":"host-gw"}}}}"#
        ),
    )
    .unwrap();
    // Nodes 2 and 3 are stock flanneld with host-gw: leases as it writes them.
    for (i, o) in [(1usize, 9u8), (2, 10)] {
        lab.start_plain(i, o).unwrap();
        let n = &lab.nodes[i];
        fs::write(
            lab.lease_dir().join(format!(
                "subnets/10.244.{o}.0-24&fd00:10:244:{o:x}::-64"
            )),
            format!(
                r#"{{"PublicIP":"{}","PublicIPv6":"{}","BackendType":"host-gw","BackendData":null}}"#,
                n.public_ip,
                n.public_ipv6.unwrap()
            ),
        )
        .unwrap();
    }
    lab.nodes[0].agent_args = ["--resync-interval", "1"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    let n = &lab.nodes[0];
    // The stock nodes route to us (ours are the agent's to write).
    for i in [1, 2] {
        let ns = &lab.nodes[i].ns;
        ns.sh(&format!(
            "ip route replace {} via 10.1.5.11 dev eth0",
            n.subnet.clone().unwrap()
        ))
        .unwrap();
        ns.sh(&format!(
            "ip -6 route replace {} via {} dev eth0",
            n.subnet6.clone().unwrap(),
            n.public_ipv6.unwrap()
        ))
        .unwrap();
    }
    let subnet6 = n.subnet6.clone().unwrap();
    let key = format!(
        "{}&{}",
        n.subnet.clone().unwrap().replace('/', "-"),
        subnet6.replace('/', "-")
    );
    let ours = fs::read_to_string(lab.lease_dir().join("subnets").join(key)).unwrap();
    assert_eq!(
        ours,
        format!(
            r#"{{"PublicIP":"10.1.5.11","PublicIPv6":"{}","BackendType":"host-gw","BackendData":null}}"#,
            n.public_ipv6.unwrap()
        )
    );
    let env = fs::read_to_string(&n.subnet_file).unwrap();
    assert!(
        env.contains("FLANNEL_MTU=1500\n")
            && env.contains("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"),
        "{env}"
    );
    let routes = || n.ns.sh("ip -6 route show").unwrap_or_default();
    wait_for("IPv6 host-gw routes", Duration::from_secs(5), || {
        let r = routes();
        (r.contains("fd00:10:244:9::/64 via fc00::12 dev eth0")
            && r.contains("fd00:10:244:a::/64 via fc00::13 dev eth0"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert!(
        n.ns.sh("ip link show flannel-v6.1").is_err(),
        "host-gw must not create flannel-v6"
    );
    for i in [1, 2] {
        let p = &lab.nodes[i];
        wait_reachable(&n.pod, p.pod_ip6(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
        assert_eq!(ping(&n.pod, p.pod_ip6(), 5, 0.05).unwrap(), (5, 5));
        assert_eq!(ping(&p.pod, n.pod_ip6(), 5, 0.05).unwrap(), (5, 5));
        assert_eq!(ping(&n.pod, p.pod_ip(), 3, 0.05).unwrap(), (3, 3));
    }
    tcp_exchange(
        &n.pod,
        &lab.nodes[1].pod,
        lab.nodes[1].pod_ip6(),
        5206,
        1 << 20,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    // Node 3 behind node 2 over IPv6: named, its IPv6 route goes (its IPv4 one stays).
    n.ns.sh("ip -6 route add fc00::13/128 via fc00::12 dev eth0")
        .unwrap();
    wait_for(
        "the IPv6 not-on-link warning",
        Duration::from_secs(5),
        || {
            let log = n.log_text();
            (log.contains("host-gw cannot reach node fc00::13")
                && log.contains("not on-link on eth0"))
            .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}:\n{}", lab.logs()));
    wait_for("node 3's IPv6 route to go", Duration::from_secs(5), || {
        (!routes().contains("fd00:10:244:a::/64")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", routes()));
    assert!(
        n.ns.sh("ip -4 route show")
            .unwrap()
            .contains("10.244.10.0/24 via 10.1.5.13 dev eth0")
    );
    n.ns.sh("ip -6 route del fc00::13/128").unwrap();
    wait_for(
        "node 3's IPv6 route to return",
        Duration::from_secs(5),
        || {
            routes()
                .contains("fd00:10:244:a::/64 via fc00::13 dev eth0")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", routes()));
    assert_eq!(
        ping(&n.pod, lab.nodes[2].pod_ip6(), 3, 0.05).unwrap(),
        (3, 3)
    );
}

/// IPv6-only host-gw (EnableIPv4 false): flanneld's lease shape
/// (`0.0.0.0-0&<subnet6>`, PublicIP 0.0.0.0, no backend data), routes on
/// the underlay, no flannel-v6 and no programs; pods reach each other.
#[test]
fn host_gw_in_an_ipv6_only_cluster() {
    if !prereq::ready("host_gw_ipv6_only") {
        return;
    }
    let mut lab = Lab::new_v6_only("hgo6", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    fs::write(
        lab.lease_dir().join("config"),
        format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{{"Type":"host-gw"}}}}"#
        ),
    )
    .unwrap();
    lab.start_plain(1, 9).unwrap();
    let stock6 = lab.nodes[1].public_ipv6.unwrap();
    fs::write(
        lab.lease_dir().join("subnets/0.0.0.0-0&fd00:10:244:9::-64"),
        format!(r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{stock6}","BackendType":"host-gw"}}"#),
    )
    .unwrap();
    lab.start_agent(0).unwrap();
    let n = &lab.nodes[0];
    let subnet6 = n.subnet6.clone().unwrap();
    let ours = fs::read_to_string(
        lab.lease_dir()
            .join("subnets")
            .join(format!("0.0.0.0-0&{}", subnet6.replace('/', "-"))),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_eq!(
        ours,
        format!(
            r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{}","BackendType":"host-gw"}}"#,
            n.public_ipv6.unwrap()
        )
    );
    lab.nodes[1]
        .ns
        .sh(&format!(
            "ip -6 route replace {subnet6} via {} dev eth0",
            n.public_ipv6.unwrap()
        ))
        .unwrap();
    wait_for("the IPv6 host-gw route", Duration::from_secs(5), || {
        n.ns.sh("ip -6 route show")
            .ok()?
            .contains(&format!("fd00:10:244:9::/64 via {stock6} dev eth0"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert!(n.ns.sh("ip link show flannel-v6.1").is_err());
    assert!(!n.pin_root.exists(), "host-gw must not pin eBPF objects");
    let env = fs::read_to_string(&n.subnet_file).unwrap();
    assert!(
        env.contains("FLANNEL_MTU=1500\n") && !env.contains("FLANNEL_SUBNET="),
        "{env}"
    );
    let p = &lab.nodes[1];
    wait_reachable(&n.pod, p.pod_ip6(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert_eq!(ping(&n.pod, p.pod_ip6(), 5, 0.05).unwrap(), (5, 5));
    assert_eq!(ping(&p.pod, n.pod_ip6(), 5, 0.05).unwrap(), (5, 5));
}
