//! The direct path out (TCX ingress of the pod bridge, cni0): a local pod's
//! packet to a remote pod is encapsulated where it first meets the host and
//! redirected to the underlay — no IP receive, routing, netfilter FORWARD,
//! neighbour or flannel.1 pass. The ROUTE map (one lookup) replaces the
//! kernel's route and neighbour. Everything else goes on into the host stack
//! as before: traffic to Services (kube-proxy NAT), the host, the outside,
//! flows the stack already carries, and packets the stack must handle.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use flannel_ebpf_common::{Counter, NAT_MARK, NodeConfig, RouteValue, in_prefix};

use crate::{
    flows::{self, Side, icmp_error},
    maps::{config, count, direct_path, on_stack, route_lookup},
    packet::{
        ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPV4_VER_IHL, Ipv4Hdr, PACKET_HOST, be16, skb_read,
    },
    tunnel::{self, Peer},
};

/// A source one of our pods may use: in our subnet, but neither its network
/// address (flannel.1's, `<subnet>.0`) nor the first host address (cni0's,
/// the gateway the CNI bridge plugin takes): the stack drops a packet from
/// its own address as martian; the direct path must not let a pod pose as
/// its node.
#[inline(always)]
fn pod_source(cfg: &NodeConfig, saddr: [u8; 4]) -> bool {
    in_prefix(saddr, cfg.subnet, cfg.subnet_mask)
        && u32::from_be_bytes(saddr).wrapping_sub(u32::from_be_bytes(cfg.subnet)) > 1
}

#[classifier]
pub fn flannel_pod_egress(ctx: TcContext) -> i32 {
    match config() {
        Some(cfg) if direct_path(cfg) => pod_egress(&ctx, cfg),
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn pod_egress(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let Some(eth) = skb_read::<EthHdr>(ctx, 0) else {
        return TC_ACT_OK;
    };
    // Only unicast IP addressed to the host (the pods' gateway MAC) is
    // routed by the host; a frame cni0 sees only because it is promiscuous
    // (tcpdump) is not the host's to forward.
    let skb = unsafe { &*ctx.skb.skb };
    if eth.dst[0] & 1 != 0 || skb.pkt_type != PACKET_HOST {
        return TC_ACT_OK;
    }
    // Each family a subprogram: their stack frames could not be one.
    match be16(&eth.proto) {
        ETH_P_IPV4 => pod_egress4(ctx, cfg),
        ETH_P_IPV6 => crate::direct6::egress6(ctx, cfg),
        _ => TC_ACT_OK,
    }
}

#[inline(never)]
fn pod_egress4(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let Some(ip) = skb_read::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return TC_ACT_OK;
    };
    let skb = unsafe { &*ctx.skb.skb };
    let Some(RouteValue {
        vtep_mac,
        node_ip,
        peer_slot,
        ..
    }) = route_lookup(ip.daddr)
    else {
        return TC_ACT_OK;
    };
    let len = ctx.len();
    // A Service's packet DNAT'd by br_netfilter already (the agent's
    // nftables rule marks NAT'd connections): the stack's.
    if skb.mark & NAT_MARK != 0 {
        count(Counter::TxDirectStackFlow, len);
        return TC_ACT_OK;
    }
    // What forwarding would do more than pass the packet on: ICMP errors,
    // fragmenting, options, a source that is not one of our pods (the
    // remote node would drop it as spoofed; the stack says so first).
    // A length the IP layer would refuse (longer than the frame) stays its
    // to judge; so does a GSO packet whose segments (payload + IPv4 + TCP,
    // 40 bytes at least) would not fit flannel.1's MTU: the stack answers
    // with ICMP "fragmentation needed", which path MTU discovery relies on.
    let tot_len = be16(&ip.tot_len) as u32;
    let fits = if skb.gso_size != 0 {
        skb.gso_size + 40 <= cfg.vtep_mtu
    } else {
        tot_len <= cfg.vtep_mtu && tot_len + ETH_LEN as u32 <= len
    };
    if ip.ver_ihl != IPV4_VER_IHL
        || ip.is_fragment()
        || ip.ttl <= 1
        || !fits
        || !pod_source(cfg, ip.saddr)
        || icmp_error(ctx, &ip)
    {
        count(Counter::TxDirectUnfit, len);
        return TC_ACT_OK;
    }
    if on_stack(&flows::key(ctx, &ip, Side::Out)) {
        count(Counter::TxDirectStackFlow, len);
        return TC_ACT_OK;
    }
    let peer = Peer {
        vtep_mac,
        node_ip,
        slot: peer_slot,
    };
    match tunnel::encapsulate(ctx, cfg, &peer, &ip, true) {
        Ok(action) => {
            count(Counter::TxDirect, len);
            action
        }
        Err(reason) => {
            // Unchanged: the stack routes it to flannel.1, where it is
            // encapsulated (or the kernel device tries) as without the direct path.
            count(reason, len);
            count(Counter::TxDirectUnfit, len);
            TC_ACT_OK
        }
    }
}
