//! The direct path's one rule for conntrack: a flow the host stack carries
//! (kube-proxy's NAT, a packet the direct path declined) keeps to the stack
//! in both directions, and one it never saw stays out of it in both, so no
//! packet reaches conntrack without the rest of its flow (kube-proxy drops
//! INVALID). Every overlay packet the stack handles passes one of our
//! programs, which note its flow in STACK_FLOWS; the direct path looks there.
use aya_ebpf::programs::TcContext;
use flannel_ebpf_common::{FlowKey, FlowKey6};

use crate::packet::{ETH_LEN, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, Ipv6Hdr, Ports};

/// Which end of `ip` is on this node.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Leaving: the source is local.
    Out,
    /// Arriving: the destination is local.
    In,
}

/// The flow of the IPv4 packet after the Ethernet header, from this node's
/// side. Ports come from the TCP/UDP header (0 for a later fragment or
/// another protocol).
#[inline(always)]
pub fn key(ctx: &TcContext, ip: &Ipv4Hdr, side: Side) -> FlowKey {
    key_at(ctx, ip, ETH_LEN, side)
}

/// [`key`] of an IPv4 header (copied to `ip`) at `ip_off` in the packet.
#[inline(always)]
pub fn key_at(ctx: &TcContext, ip: &Ipv4Hdr, ip_off: usize, side: Side) -> FlowKey {
    let ports = if (ip.proto == IPPROTO_TCP || ip.proto == IPPROTO_UDP)
        && crate::packet::be16(&ip.frag_off) & 0x1fff == 0
    {
        crate::packet::skb_read::<Ports>(ctx, l4_offset(ip, ip_off) & 0xff)
    } else {
        None
    };
    let (sp, dp) = ports.map_or(([0; 2], [0; 2]), |p| (p.src, p.dst));
    match side {
        Side::Out => FlowKey {
            local: ip.saddr,
            remote: ip.daddr,
            local_port: sp,
            remote_port: dp,
            proto: ip.proto,
            _pad: [0; 3],
        },
        Side::In => FlowKey {
            local: ip.daddr,
            remote: ip.saddr,
            local_port: dp,
            remote_port: sp,
            proto: ip.proto,
            _pad: [0; 3],
        },
    }
}

/// Where the header after the IPv4 header `ip` (at `ip_off`) starts.
#[inline(always)]
fn l4_offset(ip: &Ipv4Hdr, ip_off: usize) -> usize {
    let ihl = (ip.ver_ihl & 0x0f) as usize * 4;
    // Constant offset in the common case keeps the verifier's view simple.
    if ihl == IPV4_LEN {
        ip_off + IPV4_LEN
    } else {
        ip_off + (ihl & 0x3c)
    }
}

/// An ICMP error (not an echo or echo reply): it quotes a flow conntrack may
/// have NAT'd, and only the stack rewrites the quoted header, so it always
/// takes the stack.
#[inline(always)]
pub fn icmp_error(ctx: &TcContext, ip: &Ipv4Hdr) -> bool {
    if ip.proto != IPPROTO_ICMP {
        return false;
    }
    let at = l4_offset(ip, ETH_LEN);
    // Type and code (two bytes: a one-byte bounds check is one the verifier
    // cannot follow). Unreadable: not ours to judge either.
    crate::packet::skb_read::<[u8; 2]>(ctx, at)
        .is_none_or(|[t, _]| t != ICMP_ECHO_REPLY && t != ICMP_ECHO)
}

/// The flow of the IPv6 packet whose header is at `ip6_off`, from this
/// node's side. None: unreadable.
#[inline(always)]
pub fn key6_at(ctx: &TcContext, ip6_off: usize, side: Side) -> Option<FlowKey6> {
    let ip6 = crate::packet::skb_read::<Ipv6Hdr>(ctx, ip6_off)?;
    Some(key6(ctx, &ip6, ip6_off, side))
}

/// [`key6_at`] of an IPv6 header (copied to `ip6`). Ports come from a
/// TCP/UDP header right behind it, or behind a fragment header for a first
/// fragment, which is keyed by the protocol it carries like IPv4's (0 for a
/// later fragment, behind other extension headers or for another protocol).
#[inline(always)]
pub fn key6(ctx: &TcContext, ip6: &Ipv6Hdr, ip6_off: usize, side: Side) -> FlowKey6 {
    let (proto, l4_off) = if ip6.next_header == IPPROTO_FRAGMENT {
        match crate::packet::skb_read::<[u8; 4]>(ctx, ip6_off + 40) {
            // Fragment offset in the upper 13 bits of bytes 2-3.
            Some([nh, _, hi, lo]) if (u16::from_be_bytes([hi, lo]) & 0xfff8) == 0 => {
                (nh, Some(ip6_off + 48))
            }
            Some([nh, ..]) => (nh, None),
            None => (IPPROTO_FRAGMENT, None),
        }
    } else {
        (ip6.next_header, Some(ip6_off + 40))
    };
    let ports = match l4_off {
        Some(at) if proto == IPPROTO_TCP || proto == IPPROTO_UDP => {
            crate::packet::skb_read::<Ports>(ctx, at)
        }
        _ => None,
    };
    let (sp, dp) = ports.map_or(([0; 2], [0; 2]), |p| (p.src, p.dst));
    match side {
        Side::Out => FlowKey6 {
            local: ip6.saddr,
            remote: ip6.daddr,
            local_port: sp,
            remote_port: dp,
            proto,
            _pad: [0; 3],
        },
        Side::In => FlowKey6 {
            local: ip6.daddr,
            remote: ip6.saddr,
            local_port: dp,
            remote_port: sp,
            proto,
            _pad: [0; 3],
        },
    }
}

/// An ICMPv6 error (types below 128) right behind the IPv6 header at
/// `ip6_off`: like ICMP's, the stack's to carry. Unreadable: the stack's too.
#[inline(always)]
pub fn icmp6_error(ctx: &TcContext, ip6_off: usize, next_header: u8) -> bool {
    next_header == IPPROTO_ICMPV6
        && crate::packet::skb_read::<[u8; 2]>(ctx, ip6_off + 40).is_none_or(|[t, _]| t < 128)
}

const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
