//! Ingress on the underlay at TC, the alternative to the XDP decap: an XDP
//! program on a veth (a kind node's eth0) turns off GSO on the veth's peer,
//! so every TCP segment would cross it at MTU size; at TC the peer keeps
//! sending large segments. The body is [`rx::receive`], as at XDP; what is
//! TC's own: headers copied out with bpf_skb_load_bytes (an skb's headers
//! need not all be linear), GSO aggregates, and the direct path after.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    macros::classifier,
    programs::TcContext,
};
use flannel_ebpf_common::{Counter, NodeConfig};

use crate::{
    deliver, direct6,
    maps::config,
    packet::{ETH_LEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, Ipv4Hdr, UdpHdr, be16},
    rx::{self, Hook, Link, Overlay},
};

#[classifier]
pub fn flannel_decap_tc(ctx: TcContext) -> i32 {
    match config() {
        Some(cfg) => rx::receive(&Tc(ctx), cfg),
        None => TC_ACT_OK,
    }
}

struct Tc(TcContext);

impl Hook for Tc {
    type Ctx = TcContext;
    type Action = i32;

    #[inline(always)]
    fn ctx(&self) -> &TcContext {
        &self.0
    }

    #[inline(always)]
    fn pass(&self) -> i32 {
        TC_ACT_OK
    }

    #[inline(always)]
    fn drop(&self) -> i32 {
        TC_ACT_SHOT
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        self.0.len()
    }

    #[inline(always)]
    fn link(&self) -> Link {
        let Ok(eth) = self.0.load::<EthHdr>(0) else {
            return Link::NotOurs;
        };
        let proto = be16(&eth.proto);
        if proto != ETH_P_IPV4 && proto != ETH_P_IPV6 {
            return Link::NotOurs;
        }
        // The kernel took any 802.1Q tag off before this hook: a real VLAN's
        // frame (VID not 0) is not ours, as at XDP.
        let skb = unsafe { &*self.0.skb.skb };
        if skb.vlan_present != 0 && skb.vlan_tci & 0x0fff != 0 {
            return Link::NotOurs;
        }
        if proto == ETH_P_IPV6 {
            return Link::Ipv6 { l2: ETH_LEN };
        }
        match self.0.load::<Ipv4Hdr>(ETH_LEN) {
            Ok(ip) => Link::Ipv4 { l2: ETH_LEN, ip },
            Err(_) => Link::Malformed,
        }
    }

    #[inline(always)]
    fn read<T>(&self, off: usize) -> Option<T> {
        self.0.load::<T>(off).ok()
    }

    #[inline(always)]
    fn udp_dport(&self, l4: usize, _plain: bool) -> Option<u16> {
        self.0.load::<UdpHdr>(l4).ok().map(|u| be16(&u.dport))
    }

    #[inline(always)]
    fn overlay(&self, vx_off: usize, _plain: bool) -> Option<Overlay> {
        self.0.load::<Overlay>(vx_off).ok()
    }

    // A GSO aggregate (a veth peer's TSO, GRO on a NIC) carries UDP-tunnel
    // offload state that bpf_skb_adjust_room cannot clear on these kernels
    // (BPF_F_ADJ_ROOM_DECAP_L3_* only sets the protocol): stripped here it
    // would keep SKB_GSO_UDP_TUNNEL and be segmented in software on its way
    // on (measured: TCP at 0.37x). The kernel's VXLAN device decapsulates it.
    #[inline(always)]
    fn gso(&self) -> bool {
        (unsafe { (*self.0.skb.skb).gso_size }) != 0
    }

    #[inline(always)]
    fn gso_to_stack(&self, cfg: &NodeConfig, inner: &Ipv4Hdr, inner_ip_off: usize) {
        deliver::stack_carries(&self.0, cfg, inner, inner_ip_off);
    }

    /// Remove outer IPv4 (with options), UDP, VXLAN and the inner Ethernet
    /// header: the outer Ethernet header stays in front of the inner IPv4
    /// packet, so the kernel sees a frame for this host on the underlay.
    /// (adjust_room, without BPF_F_ADJ_ROOM_NO_CSUM_RESET, resets a checksum
    /// the NIC verified for the outer headers: the stack checks the inner one.)
    #[inline(always)]
    fn strip(&self, inner_off: usize, _plain: bool) -> bool {
        self.0
            .adjust_room(
                -(inner_off as i32),
                BPF_ADJ_ROOM_MAC,
                BPF_F_ADJ_ROOM_FIXED_GSO as u64,
            )
            .is_ok()
    }

    #[inline(always)]
    fn deliver(&self, cfg: &NodeConfig, inner_len: u32) -> i32 {
        deliver::counted(deliver::to_pod(&self.0, cfg), Counter::RxDirect, inner_len)
    }

    #[inline(always)]
    fn gso_to_stack6(&self, cfg: &NodeConfig) {
        // Outer Ethernet, IPv6, UDP, VXLAN, inner Ethernet.
        direct6::stack_carries6(&self.0, cfg, ETH_LEN + 40 + 8 + 8 + ETH_LEN);
    }

    #[inline(always)]
    fn deliver6(&self, cfg: &NodeConfig, inner_len: u32) -> i32 {
        direct6::deliver6(&self.0, cfg, inner_len)
    }
}
