//! VXLAN over IPv6 from the underlay (dual-stack nodes): the same checks as
//! IPv4's — VNI, flags, membership by the inner source VtepMAC and outer
//! source, inner destination, inner source within the member's IPv6 subnet —
//! then decapsulated here, like IPv4: the inner packet enters the stack on
//! the underlay, or (TC, the direct path) goes to its pod. Left to the kernel's flannel-v6 device (checked all the
//! same): GSO aggregates (TC), neighbour discovery and link-local or
//! multicast inner destinations, which belong to flannel-v6 itself. The
//! nftables guard's ip6 table judges what hides behind extension headers.
use flannel_ebpf_common::{Counter, NODE_NATIVE_POD_SOURCES, NodeConfig};

use crate::{
    maps::{config6, count, fdb6_lookup},
    packet::{ETH_P_IPV6, EthHdr, IPPROTO_UDP, VxlanHdr, be16},
    rx::{self, Hook},
};

// Offsets from the outer IPv6 header, and from the UDP header (`l4`); each
// field is read on its own, when needed: whole headers copied out would not
// fit the BPF stack.
const NEXT_HEADER: usize = 6;
const SADDR: usize = 8;
const DADDR: usize = 24;
const UDP_DPORT: usize = 2;
const VXLAN: usize = 8;
const INNER_ETH: usize = VXLAN + 8;
const INNER_IP6: usize = INNER_ETH + 14;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_FRAGMENT: u8 = 44;

/// IPv6 extension headers a packet to our VXLAN port could hide behind.
#[inline(always)]
fn extension(next: u8) -> bool {
    matches!(next, 0 | 43 | 44 | 60)
}

/// The two 64-bit halves of an IPv6 address (the BPF target has no
/// 128-bit shifts).
#[inline(always)]
fn halves(b: &[u8; 16]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&b[..8]);
    lo.copy_from_slice(&b[8..]);
    (u64::from_be_bytes(hi), u64::from_be_bytes(lo))
}

/// The masks of a `len`-bit prefix over the two halves.
#[inline(always)]
fn masks(len: u8) -> (u64, u64) {
    let len = if len > 128 { 128 } else { len as u32 };
    let mask = |bits: u32| match bits {
        0 => 0,
        64.. => u64::MAX,
        b => u64::MAX << (64 - b),
    };
    (mask(len.min(64)), mask(len.saturating_sub(64)))
}

/// Whether `a` is inside `net`/`len`.
#[inline(always)]
pub fn in_prefix6(a: &[u8; 16], net: &[u8; 16], len: u8) -> bool {
    let ((a0, a1), (n0, n1), (m0, m1)) = (halves(a), halves(net), masks(len));
    (a0 ^ n0) & m0 == 0 && (a1 ^ n1) & m1 == 0
}

/// The network address of the `len`-bit prefix holding `a`.
#[inline(always)]
pub fn prefix6(a: &[u8; 16], len: u8) -> [u8; 16] {
    let ((a0, a1), (m0, m1)) = (halves(a), masks(len));
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&(a0 & m0).to_be_bytes());
    out[8..].copy_from_slice(&(a1 & m1).to_be_bytes());
    out
}

/// [`receive6`]'s verdicts, one word (a subprogram returns one register):
/// pass, drop, or deliver the stripped frame of `n - DELIVER` inner bytes.
pub const PASS: u32 = 0;
pub const DROP: u32 = 1;
pub const DELIVER: u32 = 2;

/// An IPv6 frame from the underlay, `l2` bytes of link header in front.
/// A subprogram of its own: its headers need stack the IPv4 path's
/// frame cannot share with them. The delivery of what it decapsulates is
/// its caller's (the direct path's frame would not fit on top of this one).
#[inline(never)]
pub fn receive6<H: Hook>(h: &H, cfg: &NodeConfig, l2: usize, frame_len: u32) -> u32 {
    // Not a dual-stack node (or not filled yet): the kernel judges.
    let Some(cfg6) = config6() else {
        return PASS;
    };
    // Too short for an IPv6 header: the IP layer judges it.
    let (Some(daddr), Some(saddr), Some(next)) = (
        h.read::<[u8; 16]>(l2 + DADDR),
        h.read::<[u8; 16]>(l2 + SADDR),
        h.read::<[u8; 2]>(l2 + NEXT_HEADER),
    ) else {
        return PASS;
    };
    // Pods of other nodes reach ours only through the overlay, as for IPv4:
    // a plain packet from the underlay with an IPv6 pod source is spoofed.
    if cfg.flags & NODE_NATIVE_POD_SOURCES == 0
        && cfg6.network6_len != 0
        && in_prefix6(&saddr, &cfg6.network6, cfg6.network6_len)
    {
        count(Counter::RxDropPodSourceOnUnderlay, frame_len);
        return DROP;
    }
    if daddr != cfg6.public_ip6 {
        return PASS;
    }
    // VXLAN behind one extension header (a fragment header, options) gets
    // the same checks; what it carries is then the kernel's to reassemble or
    // parse (never stripped here). A chain of them to our VXLAN port is not
    // what any VTEP sends: dropped.
    let mut l4 = l2 + 40;
    let mut behind_ext = false;
    let mut proto = next[0];
    if extension(proto) {
        let Some(ext) = h.read::<[u8; 4]>(l4) else {
            return PASS;
        };
        if proto == IPPROTO_FRAGMENT && u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
            // A later fragment: useless without the first, which is checked.
            count(Counter::RxPassIpv6ExtHeaders, frame_len);
            return PASS;
        }
        let len = if proto == IPPROTO_FRAGMENT {
            8
        } else {
            (ext[1] as usize + 1) * 8
        };
        proto = ext[0];
        l4 += len;
        behind_ext = true;
        if extension(proto) {
            count(Counter::RxDropIpv6ExtChain, frame_len);
            return DROP;
        }
    }
    if proto != IPPROTO_UDP {
        if behind_ext {
            count(Counter::RxPassIpv6ExtHeaders, frame_len);
        }
        return PASS;
    }
    match h.read::<[u8; 2]>(l4 + UDP_DPORT) {
        Some(p) if be16(&p) == cfg.port => {}
        _ => return PASS,
    }
    // From here on the frame claims to be ours: checked, passed or dropped.
    // The headers read must lie within the IPv6 payload: beyond it is
    // padding the kernel trims (a first fragment's would be replaced by the
    // next fragment's bytes on reassembly).
    let within = h
        .read::<[u8; 2]>(l2 + 4)
        .is_some_and(|p| l2 + 40 + be16(&p) as usize >= l4 + INNER_IP6 + 40);
    if !within {
        count(
            if behind_ext {
                Counter::RxDropTinyFragment
            } else {
                Counter::RxDropTruncated
            },
            frame_len,
        );
        return DROP;
    }
    let (Some(vx), Some(inner), Some(inner_next), Some(inner_src), Some(inner_dst)) = (
        h.read::<VxlanHdr>(l4 + VXLAN),
        h.read::<EthHdr>(l4 + INNER_ETH),
        h.read::<[u8; 2]>(l4 + INNER_IP6 + NEXT_HEADER),
        h.read::<[u8; 16]>(l4 + INNER_IP6 + SADDR),
        h.read::<[u8; 16]>(l4 + INNER_IP6 + DADDR),
    ) else {
        count(Counter::RxDropTruncated, frame_len);
        return DROP;
    };
    if !vx.flags_valid() {
        count(Counter::RxDropBadFlags, frame_len);
        return DROP;
    }
    if vx.vni() != cfg.vni {
        count(Counter::RxDropBadVni, frame_len);
        return DROP;
    }
    let member = match fdb6_lookup(inner.src) {
        Some(v) if v.node_ip6 == saddr => v,
        _ => {
            count(Counter::RxDropNonMember, frame_len);
            return DROP;
        }
    };
    let slot = member.peer_slot;
    if inner.dst != cfg6.vtep_mac6 {
        rx::member_drop(Counter::RxDropBadInnerDst, slot, frame_len);
        return DROP;
    }
    if be16(&inner.proto) != ETH_P_IPV6 {
        // flannel-v6 carries IPv6 only; anything else would be routed past these checks.
        rx::member_drop(Counter::RxDropInnerNotIpv4, slot, frame_len);
        return DROP;
    }
    // Nothing but TCP and ICMPv6 to our own address through the overlay (that
    // route is the underlay's): UDP there, or anything behind extension
    // headers, may be VXLAN in VXLAN.
    if inner_dst == cfg6.public_ip6 && !matches!(inner_next[0], IPPROTO_TCP | IPPROTO_ICMPV6) {
        rx::member_drop(Counter::RxDropNested, slot, frame_len);
        return DROP;
    }
    if cfg6.network6_len != 0
        && in_prefix6(&inner_src, &cfg6.network6, cfg6.network6_len)
        && !in_prefix6(&inner_src, &member.subnet6, member.subnet6_len)
    {
        rx::member_drop(Counter::RxDropSpoofedInner, slot, frame_len);
        return DROP;
    }
    let inner_off = l4 + INNER_ETH;
    let inner_len = frame_len.saturating_sub(inner_off as u32);
    if behind_ext {
        count(Counter::RxPassIpv6ExtHeaders, frame_len);
        rx::from_peer(slot, inner_len);
        return PASS;
    }
    if !for_a_pod(&inner_dst) || neighbour_discovery(h, l4, inner_next[0]) {
        count(Counter::RxPassIpv6Member, frame_len);
        rx::from_peer(slot, inner_len);
        return PASS;
    }
    if h.gso() {
        count(Counter::RxPassGso, frame_len);
        rx::from_peer(slot, inner_len);
        h.gso_to_stack6(cfg);
        return PASS;
    }
    // The outer IPv6, UDP and VXLAN headers go; the ethertype stays IPv6.
    if !h.strip(inner_off, false) {
        count(Counter::RxDropAdjust, frame_len);
        return DROP;
    }
    rx::delivered(slot, inner_len);
    DELIVER + inner_len
}

/// Not link-local (fe80::/10) and not multicast (ff00::/8): an address the
/// stack can forward to a pod.
#[inline(always)]
fn for_a_pod(dst: &[u8; 16]) -> bool {
    dst[0] != 0xff && !(dst[0] == 0xfe && dst[1] & 0xc0 == 0x80)
}

/// Router/neighbour solicitations and advertisements, redirects (ICMPv6
/// 133–137): flannel-v6's own business, not to be forwarded.
#[inline(always)]
fn neighbour_discovery<H: Hook>(h: &H, l4: usize, inner_next: u8) -> bool {
    if inner_next != IPPROTO_ICMPV6 {
        return false;
    }
    match h.read::<[u8; 2]>(l4 + INNER_IP6 + 40) {
        Some(t) => (133..=137).contains(&t[0]),
        // Too short for an ICMPv6 type: the kernel's device judges it.
        None => true,
    }
}
