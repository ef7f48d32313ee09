//! The outer IPv4 header our encapsulation puts on the wire, as a capture
//! on the underlay shows it.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    time::Duration,
};

use flannel_tests::{
    capture::{Captured, WireCapture},
    lab::{Kind, Lab, Topology},
    prereq,
};

const VXLAN_PORT: u16 = 8472;

/// (outer IPv4 ID, segments the packet becomes) of each VXLAN packet to
/// `to` carrying TCP; a GSO aggregate becomes one segment per `gso_size`
/// bytes of TCP payload.
fn outer_ids(frames: &[Captured], to: Ipv4Addr) -> Vec<(u16, u16)> {
    let be16 = |f: &[u8], at: usize| f.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    frames
        .iter()
        .filter_map(|c| {
            let f = &c.frame;
            if be16(f, 12)? != 0x0800 || *f.get(23)? != 17 || f.get(30..34)? != to.octets() {
                return None;
            }
            let ihl = (*f.get(14)? as usize & 0xf) * 4;
            if be16(f, 14 + ihl + 2)? != VXLAN_PORT {
                return None;
            }
            // Outer Ethernet, IPv4, UDP, VXLAN, then the inner Ethernet header.
            let inner = 14 + ihl + 8 + 8 + 14;
            let inner_ihl = (*f.get(inner)? as usize & 0xf) * 4;
            if *f.get(inner + 9)? != 6 {
                return None;
            }
            let tcp_len = (*f.get(inner + inner_ihl + 12)? as usize >> 4) * 4;
            let payload = (be16(f, inner + 2)? as usize).checked_sub(inner_ihl + tcp_len)?;
            let segs = match c.gso_size {
                0 => 1,
                g => payload.div_ceil(g as usize).max(1),
            };
            Some((be16(f, 18)?, segs as u16))
        })
        .collect()
}

/// Pin the calling thread to CPU 0: the IDs count per CPU, and a pod's
/// transmit, the veth hand-over and our encapsulation all run on the
/// sending thread's CPU.
fn on_cpu0() {
    // SAFETY: plain syscall on this thread's own affinity mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// Each GSO aggregate is cut into segments that take consecutive outer IDs
/// (as the kernel's own IP layer numbers them), so the next packet to the
/// same node must start after all of them: over a fragmenting underlay two
/// packets in flight with one ID would be reassembled from each other's
/// fragments.
#[test]
fn outer_ids_step_past_every_segment_of_an_aggregate() {
    if !prereq::ready("outer_ip_ids") {
        return;
    }
    const PORT: u16 = 5411;
    const LEN: usize = 8 << 20;
    let mut lab = Lab::new("oid", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    lab.wait_fdb_entries(1, 1).unwrap();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let (to, server_ip) = (b.public_ip, b.pod_ip());
    flannel_tests::traffic::wait_reachable(&a.pod, server_ip, Duration::from_secs(10)).unwrap();
    let encapsulated = lab.counter(0, "tx_encap");
    let capture = WireCapture::start_outgoing(&a.ns, "eth0", Duration::from_secs(30)).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let received = std::thread::scope(|s| {
        let server = s.spawn(|| {
            b.pod.run(|| -> anyhow::Result<usize> {
                let l = TcpListener::bind(("0.0.0.0", PORT))?;
                let _ = ready_tx.send(());
                let (mut c, _) = l.accept()?;
                c.set_read_timeout(Some(Duration::from_secs(20)))?;
                let mut got = Vec::new();
                c.read_to_end(&mut got)?;
                Ok(got.len())
            })
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        a.pod
            .run(|| -> anyhow::Result<()> {
                on_cpu0();
                let mut c =
                    TcpStream::connect_timeout(&(server_ip, PORT).into(), Duration::from_secs(5))?;
                c.write_all(&vec![0x5a; LEN])?;
                Ok(())
            })
            .unwrap()
            .unwrap();
        server.join().unwrap().unwrap().unwrap()
    });
    assert_eq!(received, LEN);
    let frames = capture.finish().unwrap();
    assert!(
        lab.counter(0, "tx_encap") > encapsulated,
        "our program did not encapsulate\n{}",
        lab.logs()
    );
    let ids = outer_ids(&frames, to);
    // Pairs whose first packet is an aggregate of several segments. The
    // next ID must lie past its last segment (further when the capture
    // missed packets in between), never inside its range.
    let pairs: Vec<_> = ids.windows(2).filter(|w| w[0].1 > 1).collect();
    let stepped = pairs
        .iter()
        .filter(|w| (w[0].1..0x8000).contains(&w[1].0.wrapping_sub(w[0].0)))
        .count();
    assert!(
        pairs.len() >= 20,
        "only {} GSO aggregates among {} VXLAN packets captured",
        pairs.len(),
        ids.len()
    );
    // A few may interleave with packets another CPU sent (a timer).
    assert!(
        stepped * 10 >= pairs.len() * 9,
        "{stepped} of {} aggregates were followed by an ID past their last segment; first: {:?}",
        pairs.len(),
        &ids[..ids.len().min(20)]
    );
}
