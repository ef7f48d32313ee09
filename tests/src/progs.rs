//! The kernel programs loaded for BPF_PROG_TEST_RUN, with the maps of one
//! node that has one member: the fixture both in-kernel test files share.
use std::{net::Ipv4Addr, os::fd::BorrowedFd};

use aya::{
    Ebpf,
    programs::{SchedClassifier, Xdp},
};
use flannel_agent::ebpf::bpf_sys::{fd_of, lookup_per_cpu, update};
use flannel_ebpf_common::{
    Counter, CounterValue, FdbKey, FdbValue, NODE_DIRECT_PATH, NodeConfig, PROG_DECAP,
    PROG_DECAP_TC, PROG_ENCAP, PROG_POD_EGRESS, RouteValue,
};

use crate::{
    frames::{csum, eth, ipv4},
    netns::Netns,
    object_path,
};

/// This node's VtepMAC, and the member's.
pub const LOCAL_VTEP: [u8; 6] = [0x02, 0x42, 0x8f, 0x11, 0x22, 0x10];
pub const REMOTE_VTEP: [u8; 6] = [0x02, 0x42, 0x8f, 0x11, 0x22, 0x20];
/// The member's underlay MAC (the resolved neighbour 10.9.0.2).
pub const UNDERLAY_PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
pub const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
/// The member's stats slot; its pods are 10.244.2.0/24, the Network 10.244.0.0/16.
pub const REMOTE_SLOT: u32 = 3;

/// A namespace with an underlay veth 10.9.0.1/24 and a resolved neighbour
/// 10.9.0.2, so the encap program's route lookup has something to find.
pub struct Bench {
    pub ns: Netns,
    pub underlay_ifindex: u32,
    pub underlay_mac: [u8; 6],
    /// The pod bridge cni0 (10.244.1.1/24) with the pod 10.244.1.10 at
    /// [`POD_MAC`] as a resolved neighbour: where the direct path delivers.
    pub bridge_ifindex: u32,
    pub bridge_mac: [u8; 6],
}

/// The local pod 10.244.1.10's MAC.
pub const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 0x01, 0x0a];

pub fn bench(name: &str) -> Bench {
    let ns = Netns::new(name).unwrap();
    // bpf_fib_lookup only answers for interfaces that forward, as on any Kubernetes node.
    ns.sh("sysctl -qw net.ipv4.ip_forward=1").unwrap();
    ns.sh("sysctl -qw net.ipv6.conf.all.forwarding=1").unwrap();
    ns.sh("ip link add ul0 type veth peer name ul1").unwrap();
    ns.sh("ip addr add 10.9.0.1/24 dev ul0").unwrap();
    ns.sh("ip link set ul0 up").unwrap();
    ns.sh("ip link set ul1 up").unwrap();
    ns.sh("ip neigh replace 10.9.0.2 lladdr 02:00:00:00:00:02 dev ul0 nud permanent")
        .unwrap();
    // The IPv6 underlay of the dual-stack tests: fc00::1/64, the member fc00::2 resolved.
    ns.sh("ip -6 addr add fc00::1/64 dev ul0 nodad").unwrap();
    ns.sh("ip -6 neigh replace fc00::2 lladdr 02:00:00:00:00:02 dev ul0 nud permanent")
        .unwrap();
    ns.sh("ip link add cni0 type bridge").unwrap();
    ns.sh("ip addr add 10.244.1.1/24 dev cni0").unwrap();
    ns.sh("ip link set cni0 up").unwrap();
    ns.sh("ip neigh replace 10.244.1.10 lladdr 0a:58:0a:f4:01:0a dev cni0 nud permanent")
        .unwrap();
    let idx = ns.sh("cat /sys/class/net/ul0/ifindex").unwrap();
    let mac = ns.sh("cat /sys/class/net/ul0/address").unwrap();
    let bidx = ns.sh("cat /sys/class/net/cni0/ifindex").unwrap();
    let bmac = ns.sh("cat /sys/class/net/cni0/address").unwrap();
    Bench {
        ns,
        underlay_ifindex: idx.trim().parse().unwrap(),
        underlay_mac: crate::frames::mac(&mac),
        bridge_ifindex: bidx.trim().parse().unwrap(),
        bridge_mac: crate::frames::mac(&bmac),
    }
}

/// Keep the calling thread on the CPU it runs on: BPF_PROG_TEST_RUN runs a
/// program on the caller's CPU, and what a test reads back from a per-CPU
/// cache must have been written on that same CPU.
pub fn stay_on_this_cpu() {
    // SAFETY: plain syscalls on this thread's own affinity mask.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

pub fn map_fd<'a>(ebpf: &'a Ebpf, name: &str) -> BorrowedFd<'a> {
    fd_of(ebpf.map(name).unwrap()).unwrap()
}

/// The member's FDB entry (slot 3, pods 10.244.2.0/24) pointing at `node_ip`.
pub fn set_fdb(ebpf: &Ebpf, node_ip: [u8; 4]) {
    let v = FdbValue {
        node_ip,
        peer_slot: REMOTE_SLOT,
        subnet: [10, 244, 2, 0],
        subnet_mask: [255, 255, 255, 0],
    };
    update(map_fd(ebpf, "FDB"), &FdbKey::new(REMOTE_VTEP), &v).unwrap();
}

/// A ROUTE entry `subnet/len` → the member (its VtepMAC, `node_ip`, slot 3),
/// as the agent writes it for the one-route kernel side.
pub fn set_route(ebpf: &Ebpf, subnet: [u8; 4], len: u32, node_ip: [u8; 4]) {
    let key = flannel_agent::ebpf::tables::RouteKey {
        prefix_len: len,
        addr: subnet,
    };
    let v = RouteValue {
        vtep_addr: subnet,
        vtep_mac: REMOTE_VTEP,
        _pad: [0; 2],
        node_ip,
        peer_slot: REMOTE_SLOT,
    };
    update(map_fd(ebpf, "ROUTE"), &key, &v).unwrap();
}

/// The object with this node's config and the member, every program loaded.
pub fn load(b: &Bench) -> Ebpf {
    load_with(b, false)
}

/// As [`load`], with the direct path on (its program on cni0).
pub fn load_direct(b: &Bench) -> Ebpf {
    load_with(b, true)
}

fn load_with(b: &Bench, direct: bool) -> Ebpf {
    let mut ebpf = Ebpf::load_file(object_path()).expect("loading the object");
    let cfg = NodeConfig {
        public_ip: PUBLIC_IP.octets(),
        vni: 1,
        port: 8472,
        src_port_min: 32768,
        src_port_max: 61000,
        vtep_mac: LOCAL_VTEP,
        underlay_ifindex: b.underlay_ifindex,
        vtep_ifindex: 1,
        ready: 1,
        network: [10, 244, 0, 0],
        network_mask: [255, 255, 0, 0],
        flags: if direct { NODE_DIRECT_PATH } else { 0 },
        subnet: [10, 244, 1, 0],
        subnet_mask: [255, 255, 255, 0],
        bridge_ifindex: if direct { b.bridge_ifindex } else { 0 },
        vtep_mtu: 1450,
    };
    update(map_fd(&ebpf, "CONFIG"), &0u32, &cfg).unwrap();
    set_fdb(&ebpf, REMOTE_IP.octets());
    let p: &mut SchedClassifier = ebpf.program_mut(PROG_ENCAP).unwrap().try_into().unwrap();
    p.load().unwrap();
    let p: &mut Xdp = ebpf.program_mut(PROG_DECAP).unwrap().try_into().unwrap();
    p.load().unwrap();
    let p: &mut SchedClassifier = ebpf.program_mut(PROG_DECAP_TC).unwrap().try_into().unwrap();
    p.load().unwrap();
    let p: &mut SchedClassifier = ebpf
        .program_mut(PROG_POD_EGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    p.load().unwrap();
    let p: &mut SchedClassifier = ebpf
        .program_mut(flannel_ebpf_common::PROG_ENCAP6)
        .unwrap()
        .try_into()
        .unwrap();
    p.load().unwrap();
    ebpf
}

/// A datapath counter's packets, summed over CPUs.
pub fn counter(ebpf: &Ebpf, c: Counter) -> u64 {
    lookup_per_cpu::<u32, CounterValue>(map_fd(ebpf, "COUNTERS"), &(c as u32))
        .unwrap()
        .unwrap()
        .iter()
        .map(|v| v.packets)
        .sum()
}

// The frames both the in-kernel tests and the benchmark's per-packet
// figures run: one fixture.

/// A VXLAN frame as a Flannel peer sends it to us.
pub struct Vx {
    pub src_ip: Ipv4Addr,
    pub ihl_options: Vec<u8>,
    pub frag: [u8; 2],
    pub dport: u16,
    pub flags: [u8; 4],
    pub vni: u32,
    pub inner_dst: [u8; 6],
    pub inner_src: [u8; 6],
    pub inner_proto: u16,
    pub inner_src_ip: Ipv4Addr,
    /// An 802.1Q tag (TCI) in front of the outer IPv4 header.
    pub vlan: Option<u16>,
    /// Zero bytes added to the inner ICMP echo (its checksum stays right).
    pub inner_pad: usize,
}

impl Default for Vx {
    fn default() -> Self {
        Vx {
            src_ip: REMOTE_IP,
            ihl_options: Vec::new(),
            frag: [0x00, 0x00],
            dport: 8472,
            flags: [0x08, 0, 0, 0],
            vni: 1,
            inner_dst: LOCAL_VTEP,
            inner_src: REMOTE_VTEP,
            inner_proto: 0x0800,
            inner_src_ip: Ipv4Addr::new(10, 244, 2, 10),
            vlan: None,
            inner_pad: 0,
        }
    }
}

pub const OUR_UNDERLAY_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];

pub fn inner_ip() -> Vec<u8> {
    inner_ip_from(Ipv4Addr::new(10, 244, 2, 10))
}

/// An ICMP echo to our pod 10.244.1.10 from `src`.
pub fn inner_ip_from(src: Ipv4Addr) -> Vec<u8> {
    inner_ip_padded(src, 0)
}

/// The same echo with `pad` zero bytes of data.
pub fn inner_ip_padded(src: Ipv4Addr, pad: usize) -> Vec<u8> {
    let mut icmp = vec![8u8, 0, 0xf7, 0xff, 0, 0, 0, 0];
    icmp.resize(8 + pad, 0);
    ipv4(src, Ipv4Addr::new(10, 244, 1, 10), 1, 0, &icmp)
}

impl Vx {
    pub fn frame(&self) -> Vec<u8> {
        let inner = eth(
            self.inner_dst,
            self.inner_src,
            self.inner_proto,
            &inner_ip_padded(self.inner_src_ip, self.inner_pad),
        );
        let mut vxlan = self.flags.to_vec();
        vxlan.extend_from_slice(&(self.vni << 8).to_be_bytes());
        vxlan.extend_from_slice(&inner);
        let mut udp = vec![0xc3, 0x50];
        udp.extend_from_slice(&self.dport.to_be_bytes());
        udp.extend_from_slice(&((8 + vxlan.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&vxlan);
        let mut ip = ipv4(self.src_ip, PUBLIC_IP, 17, 0, &udp);
        if !self.ihl_options.is_empty() {
            let words = self.ihl_options.len() / 4;
            ip[0] = 0x45 + words as u8;
            let tot = (ip.len() + self.ihl_options.len()) as u16;
            ip[2..4].copy_from_slice(&tot.to_be_bytes());
            ip.splice(20..20, self.ihl_options.iter().copied());
        }
        ip[6..8].copy_from_slice(&self.frag);
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = csum(&ip[..20 + self.ihl_options.len()]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        match self.vlan {
            None => eth(OUR_UNDERLAY_MAC, UNDERLAY_PEER_MAC, 0x0800, &ip),
            Some(tci) => {
                let mut tagged = tci.to_be_bytes().to_vec();
                tagged.extend_from_slice(&[0x08, 0x00]);
                tagged.extend_from_slice(&ip);
                eth(OUR_UNDERLAY_MAC, UNDERLAY_PEER_MAC, 0x8100, &tagged)
            }
        }
    }
}

// Dual-stack: the member's IPv6 half and VXLAN over IPv6 as it sends it.

pub const PUBLIC_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 1);
pub const REMOTE_IP6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 2);
/// flannel-v6's MAC here, and the member's.
pub const LOCAL_VTEP6: [u8; 6] = [0x02, 0x42, 0x8f, 0x66, 0x22, 0x10];
pub const REMOTE_VTEP6: [u8; 6] = [0x02, 0x42, 0x8f, 0x66, 0x22, 0x20];

/// CONFIG6 (IPv6Network fd00:10:244::/56, ours fd00:10:244:1::/64,
/// flannel-v6 MTU 1430) and the member's FDB6 and ROUTE6 entries (pods
/// fd00:10:244:2::/64, slot 3).
pub fn set_v6(ebpf: &Ebpf) {
    use flannel_ebpf_common::{Fdb6Value, NodeConfig6, Route6Key, Route6Value};
    let net: std::net::Ipv6Addr = "fd00:10:244::".parse().unwrap();
    let ours: std::net::Ipv6Addr = "fd00:10:244:1::".parse().unwrap();
    let cfg = NodeConfig6 {
        ready: 1,
        public_ip6: PUBLIC_IP6.octets(),
        network6: net.octets(),
        vtep_mac6: LOCAL_VTEP6,
        network6_len: 56,
        subnet6_len: 64,
        subnet6: ours.octets(),
        vtep6_mtu: 1430,
    };
    update(map_fd(ebpf, "CONFIG6"), &0u32, &cfg).unwrap();
    let sub: std::net::Ipv6Addr = "fd00:10:244:2::".parse().unwrap();
    let v = Fdb6Value {
        node_ip6: REMOTE_IP6.octets(),
        subnet6: sub.octets(),
        subnet6_len: 64,
        _pad: [0; 3],
        peer_slot: REMOTE_SLOT,
    };
    update(map_fd(ebpf, "FDB6"), &FdbKey::new(REMOTE_VTEP6), &v).unwrap();
    let r = Route6Value {
        node_ip6: REMOTE_IP6.octets(),
        vtep_mac6: REMOTE_VTEP6,
        _pad: [0; 2],
        peer_slot: REMOTE_SLOT,
    };
    let key = Route6Key {
        subnet6: sub.octets(),
    };
    update(map_fd(ebpf, "ROUTE6"), &key, &r).unwrap();
}

/// Run the TC program `name` on `frame` with the skb's mark and GSO size set.
/// The frame arrives on interface `ifindex` (cni0 for the direct path's
/// program: a frame to its MAC is then the host's, `PACKET_HOST`).
pub fn run_skb(
    ebpf: &mut Ebpf,
    name: &str,
    frame: &[u8],
    ifindex: u32,
    mark: u32,
    gso_size: u32,
) -> (u32, Vec<u8>) {
    use aya::programs::{TestRun, TestRunOptions};
    let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    // struct __sk_buff (192 bytes): mark at 8, ifindex at 40, gso_segs at
    // 164, gso_size at 176.
    let mut skb = [0u8; 192];
    skb[8..12].copy_from_slice(&mark.to_ne_bytes());
    skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    skb[164..168].copy_from_slice(&(gso_size.min(1) * 2).to_ne_bytes());
    skb[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&skb[..]),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| panic!("test_run {name}: {e}"));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// VXLAN over IPv6 as a dual-stack member sends it to us: an ICMPv6 echo
/// from its pod to ours (fd00:10:244:1::10) inside.
pub struct Vx6 {
    pub src_ip: std::net::Ipv6Addr,
    pub dst_ip: std::net::Ipv6Addr,
    /// The outer header's Next Header (17: UDP; an extension header to test those).
    pub next_header: u8,
    pub dport: u16,
    pub flags: [u8; 4],
    pub vni: u32,
    pub inner_dst: [u8; 6],
    pub inner_src: [u8; 6],
    pub inner_proto: u16,
    pub inner_src_ip: std::net::Ipv6Addr,
    /// The inner packet's Next Header (58: ICMPv6) and destination.
    pub inner_next: u8,
    pub inner_dst_ip: std::net::Ipv6Addr,
}

impl Default for Vx6 {
    fn default() -> Self {
        Vx6 {
            src_ip: REMOTE_IP6,
            dst_ip: PUBLIC_IP6,
            next_header: 17,
            dport: 8472,
            flags: [0x08, 0, 0, 0],
            vni: 1,
            inner_dst: LOCAL_VTEP6,
            inner_src: REMOTE_VTEP6,
            inner_proto: 0x86dd,
            inner_src_ip: "fd00:10:244:2::10".parse().unwrap(),
            inner_next: 58,
            inner_dst_ip: "fd00:10:244:1::10".parse().unwrap(),
        }
    }
}

fn ipv6(src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

impl Vx6 {
    pub fn frame(&self) -> Vec<u8> {
        let echo = [128u8, 0, 0, 0, 0, 1, 0, 1, b'p', b'i', b'n', b'g'];
        let inner_ip = ipv6(self.inner_src_ip, self.inner_dst_ip, self.inner_next, &echo);
        let inner = eth(self.inner_dst, self.inner_src, self.inner_proto, &inner_ip);
        let mut vxlan = self.flags.to_vec();
        vxlan.extend_from_slice(&(self.vni << 8).to_be_bytes());
        vxlan.extend_from_slice(&inner);
        let mut udp = vec![0xc3, 0x50];
        udp.extend_from_slice(&self.dport.to_be_bytes());
        udp.extend_from_slice(&((8 + vxlan.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0x12, 0x34]);
        udp.extend_from_slice(&vxlan);
        let ip = if self.next_header == 17 {
            ipv6(self.src_ip, self.dst_ip, 17, &udp)
        } else {
            // An extension header of 8 bytes (next: UDP) in front of the datagram.
            let mut ext = vec![17u8, 0, 0, 0, 0, 0, 0, 0];
            ext.extend_from_slice(&udp);
            ipv6(self.src_ip, self.dst_ip, self.next_header, &ext)
        };
        eth(OUR_UNDERLAY_MAC, UNDERLAY_PEER_MAC, 0x86dd, &ip)
    }
}
