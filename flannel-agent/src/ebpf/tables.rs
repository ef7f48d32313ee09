//! Typed access to the pinned mirror tables (route, ARP, FDB), the node
//! config and the counters.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Context;
use aya::maps::MapData;
use flannel_ebpf_common::{
    ArpKey, ArpValue, Counter, CounterValue, Fdb6Value, FdbKey, FdbValue, MAP_ARP, MAP_CONFIG,
    MAP_CONFIG6, MAP_COUNTERS, MAP_FDB, MAP_FDB6, MAP_PEER_STATS, MAP_POD_PORTS, MAP_ROUTE,
    MAP_ROUTE6, MAX_NODES, NodeConfig, NodeConfig6, PeerStats, PodPort, Route6Key, Route6Value,
    RouteValue,
};

use crate::{
    ebpf::bpf_sys::TypedMap, ebpf::datapath::open_pinned_maps, lease::mac::Mac,
    lease::subnet::Subnet,
};

/// Key of the ROUTE LPM trie, as the kernel lays it out: prefix length, then address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteKey {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

// SAFETY: plain data, no padding (4 + 4 bytes).
unsafe impl aya::Pod for RouteKey {}

impl RouteKey {
    fn of(s: Subnet) -> RouteKey {
        RouteKey {
            prefix_len: s.prefix_len() as u32,
            addr: s.addr().octets(),
        }
    }
}

/// A map update refused because the map is full (hash maps say E2BIG, the
/// LPM trie ENOSPC): say which map and its size, not just the errno.
fn full(e: std::io::Error, map: &str) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::E2BIG) | Some(libc::ENOSPC) => anyhow::anyhow!(
            "the {map} map is full ({MAX_NODES} entries, one per remote node): this cluster has more nodes than flannel-ebpf's maps hold"
        ),
        _ => anyhow::Error::new(e),
    }
}

/// Write `items` with one batch call, then one by one whatever the batch did
/// not do (a map without batch support, or the element it stopped at, which
/// then gets its own error).
fn batched<T>(
    items: &[T],
    batch: impl FnOnce(&[T]) -> Result<(), (usize, std::io::Error)>,
    one: impl FnMut(&T) -> anyhow::Result<()>,
) -> Vec<anyhow::Result<()>> {
    let done = match batch(items) {
        Ok(()) => items.len(),
        Err((done, _)) => done,
    };
    let mut out: Vec<anyhow::Result<()>> = (0..done).map(|_| Ok(())).collect();
    out.extend(items[done..].iter().map(one));
    out
}

/// A POD_PORTS key as the pod's address.
fn pod_ip(key: &[u8; 16]) -> std::net::IpAddr {
    Ipv6Addr::from(*key).to_canonical()
}

type Config6Map = TypedMap<u32, NodeConfig6>;
type Fdb6Map = TypedMap<FdbKey, Fdb6Value>;
type Route6Map = TypedMap<Route6Key, Route6Value>;
type PodPortMap = TypedMap<[u8; 16], PodPort>;

pub struct Tables {
    pub config: TypedMap<u32, NodeConfig>,
    pub route: TypedMap<RouteKey, RouteValue>,
    pub arp: TypedMap<ArpKey, ArpValue>,
    pub fdb: TypedMap<FdbKey, FdbValue>,
    pub counters: TypedMap<u32, CounterValue>,
    pub peer_stats: TypedMap<u32, PeerStats>,
    /// Dual-stack nodes: what ingress checks VXLAN over IPv6 against.
    /// (None under a pin root from before IPv6, until the agent loads.)
    pub config6: Option<Config6Map>,
    pub fdb6: Option<Fdb6Map>,
    /// Dual-stack direct path: remote IPv6 subnet → member (None under a
    /// pin root from before it).
    pub route6: Option<Route6Map>,
    /// The direct path's pod ports (None under a pin root from before them).
    pub pod_ports: Option<PodPortMap>,
}

impl Tables {
    /// Open the tables pinned under `root` (the agent need not be running).
    /// Each map's type and sizes are checked against these types on opening.
    pub fn open(root: &Path) -> anyhow::Result<Tables> {
        let mut maps: std::collections::HashMap<&str, MapData> = open_pinned_maps(root)?
            .into_iter()
            .map(|(spec, data)| (spec.name, data))
            .collect();
        let mut take = |name: &str| {
            maps.remove(name)
                .with_context(|| format!("map {name} missing"))
        };
        Ok(Tables {
            config: TypedMap::new(take(MAP_CONFIG)?),
            route: TypedMap::new(take(MAP_ROUTE)?),
            arp: TypedMap::new(take(MAP_ARP)?),
            fdb: TypedMap::new(take(MAP_FDB)?),
            counters: TypedMap::new(take(MAP_COUNTERS)?),
            peer_stats: TypedMap::new(take(MAP_PEER_STATS)?),
            config6: maps.remove(MAP_CONFIG6).map(TypedMap::new),
            fdb6: maps.remove(MAP_FDB6).map(TypedMap::new),
            route6: maps.remove(MAP_ROUTE6).map(TypedMap::new),
            pod_ports: maps.remove(MAP_POD_PORTS).map(TypedMap::new),
        })
    }

    fn ipv6_maps(&self) -> anyhow::Result<(&Config6Map, &Fdb6Map)> {
        self.config6.as_ref().zip(self.fdb6.as_ref()).context(
            "the pinned data path predates IPv6 (no config6/fdb6 maps): restart the agent to load this version's",
        )
    }

    /// Empty the IPv4 route, ARP and FDB maps (an IPv6-only node has no
    /// IPv4 peers; entries left by an earlier run would still count).
    pub fn clear_ipv4(&mut self) -> anyhow::Result<usize> {
        let mut n = 0;
        for s in self.route_entries()?.into_keys() {
            self.del_route(s)?;
            n += 1;
        }
        for a in self.arp_entries()?.into_keys() {
            self.del_arp(a)?;
            n += 1;
        }
        for m in self.fdb_entries()?.into_keys() {
            self.del_fdb(m)?;
            n += 1;
        }
        Ok(n)
    }

    /// Write (or clear, with None) the IPv6 checks' config.
    pub fn set_config6(&self, cfg: Option<NodeConfig6>) -> anyhow::Result<()> {
        if cfg.is_none() && self.config6.is_none() {
            return Ok(());
        }
        let (config6, _) = self.ipv6_maps()?;
        let cfg = cfg.unwrap_or_default();
        if config6.get(&0).ok().flatten() != Some(cfg) {
            config6.set(&0, &cfg).context("writing the CONFIG6 map")?;
        }
        Ok(())
    }

    /// flannel-v6 VtepMAC → (member's public IPv6 address, its IPv6 subnet).
    pub fn fdb6_entries(
        &self,
    ) -> anyhow::Result<BTreeMap<Mac, (std::net::Ipv6Addr, crate::lease::subnet6::Subnet6)>> {
        let mut out = BTreeMap::new();
        let Some(fdb6) = &self.fdb6 else {
            return Ok(out);
        };
        for (k, v) in fdb6.entries().context("reading the FDB6 map")? {
            let subnet = crate::lease::subnet6::Subnet6::new(v.subnet6.into(), v.subnet6_len)
                .context("FDB6 map: a subnet with host bits set")?;
            out.insert(Mac(k.vtep_mac), (v.node_ip6.into(), subnet));
        }
        Ok(out)
    }

    /// The FDB6 map as it is: flannel-v6 VtepMAC → entry (stats slot included).
    pub fn fdb6_values(&self) -> anyhow::Result<BTreeMap<Mac, flannel_ebpf_common::Fdb6Value>> {
        let Some(fdb6) = &self.fdb6 else {
            return Ok(BTreeMap::new());
        };
        Ok(fdb6
            .entries()
            .context("reading the FDB6 map")?
            .into_iter()
            .map(|(k, v)| (Mac(k.vtep_mac), v))
            .collect())
    }

    /// Make the FDB6 map exactly `want` (flannel-v6 VtepMAC → member).
    pub fn sync_fdb6(&self, want: &BTreeMap<Mac, Fdb6Value>) -> anyhow::Result<usize> {
        if want.is_empty() && self.fdb6.is_none() {
            return Ok(0);
        }
        let (_, fdb6) = self.ipv6_maps()?;
        let have: BTreeMap<Mac, Fdb6Value> = fdb6
            .entries()
            .context("reading the FDB6 map")?
            .into_iter()
            .map(|(k, v)| (Mac(k.vtep_mac), v))
            .collect();
        let mut changed = 0;
        for mac in have.keys().filter(|m| !want.contains_key(m)) {
            fdb6.remove(&FdbKey::new(mac.0))
                .with_context(|| format!("FDB6 map: deleting {mac}"))?;
            changed += 1;
        }
        for (mac, v) in want.iter().filter(|(m, v)| have.get(m) != Some(v)) {
            fdb6.set(&FdbKey::new(mac.0), v)
                .map_err(|e| full(e, MAP_FDB6))
                .with_context(|| format!("FDB6 map: {mac}"))?;
            changed += 1;
        }
        Ok(changed)
    }

    /// The ROUTE6 map as it is.
    pub fn route6_entries(&self) -> anyhow::Result<BTreeMap<Route6Key, Route6Value>> {
        let Some(route6) = &self.route6 else {
            return Ok(BTreeMap::new());
        };
        Ok(route6
            .entries()
            .context("reading the ROUTE6 map")?
            .into_iter()
            .collect())
    }

    /// Make the ROUTE6 map exactly `want`.
    pub fn sync_route6(&self, want: &BTreeMap<Route6Key, Route6Value>) -> anyhow::Result<usize> {
        let Some(route6) = &self.route6 else {
            if want.is_empty() {
                return Ok(0);
            }
            anyhow::bail!(
                "the pinned data path predates the IPv6 direct path (no route6 map): restart the agent to load this version's"
            );
        };
        let have = self.route6_entries()?;
        let mut changed = 0;
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            route6
                .remove(k)
                .with_context(|| format!("ROUTE6 map: deleting {}", Ipv6Addr::from(k.subnet6)))?;
            changed += 1;
        }
        for (k, v) in want.iter().filter(|(k, v)| have.get(k) != Some(v)) {
            route6
                .set(k, v)
                .map_err(|e| full(e, MAP_ROUTE6))
                .with_context(|| format!("ROUTE6 map: {}", Ipv6Addr::from(k.subnet6)))?;
            changed += 1;
        }
        Ok(changed)
    }

    /// The POD_PORTS map as it is (keys: IPv6, or IPv4-mapped).
    pub fn pod_port_entries(&self) -> anyhow::Result<BTreeMap<[u8; 16], PodPort>> {
        let Some(m) = &self.pod_ports else {
            return Ok(BTreeMap::new());
        };
        Ok(m.entries()
            .context("reading the POD_PORTS map")?
            .into_iter()
            .collect())
    }

    /// Make the POD_PORTS map exactly `want` (nothing under a pin root
    /// without it: the programs there deliver through cni0).
    pub fn sync_pod_ports(&self, want: &BTreeMap<[u8; 16], PodPort>) -> anyhow::Result<usize> {
        let Some(m) = &self.pod_ports else {
            return Ok(0);
        };
        let have = self.pod_port_entries()?;
        let mut changed = 0;
        for k in have.keys().filter(|k| !want.contains_key(*k)) {
            m.remove(k)
                .with_context(|| format!("POD_PORTS map: deleting {}", pod_ip(k)))?;
            changed += 1;
        }
        for (k, v) in want.iter().filter(|(k, v)| have.get(*k) != Some(*v)) {
            m.set(k, v)
                .map_err(|e| full(e, MAP_POD_PORTS))
                .with_context(|| format!("POD_PORTS map: {}", pod_ip(k)))?;
            changed += 1;
        }
        Ok(changed)
    }

    pub fn node_config(&self) -> anyhow::Result<NodeConfig> {
        self.config
            .get(&0)
            .context("reading the config map")?
            .context("the config map has no entry 0")
    }

    /// Tell the programs where the pod bridge is (0: nowhere, the direct
    /// path off in both directions at once).
    pub fn set_bridge(&self, ifindex: u32) -> anyhow::Result<()> {
        let mut cfg = self.node_config()?;
        if cfg.bridge_ifindex != ifindex {
            cfg.bridge_ifindex = ifindex;
            self.config
                .set(&0, &cfg)
                .context("writing the pod bridge into the config map")?;
        }
        Ok(())
    }

    /// VtepMAC → (node public IP, stats slot).
    pub fn fdb_entries(&self) -> anyhow::Result<BTreeMap<Mac, (Ipv4Addr, u32)>> {
        let mut out = BTreeMap::new();
        for (k, v) in self.fdb.entries().context("reading the FDB map")? {
            out.insert(Mac(k.vtep_mac), (Ipv4Addr::from(v.node_ip), v.peer_slot));
        }
        Ok(out)
    }

    pub fn arp_entries(&self) -> anyhow::Result<BTreeMap<Ipv4Addr, Mac>> {
        let mut out = BTreeMap::new();
        for (k, v) in self.arp.entries().context("reading the ARP map")? {
            out.insert(Ipv4Addr::from(k.vtep_addr), Mac(v.vtep_mac));
        }
        Ok(out)
    }

    pub fn route_entries(&self) -> anyhow::Result<BTreeMap<Subnet, Ipv4Addr>> {
        Ok(self
            .route_values()?
            .into_iter()
            .map(|(s, v)| (s, Ipv4Addr::from(v.vtep_addr)))
            .collect())
    }

    /// The route map as the datapath reads it, every field.
    pub fn route_values(&self) -> anyhow::Result<BTreeMap<Subnet, RouteValue>> {
        let mut out = BTreeMap::new();
        for (k, v) in self.route.entries().context("reading the route map")? {
            let subnet = Subnet::new(Ipv4Addr::from(k.addr), k.prefix_len as u8)
                .context("route map holds a key with host bits set")?;
            out.insert(subnet, v);
        }
        Ok(out)
    }

    /// The route entry of a remote subnet: its VTEP address, VtepMAC, node and stats slot.
    pub fn route_value(
        dst: Subnet,
        vtep_mac: Mac,
        node_ip: Ipv4Addr,
        peer_slot: u32,
    ) -> RouteValue {
        RouteValue {
            vtep_addr: dst.vtep_addr().octets(),
            vtep_mac: vtep_mac.0,
            _pad: [0; 2],
            node_ip: node_ip.octets(),
            peer_slot,
        }
    }

    /// The FDB map as the datapath reads it, every field.
    pub fn fdb_values(&self) -> anyhow::Result<BTreeMap<Mac, FdbValue>> {
        Ok(self
            .fdb
            .entries()
            .context("reading the FDB map")?
            .into_iter()
            .map(|(k, v)| (Mac(k.vtep_mac), v))
            .collect())
    }

    /// The FDB entry of the node at `node_ip`, whose pods are in `subnet`.
    pub fn fdb_value(node_ip: Ipv4Addr, peer_slot: u32, subnet: Option<Subnet>) -> FdbValue {
        FdbValue {
            node_ip: node_ip.octets(),
            peer_slot,
            subnet: subnet.map_or([0; 4], |s| s.addr().octets()),
            subnet_mask: subnet.map_or([0; 4], |s| s.netmask().octets()),
        }
    }

    pub fn set_fdb(&self, mac: Mac, v: FdbValue) -> anyhow::Result<()> {
        let node_ip = Ipv4Addr::from(v.node_ip);
        self.fdb
            .set(&FdbKey::new(mac.0), &v)
            .map_err(|e| full(e, MAP_FDB))
            .with_context(|| format!("FDB map: {mac} → {node_ip}"))
    }

    /// [`Self::reset_peer`] for many slots, in one call where the kernel can.
    pub fn reset_peers(&self, slots: &[u32]) -> Vec<anyhow::Result<()>> {
        batched(
            slots,
            |s| self.peer_stats.set_many_per_cpu(s, &PeerStats::default()),
            |slot| self.reset_peer(*slot),
        )
    }

    /// [`Self::set_fdb`] for many entries, in one call where the kernel can.
    pub fn set_fdbs(&self, entries: &[(Mac, FdbValue)]) -> Vec<anyhow::Result<()>> {
        let keys: Vec<FdbKey> = entries.iter().map(|(m, _)| FdbKey::new(m.0)).collect();
        let values: Vec<FdbValue> = entries.iter().map(|(_, v)| *v).collect();
        batched(
            entries,
            |_| self.fdb.set_many(&keys, &values),
            |(m, v)| self.set_fdb(*m, *v),
        )
    }

    /// [`Self::set_arp`] for many entries, in one call where the kernel can.
    pub fn set_arps(&self, entries: &[(Ipv4Addr, Mac)]) -> Vec<anyhow::Result<()>> {
        let keys: Vec<ArpKey> = entries
            .iter()
            .map(|(ip, _)| ArpKey {
                vtep_addr: ip.octets(),
            })
            .collect();
        let values: Vec<ArpValue> = entries
            .iter()
            .map(|(_, m)| ArpValue {
                vtep_mac: m.0,
                _pad: [0; 2],
            })
            .collect();
        batched(
            entries,
            |_| self.arp.set_many(&keys, &values),
            |(ip, m)| self.set_arp(*ip, *m),
        )
    }

    /// [`Self::set_route`] for many entries, in one call where the kernel can.
    pub fn set_routes(&self, entries: &[(Subnet, RouteValue)]) -> Vec<anyhow::Result<()>> {
        let keys: Vec<RouteKey> = entries.iter().map(|(s, _)| RouteKey::of(*s)).collect();
        let values: Vec<RouteValue> = entries.iter().map(|(_, v)| *v).collect();
        batched(
            entries,
            |_| self.route.set_many(&keys, &values),
            |(s, v)| self.set_route(*s, *v),
        )
    }

    /// Zero a peer's stats slot before it is given to a node.
    pub fn reset_peer(&self, slot: u32) -> anyhow::Result<()> {
        self.peer_stats
            .set_per_cpu(&slot, &PeerStats::default())
            .with_context(|| format!("resetting peer stats slot {slot}"))
    }

    /// A peer's stats summed over CPUs (last_rx_ns: the latest).
    pub fn peer(&self, slot: u32) -> anyhow::Result<PeerStats> {
        let per_cpu = self
            .peer_stats
            .get_per_cpu(&slot)
            .with_context(|| format!("reading peer stats slot {slot}"))?
            .with_context(|| format!("peer stats slot {slot} is out of range"))?;
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
            .map(drop)
            .with_context(|| format!("FDB map: deleting {mac}"))
    }

    pub fn set_arp(&self, vtep: Ipv4Addr, mac: Mac) -> anyhow::Result<()> {
        let v = ArpValue {
            vtep_mac: mac.0,
            _pad: [0; 2],
        };
        self.arp
            .set(
                &ArpKey {
                    vtep_addr: vtep.octets(),
                },
                &v,
            )
            .map_err(|e| full(e, MAP_ARP))
            .with_context(|| format!("ARP map: {vtep} → {mac}"))
    }

    pub fn del_arp(&mut self, vtep: Ipv4Addr) -> anyhow::Result<()> {
        self.arp
            .remove(&ArpKey {
                vtep_addr: vtep.octets(),
            })
            .map(drop)
            .with_context(|| format!("ARP map: deleting {vtep}"))
    }

    pub fn set_route(&self, dst: Subnet, v: RouteValue) -> anyhow::Result<()> {
        let vtep = Ipv4Addr::from(v.vtep_addr);
        self.route
            .set(&RouteKey::of(dst), &v)
            .map_err(|e| full(e, MAP_ROUTE))
            .with_context(|| format!("route map: {dst} → {vtep}"))
    }

    pub fn del_route(&mut self, dst: Subnet) -> anyhow::Result<()> {
        self.route
            .remove(&RouteKey::of(dst))
            .map(drop)
            .with_context(|| format!("route map: deleting {dst}"))
    }

    /// Counter totals summed over CPUs, in [`Counter::ALL`] order.
    pub fn counters(&self) -> anyhow::Result<Vec<(Counter, CounterValue)>> {
        let mut out = Vec::new();
        for c in Counter::ALL {
            let per_cpu = self
                .counters
                .get_per_cpu(&(*c as u32))
                .with_context(|| format!("reading counter {}", c.name()))?
                .with_context(|| format!("counter {} is out of range", c.name()))?;
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
