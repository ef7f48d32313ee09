//! Map keys, values and constants shared by the kernel programs and the agent.
//!
//! Addresses are byte arrays in network order so `bpftool map dump` prints
//! `[10,244,1,0]` rather than a host-order integer.
#![no_std]

/// Flannel's defaults for the VXLAN backend.
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

/// The same over IPv6: outer Ethernet + IPv6 + UDP + VXLAN.
pub const VXLAN6_OVERHEAD: u32 = 14 + 40 + 8 + 8;

/// Bytes the encapsulation adds in front of the inner IPv4 packet, beyond the
/// inner Ethernet header that is already there: outer Ethernet + IPv4 + UDP + VXLAN.
pub const VXLAN_OVERHEAD: u32 = 14 + 20 + 8 + 8;

/// Map names, as they appear in the object and under the pin root.
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_ROUTE: &str = "ROUTE";
pub const MAP_ARP: &str = "ARP";
pub const MAP_FDB: &str = "FDB";
pub const MAP_COUNTERS: &str = "COUNTERS";
pub const MAP_PEER_STATS: &str = "PEER_STATS";
pub const MAP_STACK_FLOWS: &str = "STACK_FLOWS";
pub const MAP_NEXT_HOPS: &str = "NEXT_HOPS";
/// The IPv6 half of a dual-stack node (EnableIPv6).
pub const MAP_CONFIG6: &str = "CONFIG6";
pub const MAP_FDB6: &str = "FDB6";
pub const MAP_NEXT_HOPS6: &str = "NEXT_HOPS6";
pub const MAP_POD_HOPS: &str = "POD_HOPS";
pub const MAP_ROUTE6: &str = "ROUTE6";
pub const MAP_STACK_FLOWS6: &str = "STACK_FLOWS6";
pub const MAP_POD_PORTS: &str = "POD_PORTS";

pub const PROG_ENCAP: &str = "flannel_encap";
pub const PROG_DECAP: &str = "flannel_decap";
/// The decap program for TC ingress (veth underlays; `--decap tc`).
pub const PROG_DECAP_TC: &str = "flannel_decap_tc";
/// The direct path's egress: TC ingress of the pod bridge (cni0).
pub const PROG_POD_EGRESS: &str = "flannel_pod_egress";
/// Egress on flannel-v6 (dual-stack): VXLAN over IPv6.
pub const PROG_ENCAP6: &str = "flannel_encap6";

/// Flows remembered as taking the host stack (the direct path's rule: a flow
/// the host's conntrack has seen keeps to the stack both ways). LRU: a
/// forgotten flow only costs a conntrack entry that times out.
pub const MAX_STACK_FLOWS: u32 = 65536;

/// Sizes of the mirror tables: a node per remote Flannel lease. 65 536 holds
/// a 50 000-node cluster with room; the hash maps preallocate (about 6 MiB of
/// kernel memory at this size on 2 CPUs, most of it per-CPU stats), the LPM
/// trie allocates per entry.
pub const MAX_NODES: u32 = 65536;

/// The one entry of the CONFIG array: what the datapath needs to know about
/// this node. Written by the agent before any program is attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's public (underlay) IPv4 address: outer source on egress,
    /// required outer destination on ingress.
    pub public_ip: [u8; 4],
    /// VXLAN network identifier (Flannel: 1), host order.
    pub vni: u32,
    /// UDP destination port (Flannel on Linux: 8472), host order.
    pub port: u16,
    /// Outer UDP source-port range, like the kernel's local port range.
    pub src_port_min: u16,
    pub src_port_max: u16,
    /// Our VtepMAC (flannel.1's address).
    pub vtep_mac: [u8; 6],
    /// Underlay interface index: outer route lookups are made through it.
    pub underlay_ifindex: u32,
    /// flannel.1's interface index.
    pub vtep_ifindex: u32,
    /// Non-zero once the agent has filled this entry; programs pass everything before.
    pub ready: u32,
    /// The cluster Network (net-conf.json `Network`) and its mask: a frame
    /// from the underlay with a source in it is a spoofed pod (unless
    /// [`NODE_NATIVE_POD_SOURCES`]), and a member's inner source in it must
    /// be in that member's own subnet.
    pub network: [u8; 4],
    pub network_mask: [u8; 4],
    /// `NODE_*` bits.
    pub flags: u32,
    /// Our lease's subnet and mask: the local pods (the direct path's
    /// sources on egress and destinations on ingress).
    pub subnet: [u8; 4],
    pub subnet_mask: [u8; 4],
    /// The pod bridge (cni0) the direct path delivers to and takes from; 0
    /// until its program is attached (the direct path is off until then, in
    /// both directions at once).
    pub bridge_ifindex: u32,
    /// flannel.1's MTU: the largest inner packet the direct path sends
    /// unsegmented (bigger ones take the stack, which fragments or says so).
    pub vtep_mtu: u32,
}

/// [`NodeConfig::flags`]: pod sources arrive unencapsulated from the
/// underlay legitimately (DirectRouting peers route pod traffic natively).
pub const NODE_NATIVE_POD_SOURCES: u32 = 1;
/// [`NodeConfig::flags`]: the direct path is on (`--direct-path`): pod
/// traffic to and from remote pods goes between cni0 and the underlay
/// without the host's IP stack, once [`NodeConfig::bridge_ifindex`] is set.
pub const NODE_DIRECT_PATH: u32 = 2;

/// skb mark bit the agent's nftables rule sets on packets of NAT'd
/// connections (kube-proxy's Services DNAT'd by br_netfilter before cni0's
/// ingress): the direct path leaves them to the stack. kube-proxy uses
/// 0x4000 and 0x8000; this bit is otherwise unused by Flannel or kube-proxy.
pub const NAT_MARK: u32 = 0x1000;

/// Key of STACK_FLOWS, from this node's side: the local end (a pod, or this
/// node's own overlay address) first. Ports are 0 for other protocols.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub local: [u8; 4],
    pub remote: [u8; 4],
    pub local_port: [u8; 2],
    pub remote_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The underlay next hop toward one peer, cached per CPU in NEXT_HOPS by the
/// peer's stats slot so the encapsulation needs no FIB lookup per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// The peer's public IP the entry was resolved for (slots are reused).
    pub node_ip: [u8; 4],
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The outer IPv4 ID last sent to this peer from this CPU: a counter
    /// per destination and CPU (a GSO aggregate takes one per segment), with
    /// a random start when the entry is resolved for a new node. (In what
    /// was padding: the layout of the fields before it is unchanged.)
    pub ip_id: u16,
    /// Non-zero once `ip_id` has had its random start (0 in an entry an
    /// earlier version left).
    pub id_seeded: u16,
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the lookup.
    pub resolved_ns: u64,
}

/// [`NextHop`] toward a peer's public IPv6 address (VXLAN over IPv6), in
/// NEXT_HOPS6 by the same slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop6 {
    pub node_ip6: [u8; 16],
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub resolved_ns: u64,
}

/// The direct path's delivery to a local pod, cached per CPU in POD_HOPS so
/// a decapsulated packet needs no FIB and neighbour lookup per packet.
/// Direct-mapped by the pod address's low bits; the entry says whose it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodHop {
    pub pod_ip: [u8; 4],
    /// The largest packet (IPv4 total length) the route was checked for: a
    /// bigger one is looked up again (the route's MTU check).
    pub max_len: u16,
    pub _pad: u16,
    /// The pod's MAC, and cni0's.
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub _pad2: u32,
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the lookup.
    pub resolved_ns: u64,
}

/// A local pod's port on the pod bridge (the host side of its veth), by
/// the pod's address (IPv6, or IPv4 as `::ffff:a.b.c.d`, see
/// [`pod_port_key`]): the direct path hands the pod's packets straight
/// to that veth's peer. Written by the agent from the bridge's FDB and
/// cni0's neighbours; used only while the neighbour MAC is `mac`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodPort {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Entries of POD_PORTS: more than a node's pods, each with an IPv4 and an
/// IPv6 address.
pub const MAX_POD_PORTS: u32 = 4096;

/// POD_PORTS's key of an IPv4 pod address: IPv4-mapped, so both families
/// share one table.
#[inline(always)]
pub const fn pod_port_key(ip: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip[0], ip[1], ip[2], ip[3],
    ]
}

/// Slots of POD_HOPS: a power of two, more than a node's pods.
pub const POD_HOP_SLOTS: u32 = 4096;

/// How long a cached next hop is used before it is looked up again: a
/// changed underlay neighbour or route is followed within this.
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;

/// `(addr & mask) == net`, all in network byte order.
#[inline(always)]
pub fn in_prefix(addr: [u8; 4], net: [u8; 4], mask: [u8; 4]) -> bool {
    (u32::from_ne_bytes(addr) & u32::from_ne_bytes(mask)) == u32::from_ne_bytes(net)
}

/// Key of the ROUTE mirror (LPM trie): remote pod subnet.
/// Value: the remote VTEP address (`<subnet>.0`), as `ip route … via <subnet>.0`,
/// and with it everything the encapsulation needs for that subnet, so the hot
/// path resolves an inner destination with this one lookup (no kernel route
/// or neighbour per node).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteValue {
    pub vtep_addr: [u8; 4],
    /// The remote VtepMAC (the ARP view of `vtep_addr`).
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The remote node's public IP (the FDB view of `vtep_mac`).
    pub node_ip: [u8; 4],
    /// The node's slot in PEER_STATS.
    pub peer_slot: u32,
}

/// Key of the ARP mirror: a remote VTEP address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArpKey {
    pub vtep_addr: [u8; 4],
}

/// Value of the ARP mirror: the remote VtepMAC, as `ip neigh … lladdr <mac>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ArpValue {
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Key of the FDB mirror: a remote VtepMAC. Padded to 8 bytes so the key has
/// no implicit padding the kernel would hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FdbKey {
    pub vtep_mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl FdbKey {
    pub const fn new(vtep_mac: [u8; 6]) -> Self {
        Self {
            vtep_mac,
            _pad: [0; 2],
        }
    }
}

/// Value of the FDB mirror: the remote node's public IP, as
/// `bridge fdb … dst <ip>`. The hot path reads only this map: egress by the
/// inner destination MAC (which the kernel's neighbour entry put there),
/// ingress by the inner source MAC to check the outer source is that node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FdbValue {
    pub node_ip: [u8; 4],
    /// This node's slot in PEER_STATS, assigned by the agent.
    pub peer_slot: u32,
    /// The node's pod subnet (its lease) and mask: the inner sources it may
    /// send from, so a member cannot speak for another node's pods.
    pub subnet: [u8; 4],
    pub subnet_mask: [u8; 4],
}

/// The one entry of the CONFIG6 array (dual-stack nodes): what ingress
/// checks VXLAN over IPv6 against before flannel-v6 decapsulates it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig6 {
    /// Non-zero once the agent has filled it; IPv6 passes unchecked before.
    pub ready: u32,
    /// This node's public IPv6 address: the outer destination checked.
    pub public_ip6: [u8; 16],
    /// The cluster's IPv6Network: a member's inner source in it must be in
    /// that member's own IPv6 subnet.
    pub network6: [u8; 16],
    /// flannel-v6's MAC: the inner destination of a member's frame.
    pub vtep_mac6: [u8; 6],
    pub network6_len: u8,
    /// Our IPv6 subnet's length (0: not known; the direct path stays off
    /// for IPv6). Every IPv6 subnet of a cluster has this length
    /// (IPv6SubnetLen), so ROUTE6 is an exact-match table keyed by it.
    pub subnet6_len: u8,
    /// Our IPv6 subnet: the direct path's pod sources and destinations.
    pub subnet6: [u8; 16],
    /// flannel-v6's MTU: what the direct path sends over IPv6 unfragmented.
    pub vtep6_mtu: u32,
}

/// Key of ROUTE6: a remote IPv6 subnet's network address (its length is
/// [`NodeConfig6::subnet6_len`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route6Key {
    pub subnet6: [u8; 16],
}

/// ROUTE6 value: what the direct path needs to encapsulate toward the node
/// holding a remote IPv6 subnet — one lookup (the mirror of flanneld's
/// `<subnet6> via <subnet6>:: dev flannel-v6.1 onlink` route with its
/// neighbour and FDB entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Route6Value {
    pub node_ip6: [u8; 16],
    pub vtep_mac6: [u8; 6],
    pub _pad: [u8; 2],
    /// The node's stats slot, u32::MAX for none.
    pub peer_slot: u32,
}

/// Key of STACK_FLOWS6: [`FlowKey`] for IPv6 flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: [u8; 2],
    pub remote_port: [u8; 2],
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// FDB6 value: a member's flannel-v6 VtepMAC → its public IPv6 address and
/// IPv6 subnet (the mirror of `bridge fdb … dev flannel-v6.1 dst <ipv6>`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fdb6Value {
    pub node_ip6: [u8; 16],
    pub subnet6: [u8; 16],
    pub subnet6_len: u8,
    pub _pad: [u8; 3],
    /// The node's stats slot (its IPv4 lease's), u32::MAX for none.
    pub peer_slot: u32,
}

/// Per remote node traffic, one per-CPU slot per node (indexed by
/// [`FdbValue::peer_slot`], so the hot path adds no hash lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Packets to this node left to the kernel path (no route, …).
    pub tx_fallbacks: u64,
    /// Packets from this node dropped after it was identified.
    pub rx_drops: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last packet received from it.
    pub last_rx_ns: u64,
}

/// A packets/bytes pair; the COUNTERS per-CPU array holds one per [`Counter`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident = $idx:literal, $label:literal;)*) => {
        /// Index into the COUNTERS map: what happened to a packet.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$doc])* $name = $idx,)*
        }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$name,)*];

            /// Stable name used by `show stats` and metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$name => $label,)*
                }
            }
        }
    };
}

counters! {
    /// Egress: frame encapsulated and redirected to the underlay.
    TxEncap = 0, "tx_encap";
    /// Ingress: VXLAN frame decapsulated and passed to the stack.
    RxDecap = 1, "rx_decap";
    /// Egress fallback: not an IPv4 frame (ARP, IPv6): left to the kernel device.
    TxFallbackNotIpv4 = 2, "tx_fallback_not_ipv4";
    /// Egress fallback: the inner destination is in no ROUTE entry and its
    /// VtepMAC (from a kernel neighbour) is not in the FDB map.
    TxFallbackNoFdb = 3, "tx_fallback_no_fdb";
    /// Egress fallback: no outer route to the remote node's public IP.
    TxFallbackNoRoute = 4, "tx_fallback_no_route";
    /// Egress fallback: the packet could not be grown or written.
    TxFallbackAdjust = 5, "tx_fallback_adjust_room";
    /// Egress fallback: frame too short to hold Ethernet + IPv4 headers.
    TxFallbackMalformed = 6, "tx_fallback_malformed";
    /// Egress: next hop needed neighbour resolution (sent with bpf_redirect_neigh).
    TxRedirectNeigh = 7, "tx_redirect_neigh";
    /// Ingress drop: VXLAN to our port too short for VXLAN + inner Ethernet + IPv4.
    RxDropTruncated = 8, "rx_drop_truncated";
    /// Ingress drop: VXLAN flags other than the I bit, or reserved bits set.
    RxDropBadFlags = 9, "rx_drop_bad_flags";
    /// Ingress drop: VNI is not ours.
    RxDropBadVni = 10, "rx_drop_bad_vni";
    /// Ingress drop: the sender is not a member (inner source MAC unknown, or
    /// known for another node's public IP).
    RxDropNonMember = 11, "rx_drop_non_member";
    /// Ingress drop: inner destination MAC is not our VtepMAC.
    RxDropBadInnerDst = 12, "rx_drop_bad_inner_dst";
    /// Ingress pass: outer IPv4 is a fragment; the kernel reassembles and its
    /// VXLAN device decapsulates. The first fragment passes only after the
    /// checks a whole frame gets (it carries the headers); the others cannot
    /// be reassembled without it.
    RxPassFragment = 13, "rx_pass_fragment";
    /// Ingress pass: outer IPv4 header is garbled (bad version/IHL/length); the
    /// kernel's IP layer judges it.
    RxPassMalformed = 14, "rx_pass_malformed";
    /// Ingress pass: a member's inner ARP frame; the kernel device gets it.
    RxPassInnerNotIpv4 = 15, "rx_pass_inner_not_ipv4";
    /// Ingress drop: could not move the packet head.
    RxDropAdjust = 16, "rx_drop_adjust_head";
    /// Egress fallback: IPv4 forwarding is off on the underlay (the route
    /// lookup refuses); set net.ipv4.ip_forward=1 as Kubernetes nodes need anyway.
    TxFallbackForwardingOff = 17, "tx_fallback_forwarding_off";
    /// Ingress pass (TC decap): a member's GSO aggregate, left to the
    /// kernel's VXLAN device, which resets its tunnel offload state.
    RxPassGso = 18, "rx_pass_gso";
    /// Ingress drop: a member's inner packet has a source in the cluster
    /// Network outside that member's subnet (it speaks for other pods).
    RxDropSpoofedInner = 19, "rx_drop_spoofed_inner_source";
    /// Ingress drop: a plain (not VXLAN) packet on the underlay with a pod
    /// source; pods of other nodes reach us only through the overlay.
    RxDropPodSourceOnUnderlay = 20, "rx_drop_pod_source_on_underlay";
    /// Ingress drop: the first fragment of a datagram to our VXLAN port
    /// too short to hold the headers the checks read (RFC 1858's tiny
    /// fragment); a real path never fragments that early.
    RxDropTinyFragment = 21, "rx_drop_tiny_fragment";
    /// Ingress drop: a member's inner frame neither IPv4 nor ARP (a tagged or
    /// IPv6 frame the kernel's VXLAN device would route unchecked).
    RxDropInnerNotIpv4 = 22, "rx_drop_inner_not_ipv4";
    /// Ingress drop: a member's inner packet is UDP to our own public IP —
    /// VXLAN inside VXLAN, which would reach flannel.1's socket as if the
    /// member had sent it whole.
    RxDropNested = 23, "rx_drop_nested_vxlan";
    /// Direct path, egress: a pod's packet encapsulated at cni0 and sent to
    /// the underlay without the host stack.
    TxDirect = 24, "tx_direct";
    /// Direct path, egress: the flow is one the host stack carries (NAT'd,
    /// or seen there before): left to the stack.
    TxDirectStackFlow = 25, "tx_direct_pass_stack_flow";
    /// Direct path, egress: a packet the stack must handle (fragment, TTL
    /// expiring, bigger than flannel.1's MTU, IP options, no underlay
    /// next hop): left to the stack.
    TxDirectUnfit = 26, "tx_direct_pass_unfit";
    /// Direct path, ingress: a decapsulated packet handed to cni0 for its
    /// pod without the host stack.
    RxDirect = 27, "rx_direct";
    /// Direct path, ingress: the flow is one the host stack carries: left to it.
    RxDirectStackFlow = 28, "rx_direct_pass_stack_flow";
    /// Direct path, ingress: not for a pod behind cni0 whose neighbour the
    /// host knows (the host itself, an unresolved pod, TTL, MTU): left to the stack.
    RxDirectUnfit = 29, "rx_direct_pass_unfit";
    /// Ingress: a member's VXLAN over IPv6, checked like IPv4's (VNI, flags,
    /// membership, inner destination and source), left to flannel-v6.
    RxPassIpv6Member = 30, "rx_pass_ipv6_member";
    /// Ingress: IPv6 to our address with extension headers (a fragment among
    /// them): the kernel parses them and the guard's ip6 table judges.
    RxPassIpv6ExtHeaders = 31, "rx_pass_ipv6_ext_headers";
    /// Egress on flannel-v6: a GSO aggregate, left to the kernel's device
    /// (its segments' outer UDP checksums cannot be asked for from BPF).
    TxFallbackIpv6Gso = 32, "tx_fallback_ipv6_gso";
    /// Egress on flannel-v6: an inner packet that is not TCP, UDP or ICMPv6
    /// right behind its IPv6 header (extension headers): the outer checksum
    /// is derived from the inner one's pseudo-header, so the kernel sends it.
    TxFallbackIpv6ExtHeaders = 33, "tx_fallback_ipv6_ext_headers";
    /// Ingress drop: IPv6 to our address with more than one extension header
    /// in front of the transport: no VTEP sends that, and it would hide
    /// VXLAN from the checks.
    RxDropIpv6ExtChain = 34, "rx_drop_ipv6_ext_chain";
    /// Direct path, egress: a pod's IPv6 packet encapsulated at cni0 and
    /// sent over the IPv6 underlay without the host stack.
    TxDirect6 = 35, "tx_direct6";
    /// Direct path, ingress: a decapsulated IPv6 packet handed to cni0 for
    /// its pod without the host stack.
    RxDirect6 = 36, "rx_direct6";
    /// Direct path, ingress: of the direct deliveries (IPv4 and IPv6),
    /// those handed to the pod's veth peer (bpf_redirect_peer), past cni0's
    /// bridging too.
    RxDirectPeer = 37, "rx_direct_peer";
}

pub const COUNTER_SLOTS: u32 = 48;

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for NodeConfig {}
    unsafe impl aya::Pod for RouteValue {}
    unsafe impl aya::Pod for ArpKey {}
    unsafe impl aya::Pod for ArpValue {}
    unsafe impl aya::Pod for FdbKey {}
    unsafe impl aya::Pod for FdbValue {}
    unsafe impl aya::Pod for CounterValue {}
    unsafe impl aya::Pod for PeerStats {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for NextHop6 {}
    unsafe impl aya::Pod for PodHop {}
    unsafe impl aya::Pod for NodeConfig6 {}
    unsafe impl aya::Pod for Fdb6Value {}
    unsafe impl aya::Pod for Route6Key {}
    unsafe impl aya::Pod for Route6Value {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for PodPort {}
}
