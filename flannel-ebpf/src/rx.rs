//! The checks a frame from the underlay must pass, whichever hook sees it
//! first (XDP, or TC ingress where XDP would cost more). Every verdict a
//! check gives is counted here, once.
use aya_ebpf::{EbpfContext, helpers::generated::bpf_ktime_get_coarse_ns};
use aya_log_ebpf::debug;
use flannel_ebpf_common::{Counter, NODE_NATIVE_POD_SOURCES, NodeConfig, in_prefix};

use crate::{
    maps::{count, fdb_lookup, peer},
    packet::{
        ETH_LEN, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr,
        UDP_LEN, VxlanHdr, be16,
    },
};

/// What the outer IPv4 header says about a frame.
pub enum Outer {
    /// Not UDP to our public IP, a garbled header (the kernel's IP layer
    /// judges it), or a later fragment: passes untouched.
    Pass,
    /// A pod source on the underlay: dropped (counted).
    Drop,
    /// UDP to our public IP, the UDP header `ihl` bytes into the IP header;
    /// `first_fragment`: more fragments follow, so only the checks apply;
    /// `ip_len`: the IPv4 total length.
    Udp {
        ihl: usize,
        first_fragment: bool,
        ip_len: usize,
    },
}

/// Classify the outer IPv4 header of a frame from the underlay.
#[inline(always)]
pub fn outer(ip: &Ipv4Hdr, cfg: &NodeConfig, frame_len: u32) -> Outer {
    // Pods of other nodes reach ours only through the overlay: a plain
    // packet from the underlay with a pod source is spoofed (this is what a
    // strict rp_filter would have caught; decapsulated packets never pass
    // this hook again). A zero mask means no Network was configured.
    if cfg.flags & NODE_NATIVE_POD_SOURCES == 0
        && cfg.network_mask != [0; 4]
        && in_prefix(ip.saddr, cfg.network, cfg.network_mask)
    {
        count(Counter::RxDropPodSourceOnUnderlay, frame_len);
        return Outer::Drop;
    }
    if ip.proto != IPPROTO_UDP {
        return Outer::Pass;
    }
    let ihl = (ip.ver_ihl & 0x0f) as usize * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < IPV4_LEN || (be16(&ip.tot_len) as usize) < ihl + UDP_LEN {
        count(Counter::RxPassMalformed, frame_len);
        return Outer::Pass;
    }
    if ip.daddr != cfg.public_ip {
        return Outer::Pass;
    }
    let frag = be16(&ip.frag_off);
    if frag & 0x1fff != 0 {
        // A later fragment: useless to the kernel without the first one,
        // which gets every check below.
        count(Counter::RxPassFragment, frame_len);
        return Outer::Pass;
    }
    Outer::Udp {
        ihl,
        first_fragment: frag & 0x2000 != 0,
        ip_len: be16(&ip.tot_len) as usize,
    }
}

/// VXLAN header, inner Ethernet header and inner IPv4 header, read together.
#[repr(C)]
pub struct Overlay {
    pub vx: VxlanHdr,
    pub inner: EthHdr,
    pub inner_ip: Ipv4Hdr,
}

/// Bytes from the VXLAN header to the end of the inner IPv4 header.
pub const OVERLAY_LEN: usize = core::mem::size_of::<Overlay>();

/// The verdict on a frame to our VXLAN port.
pub enum Verdict {
    /// A member's IPv4 frame for our VTEP: strip the outer headers.
    Decap { slot: u32 },
    /// Fails a check: drop it (counted).
    Drop,
    /// Passes every check but is not ours to strip (a member's non-IPv4
    /// frame, a first fragment): the kernel's VXLAN device gets it (counted).
    Pass,
}

/// A frame to our port too short for the headers the checks read.
#[inline(always)]
fn truncated(first_fragment: bool, frame_len: u32) -> Verdict {
    count(
        if first_fragment {
            Counter::RxDropTinyFragment
        } else {
            Counter::RxDropTruncated
        },
        frame_len,
    );
    Verdict::Drop
}

/// The verdict on a frame to our port: its headers' length, then VNI, flags, membership (the inner source is a VtepMAC known for exactly
/// this outer source; the kernel's VXLAN accepts anyone), inner destination,
/// and the inner source (inside the cluster Network only the member's own
/// subnet). Drops and passes are counted here.
#[inline(always)]
pub fn overlay<C: EbpfContext>(
    ctx: &C,
    ov: Option<&Overlay>,
    saddr: [u8; 4],
    frame_len: u32,
    first_fragment: bool,
    cfg: &NodeConfig,
) -> Verdict {
    // None: the frame is too short for the headers read here.
    let Some(ov) = ov else {
        return truncated(first_fragment, frame_len);
    };
    let (vx, inner) = (&ov.vx, &ov.inner);
    // Diagnostics only at debug level: the verifier prunes them otherwise.
    if !vx.flags_valid() {
        debug!(
            ctx,
            "decap: drop, VXLAN flags {:x} from {:i}", vx.flags, saddr
        );
        count(Counter::RxDropBadFlags, frame_len);
        return Verdict::Drop;
    }
    if vx.vni() != cfg.vni {
        debug!(ctx, "decap: drop, VNI {} from {:i}", vx.vni(), saddr);
        count(Counter::RxDropBadVni, frame_len);
        return Verdict::Drop;
    }
    let member = match fdb_lookup(inner.src) {
        Some(v) if v.node_ip == saddr => v,
        _ => {
            debug!(
                ctx,
                "decap: drop, non-member {:i} (inner source {:mac})", saddr, inner.src
            );
            count(Counter::RxDropNonMember, frame_len);
            return Verdict::Drop;
        }
    };
    let slot = member.peer_slot;
    if inner.dst != cfg.vtep_mac {
        return member_drop(Counter::RxDropBadInnerDst, slot, frame_len);
    }
    match be16(&inner.proto) {
        ETH_P_IPV4 => {}
        ETH_P_ARP => {
            count(Counter::RxPassInnerNotIpv4, frame_len);
            return Verdict::Pass;
        }
        // Anything else (an 802.1Q-tagged IPv4 packet, IPv6) the kernel's
        // device would route past every check below.
        _ => return member_drop(Counter::RxDropInnerNotIpv4, slot, frame_len),
    }
    if ov.inner_ip.proto == IPPROTO_UDP && ov.inner_ip.daddr == cfg.public_ip {
        // No pod talks to our node's address through the overlay (that
        // route is the underlay's); UDP there is VXLAN in VXLAN.
        return member_drop(Counter::RxDropNested, slot, frame_len);
    }
    let src = ov.inner_ip.saddr;
    if cfg.network_mask != [0; 4]
        && in_prefix(src, cfg.network, cfg.network_mask)
        && !in_prefix(src, member.subnet, member.subnet_mask)
    {
        debug!(ctx, "decap: drop, {:i} sent a packet from {:i}", saddr, src);
        return member_drop(Counter::RxDropSpoofedInner, slot, frame_len);
    }
    if first_fragment {
        // Checked whole; only the kernel can reassemble it.
        count(Counter::RxPassFragment, frame_len);
        return Verdict::Pass;
    }
    Verdict::Decap { slot }
}

/// A member's frame that fails a check: counted for the node and the peer.
#[inline(always)]
pub fn member_drop(c: Counter, slot: u32, frame_len: u32) -> Verdict {
    count(c, frame_len);
    if let Some(p) = peer(slot) {
        p.rx_drops += 1;
    }
    Verdict::Drop
}

/// Offset of the inner Ethernet header for a UDP header at `l4`.
#[inline(always)]
pub const fn inner_offset(l4: usize) -> usize {
    l4 + UDP_LEN + core::mem::size_of::<VxlanHdr>()
}

/// Whether the frame reaches the end of the inner IPv4 header. A first
/// fragment must hold it within its IPv4 length too: the kernel trims what
/// lies beyond before reassembling, so headers read from padding would not
/// be the ones the next fragment brings.
#[inline(always)]
pub fn holds_overlay(
    l2: usize,
    l4: usize,
    frame_len: u32,
    first_fragment: bool,
    ip_len: usize,
) -> bool {
    let need = l4 + UDP_LEN + OVERLAY_LEN;
    frame_len as usize >= need && (!first_fragment || l2 + ip_len >= need)
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

/// Ethernet header length in front of the IP header and the IP version's
/// ethertype, with an 802.1Q priority tag (VLAN 0) allowed; None when the
/// frame is neither IPv4 nor IPv6 (or is a real VLAN's, which is not ours to
/// judge).
#[inline(always)]
pub fn l2_len(proto: u16, tag: Option<[u8; 4]>) -> Option<(usize, u16)> {
    match proto {
        ETH_P_IPV4 | ETH_P_IPV6 => Some((ETH_LEN, proto)),
        ETH_P_8021Q => {
            let t = tag?;
            let vid = u16::from_be_bytes([t[0], t[1]]) & 0x0fff;
            let inner = u16::from_be_bytes([t[2], t[3]]);
            (vid == 0 && (inner == ETH_P_IPV4 || inner == ETH_P_IPV6))
                .then_some((ETH_LEN + 4, inner))
        }
        _ => None,
    }
}

pub const ETH_P_8021Q: u16 = 0x8100;

/// What a hook found in front of the outer IPv4 header.
pub enum Link {
    /// Not an (untagged or priority-tagged) IPv4 frame: not ours to judge.
    NotOurs,
    /// IPv4, but too short for its header: the IP layer judges it (counted).
    Malformed,
    /// The outer IPv4 header, `l2` bytes into the frame.
    Ipv4 { l2: usize, ip: Ipv4Hdr },
    /// An untagged IPv6 frame ([`crate::rx6`] judges it).
    Ipv6 { l2: usize },
}

/// The little a decapsulating hook (XDP or TC ingress) must say for itself;
/// [`receive`] is the one body both run, and counts every verdict.
/// `plain`: an untagged frame with no IP options, whose headers sit at
/// constant offsets (XDP reads those in place).
pub trait Hook {
    type Ctx: EbpfContext;
    type Action: Copy;
    fn ctx(&self) -> &Self::Ctx;
    fn pass(&self) -> Self::Action;
    fn drop(&self) -> Self::Action;
    fn len(&self) -> u32;
    fn link(&self) -> Link;
    /// `size_of::<T>()` bytes at `off`, None past the end of the frame.
    fn read<T>(&self, off: usize) -> Option<T>;
    fn udp_dport(&self, l4: usize, plain: bool) -> Option<u16>;
    fn overlay(&self, vx_off: usize, plain: bool) -> Option<Overlay>;
    /// A GSO aggregate (TC only): checked, then left to the kernel's device.
    fn gso(&self) -> bool;
    /// The aggregate's flow is the stack's from now on (the direct path's rule).
    fn gso_to_stack(&self, cfg: &NodeConfig, inner: &Ipv4Hdr, inner_ip_off: usize);
    /// Remove everything up to the inner IPv4 header but the outer Ethernet
    /// header, which must end up in front of the inner packet.
    fn strip(&self, inner_off: usize, plain: bool) -> bool;
    /// The stripped frame's way on (TC: the direct path, else the stack).
    fn deliver(&self, cfg: &NodeConfig, inner_len: u32) -> Self::Action;
    /// [`Hook::gso_to_stack`] for a member's VXLAN over IPv6 (no outer
    /// extension headers: the inner IPv6 header right behind the outer).
    fn gso_to_stack6(&self, cfg: &NodeConfig);
    /// [`Hook::deliver`] for a stripped IPv6 frame.
    fn deliver6(&self, cfg: &NodeConfig, inner_len: u32) -> Self::Action;
}

/// A frame from the underlay, whichever hook sees it: checked, then
/// decapsulated, passed or dropped. Each family's checks are a subprogram:
/// their stack frames could not be one (the verifier allows 512 bytes).
#[inline(always)]
pub fn receive<H: Hook>(h: &H, cfg: &NodeConfig) -> H::Action {
    let frame_len = h.len();
    match h.link() {
        Link::NotOurs => h.pass(),
        Link::Malformed => {
            count(Counter::RxPassMalformed, frame_len);
            h.pass()
        }
        Link::Ipv4 { l2, ip } => receive4(h, cfg, l2, &ip, frame_len),
        Link::Ipv6 { l2 } => match crate::rx6::receive6(h, cfg, l2, frame_len) {
            crate::rx6::PASS => h.pass(),
            crate::rx6::DROP => h.drop(),
            n => h.deliver6(cfg, n - crate::rx6::DELIVER),
        },
    }
}

/// An IPv4 frame from the underlay, `l2` bytes of link header in front.
#[inline(never)]
fn receive4<H: Hook>(
    h: &H,
    cfg: &NodeConfig,
    l2: usize,
    ip: &Ipv4Hdr,
    frame_len: u32,
) -> H::Action {
    let (ihl, first_fragment, ip_len) = match outer(ip, cfg, frame_len) {
        Outer::Udp {
            ihl,
            first_fragment,
            ip_len,
        } => (ihl, first_fragment, ip_len),
        Outer::Pass => return h.pass(),
        Outer::Drop => return h.drop(),
    };
    let l4 = l2 + ihl;
    let plain = l2 == ETH_LEN && ihl == IPV4_LEN;
    let Some(dport) = h.udp_dport(l4, plain) else {
        count(Counter::RxPassMalformed, frame_len);
        return h.pass();
    };
    if dport != cfg.port {
        return h.pass();
    }
    // From here on the frame claims to be ours: it is delivered or dropped.
    let ov = if holds_overlay(l2, l4, frame_len, first_fragment, ip_len) {
        h.overlay(l4 + UDP_LEN, plain)
    } else {
        None
    };
    let slot = match overlay(
        h.ctx(),
        ov.as_ref(),
        ip.saddr,
        frame_len,
        first_fragment,
        cfg,
    ) {
        Verdict::Decap { slot } => slot,
        Verdict::Drop => return h.drop(),
        Verdict::Pass => return h.pass(),
    };
    let inner_off = inner_offset(l4);
    let inner_len = frame_len - inner_off as u32;
    if h.gso() {
        count(Counter::RxPassGso, frame_len);
        from_peer(slot, inner_len);
        if let Some(ov) = &ov {
            h.gso_to_stack(cfg, &ov.inner_ip, inner_off + ETH_LEN);
        }
        return h.pass();
    }
    if !h.strip(inner_off, plain) {
        count(Counter::RxDropAdjust, frame_len);
        return h.drop();
    }
    delivered(slot, inner_len);
    h.deliver(cfg, inner_len)
}
