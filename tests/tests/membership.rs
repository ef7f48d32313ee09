//! Only the cluster's members get in: crafted traffic from a host that is not
//! a member (whole, fragmented, to every local address, VLAN-tagged, spoofed
//! on the underlay) and from a member speaking for others never reaches the
//! pod, and a counter names why; the same traffic from a member arrives.
use std::{net::Ipv4Addr, time::Duration};

use flannel_tests::{
    frames::{eth, fragments, ipv4_udp, mac, udp, vxlan},
    lab::{Kind, Lab, Node, Topology},
    prereq,
    traffic::{UdpSink, inject, send_raw, wait_reachable},
};

const PORT: u16 = 5555;

/// A named guard counter on node `n`, as `show stats` reads it.
fn guard_counter(n: &Node, name: &str) -> u64 {
    n.ns.run(|| flannel_agent::node::guard::counters("ip"))
        .unwrap_or_default()
        .get(name)
        .map_or(0, |(packets, _)| *packets)
}

struct Sender<'a> {
    node: &'a Node,
    vtep_mac: [u8; 6],
    /// Its eth0's MAC, the source of what it puts on the underlay.
    ul_mac: [u8; 6],
}

impl<'a> Sender<'a> {
    fn new(node: &'a Node, vtep_mac: [u8; 6]) -> Sender<'a> {
        let ul_mac = mac(&node.ns.sh("cat /sys/class/net/eth0/address").unwrap());
        Sender {
            node,
            vtep_mac,
            ul_mac,
        }
    }

    /// An IPv4 packet on the underlay to `dst_mac` (priority-tagged with `vlan0`).
    fn frame(&self, dst_mac: [u8; 6], ip: &[u8], vlan0: bool) -> Vec<u8> {
        if !vlan0 {
            return eth(dst_mac, self.ul_mac, 0x0800, ip);
        }
        let mut tagged = vec![0x00, 0x00, 0x08, 0x00];
        tagged.extend_from_slice(ip);
        eth(dst_mac, self.ul_mac, 0x8100, &tagged)
    }

    /// `inner` in VXLAN to `dst`, as one frame.
    fn whole(&self, dst_mac: [u8; 6], dst: Ipv4Addr, inner: &[u8]) -> Vec<Vec<u8>> {
        vec![self.frame(dst_mac, &self.outer(dst, inner), false)]
    }

    /// `inner` in VXLAN to `dst`, in IPv4 fragments of 256 bytes.
    fn fragmented(&self, dst_mac: [u8; 6], dst: Ipv4Addr, inner: &[u8]) -> Vec<Vec<u8>> {
        fragments(&self.outer(dst, inner), 256)
            .iter()
            .map(|f| self.frame(dst_mac, f, false))
            .collect()
    }

    /// The inner frame: a UDP datagram to our pod, tagged `what`.
    fn inner(
        &self,
        to: &Node,
        to_vtep: [u8; 6],
        src: Ipv4Addr,
        what: &str,
        bad_sum: bool,
    ) -> Vec<u8> {
        let d = udp(src, to.pod_ip(), 40000, PORT, what.as_bytes(), bad_sum);
        eth(
            to_vtep,
            self.vtep_mac,
            0x0800,
            &ipv4_udp(src, to.pod_ip(), &d),
        )
    }

    /// The outer IPv4 packet from this node's public IP to `dst`.
    fn outer(&self, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
        let payload = vxlan(1, inner);
        let d = udp(self.node.public_ip, dst, 49152, 8472, &payload, false);
        ipv4_udp(self.node.public_ip, dst, &d)
    }
}

#[test]
fn only_members_get_in() {
    if !prereq::ready("membership") {
        return;
    }
    // n1: ours. n2: a stock member. n3: a stock node with no lease: not a member.
    let mut lab = Lab::new(
        "member",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_stock_device(2, 3).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    wait_reachable(
        &lab.nodes[1].pod,
        lab.nodes[0].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let (n1, n2, n3) = (&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]);
    // More local addresses of n1 to aim at.
    n1.ns.sh("ip addr add 10.1.5.111/24 dev eth0").unwrap();
    let n1_mac = mac(&n1.ns.sh("cat /sys/class/net/eth0/address").unwrap());
    let n1_vtep = mac(n1.vtep_mac.as_deref().unwrap());
    let cni0 = Ipv4Addr::from(u32::from(n1.subnet_base()) + 1);
    let member = Sender::new(n2, mac(n2.vtep_mac.as_deref().unwrap()));
    let outsider = Sender::new(n3, mac(n3.vtep_mac.as_deref().unwrap()));

    let counters = |what: &[&str]| -> Vec<u64> {
        what.iter()
            .map(|c| {
                if c.starts_with("rx_") {
                    lab.counter(0, c)
                } else {
                    guard_counter(&lab.nodes[0], c)
                }
            })
            .collect()
    };
    let watched = [
        "rx_drop_non_member",
        "rx_drop_spoofed_inner_source",
        "rx_drop_pod_source_on_underlay",
        "vxlan_not_to_public_ip",
        "vxlan_not_via_underlay",
        "vxlan_from_non_member",
        "pod_to_vxlan_port",
    ];
    let before = counters(&watched);
    let sink = UdpSink::start(&n1.pod, PORT, Duration::from_secs(4)).unwrap();

    let pub_ip = n1.public_ip;
    let m_src = n2.pod_ip();
    let o_src = n3.pod_ip();
    let big = "x".repeat(600);
    let to_n1 = |from: &Sender, src: Ipv4Addr, tag: &str, bad_sum: bool| {
        from.inner(n1, n1_vtep, src, tag, bad_sum)
    };
    // (sender, frames); what arrives is told by the tag in the payload.
    let mut cases: Vec<(&Sender, Vec<Vec<u8>>)> = Vec::new();
    // The member's own traffic, whole and fragmented: it arrives.
    cases.push((
        &member,
        member.whole(
            n1_mac,
            pub_ip,
            &to_n1(&member, m_src, "member whole", false),
        ),
    ));
    let tag = format!("member fragmented {big}");
    cases.push((
        &member,
        member.fragmented(n1_mac, pub_ip, &to_n1(&member, m_src, &tag, false)),
    ));
    // The outsider, whole and fragmented, to our public IP and to every
    // other local address: a secondary IP, cni0's, the broadcast.
    for (t, dst, dmac) in [
        ("outsider", pub_ip, n1_mac),
        (
            "outsider to a secondary address",
            Ipv4Addr::new(10, 1, 5, 111),
            n1_mac,
        ),
        ("outsider to cni0's address", cni0, n1_mac),
        (
            "outsider to the broadcast",
            Ipv4Addr::new(10, 1, 5, 255),
            [0xff; 6],
        ),
    ] {
        cases.push((
            &outsider,
            outsider.whole(dmac, dst, &to_n1(&outsider, o_src, t, false)),
        ));
        let tf = format!("{t} fragmented {big}");
        cases.push((
            &outsider,
            outsider.fragmented(dmac, dst, &to_n1(&outsider, o_src, &tf, false)),
        ));
    }
    // Priority-tagged (VLAN 0).
    let vx = outsider.outer(pub_ip, &to_n1(&outsider, o_src, "outsider VLAN 0", false));
    cases.push((&outsider, vec![outsider.frame(n1_mac, &vx, true)]));
    // The outsider claiming to be the member (its VtepMAC, from its own address).
    let forged = Sender::new(n3, member.vtep_mac);
    let t = "outsider with the member's VtepMAC";
    cases.push((
        &outsider,
        forged.whole(n1_mac, pub_ip, &to_n1(&forged, m_src, t, false)),
    ));
    // The member speaking for another node's pod, whole and fragmented.
    let t = "member spoofing another node's pod";
    cases.push((
        &member,
        member.whole(n1_mac, pub_ip, &to_n1(&member, o_src, t, false)),
    ));
    let tf = format!("{t} fragmented {big}");
    cases.push((
        &member,
        member.fragmented(n1_mac, pub_ip, &to_n1(&member, o_src, &tf, false)),
    ));
    // A member's inner datagram with a broken checksum.
    let t = "member, inner checksum broken";
    cases.push((
        &member,
        member.whole(n1_mac, pub_ip, &to_n1(&member, m_src, t, true)),
    ));
    // Spoofed on the underlay: a plain datagram claiming the member's pod as source.
    let t = "plain packet claiming a pod source";
    let d = udp(m_src, n1.pod_ip(), 40000, PORT, t.as_bytes(), false);
    cases.push((
        &outsider,
        vec![outsider.frame(n1_mac, &ipv4_udp(m_src, n1.pod_ip(), &d), false)],
    ));

    for (from, frames) in &cases {
        inject(&from.node.ns, "eth0", frames).unwrap();
    }
    // From a pod on n1 itself: VXLAN to its own node's address (never
    // crosses the underlay hook), and to the member's VXLAN port.
    let inner = member.inner(n1, n1_vtep, m_src, "pod to its own node", false);
    let payload = vxlan(1, &inner);
    n1.pod
        .run(|| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(&payload, (pub_ip, 8472)).unwrap();
            s.send_to(&payload, (n2.public_ip, 8472)).unwrap();
        })
        .unwrap();

    // Through the member's kernel VXLAN: a pod's datagram with a broken UDP
    // checksum (a raw socket does not fix it) must not be taken for verified
    // after our decapsulation; the same with a right checksum arrives.
    let n1_pod_ip = n1.pod_ip();
    for (tag, bad) in [
        ("member pod, checksum broken", true),
        ("member pod via the kernel", false),
    ] {
        let d = udp(m_src, n1_pod_ip, 40001, PORT, tag.as_bytes(), bad);
        send_raw(&n2.pod, libc::IPPROTO_UDP, n1_pod_ip, &d).unwrap();
    }

    // A pod with CAP_NET_RAW forging the outsider's node address as source,
    // to the member's VXLAN port: it never leaves this node either.
    let (forged_src, to) = (n3.public_ip, n2.public_ip);
    let d = udp(forged_src, to, 49152, 8472, &payload, false);
    send_raw(
        &n1.pod,
        libc::IPPROTO_RAW,
        to,
        &ipv4_udp(forged_src, to, &d),
    )
    .unwrap();

    let got: Vec<String> = sink
        .finish()
        .into_iter()
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .collect();
    let after = counters(&watched);
    let delta: Vec<(&str, u64)> = watched
        .iter()
        .zip(after.iter().zip(&before))
        .map(|(n, (a, b))| (*n, a - b))
        .collect();
    eprintln!(
        "received: {:?}\ncounter deltas: {delta:?}",
        got.iter()
            .map(|g| &g[..g.len().min(40)])
            .collect::<Vec<_>>()
    );
    assert!(
        got.iter().any(|g| g == "member whole"),
        "{got:?}\n{}",
        lab.logs()
    );
    assert!(
        got.iter().any(|g| g.starts_with("member fragmented")),
        "{got:?}\n{}",
        lab.logs()
    );
    assert!(
        got.iter().any(|g| g == "member pod via the kernel"),
        "{got:?}\n{}",
        lab.logs()
    );
    assert_eq!(got.len(), 3, "something else got in: {got:?}");
    let d = |name: &str| {
        delta
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    };
    // Each path is closed by the check that names it.
    assert!(d("rx_drop_non_member") >= 4, "{delta:?}"); // whole, first fragment, VLAN 0, forged MAC
    assert!(d("rx_drop_spoofed_inner_source") >= 2, "{delta:?}");
    assert!(d("rx_drop_pod_source_on_underlay") >= 1, "{delta:?}");
    assert!(d("vxlan_not_to_public_ip") >= 6, "{delta:?}"); // 3 addresses, whole and reassembled
    assert!(d("vxlan_not_via_underlay") >= 1, "{delta:?}");
    assert!(d("pod_to_vxlan_port") >= 2, "{delta:?}"); // its own source, and forged
}

/// The eBPF data path sends and takes VXLAN around xfrm: where an IPsec
/// policy could select its port it refuses to start; an unrelated policy
/// does not stop it.
#[test]
fn ipsec_policies_on_the_vxlan_port_are_refused() {
    if !prereq::ready("xfrm") {
        return;
    }
    let mut lab = Lab::new("xfrm", Topology::Switched, &[Kind::Ebpf]).unwrap();
    let n = &lab.nodes[0].ns;
    n.sh("ip xfrm policy add src 10.1.5.0/24 dst 10.1.5.0/24 proto tcp dport 22 dir out action block")
        .unwrap();
    lab.start_agent(0)
        .unwrap_or_else(|e| panic!("an unrelated policy stopped the agent: {e}"));
    lab.nodes[0].stop_agent().unwrap();
    let n = &lab.nodes[0].ns;
    n.sh("ip xfrm policy add src 10.1.5.0/24 dst 10.1.5.0/24 proto udp dport 8472 dir out action block")
        .unwrap();
    lab.spawn_agent(0).unwrap();
    flannel_tests::wait_for("the agent to refuse", Duration::from_secs(10), || {
        (!lab.nodes[0].agent_running()).then_some(())
    })
    .unwrap();
    let log = lab.nodes[0].log_text();
    assert!(
        log.contains("IPsec (xfrm) policy on this node can select udp/8472")
            && log.contains("--datapath kernel"),
        "{log}"
    );
    let n = &lab.nodes[0].ns;
    let _ = n.sh("ip xfrm policy flush");
}

/// A configured public IP that is not the node's: VXLAN to the node's real
/// address would pass every check silently; the agent says so.
#[test]
fn a_public_ip_not_on_the_underlay_is_reported() {
    if !prereq::ready("foreign_public_ip") {
        return;
    }
    let mut lab = Lab::new("pubip", Topology::Switched, &[Kind::Ebpf]).unwrap();
    lab.nodes[0].agent_args = ["--public-ip", "10.1.5.77"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    flannel_tests::wait_for("the report", Duration::from_secs(10), || {
        lab.nodes[0]
            .log_text()
            .contains("the public IP 10.1.5.77 is not an address of the underlay eth0")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
}
