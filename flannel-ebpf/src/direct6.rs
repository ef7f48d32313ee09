//! The direct path for IPv6 (dual-stack nodes), under the same rule as
//! IPv4's: a local pod's IPv6 packet to a remote pod is encapsulated at
//! cni0's ingress and redirected to the IPv6 underlay (ROUTE6, one exact
//! lookup by the subnet length every IPv6 subnet shares), and a decapsulated
//! IPv6 packet for a local pod is handed to cni0's transmit. Flows the stack
//! carries (STACK_FLOWS6, the NAT mark) stay with it both ways. Not taken
//! (the stack and flannel-v6 carry them, as without the direct path): GSO
//! aggregates (their outer UDP checksums cannot be asked for from BPF),
//! extension headers, ICMPv6 errors, hop limits expiring, packets bigger
//! than flannel-v6's MTU, sources that are not our pods.
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_skb_pull_data},
    programs::TcContext,
};
use flannel_ebpf_common::{Counter, NAT_MARK, NodeConfig, NodeConfig6};

use crate::{
    flows::{self, Side, icmp6_error},
    maps::{
        config6, count, direct_path, note_stack_flow6, on_stack6, remember_stack_flow6,
        route6_lookup,
    },
    packet::{ETH_LEN, Ipv6Hdr, be16, ptr_at, skb_read},
    rx6::in_prefix6,
    tunnel6::{self, Inner6, Taken, words},
};

const AF_INET6: u8 = 10;
const IPV6_LEN: usize = 40;
/// Where the hop limit sits in the IPv6 header.
const HOP_LIMIT: usize = 7;

/// The IPv6 direct path's config: dual-stack, and our IPv6 subnet known.
#[inline(always)]
fn config(cfg: &NodeConfig) -> Option<&'static NodeConfig6> {
    if !direct_path(cfg) {
        return None;
    }
    config6().filter(|c6| c6.subnet6_len != 0)
}

/// Upper layers right behind the IPv6 header whose checksum covers the
/// pseudo-header (the outer checksum is derived from it): TCP, UDP, ICMPv6.
#[inline(always)]
fn checksummed(next: u8) -> bool {
    matches!(next, 6 | 17 | 58)
}

/// A source one of our pods may use: in our IPv6 subnet, but neither its
/// first address (flannel-v6's) nor the second (cni0's, the gateway the CNI
/// bridge plugin takes), as for IPv4.
#[inline(always)]
fn pod_source6(cfg6: &NodeConfig6, saddr: &[u8; 16]) -> bool {
    let mut gateway = cfg6.subnet6;
    gateway[15] |= 1;
    in_prefix6(saddr, &cfg6.subnet6, cfg6.subnet6_len)
        && *saddr != cfg6.subnet6
        && *saddr != gateway
}

/// What [`prepare`] found: the member, what the outer headers need, and the
/// inner header bytes it rewrote (put back if the encapsulation fails).
#[derive(Default)]
struct Prepared {
    node_ip6: [u8; 16],
    slot: u32,
    taken: Taken,
    macs: [u8; 12],
    hop_limit: u8,
}

/// cni0's ingress, an IPv6 frame addressed to the host: encapsulated for
/// the member holding its destination, or left to the stack (counted).
#[inline(never)]
pub fn egress6(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let Some(cfg6) = config(cfg) else {
        return TC_ACT_OK;
    };
    let mut prep = Prepared::default();
    match prepare(ctx, cfg6, &mut prep) {
        Ok(()) => {}
        Err(None) => return TC_ACT_OK,
        Err(Some(c)) => {
            count(c, ctx.len());
            return TC_ACT_OK;
        }
    }
    encapsulate(ctx, cfg, cfg6, &prep)
}

/// Check the pod's packet, find its member, and address the inner frame as
/// flannel-v6 would (VtepMACs, hop limit less one). Err(None): not for a
/// remote pod; Err(Some): the stack's, for that reason. Nothing is changed
/// unless it returns Ok.
#[inline(never)]
fn prepare(ctx: &TcContext, cfg6: &NodeConfig6, out: &mut Prepared) -> Result<(), Option<Counter>> {
    let len = ctx.len();
    let hdrs = size_of::<Inner6>();
    let mut p = ptr_at::<Inner6>(ctx.data(), ctx.data_end(), 0);
    if p.is_none() && unsafe { bpf_skb_pull_data(ctx.skb.skb, hdrs as u32) } == 0 {
        p = ptr_at::<Inner6>(ctx.data(), ctx.data_end(), 0);
    }
    let p = p.ok_or(None)?;
    // SAFETY: bounds checked by ptr_at; plain bytes (align 1).
    let inner = unsafe { &mut *p };
    let route = route6_lookup(&inner.ip6.daddr, cfg6.subnet6_len).ok_or(None)?;
    let skb = unsafe { &*ctx.skb.skb };
    // A Service's packet DNAT'd by br_netfilter already: the stack's.
    if skb.mark & NAT_MARK != 0 {
        return Err(Some(Counter::TxDirectStackFlow));
    }
    let ip6 = &inner.ip6;
    let payload = be16(&ip6.payload_len) as u32;
    let fits = skb.gso_size == 0
        && IPV6_LEN as u32 + payload <= cfg6.vtep6_mtu
        && (ETH_LEN + IPV6_LEN) as u32 + payload == len;
    if ip6.ver_tc_flow[0] >> 4 != 6
        || !fits
        || !checksummed(ip6.next_header)
        || ip6.hop_limit <= 1
        || !pod_source6(cfg6, &ip6.saddr)
        || icmp6_error(ctx, ETH_LEN, ip6.next_header)
    {
        return Err(Some(Counter::TxDirectUnfit));
    }
    if on_stack6(&flows::key6(ctx, ip6, ETH_LEN, Side::Out)) {
        return Err(Some(Counter::TxDirectStackFlow));
    }
    out.macs[..6].copy_from_slice(&inner.eth.dst);
    out.macs[6..].copy_from_slice(&inner.eth.src);
    out.hop_limit = inner.ip6.hop_limit;
    inner.eth.dst = route.vtep_mac6;
    inner.eth.src = cfg6.vtep_mac6;
    inner.ip6.hop_limit -= 1;
    out.taken = tunnel6::take(inner);
    out.node_ip6 = route.node_ip6;
    out.slot = route.peer_slot;
    Ok(())
}

#[inline(never)]
fn encapsulate(ctx: &TcContext, cfg: &NodeConfig, cfg6: &NodeConfig6, prep: &Prepared) -> i32 {
    let len = ctx.len();
    match tunnel6::encapsulate6(ctx, cfg, cfg6, &prep.node_ip6, prep.slot, &prep.taken) {
        Ok(action) => {
            count(Counter::TxDirect6, len);
            action
        }
        Err(reason) => {
            // Unchanged by the encapsulation: put the pod's own addressing
            // back, and the stack routes it to flannel-v6.
            if let Some(p) = ptr_at::<Inner6>(ctx.data(), ctx.data_end(), 0) {
                // SAFETY: bounds checked by ptr_at; plain bytes.
                let inner = unsafe { &mut *p };
                inner.eth.dst.copy_from_slice(&prep.macs[..6]);
                inner.eth.src.copy_from_slice(&prep.macs[6..]);
                inner.ip6.hop_limit = prep.hop_limit;
            } else {
                count(Counter::TxFallbackAdjust, len);
                return TC_ACT_SHOT;
            }
            count(reason, len);
            count(Counter::TxDirectUnfit, len);
            TC_ACT_OK
        }
    }
}

/// A decapsulated IPv6 frame (Ethernet + inner IPv6) at TC: handed to cni0
/// for its pod, or left to the stack (counted, its flow noted).
#[inline(never)]
pub fn deliver6(ctx: &TcContext, cfg: &NodeConfig, inner_len: u32) -> i32 {
    crate::deliver::counted(to_pod6(ctx, cfg), Counter::RxDirect6, inner_len)
}

#[inline(always)]
fn to_pod6(ctx: &TcContext, cfg: &NodeConfig) -> Result<i32, Option<Counter>> {
    let cfg6 = config(cfg).ok_or(None)?;
    let ip6 = skb_read::<Ipv6Hdr>(ctx, ETH_LEN).ok_or(None)?;
    if !in_prefix6(&ip6.daddr, &cfg6.subnet6, cfg6.subnet6_len) {
        return Err(None);
    }
    if icmp6_error(ctx, ETH_LEN, ip6.next_header) {
        return Err(Some(Counter::RxDirectUnfit));
    }
    let key = flows::key6(ctx, &ip6, ETH_LEN, Side::In);
    if on_stack6(&key) {
        return Err(Some(Counter::RxDirectStackFlow));
    }
    let macs = if checksummed(ip6.next_header) && ip6.hop_limit > 1 {
        fib_pod_hop6(ctx, cfg, &ip6)
    } else {
        None
    };
    let Some(macs) = macs else {
        note_stack_flow6(&key);
        return Err(Some(Counter::RxDirectUnfit));
    };
    if ctx.store(0, &macs, 0).is_err() {
        note_stack_flow6(&key);
        return Err(Some(Counter::RxDirectUnfit));
    }
    if ctx
        .store(ETH_LEN + HOP_LIMIT, &(ip6.hop_limit - 1), 0)
        .is_err()
    {
        // The MACs are the pod's already: the stack would not take it.
        count(Counter::RxDropAdjust, ctx.len());
        return Ok(TC_ACT_SHOT);
    }
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&macs[..6]);
    Ok(crate::deliver::hand_over(ctx, cfg, &ip6.daddr, &dst))
}

/// The host's route and neighbour for an IPv6 pod behind cni0 (a FIB
/// lookup per packet: IPv6 deliveries are not cached yet). None for
/// anything else: the host, an unresolved neighbour, a packet bigger than
/// the route's MTU. The MACs as they go on the wire: destination, source.
#[inline(always)]
fn fib_pod_hop6(ctx: &TcContext, cfg: &NodeConfig, ip6: &Ipv6Hdr) -> Option<[u8; 12]> {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET6;
    p.l4_protocol = ip6.next_header;
    p.__bindgen_anon_1.tot_len = (IPV6_LEN as u16).wrapping_add(be16(&ip6.payload_len));
    p.ifindex = cfg.underlay_ifindex;
    p.__bindgen_anon_3.ipv6_src = words(&ip6.saddr);
    p.__bindgen_anon_4.ipv6_dst = words(&ip6.daddr);
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc as u32 != BPF_FIB_LKUP_RET_SUCCESS || p.ifindex != cfg.bridge_ifindex {
        return None;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&p.dmac);
    macs[6..].copy_from_slice(&p.smac);
    Some(macs)
}

/// A member's IPv6 packet for one of our pods that the stack will carry
/// (a GSO aggregate flannel-v6 decapsulates): its flow is the stack's from
/// now on, both ways. `ip6_off`: where its inner IPv6 header starts.
#[inline(never)]
pub fn stack_carries6(ctx: &TcContext, cfg: &NodeConfig, ip6_off: usize) {
    let Some(cfg6) = config(cfg) else {
        return;
    };
    if let Some(ip6) = skb_read::<Ipv6Hdr>(ctx, ip6_off)
        && in_prefix6(&ip6.daddr, &cfg6.subnet6, cfg6.subnet6_len)
    {
        remember_stack_flow6(&flows::key6(ctx, &ip6, ip6_off, Side::In));
    }
}

/// flannel-v6's egress: every flow seen there is one the host stack
/// carries (the direct path declined it, or the host sent it).
#[inline(never)]
pub fn stack_sends6(ctx: &TcContext, cfg: &NodeConfig) {
    if config(cfg).is_some()
        && let Some(key) = flows::key6_at(ctx, ETH_LEN, Side::Out)
    {
        remember_stack_flow6(&key);
    }
}
