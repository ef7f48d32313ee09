//! The per-packet logic, run in the kernel with BPF_PROG_TEST_RUN on crafted
//! frames: exact bytes out, verdicts and counters for good and bad frames.
use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use flannel_agent::ebpf::bpf_sys::lookup_per_cpu;
use flannel_ebpf_common::{
    Counter, FlowKey, NAT_MARK, POD_HOP_SLOTS, PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP,
    PROG_POD_EGRESS, PeerStats, PodHop,
};
use flannel_tests::{
    frames::{csum, eth, ipv4},
    prereq,
    progs::{
        LOCAL_VTEP, OUR_UNDERLAY_MAC, POD_MAC, PUBLIC_IP, REMOTE_IP, REMOTE_VTEP,
        UNDERLAY_PEER_MAC, Vx, bench, counter, inner_ip, inner_ip_from, load, load_direct, map_fd,
        run_skb, set_fdb, set_route,
    },
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The two decap programs: XDP, and TC ingress (veth underlays).
#[derive(Clone, Copy, Debug)]
enum Hook {
    Xdp,
    Tc,
}

/// A decap verdict, whichever hook gave it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Verdict {
    Pass,
    Drop,
}
use Verdict::{Drop, Pass};

/// Stats of the peer in FDB slot 3 (the remote node of these tests), summed over CPUs.
fn peer3(ebpf: &Ebpf) -> PeerStats {
    lookup_per_cpu::<u32, PeerStats>(map_fd(ebpf, "PEER_STATS"), &3)
        .unwrap()
        .unwrap()
        .iter()
        .fold(PeerStats::default(), |mut a, v| {
            a.tx_packets += v.tx_packets;
            a.tx_bytes += v.tx_bytes;
            a.rx_packets += v.rx_packets;
            a.rx_bytes += v.rx_bytes;
            a.tx_fallbacks += v.tx_fallbacks;
            a.rx_drops += v.rx_drops;
            a.last_rx_ns = a.last_rx_ns.max(v.last_rx_ns);
            a
        })
}

/// The inner frame flannel.1 hands to the encap program: pod 10.244.1.10 → 10.244.2.10.
fn inner_frame(tos: u8) -> Vec<u8> {
    let udp: Vec<u8> = [0x30, 0x39, 0x00, 0x35, 0x00, 0x10, 0, 0]
        .into_iter()
        .chain(*b"flannel!")
        .collect();
    let ip = ipv4(
        Ipv4Addr::new(10, 244, 1, 10),
        Ipv4Addr::new(10, 244, 2, 10),
        17,
        tos,
        &udp,
    );
    eth(REMOTE_VTEP, LOCAL_VTEP, 0x0800, &ip)
}

fn run_tc(ebpf: &mut Ebpf, frame: &[u8]) -> (u32, Vec<u8>) {
    let p: &mut SchedClassifier = ebpf.program_mut(PROG_ENCAP).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| panic!("test_run tc on {} bytes: {e}", frame.len()));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// Run a decap program on `frame`; `gso_size` non-zero makes the skb a GSO
/// aggregate (TC only).
fn run_decap_gso(ebpf: &mut Ebpf, hook: Hook, frame: &[u8], gso_size: u32) -> (Verdict, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    // struct __sk_buff (192 bytes): gso_segs at 164, gso_size at 176.
    let mut skb = [0u8; 192];
    skb[164..168].copy_from_slice(&(gso_size.min(1) * 2).to_ne_bytes());
    skb[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: (gso_size != 0).then_some(&skb[..]),
        ..TestRunOptions::new()
    };
    let (r, pass, drop) = match hook {
        Hook::Xdp => {
            let p: &mut Xdp = ebpf.program_mut(PROG_DECAP).unwrap().try_into().unwrap();
            (p.test_run(opts), XDP_PASS, XDP_DROP)
        }
        Hook::Tc => {
            let p: &mut SchedClassifier =
                ebpf.program_mut(PROG_DECAP_TC).unwrap().try_into().unwrap();
            (p.test_run(opts), TC_ACT_OK, TC_ACT_SHOT)
        }
    };
    let r = r.unwrap_or_else(|e| panic!("test_run {hook:?} decap on {} bytes: {e}", frame.len()));
    out.truncate(r.data_size_out as usize);
    let verdict = match r.return_value {
        v if v == pass => Pass,
        v if v == drop => Drop,
        v => panic!("{hook:?} decap returned {v}"),
    };
    (verdict, out)
}

fn run_decap(ebpf: &mut Ebpf, hook: Hook, frame: &[u8]) -> (Verdict, Vec<u8>) {
    run_decap_gso(ebpf, hook, frame, 0)
}

#[test]
fn encap_builds_flannel_vxlan_exactly() {
    if !prereq::ready("encap_exact") {
        return;
    }
    let b = bench("ptr-encap");
    b.ns.run(|| {
        let mut ebpf = load(&b);
        let inner = inner_frame(0x03); // ECN CE on the inner packet
        let (rc, out) = run_tc(&mut ebpf, &inner);
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(out.len(), inner.len() + 50);
        // Outer Ethernet: the underlay neighbour's MAC, from our underlay MAC.
        assert_eq!(out[0..6], UNDERLAY_PEER_MAC);
        assert_eq!(out[6..12], b.underlay_mac);
        assert_eq!(out[12..14], [0x08, 0x00]);
        // Outer IPv4: no options, ECN CE → ECT(0), length, DF clear, TTL 64, UDP, addresses.
        let ip = &out[14..34];
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[1], 0x02, "RFC 6040: CE inside becomes ECT(0) outside");
        assert_eq!(
            u16::from_be_bytes([ip[2], ip[3]]) as usize,
            inner.len() + 36
        );
        assert_eq!(ip[6..8], [0, 0], "DF clear, not a fragment");
        assert_eq!((ip[8], ip[9]), (64, 17));
        assert_eq!(ip[12..16], PUBLIC_IP.octets());
        assert_eq!(ip[16..20], REMOTE_IP.octets());
        assert_eq!(csum(ip), 0, "outer IPv4 checksum");
        // UDP: source port from the flow hash in range, port 8472, length, checksum 0.
        let udp = &out[34..42];
        let sport = u16::from_be_bytes([udp[0], udp[1]]);
        assert!((32768..61000).contains(&sport), "source port {sport}");
        assert_eq!(udp[2..4], 8472u16.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([udp[4], udp[5]]) as usize,
            inner.len() + 16
        );
        assert_eq!(udp[6..8], [0, 0]);
        // VXLAN: I flag, VNI 1.
        assert_eq!(out[42..50], [0x08, 0, 0, 0, 0, 0, 0x01, 0]);
        // Inner frame untouched: dst = remote VtepMAC, src = our VtepMAC.
        assert_eq!(out[50..], inner[..]);
        // The same flow always gets the same source port (ECMP stickiness).
        let (_, again) = run_tc(&mut ebpf, &inner);
        assert_eq!(again[34..36], out[34..36]);
        assert_eq!(counter(&ebpf, Counter::TxEncap), 2);
        let p = peer3(&ebpf);
        assert_eq!((p.tx_packets, p.tx_bytes), (2, 2 * inner.len() as u64));
    })
    .unwrap();
}

#[test]
fn encap_falls_back_to_the_kernel_unchanged() {
    if !prereq::ready("encap_fallback") {
        return;
    }
    let b = bench("ptr-encfb");
    b.ns.run(|| {
        let mut ebpf = load(&b);
        // ARP from flannel.1: not IPv4.
        let arp = eth([0xff; 6], LOCAL_VTEP, 0x0806, &[0u8; 28]);
        assert_eq!(run_tc(&mut ebpf, &arp), (TC_ACT_OK, arp.clone()));
        assert_eq!(counter(&ebpf, Counter::TxFallbackNotIpv4), 1);
        // Unknown VtepMAC: no FDB entry.
        let mut unknown = inner_frame(0);
        unknown[0..6].copy_from_slice(&[0x02, 9, 9, 9, 9, 9]);
        assert_eq!(run_tc(&mut ebpf, &unknown), (TC_ACT_OK, unknown.clone()));
        assert_eq!(counter(&ebpf, Counter::TxFallbackNoFdb), 1);
        // Forwarding off on the underlay: the route lookup refuses; the kernel path gets it.
        b.ns.sh("sysctl -qw net.ipv4.ip_forward=0").unwrap();
        let frame = inner_frame(0);
        assert_eq!(run_tc(&mut ebpf, &frame), (TC_ACT_OK, frame.clone()));
        assert_eq!(counter(&ebpf, Counter::TxFallbackForwardingOff), 1);
        b.ns.sh("sysctl -qw net.ipv4.ip_forward=1").unwrap();
        // Remote node without a route on the underlay.
        set_fdb(&ebpf, [192, 0, 2, 7]);
        let frame = inner_frame(0);
        assert_eq!(run_tc(&mut ebpf, &frame), (TC_ACT_OK, frame.clone()));
        assert_eq!(counter(&ebpf, Counter::TxFallbackNoRoute), 1);
        // On-link node whose MAC is not resolved yet: sent through bpf_redirect_neigh.
        set_fdb(&ebpf, [10, 9, 0, 3]);
        let (rc, out) = run_tc(&mut ebpf, &frame);
        assert_eq!((rc, out.len()), (TC_ACT_REDIRECT, frame.len() + 50));
        assert_eq!(counter(&ebpf, Counter::TxRedirectNeigh), 1);
        assert_eq!(counter(&ebpf, Counter::TxEncap), 1);
    })
    .unwrap();
}

#[test]
fn encap_resolves_the_vtep_from_the_route_map_by_destination() {
    if !prereq::ready("encap_route_map") {
        return;
    }
    let b = bench("ptr-encrt");
    b.ns.run(|| {
        let mut ebpf = load(&b);
        // The one kernel route for the Network gives every frame our own
        // VtepMAC as destination: only the ROUTE map says where it goes.
        let mut frame = inner_frame(0);
        frame[0..6].copy_from_slice(&LOCAL_VTEP);
        assert_eq!(run_tc(&mut ebpf, &frame), (TC_ACT_OK, frame.clone()));
        assert_eq!(counter(&ebpf, Counter::TxFallbackNoFdb), 1);
        // The route map wins over the FDB entry of the frame's MAC, too.
        set_fdb(&ebpf, [192, 0, 2, 7]);
        set_route(&ebpf, [10, 244, 2, 0], 24, REMOTE_IP.octets());
        let (rc, out) = run_tc(&mut ebpf, &frame);
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(
            out[30..34],
            REMOTE_IP.octets(),
            "outer destination from the route map"
        );
        assert_eq!(out[0..6], UNDERLAY_PEER_MAC);
        // Inner Ethernet as Flannel puts it on the wire: the remote VtepMAC.
        assert_eq!(out[50..56], REMOTE_VTEP);
        assert_eq!(out[56..], frame[6..]);
        assert_eq!(counter(&ebpf, Counter::TxEncap), 1);
        assert_eq!(peer3(&ebpf).tx_packets, 1);
        // A destination in no lease: left to the kernel, unchanged.
        let mut stray = frame.clone();
        stray[30..34].copy_from_slice(&[10, 244, 7, 10]);
        assert_eq!(run_tc(&mut ebpf, &stray), (TC_ACT_OK, stray.clone()));
        assert_eq!(counter(&ebpf, Counter::TxFallbackNoFdb), 2);
    })
    .unwrap();
}

type Case = (&'static str, Vec<u8>, Verdict, Option<Counter>);

#[test]
fn decap_delivers_member_vxlan_to_the_stack() {
    if !prereq::ready("decap_valid") {
        return;
    }
    let b = bench("ptr-decap");
    b.ns.run(|| {
        for hook in [Hook::Xdp, Hook::Tc] {
            let mut ebpf = load(&b);
            // The inner packet, addressed from the outer MACs so the stack takes it.
            let expect = eth(OUR_UNDERLAY_MAC, UNDERLAY_PEER_MAC, 0x0800, &inner_ip());
            let out = run_decap(&mut ebpf, hook, &Vx::default().frame());
            assert_eq!(out, (Pass, expect.clone()), "{hook:?}");
            // IP options are legal: the UDP header is found after them.
            let opts = Vx {
                ihl_options: vec![1, 1, 1, 0],
                ..Vx::default()
            };
            let out = run_decap(&mut ebpf, hook, &opts.frame());
            assert_eq!(out, (Pass, expect.clone()), "{hook:?} with IP options");
            // A source outside the cluster Network is the member's to forward.
            let outside = Ipv4Addr::new(192, 168, 7, 7);
            let routed = Vx {
                inner_src_ip: outside,
                ..Vx::default()
            };
            let out = run_decap(&mut ebpf, hook, &routed.frame());
            let expect_routed = eth(
                OUR_UNDERLAY_MAC,
                UNDERLAY_PEER_MAC,
                0x0800,
                &inner_ip_from(outside),
            );
            assert_eq!(
                out,
                (Pass, expect_routed),
                "{hook:?} from outside the Network"
            );
            let mut n = 3;
            if let Hook::Xdp = hook {
                // A priority-tagged (VLAN 0) frame: checked and decapsulated,
                // the tag gone with the outer headers. (At TC the kernel has
                // already removed it.)
                let tagged = Vx {
                    vlan: Some(0x6000),
                    ..Vx::default()
                };
                let out = run_decap(&mut ebpf, hook, &tagged.frame());
                assert_eq!(out, (Pass, expect.clone()), "{hook:?} VLAN 0");
                n += 1;
            }
            assert_eq!(counter(&ebpf, Counter::RxDecap), n, "{hook:?}");
            let p = peer3(&ebpf);
            assert_eq!((p.rx_packets, p.rx_drops), (n, 0), "{hook:?}");
            assert!(p.last_rx_ns > 0);
        }
    })
    .unwrap();
}

#[test]
fn decap_verdicts_and_counters_for_bad_frames() {
    if !prereq::ready("decap_bad") {
        return;
    }
    let b = bench("ptr-decbad");
    b.ns.run(|| {
        for hook in [Hook::Xdp, Hook::Tc] {
            bad_frames(&mut load(&b), hook);
        }
    })
    .unwrap();
}

#[test]
fn tc_decap_leaves_gso_aggregates_to_the_kernel_device() {
    if !prereq::ready("decap_gso") {
        return;
    }
    let b = bench("ptr-decgso");
    b.ns.run(|| {
        let mut ebpf = load(&b);
        // A member's GSO aggregate: checked, then left whole to the kernel's VXLAN device.
        let frame = Vx::default().frame();
        assert_eq!(
            run_decap_gso(&mut ebpf, Hook::Tc, &frame, 1398),
            (Pass, frame.clone())
        );
        assert_eq!(counter(&ebpf, Counter::RxPassGso), 1);
        assert_eq!(counter(&ebpf, Counter::RxDecap), 0);
        // The peer is credited with what it sent, whoever decapsulates it.
        let p = peer3(&ebpf);
        assert_eq!((p.rx_packets, p.rx_bytes), (1, (frame.len() - 50) as u64));
        // A non-member's is still dropped.
        let stranger = Vx {
            src_ip: Ipv4Addr::new(10, 9, 0, 99),
            ..Vx::default()
        }
        .frame();
        assert_eq!(run_decap_gso(&mut ebpf, Hook::Tc, &stranger, 1398).0, Drop);
        assert_eq!(counter(&ebpf, Counter::RxDropNonMember), 1);
        assert_eq!(counter(&ebpf, Counter::RxPassGso), 1);
    })
    .unwrap();
}

/// Every bad frame gets its verdict and counter from `hook`'s program, untouched.
fn bad_frames(ebpf: &mut Ebpf, hook: Hook) {
    {
        let good = Vx::default().frame();
        // (what, frame, verdict, counter); every one of these leaves the frame untouched.
        let cases: Vec<Case> = vec![
            (
                "truncated after the VXLAN header",
                good[..14 + 20 + 8 + 8 + 4].to_vec(),
                Drop,
                Some(Counter::RxDropTruncated),
            ),
            (
                "wrong VNI",
                Vx {
                    vni: 2,
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropBadVni),
            ),
            (
                "flags other than I",
                Vx {
                    flags: [0x0c, 0, 0, 0],
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropBadFlags),
            ),
            (
                "reserved bits set",
                Vx {
                    flags: [0x08, 0, 1, 0],
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropBadFlags),
            ),
            (
                "non-member source",
                Vx {
                    src_ip: Ipv4Addr::new(10, 9, 0, 99),
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNonMember),
            ),
            (
                "unknown inner source MAC",
                Vx {
                    inner_src: [0x02, 7, 7, 7, 7, 7],
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNonMember),
            ),
            (
                "inner frame for another VTEP",
                Vx {
                    inner_dst: [0x02, 5, 5, 5, 5, 5],
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropBadInnerDst),
            ),
            (
                "fragment",
                Vx {
                    frag: [0x20, 0x00],
                    ..Vx::default()
                }
                .frame(),
                Pass,
                Some(Counter::RxPassFragment),
            ),
            (
                "later fragment",
                Vx {
                    frag: [0x20, 0x10],
                    ..Vx::default()
                }
                .frame(),
                Pass,
                Some(Counter::RxPassFragment),
            ),
            (
                "first fragment from a non-member",
                Vx {
                    frag: [0x20, 0x00],
                    src_ip: Ipv4Addr::new(10, 9, 0, 99),
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNonMember),
            ),
            (
                "first fragment speaking for another node's pod",
                Vx {
                    frag: [0x20, 0x00],
                    inner_src_ip: Ipv4Addr::new(10, 244, 3, 10),
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropSpoofedInner),
            ),
            (
                "first fragment too short for the inner headers",
                Vx {
                    frag: [0x20, 0x00],
                    ..Vx::default()
                }
                .frame()[..14 + 20 + 8 + 8 + 14]
                    .to_vec(),
                Drop,
                Some(Counter::RxDropTinyFragment),
            ),
            (
                "first fragment whose IPv4 length ends before the inner headers (padded)",
                {
                    let mut f = Vx {
                        frag: [0x20, 0x00],
                        ..Vx::default()
                    }
                    .frame();
                    // Total length: IPv4 + UDP + VXLAN only; the rest is padding.
                    f[16..18].copy_from_slice(&36u16.to_be_bytes());
                    f[24..26].copy_from_slice(&[0, 0]);
                    let c = csum(&f[14..34]);
                    f[24..26].copy_from_slice(&c.to_be_bytes());
                    f
                },
                Drop,
                Some(Counter::RxDropTinyFragment),
            ),
            (
                "a member's inner frame tagged 802.1Q",
                Vx {
                    inner_proto: 0x8100,
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropInnerNotIpv4),
            ),
            (
                "a member's inner IPv6 frame",
                Vx {
                    inner_proto: 0x86dd,
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropInnerNotIpv4),
            ),
            (
                "VXLAN inside a member's VXLAN, to our public IP",
                {
                    let inner_udp = ipv4(REMOTE_IP, PUBLIC_IP, 17, 0, &[0u8; 24]);
                    let inner = eth(LOCAL_VTEP, REMOTE_VTEP, 0x0800, &inner_udp);
                    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
                    vx.extend_from_slice(&inner);
                    let mut udp = vec![0xc3, 0x50];
                    udp.extend_from_slice(&8472u16.to_be_bytes());
                    udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
                    udp.extend_from_slice(&[0, 0]);
                    udp.extend_from_slice(&vx);
                    eth(
                        OUR_UNDERLAY_MAC,
                        UNDERLAY_PEER_MAC,
                        0x0800,
                        &ipv4(REMOTE_IP, PUBLIC_IP, 17, 0, &udp),
                    )
                },
                Drop,
                Some(Counter::RxDropNested),
            ),
            (
                "a member speaking for another node's pod",
                Vx {
                    inner_src_ip: Ipv4Addr::new(10, 244, 3, 10),
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropSpoofedInner),
            ),
            (
                "a member speaking for one of our pods",
                Vx {
                    inner_src_ip: Ipv4Addr::new(10, 244, 1, 99),
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropSpoofedInner),
            ),
            (
                "plain packet from the underlay with a pod source",
                eth(
                    OUR_UNDERLAY_MAC,
                    UNDERLAY_PEER_MAC,
                    0x0800,
                    &ipv4(
                        Ipv4Addr::new(10, 244, 2, 10),
                        Ipv4Addr::new(10, 244, 1, 10),
                        6,
                        0,
                        &[0u8; 20],
                    ),
                ),
                Drop,
                Some(Counter::RxDropPodSourceOnUnderlay),
            ),
            (
                "a real VLAN's frame",
                Vx {
                    vlan: Some(5),
                    src_ip: Ipv4Addr::new(10, 9, 0, 99),
                    ..Vx::default()
                }
                .frame(),
                Pass,
                None,
            ),
            (
                "inner ARP from a member",
                Vx {
                    inner_proto: 0x0806,
                    ..Vx::default()
                }
                .frame(),
                Pass,
                Some(Counter::RxPassInnerNotIpv4),
            ),
            (
                "other UDP port",
                Vx {
                    dport: 4789,
                    ..Vx::default()
                }
                .frame(),
                Pass,
                None,
            ),
        ];
        let mut cases = cases;
        if let Hook::Xdp = hook {
            // Only XDP sees the priority tag; at TC the kernel removed it.
            cases.push((
                "priority-tagged (VLAN 0) frame from a non-member",
                Vx {
                    vlan: Some(0),
                    src_ip: Ipv4Addr::new(10, 9, 0, 99),
                    ..Vx::default()
                }
                .frame(),
                Drop,
                Some(Counter::RxDropNonMember),
            ));
        }
        for (what, frame, verdict, ctr) in cases {
            let before = ctr.map(|c| counter(ebpf, c));
            let (rc, out) = run_decap(ebpf, hook, &frame);
            assert_eq!(rc, verdict, "{hook:?}: {what}");
            assert_eq!(out, frame, "{hook:?}: {what}: frame must be untouched");
            if let (Some(c), Some(before)) = (ctr, before) {
                assert_eq!(
                    counter(ebpf, c),
                    before + 1,
                    "{hook:?}: {what}: counter {}",
                    c.name()
                );
            }
        }
        // Garbled outer IPv4 (version 6 in an IPv4 frame): left to the kernel.
        let mut garbled = good.clone();
        garbled[14] = 0x65;
        assert_eq!(run_decap(ebpf, hook, &garbled), (Pass, garbled.clone()));
        assert_eq!(counter(ebpf, Counter::RxPassMalformed), 1, "{hook:?}");
        // Not VXLAN at all (TCP): passes, untouched.
        let tcp = eth(
            OUR_UNDERLAY_MAC,
            UNDERLAY_PEER_MAC,
            0x0800,
            &ipv4(REMOTE_IP, PUBLIC_IP, 6, 0, &[0u8; 20]),
        );
        assert_eq!(run_decap(ebpf, hook, &tcp), (Pass, tcp.clone()));
        // A runt: Ethernet and half an IPv4 header: left to the kernel,
        // counted. (BPF_PROG_TEST_RUN builds no skb that short for TC.)
        if let Hook::Xdp = hook {
            let runt = good[..24].to_vec();
            assert_eq!(run_decap(ebpf, hook, &runt), (Pass, runt.clone()));
            assert_eq!(counter(ebpf, Counter::RxPassMalformed), 2, "{hook:?}");
        }
        assert_eq!(
            counter(ebpf, Counter::RxDecap),
            0,
            "{hook:?}: nothing bad was decapsulated"
        );
    }
}

/// Run the TC program `name` on `frame`: (return value, frame out).
fn run_named(ebpf: &mut Ebpf, name: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| panic!("test_run {name} on {} bytes: {e}", frame.len()));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// A local pod's UDP packet 10.244.1.10:12345 → `dst`:53 as it reaches
/// cni0's ingress: addressed to the bridge (the pods' gateway).
fn pod_frame(b: &flannel_tests::progs::Bench, dst: Ipv4Addr) -> Vec<u8> {
    let udp: Vec<u8> = [0x30, 0x39, 0x00, 0x35, 0x00, 0x10, 0, 0]
        .into_iter()
        .chain(*b"flannel!")
        .collect();
    let ip = ipv4(Ipv4Addr::new(10, 244, 1, 10), dst, 17, 0, &udp);
    eth(b.bridge_mac, POD_MAC, 0x0800, &ip)
}

/// Set byte `at` of the IPv4 header in `frame` and fix the header checksum.
fn patch_ip(frame: &[u8], at: usize, value: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[14 + at] = value;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = csum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

fn stack_flow(ebpf: &Ebpf, key: &FlowKey) -> bool {
    flannel_agent::ebpf::bpf_sys::lookup::<FlowKey, u64>(map_fd(ebpf, "STACK_FLOWS"), key)
        .unwrap()
        .is_some()
}

#[test]
fn direct_egress_encapsulates_at_the_bridge_as_flannel_1_would() {
    if !prereq::ready("direct_egress") {
        return;
    }
    let b = bench("ptr-dirout");
    b.ns.run(|| {
        flannel_tests::progs::stay_on_this_cpu();
        let mut ebpf = load_direct(&b);
        set_route(&ebpf, [10, 244, 2, 0], 24, REMOTE_IP.octets());
        let frame = pod_frame(&b, Ipv4Addr::new(10, 244, 2, 10));
        let (rc, out) = run_skb(&mut ebpf, PROG_POD_EGRESS, &frame, b.bridge_ifindex, 0, 0);
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(out.len(), frame.len() + 50);
        assert_eq!(out[0..6], UNDERLAY_PEER_MAC);
        assert_eq!(out[6..12], b.underlay_mac);
        assert_eq!(
            out[26..34],
            [PUBLIC_IP.octets(), REMOTE_IP.octets()].concat()[..]
        );
        assert_eq!(csum(&out[14..34]), 0, "outer IPv4 checksum");
        assert_eq!(out[36..38], 8472u16.to_be_bytes());
        assert_eq!(out[42..50], [0x08, 0, 0, 0, 0, 0, 0x01, 0]);
        // The inner frame as flannel.1 would have sent it: VtepMACs, and
        // the TTL one less (the packet was forwarded), checksum still right.
        assert_eq!(out[50..56], REMOTE_VTEP);
        assert_eq!(out[56..62], LOCAL_VTEP);
        let inner = &out[64..84];
        assert_eq!(inner[8], 63, "TTL decremented");
        assert_eq!(csum(inner), 0, "inner IPv4 checksum after the TTL change");
        assert_eq!(out[64..72], frame[14..22]);
        assert_eq!(out[76..], frame[26..], "addresses and payload untouched");
        assert_eq!(counter(&ebpf, Counter::TxDirect), 1);
        assert_eq!(counter(&ebpf, Counter::TxEncap), 1);
        assert_eq!(peer3(&ebpf).tx_packets, 1);
        // A second packet of the flow takes the cached next hop: the
        // neighbour's new MAC is not looked up again within the second.
        b.ns.sh("ip neigh replace 10.9.0.2 lladdr 02:00:00:00:00:99 dev ul0 nud permanent")
            .unwrap();
        let (rc, again) = run_skb(&mut ebpf, PROG_POD_EGRESS, &frame, b.bridge_ifindex, 0, 0);
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(again[0..18], out[0..18]);
        assert_eq!(again[22..24], out[22..24]);
        assert_eq!(again[26..], out[26..]);
        // The outer IP ID counts per peer from the first one.
        let id = |f: &[u8]| u16::from_be_bytes([f[18], f[19]]);
        assert_eq!(id(&again), id(&out).wrapping_add(1), "outer IP ID");
        assert_eq!(csum(&again[14..34]), 0, "outer IPv4 checksum, next ID");
    })
    .unwrap();
}

#[test]
fn direct_egress_leaves_to_the_stack_what_it_must() {
    if !prereq::ready("direct_egress_declines") {
        return;
    }
    let b = bench("ptr-dirdecl");
    b.ns.run(|| {
        let mut ebpf = load_direct(&b);
        set_route(&ebpf, [10, 244, 2, 0], 24, REMOTE_IP.octets());
        let good = pod_frame(&b, Ipv4Addr::new(10, 244, 2, 10));
        let service = pod_frame(&b, Ipv4Addr::new(10, 96, 0, 10));
        let mut foreign_src = good.clone();
        foreign_src[26..30].copy_from_slice(&[10, 244, 3, 5]);
        let foreign_src = patch_ip(&foreign_src, 0, 0x45);
        let mut multicast = good.clone();
        multicast[0] = 0x01;
        let mut big = pod_frame(&b, Ipv4Addr::new(10, 244, 2, 10));
        big.extend(std::iter::repeat_n(0u8, 1500));
        let len = (big.len() - 14) as u16;
        big[16..18].copy_from_slice(&len.to_be_bytes());
        let big = patch_ip(&big, 0, 0x45);
        let arp = eth(b.bridge_mac, POD_MAC, 0x0806, &[0u8; 28]);
        let from = |src: [u8; 4]| {
            let mut f = good.clone();
            f[26..30].copy_from_slice(&src);
            patch_ip(&f, 0, 0x45)
        };
        // An ICMP "port unreachable" quoting a flow conntrack may have NAT'd.
        let icmp_err = eth(
            b.bridge_mac,
            POD_MAC,
            0x0800,
            &ipv4(
                Ipv4Addr::new(10, 244, 1, 10),
                Ipv4Addr::new(10, 244, 2, 10),
                1,
                0,
                &[3, 3, 0, 0, 0, 0, 0, 0],
            ),
        );
        // (what, frame, counter it is counted in)
        let cases: Vec<(&str, Vec<u8>, Option<Counter>)> = vec![
            ("to a Service (kube-proxy NATs it)", service, None),
            ("ARP", arp, None),
            (
                "truncated (shorter than its IPv4 length)",
                good[..34].to_vec(),
                Some(Counter::TxDirectUnfit),
            ),
            ("multicast", multicast, None),
            (
                "TTL expiring",
                patch_ip(&good, 8, 1),
                Some(Counter::TxDirectUnfit),
            ),
            (
                "a first fragment",
                patch_ip(&good, 6, 0x20),
                Some(Counter::TxDirectUnfit),
            ),
            (
                "a later fragment",
                patch_ip(&good, 7, 0x10),
                Some(Counter::TxDirectUnfit),
            ),
            (
                "IP options",
                patch_ip(&good, 0, 0x46),
                Some(Counter::TxDirectUnfit),
            ),
            (
                "not from our pods",
                foreign_src,
                Some(Counter::TxDirectUnfit),
            ),
            (
                "from flannel.1's address",
                from([10, 244, 1, 0]),
                Some(Counter::TxDirectUnfit),
            ),
            (
                "from cni0's address",
                from([10, 244, 1, 1]),
                Some(Counter::TxDirectUnfit),
            ),
            ("an ICMP error", icmp_err, Some(Counter::TxDirectUnfit)),
            (
                "bigger than flannel.1's MTU",
                big,
                Some(Counter::TxDirectUnfit),
            ),
        ];
        let mut unfit = 0;
        for (what, frame, c) in &cases {
            assert_eq!(
                run_skb(&mut ebpf, PROG_POD_EGRESS, frame, b.bridge_ifindex, 0, 0),
                (TC_ACT_OK, frame.clone()),
                "{what}: unchanged to the stack"
            );
            if c.is_some() {
                unfit += 1;
            }
            assert_eq!(counter(&ebpf, Counter::TxDirectUnfit), unfit, "{what}");
        }
        assert_eq!(counter(&ebpf, Counter::TxDirect), 0);
        // A GSO packet whose segments would not fit flannel.1's MTU.
        assert_eq!(
            run_skb(&mut ebpf, PROG_POD_EGRESS, &good, b.bridge_ifindex, 0, 1448),
            (TC_ACT_OK, good.clone())
        );
        assert_eq!(counter(&ebpf, Counter::TxDirectUnfit), unfit + 1);
        // Marked by the agent's nftables rule: a NAT'd connection's packet
        // (a Service DNAT'd by br_netfilter before cni0's ingress).
        assert_eq!(
            run_skb(
                &mut ebpf,
                PROG_POD_EGRESS,
                &good,
                b.bridge_ifindex,
                NAT_MARK,
                0
            ),
            (TC_ACT_OK, good.clone())
        );
        assert_eq!(counter(&ebpf, Counter::TxDirectStackFlow), 1);
        // A flow the stack carried (seen at flannel.1's egress, e.g. after
        // kube-proxy's DNAT) stays on the stack.
        let key = FlowKey {
            local: [10, 244, 1, 10],
            remote: [10, 244, 2, 10],
            local_port: 12345u16.to_be_bytes(),
            remote_port: 53u16.to_be_bytes(),
            proto: 17,
            _pad: [0; 3],
        };
        assert!(!stack_flow(&ebpf, &key));
        let mut via_vtep = good.clone();
        via_vtep[0..6].copy_from_slice(&REMOTE_VTEP);
        via_vtep[6..12].copy_from_slice(&LOCAL_VTEP);
        assert_eq!(run_tc(&mut ebpf, &via_vtep).0, TC_ACT_REDIRECT);
        assert!(
            stack_flow(&ebpf, &key),
            "flannel.1's program notes the flow"
        );
        assert_eq!(
            run_skb(&mut ebpf, PROG_POD_EGRESS, &good, b.bridge_ifindex, 0, 0),
            (TC_ACT_OK, good.clone())
        );
        assert_eq!(counter(&ebpf, Counter::TxDirectStackFlow), 2);
        // Switched off, the program passes everything.
        let mut off = load(&b);
        set_route(&off, [10, 244, 2, 0], 24, REMOTE_IP.octets());
        let fresh = pod_frame(&b, Ipv4Addr::new(10, 244, 2, 11));
        assert_eq!(
            run_skb(&mut off, PROG_POD_EGRESS, &fresh, b.bridge_ifindex, 0, 0),
            (TC_ACT_OK, fresh.clone())
        );
        assert_eq!(counter(&off, Counter::TxDirect), 0);
    })
    .unwrap();
}

#[test]
fn direct_ingress_hands_a_pods_packet_to_the_bridge() {
    if !prereq::ready("direct_ingress") {
        return;
    }
    let b = bench("ptr-dirin");
    b.ns.run(|| {
        flannel_tests::progs::stay_on_this_cpu();
        let mut ebpf = load_direct(&b);
        let frame = Vx::default().frame();
        let (rc, out) = run_named(&mut ebpf, PROG_DECAP_TC, &frame);
        assert_eq!(rc, TC_ACT_REDIRECT, "to cni0");
        // Addressed as the host addresses its pods: the pod's MAC from
        // cni0's; TTL one less, checksum right, the rest untouched.
        let mut expect = eth(POD_MAC, b.bridge_mac, 0x0800, &inner_ip());
        expect = patch_ip(&expect, 8, 63);
        assert_eq!(out, expect);
        assert_eq!(counter(&ebpf, Counter::RxDirect), 1);
        assert_eq!(counter(&ebpf, Counter::RxDecap), 1);
        assert_eq!(peer3(&ebpf).rx_packets, 1);
        // The pod's delivery is cached (per CPU, in its POD_HOPS slot): a
        // second packet within the second is addressed without a lookup,
        // so the neighbour's new MAC is not seen yet.
        let hops = flannel_agent::ebpf::bpf_sys::lookup_per_cpu::<u32, PodHop>(
            map_fd(&ebpf, "POD_HOPS"),
            &(u32::from_be_bytes([10, 244, 1, 10]) & (POD_HOP_SLOTS - 1)),
        )
        .unwrap()
        .unwrap();
        assert!(
            hops.iter()
                .any(|h| h.pod_ip == [10, 244, 1, 10] && h.dmac == POD_MAC),
            "{hops:?}"
        );
        b.ns.sh("ip neigh replace 10.244.1.10 lladdr 0a:58:0a:f4:01:99 dev cni0 nud permanent")
            .unwrap();
        let (rc, again) = run_named(&mut ebpf, PROG_DECAP_TC, &frame);
        assert_eq!((rc, again), (TC_ACT_REDIRECT, expect.clone()), "cached");
        // A bigger packet than the entry was checked for is looked up
        // again (the route's MTU), and so meets the new MAC.
        let big = Vx {
            inner_pad: 200,
            ..Vx::default()
        };
        let (rc, out) = run_named(&mut ebpf, PROG_DECAP_TC, &big.frame());
        assert_eq!(rc, TC_ACT_REDIRECT);
        assert_eq!(
            &out[..6],
            &[0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x99],
            "looked up again"
        );
        let hops = flannel_agent::ebpf::bpf_sys::lookup_per_cpu::<u32, PodHop>(
            map_fd(&ebpf, "POD_HOPS"),
            &(u32::from_be_bytes([10, 244, 1, 10]) & (POD_HOP_SLOTS - 1)),
        )
        .unwrap()
        .unwrap();
        assert!(
            hops.iter().any(|h| h.max_len == 20 + 8 + 200),
            "the entry widened to the bigger packet: {hops:?}"
        );
        b.ns.sh("ip neigh replace 10.244.1.10 lladdr 0a:58:0a:f4:01:0a dev cni0 nud permanent")
            .unwrap();
        // A pod the host has no neighbour for: the stack resolves it, and
        // the flow is the stack's from then on, both ways.
        let unknown = Vx {
            inner_src_ip: Ipv4Addr::new(10, 244, 2, 10),
            ..Vx::default()
        };
        let mut f = unknown.frame();
        // inner destination 10.244.1.77 (inner IPv4 header at 64), checksum fixed
        f[80..84].copy_from_slice(&[10, 244, 1, 77]);
        f[74..76].copy_from_slice(&[0, 0]);
        let c = csum(&f[64..84]);
        f[74..76].copy_from_slice(&c.to_be_bytes());
        let (rc, out) = run_named(&mut ebpf, PROG_DECAP_TC, &f);
        assert_eq!((rc, out.len()), (TC_ACT_OK, f.len() - 50));
        assert_eq!(counter(&ebpf, Counter::RxDirectUnfit), 1);
        let key = FlowKey {
            local: [10, 244, 1, 77],
            remote: [10, 244, 2, 10],
            proto: 1,
            ..FlowKey::default()
        };
        assert!(stack_flow(&ebpf, &key), "the declined flow is noted");
        // A flow the stack carries (the reply to a Service's DNAT'd
        // packet) enters the stack for conntrack to reverse the NAT.
        let key = FlowKey {
            local: [10, 244, 1, 10],
            remote: [10, 244, 2, 10],
            proto: 1,
            ..FlowKey::default()
        };
        flannel_agent::ebpf::bpf_sys::update(map_fd(&ebpf, "STACK_FLOWS"), &key, &1u64).unwrap();
        let (rc, out) = run_named(&mut ebpf, PROG_DECAP_TC, &frame);
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(
            out,
            eth(OUR_UNDERLAY_MAC, UNDERLAY_PEER_MAC, 0x0800, &inner_ip())
        );
        assert_eq!(counter(&ebpf, Counter::RxDirectStackFlow), 1);
        // A GSO aggregate goes to the kernel's VXLAN device: its flow is
        // the stack's from then on, both ways.
        let agg = Vx {
            inner_src_ip: Ipv4Addr::new(10, 244, 2, 11),
            ..Vx::default()
        }
        .frame();
        assert_eq!(
            run_decap_gso(&mut ebpf, Hook::Tc, &agg, 1398),
            (Pass, agg.clone())
        );
        let key = FlowKey {
            local: [10, 244, 1, 10],
            remote: [10, 244, 2, 11],
            proto: 1,
            ..FlowKey::default()
        };
        assert!(stack_flow(&ebpf, &key), "the aggregate's flow is noted");
        // For the host itself (its overlay address): the stack, not the bridge.
        let mut host = frame.clone();
        host[80..84].copy_from_slice(&[10, 244, 1, 1]);
        host[74..76].copy_from_slice(&[0, 0]);
        let c = csum(&host[64..84]);
        host[74..76].copy_from_slice(&c.to_be_bytes());
        assert_eq!(run_named(&mut ebpf, PROG_DECAP_TC, &host).0, TC_ACT_OK);
        assert_eq!(counter(&ebpf, Counter::RxDirect), 3);
        // The pod's bridge port known (POD_PORTS, the agent's): handed to
        // that veth's peer, addressed the same; only while the host's
        // neighbour for the pod is the MAC recorded there. (A flow not
        // yet the stack's: from 10.244.2.12.)
        let fresh = Vx {
            inner_src_ip: Ipv4Addr::new(10, 244, 2, 12),
            ..Vx::default()
        }
        .frame();
        let port = |mac: [u8; 6]| flannel_ebpf_common::PodPort {
            ifindex: b.underlay_ifindex,
            mac,
            _pad: [0; 2],
        };
        let set_port = |ebpf: &aya::Ebpf, mac: [u8; 6]| {
            let ports = map_fd(ebpf, "POD_PORTS");
            let key = flannel_ebpf_common::pod_port_key([10, 244, 1, 10]);
            flannel_agent::ebpf::bpf_sys::update(ports, &key, &port(mac)).unwrap();
        };
        set_port(&ebpf, [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x77]);
        let (rc, bridged) = run_named(&mut ebpf, PROG_DECAP_TC, &fresh);
        assert_eq!(rc, TC_ACT_REDIRECT, "to cni0");
        assert_eq!(
            counter(&ebpf, Counter::RxDirectPeer),
            0,
            "another pod's MAC: not its port"
        );
        // The MAC the delivery addressed (this CPU's cached neighbour).
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&bridged[..6]);
        set_port(&ebpf, mac);
        let (rc, out) = run_named(&mut ebpf, PROG_DECAP_TC, &fresh);
        assert_eq!((rc, out), (TC_ACT_REDIRECT, bridged), "to the peer");
        assert_eq!(counter(&ebpf, Counter::RxDirectPeer), 1);
        assert_eq!(counter(&ebpf, Counter::RxDirect), 5);
    })
    .unwrap();
}
