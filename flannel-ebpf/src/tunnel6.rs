//! Encapsulation over IPv6 (dual-stack, flannel-v6): the outer headers the
//! kernel's vxlan6 would put on the wire, with the outer UDP checksum IPv6
//! requires (stock receivers drop zero-checksum VXLAN over IPv6). It is
//! derived from headers alone, as the kernel's local checksum offload does:
//! an inner TCP, UDP or ICMPv6 segment whose checksum is right (or will be,
//! when the device fills a pending one) sums to the complement of its
//! pseudo-header, so the payload is never read. Headers are read and written
//! in place: copies would not fit the 512-byte BPF stack.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    helpers::generated::{bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use flannel_ebpf_common::{Counter, NodeConfig, NodeConfig6, VXLAN6_OVERHEAD};

use crate::{
    csum::{fold, pseudo6, sum16},
    maps::{count, next_hop6_slot, now_ns, peer as peer_stats},
    next_hop::{self, Hop},
    packet::{
        ETH_LEN, ETH_P_IPV6, EthHdr, IPPROTO_UDP, Ipv6Hdr, VXLAN_FLAG_I, Vxlan6Frame, ptr_at,
    },
    tunnel::{flow_hash, flow_src_port},
};

const AF_INET6: u8 = 10;
const ENCAP_L2_ETH_LEN: u64 = (ETH_LEN as u64 & 0xff) << 56;
const ADJ_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ENCAP_L2_ETH_LEN;

/// The inner Ethernet and IPv6 headers, as they sit at the packet's start.
#[repr(C)]
pub struct Inner6 {
    pub eth: EthHdr,
    pub ip6: Ipv6Hdr,
}

/// What encapsulation needs of the inner packet, taken before the packet
/// changes: its Ethernet header, its ECN bits, the sum its headers and its
/// (checksummed) segment add to the outer UDP checksum.
#[derive(Default)]
pub struct Taken {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ecn: u8,
    pub sum: u32,
}

#[inline(always)]
fn w(b: [u8; 2]) -> u32 {
    u16::from_be_bytes(b) as u32
}

/// Take from the inner headers what the outer ones need (see [`Taken`]).
#[inline(always)]
pub fn take(inner: &Inner6) -> Taken {
    let (e, ip6) = (&inner.eth, &inner.ip6);
    let tc = (ip6.ver_tc_flow[0] << 4) | (ip6.ver_tc_flow[1] >> 4);
    // RFC 6040 normal mode, as vxlan6: copy ECT, CE becomes ECT(0).
    let ecn = match tc & 3 {
        3 => 2,
        x => x,
    };
    let headers = sum16(&e.dst)
        + sum16(&e.src)
        + w(e.proto)
        + sum16(&ip6.ver_tc_flow)
        + w(ip6.payload_len)
        + w([ip6.next_header, ip6.hop_limit])
        + sum16(&ip6.saddr)
        + sum16(&ip6.daddr);
    let pseudo = fold(pseudo6(
        &ip6.saddr,
        &ip6.daddr,
        w(ip6.payload_len),
        ip6.next_header,
    ));
    Taken {
        dst: e.dst,
        src: e.src,
        ecn,
        sum: headers + (!pseudo) as u32,
    }
}

/// Encapsulate the frame in `ctx` for the member at `node_ip6` (stats
/// `slot`) and redirect it to the underlay. Err: nothing was changed, the
/// kernel's device can send it.
#[inline(always)]
pub fn encapsulate6(
    ctx: &TcContext,
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    node_ip6: &[u8; 16],
    slot: u32,
    inner: &Taken,
) -> Result<i32, Counter> {
    let hop = match next_hop6(ctx, cfg, cfg6, node_ip6, slot) {
        Ok(h) => h,
        Err(reason) => {
            if let Some(p) = peer_stats(slot) {
                p.tx_fallbacks += 1;
            }
            return Err(reason);
        }
    };
    let inner_len = ctx.len();
    let hash = flow_hash(ctx);
    let sport = flow_src_port(hash, cfg.src_port_min, cfg.src_port_max);
    let udp_len = inner_len + 16;
    let vni = cfg.vni.to_be_bytes();
    if ctx
        .adjust_room(VXLAN6_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ADJ_FLAGS)
        .is_err()
    {
        return Err(Counter::TxFallbackAdjust);
    }
    let Some(f) = ptr_at::<Vxlan6Frame>(ctx.data(), ctx.data_end(), 0) else {
        // Already grown: it cannot go back to the kernel's device.
        count(Counter::TxFallbackAdjust, inner_len);
        return Ok(TC_ACT_SHOT);
    };
    // SAFETY: bounds checked by ptr_at; the header types are plain bytes (align 1).
    let f = unsafe { &mut *f };
    f.eth.dst = hop.dmac;
    f.eth.src = hop.smac;
    f.eth.proto = ETH_P_IPV6.to_be_bytes();
    let label = hash & 0xf_ffff;
    f.ip6.ver_tc_flow = [
        0x60,
        (inner.ecn << 4) | ((label >> 16) as u8 & 0x0f),
        (label >> 8) as u8,
        label as u8,
    ];
    f.ip6.payload_len = (udp_len as u16).to_be_bytes();
    f.ip6.next_header = IPPROTO_UDP;
    f.ip6.hop_limit = 64;
    f.ip6.saddr = cfg6.public_ip6;
    f.ip6.daddr = *node_ip6;
    f.udp.sport = sport.to_be_bytes();
    f.udp.dport = cfg.port.to_be_bytes();
    f.udp.len = (udp_len as u16).to_be_bytes();
    f.vx.flags = VXLAN_FLAG_I;
    f.vx.reserved1 = [0; 3];
    f.vx.vni = [vni[1], vni[2], vni[3]];
    f.vx.reserved2 = 0;
    f.inner.dst = inner.dst;
    f.inner.src = inner.src;
    f.inner.proto = ETH_P_IPV6.to_be_bytes();
    let sum = pseudo6(&cfg6.public_ip6, node_ip6, udp_len, IPPROTO_UDP)
        + sport as u32
        + cfg.port as u32
        + udp_len
        + ((VXLAN_FLAG_I as u32) << 8)
        + w([vni[1], vni[2]])
        + ((vni[3] as u32) << 8)
        + inner.sum;
    let c = match !fold(sum) {
        0 => 0xffff,
        c => c,
    };
    f.udp.check = c.to_be_bytes();
    ctx.set_mark(0);
    count(Counter::TxEncap, inner_len);
    if let Some(p) = peer_stats(slot) {
        p.tx_packets += 1;
        p.tx_bytes += inner_len as u64;
    }
    if hop.resolve {
        count(Counter::TxRedirectNeigh, inner_len);
        return Ok(unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as i32)
}

/// The underlay next hop toward `node_ip6`, cached per CPU in NEXT_HOPS6
/// by the peer's `slot`.
#[inline(always)]
fn next_hop6(
    ctx: &TcContext,
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    node_ip6: &[u8; 16],
    slot: u32,
) -> Result<Hop, Counter> {
    let now = now_ns();
    let mut entry = next_hop6_slot(slot);
    if let Some(hop) = next_hop::fresh(&mut entry, node_ip6, 1, now) {
        return Ok(hop);
    }
    let hop = fib_next_hop6(ctx, cfg, cfg6, node_ip6)?;
    Ok(next_hop::remember(entry, node_ip6, 1, now, hop))
}

#[inline(always)]
fn fib_next_hop6(
    ctx: &TcContext,
    cfg: &NodeConfig,
    cfg6: &NodeConfig6,
    node_ip6: &[u8; 16],
) -> Result<Hop, Counter> {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = IPPROTO_UDP;
    p.dport = cfg.port.to_be();
    p.ifindex = cfg.underlay_ifindex;
    p.__bindgen_anon_3.ipv6_src = words(&cfg6.public_ip6);
    p.__bindgen_anon_4.ipv6_dst = words(node_ip6);
    next_hop::fib_lookup_outer(ctx, &mut p)
}

/// An IPv6 address as bpf_fib_lookup's four words (network order kept).
#[inline(always)]
pub fn words(a: &[u8; 16]) -> [u32; 4] {
    let mut v = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        v[i] = u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]]);
        i += 1;
    }
    v
}
