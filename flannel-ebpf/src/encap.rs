//! Egress on flannel.1 (TCX): the kernel has routed the packet to flannel.1,
//! by the one route for the cluster Network or by stock Flannel's per-node
//! `via <subnet>.0 onlink` route. The remote VTEP comes from the ROUTE map by
//! the inner destination address (one lookup: VtepMAC, node IP, stats slot),
//! so the kernel needs no per-node route or neighbour; a destination in no
//! ROUTE entry falls back to the FDB by the inner destination MAC a kernel
//! neighbour put there. Anything we cannot handle goes on, unchanged, to the
//! kernel's VXLAN device. With the direct path on, every flow seen here is
//! one the host stack carries, and is noted so.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use aya_log_ebpf::debug;
use flannel_ebpf_common::{Counter, FdbValue, NODE_DIRECT_PATH, NodeConfig, RouteValue};

use crate::{
    flows::{self, Side},
    maps::{config, count, fdb_lookup, keep_mirrors, remember_stack_flow, route_lookup},
    packet::{ETH_LEN, ETH_P_IPV4, EthHdr, Ipv4Hdr, be16, skb_read},
    tunnel::{self, Peer},
};

#[classifier]
pub fn flannel_encap(ctx: TcContext) -> i32 {
    keep_mirrors();
    match config() {
        Some(cfg) => encap(&ctx, cfg),
        None => TC_ACT_OK,
    }
}

#[inline(always)]
fn encap(ctx: &TcContext, cfg: &NodeConfig) -> i32 {
    let (Some(eth), Some(ip)) = (
        skb_read::<EthHdr>(ctx, 0),
        skb_read::<Ipv4Hdr>(ctx, ETH_LEN),
    ) else {
        count(Counter::TxFallbackMalformed, ctx.len());
        return TC_ACT_OK;
    };
    if be16(&eth.proto) != ETH_P_IPV4 {
        count(Counter::TxFallbackNotIpv4, ctx.len());
        return TC_ACT_OK;
    }
    if cfg.flags & NODE_DIRECT_PATH != 0 {
        // Noted before anything else: even a packet the kernel device ends
        // up sending went through the stack.
        remember_stack_flow(&flows::key(ctx, &ip, Side::Out));
    }
    let peer = match route_lookup(ip.daddr) {
        Some(RouteValue {
            vtep_mac,
            node_ip,
            peer_slot,
            ..
        }) => Peer {
            vtep_mac,
            node_ip,
            slot: peer_slot,
        },
        None => {
            let mac = eth.dst;
            let Some(FdbValue {
                node_ip, peer_slot, ..
            }) = fdb_lookup(mac)
            else {
                // Diagnostics only at debug level: the verifier prunes them otherwise.
                debug!(
                    ctx,
                    "encap: no route or FDB entry for VtepMAC {:mac}, left to the kernel", mac
                );
                count(Counter::TxFallbackNoFdb, ctx.len());
                return TC_ACT_OK;
            };
            Peer {
                vtep_mac: mac,
                node_ip,
                slot: peer_slot,
            }
        }
    };
    match tunnel::encapsulate(ctx, cfg, &peer, &ip, false) {
        Ok(action) => action,
        Err(reason) => {
            debug!(
                ctx,
                "encap: cannot send to node {:i} (counter {}), left to the kernel",
                peer.node_ip,
                reason as u32
            );
            count(reason, ctx.len());
            TC_ACT_OK
        }
    }
}
