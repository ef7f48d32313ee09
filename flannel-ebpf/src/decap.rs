//! Ingress on the underlay (XDP): VXLAN for our VNI and port, from a node in
//! the FDB, loses its outer headers here and enters the stack as a plain
//! frame on the underlay; the kernel then routes it to cni0. VXLAN to our
//! port that fails a check is dropped and counted, and so is a plain packet
//! with a pod source; everything else passes untouched. The body is
//! [`rx::receive`], as at TC; this file says how XDP reads and strips.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    macros::xdp,
    programs::XdpContext,
};
use flannel_ebpf_common::NodeConfig;

use crate::{
    maps::config,
    packet::{
        ETH_LEN, ETH_P_IPV6, EthHdr, IPV4_LEN, Ipv4Hdr, UDP_LEN, UdpHdr, VXLAN_LEN, be16, ptr_at,
    },
    rx::{self, Hook, Link, Overlay},
};

#[xdp(frags)]
pub fn flannel_decap(ctx: XdpContext) -> u32 {
    match config() {
        Some(cfg) => rx::receive(&Xdp(ctx), cfg),
        None => XDP_PASS,
    }
}

struct Xdp(XdpContext);

impl Hook for Xdp {
    type Ctx = XdpContext;
    type Action = u32;

    #[inline(always)]
    fn ctx(&self) -> &XdpContext {
        &self.0
    }

    #[inline(always)]
    fn pass(&self) -> u32 {
        XDP_PASS
    }

    #[inline(always)]
    fn drop(&self) -> u32 {
        XDP_DROP
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.0.data_end() - self.0.data()) as u32
    }

    #[inline(always)]
    fn link(&self) -> Link {
        let (start, end) = (self.0.data(), self.0.data_end());
        let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
            return Link::NotOurs;
        };
        let eth = unsafe { &*eth };
        // Here (before the kernel strips it) an 802.1p priority tag can still be
        // in front of the IPv4 header: such frames get the same checks.
        let tag = ptr_at::<[u8; 4]>(start, end, ETH_LEN).map(|t| unsafe { *t });
        let Some((l2, l3)) = rx::l2_len(be16(&eth.proto), tag) else {
            return Link::NotOurs;
        };
        if l3 == ETH_P_IPV6 {
            return Link::Ipv6 { l2 };
        }
        let ip = if l2 == ETH_LEN {
            ptr_at::<Ipv4Hdr>(start, end, ETH_LEN)
        } else {
            ptr_at::<Ipv4Hdr>(start, end, ETH_LEN + 4)
        };
        match ip {
            // SAFETY: bounds checked by ptr_at; Ipv4Hdr is plain bytes (align 1).
            Some(p) => Link::Ipv4 {
                l2,
                ip: unsafe { core::ptr::read(p) },
            },
            None => Link::Malformed,
        }
    }

    #[inline(always)]
    fn read<T>(&self, off: usize) -> Option<T> {
        load::<T>(&self.0, off)
    }

    // The common frame (untagged, no IP options) is read in place at
    // constant offsets; any other is copied out with bpf_xdp_load_bytes so
    // the verifier never has to track a variable packet offset.
    #[inline(always)]
    fn udp_dport(&self, l4: usize, plain: bool) -> Option<u16> {
        let (start, end) = (self.0.data(), self.0.data_end());
        if plain {
            ptr_at::<UdpHdr>(start, end, PLAIN_L4).map(|u| be16(unsafe { &(*u).dport }))
        } else {
            load::<UdpHdr>(&self.0, l4).map(|u| be16(&u.dport))
        }
    }

    #[inline(always)]
    fn overlay(&self, vx_off: usize, plain: bool) -> Option<Overlay> {
        let (start, end) = (self.0.data(), self.0.data_end());
        if plain {
            // SAFETY: bounds checked by ptr_at; Overlay is plain bytes (align 1).
            ptr_at::<Overlay>(start, end, PLAIN_VX).map(|p| unsafe { core::ptr::read(p) })
        } else {
            load::<Overlay>(&self.0, vx_off)
        }
    }

    #[inline(always)]
    fn gso(&self) -> bool {
        // XDP runs before any aggregation.
        false
    }

    #[inline(always)]
    fn gso_to_stack(&self, _cfg: &NodeConfig, _inner: &Ipv4Hdr, _inner_ip_off: usize) {}

    /// The inner frame enters the stack on the underlay: it gets the outer
    /// MACs so the kernel sees a frame for this host, not for flannel.1,
    /// then the head moves past the outer headers.
    #[inline(always)]
    fn strip(&self, inner_off: usize, plain: bool) -> bool {
        let (start, end) = (self.0.data(), self.0.data_end());
        let Some(eth) = ptr_at::<EthHdr>(start, end, 0) else {
            return false;
        };
        let eth = unsafe { &*eth };
        let mut macs = [0u8; 12];
        macs[0..6].copy_from_slice(&eth.dst);
        macs[6..12].copy_from_slice(&eth.src);
        write_inner_macs(&self.0, start, end, inner_off, plain, &mut macs)
            && unsafe { bpf_xdp_adjust_head(self.0.ctx, inner_off as i32) } == 0
    }

    #[inline(always)]
    fn deliver(&self, _cfg: &NodeConfig, _inner_len: u32) -> u32 {
        XDP_PASS
    }

    #[inline(always)]
    fn gso_to_stack6(&self, _cfg: &NodeConfig) {}

    #[inline(always)]
    fn deliver6(&self, _cfg: &NodeConfig, _inner_len: u32) -> u32 {
        XDP_PASS
    }
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
        unsafe {
            bpf_xdp_store_bytes(ctx.ctx, inner_off as u32, macs.as_mut_ptr() as *mut _, 12) == 0
        }
    }
}
