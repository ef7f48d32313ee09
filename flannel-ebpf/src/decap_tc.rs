//! Ingress on the underlay at TC, the alternative to the XDP decap: an XDP
//! program on a veth (a kind node's eth0) turns off GSO on the veth's peer,
//! so every TCP segment would cross it at MTU size; at TC the peer keeps
//! sending large segments. Same checks and counters as the XDP program.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    macros::classifier,
    programs::TcContext,
};
use flannel_ebpf_common::{Counter, NodeConfig};

use crate::{
    deliver,
    maps::{config, count},
    packet::{ETH_LEN, ETH_P_IPV4, EthHdr, Ipv4Hdr, UDP_LEN, UdpHdr, be16},
    rx::{self, Outer, Overlay, Verdict},
};

#[classifier]
pub fn flannel_decap_tc(ctx: TcContext) -> i32 {
    match config() {
        Some(cfg) => decap(&ctx, cfg),
        None => TC_ACT_OK,
    }
}

#[inline(always)]
fn decap(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let frame_len = ctx.len();
    // Headers are copied out with bpf_skb_load_bytes: an skb's headers need
    // not all sit in its linear part.
    let Ok(eth) = ctx.load::<EthHdr>(0) else {
        return TC_ACT_OK;
    };
    if be16(&eth.proto) != ETH_P_IPV4 {
        return TC_ACT_OK;
    }
    // The kernel took any 802.1Q tag off before this hook: a real VLAN's
    // frame (VID not 0) is not ours, as at XDP.
    let skb = unsafe { &*ctx.skb.skb };
    if skb.vlan_present != 0 && skb.vlan_tci & 0x0fff != 0 {
        return TC_ACT_OK;
    }
    let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_LEN) else {
        count(Counter::RxPassMalformed, frame_len);
        return TC_ACT_OK;
    };
    let (ihl, first_fragment, ip_len) = match rx::outer(&ip, cfg, frame_len) {
        Outer::Udp {
            ihl,
            first_fragment,
            ip_len,
        } => (ihl, first_fragment, ip_len),
        Outer::Pass => return TC_ACT_OK,
        Outer::Drop => return TC_ACT_SHOT,
    };
    let l4 = ETH_LEN + ihl;
    let Ok(udp) = ctx.load::<UdpHdr>(l4) else {
        count(Counter::RxPassMalformed, frame_len);
        return TC_ACT_OK;
    };
    if be16(&udp.dport) != cfg.port {
        return TC_ACT_OK;
    }
    // From here on the frame claims to be ours: it is delivered or dropped.
    let inner_off = rx::inner_offset(l4);
    let overlay = if rx::holds_overlay(ETH_LEN, l4, frame_len, first_fragment, ip_len) {
        ctx.load::<Overlay>(l4 + UDP_LEN).ok()
    } else {
        None
    };
    let slot = match rx::overlay(ctx, overlay.as_ref(), ip.saddr, frame_len, first_fragment, cfg) {
        Verdict::Decap { slot } => slot,
        Verdict::Drop => return TC_ACT_SHOT,
        Verdict::Pass => return TC_ACT_OK,
    };
    let inner_len = frame_len - inner_off as u32;
    // A GSO aggregate (a veth peer's TSO, GRO on a NIC) carries UDP-tunnel
    // offload state that bpf_skb_adjust_room cannot clear on these kernels
    // (BPF_F_ADJ_ROOM_DECAP_L3_* only sets the protocol): stripped here it
    // would keep SKB_GSO_UDP_TUNNEL and be segmented in software on its way
    // on (measured: TCP at 0.37x). The kernel's VXLAN device decapsulates
    // it, after the checks above; the direct path notes its flow as the
    // stack's, so both directions of it cross conntrack from then on.
    if unsafe { (*ctx.skb.skb).gso_size } != 0 {
        count(Counter::RxPassGso, frame_len);
        rx::from_peer(slot, inner_len);
        if let Some(ov) = &overlay {
            deliver::stack_carries(ctx, cfg, &ov.inner_ip, inner_off + ETH_LEN);
        }
        return TC_ACT_OK;
    }
    // Remove outer IPv4 (with options), UDP, VXLAN and the inner Ethernet
    // header: the outer Ethernet header stays in front of the inner IPv4
    // packet, so the kernel sees a frame for this host on the underlay.
    let strip = inner_off as i32;
    if ctx
        .adjust_room(-strip, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO as u64)
        .is_err()
    {
        count(Counter::RxDropAdjust, frame_len);
        return TC_ACT_SHOT;
    }
    // adjust_room (without BPF_F_ADJ_ROOM_NO_CSUM_RESET) has reset a
    // checksum the NIC verified for the outer headers: the stack verifies
    // the inner packet's itself.
    rx::delivered(slot, inner_len);
    match deliver::to_pod(ctx, cfg) {
        Ok(action) => {
            count(Counter::RxDirect, inner_len);
            action
        }
        Err(why) => {
            if let Some(c) = why {
                count(c, inner_len);
            }
            TC_ACT_OK
        }
    }
}
