//! The checks a VXLAN frame for this node must pass, whichever hook sees it
//! first on the underlay (XDP, or TC ingress where XDP would cost more).
use aya_ebpf::{EbpfContext, helpers::generated::bpf_ktime_get_coarse_ns};
use aya_log_ebpf::debug;
use flannel_ebpf_common::{Counter, NodeConfig};

use crate::{
    maps::{count, fdb_lookup, peer},
    packet::{
        ETH_LEN, ETH_P_IPV4, EthHdr, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, UDP_LEN, VxlanHdr, be16,
    },
};

/// What the outer IPv4 header says about a frame.
enum Outer {
    /// Not UDP to our public IP: not ours to judge.
    Other,
    /// Garbled version, IHL or length: the kernel's IP layer judges it.
    Malformed,
    /// A fragment: only the kernel can reassemble; its VXLAN device decaps.
    Fragment,
    /// Unfragmented UDP to our public IP, the UDP header `ihl` bytes in.
    Udp { ihl: usize },
}

/// Where the UDP header starts when `ip` is an unfragmented UDP packet to
/// our public IP; None (the frame passes) otherwise, garbled headers and
/// fragments counted.
#[inline(always)]
pub fn udp_offset(ip: &Ipv4Hdr, cfg: &NodeConfig, frame_len: u32) -> Option<usize> {
    match outer(ip, cfg) {
        Outer::Udp { ihl } => Some(ETH_LEN + ihl),
        Outer::Other => None,
        Outer::Malformed => {
            count(Counter::RxPassMalformed, frame_len);
            None
        }
        Outer::Fragment => {
            count(Counter::RxPassFragment, frame_len);
            None
        }
    }
}

#[inline(always)]
fn outer(ip: &Ipv4Hdr, cfg: &NodeConfig) -> Outer {
    if ip.proto != IPPROTO_UDP {
        return Outer::Other;
    }
    let ihl = (ip.ver_ihl & 0x0f) as usize * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < IPV4_LEN || (be16(&ip.tot_len) as usize) < ihl + UDP_LEN {
        return Outer::Malformed;
    }
    if ip.daddr != cfg.public_ip {
        return Outer::Other;
    }
    if ip.is_fragment() {
        return Outer::Fragment;
    }
    Outer::Udp { ihl }
}

/// VXLAN header and inner Ethernet header, read together.
#[repr(C)]
pub struct Overlay {
    pub vx: VxlanHdr,
    pub inner: EthHdr,
}

/// The verdict on a frame to our VXLAN port.
pub enum Verdict {
    /// A member's IPv4 frame for our VTEP: strip the outer headers.
    Decap { slot: u32 },
    /// Fails a check: drop it (counted).
    Drop,
    /// A member's non-IPv4 frame: the kernel's VXLAN device gets it (counted).
    Pass,
}

/// VNI, flags, membership (the inner source is a VtepMAC known for exactly
/// this outer source; the kernel's VXLAN accepts anyone) and inner
/// destination. Drops and passes are counted here.
#[inline(always)]
pub fn overlay<C: EbpfContext>(
    ctx: &C,
    ov: &Overlay,
    saddr: [u8; 4],
    frame_len: u32,
    cfg: &NodeConfig,
) -> Verdict {
    let (vx, inner) = (&ov.vx, &ov.inner);
    // Diagnostics only at debug level: the verifier prunes them otherwise.
    if !vx.flags_valid() {
        debug!(ctx, "decap: drop, VXLAN flags {:x} from {:i}", vx.flags, saddr);
        count(Counter::RxDropBadFlags, frame_len);
        return Verdict::Drop;
    }
    if vx.vni() != cfg.vni {
        debug!(ctx, "decap: drop, VNI {} from {:i}", vx.vni(), saddr);
        count(Counter::RxDropBadVni, frame_len);
        return Verdict::Drop;
    }
    let slot = match fdb_lookup(inner.src) {
        Some((node_ip, slot)) if node_ip == saddr => slot,
        _ => {
            debug!(ctx, "decap: drop, non-member {:i} (inner source {:mac})", saddr, inner.src);
            count(Counter::RxDropNonMember, frame_len);
            return Verdict::Drop;
        }
    };
    if inner.dst != cfg.vtep_mac {
        count(Counter::RxDropBadInnerDst, frame_len);
        if let Some(p) = peer(slot) {
            p.rx_drops += 1;
        }
        return Verdict::Drop;
    }
    if be16(&inner.proto) != ETH_P_IPV4 {
        count(Counter::RxPassInnerNotIpv4, frame_len);
        return Verdict::Pass;
    }
    Verdict::Decap { slot }
}

/// Count a decapsulated frame, for the node and for its peer.
#[inline(always)]
pub fn delivered(slot: u32, inner_len: u32) {
    count(Counter::RxDecap, inner_len);
    from_peer(slot, inner_len);
}

/// Count what a member sent us, whoever strips the outer headers.
#[inline(always)]
pub fn from_peer(slot: u32, inner_len: u32) {
    if let Some(p) = peer(slot) {
        p.rx_packets += 1;
        p.rx_bytes += inner_len as u64;
        // The coarse clock is a plain read; "last seen" needs no better.
        p.last_rx_ns = unsafe { bpf_ktime_get_coarse_ns() };
    }
}
