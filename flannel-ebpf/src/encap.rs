//! Egress on flannel.1 (TCX): the kernel has routed the packet to flannel.1,
//! by the one route for the cluster Network or by stock Flannel's per-node
//! `via <subnet>.0 onlink` route. The remote VTEP comes from the ROUTE map by
//! the inner destination address (one lookup: VtepMAC, node IP, stats slot),
//! so the kernel needs no per-node route or neighbour; a destination in no
//! ROUTE entry falls back to the FDB by the inner destination MAC a kernel
//! neighbour put there. We push outer Ethernet/IPv4/UDP/VXLAN, with the inner
//! Ethernet header Flannel puts on the wire, and redirect to the underlay.
//! Anything we cannot handle goes on, unchanged, to the kernel's VXLAN device.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect,
        bpf_redirect_neigh, bpf_skb_store_bytes,
    },
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::debug;
use flannel_ebpf_common::{Counter, FdbValue, NodeConfig, RouteValue, VXLAN_OVERHEAD};

use crate::{
    csum,
    maps::{config, count, fdb_lookup, keep_mirrors, peer, route_lookup},
    packet::{ETH_LEN, ETH_P_IPV4, EthHdr, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, VXLAN_FLAG_I, be16, ptr_at},
};

const AF_INET: u8 = 2;
/// Outer headers plus the inner Ethernet header, all written in one store.
const HDR_LEN: usize = ETH_LEN + VXLAN_OVERHEAD as usize;
/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner MAC header length, for GSO.
const ENCAP_L2_ETH_LEN: u64 = (ETH_LEN as u64 & 0xff) << 56;
const ADJ_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | ENCAP_L2_ETH_LEN;

#[classifier]
pub fn flannel_encap(ctx: TcContext) -> i32 {
    keep_mirrors();
    match config() {
        Some(cfg) => encap(&ctx, cfg),
        None => TC_ACT_OK,
    }
}

/// Where the outer packet goes: from `bpf_fib_lookup` on the underlay.
struct NextHop {
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
    /// The neighbour is not resolved yet: let `bpf_redirect_neigh` resolve it.
    resolve: bool,
}

#[inline(always)]
fn encap(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let (Some(eth), Some(ip)) = (
        ptr_at::<EthHdr>(start, end, 0),
        ptr_at::<Ipv4Hdr>(start, end, ETH_LEN),
    ) else {
        count(Counter::TxFallbackMalformed, ctx.len());
        return TC_ACT_OK;
    };
    let (eth, ip) = unsafe { (&*eth, &*ip) };
    if be16(&eth.proto) != ETH_P_IPV4 {
        count(Counter::TxFallbackNotIpv4, ctx.len());
        return TC_ACT_OK;
    }
    let inner_src = eth.src;
    let inner_tos = ip.tos;
    let (inner_dst, node_ip, slot) = match route_lookup(ip.daddr) {
        Some(RouteValue {
            vtep_mac,
            node_ip,
            peer_slot,
            ..
        }) => (vtep_mac, node_ip, peer_slot),
        None => {
            let mac = eth.dst;
            let Some(FdbValue {
                node_ip, peer_slot, ..
            }) = fdb_lookup(mac)
            else {
                // Diagnostics only at debug level: the verifier prunes them otherwise.
                debug!(ctx, "encap: no route or FDB entry for VtepMAC {:mac}, left to the kernel", mac);
                count(Counter::TxFallbackNoFdb, ctx.len());
                return TC_ACT_OK;
            };
            (mac, node_ip, peer_slot)
        }
    };
    // Route the outer packet before touching the inner one, so a failure
    // leaves the packet as the kernel path expects it.
    let hop = match outer_next_hop(ctx, cfg, node_ip) {
        Ok(hop) => hop,
        Err(reason) => {
            debug!(ctx, "encap: no underlay route to node {:i} (counter {}), left to the kernel", node_ip, reason as u32);
            count(reason, ctx.len());
            if let Some(p) = peer(slot) {
                p.tx_fallbacks += 1;
            }
            return TC_ACT_OK;
        }
    };

    let inner_len = ctx.len();
    // Flow hash of the inner packet → outer UDP source port, as the kernel's
    // udp_flow_src_port() does, so ECMP on the underlay spreads flows.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let src_port = flow_src_port(hash, cfg.src_port_min, cfg.src_port_max);

    if ctx
        .adjust_room(VXLAN_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ADJ_FLAGS)
        .is_err()
    {
        count(Counter::TxFallbackAdjust, inner_len);
        return TC_ACT_OK;
    }

    let outer_len = inner_len + VXLAN_OVERHEAD;
    let hdr = build_headers(
        cfg,
        &hop,
        node_ip,
        inner_dst,
        inner_src,
        inner_tos,
        src_port,
        outer_len,
    );
    let stored = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb,
            0,
            hdr.as_ptr() as *const _,
            HDR_LEN as u32,
            0,
        )
    };
    if stored != 0 {
        // The packet is already grown: it cannot go back to the kernel path.
        count(Counter::TxFallbackAdjust, inner_len);
        return TC_ACT_SHOT;
    }
    // A kube-proxy mark left on the outer packet sends it through NAT rules
    // meant for the inner flow (Flannel's 63-second bug).
    ctx.set_mark(0);
    count(Counter::TxEncap, inner_len);
    if let Some(p) = peer(slot) {
        p.tx_packets += 1;
        p.tx_bytes += inner_len as u64;
    }
    if hop.resolve {
        // No next hop given on purpose: the kernel then routes the outer
        // header and replaces the skb's dst. With an explicit next hop the
        // stale dst (the flannel.1 route) survives, and when ARP resolves the
        // queued packet is re-addressed with flannel.1's neighbour MACs.
        count(Counter::TxRedirectNeigh, inner_len);
        return unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    }
    unsafe { bpf_redirect(hop.ifindex, 0) as i32 }
}

#[inline(always)]
fn outer_next_hop(ctx: &TcContext, cfg: &NodeConfig, node_ip: [u8; 4]) -> Result<NextHop, Counter> {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = IPPROTO_UDP;
    p.dport = cfg.port.to_be();
    // tot_len 0: no MTU check; flannel.1's MTU already leaves room for the headers.
    p.ifindex = cfg.underlay_ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.public_ip);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(node_ip);
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    let resolve = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => false,
        BPF_FIB_LKUP_RET_NO_NEIGH => true,
        BPF_FIB_LKUP_RET_FWD_DISABLED => return Err(Counter::TxFallbackForwardingOff),
        _ => return Err(Counter::TxFallbackNoRoute),
    };
    Ok(NextHop {
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
        resolve,
    })
}

#[inline(always)]
fn flow_src_port(hash: u32, min: u16, max: u16) -> u16 {
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

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn build_headers(
    cfg: &NodeConfig,
    hop: &NextHop,
    node_ip: [u8; 4],
    inner_dst: [u8; 6],
    inner_src: [u8; 6],
    inner_tos: u8,
    src_port: u16,
    outer_len: u32,
) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    // Outer Ethernet.
    h[0..6].copy_from_slice(&hop.dmac);
    h[6..12].copy_from_slice(&hop.smac);
    h[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    // Outer IPv4: DF clear, fresh ID, TTL 64 (flannel.1's "ttl auto").
    let ip_len = outer_len - ETH_LEN as u32;
    let tot_len = if ip_len > 0xffff { 0xffff } else { ip_len as u16 };
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    let mut ip = [0u8; IPV4_LEN];
    ip[0] = 0x45;
    ip[1] = outer_tos(inner_tos);
    ip[2..4].copy_from_slice(&tot_len.to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&cfg.public_ip);
    ip[16..20].copy_from_slice(&node_ip);
    let check = csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    h[14..34].copy_from_slice(&ip);
    // UDP, checksum 0 (legal on IPv4; the kernel receiver accepts it).
    h[34..36].copy_from_slice(&src_port.to_be_bytes());
    h[36..38].copy_from_slice(&cfg.port.to_be_bytes());
    h[38..40].copy_from_slice(&tot_len.saturating_sub(IPV4_LEN as u16).to_be_bytes());
    // VXLAN: I flag, VNI in the upper 24 bits of the second word.
    h[42] = VXLAN_FLAG_I;
    let vni = cfg.vni.to_be_bytes();
    h[46] = vni[1];
    h[47] = vni[2];
    h[48] = vni[3];
    // Inner Ethernet, as the kernel built it on flannel.1.
    h[50..56].copy_from_slice(&inner_dst);
    h[56..62].copy_from_slice(&inner_src);
    h[62..64].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
    h
}
