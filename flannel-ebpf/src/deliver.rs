//! The direct path in: a decapsulated packet for a local pod is handed to
//! its veth's peer in the pod when the agent has seen its bridge port, else
//! to cni0's transmit (the bridge's forwarding to the pod's port), addressed as
//! the host would address it, with its TTL decremented — no IP receive,
//! routing, netfilter or neighbour pass. What it declines enters the host
//! stack as before, and its flow is noted as the stack's (both ways).
use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup},
    helpers::generated::{
        bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_peer, bpf_skb_change_type,
    },
    programs::TcContext,
};
use flannel_ebpf_common::{Counter, NEXT_HOP_TTL_NS, NodeConfig, PodHop, in_prefix};

use crate::{
    flows::{self, Side, icmp_error},
    maps::{
        count, direct_path, note_stack_flow, now_ns, on_stack, pod_hop_slot, pod_port,
        remember_stack_flow,
    },
    packet::{ETH_LEN, IPV4_VER_IHL, Ipv4Hdr, PACKET_HOST, be16, skb_read},
    tunnel::decrement_ttl,
};

const AF_INET: u8 = 2;

/// MAC addresses written in front of the inner packet.
#[repr(C)]
struct Macs {
    dst: [u8; 6],
    src: [u8; 6],
}

/// Offer the decapsulated frame in `ctx` (Ethernet + inner IPv4) to the
/// direct path. Ok: the redirect's action. Err: the frame enters the stack
/// (the counter says why; None when the direct path does not apply).
#[inline(always)]
pub fn to_pod(ctx: &TcContext, cfg: &NodeConfig) -> Result<i32, Option<Counter>> {
    if !direct_path(cfg) {
        return Err(None);
    }
    let Some(ip) = skb_read::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return Err(None);
    };
    if !in_prefix(ip.daddr, cfg.subnet, cfg.subnet_mask) {
        // Not for our subnet (routed through a member, or the stack's
        // business): nothing the direct path could take. The host's own
        // addresses in the subnet are declined by the route lookup below.
        return Err(None);
    }
    if icmp_error(ctx, &ip) {
        return Err(Some(Counter::RxDirectUnfit));
    }
    let key = flows::key(ctx, &ip, Side::In);
    if on_stack(&key) {
        return Err(Some(Counter::RxDirectStackFlow));
    }
    let Some(hop) = (if ip.ver_ihl == IPV4_VER_IHL && !ip.is_fragment() && ip.ttl > 1 {
        pod_hop(ctx, cfg, &ip)
    } else {
        None
    }) else {
        note_stack_flow(&key);
        return Err(Some(Counter::RxDirectUnfit));
    };
    if ctx.store(0, &hop, 0).is_err() {
        note_stack_flow(&key);
        return Err(Some(Counter::RxDirectUnfit));
    }
    if !decrement_ttl(ctx, ETH_LEN, &ip) {
        // Addressed to the pod already: the stack would not take it.
        count(Counter::RxDropAdjust, ctx.len());
        return Ok(TC_ACT_SHOT);
    }
    Ok(hand_over(
        ctx,
        cfg,
        &flannel_ebpf_common::pod_port_key(ip.daddr),
        &hop.dst,
    ))
}

/// Hand a pod's addressed packet over (both families): to the peer of its
/// veth when the agent knows it (POD_PORTS by `key`, while the pod's MAC is
/// still `mac`), the pod's own ingress with no bridge or backlog queue;
/// else to cni0's transmit.
#[inline(always)]
pub fn hand_over(ctx: &TcContext, cfg: &NodeConfig, key: &[u8; 16], mac: &[u8; 6]) -> i32 {
    let Some(port) = pod_port(key, mac) else {
        return unsafe { bpf_redirect(cfg.bridge_ifindex, 0) } as i32;
    };
    // Addressed to it: the veth transmit skipped would have said so.
    unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
    count(Counter::RxDirectPeer, ctx.len());
    unsafe { bpf_redirect_peer(port, 0) as i32 }
}

/// The verdict of a direct delivery (`to_pod` or IPv6's), counted: `ok`
/// when it went to the pod, else the reason it enters the stack.
#[inline(always)]
pub fn counted(r: Result<i32, Option<Counter>>, ok: Counter, inner_len: u32) -> i32 {
    match r {
        Ok(action) => {
            count(ok, inner_len);
            action
        }
        Err(why) => {
            if let Some(c) = why {
                count(c, inner_len);
            }
            aya_ebpf::bindings::TC_ACT_OK
        }
    }
}

/// A member's packet for one of our pods that the kernel's VXLAN device
/// will decapsulate (a GSO aggregate): the stack carries its flow from now
/// on, both ways. `ip` is a copy of its inner IPv4 header, at `ip_off`.
#[inline(always)]
pub fn stack_carries(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4Hdr, ip_off: usize) {
    if direct_path(cfg) && in_prefix(ip.daddr, cfg.subnet, cfg.subnet_mask) {
        remember_stack_flow(&flows::key_at(ctx, ip, ip_off, Side::In));
    }
}

/// The host's route and neighbour for a pod behind cni0: this CPU's cached
/// answer while it is fresh, for this pod and a packet no bigger than the
/// one it was checked for; else a FIB lookup (cached when it succeeds). The
/// cache is by destination alone: routes to a local pod that depend on the
/// source or TOS are not followed (a second at most for a changed one).
#[inline(always)]
fn pod_hop(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4Hdr) -> Option<Macs> {
    let now = now_ns();
    let len = be16(&ip.tot_len);
    let mut slot = pod_hop_slot(ip.daddr);
    let fresh =
        |c: &PodHop| c.pod_ip == ip.daddr && now.wrapping_sub(c.resolved_ns) < NEXT_HOP_TTL_NS;
    if let Some(c) = &mut slot
        && fresh(c)
        && len <= c.max_len
    {
        return Some(Macs {
            dst: c.dmac,
            src: c.smac,
        });
    }
    let macs = fib_pod_hop(ctx, cfg, ip)?;
    if let Some(c) = slot {
        // A bigger packet checked widens the entry; a new answer starts it.
        c.max_len = if fresh(c) { c.max_len.max(len) } else { len };
        c.pod_ip = ip.daddr;
        c.dmac = macs.dst;
        c.smac = macs.src;
        c.resolved_ns = now;
    }
    Some(macs)
}

/// [`pod_hop`]'s lookup: None for anything but a pod behind cni0 (the
/// host, an unresolved neighbour, a packet bigger than the route's MTU).
#[inline(always)]
fn fib_pod_hop(ctx: &TcContext, cfg: &NodeConfig, ip: &Ipv4Hdr) -> Option<Macs> {
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = ip.proto;
    p.__bindgen_anon_2.tos = ip.tos;
    // The MTU check (host order); GSO aggregates never come here.
    p.__bindgen_anon_1.tot_len = be16(&ip.tot_len);
    p.ifindex = cfg.underlay_ifindex;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.saddr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.daddr);
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    (rc as u32 == BPF_FIB_LKUP_RET_SUCCESS && p.ifindex == cfg.bridge_ifindex).then_some(Macs {
        dst: p.dmac,
        src: p.smac,
    })
}
