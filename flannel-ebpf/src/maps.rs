//! The pinned maps. BTF-described so `bpftool map dump` prints field names.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    macros::btf_map,
};
use flannel_ebpf_common::{
    ArpKey, ArpValue, COUNTER_SLOTS, Counter, CounterValue, FdbKey, FdbValue, MAX_NODES,
    NodeConfig, PeerStats, RouteValue,
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

#[btf_map]
pub static COUNTERS: PerCpuArray<CounterValue, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.ready == 0 { None } else { Some(cfg) }
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
