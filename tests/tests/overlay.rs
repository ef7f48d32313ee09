//! Pod-to-pod traffic across nodes running flannel-agent, in namespaces.
use std::time::Duration;

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    prereq,
    traffic::{ping, tcp_exchange, wait_reachable},
};

#[test]
fn two_nodes_ping_tcp_both_ways_without_kernel_fdb() {
    if !prereq::ready("two_nodes") {
        return;
    }
    let mut lab = Lab::new("ov2", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    // The stack path (the direct path's fallback, and the whole path with
    // --direct-path=false): pod traffic crosses the host stack as with stock
    // Flannel. The direct path has its own lab (direct_path.rs).
    for n in &mut lab.nodes {
        n.agent_args = vec!["--direct-path=false".into()];
    }
    // Strict reverse-path filtering on node 1 must not break delivery.
    lab.nodes[0]
        .ns
        .sh("sysctl -qw net.ipv4.conf.all.rp_filter=1 net.ipv4.conf.eth0.rp_filter=1")
        .unwrap();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    lab.wait_fdb_entries(1, 1).unwrap();
    assert!(
        lab.nodes[0]
            .log_text()
            .contains("rp_filter on eth0 was strict"),
        "{}",
        lab.logs()
    );
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);

    // The kernel's FDB on flannel.1 holds no unicast entry: only our maps carry the tunnel.
    for n in [a, b] {
        let fdb = n.ns.sh("bridge fdb show dev flannel.1").unwrap();
        assert!(
            !fdb.contains(" dst "),
            "{}: kernel FDB entries present: {fdb}",
            n.name
        );
    }
    // Pod traffic is visible to netfilter in FORWARD, both directions, as with stock Flannel.
    let fwd_out = format!(
        "-s {} -d {}",
        a.subnet.as_ref().unwrap(),
        b.subnet.as_ref().unwrap()
    );
    let fwd_in = format!(
        "-s {} -d {}",
        b.subnet.as_ref().unwrap(),
        a.subnet.as_ref().unwrap()
    );
    for r in [&fwd_out, &fwd_in] {
        a.ns.sh(&format!("iptables -w -I FORWARD {r} -j ACCEPT"))
            .unwrap();
    }

    wait_reachable(&a.pod, b.pod_ip(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let before_tx = lab.counter(0, "tx_encap");
    let before_rx = lab.counter(0, "rx_decap");
    assert_eq!(ping(&a.pod, b.pod_ip(), 20, 0.05).unwrap(), (20, 20));
    assert_eq!(ping(&b.pod, a.pod_ip(), 20, 0.05).unwrap(), (20, 20));
    // 20 requests out + 20 replies to b's pings out, and the same in: our programs carried them.
    assert!(lab.counter(0, "tx_encap") - before_tx >= 40);
    assert!(lab.counter(0, "rx_decap") - before_rx >= 40);

    let (pkts, bytes) = (lab.counter(0, "tx_encap"), lab.counter_bytes(0, "tx_encap"));
    tcp_exchange(&a.pod, &b.pod, b.pod_ip(), 5001, 4 << 20).unwrap();
    // TCP left as GSO super-packets: far more than one MTU per encapsulation on average.
    let (pkts, bytes) = (
        lab.counter(0, "tx_encap") - pkts,
        lab.counter_bytes(0, "tx_encap") - bytes,
    );
    assert!(bytes > 4 << 20, "encapsulated only {bytes} bytes");
    assert!(
        bytes / pkts > 4000,
        "{pkts} packets for {bytes} bytes: GSO was lost"
    );
    tcp_exchange(&b.pod, &a.pod, a.pod_ip(), 5002, 4 << 20).unwrap();

    let rules = a.ns.sh("iptables -w -n -v -x -L FORWARD").unwrap();
    for (r, dir) in [(&fwd_out, "a→b"), (&fwd_in, "b→a")] {
        let src = r.split_whitespace().nth(1).unwrap();
        let line = rules
            .lines()
            .find(|l| {
                l.contains(src) && l.contains("ACCEPT") && l.split_whitespace().nth(7) == Some(src)
            })
            .unwrap_or_else(|| panic!("no FORWARD rule for {dir}:\n{rules}"));
        let pkts: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
        assert!(pkts >= 40, "FORWARD {dir} saw {pkts} packets:\n{rules}");
    }
}

#[test]
fn three_nodes_behind_a_router() {
    if !prereq::ready("three_nodes_routed") {
        return;
    }
    let mut lab = Lab::new(
        "ov3r",
        Topology::Routed,
        &[Kind::Ebpf, Kind::Ebpf, Kind::Ebpf],
    )
    .unwrap();
    for i in 0..3 {
        lab.start_agent(i).unwrap();
    }
    for i in 0..3 {
        lab.wait_fdb_entries(i, 2).unwrap();
    }
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let (src, dst) = (&lab.nodes[i], &lab.nodes[j]);
            wait_reachable(&src.pod, dst.pod_ip(), Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
            assert_eq!(
                ping(&src.pod, dst.pod_ip(), 10, 0.05).unwrap(),
                (10, 10),
                "{} → {}",
                src.name,
                dst.name
            );
        }
    }
    let (a, c) = (&lab.nodes[0], &lab.nodes[2]);
    tcp_exchange(&a.pod, &c.pod, c.pod_ip(), 5003, 2 << 20).unwrap();
    // Outer packets went through the router: its forwarding counter moved.
    let snmp = lab.fabric.sh("cat /proc/net/snmp").unwrap();
    let fwd: u64 = snmp
        .lines()
        .filter(|l| l.starts_with("Ip:"))
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(6))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(fwd > 100, "router forwarded only {fwd} packets");
}

fn xdp_on(lab: &Lab, i: usize) -> bool {
    lab.nodes[i]
        .ns
        .sh("ip -d link show eth0")
        .unwrap()
        .contains("xdp")
}

/// `--decap xdp` and `--decap tc` (auto picks TC on these veth underlays)
/// carry the same traffic; a restart with the other hook swaps the link.
#[test]
fn decap_at_xdp_or_tc_and_switching_between_them() {
    if !prereq::ready("decap_hooks") {
        return;
    }
    let mut lab = Lab::new("ovhook", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    lab.nodes[0].agent_args = ["--decap", "xdp"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    lab.wait_fdb_entries(1, 1).unwrap();
    assert!(
        lab.nodes[0]
            .log_text()
            .contains("attached flannel_decap on eth0 (XDP)")
    );
    assert!(
        lab.nodes[1]
            .log_text()
            .contains("attached flannel_decap_tc on eth0 ingress (TCX)"),
        "auto on a veth underlay: {}",
        lab.logs()
    );
    assert!(xdp_on(&lab, 0) && !xdp_on(&lab, 1));
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    wait_reachable(&a.pod, b.pod_ip(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let rx = [lab.counter(0, "rx_decap"), lab.counter(1, "rx_decap")];
    assert_eq!(ping(&a.pod, b.pod_ip(), 10, 0.05).unwrap(), (10, 10));
    assert_eq!(ping(&b.pod, a.pod_ip(), 10, 0.05).unwrap(), (10, 10));
    assert!(lab.counter(0, "rx_decap") >= rx[0] + 20, "XDP decapsulated");
    assert!(lab.counter(1, "rx_decap") >= rx[1] + 20, "TC decapsulated");
    // Bulk TCP into the TC node arrives as GSO aggregates: checked by our
    // program, decapsulated by the kernel's VXLAN device (this kernel's
    // bpf_skb_adjust_room cannot clear their tunnel offload state).
    tcp_exchange(&a.pod, &b.pod, b.pod_ip(), 5011, 4 << 20).unwrap();
    tcp_exchange(&b.pod, &a.pod, a.pod_ip(), 5012, 4 << 20).unwrap();
    assert!(lab.counter(1, "rx_pass_gso") > 0, "{}", lab.logs());
    assert_eq!(lab.counter(0, "rx_pass_gso"), 0, "XDP sees no GSO");

    // Node 1 (index 0) restarts with --decap tc: the XDP link goes, the TC link comes.
    lab.nodes[0].stop_agent().unwrap();
    lab.nodes[0].agent_args = ["--decap", "tc"].map(String::from).to_vec();
    // (XDP on node 1 meant the direct path off there, with a warning.)
    assert!(
        lab.nodes[0]
            .log_text()
            .contains("direct path off: it needs the decap at TC")
    );
    lab.start_agent(0).unwrap();
    let root = lab.nodes[0].pin_root.clone();
    assert!(
        root.join("link_decap_tc").exists() && !root.join("link_decap").exists(),
        "{}",
        lab.nodes[0].log_text()
    );
    assert!(
        lab.nodes[0]
            .log_text()
            .contains("detached the decap program of")
    );
    assert!(!xdp_on(&lab, 0), "the XDP program is detached");
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    assert_eq!(ping(&b.pod, a.pod_ip(), 10, 0.05).unwrap(), (10, 10));
    tcp_exchange(&b.pod, &a.pod, a.pod_ip(), 5013, 1 << 20).unwrap();
}
