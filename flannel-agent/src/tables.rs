//! Typed access to the pinned mirror tables (route, ARP, FDB), the node
//! config and the counters.
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use anyhow::Context;
use aya::maps::{
    Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use flannel_ebpf_common::{
    ArpKey, ArpValue, Counter, CounterValue, FdbKey, FdbValue, MAP_ARP, MAP_CONFIG, MAP_COUNTERS,
    MAP_FDB, MAP_PEER_STATS, MAP_ROUTE, NodeConfig, PeerStats, RouteValue,
};

use crate::{datapath::open_pinned_maps, mac::Mac, subnet::Subnet};

pub struct Tables {
    pub config: Array<MapData, NodeConfig>,
    pub route: LpmTrie<MapData, [u8; 4], RouteValue>,
    pub arp: HashMap<MapData, ArpKey, ArpValue>,
    pub fdb: HashMap<MapData, FdbKey, FdbValue>,
    pub counters: PerCpuArray<MapData, CounterValue>,
    pub peer_stats: PerCpuArray<MapData, PeerStats>,
}

impl Tables {
    /// Open the tables pinned under `root` (the agent need not be running).
    pub fn open(root: &Path) -> anyhow::Result<Tables> {
        let mut maps = std::collections::HashMap::new();
        for (spec, data) in open_pinned_maps(root)? {
            maps.insert(spec.name, data);
        }
        let mut take = |name: &str| {
            maps.remove(name)
                .with_context(|| format!("map {name} missing"))
        };
        Ok(Tables {
            config: Array::try_from(Map::Array(take(MAP_CONFIG)?))?,
            route: LpmTrie::try_from(Map::LpmTrie(take(MAP_ROUTE)?))?,
            arp: HashMap::try_from(Map::HashMap(take(MAP_ARP)?))?,
            fdb: HashMap::try_from(Map::HashMap(take(MAP_FDB)?))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(take(MAP_COUNTERS)?))?,
            peer_stats: PerCpuArray::try_from(Map::PerCpuArray(take(MAP_PEER_STATS)?))?,
        })
    }

    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        self.config.get(&0, 0).context("reading the config map")
    }

    /// VtepMAC → (node public IP, stats slot).
    pub fn fdb_entries(&self) -> anyhow::Result<BTreeMap<Mac, (Ipv4Addr, u32)>> {
        let mut out = BTreeMap::new();
        for kv in self.fdb.iter() {
            let (k, v) = kv.context("reading the FDB map")?;
            out.insert(Mac(k.vtep_mac), (Ipv4Addr::from(v.node_ip), v.peer_slot));
        }
        Ok(out)
    }

    pub fn arp_entries(&self) -> anyhow::Result<BTreeMap<Ipv4Addr, Mac>> {
        let mut out = BTreeMap::new();
        for kv in self.arp.iter() {
            let (k, v) = kv.context("reading the ARP map")?;
            out.insert(Ipv4Addr::from(k.vtep_addr), Mac(v.vtep_mac));
        }
        Ok(out)
    }

    pub fn route_entries(&self) -> anyhow::Result<BTreeMap<Subnet, Ipv4Addr>> {
        let mut out = BTreeMap::new();
        for kv in self.route.iter() {
            let (k, v) = kv.context("reading the route map")?;
            let subnet = Subnet::new(Ipv4Addr::from(k.data()), k.prefix_len() as u8)
                .context("route map holds a key with host bits set")?;
            out.insert(subnet, Ipv4Addr::from(v.vtep_addr));
        }
        Ok(out)
    }

    pub fn set_fdb(&mut self, mac: Mac, node_ip: Ipv4Addr, peer_slot: u32) -> anyhow::Result<()> {
        let v = FdbValue {
            node_ip: node_ip.octets(),
            peer_slot,
        };
        self.fdb
            .insert(FdbKey::new(mac.0), v, 0)
            .with_context(|| format!("FDB map: {mac} → {node_ip}"))
    }

    /// Zero a peer's stats slot before it is given to a node.
    pub fn reset_peer(&mut self, slot: u32) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        let zeros = PerCpuValues::try_from(vec![PeerStats::default(); cpus])?;
        self.peer_stats
            .set(slot, zeros, 0)
            .with_context(|| format!("resetting peer stats slot {slot}"))
    }

    /// A peer's stats summed over CPUs (last_rx_ns: the latest).
    pub fn peer(&self, slot: u32) -> anyhow::Result<PeerStats> {
        let per_cpu = self
            .peer_stats
            .get(&slot, 0)
            .with_context(|| format!("reading peer stats slot {slot}"))?;
        let mut s = PeerStats::default();
        for v in per_cpu.iter() {
            s.tx_packets += v.tx_packets;
            s.tx_bytes += v.tx_bytes;
            s.rx_packets += v.rx_packets;
            s.rx_bytes += v.rx_bytes;
            s.tx_fallbacks += v.tx_fallbacks;
            s.rx_drops += v.rx_drops;
            s.last_rx_ns = s.last_rx_ns.max(v.last_rx_ns);
        }
        Ok(s)
    }

    pub fn del_fdb(&mut self, mac: Mac) -> anyhow::Result<()> {
        self.fdb
            .remove(&FdbKey::new(mac.0))
            .with_context(|| format!("FDB map: deleting {mac}"))
    }

    pub fn set_arp(&mut self, vtep: Ipv4Addr, mac: Mac) -> anyhow::Result<()> {
        let v = ArpValue {
            vtep_mac: mac.0,
            _pad: [0; 2],
        };
        self.arp
            .insert(
                ArpKey {
                    vtep_addr: vtep.octets(),
                },
                v,
                0,
            )
            .with_context(|| format!("ARP map: {vtep} → {mac}"))
    }

    pub fn del_arp(&mut self, vtep: Ipv4Addr) -> anyhow::Result<()> {
        self.arp
            .remove(&ArpKey {
                vtep_addr: vtep.octets(),
            })
            .with_context(|| format!("ARP map: deleting {vtep}"))
    }

    pub fn set_route(&mut self, dst: Subnet, vtep: Ipv4Addr) -> anyhow::Result<()> {
        let key = Key::new(dst.prefix_len() as u32, dst.addr().octets());
        self.route
            .insert(
                &key,
                RouteValue {
                    vtep_addr: vtep.octets(),
                },
                0,
            )
            .with_context(|| format!("route map: {dst} → {vtep}"))
    }

    pub fn del_route(&mut self, dst: Subnet) -> anyhow::Result<()> {
        let key = Key::new(dst.prefix_len() as u32, dst.addr().octets());
        self.route
            .remove(&key)
            .with_context(|| format!("route map: deleting {dst}"))
    }

    /// Counter totals summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, CounterValue)>> {
        let mut out = Vec::new();
        for c in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&(*c as u32), 0)
                .with_context(|| format!("reading counter {}", c.name()))?;
            let mut sum = CounterValue::default();
            for v in per_cpu.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            out.push((*c, sum));
        }
        Ok(out)
    }
}
