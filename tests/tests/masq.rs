//! `--ip-masq`: pods reach a host outside the Network only through the
//! masquerade rules; the rules are replaced atomically across an agent restart
//! (a 10 ms ping to the outside loses nothing); uninstall removes them.
use std::time::Duration;

use flannel_tests::{
    agent_path,
    lab::{Kind, Lab, OUTSIDE_IP6, Topology},
    prereq, sh,
    traffic::{BackgroundPing, ping, wait_reachable},
};

#[test]
fn ip_masq_rules_nftables_and_iptables() {
    if !prereq::ready("ip_masq") {
        return;
    }
    let has_nft = sh("command -v nft").is_ok();
    if !has_nft {
        assert!(
            std::env::var("CI").is_err(),
            "nft is not installed (apt-get install nftables)"
        );
        eprintln!("SKIPPED ip_masq: nft not installed");
        return;
    }
    let mut lab = Lab::new("msq", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    // A host outside the Network, on the underlay, with no route to the pods.
    let (_ext, outside) = lab.outside_host().unwrap();

    lab.start_stock(1, 2).unwrap();
    lab.nodes[0].agent_args = vec!["--ip-masq".into()];
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    let n = &lab.nodes[0];
    let table = n.ns.sh("nft list table ip flannel-ipv4").unwrap();
    assert!(
        table.contains("masquerade fully-random") && table.contains("0x00004000"),
        "{table}"
    );
    assert!(
        table.contains("ip saddr 10.244.0.0/16 accept"),
        "forward-accept rules: {table}"
    );
    // Outside: only works masqueraded (the outside host has no route to pods).
    wait_reachable(&n.pod, outside, Duration::from_secs(10)).unwrap();
    // Pod to pod: not masqueraded, still works.
    wait_reachable(&n.pod, lab.nodes[1].pod_ip(), Duration::from_secs(10)).unwrap();

    // A restart replaces the rules in one transaction: no unmasqueraded gap.
    let bg = BackgroundPing::start(&n.pod, outside, 300, 10).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    lab.nodes[0].stop_agent().unwrap();
    lab.spawn_agent(0).unwrap();
    lab.wait_subnet_env(0).unwrap();
    let (sent, received) = bg.finish().unwrap();
    assert_eq!(
        (sent, received),
        (300, 300),
        "outside traffic lost across the restart"
    );

    // The iptables backend, switched to: the nftables table goes, the chains come.
    lab.nodes[0].stop_agent().unwrap();
    lab.nodes[0].agent_args = vec![
        "--ip-masq".into(),
        "--masq-backend".into(),
        "iptables".into(),
    ];
    let _ = std::fs::remove_file(&lab.nodes[0].subnet_file);
    lab.spawn_agent(0).unwrap();
    lab.wait_subnet_env(0).unwrap();
    let n = &lab.nodes[0];
    assert!(
        n.ns.sh("nft list table ip flannel-ipv4").is_err(),
        "stale nftables table"
    );
    let nat = n.ns.sh("iptables -w -t nat -S").unwrap();
    assert!(
        nat.contains("-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"),
        "{nat}"
    );
    assert_eq!(
        nat.matches("-j FLANNEL-POSTRTG").count(),
        1,
        "jump added once: {nat}"
    );
    assert!(
        n.ns.sh("iptables -w -S FLANNEL-FWD")
            .unwrap()
            .contains("-s 10.244.0.0/16")
    );
    assert_eq!(ping(&n.pod, outside, 3, 0.1).unwrap(), (3, 3));

    // Uninstall removes the rules: the outside is unreachable again.
    uninstall_removes_the_rules(&mut lab, "iptables", outside.into());
}

/// `--ip-masq` on IPv6, as flanneld does it: table `ip6 flannel-ipv6` (or
/// ip6tables' chains) masquerades pod traffic leaving the IPv6 Network; a
/// host outside, with no route to the pods, is reached only through it.
#[test]
fn ip_masq_for_ipv6_nftables_and_ip6tables() {
    if !prereq::ready("ip_masq6") {
        return;
    }
    // Dual-stack, nftables: both families' tables.
    let mut lab = Lab::new_dual("msq6", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let (_ext, _) = lab.outside_host().unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.nodes[0].agent_args = vec!["--ip-masq".into()];
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    let n = &lab.nodes[0];
    let table = n.ns.sh("nft list table ip6 flannel-ipv6").unwrap();
    assert!(
        table.contains("ip6 daddr != ff00::/8 masquerade fully-random")
            && table.contains("0x00004000"),
        "{table}"
    );
    assert!(n.ns.sh("nft list table ip flannel-ipv4").is_ok());
    assert!(
        std::fs::read_to_string(&n.subnet_file)
            .unwrap()
            .contains("FLANNEL_IPMASQ=true")
    );
    wait_reachable(&n.pod, OUTSIDE_IP6, Duration::from_secs(10)).unwrap();
    wait_reachable(&n.pod, lab.nodes[1].pod_ip6(), Duration::from_secs(10)).unwrap();
    // Without the rules the outside host cannot answer: they were the reason.
    n.ns.sh("nft delete table ip6 flannel-ipv6").unwrap();
    assert_eq!(ping(&n.pod, OUTSIDE_IP6, 2, 0.2).unwrap().1, 0);
    drop(lab);

    // IPv6-only, ip6tables; uninstall removes the chains.
    let mut lab =
        Lab::new_v6_only("msq6o", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let (_ext, _) = lab.outside_host().unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.nodes[0].agent_args = vec![
        "--ip-masq".into(),
        "--masq-backend".into(),
        "iptables".into(),
    ];
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    let n = &lab.nodes[0];
    let nat = n.ns.sh("ip6tables -w -t nat -S").unwrap();
    assert!(
        nat.contains("-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG")
            && nat.contains("! -d ff00::/8"),
        "{nat}"
    );
    wait_reachable(&n.pod, OUTSIDE_IP6, Duration::from_secs(10)).unwrap();
    uninstall_removes_the_rules(&mut lab, "ip6tables", OUTSIDE_IP6.into());
}

/// Stop node 1's agent and run `flannel-agent uninstall`: no FLANNEL chain
/// or rule is left in `tool`'s (iptables, ip6tables) tables, and the pod no
/// longer reaches `outside`.
fn uninstall_removes_the_rules(lab: &mut Lab, tool: &str, outside: std::net::IpAddr) {
    lab.nodes[0].stop_agent().unwrap();
    let n = &lab.nodes[0];
    n.ns.nsenter(&format!(
        "{} uninstall --pin-root {}",
        agent_path().display(),
        n.pin_root.display()
    ))
    .unwrap();
    for table in ["-t nat -S", "-S"] {
        let rules = n.ns.sh(&format!("{tool} -w {table}")).unwrap();
        assert!(!rules.contains("FLANNEL"), "{tool} {table}: {rules}");
    }
    assert_eq!(
        ping(&n.pod, outside, 2, 0.2).unwrap().1,
        0,
        "still masqueraded after uninstall"
    );
}
