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
use flannel_ebpf_common::{Counter, PROG_DECAP, PROG_DECAP_TC};
use flannel_tests::{
    prereq,
    progs::{Vx6, bench, counter, load, set_v6},
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
                "a fragment header",
                Vx6 {
                    next_header: 44,
                    ..d()
                }
                .frame(),
                Pass,
                Some(Counter::RxPassIpv6ExtHeaders),
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
