//! The direct path (`--direct-path`, on by default): pod-to-pod traffic goes
//! between cni0 and the underlay without the host stack, and everything the
//! host's conntrack must see — kube-proxy's Services (ClusterIP DNAT, NodePort
//! DNAT + masquerade), CNI hostPorts, host↔pod traffic, `--ip-masq` egress —
//! still works, with kube-proxy's "drop INVALID" rule in FORWARD throughout.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    netns::Netns,
    prereq,
    traffic::{ping, tcp_exchange, wait_reachable},
};

/// Packets an iptables (or ip6tables: `tool`) rule matched: the first rule
/// of `chain` (in `table`) whose text contains every one of `words`.
fn rule_packets(ns: &Netns, tool: &str, table: &str, chain: &str, words: &[&str]) -> u64 {
    let rules = ns
        .sh(&format!("{tool} -w -t {table} -n -v -x -L {chain}"))
        .unwrap();
    let line = rules
        .lines()
        .find(|l| words.iter().all(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no {chain} rule with {words:?}:\n{rules}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// Packets the FORWARD rule `-p proto -s from -d to -j ACCEPT` matched
/// (iptables prints the protocol by name or by number).
fn accepted(ns: &Netns, tool: &str, proto: &str, from: &str, to: &str) -> u64 {
    let number = if proto == "udp" { "17" } else { "6" };
    let rules = ns.sh(&format!("{tool} -w -n -v -x -L FORWARD")).unwrap();
    rules
        .lines()
        .find_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            (c.len() >= 9
                && c[2] == "ACCEPT"
                && (c[3] == proto || c[3] == number)
                && c[7] == from
                && c[8] == to)
                .then(|| c[0].parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no FORWARD rule -p {proto} -s {from} -d {to}:\n{rules}"))
}

fn ipt(ns: &Netns, rule: &str) {
    ns.sh(&format!("iptables -w {rule}")).unwrap();
}

fn ip6t(ns: &Netns, rule: &str) {
    ns.sh(&format!("ip6tables -w {rule}")).unwrap();
}

/// kube-proxy's FORWARD rule (drop INVALID) on both nodes of `lab`, and
/// counters (`tool`: iptables or ip6tables) for pod-to-pod forwarding
/// between their subnets `sa` and `sb`: UDP (single packets; bulk TCP
/// arrives as GSO aggregates, which the kernel's VXLAN device
/// decapsulates, so those flows are the stack's) and TCP.
fn forward_rules(lab: &Lab, tool: &str, sa: &str, sb: &str) {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    for (n, from, to) in [(a, sa, sb), (b, sb, sa)] {
        let rule = |r: &str| n.ns.sh(&format!("{tool} -w {r}")).unwrap();
        rule("-I FORWARD -m conntrack --ctstate INVALID -j DROP");
        for proto in ["udp", "tcp"] {
            rule(&format!(
                "-A FORWARD -p {proto} -s {from} -d {to} -j ACCEPT"
            ));
            rule(&format!(
                "-A FORWARD -p {proto} -s {to} -d {from} -j ACCEPT"
            ));
        }
    }
}

/// 200 UDP echoes each way between the pods of `lab`'s two nodes (to
/// `pod_ips` .0 on b, .1 on a, on `ports`): content-checked, counted by the
/// direct path's `counters` (out, in) on both nodes, none in FORWARD.
fn udp_bypasses_the_stack(
    lab: &Lab,
    tool: &str,
    pod_ips: (IpAddr, IpAddr),
    counters: (&str, &str),
    ports: (u16, u16),
) {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let before = [0, 1].map(|i| (lab.counter(i, counters.0), lab.counter(i, counters.1)));
    udp_echo(&a.pod, &b.pod, pod_ips.0, ports.0, 200).unwrap();
    udp_echo(&b.pod, &a.pod, pod_ips.1, ports.1, 200).unwrap();
    for (i, (tx, rx)) in before.into_iter().enumerate() {
        let (dtx, drx) = (
            lab.counter(i, counters.0) - tx,
            lab.counter(i, counters.1) - rx,
        );
        assert!(
            dtx >= 400 && drx >= 400,
            "node {i}: direct out {dtx}, in {drx}\n{}",
            lab.logs()
        );
    }
    let subnet = |n: &flannel_tests::lab::Node| {
        if tool == "iptables" {
            n.subnet.clone().unwrap()
        } else {
            n.subnet6.clone().unwrap()
        }
    };
    let (sa, sb) = (subnet(a), subnet(b));
    let bypassed = [
        accepted(&a.ns, tool, "udp", &sa, &sb),
        accepted(&a.ns, tool, "udp", &sb, &sa),
        accepted(&b.ns, tool, "udp", &sb, &sa),
        accepted(&b.ns, tool, "udp", &sa, &sb),
    ];
    assert!(
        bypassed.iter().all(|&p| p == 0),
        "FORWARD ({tool}) saw pod-to-pod packets: {bypassed:?}"
    );
}

/// The ifindex node `n`'s pod_ports map holds for its pod, as bpftool dumps it.
fn pod_port(n: &flannel_tests::lab::Node) -> Option<u64> {
    pod_port_of(n, n.pod_ip().to_ipv6_mapped())
}

/// The ifindex node `n`'s pod_ports map holds for pod address `ip`.
fn pod_port_of(n: &flannel_tests::lab::Node, ip: Ipv6Addr) -> Option<u64> {
    let dump = n.dump_map("pod_ports").ok()?;
    dump.as_array()?.iter().find_map(|e| {
        let f = e.get("formatted").unwrap_or(e);
        (f["key"] == serde_json::json!(ip.octets()))
            .then(|| f["value"]["ifindex"].as_u64())
            .flatten()
    })
}

/// Node a's deliveries go to its pod's veth peer, past cni0 (which
/// transmits none of them), and follow the pod onto a new veth with the
/// same address and MAC (a restarted pod, as the CNI bridge plugin gives it).
fn past_the_bridge(lab: &Lab) {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let ifindex = |dev: &str| -> u64 {
        a.ns.sh(&format!("cat /sys/class/net/{dev}/ifindex"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let veth0 = ifindex("veth0");
    flannel_tests::wait_for("a's pod in pod_ports", Duration::from_secs(5), || {
        (pod_port(a) == Some(veth0)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", a.dump_map("pod_ports"), lab.logs()));
    let (peer, bridged) = (
        lab.counter(0, "rx_direct_peer"),
        a.dev_stat("cni0", "tx_packets"),
    );
    udp_echo(&b.pod, &a.pod, a.pod_ip(), 6003, 100).unwrap();
    assert!(
        lab.counter(0, "rx_direct_peer") - peer >= 100,
        "deliveries to the veth peer\n{}",
        lab.logs()
    );
    assert!(
        a.dev_stat("cni0", "tx_packets") - bridged < 10,
        "cni0 transmitted the pod's packets"
    );
    // The pod restarted: a new veth, the same IP and MAC.
    let mac = a.pod.sh("cat /sys/class/net/eth0/address").unwrap();
    a.ns.sh("ip link del veth0").unwrap();
    flannel_tests::sh(&format!(
        "ip link add veth9 netns {} type veth peer name eth0 netns {}",
        a.ns.name, a.pod.name
    ))
    .unwrap();
    a.ns.sh("ip link set veth9 master cni0 up").unwrap();
    let gw = std::net::Ipv4Addr::from(u32::from(a.subnet_base()) + 1);
    for c in [
        format!("ip link set eth0 address {} mtu 1450 up", mac.trim()),
        format!("ip addr add {}/24 dev eth0", a.pod_ip()),
        format!("ip route add default via {gw}"),
    ] {
        a.pod.sh(&c).unwrap();
    }
    wait_reachable(&b.pod, a.pod_ip(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("the restarted pod: {e}\n{}", lab.logs()));
    let veth9 = ifindex("veth9");
    flannel_tests::wait_for("the new veth in pod_ports", Duration::from_secs(5), || {
        (pod_port(a) == Some(veth9)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", a.dump_map("pod_ports"), lab.logs()));
    let peer = lab.counter(0, "rx_direct_peer");
    udp_echo(&b.pod, &a.pod, a.pod_ip(), 6004, 100).unwrap();
    assert!(lab.counter(0, "rx_direct_peer") - peer >= 100);
    // A pod whose ingress is shaped on its host veth (the CNI bandwidth
    // plugin's TBF): the redirect would skip the shaping, so cni0 again.
    a.ns.sh("tc qdisc add dev veth9 root tbf rate 1gbit burst 1mb latency 50ms")
        .unwrap();
    flannel_tests::wait_for(
        "the shaped pod out of pod_ports",
        Duration::from_secs(5),
        || pod_port(a).is_none().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", a.dump_map("pod_ports")));
    let (peer, shaped) = (
        lab.counter(0, "rx_direct_peer"),
        a.dev_stat("veth9", "tx_packets"),
    );
    udp_echo(&b.pod, &a.pod, a.pod_ip(), 6005, 100).unwrap();
    assert_eq!(lab.counter(0, "rx_direct_peer"), peer);
    assert!(
        a.dev_stat("veth9", "tx_packets") - shaped >= 100,
        "through the shaped veth"
    );
    a.ns.sh("tc qdisc del dev veth9 root").unwrap();
    flannel_tests::wait_for("the pod back in pod_ports", Duration::from_secs(5), || {
        (pod_port(a) == Some(veth9)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", a.dump_map("pod_ports")));
}

#[test]
fn pod_traffic_bypasses_the_host_stack_and_services_still_work() {
    if !prereq::ready("direct_path") {
        return;
    }
    let mut lab = Lab::new("dp", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    // A host outside the Network on the underlay: a NodePort client, and the
    // destination of masqueraded pod egress (it has no route to the pods).
    let (ext, outside) = lab.outside_host().unwrap();
    for n in &mut lab.nodes {
        n.agent_args = vec!["--ip-masq".into()];
    }
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    lab.wait_fdb_entries(1, 1).unwrap();
    for n in &lab.nodes {
        assert!(
            n.log_text()
                .contains("attached flannel_pod_egress on cni0 ingress (TCX)"),
            "{}",
            lab.logs()
        );
    }
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let (sa, sb) = (a.subnet.clone().unwrap(), b.subnet.clone().unwrap());
    forward_rules(&lab, "iptables", &sa, &sb);
    let forwarded = |n: &flannel_tests::lab::Node, proto: &str, from: &str, to: &str| {
        accepted(&n.ns, "iptables", proto, from, to)
    };

    // Pod to pod: both ways, content-checked, around the host stack.
    wait_reachable(&a.pod, b.pod_ip(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    udp_bypasses_the_stack(
        &lab,
        "iptables",
        (b.pod_ip().into(), a.pod_ip().into()),
        ("tx_direct", "rx_direct"),
        (6001, 6002),
    );
    past_the_bridge(&lab);
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    // Bulk TCP both ways: delivered whole (its aggregates cross the stack).
    tcp_exchange(&a.pod, &b.pod, b.pod_ip(), 5001, 4 << 20).unwrap();
    tcp_exchange(&b.pod, &a.pod, a.pod_ip(), 5002, 4 << 20).unwrap();
    let tcp_seen = forwarded(a, "tcp", &sa, &sb);

    eprintln!("direct_path: A ClusterIP on node a");
    // A ClusterIP on node a (kube-proxy's DNAT in PREROUTING) backed by b's
    // pod: the request is DNAT'd by a's stack, so its replies must take a's
    // stack too (conntrack reverses the NAT).
    let vip: Ipv4Addr = "10.96.0.10".parse().unwrap();
    ipt(
        &a.ns,
        &format!(
            "-t nat -I PREROUTING -d {vip} -p tcp --dport 5201 -j DNAT --to-destination {}:5201",
            b.pod_ip()
        ),
    );
    let stack_in = lab.counter(0, "rx_direct_pass_stack_flow");
    tcp_exchange(&a.pod, &b.pod, vip, 5201, 2 << 20)
        .unwrap_or_else(|e| panic!("ClusterIP: {e}\n{}", lab.logs()));
    assert!(
        lab.counter(0, "rx_direct_pass_stack_flow") > stack_in,
        "the Service's replies took a's stack"
    );
    assert!(
        forwarded(a, "tcp", &sa, &sb) > tcp_seen,
        "the DNAT'd flow was forwarded by a's stack"
    );

    eprintln!("direct_path: A NodePort on node a");
    // A NodePort on node a (DNAT + masquerade, as kube-proxy does) backed by
    // b's pod, from the outside host.
    let a_ip = a.public_ip;
    ipt(
        &a.ns,
        &format!(
            "-t nat -I PREROUTING -d {a_ip} -p tcp --dport 30080 -j DNAT --to-destination {}:30080",
            b.pod_ip()
        ),
    );
    ipt(
        &a.ns,
        &format!(
            "-t nat -I POSTROUTING -d {} -p tcp --dport 30080 -j MASQUERADE",
            b.pod_ip()
        ),
    );
    tcp_exchange(&ext, &b.pod, a_ip, 30080, 2 << 20)
        .unwrap_or_else(|e| panic!("NodePort: {e}\n{}", lab.logs()));

    eprintln!("direct_path: A hostPort on node a");
    // A hostPort on node a (CNI portmap's DNAT) to a's pod, from b's pod
    // (masqueraded by b's --ip-masq on its way to a's address).
    ipt(
        &a.ns,
        &format!(
            "-t nat -I PREROUTING -d {a_ip} -p tcp --dport 30081 -j DNAT --to-destination {}:30081",
            a.pod_ip()
        ),
    );
    tcp_exchange(&b.pod, &a.pod, a_ip, 30081, 1 << 20)
        .unwrap_or_else(|e| panic!("hostPort: {e}\n{}", lab.logs()));

    eprintln!("direct_path: Host to pod and pod to host");
    // Host to pod and pod to host, across the overlay and on the underlay.
    tcp_exchange(&a.ns, &b.pod, b.pod_ip(), 5301, 1 << 20).unwrap();
    tcp_exchange(&b.pod, &a.ns, a_ip, 5302, 1 << 20).unwrap();
    let a_vtep = Ipv4Addr::from(u32::from(a.subnet_base()));
    tcp_exchange(&b.pod, &a.ns, a_vtep, 5303, 1 << 20).unwrap();
    assert_eq!(ping(&a.ns, b.pod_ip(), 5, 0.02).unwrap(), (5, 5));
    assert_eq!(ping(&b.pod, a_vtep, 5, 0.02).unwrap(), (5, 5));

    eprintln!("direct_path: Masqueraded egress");
    // Masqueraded egress to a host that cannot route back to pods.
    assert_eq!(ping(&a.pod, outside, 5, 0.02).unwrap(), (5, 5));
    tcp_exchange(&a.pod, &ext, outside, 5401, 1 << 20).unwrap();

    eprintln!("direct_path: Every flow stayed whole");
    // Every flow stayed whole on one path: conntrack found nothing INVALID.
    for n in [a, b] {
        assert_eq!(
            rule_packets(&n.ns, "iptables", "filter", "FORWARD", &["INVALID", "DROP"]),
            0,
            "{}: packets dropped as INVALID",
            n.name
        );
    }

    eprintln!("direct_path: Switched off:");
    // Switched off: the program leaves cni0 and pod traffic crosses the
    // host stack again (FORWARD sees it), still delivered.
    lab.nodes[0].stop_agent().unwrap();
    // A stopped agent watches no veth: it leaves no pod port behind.
    assert_eq!(pod_port(&lab.nodes[0]), None, "pod_ports emptied on stop");
    lab.nodes[0].agent_args = vec!["--ip-masq".into(), "--direct-path=false".into()];
    lab.start_agent(0).unwrap();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    assert!(
        !a.pin_root.join("link_pod_egress").exists(),
        "{}",
        a.log_text()
    );
    let seen = forwarded(a, "udp", &sa, &sb);
    udp_echo(&a.pod, &b.pod, b.pod_ip(), 6003, 50).unwrap();
    assert!(
        forwarded(a, "udp", &sa, &sb) >= seen + 50,
        "the stack path carries pod traffic again"
    );
}

#[test]
fn ipv6_pod_traffic_bypasses_the_host_stack_and_services_still_work() {
    if !prereq::ready("direct_path_ipv6") {
        return;
    }
    let lab = Lab::new_dual("dp6", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    ipv6_direct_path(lab);
}

#[test]
fn ipv6_only_pod_traffic_bypasses_the_host_stack_and_services_still_work() {
    if !prereq::ready("direct_path_ipv6_only") {
        return;
    }
    let lab = Lab::new_v6_only("dp6o", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    ipv6_direct_path(lab);
}

/// The IPv6 direct path between `lab`'s two nodes (dual-stack or
/// IPv6-only): route6 as bpftool and `show routes6` print it, UDP both ways
/// around FORWARD, ping6, bulk TCP, an ip6tables ClusterIP round trip
/// through the stack, host↔pod, nothing INVALID, and switched off.
fn ipv6_direct_path(mut lab: Lab) {
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_map_entries(0, "route6", 1).unwrap();
    lab.wait_map_entries(1, "route6", 1).unwrap();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let (sa, sb) = (a.subnet6.clone().unwrap(), b.subnet6.clone().unwrap());
    // The nodes' ROUTE6 tables, as an operator dumps them: the peer's subnet.
    let route6 = a.dump_map("route6").unwrap();
    let octets = |ip: Ipv6Addr| serde_json::json!(ip.octets());
    let holds_b = route6.as_array().is_some_and(|entries| {
        entries.iter().any(|e| {
            let f = e.get("formatted").unwrap_or(e);
            f["key"]["subnet6"] == octets(b.subnet6_base())
                && f["value"]["node_ip6"] == octets(b.public_ipv6.unwrap())
        })
    });
    assert!(holds_b, "a's route6 holds b's subnet {sb}: {route6}");
    let shown = a.show("routes6").unwrap();
    assert!(
        shown.contains(&format!(
            "{sb} via {} dev flannel-v6.1 onlink  # {} dst {}",
            b.subnet6_base(),
            b.vtep_mac6.clone().unwrap(),
            b.public_ipv6.unwrap()
        )),
        "{shown}"
    );
    forward_rules(&lab, "ip6tables", &sa, &sb);
    let forwarded = |n: &flannel_tests::lab::Node, proto: &str, from: &str, to: &str| {
        accepted(&n.ns, "ip6tables", proto, from, to)
    };

    // Pod to pod over IPv6: both ways, content-checked, around the host stack.
    wait_reachable(&a.pod, b.pod_ip6(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    udp_bypasses_the_stack(
        &lab,
        "ip6tables",
        (b.pod_ip6().into(), a.pod_ip6().into()),
        ("tx_direct6", "rx_direct6"),
        (6011, 6012),
    );
    // In, to the pod's veth peer over IPv6 too.
    for (i, n) in [(0, a), (1, b)] {
        flannel_tests::wait_for(
            "the pod's IPv6 in pod_ports",
            Duration::from_secs(5),
            || pod_port_of(n, n.pod_ip6()).map(|_| ()),
        )
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", n.dump_map("pod_ports"), lab.logs()));
        let peer = lab.counter(i, "rx_direct_peer");
        let other = &lab.nodes[1 - i];
        udp_echo(&other.pod, &n.pod, n.pod_ip6(), 6015 + i as u16, 100).unwrap();
        assert!(
            lab.counter(i, "rx_direct_peer") - peer >= 100,
            "{}: IPv6 deliveries to the veth peer",
            n.name
        );
    }
    assert_eq!(ping(&a.pod, b.pod_ip6(), 5, 0.02).unwrap(), (5, 5));
    // Bulk TCP both ways: delivered whole (its GSO aggregates take the
    // stack and flannel-v6, and with them the whole flow).
    tcp_exchange(&a.pod, &b.pod, b.pod_ip6(), 5011, 4 << 20).unwrap();
    tcp_exchange(&b.pod, &a.pod, a.pod_ip6(), 5012, 4 << 20).unwrap();
    let tcp_seen = forwarded(a, "tcp", &sa, &sb);

    // An IPv6 ClusterIP on node a (kube-proxy's DNAT, ip6tables) backed by
    // b's pod: its replies take a's stack for conntrack to reverse the NAT.
    let vip: Ipv6Addr = "fd00:96::10".parse().unwrap();
    ip6t(
        &a.ns,
        &format!(
            "-t nat -I PREROUTING -d {vip} -p tcp --dport 5221 -j DNAT --to-destination [{}]:5221",
            b.pod_ip6()
        ),
    );
    let stack_in = lab.counter(0, "rx_direct_pass_stack_flow");
    tcp_exchange(&a.pod, &b.pod, vip, 5221, 2 << 20)
        .unwrap_or_else(|e| panic!("IPv6 ClusterIP: {e}\n{}", lab.logs()));
    assert!(
        lab.counter(0, "rx_direct_pass_stack_flow") > stack_in,
        "the Service's replies took a's stack"
    );
    assert!(
        forwarded(a, "tcp", &sa, &sb) > tcp_seen,
        "the DNAT'd flow was forwarded by a's stack"
    );

    // Host to pod and pod to host over IPv6, across the overlay.
    tcp_exchange(&a.ns, &b.pod, b.pod_ip6(), 5231, 1 << 20).unwrap();
    tcp_exchange(&b.pod, &a.ns, a.subnet6_base(), 5232, 1 << 20).unwrap();
    assert_eq!(ping(&b.pod, a.subnet6_base(), 5, 0.02).unwrap(), (5, 5));

    // Every flow stayed whole on one path: conntrack found nothing INVALID.
    for n in [a, b] {
        assert_eq!(
            rule_packets(
                &n.ns,
                "ip6tables",
                "filter",
                "FORWARD",
                &["INVALID", "DROP"]
            ),
            0,
            "{}: IPv6 packets dropped as INVALID",
            n.name
        );
    }

    // Switched off: IPv6 pod traffic crosses the host stack again.
    lab.nodes[0].stop_agent().unwrap();
    lab.nodes[0].agent_args = vec!["--direct-path=false".into()];
    lab.start_agent(0).unwrap();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let seen = forwarded(a, "udp", &sa, &sb);
    udp_echo(&a.pod, &b.pod, b.pod_ip6(), 6013, 50).unwrap();
    assert!(
        forwarded(a, "udp", &sa, &sb) >= seen + 50,
        "the stack path carries IPv6 pod traffic again"
    );
}

/// `count` datagrams of 1000 bytes from `client` to `server_ip:port`, each
/// echoed back by `server` and checked.
fn udp_echo(
    client: &Netns,
    server: &Netns,
    server_ip: impl Into<IpAddr>,
    port: u16,
    count: usize,
) -> anyhow::Result<()> {
    use std::net::UdpSocket;
    let server_ip: IpAddr = server_ip.into();
    let any: IpAddr = match server_ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let srv = s.spawn(|| {
            server.run(|| -> anyhow::Result<()> {
                let sock = UdpSocket::bind((any, port))?;
                sock.set_read_timeout(Some(Duration::from_secs(5)))?;
                let _ = ready_tx.send(());
                let mut buf = [0u8; 2048];
                for _ in 0..count {
                    let (n, from) = sock.recv_from(&mut buf)?;
                    sock.send_to(&buf[..n], from)?;
                }
                Ok(())
            })?
        });
        ready_rx.recv_timeout(Duration::from_secs(5))?;
        let cli = client.run(|| -> anyhow::Result<()> {
            let sock = UdpSocket::bind((any, 0))?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut buf = [0u8; 2048];
            for i in 0..count {
                let msg: Vec<u8> = (0..1000).map(|j| (i * 7 + j) as u8).collect();
                sock.send_to(&msg, (server_ip, port))?;
                let (n, _) = sock.recv_from(&mut buf)?;
                anyhow::ensure!(buf[..n] == msg[..], "datagram {i} came back different");
            }
            Ok(())
        })?;
        let srv = srv
            .join()
            .map_err(|_| anyhow::anyhow!("udp echo server panicked"))?;
        cli.and(srv)
    })
}
