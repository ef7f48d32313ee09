//! Encapsulation, shared by the flannel.1 program and the direct path: the
//! underlay next hop (cached per peer), the outer headers Flannel puts on the
//! wire, the room for them, and the redirect to the underlay.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup,
    },
    helpers::generated::{
        bpf_get_hash_recalc, bpf_redirect, bpf_redirect_neigh, bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use flannel_ebpf_common::{Counter, NodeConfig, VXLAN_OVERHEAD};

use crate::{
    csum,
    maps::{count, next_hop_slot, now_ns, peer as peer_stats},
    next_hop::{self, Hop},
    packet::{
        ETH_LEN, ETH_P_IPV4, EthHdr, IPPROTO_UDP, IPV4_LEN, IPV4_VER_IHL, Ipv4Hdr, UdpHdr,
        VXLAN_FLAG_I, VxlanFrame, VxlanHdr,
    },
};

const AF_INET: u8 = 2;
/// Outer headers plus the inner Ethernet header, all written in one store.
const HDR_LEN: usize = size_of::<VxlanFrame>();
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner MAC header length, for GSO.
const ENCAP_L2_ETH_LEN: u64 = (ETH_LEN as u64 & 0xff) << 56;
const ADJ_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ENCAP_L2_ETH_LEN;

/// The remote end of a tunnel: what one ROUTE (or FDB) lookup gives.
pub struct Peer {
    pub vtep_mac: [u8; 6],
    pub node_ip: [u8; 4],
    pub slot: u32,
}

/// Encapsulate the IPv4 packet in `ctx` for `peer` and redirect it to the
/// underlay. `forwarded`: the packet skipped the stack's forwarding, so its
/// TTL is decremented here. Err: nothing was changed (the counter says why),
/// the packet can go on along its path.
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    cfg: &NodeConfig,
    peer: &Peer,
    inner: &Ipv4Hdr,
    forwarded: bool,
) -> Result<i32, Counter> {
    // Route the outer packet before touching the inner one, so a failure
    // leaves the packet as the kernel path expects it.
    let hop = match next_hop(ctx, cfg, peer) {
        Ok(hop) => hop,
        Err(reason) => {
            if let Some(p) = peer_stats(peer.slot) {
                p.tx_fallbacks += 1;
            }
            return Err(reason);
        }
    };
    let inner_len = ctx.len();
    let src_port = flow_src_port(flow_hash(ctx), cfg.src_port_min, cfg.src_port_max);
    if ctx
        .adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ADJ_FLAGS)
        .is_err()
    {
        return Err(Counter::TxFallbackAdjust);
    }
    let hdr = headers(
        cfg,
        &hop,
        peer,
        inner.tos,
        src_port,
        inner_len + VXLAN_OVERHEAD,
    );
    let stored = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb,
            0,
            hdr.as_bytes().as_ptr() as *const _,
            HDR_LEN as u32,
            0,
        )
    };
    if stored != 0 || (forwarded && !decrement_ttl(ctx, HDR_LEN, inner)) {
        // The packet is already grown: it cannot go back to the kernel path.
        count(Counter::TxFallbackAdjust, inner_len);
        return Ok(TC_ACT_SHOT);
    }
    // A kube-proxy mark left on the outer packet sends it through NAT rules
    // meant for the inner flow (Flannel's 63-second bug).
    ctx.set_mark(0);
    count(Counter::TxEncap, inner_len);
    if let Some(p) = peer_stats(peer.slot) {
        p.tx_packets += 1;
        p.tx_bytes += inner_len as u64;
    }
    if hop.resolve {
        // No next hop given on purpose: the kernel then routes the outer
        // header and replaces the skb's dst. With an explicit next hop the
        // stale dst (the flannel.1 route) survives, and when ARP resolves the
        // queued packet is re-addressed with flannel.1's neighbour MACs.
        count(Counter::TxRedirectNeigh, inner_len);
        return Ok(unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) } as i32);
    }
    Ok(unsafe { bpf_redirect(hop.ifindex, 0) } as i32)
}

/// Decrement the TTL of the IPv4 header at `off` (a copy of it in `ip`),
/// as forwarding would, with its checksum.
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, off: usize, ip: &Ipv4Hdr) -> bool {
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    let new = u16::from_ne_bytes([ip.ttl.wrapping_sub(1), ip.proto]);
    ctx.store(off + 8, &ip.ttl.wrapping_sub(1), 0).is_ok()
        && ctx
            .l3_csum_replace(off + 10, old as u64, new as u64, 2)
            .is_ok()
}

/// The skb's flow hash, computed only when nobody has yet (a socket or the
/// receive path usually has).
#[inline(always)]
pub(crate) fn flow_hash(ctx: &TcContext) -> u32 {
    let hash = unsafe { (*ctx.skb.skb).hash };
    if hash != 0 {
        hash
    } else {
        unsafe { bpf_get_hash_recalc(ctx.skb.skb) }
    }
}

/// The underlay next hop toward `peer`, cached per CPU in its NEXT_HOPS slot.
#[inline(always)]
fn next_hop(ctx: &TcContext, cfg: &NodeConfig, peer: &Peer) -> Result<Hop, Counter> {
    let segs = unsafe { (*ctx.skb.skb).gso_segs }.max(1) as u16;
    let now = now_ns();
    let mut slot = next_hop_slot(peer.slot);
    if let Some(hop) = next_hop::fresh(&mut slot, &peer.node_ip, segs, now) {
        return Ok(hop);
    }
    let hop = fib_next_hop(ctx, cfg, peer.node_ip)?;
    Ok(next_hop::remember(slot, &peer.node_ip, segs, now, hop))
}

#[inline(always)]
fn fib_next_hop(ctx: &TcContext, cfg: &NodeConfig, node_ip: [u8; 4]) -> Result<Hop, Counter> {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = IPPROTO_UDP;
    p.dport = cfg.port.to_be();
    // tot_len 0: no MTU check; flannel.1's MTU already leaves room for the headers.
    p.ifindex = cfg.underlay_ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.public_ip);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(node_ip);
    next_hop::fib_lookup_outer(ctx, &mut p)
}

/// The kernel's udp_flow_src_port() arithmetic, so ECMP on the underlay
/// spreads flows as it does for flannel.1.
#[inline(always)]
pub(crate) fn flow_src_port(hash: u32, min: u16, max: u16) -> u16 {
    let hash = hash ^ (hash << 16);
    let span = max.saturating_sub(min) as u64;
    (((hash as u64 * span) >> 32) as u16).wrapping_add(min)
}

/// RFC 6040 normal mode, as the kernel's INET_ECN_encapsulate: copy ECT, and
/// turn CE into ECT(0). DSCP stays 0 as on flannel.1 (no `tos` configured).
#[inline(always)]
fn outer_tos(inner: u8) -> u8 {
    match inner & 0x3 {
        3 => 2,
        ecn => ecn,
    }
}

/// The headers flannel.1 would put in front of the inner IPv4 packet.
#[inline(always)]
fn headers(
    cfg: &NodeConfig,
    hop: &Hop,
    peer: &Peer,
    inner_tos: u8,
    src_port: u16,
    outer_len: u32,
) -> VxlanFrame {
    let ip_len = outer_len - ETH_LEN as u32;
    let tot_len = if ip_len > 0xffff {
        0xffff
    } else {
        ip_len as u16
    };
    let vni = cfg.vni.to_be_bytes();
    let mut f = VxlanFrame {
        eth: EthHdr {
            dst: hop.dmac,
            src: hop.smac,
            proto: ETH_P_IPV4.to_be_bytes(),
        },
        // DF clear, the next ID toward this peer, TTL 64 (flannel.1's "ttl auto").
        ip: Ipv4Hdr {
            ver_ihl: IPV4_VER_IHL,
            tos: outer_tos(inner_tos),
            tot_len: tot_len.to_be_bytes(),
            id: hop.ip_id.to_be_bytes(),
            frag_off: [0; 2],
            ttl: 64,
            proto: IPPROTO_UDP,
            check: [0; 2],
            saddr: cfg.public_ip,
            daddr: peer.node_ip,
        },
        // Checksum 0: legal on IPv4, and what flannel.1 sends.
        udp: UdpHdr {
            sport: src_port.to_be_bytes(),
            dport: cfg.port.to_be_bytes(),
            len: tot_len.saturating_sub(IPV4_LEN as u16).to_be_bytes(),
            check: [0; 2],
        },
        vx: VxlanHdr {
            flags: VXLAN_FLAG_I,
            reserved1: [0; 3],
            vni: [vni[1], vni[2], vni[3]],
            reserved2: 0,
        },
        // Inner Ethernet, as the kernel builds it on flannel.1.
        inner: EthHdr {
            dst: peer.vtep_mac,
            src: cfg.vtep_mac,
            proto: ETH_P_IPV4.to_be_bytes(),
        },
    };
    f.ip.check = csum::ipv4_header(f.ip.as_bytes()).to_be_bytes();
    f
}
