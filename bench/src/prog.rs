//! Per-packet cost of the kernel programs with BPF_PROG_TEST_RUN: fresh
//! frames, one run per call, the kernel's own timing averaged over `n` calls
//! (a repeat count would run the program again on the frame it already
//! changed); a pass-through frame is unchanged, so it uses the repeat count.
use std::net::Ipv4Addr;

use anyhow::Context;
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use flannel_ebpf_common::{FdbKey, FdbValue, NodeConfig, PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP};
use flannel_tests::{
    frames::{eth, ipv4},
    netns::Netns,
    object_path,
};

const LOCAL_VTEP: [u8; 6] = [0x02, 0x42, 0x8f, 0x11, 0x22, 0x10];
const REMOTE_VTEP: [u8; 6] = [0x02, 0x42, 0x8f, 0x11, 0x22, 0x20];
const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);

fn tcp_segment(payload: usize) -> Vec<u8> {
    let mut tcp = vec![
        0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ];
    tcp.resize(20 + payload, 0xab);
    ipv4(
        Ipv4Addr::new(10, 244, 1, 10),
        Ipv4Addr::new(10, 244, 2, 10),
        6,
        0,
        &tcp,
    )
}

fn vxlan_frame(inner: &[u8]) -> Vec<u8> {
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend_from_slice(&eth(LOCAL_VTEP, REMOTE_VTEP, 0x0800, inner));
    let mut udp = vec![0xc3, 0x50, 0x21, 0x18];
    udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&vx);
    eth(
        [2, 0xaa, 0, 0, 0, 1],
        [2, 0, 0, 0, 0, 2],
        0x0800,
        &ipv4(REMOTE_IP, PUBLIC_IP, 17, 0, &udp),
    )
}

/// (case, ns per packet) for encap of a TCP segment, decap of a VXLAN frame,
/// and a non-VXLAN frame passing the XDP program.
/// Mean kernel-timed duration of `n` single runs of `prog` on a fresh copy of `frame`.
fn per_call_ns<P>(prog: &mut P, frame: &[u8], out: &mut [u8], n: u32) -> anyhow::Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut total = 0u128;
    for _ in 0..n {
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut *out),
            ..TestRunOptions::new()
        })?;
        total += r.duration.as_nanos();
    }
    Ok(total as f64 / n as f64)
}

pub fn costs(n: u32) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let ns = Netns::new("bench-prog")?;
    ns.sh("sysctl -qw net.ipv4.ip_forward=1")?;
    ns.sh("ip link add ul0 type veth peer name ul1")?;
    ns.sh("ip addr add 10.9.0.1/24 dev ul0")?;
    ns.sh("ip link set ul0 up")?;
    ns.sh("ip link set ul1 up")?;
    ns.sh("ip neigh replace 10.9.0.2 lladdr 02:00:00:00:00:02 dev ul0 nud permanent")?;
    let ifindex: u32 = ns.sh("cat /sys/class/net/ul0/ifindex")?.trim().parse()?;
    ns.run(|| -> anyhow::Result<Vec<(&'static str, f64)>> {
        let mut ebpf = Ebpf::load_file(object_path()).context("loading the object")?;
        let cfg = NodeConfig {
            public_ip: PUBLIC_IP.octets(),
            vni: 1,
            port: 8472,
            src_port_min: 32768,
            src_port_max: 61000,
            vtep_mac: LOCAL_VTEP,
            underlay_ifindex: ifindex,
            vtep_ifindex: 1,
            ready: 1,
            // The membership checks run as on a node (Network 10.244.0.0/16).
            network: [10, 244, 0, 0],
            network_mask: [255, 255, 0, 0],
            flags: 0,
        };
        let fd = |name: &str| {
            ebpf.map(name)
                .and_then(flannel_agent::bpf_sys::fd_of)
                .with_context(|| format!("the object's {name} map"))
        };
        flannel_agent::bpf_sys::update(fd("CONFIG")?, &0u32, &cfg)?;
        let fdb = FdbValue {
            node_ip: REMOTE_IP.octets(),
            peer_slot: 0,
            // The fixture's decap frame carries the segment from 10.244.1.10.
            subnet: [10, 244, 1, 0],
            subnet_mask: [255, 255, 255, 0],
        };
        flannel_agent::bpf_sys::update(fd("FDB")?, &FdbKey::new(REMOTE_VTEP), &fdb)?;
        let segment = tcp_segment(1400);
        let encap_in = eth(REMOTE_VTEP, LOCAL_VTEP, 0x0800, &segment);
        let decap_in = vxlan_frame(&segment);
        let other = eth([2, 0xaa, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], 0x0800, &segment);
        let mut out = vec![0u8; 4096];

        let p: &mut SchedClassifier = ebpf.program_mut(PROG_ENCAP).context("encap")?.try_into()?;
        p.load()?;
        let encap = per_call_ns(p, &encap_in, &mut out, n)?;

        let x: &mut Xdp = ebpf.program_mut(PROG_DECAP).context("decap")?.try_into()?;
        x.load()?;
        let decap = per_call_ns(x, &decap_in, &mut out, n)?;
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
        t.load()?;
        let tc_decap = per_call_ns(t, &decap_in, &mut out, n)?;
        Ok(vec![
            ("TC encap, 1400-byte TCP segment", encap),
            ("XDP decap, VXLAN frame", decap),
            ("XDP pass-through, non-VXLAN frame", pass),
            ("TC decap (veth underlays), VXLAN frame", tc_decap),
        ])
    })?
}
