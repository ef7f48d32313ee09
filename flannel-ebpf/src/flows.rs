//! The direct path's one rule for conntrack: a flow the host stack carries
//! (kube-proxy's NAT, a packet the direct path declined) keeps to the stack
//! in both directions, and one it never saw stays out of it in both, so no
//! packet reaches conntrack without the rest of its flow (kube-proxy drops
//! INVALID). Every overlay packet the stack handles passes one of our
//! programs, which note its flow in STACK_FLOWS; the direct path looks there.
use aya_ebpf::programs::TcContext;
use flannel_ebpf_common::FlowKey;

use crate::packet::{ETH_LEN, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, Ipv4Hdr, Ports};

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

const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO: u8 = 8;
