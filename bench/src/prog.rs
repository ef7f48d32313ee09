//! Per-packet cost of the kernel programs with BPF_PROG_TEST_RUN: fresh
//! frames, one run per call, the kernel's own timing averaged over `n` calls
//! (a repeat count would run the program again on the frame it already
//! changed); a pass-through frame is unchanged, so it uses the repeat count.
use std::net::Ipv4Addr;

use anyhow::Context;
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use flannel_ebpf_common::{PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP, PROG_POD_EGRESS};
use flannel_tests::{
    frames::{eth, ipv4},
    progs::{self, LOCAL_VTEP, POD_MAC, PUBLIC_IP, REMOTE_IP, REMOTE_VTEP, UNDERLAY_PEER_MAC},
};

/// A TCP segment of `payload` bytes from `src` to `dst` (pods).
fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Vec<u8> {
    let mut tcp = vec![
        0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ];
    tcp.resize(20 + payload, 0xab);
    ipv4(src, dst, 6, 0, &tcp)
}

/// (case, ns per packet) for encap of a TCP segment, decap of a VXLAN frame,
/// and a non-VXLAN frame passing the XDP program.
/// Mean kernel-timed duration of `n` single runs of `prog` on a fresh copy of `frame`.
fn per_call_ns<P>(
    prog: &mut P,
    frame: &[u8],
    ctx: Option<&[u8]>,
    out: &mut [u8],
    n: u32,
) -> anyhow::Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut total = 0u128;
    for _ in 0..n {
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut *out),
            ctx_in: ctx,
            ..TestRunOptions::new()
        })?;
        total += r.duration.as_nanos();
    }
    Ok(total as f64 / n as f64)
}

/// One run of `prog` on `frame` must return `rc` and `len` bytes.
fn expect<P>(
    prog: &mut P,
    frame: &[u8],
    ctx: Option<&[u8]>,
    rc: u32,
    len: usize,
    what: &str,
) -> anyhow::Result<()>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 128];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: ctx,
        ..TestRunOptions::new()
    })?;
    anyhow::ensure!(
        (r.return_value, r.data_size_out as usize) == (rc, len),
        "{what}: the benchmark frame got ({}, {} bytes), not ({rc}, {len} bytes)",
        r.return_value,
        r.data_size_out
    );
    Ok(())
}

pub fn costs(n: u32) -> anyhow::Result<Vec<(&'static str, f64)>> {
    // The in-kernel tests' fixture: this node (10.244.1.0/24) and one
    // member (10.244.2.0/24), the membership checks on as on a node.
    let b = progs::bench("bench-prog");
    b.ns.run(|| -> anyhow::Result<Vec<(&'static str, f64)>> {
        let mut ebpf = progs::load(&b);
        let (ours, theirs) = (Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 2, 10));
        let encap_in = eth(
            REMOTE_VTEP,
            LOCAL_VTEP,
            0x0800,
            &tcp_segment(ours, theirs, 1400),
        );
        // The in-kernel tests' member frame (an ICMP echo to our pod), as the
        // member sends it.
        let decap_in = progs::Vx::default().frame();
        // Plain traffic from the member's node itself: not ours to judge.
        let other = eth(
            [2, 0xaa, 0, 0, 0, 1],
            UNDERLAY_PEER_MAC,
            0x0800,
            &tcp_segment(REMOTE_IP, PUBLIC_IP, 1400),
        );
        let mut out = vec![0u8; 4096];

        let p: &mut SchedClassifier = ebpf.program_mut(PROG_ENCAP).context("encap")?.try_into()?;
        // Each case must take the path it names (a frame the checks drop
        // would time the drop): encapsulated and redirected, decapsulated
        // (50 bytes shorter), passed unchanged.
        expect(p, &encap_in, None, 7, encap_in.len() + 50, "encap")?;
        let encap = per_call_ns(p, &encap_in, None, &mut out, n)?;

        let x: &mut Xdp = ebpf.program_mut(PROG_DECAP).context("decap")?.try_into()?;
        expect(x, &decap_in, None, 2, decap_in.len() - 50, "XDP decap")?;
        expect(x, &other, None, 2, other.len(), "XDP pass-through")?;
        let decap = per_call_ns(x, &decap_in, None, &mut out, n)?;
        let pass_run = x.test_run(TestRunOptions {
            data_in: Some(&other),
            data_out: Some(&mut out),
            repeat: n,
            ..TestRunOptions::new()
        })?;
        let pass = pass_run.duration.as_nanos() as f64;

        let t: &mut SchedClassifier = ebpf
            .program_mut(PROG_DECAP_TC)
            .context("TC decap")?
            .try_into()?;
        expect(t, &decap_in, None, 0, decap_in.len() - 50, "TC decap")?;
        let tc_decap = per_call_ns(t, &decap_in, None, &mut out, n)?;

        // The direct path: the pod's segment at cni0, and the member's frame
        // delivered to the pod behind cni0 (its neighbour resolved).
        let mut direct = progs::load_direct(&b);
        progs::set_route(&direct, [10, 244, 2, 0], 24, REMOTE_IP.octets());
        let pod_in = eth(
            b.bridge_mac,
            POD_MAC,
            0x0800,
            &tcp_segment(ours, theirs, 1400),
        );
        let e: &mut SchedClassifier = direct
            .program_mut(PROG_POD_EGRESS)
            .context("pod egress")?
            .try_into()?;
        // Arriving on cni0 (struct __sk_buff's ifindex at 40), so a frame to
        // its MAC is the host's, as at cni0's ingress.
        let mut skb = [0u8; 192];
        skb[40..44].copy_from_slice(&b.bridge_ifindex.to_ne_bytes());
        expect(e, &pod_in, Some(&skb), 7, pod_in.len() + 50, "direct encap")?;
        let direct_encap = per_call_ns(e, &pod_in, Some(&skb), &mut out, n)?;
        let d: &mut SchedClassifier = direct
            .program_mut(PROG_DECAP_TC)
            .context("TC decap")?
            .try_into()?;
        expect(
            d,
            &decap_in,
            None,
            7,
            decap_in.len() - 50,
            "direct delivery",
        )?;
        let direct_in = per_call_ns(d, &decap_in, None, &mut out, n)?;
        Ok(vec![
            ("TC encap (flannel.1), 1400-byte TCP segment", encap),
            ("XDP decap, VXLAN frame", decap),
            ("XDP pass-through, non-VXLAN frame", pass),
            ("TC decap (veth underlays), VXLAN frame", tc_decap),
            ("direct encap at cni0, 1400-byte TCP segment", direct_encap),
            ("TC decap + direct delivery to cni0, VXLAN frame", direct_in),
        ])
    })?
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_benchmark_frames_take_the_paths_they_time() {
        if !flannel_tests::prereq::ready("bench_prog") {
            return;
        }
        let c = super::costs(200).unwrap();
        assert_eq!(c.len(), 6);
        assert!(c.iter().all(|(_, ns)| *ns > 0.0), "{c:?}");
    }
}
