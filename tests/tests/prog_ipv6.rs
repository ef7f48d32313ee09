//! VXLAN over IPv6 through the decap programs (XDP and TC), in the kernel
//! with BPF_PROG_TEST_RUN: a member's frame is decapsulated (exact bytes
//! out), every bad one (not a member, spoofed inner source, wrong VNI,
//! flags, inner destination or family, VXLAN in VXLAN, truncated) is dropped
//! and counted; neighbour discovery and link-local destinations go to
//! flannel-v6 untouched, extension headers and fragments to the kernel and
//! the guard.
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use flannel_agent::ebpf::bpf_sys::{lookup, lookup_per_cpu, update};
use flannel_ebpf_common::{
    Counter, Fdb6Value, FdbKey, NextHop6, PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP6,
};
use flannel_tests::{
    frames::{csum, eth, ipv6_udp},
    prereq,
    progs::{
        LOCAL_VTEP6, PUBLIC_IP6, REMOTE_IP6, REMOTE_SLOT, REMOTE_VTEP6, UNDERLAY_PEER_MAC, Vx6,
        bench, counter, load, map_fd, run_skb, set_v6,
    },
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Pass,
    Drop,
}
use Verdict::{Drop, Pass};

fn run(ebpf: &mut Ebpf, xdp: bool, frame: &[u8]) -> (Verdict, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    };
    let (r, pass, drop) = if xdp {
        let p: &mut Xdp = ebpf.program_mut(PROG_DECAP).unwrap().try_into().unwrap();
        (p.test_run(opts), 2, 1)
    } else {
        let p: &mut SchedClassifier = ebpf.program_mut(PROG_DECAP_TC).unwrap().try_into().unwrap();
        (p.test_run(opts), 0, 2)
    };
    let r = r.unwrap_or_else(|e| panic!("test_run on {} bytes: {e}", frame.len()));
    out.truncate(r.data_size_out as usize);
    let v = match r.return_value {
        v if v == pass => Pass,
        v if v == drop => Drop,
        v => panic!("decap returned {v}"),
    };
    (v, out)
}

/// What decapsulation leaves: the outer MACs in front of the inner IPv6 packet.
fn decapsulated(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&[0x86, 0xdd]);
    out.extend_from_slice(&frame[14 + 56 + 14..]);
    out
}

#[test]
fn vxlan_over_ipv6_is_checked_and_decapsulated_like_ipv4() {
    if !prereq::ready("prog_ipv6") {
        return;
    }
    let b = bench("fe-prog6");
    let mut ebpf = load(&b);
    let member = Vx6::default().frame();
    for xdp in [true, false] {
        // Not a dual-stack node (CONFIG6 not filled): IPv6 is not ours to judge.
        if xdp {
            let before = counter(&ebpf, Counter::RxPassIpv6Member);
            assert_eq!(run(&mut ebpf, xdp, &member), (Pass, member.clone()));
            assert_eq!(counter(&ebpf, Counter::RxPassIpv6Member), before);
            set_v6(&ebpf);
        }
        let hook = if xdp { "xdp" } else { "tc" };
        let before = counter(&ebpf, Counter::RxDecap);
        assert_eq!(
            run(&mut ebpf, xdp, &member),
            (Pass, decapsulated(&member)),
            "{hook}: a member's frame loses its outer IPv6, UDP and VXLAN headers"
        );
        assert_eq!(counter(&ebpf, Counter::RxDecap), before + 1, "{hook}");

        let d = Vx6::default;
        // Hop-by-hop options, then destination options: a chain.
        let mut chain = Vx6 {
            next_header: 0,
            ..d()
        }
        .frame();
        chain[14 + 40] = 60;
        // A fragment at offset 8.
        let mut later = Vx6 {
            next_header: 44,
            ..d()
        }
        .frame();
        later[14 + 40 + 3] = 8;
        let mut nd = Vx6::default().frame();
        nd[14 + 56 + 14 + 40] = 135; // ICMPv6 neighbour solicitation
        let cases: Vec<(&str, Vec<u8>, Verdict, Option<Counter>)> = vec![
            (
                "neighbour discovery (flannel-v6's own)",
                nd,
                Pass,
                Some(Counter::RxPassIpv6Member),
            ),
            (
                "a link-local inner destination",
                Vx6 {
                    inner_dst_ip: "fe80::1".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Pass,
                Some(Counter::RxPassIpv6Member),
            ),
            (
                "outer source not the member's",
                Vx6 {
                    src_ip: "fc00::99".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNonMember),
            ),
            (
                "inner source MAC of no member",
                Vx6 {
                    inner_src: [2, 0, 0, 0, 0, 0x99],
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNonMember),
            ),
            (
                "another VNI",
                Vx6 { vni: 2, ..d() }.frame(),
                Drop,
                Some(Counter::RxDropBadVni),
            ),
            (
                "VXLAN flags other than I",
                Vx6 {
                    flags: [0x0c, 0, 0, 0],
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropBadFlags),
            ),
            (
                "inner destination not our flannel-v6",
                Vx6 {
                    inner_dst: [2, 0, 0, 0, 0, 0x77],
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropBadInnerDst),
            ),
            (
                "IPv4 inside VXLAN over IPv6",
                Vx6 {
                    inner_proto: 0x0800,
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropInnerNotIpv4),
            ),
            (
                "a pod of another node as inner source",
                Vx6 {
                    inner_src_ip: "fd00:10:244:5::10".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropSpoofedInner),
            ),
            (
                "VXLAN in VXLAN to our address",
                Vx6 {
                    inner_next: 17,
                    inner_dst_ip: "fc00::1".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNested),
            ),
            (
                "a link-local inner source",
                Vx6 {
                    inner_src_ip: "fe80::1".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Pass,
                Some(Counter::RxDecap),
            ),
            (
                "a member's frame behind a fragment header",
                Vx6 {
                    next_header: 44,
                    ..d()
                }
                .frame(),
                Pass,
                Some(Counter::RxPassIpv6ExtHeaders),
            ),
            (
                "a non-member's frame behind a fragment header",
                Vx6 {
                    next_header: 44,
                    src_ip: "fc00::99".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNonMember),
            ),
            (
                "a spoofed inner source behind options",
                Vx6 {
                    next_header: 60,
                    inner_src_ip: "fd00:10:244:5::10".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropSpoofedInner),
            ),
            (
                "two extension headers",
                chain,
                Drop,
                Some(Counter::RxDropIpv6ExtChain),
            ),
            (
                "a later fragment",
                later,
                Pass,
                Some(Counter::RxPassIpv6ExtHeaders),
            ),
            (
                "a pod source on the underlay",
                Vx6 {
                    src_ip: "fd00:10:244:2::10".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropPodSourceOnUnderlay),
            ),
            (
                "options then UDP inside, to our address (VXLAN in VXLAN)",
                Vx6 {
                    inner_next: 0,
                    inner_dst_ip: "fc00::1".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNested),
            ),
            (
                "a hop-by-hop options header",
                Vx6 {
                    next_header: 0,
                    ..d()
                }
                .frame(),
                Pass,
                Some(Counter::RxPassIpv6ExtHeaders),
            ),
            (
                "to another address",
                Vx6 {
                    dst_ip: "fc00::5".parse().unwrap(),
                    ..d()
                }
                .frame(),
                Pass,
                None,
            ),
            (
                "to another port",
                Vx6 { dport: 4789, ..d() }.frame(),
                Pass,
                None,
            ),
            (
                "an IPv6 header without its UDP port",
                member[..56].to_vec(),
                Pass,
                None,
            ),
        ];
        for (name, frame, want, ctr) in cases {
            let before = ctr.map(|c| counter(&ebpf, c));
            let (got, out) = run(&mut ebpf, xdp, &frame);
            assert_eq!(got, want, "{hook}: {name}");
            if got == Pass && ctr != Some(Counter::RxDecap) {
                assert_eq!(out, frame, "{hook}: {name} passes untouched");
            }
            if let (Some(c), Some(n)) = (ctr, before) {
                assert_eq!(
                    counter(&ebpf, c),
                    n + 1,
                    "{hook}: {name} counted as {}",
                    c.name()
                );
            }
        }
        if xdp {
            // Behind a priority tag (VLAN 0) at XDP: the same checks.
            let tagged = |f: Vec<u8>| {
                let mut t = f[..12].to_vec();
                t.extend_from_slice(&[0x81, 0x00, 0x00, 0x00]);
                t.extend_from_slice(&f[12..]);
                t
            };
            let before = counter(&ebpf, Counter::RxDropNonMember);
            let forged = tagged(
                Vx6 {
                    src_ip: "fc00::99".parse().unwrap(),
                    ..d()
                }
                .frame(),
            );
            assert_eq!(run(&mut ebpf, xdp, &forged).0, Drop, "tagged non-member");
            assert_eq!(counter(&ebpf, Counter::RxDropNonMember), before + 1);
        }
        // Cut anywhere past the UDP header: truncated, dropped.
        for cut in [14 + 48 + 4, 14 + 48 + 8 + 10, 14 + 48 + 8 + 14 + 20] {
            let before = counter(&ebpf, Counter::RxDropTruncated);
            assert_eq!(
                run(&mut ebpf, xdp, &member[..cut]).0,
                Drop,
                "{hook}: cut at {cut}"
            );
            assert_eq!(counter(&ebpf, Counter::RxDropTruncated), before + 1);
        }
    }
}

/// flannel-v6 hands the encap program this: our pod fd00:10:244:1::10 →
/// the member's pod fd00:10:244:2::10, UDP with its checksum right.
fn inner6(next: u8) -> Vec<u8> {
    let mut ip = ipv6_udp(
        "fd00:10:244:1::10".parse().unwrap(),
        "fd00:10:244:2::10".parse().unwrap(),
        4000,
        53,
        b"flannel over IPv6!",
    );
    ip[6] = next;
    eth(REMOTE_VTEP6, LOCAL_VTEP6, 0x86dd, &ip)
}

fn run_encap6(ebpf: &mut Ebpf, frame: &[u8], gso_size: u32) -> (u32, Vec<u8>) {
    run_skb(ebpf, PROG_ENCAP6, frame, 0, 0, gso_size)
}

#[test]
fn encap6_builds_vxlan_over_ipv6_with_its_udp_checksum() {
    if !prereq::ready("encap6_exact") {
        return;
    }
    let b = bench("fe-encap6");
    b.ns.run(|| {
        flannel_tests::progs::stay_on_this_cpu();
        let mut ebpf = load(&b);
        let inner = inner6(17);
        // Not a dual-stack node yet: the kernel's device sends it.
        assert_eq!(run_encap6(&mut ebpf, &inner, 0), (0, inner.clone()));
        set_v6(&ebpf);
        let (rc, out) = run_encap6(&mut ebpf, &inner, 0);
        let why: Vec<(&str, u64)> = Counter::ALL
            .iter()
            .map(|c| (c.name(), counter(&ebpf, *c)))
            .filter(|(_, n)| *n != 0)
            .collect();
        assert_eq!(rc, 7, "TC_ACT_REDIRECT to the underlay; counters {why:?}");
        assert_eq!(out.len(), inner.len() + 70);
        assert_eq!(out[0..6], UNDERLAY_PEER_MAC);
        assert_eq!(out[6..12], b.underlay_mac);
        assert_eq!(out[12..14], [0x86, 0xdd]);
        let ip = &out[14..54];
        assert_eq!(ip[0] >> 4, 6);
        let udp_len = inner.len() + 16;
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]) as usize, udp_len);
        assert_eq!((ip[6], ip[7]), (17, 64), "UDP, hop limit 64");
        assert_eq!(ip[8..24], PUBLIC_IP6.octets());
        assert_eq!(ip[24..40], REMOTE_IP6.octets());
        let udp = &out[54..];
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        assert!((32768..61000).contains(&sport), "source port {sport}");
        assert_eq!(udp[2..4], 8472u16.to_be_bytes());
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]) as usize, udp_len);
        assert_ne!(udp[6..8], [0, 0], "IPv6 needs a UDP checksum");
        // The checksum verifies as a receiver checks it: over the pseudo-header and every byte.
        let mut pseudo = PUBLIC_IP6.octets().to_vec();
        pseudo.extend_from_slice(&REMOTE_IP6.octets());
        pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 17]);
        pseudo.extend_from_slice(udp);
        assert_eq!(csum(&pseudo), 0, "outer UDP checksum");
        assert_eq!(udp[8..16], [0x08, 0, 0, 0, 0, 0, 0x01, 0]);
        assert_eq!(udp[16..], inner[..], "inner frame untouched");
        assert_eq!(counter(&ebpf, Counter::TxEncap), 1);
        // The next hop is cached for the peer's slot (what bpftool shows)...
        let hops = lookup_per_cpu::<u32, NextHop6>(map_fd(&ebpf, "NEXT_HOPS6"), &REMOTE_SLOT)
            .unwrap()
            .unwrap();
        assert!(
            hops.iter()
                .any(|h| h.node_ip6 == REMOTE_IP6.octets() && h.dmac == UNDERLAY_PEER_MAC),
            "{hops:?}"
        );
        // ...and a second packet takes it: the neighbour's new MAC is not
        // looked up again within the second.
        b.ns.sh("ip -6 neigh replace fc00::2 lladdr 02:00:00:00:00:99 dev ul0 nud permanent")
            .unwrap();
        let (rc, again) = run_encap6(&mut ebpf, &inner, 0);
        assert_eq!(rc, 7);
        assert_eq!(again[0..6], UNDERLAY_PEER_MAC, "cached next hop");
        assert_eq!(again[14..54], out[14..54]);
        // Another address in the same slot (reused) is looked up afresh.
        let other: std::net::Ipv6Addr = "fc00::3".parse().unwrap();
        b.ns.sh("ip -6 neigh replace fc00::3 lladdr 02:00:00:00:00:33 dev ul0 nud permanent")
            .unwrap();
        let mut v = lookup::<FdbKey, Fdb6Value>(map_fd(&ebpf, "FDB6"), &FdbKey::new(REMOTE_VTEP6))
            .unwrap()
            .unwrap();
        v.node_ip6 = other.octets();
        update(map_fd(&ebpf, "FDB6"), &FdbKey::new(REMOTE_VTEP6), &v).unwrap();
        let (rc, moved) = run_encap6(&mut ebpf, &inner, 0);
        assert_eq!(rc, 7);
        assert_eq!(moved[0..6], [2, 0, 0, 0, 0, 0x33], "looked up for fc00::3");
        assert_eq!(moved[38..54], other.octets());
        v.node_ip6 = REMOTE_IP6.octets();
        update(map_fd(&ebpf, "FDB6"), &FdbKey::new(REMOTE_VTEP6), &v).unwrap();

        // What the kernel's device keeps sending, unchanged and counted.
        let mut unknown = inner.clone();
        unknown[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
        let mut short = inner.clone();
        short[14 + 5] ^= 1; // a payload length that is not the frame's
        let cases: [(&str, Vec<u8>, u32, Counter); 5] = [
            (
                "a GSO aggregate",
                inner.clone(),
                1400,
                Counter::TxFallbackIpv6Gso,
            ),
            (
                "a hop-by-hop header",
                inner6(0),
                0,
                Counter::TxFallbackIpv6ExtHeaders,
            ),
            (
                "a fragment header",
                inner6(44),
                0,
                Counter::TxFallbackIpv6ExtHeaders,
            ),
            ("an unknown VtepMAC", unknown, 0, Counter::TxFallbackNoFdb),
            (
                "a wrong payload length",
                short,
                0,
                Counter::TxFallbackMalformed,
            ),
        ];
        for (name, frame, gso, c) in cases {
            let before = counter(&ebpf, c);
            assert_eq!(
                run_encap6(&mut ebpf, &frame, gso),
                (0, frame.clone()),
                "{name}"
            );
            assert_eq!(
                counter(&ebpf, c),
                before + 1,
                "{name} counted as {}",
                c.name()
            );
        }
        // ICMPv6 and TCP get their checksum derived the same way.
        let mut icmp = ipv6_udp(
            "fd00:10:244:1::10".parse().unwrap(),
            "fd00:10:244:2::10".parse().unwrap(),
            0,
            0,
            b"",
        );
        icmp.truncate(40);
        let mut echo = vec![128u8, 0, 0, 0, 0, 7, 0, 1, 1, 2, 3, 4];
        icmp[4..6].copy_from_slice(&(echo.len() as u16).to_be_bytes());
        icmp[6] = 58;
        let mut ps = icmp[8..40].to_vec();
        ps.extend_from_slice(&(echo.len() as u32).to_be_bytes());
        ps.extend_from_slice(&[0, 0, 0, 58]);
        ps.extend_from_slice(&echo);
        let c = csum(&ps);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        icmp.extend_from_slice(&echo);
        let frame = eth(REMOTE_VTEP6, LOCAL_VTEP6, 0x86dd, &icmp);
        let (rc, out) = run_encap6(&mut ebpf, &frame, 0);
        assert_eq!(rc, 7);
        let udp = &out[54..];
        let mut pseudo = PUBLIC_IP6.octets().to_vec();
        pseudo.extend_from_slice(&REMOTE_IP6.octets());
        pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 17]);
        pseudo.extend_from_slice(udp);
        assert_eq!(csum(&pseudo), 0, "outer UDP checksum around ICMPv6");
    })
    .unwrap();
}
