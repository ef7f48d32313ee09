//! Reachability and the membership promise over IPv6, checked the same way
//! on dual-stack and IPv6-only labs.
use std::{net::Ipv6Addr, time::Duration};

use crate::{
    lab::Lab,
    traffic::{UdpSink, ping, send_udp6, wait_reachable},
};

/// Every pod reaches every other pod over IPv6 (and IPv4 too if the lab
/// has it), both ways.
pub fn all_pairs_reach(lab: &Lab) {
    for (i, a) in lab.nodes.iter().enumerate() {
        for (j, b) in lab.nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            wait_reachable(&a.pod, b.pod_ip6(), Duration::from_secs(10)).unwrap_or_else(|e| {
                panic!(
                    "{} → {} (IPv6): {e}\n{}\n{}",
                    a.name,
                    b.name,
                    lab.ipv6_tables(),
                    lab.logs()
                )
            });
            assert_eq!(
                ping(&a.pod, b.pod_ip6(), 5, 0.05).unwrap(),
                (5, 5),
                "{} → {} over IPv6",
                a.name,
                b.name
            );
            if lab.ipv4 {
                assert_eq!(
                    ping(&a.pod, b.pod_ip(), 5, 0.05).unwrap(),
                    (5, 5),
                    "{} → {} over IPv4",
                    a.name,
                    b.name
                );
            }
        }
    }
}

/// Node 0 runs flannel-agent, node 1 is a member (a stock node): a
/// member's VXLAN over IPv6 reaches node 0's pod; spoofed inside, from a
/// host that is not a member (whole, fragmented, to other local addresses),
/// it does not.
pub fn only_members_reach_flannel_v6(lab: &Lab, port: u16) {
    // The outside host has fc00::100 on the IPv6 underlay already.
    let (ext, _) = lab.outside_host().unwrap();
    let ext_ip: Ipv6Addr = crate::lab::OUTSIDE_IP6;
    ext.sh("ip -6 route add fd00:10:244::/56 via fc00::11")
        .unwrap();
    let (ours, stock) = (&lab.nodes[0], &lab.nodes[1]);
    wait_reachable(&stock.pod, ours.pod_ip6(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    let public6 = ours.public_ipv6.unwrap();
    // What a member's pod would send ours, in VXLAN: inner frame to our flannel-v6.
    let datagram_from =
        |src: Ipv6Addr, tag: &str, pad: usize| ours.vxlan6_to_pod(stock, src, port, tag, pad);
    let datagram = |tag: &str, pad: usize| datagram_from(stock.pod_ip6(), tag, pad);
    let delivered = |send: &dyn Fn()| -> usize {
        let sink = UdpSink::start6(&ours.pod, port, Duration::from_millis(1500)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        send();
        sink.finish().len()
    };
    // The member's datagram arrives: the frames are right, the test can fail.
    let decap_before = lab.counter(0, "rx_decap");
    let from_member = datagram("member", 0);
    assert_eq!(
        delivered(&|| send_udp6(
            &stock.ns,
            stock.public_ipv6.unwrap(),
            public6,
            8472,
            &from_member
        )
        .unwrap()),
        1,
        "a member's VXLAN over IPv6 must reach the pod\n{}",
        lab.logs()
    );
    // Our programs checked and decapsulated it.
    assert!(lab.counter(0, "rx_decap") - decap_before >= 1);
    // A member speaking for another node's pods (spoofed inside): the
    // programs drop it; the kernel's device alone would deliver it.
    let spoofed = datagram_from("fd00:10:244:5::10".parse().unwrap(), "spoofed", 0);
    let drops = lab.counter(0, "rx_drop_spoofed_inner_source");
    assert_eq!(
        delivered(&|| send_udp6(
            &stock.ns,
            stock.public_ipv6.unwrap(),
            public6,
            8472,
            &spoofed
        )
        .unwrap()),
        0,
        "a member's packet from another node's IPv6 pod must not arrive"
    );
    assert_eq!(lab.counter(0, "rx_drop_spoofed_inner_source") - drops, 1);
    // A host that is not a member: whole, fragmented, to other local addresses.
    // Whole, the programs drop it at the underlay; in fragments they check
    // the first one (behind its fragment header) and drop it, and the rest
    // can never be reassembled. The guard, behind them, sees none of it.
    let (non_member, ebpf_non_member, ext_headers) = (
        ours.guard_counter("ip6", "vxlan_from_non_member"),
        lab.counter(0, "rx_drop_non_member"),
        lab.counter(0, "rx_pass_ipv6_ext_headers"),
    );
    let whole = datagram("whole", 0);
    assert_eq!(
        delivered(&|| send_udp6(&ext, ext_ip, public6, 8472, &whole).unwrap()),
        0
    );
    assert_eq!(lab.counter(0, "rx_drop_non_member") - ebpf_non_member, 1);
    let big = datagram("fragmented", 2500);
    assert_eq!(
        delivered(&|| send_udp6(&ext, ext_ip, public6, 8472, &big).unwrap()),
        0
    );
    assert_eq!(
        lab.counter(0, "rx_drop_non_member") - ebpf_non_member,
        2,
        "the first fragment"
    );
    assert!(
        lab.counter(0, "rx_pass_ipv6_ext_headers") - ext_headers >= 1,
        "the later ones"
    );
    assert_eq!(
        ours.guard_counter("ip6", "vxlan_from_non_member") - non_member,
        0
    );
    let elsewhere = ours.guard_counter("ip6", "vxlan_not_to_public_ip");
    let gw = Ipv6Addr::from(u128::from(ours.subnet6_base()) + 1);
    for local in [gw, ours.subnet6_base()] {
        assert_eq!(
            delivered(&|| send_udp6(&ext, ext_ip, local, 8472, &whole).unwrap()),
            0,
            "to {local}"
        );
    }
    assert_eq!(
        ours.guard_counter("ip6", "vxlan_not_to_public_ip") - elsewhere,
        2
    );
    // `show stats` names the ip6 guard's drops.
    let stats = ours.show("stats").unwrap();
    assert!(stats.contains("guard6_vxlan_from_non_member"), "{stats}");
}
