//! Only the cluster's members get in: crafted traffic from a host that is not
//! a member (whole, fragmented, to every local address, VLAN-tagged, spoofed
//! on the underlay) and from a member speaking for others never reaches the
//! pod, and a counter names why; the same traffic from a member arrives.
use std::{net::Ipv4Addr, time::Duration};

use flannel_tests::{
    frames::{eth, fragments, ipv4_udp, mac, udp, vxlan},
    lab::{Kind, Lab, Node, Topology},
    prereq,
    traffic::{UdpSink, inject, wait_reachable},
};

const PORT: u16 = 5555;

/// A named guard counter on node `n` (nftables table flannel-ebpf-guard).
fn guard_counter(n: &Node, name: &str) -> u64 {
    let out =
        n.ns.sh("nft -j list counters table ip flannel-ebpf-guard")
            .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("counter"))
        .find(|c| c["name"] == name)
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or(0)
}

struct Sender<'a> {
    node: &'a Node,
    vtep_mac: [u8; 6],
}

impl Sender<'_> {
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
    let member = Sender {
        node: n2,
        vtep_mac: mac(n2.vtep_mac.as_deref().unwrap()),
    };
    let outsider = Sender {
        node: n3,
        vtep_mac: mac(n3.vtep_mac.as_deref().unwrap()),
    };

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

    let l2 = |from: &Sender, dst_mac: [u8; 6], ip: Vec<u8>| {
        let src = mac(&from.node.ns.sh("cat /sys/class/net/eth0/address").unwrap());
        eth(dst_mac, src, 0x0800, &ip)
    };
    let l2_vlan0 = |from: &Sender, dst_mac: [u8; 6], ip: Vec<u8>| {
        let src = mac(&from.node.ns.sh("cat /sys/class/net/eth0/address").unwrap());
        let mut tagged = vec![0x00, 0x00, 0x08, 0x00];
        tagged.extend_from_slice(&ip);
        eth(dst_mac, src, 0x8100, &tagged)
    };
    let pub_ip = n1.public_ip;
    let m_src = n2.pod_ip();
    let o_src = n3.pod_ip();
    let big = "x".repeat(600);
    let mut bad: Vec<(&str, Vec<Vec<u8>>)> = Vec::new();
    let mut good: Vec<(&str, Vec<Vec<u8>>)> = Vec::new();
    // The member's own traffic, whole and fragmented: it arrives.
    let tag = "member whole";
    good.push((
        tag,
        vec![l2(
            &member,
            n1_mac,
            member.outer(pub_ip, &member.inner(n1, n1_vtep, m_src, tag, false)),
        )],
    ));
    let tag_f = format!("member fragmented {big}");
    let pkt = member.outer(pub_ip, &member.inner(n1, n1_vtep, m_src, &tag_f, false));
    good.push((
        "member fragmented",
        fragments(&pkt, 256)
            .into_iter()
            .map(|f| l2(&member, n1_mac, f))
            .collect(),
    ));
    // The outsider, whole and fragmented, to our public IP.
    let t = "outsider whole";
    bad.push((
        t,
        vec![l2(
            &outsider,
            n1_mac,
            outsider.outer(pub_ip, &outsider.inner(n1, n1_vtep, o_src, t, false)),
        )],
    ));
    let t = format!("outsider fragmented {big}");
    let pkt = outsider.outer(pub_ip, &outsider.inner(n1, n1_vtep, o_src, &t, false));
    bad.push((
        "outsider fragmented",
        fragments(&pkt, 256)
            .into_iter()
            .map(|f| l2(&outsider, n1_mac, f))
            .collect(),
    ));
    // To every other local address: a secondary IP, cni0's, the broadcast.
    for (t, dst, dmac) in [
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
        bad.push((
            t,
            vec![l2(
                &outsider,
                dmac,
                outsider.outer(dst, &outsider.inner(n1, n1_vtep, o_src, t, false)),
            )],
        ));
        let tf = format!("{t} fragmented {big}");
        let pkt = outsider.outer(dst, &outsider.inner(n1, n1_vtep, o_src, &tf, false));
        bad.push((
            t,
            fragments(&pkt, 256)
                .into_iter()
                .map(|f| l2(&outsider, dmac, f))
                .collect(),
        ));
    }
    // Priority-tagged (VLAN 0).
    let t = "outsider VLAN 0";
    bad.push((
        t,
        vec![l2_vlan0(
            &outsider,
            n1_mac,
            outsider.outer(pub_ip, &outsider.inner(n1, n1_vtep, o_src, t, false)),
        )],
    ));
    // The outsider claiming to be the member (its VtepMAC, from its own address).
    let t = "outsider with the member's VtepMAC";
    let forged = Sender {
        node: n3,
        vtep_mac: member.vtep_mac,
    };
    bad.push((
        t,
        vec![l2(
            &outsider,
            n1_mac,
            forged.outer(pub_ip, &forged.inner(n1, n1_vtep, m_src, t, false)),
        )],
    ));
    // The member speaking for another node's pod, whole and fragmented.
    let t = "member spoofing another node's pod";
    bad.push((
        t,
        vec![l2(
            &member,
            n1_mac,
            member.outer(pub_ip, &member.inner(n1, n1_vtep, o_src, t, false)),
        )],
    ));
    let tf = format!("{t} fragmented {big}");
    let pkt = member.outer(pub_ip, &member.inner(n1, n1_vtep, o_src, &tf, false));
    bad.push((
        t,
        fragments(&pkt, 256)
            .into_iter()
            .map(|f| l2(&member, n1_mac, f))
            .collect(),
    ));
    // A member's inner datagram with a broken checksum.
    let t = "member, inner checksum broken";
    bad.push((
        t,
        vec![l2(
            &member,
            n1_mac,
            member.outer(pub_ip, &member.inner(n1, n1_vtep, m_src, t, true)),
        )],
    ));
    // Spoofed on the underlay: a plain datagram claiming the member's pod as source.
    let t = "plain packet claiming a pod source";
    let d = udp(m_src, n1.pod_ip(), 40000, PORT, t.as_bytes(), false);
    bad.push((
        t,
        vec![l2(&outsider, n1_mac, ipv4_udp(m_src, n1.pod_ip(), &d))],
    ));

    for (_, frames) in bad.iter().chain(good.iter()) {
        let from = if frames[0][6..12] == mac(&n2.ns.sh("cat /sys/class/net/eth0/address").unwrap())
        {
            n2
        } else {
            n3
        };
        inject(&from.ns, "eth0", frames).unwrap();
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
    n2.pod
        .run(|| {
            // SAFETY: a raw socket this closure owns and closes.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
                assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
                let mut to: libc::sockaddr_in = std::mem::zeroed();
                to.sin_family = libc::AF_INET as u16;
                to.sin_addr.s_addr = u32::from_ne_bytes(n1_pod_ip.octets());
                for (tag, bad) in [
                    ("member pod, checksum broken", true),
                    ("member pod via the kernel", false),
                ] {
                    let d = udp(m_src, n1_pod_ip, 40001, PORT, tag.as_bytes(), bad);
                    let n = libc::sendto(
                        fd,
                        d.as_ptr() as *const _,
                        d.len(),
                        0,
                        &to as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_in>() as u32,
                    );
                    assert!(n > 0, "sendto: {}", std::io::Error::last_os_error());
                }
                libc::close(fd);
            }
        })
        .unwrap();

    // A pod with CAP_NET_RAW forging the outsider's node address as source,
    // to the member's VXLAN port: it never leaves this node either.
    let forged_src = n3.public_ip;
    let to = n2.public_ip;
    let d = udp(forged_src, to, 49152, 8472, &payload, false);
    let forged = ipv4_udp(forged_src, to, &d);
    n1.pod
        .run(|| {
            // SAFETY: a raw socket this closure owns and closes.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
                assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
                let mut sa: libc::sockaddr_in = std::mem::zeroed();
                sa.sin_family = libc::AF_INET as u16;
                sa.sin_addr.s_addr = u32::from_ne_bytes(to.octets());
                let n = libc::sendto(
                    fd,
                    forged.as_ptr() as *const _,
                    forged.len(),
                    0,
                    &sa as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                );
                assert!(n > 0, "sendto: {}", std::io::Error::last_os_error());
                libc::close(fd);
            }
        })
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
