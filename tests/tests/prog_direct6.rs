//! The IPv6 direct path in the kernel with BPF_PROG_TEST_RUN: a pod's IPv6
//! packet at cni0 is encapsulated for the member holding its destination
//! (exact outer headers, checksum verified, the inner frame addressed as
//! flannel-v6 would), a decapsulated one is handed to cni0 for its pod, and
//! everything the stack must carry (NAT'd or stack flows, GSO, extension
//! headers, ICMPv6 errors, hop limit, MTU, sources not our pods, malformed
//! lengths) goes on unchanged and counted, its flow noted where the rule
//! says so.
use std::net::Ipv6Addr;

use aya::Ebpf;
use flannel_agent::ebpf::bpf_sys::{lookup, update};
use flannel_ebpf_common::{
    Counter, FlowKey6, NAT_MARK, PROG_DECAP_TC, PROG_ENCAP6, PROG_POD_EGRESS, Route6Key,
    Route6Value,
};
use flannel_tests::{
    frames::{csum, eth, ipv6_udp},
    prereq,
    progs::{
        Bench, LOCAL_VTEP6, POD_MAC, PUBLIC_IP6, REMOTE_IP6, REMOTE_VTEP6, UNDERLAY_PEER_MAC, Vx6,
        bench, counter, load_direct, map_fd, run_skb, set_v6,
    },
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// Our pod fd00:10:244:1::10 on cni0 (gateway ::1), resolved, as the CNI
/// bridge plugin and the pod's first packets leave it.
fn pod6(b: &Bench) {
    b.ns.sh("ip -6 addr add fd00:10:244:1::1/64 dev cni0 nodad")
        .unwrap();
    b.ns.sh(
        "ip -6 neigh replace fd00:10:244:1::10 lladdr 0a:58:0a:f4:01:0a dev cni0 nud permanent",
    )
    .unwrap();
}

/// Our pod's UDP packet `src`:4000 → `dst`:53 as it reaches cni0's ingress.
fn pod_frame6(b: &Bench, src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    eth(
        b.bridge_mac,
        POD_MAC,
        0x86dd,
        &ipv6_udp(ip6(src), ip6(dst), 4000, 53, payload),
    )
}

fn stack_flow6(ebpf: &Ebpf, key: &FlowKey6) -> bool {
    lookup::<FlowKey6, u64>(map_fd(ebpf, "STACK_FLOWS6"), key)
        .unwrap()
        .is_some()
}

fn udp_key(local: &str, remote: &str, lport: u16, rport: u16) -> FlowKey6 {
    FlowKey6 {
        local: ip6(local).octets(),
        remote: ip6(remote).octets(),
        local_port: lport.to_be_bytes(),
        remote_port: rport.to_be_bytes(),
        proto: 17,
        _pad: [0; 3],
    }
}

#[test]
fn ipv6_pod_traffic_takes_the_direct_path_and_the_rest_the_stack() {
    if !prereq::ready("direct6") {
        return;
    }
    let b = bench("fe-direct6");
    pod6(&b);
    b.ns.run(|| {
        flannel_tests::progs::stay_on_this_cpu();
        let mut ebpf = load_direct(&b);
        let good = pod_frame6(
            &b,
            "fd00:10:244:1::10",
            "fd00:10:244:2::10",
            b"direct over v6",
        );
        // Not a dual-stack node yet: the stack's, untouched.
        assert_eq!(
            run_skb(&mut ebpf, PROG_POD_EGRESS, &good, b.bridge_ifindex, 0, 0),
            (TC_ACT_OK, good.clone())
        );
        set_v6(&ebpf);

        // Out: encapsulated at cni0 and redirected to the underlay.
        let (rc, out) = run_skb(&mut ebpf, PROG_POD_EGRESS, &good, b.bridge_ifindex, 0, 0);
        let why: Vec<(&str, u64)> = Counter::ALL
            .iter()
            .map(|c| (c.name(), counter(&ebpf, *c)))
            .filter(|(_, n)| *n != 0)
            .collect();
        assert_eq!(rc, TC_ACT_REDIRECT, "counters {why:?}");
        assert_eq!(out.len(), good.len() + 70);
        assert_eq!(out[0..6], UNDERLAY_PEER_MAC);
        assert_eq!(out[6..12], b.underlay_mac);
        let ip = &out[14..54];
        assert_eq!((ip[6], ip[7]), (17, 64));
        assert_eq!(ip[8..24], PUBLIC_IP6.octets());
        assert_eq!(ip[24..40], REMOTE_IP6.octets());
        let udp = &out[54..];
        let udp_len = good.len() + 16;
        assert_eq!(udp[2..4], 8472u16.to_be_bytes());
        let mut pseudo = PUBLIC_IP6.octets().to_vec();
        pseudo.extend_from_slice(&REMOTE_IP6.octets());
        pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 17]);
        pseudo.extend_from_slice(udp);
        assert_eq!(
            csum(&pseudo),
            0,
            "outer UDP checksum over the rewritten inner frame"
        );
        assert_eq!(udp[8..16], [0x08, 0, 0, 0, 0, 0, 0x01, 0]);
        // The inner frame as flannel-v6 would send it: VtepMACs, hop limit
        // one less (forwarded), the rest as the pod sent it.
        let inner = &udp[16..];
        assert_eq!(inner[0..6], REMOTE_VTEP6);
        assert_eq!(inner[6..12], LOCAL_VTEP6);
        assert_eq!(inner[12..14], [0x86, 0xdd]);
        assert_eq!(inner[14 + 7], 63, "hop limit decremented");
        assert_eq!(inner[14..21], good[14..21]);
        assert_eq!(inner[22..], good[22..]);
        assert_eq!(counter(&ebpf, Counter::TxDirect6), 1);
        assert_eq!(counter(&ebpf, Counter::TxEncap), 1);

        // Left to the stack, unchanged and counted.
        let mut hop1 = good.clone();
        hop1[14 + 7] = 1;
        let mut ext = good.clone();
        ext[14 + 6] = 0; // a hop-by-hop header
        let mut short = good.clone();
        short[14 + 5] ^= 1; // a payload length that is not the frame's
        let mut icmp_err = good.clone();
        icmp_err[14 + 6] = 58;
        icmp_err[54] = 1; // destination unreachable
        let big = pod_frame6(&b, "fd00:10:244:1::10", "fd00:10:244:2::10", &[7u8; 1400]);
        let cases: Vec<(&str, Vec<u8>, u32, u32, Counter)> = vec![
            (
                "a NAT'd flow (kube-proxy's mark)",
                good.clone(),
                NAT_MARK,
                0,
                Counter::TxDirectStackFlow,
            ),
            (
                "a GSO aggregate",
                good.clone(),
                0,
                1400,
                Counter::TxDirectUnfit,
            ),
            ("hop limit 1", hop1, 0, 0, Counter::TxDirectUnfit),
            ("an extension header", ext, 0, 0, Counter::TxDirectUnfit),
            (
                "a wrong payload length",
                short,
                0,
                0,
                Counter::TxDirectUnfit,
            ),
            ("an ICMPv6 error", icmp_err, 0, 0, Counter::TxDirectUnfit),
            (
                "bigger than flannel-v6's MTU",
                big,
                0,
                0,
                Counter::TxDirectUnfit,
            ),
            (
                "from cni0's own address",
                pod_frame6(&b, "fd00:10:244:1::1", "fd00:10:244:2::10", b"x"),
                0,
                0,
                Counter::TxDirectUnfit,
            ),
            (
                "from flannel-v6's address",
                pod_frame6(&b, "fd00:10:244:1::", "fd00:10:244:2::10", b"x"),
                0,
                0,
                Counter::TxDirectUnfit,
            ),
            (
                "from another node's pod (spoofed)",
                pod_frame6(&b, "fd00:10:244:3::10", "fd00:10:244:2::10", b"x"),
                0,
                0,
                Counter::TxDirectUnfit,
            ),
        ];
        for (name, frame, mark, gso, c) in cases {
            let before = counter(&ebpf, c);
            assert_eq!(
                run_skb(
                    &mut ebpf,
                    PROG_POD_EGRESS,
                    &frame,
                    b.bridge_ifindex,
                    mark,
                    gso
                ),
                (TC_ACT_OK, frame.clone()),
                "{name}"
            );
            assert_eq!(counter(&ebpf, c), before + 1, "{name}: {}", c.name());
        }
        // Not to a remote pod subnet, or not addressed to the host: not
        // the direct path's at all.
        let outside = pod_frame6(&b, "fd00:10:244:1::10", "fd00:10:244:9::10", b"x");
        let mut multicast = good.clone();
        multicast[0] = 0x33;
        for (name, frame) in [("no ROUTE6 entry", outside), ("multicast", multicast)] {
            assert_eq!(
                run_skb(&mut ebpf, PROG_POD_EGRESS, &frame, b.bridge_ifindex, 0, 0),
                (TC_ACT_OK, frame.clone()),
                "{name}"
            );
        }
        assert_eq!(
            counter(&ebpf, Counter::TxDirect6),
            1,
            "nothing else went direct"
        );

        // A member the underlay has no route to: the encapsulation fails
        // after the inner frame was addressed for flannel-v6, and the pod's
        // own addressing is put back for the stack.
        let unrouted = Route6Value {
            node_ip6: ip6("2001:db8:dead::5").octets(),
            vtep_mac6: REMOTE_VTEP6,
            _pad: [0; 2],
            peer_slot: 5,
        };
        let sub5 = Route6Key {
            subnet6: ip6("fd00:10:244:5::").octets(),
        };
        update(map_fd(&ebpf, "ROUTE6"), &sub5, &unrouted).unwrap();
        let to5 = pod_frame6(&b, "fd00:10:244:1::10", "fd00:10:244:5::10", b"x");
        let before = counter(&ebpf, Counter::TxDirectUnfit);
        assert_eq!(
            run_skb(&mut ebpf, PROG_POD_EGRESS, &to5, b.bridge_ifindex, 0, 0),
            (TC_ACT_OK, to5.clone()),
            "an unroutable member: the frame as the pod sent it"
        );
        assert_eq!(counter(&ebpf, Counter::TxDirectUnfit), before + 1);
        assert_eq!(counter(&ebpf, Counter::TxDirect6), 1);

        // flannel-v6's egress notes every flow it sees as the stack's; the
        // direct path then leaves that flow to the stack.
        let (rc, _) = run_skb(
            &mut ebpf,
            PROG_ENCAP6,
            &{
                let mut f = good.clone();
                f[0..6].copy_from_slice(&REMOTE_VTEP6);
                f[6..12].copy_from_slice(&LOCAL_VTEP6);
                f
            },
            0,
            0,
            0,
        );
        assert_eq!(rc, TC_ACT_REDIRECT);
        let key = udp_key("fd00:10:244:1::10", "fd00:10:244:2::10", 4000, 53);
        assert!(stack_flow6(&ebpf, &key), "flannel-v6's flow noted");
        // A fragmented request (a big UDP Service query): its first
        // fragment is keyed by the UDP ports behind the fragment header,
        // so the replies find the flow; a later fragment by its protocol.
        let fragment = |offset_flags: u16, sport: u16| {
            let mut ip = ipv6_udp(
                ip6("fd00:10:244:1::10"),
                ip6("fd00:10:244:2::10"),
                sport,
                53,
                b"first fragment",
            );
            ip[6] = 44;
            let len = u16::from_be_bytes([ip[4], ip[5]]) + 8;
            ip[4..6].copy_from_slice(&len.to_be_bytes());
            let mut fh = vec![17, 0];
            fh.extend_from_slice(&offset_flags.to_be_bytes());
            fh.extend_from_slice(&[0, 0, 0, 9]);
            ip.splice(40..40, fh);
            eth(REMOTE_VTEP6, LOCAL_VTEP6, 0x86dd, &ip)
        };
        for (name, frame, key) in [
            (
                "first fragment",
                fragment(0x0001, 4100),
                udp_key("fd00:10:244:1::10", "fd00:10:244:2::10", 4100, 53),
            ),
            (
                "later fragment",
                fragment(0x05a9, 4200),
                udp_key("fd00:10:244:1::10", "fd00:10:244:2::10", 0, 0),
            ),
        ] {
            let (rc, _) = run_skb(&mut ebpf, PROG_ENCAP6, &frame, 0, 0, 0);
            // Behind an extension header: the kernel's vxlan6 device sends it.
            assert_eq!(rc, TC_ACT_OK, "{name}");
            assert!(stack_flow6(&ebpf, &key), "{name}: flow noted by UDP");
        }
        let before = counter(&ebpf, Counter::TxDirectStackFlow);
        assert_eq!(
            run_skb(&mut ebpf, PROG_POD_EGRESS, &good, b.bridge_ifindex, 0, 0),
            (TC_ACT_OK, good.clone())
        );
        assert_eq!(counter(&ebpf, Counter::TxDirectStackFlow), before + 1);

        // In: a member's packet for our pod goes to cni0, addressed as the
        // host addresses the pod, hop limit one less.
        let frame = Vx6::default().frame();
        let (rc, out) = run_skb(&mut ebpf, PROG_DECAP_TC, &frame, b.underlay_ifindex, 0, 0);
        assert_eq!(rc, TC_ACT_REDIRECT, "to cni0");
        let mut inner_ip = frame[14 + 56 + 14..].to_vec();
        inner_ip[7] -= 1;
        assert_eq!(out, eth(POD_MAC, b.bridge_mac, 0x86dd, &inner_ip));
        assert_eq!(counter(&ebpf, Counter::RxDirect6), 1);
        assert_eq!(counter(&ebpf, Counter::RxDecap), 1);

        // A pod the host has no neighbour for: the stack resolves it, and
        // the flow is the stack's from then on, both ways.
        let unknown = Vx6 {
            inner_dst_ip: ip6("fd00:10:244:1::77"),
            ..Vx6::default()
        }
        .frame();
        let (rc, out) = run_skb(&mut ebpf, PROG_DECAP_TC, &unknown, b.underlay_ifindex, 0, 0);
        assert_eq!((rc, out.len()), (TC_ACT_OK, unknown.len() - 70));
        assert_eq!(counter(&ebpf, Counter::RxDirectUnfit), 1);
        let icmp_key = |local: &str| FlowKey6 {
            local: ip6(local).octets(),
            remote: ip6("fd00:10:244:2::10").octets(),
            proto: 58,
            ..FlowKey6::default()
        };
        assert!(
            stack_flow6(&ebpf, &icmp_key("fd00:10:244:1::77")),
            "declined flow noted"
        );
        // A flow the stack carries: into the stack for conntrack.
        update(
            map_fd(&ebpf, "STACK_FLOWS6"),
            &icmp_key("fd00:10:244:1::10"),
            &1u64,
        )
        .unwrap();
        let (rc, out) = run_skb(&mut ebpf, PROG_DECAP_TC, &frame, b.underlay_ifindex, 0, 0);
        assert_eq!((rc, out.len()), (TC_ACT_OK, frame.len() - 70));
        assert_eq!(counter(&ebpf, Counter::RxDirectStackFlow), 1);
        assert_eq!(
            counter(&ebpf, Counter::RxDirect6),
            1,
            "nothing else delivered direct"
        );

        // A GSO aggregate flannel-v6 decapsulates: its flow is noted.
        let tcp = Vx6 {
            inner_next: 6,
            inner_dst_ip: ip6("fd00:10:244:1::10"),
            ..Vx6::default()
        }
        .frame();
        let (rc, _) = run_skb(&mut ebpf, PROG_DECAP_TC, &tcp, b.underlay_ifindex, 0, 1400);
        assert_eq!(rc, TC_ACT_OK);
        let mut tcp_key = icmp_key("fd00:10:244:1::10");
        tcp_key.proto = 6;
        // Ports: the "ping" fixture's first four bytes, seen as TCP's.
        tcp_key.remote_port = [128, 0];
        tcp_key.local_port = [0, 0];
        assert!(stack_flow6(&ebpf, &tcp_key), "the aggregate's flow noted");
    })
    .unwrap();
}
