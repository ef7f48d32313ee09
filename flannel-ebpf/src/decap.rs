//! Ingress on the underlay (XDP): VXLAN for our VNI and port, from a node in
//! the FDB, loses its outer headers here and enters the stack as a plain
//! frame on the underlay; the kernel then routes it to cni0. VXLAN to our
//! port that fails a check is dropped and counted, and so is a plain packet
//! with a pod source; everything else passes untouched.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::xdp,
    programs::XdpContext,
};
use flannel_ebpf_common::{Counter, NodeConfig};

use crate::{
    maps::{config, count},
    packet::{ETH_LEN, EthHdr, IPV4_LEN, Ipv4Hdr, UDP_LEN, UdpHdr, VXLAN_LEN, be16, ptr_at},
    rx::{self, Outer, Overlay, Verdict},
};

#[xdp(frags)]
pub fn flannel_decap(ctx: XdpContext) -> u32 {
    match config() {
        Some(cfg) => decap(&ctx, cfg),
        None => XDP_PASS,
    }
}

#[inline(always)]
fn decap(ctx: &XdpContext, cfg: &NodeConfig) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let frame_len = (end - start) as u32;
    let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
        return XDP_PASS;
    };
    let eth = unsafe { &*eth };
    // Here (before the kernel strips it) an 802.1p priority tag can still be
    // in front of the IPv4 header: such frames get the same checks.
    let tag = ptr_at::<[u8; 4]>(start, end, ETH_LEN).map(|t| unsafe { *t });
    let Some(l2) = rx::l2_len(be16(&eth.proto), tag) else {
        return XDP_PASS;
    };
    let ip = if l2 == ETH_LEN {
        ptr_at::<Ipv4Hdr>(start, end, ETH_LEN)
    } else {
        ptr_at::<Ipv4Hdr>(start, end, ETH_LEN + 4)
    };
    let Some(ip) = ip else {
        count(Counter::RxPassMalformed, frame_len);
        return XDP_PASS;
    };
    let ip = unsafe { &*ip };
    let (ihl, first_fragment, ip_len) = match rx::outer(ip, cfg, frame_len) {
        Outer::Udp {
            ihl,
            first_fragment,
            ip_len,
        } => (ihl, first_fragment, ip_len),
        Outer::Pass => return XDP_PASS,
        Outer::Drop => return XDP_DROP,
    };
    let l4 = l2 + ihl;
    // The common frame (untagged, no IP options) is read in place at
    // constant offsets; any other is copied out with bpf_xdp_load_bytes so
    // the verifier never has to track a variable packet offset.
    let plain = l2 == ETH_LEN && ihl == IPV4_LEN;
    let Some(dport) = udp_dport(ctx, start, end, l4, plain) else {
        count(Counter::RxPassMalformed, frame_len);
        return XDP_PASS;
    };
    if dport != cfg.port {
        return XDP_PASS;
    }
    // From here on the frame claims to be ours: it is delivered or dropped.
    let overlay = if rx::holds_overlay(l2, l4, frame_len, first_fragment, ip_len) {
        read_overlay(ctx, start, end, l4 + UDP_LEN, plain)
    } else {
        None
    };
    let slot = match rx::overlay(ctx, overlay.as_ref(), ip.saddr, frame_len, first_fragment, cfg) {
        Verdict::Decap { slot } => slot,
        Verdict::Drop => return XDP_DROP,
        Verdict::Pass => return XDP_PASS,
    };
    // The inner frame enters the stack on the underlay: give it the outer
    // MACs so the kernel sees a frame for this host, not for flannel.1.
    let mut macs = [0u8; 12];
    macs[0..6].copy_from_slice(&eth.dst);
    macs[6..12].copy_from_slice(&eth.src);
    let inner_off = rx::inner_offset(l4);
    let inner_len = frame_len - inner_off as u32;
    if !write_inner_macs(ctx, start, end, inner_off, plain, &mut macs)
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, inner_off as i32) } != 0
    {
        count(Counter::RxDropAdjust, frame_len);
        return XDP_DROP;
    }
    rx::delivered(slot, inner_len);
    XDP_PASS
}

#[inline(always)]
fn load<T>(ctx: &XdpContext, off: usize) -> Option<T> {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    let rc = unsafe {
        bpf_xdp_load_bytes(
            ctx.ctx,
            off as u32,
            v.as_mut_ptr() as *mut _,
            core::mem::size_of::<T>() as u32,
        )
    };
    // SAFETY: the helper filled all size_of::<T>() bytes when it returned 0.
    (rc == 0).then(|| unsafe { v.assume_init() })
}

/// Offsets of the plain frame's headers.
const PLAIN_L4: usize = ETH_LEN + IPV4_LEN;
const PLAIN_VX: usize = PLAIN_L4 + UDP_LEN;

#[inline(always)]
fn udp_dport(ctx: &XdpContext, start: usize, end: usize, l4: usize, plain: bool) -> Option<u16> {
    if plain {
        ptr_at::<UdpHdr>(start, end, PLAIN_L4).map(|u| be16(unsafe { &(*u).dport }))
    } else {
        load::<UdpHdr>(ctx, l4).map(|u| be16(&u.dport))
    }
}

#[inline(always)]
fn read_overlay(ctx: &XdpContext, start: usize, end: usize, vx_off: usize, plain: bool) -> Option<Overlay> {
    if plain {
        // SAFETY: bounds checked by ptr_at; Overlay is plain bytes (align 1).
        ptr_at::<Overlay>(start, end, PLAIN_VX).map(|p| unsafe { core::ptr::read(p) })
    } else {
        load::<Overlay>(ctx, vx_off)
    }
}

#[inline(always)]
fn write_inner_macs(
    ctx: &XdpContext,
    start: usize,
    end: usize,
    inner_off: usize,
    plain: bool,
    macs: &mut [u8; 12],
) -> bool {
    if plain {
        match ptr_at::<[u8; 12]>(start, end, PLAIN_VX + VXLAN_LEN) {
            Some(p) => {
                // SAFETY: bounds checked by ptr_at.
                unsafe { *p = *macs };
                true
            }
            None => false,
        }
    } else {
        unsafe { bpf_xdp_store_bytes(ctx.ctx, inner_off as u32, macs.as_mut_ptr() as *mut _, 12) == 0 }
    }
}
