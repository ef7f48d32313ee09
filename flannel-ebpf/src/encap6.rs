//! Egress on flannel-v6 (TCX, dual-stack nodes): the kernel has routed the
//! IPv6 packet by flanneld's `<subnet> via <subnet>:: onlink` route and
//! resolved the peer's VtepMAC from its permanent neighbour; the FDB6 map
//! gives the peer's public IPv6 address by that MAC. Encapsulated here and
//! redirected to the underlay; what cannot be (GSO aggregates, extension
//! headers, an unknown VtepMAC, no route) goes on unchanged to the kernel's
//! vxlan6 device, counted.
use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::generated::bpf_skb_pull_data, macros::classifier,
    programs::TcContext,
};
use flannel_ebpf_common::{Counter, FdbKey, NodeConfig, NodeConfig6};

use crate::{
    maps::{FDB6, config, config6, count},
    packet::{ETH_LEN, ETH_P_IPV6, be16, ptr_at},
    tunnel6::{self, Inner6, Taken},
};

#[classifier]
pub fn flannel_encap6(ctx: TcContext) -> i32 {
    match (config(), config6()) {
        (Some(cfg), Some(cfg6)) => {
            // Noted before anything else: even a packet the kernel device
            // ends up sending went through the stack.
            crate::direct6::stack_sends6(&ctx, cfg);
            encap6(&ctx, cfg, cfg6)
        }
        _ => TC_ACT_OK,
    }
}

/// Upper layers whose checksum covers an IPv6 pseudo-header: TCP, UDP, ICMPv6.
#[inline(always)]
fn checksummed(next: u8) -> bool {
    matches!(next, 6 | 17 | 58)
}

/// Two subprograms one after the other, each with its own stack frame:
/// reading and checking the inner headers, then writing the outer ones (in
/// one frame they would not fit BPF's 512 bytes).
#[inline(always)]
fn encap6(ctx: &TcContext, cfg: &NodeConfig, cfg6: &NodeConfig6) -> i32 {
    let mut prep = Prepared::default();
    if !prepare(ctx, &mut prep) {
        return TC_ACT_OK;
    }
    encapsulate(ctx, cfg, cfg6, &prep)
}

/// What [`prepare`] found: the member, and what the outer headers need.
#[derive(Default)]
struct Prepared {
    node_ip6: [u8; 16],
    slot: u32,
    taken: Taken,
}

/// Check the inner frame and find its member; false (counted): the kernel's
/// device sends it.
#[inline(never)]
fn prepare(ctx: &TcContext, out: &mut Prepared) -> bool {
    let len = ctx.len();
    let hdrs = size_of::<Inner6>();
    let mut p = ptr_at::<Inner6>(ctx.data(), ctx.data_end(), 0);
    if p.is_none() && unsafe { bpf_skb_pull_data(ctx.skb.skb, hdrs as u32) } == 0 {
        p = ptr_at::<Inner6>(ctx.data(), ctx.data_end(), 0);
    }
    let Some(p) = p else {
        count(Counter::TxFallbackMalformed, len);
        return false;
    };
    // SAFETY: bounds checked by ptr_at; plain bytes.
    let inner = unsafe { &*p };
    let ip6 = &inner.ip6;
    if be16(&inner.eth.proto) != ETH_P_IPV6
        || ip6.ver_tc_flow[0] >> 4 != 6
        || ETH_LEN as u32 + 40 + be16(&ip6.payload_len) as u32 != len
    {
        count(Counter::TxFallbackMalformed, len);
        return false;
    }
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        count(Counter::TxFallbackIpv6Gso, len);
        return false;
    }
    if !checksummed(ip6.next_header) {
        count(Counter::TxFallbackIpv6ExtHeaders, len);
        return false;
    }
    let Some(member) = FDB6.get_ptr(FdbKey::new(inner.eth.dst)) else {
        count(Counter::TxFallbackNoFdb, len);
        return false;
    };
    // SAFETY: a map value the kernel keeps alive for this run.
    unsafe {
        out.node_ip6 = (*member).node_ip6;
        out.slot = (*member).peer_slot;
    }
    out.taken = tunnel6::take(inner);
    true
}

#[inline(never)]
fn encapsulate(ctx: &TcContext, cfg: &NodeConfig, cfg6: &NodeConfig6, prep: &Prepared) -> i32 {
    match tunnel6::encapsulate6(ctx, cfg, cfg6, &prep.node_ip6, prep.slot, &prep.taken) {
        Ok(action) => action,
        Err(reason) => {
            count(reason, ctx.len());
            TC_ACT_OK
        }
    }
}
