//! The pinned maps. BTF-described so `bpftool map dump` prints field names.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    helpers::generated::bpf_ktime_get_coarse_ns,
    macros::btf_map,
};
use flannel_ebpf_common::{
    ArpKey, ArpValue, COUNTER_SLOTS, Counter, CounterValue, Fdb6Value, FdbKey, FdbValue, FlowKey,
    FlowKey6, MAX_NODES, MAX_POD_PORTS, MAX_STACK_FLOWS, NODE_DIRECT_PATH, NextHop, NextHop6,
    NodeConfig, NodeConfig6, POD_HOP_SLOTS, PeerStats, PodHop, PodPort, Route6Key, Route6Value,
    RouteValue,
};

#[btf_map]
pub static CONFIG: Array<NodeConfig, 1> = Array::new();

/// Mirror of `ip route … via <vtep> dev flannel.1 onlink`: remote subnet → VTEP
/// address, with the VtepMAC and node behind it. What egress reads.
#[btf_map]
pub static ROUTE: LpmTrie<[u8; 4], RouteValue, { MAX_NODES as usize }> = LpmTrie::new();

/// Mirror of `ip neigh … dev flannel.1`: VTEP address → VtepMAC.
#[btf_map]
pub static ARP: HashMap<ArpKey, ArpValue, { MAX_NODES as usize }> = HashMap::new();

/// Mirror of `bridge fdb … dev flannel.1 dst <ip>`: VtepMAC → node public IP.
/// What ingress reads (by the inner source MAC).
#[btf_map]
pub static FDB: HashMap<FdbKey, FdbValue, { MAX_NODES as usize }> = HashMap::new();

#[btf_map]
pub static PEER_STATS: PerCpuArray<PeerStats, { MAX_NODES as usize }> = PerCpuArray::new();

/// Flows the host stack has carried across the overlay (value: when first
/// seen, coarse ns): the direct path leaves them to the stack both ways, so
/// conntrack (kube-proxy's NAT) sees every packet of them or none.
#[btf_map]
pub static STACK_FLOWS: LruHashMap<FlowKey, u64, { MAX_STACK_FLOWS as usize }> = LruHashMap::new();

/// Per peer slot and CPU: the underlay next hop last resolved.
#[btf_map]
pub static NEXT_HOPS: PerCpuArray<NextHop, { MAX_NODES as usize }> = PerCpuArray::new();

/// Dual-stack nodes: what VXLAN over IPv6 is checked against.
#[btf_map]
pub static CONFIG6: Array<NodeConfig6, 1> = Array::new();

/// Mirror of `bridge fdb … dev flannel-v6.1 dst <ipv6>`: flannel-v6 VtepMAC → member.
#[btf_map]
pub static FDB6: HashMap<FdbKey, Fdb6Value, { MAX_NODES as usize }> = HashMap::new();

/// Per peer slot and CPU: the IPv6 underlay next hop last resolved.
#[btf_map]
pub static NEXT_HOPS6: PerCpuArray<NextHop6, { MAX_NODES as usize }> = PerCpuArray::new();

/// Dual-stack direct path: remote IPv6 subnet (exact, by IPv6SubnetLen) →
/// the member behind it.
#[btf_map]
pub static ROUTE6: HashMap<Route6Key, Route6Value, { MAX_NODES as usize }> = HashMap::new();

/// [`STACK_FLOWS`] for IPv6 flows.
#[btf_map]
pub static STACK_FLOWS6: LruHashMap<FlowKey6, u64, { MAX_STACK_FLOWS as usize }> =
    LruHashMap::new();

/// Per CPU: the direct path's last delivery answers for local pods.
#[btf_map]
pub static POD_HOPS: PerCpuArray<PodHop, { POD_HOP_SLOTS as usize }> = PerCpuArray::new();

/// Local pods' bridge ports, by pod address (the agent's).
#[btf_map]
pub static POD_PORTS: HashMap<[u8; 16], PodPort, { MAX_POD_PORTS as usize }> = HashMap::new();

#[btf_map]
pub static COUNTERS: PerCpuArray<CounterValue, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.ready == 0 { None } else { Some(cfg) }
}

#[inline(always)]
pub fn config6() -> Option<&'static NodeConfig6> {
    let cfg = CONFIG6.get(0)?;
    if cfg.ready == 0 { None } else { Some(cfg) }
}

#[inline(always)]
pub fn fdb6_lookup(mac: [u8; 6]) -> Option<Fdb6Value> {
    FDB6.get_ptr(FdbKey::new(mac)).map(|v| unsafe { *v })
}

#[inline(always)]
pub fn count(counter: Counter, bytes: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes as u64;
        }
    }
}

/// Whether the direct path runs: switched on, and its cni0 program attached.
#[inline(always)]
pub fn direct_path(cfg: &NodeConfig) -> bool {
    cfg.flags & NODE_DIRECT_PATH != 0 && cfg.bridge_ifindex != 0
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // The coarse clock is a plain read; nothing here needs better.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Whether the host stack carries this flow.
#[inline(always)]
pub fn on_stack(key: &FlowKey) -> bool {
    unsafe { STACK_FLOWS.get(key) }.is_some()
}

/// Note that the host stack carries this flow (from now on both ways).
/// Looked up first: most packets of a stack flow find it noted, and an
/// insert into a full LRU map evicts a flow even when the key is there.
#[inline(always)]
pub fn remember_stack_flow(key: &FlowKey) {
    if !on_stack(key) {
        note_stack_flow(key);
    }
}

/// [`remember_stack_flow`] for a flow just found not noted.
#[inline(always)]
pub fn note_stack_flow(key: &FlowKey) {
    // A full map evicts its least recently used flow; nothing to do on error.
    let _ = STACK_FLOWS.insert(key, now_ns(), 0);
}

/// Whether the host stack carries this IPv6 flow.
#[inline(always)]
pub fn on_stack6(key: &FlowKey6) -> bool {
    unsafe { STACK_FLOWS6.get(key) }.is_some()
}

/// [`remember_stack_flow`] for IPv6.
#[inline(always)]
pub fn remember_stack_flow6(key: &FlowKey6) {
    if !on_stack6(key) {
        note_stack_flow6(key);
    }
}

/// [`note_stack_flow`] for IPv6.
#[inline(always)]
pub fn note_stack_flow6(key: &FlowKey6) {
    let _ = STACK_FLOWS6.insert(key, now_ns(), 0);
}

/// The remote IPv6 subnet holding `addr` (subnets `len` bits long), and the
/// member behind it.
#[inline(always)]
pub fn route6_lookup(addr: &[u8; 16], len: u8) -> Option<Route6Value> {
    let key = Route6Key {
        subnet6: crate::rx6::prefix6(addr, len),
    };
    ROUTE6.get_ptr(&key).map(|v| unsafe { *v })
}

/// This CPU's cached next hop of a peer slot.
#[inline(always)]
pub fn next_hop_slot(slot: u32) -> Option<&'static mut NextHop> {
    // Per-CPU slot: no other writer while this program runs on this CPU.
    NEXT_HOPS.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

/// This CPU's cached IPv6 next hop of a peer slot.
#[inline(always)]
pub fn next_hop6_slot(slot: u32) -> Option<&'static mut NextHop6> {
    // Per-CPU slot: no other writer while this program runs on this CPU.
    NEXT_HOPS6.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

/// The bridge port of the pod at `key` (its IPv6 address or
/// [`flannel_ebpf_common::pod_port_key`]), while the host's neighbour for
/// it is still `mac` (the pod the agent saw there).
#[inline(always)]
pub fn pod_port(key: &[u8; 16], mac: &[u8; 6]) -> Option<u32> {
    POD_PORTS
        .get_ptr(key)
        .map(|p| unsafe { *p })
        .filter(|p| p.mac == *mac && p.ifindex != 0)
        .map(|p| p.ifindex)
}

/// This CPU's POD_HOPS slot for a pod address (whoever holds it now).
#[inline(always)]
pub fn pod_hop_slot(pod_ip: [u8; 4]) -> Option<&'static mut PodHop> {
    let slot = u32::from_be_bytes(pod_ip) & (POD_HOP_SLOTS - 1);
    // Per-CPU slot: no other writer while this program runs on this CPU.
    POD_HOPS.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

/// The node behind a VtepMAC: public IP, stats slot, pod subnet.
#[inline(always)]
pub fn fdb_lookup(mac: [u8; 6]) -> Option<FdbValue> {
    FDB.get_ptr(FdbKey::new(mac)).map(|v| unsafe { *v })
}

/// The remote subnet holding `addr`, and the node behind it.
#[inline(always)]
pub fn route_lookup(addr: [u8; 4]) -> Option<RouteValue> {
    ROUTE.get(&Key::new(32, addr)).copied()
}

/// This CPU's stats slot of a peer.
#[inline(always)]
pub fn peer(slot: u32) -> Option<&'static mut PeerStats> {
    // Per-CPU slot: no other writer while this program runs on this CPU.
    PEER_STATS.get_ptr_mut(slot).map(|p| unsafe { &mut *p })
}

// ARP is only written by the agent (for `show arp` and bpftool); keep it
// referenced so it stays in the object.
#[inline(always)]
pub fn keep_mirrors() {
    let _ = &ARP;
}
