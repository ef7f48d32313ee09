//! One pass as plan → observe → apply: what the maps and the kernel hold is
//! read once ([`Observed`]), the difference from the wanted tables is
//! planned as ordered phases of writes ([`plan`]), and the phases are applied
//! in order (`apply`).
//!
//! The order keeps every packet on a whole entry: on add the FDB entry (what
//! decapsulation reads), then the ARP view and neighbours, then routes last
//! (the route map entry carries everything encapsulation needs, so it is
//! whole once written); on delete routes first, then neighbours, then FDB
//! entries.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt,
    net::Ipv4Addr,
};

use flannel_ebpf_common::{FdbValue, RouteValue};

use super::desired::{Desired, assign_slots};
use crate::{
    ebpf::tables::Tables,
    lease::mac::Mac,
    lease::subnet::Subnet,
    netlink::{KernelFdb as KernelFdbEntry, KernelNeigh, KernelRoute},
};

/// What the kernel's routing tables carry for the overlay on flannel.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelRoutes {
    /// One route for the whole Network via one gateway neighbour: the encap
    /// program resolves each remote VTEP from the route map, so the kernel's
    /// tables stay the same size whatever the cluster's (the default of the
    /// eBPF data path).
    Network,
    /// Flannel's own: per remote node a route `via <subnet>.0 onlink` and a
    /// permanent neighbour (`--datapath kernel`, `--per-node-routes`).
    PerNode,
    /// Leave routes and neighbours on flannel.1 as they are: the maps are
    /// being filled before the programs attach, and whatever carries the
    /// traffic now (flanneld's entries, or ours from the previous run) stays.
    Untouched,
}

/// What to do with kernel FDB entries on flannel.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFdb {
    /// `--datapath kernel` (and hand-back): the kernel's FDB is the data
    /// path; program it.
    Program,
    /// The eBPF programs are attached and read the FDB map: kernel entries
    /// (flanneld's leftovers) are stale, remove them.
    Remove,
    /// The eBPF maps are being filled before the programs attach: the kernel
    /// still carries the traffic (a takeover), leave its entries alone.
    Keep,
}

/// How a pass treats each table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    pub routes: KernelRoutes,
    pub fdb: KernelFdb,
    /// Keep DirectRouting/host-gw routes on the underlay to `want.direct`
    /// (off for hand-back, which leaves them to whoever comes next).
    pub direct: bool,
}

/// The node's devices a pass writes to.
#[derive(Clone, Copy, Debug)]
pub struct Scope {
    /// Routes inside the Network are ours; nothing outside it is touched.
    pub network: Subnet,
    /// flannel.1 (none with host-gw).
    pub vtep: Option<Vtep>,
    pub underlay_index: u32,
}

#[derive(Clone, Copy, Debug)]
pub struct Vtep {
    pub index: u32,
    pub mac: Mac,
    /// The gateway of the one Network route ([`KernelRoutes::Network`]).
    pub gateway: Ipv4Addr,
}

/// The one Network route's gateway: the Network's own address, or its last
/// one when our lease holds the first (an onlink gateway may not be local).
/// Its neighbour only lets the kernel hand packets to flannel.1; which VTEP a
/// packet goes to is the route map's answer, by destination address.
pub fn network_gateway(network: Subnet, own: Subnet) -> Ipv4Addr {
    if own.contains(network.addr()) {
        Ipv4Addr::from(u32::from(network.addr()) | !u32::from(network.netmask()))
    } else {
        network.addr()
    }
}

/// The maps as read at the start of a pass.
#[derive(Clone, Debug, Default)]
pub struct MapView {
    pub fdb: BTreeMap<Mac, FdbValue>,
    pub arp: BTreeMap<Ipv4Addr, Mac>,
    pub routes: BTreeMap<Subnet, RouteValue>,
}

impl MapView {
    pub fn read(t: &Tables) -> anyhow::Result<MapView> {
        Ok(MapView {
            fdb: t.fdb_values()?,
            arp: t.arp_entries()?,
            routes: t.route_values()?,
        })
    }

    /// The view after `op` succeeded (map writes only; others change nothing).
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::SetFdb(m, v) => {
                self.fdb.insert(*m, *v);
            }
            Op::SetArp(ip, m) => {
                self.arp.insert(*ip, *m);
            }
            Op::SetRoute(s, v) => {
                self.routes.insert(*s, *v);
            }
            Op::DelRoute(s) => {
                self.routes.remove(s);
            }
            Op::DelArp(ip) => {
                self.arp.remove(ip);
            }
            Op::DelFdb(m) => {
                self.fdb.remove(m);
            }
            _ => {}
        }
    }

    /// What these maps carry, as the tables they mirror.
    pub fn desired(&self) -> Desired {
        Desired {
            fdb: self
                .fdb
                .iter()
                .map(|(m, v)| (*m, Ipv4Addr::from(v.node_ip)))
                .collect(),
            arp: self.arp.clone(),
            routes: self
                .routes
                .iter()
                .map(|(s, v)| (*s, Ipv4Addr::from(v.vtep_addr)))
                .collect(),
            direct: BTreeMap::new(),
        }
    }
}

/// Everything a pass compares against, read once.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// None on the kernel data path and with host-gw.
    pub maps: Option<MapView>,
    /// Every IPv4 route of the main table with its output device (also what
    /// DirectRouting and host-gw judge on-link peers by).
    pub main_routes: Vec<(Option<u32>, KernelRoute)>,
    pub neighbours: Vec<KernelNeigh>,
    pub fdb: Vec<KernelFdbEntry>,
}

impl Observed {
    /// Routes inside the Network out of device `index`.
    fn routes_via(&self, index: u32, network: &Subnet) -> impl Iterator<Item = &KernelRoute> {
        self.main_routes
            .iter()
            .filter(move |(oif, r)| *oif == Some(index) && network.contains_subnet(&r.dst))
            .map(|(_, r)| r)
    }
}

/// One write. Map writes are syscalls; kernel writes are netlink requests.
#[derive(Clone, Debug)]
pub enum Op {
    ResetPeer(u32),
    SetFdb(Mac, FdbValue),
    SetArp(Ipv4Addr, Mac),
    SetRoute(Subnet, RouteValue),
    DelRoute(Subnet),
    DelArp(Ipv4Addr),
    DelFdb(Mac),
    Neighbour { dev: u32, ip: Ipv4Addr, mac: Mac },
    KernelFdb { dev: u32, mac: Mac, dst: Ipv4Addr },
    Route { dev: u32, dst: Subnet, gw: Ipv4Addr },
    DelKernelRoute(KernelRoute),
    DelNeighbour(KernelNeigh),
    DelKernelFdb(KernelFdbEntry),
}

impl Op {
    pub fn is_map(&self) -> bool {
        matches!(
            self,
            Op::ResetPeer(_)
                | Op::SetFdb(..)
                | Op::SetArp(..)
                | Op::SetRoute(..)
                | Op::DelRoute(_)
                | Op::DelArp(_)
                | Op::DelFdb(_)
        )
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::ResetPeer(s) => write!(f, "map peer_stats reset {s}"),
            Op::SetFdb(m, v) => write!(f, "map fdb {m} → {}", Ipv4Addr::from(v.node_ip)),
            Op::SetArp(ip, m) => write!(f, "map arp {ip} → {m}"),
            Op::SetRoute(s, v) => write!(
                f,
                "map route {s} → {} {} {}",
                Ipv4Addr::from(v.vtep_addr),
                Mac(v.vtep_mac),
                Ipv4Addr::from(v.node_ip)
            ),
            Op::DelRoute(s) => write!(f, "map route del {s}"),
            Op::DelArp(ip) => write!(f, "map arp del {ip}"),
            Op::DelFdb(m) => write!(f, "map fdb del {m}"),
            Op::Neighbour { dev, ip, mac } => {
                write!(f, "ip neigh replace {ip} lladdr {mac} dev #{dev}")
            }
            Op::KernelFdb { dev, mac, dst } => {
                write!(f, "bridge fdb replace {mac} dev #{dev} dst {dst}")
            }
            Op::Route { dev, dst, gw } => write!(f, "ip route replace {dst} via {gw} dev #{dev}"),
            Op::DelKernelRoute(r) => write!(f, "ip route del {}", r.dst),
            Op::DelNeighbour(n) => write!(f, "ip neigh del {}", n.ip),
            Op::DelKernelFdb(e) => write!(f, "bridge fdb del {} dst {}", e.mac, e.dst),
        }
    }
}

/// Phases in order; the writes of one phase are independent of each other
/// (kernel ones may be in flight together).
#[derive(Debug, Default)]
pub struct Plan {
    pub phases: Vec<(&'static str, Vec<Op>)>,
}

impl Plan {
    pub fn len(&self) -> usize {
        self.phases.iter().map(|(_, ops)| ops.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn phase(&mut self, name: &'static str, ops: Vec<Op>) {
        if !ops.is_empty() {
            self.phases.push((name, ops));
        }
    }
}

/// Two sorted maps walked together, each key once with its value on either
/// side: a diff in one ordered pass instead of a lookup per entry.
pub(crate) fn join<'a, K: Ord, A, B>(
    a: &'a BTreeMap<K, A>,
    b: &'a BTreeMap<K, B>,
) -> impl Iterator<Item = (&'a K, Option<&'a A>, Option<&'a B>)> {
    let (mut a, mut b) = (a.iter().peekable(), b.iter().peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some((ka, _)), Some((kb, _))) => match ka.cmp(kb) {
            std::cmp::Ordering::Less => a.next().map(|(k, v)| (k, Some(v), None)),
            std::cmp::Ordering::Greater => b.next().map(|(k, v)| (k, None, Some(v))),
            std::cmp::Ordering::Equal => {
                let (k, va) = a.next()?;
                let (_, vb) = b.next()?;
                Some((k, Some(va), Some(vb)))
            }
        },
        (Some(_), None) => a.next().map(|(k, v)| (k, Some(v), None)),
        (None, Some(_)) => b.next().map(|(k, v)| (k, None, Some(v))),
        (None, None) => None,
    })
}

/// The writes that bring `seen` to `want`.
pub fn plan(want: &Desired, seen: &Observed, scope: &Scope, mode: &Mode) -> Plan {
    let mut p = Plan::default();
    let no_maps = MapView::default();
    let maps = seen.maps.as_ref();
    let have = maps.unwrap_or(&no_maps);
    let network = &scope.network;

    // Each node keeps its stats slot; a slot new to a node is zeroed first.
    let held: HashSet<(Ipv4Addr, u32)> = have
        .fdb
        .values()
        .map(|v| (Ipv4Addr::from(v.node_ip), v.peer_slot))
        .collect();
    let slots = assign_slots(want, held.iter().copied());
    let subnets = want.subnet_by_mac();

    // Kernel entries on flannel.1 this mode wants: (dst → gateway), (ip → mac).
    let (k_routes, k_neigh): (BTreeMap<Subnet, Ipv4Addr>, BTreeMap<Ipv4Addr, Mac>) =
        match (mode.routes, scope.vtep) {
            (KernelRoutes::PerNode, Some(_)) => (want.routes.clone(), want.arp.clone()),
            (KernelRoutes::Network, Some(v)) => (
                BTreeMap::from([(*network, v.gateway)]),
                BTreeMap::from([(v.gateway, v.mac)]),
            ),
            _ => (BTreeMap::new(), BTreeMap::new()),
        };
    let touch_vtep = mode.routes != KernelRoutes::Untouched;

    // Map entries that go, found by the same ordered walks, deleted in the
    // later phases.
    let (mut stale_fdb, mut stale_arp, mut stale_routes) = (Vec::new(), Vec::new(), Vec::new());

    // 1. FDB map.
    let mut ops = Vec::new();
    if maps.is_some() {
        for (mac, want_ip, have_v) in join(&want.fdb, &have.fdb) {
            let Some(ip) = want_ip else {
                stale_fdb.push(Op::DelFdb(*mac));
                continue;
            };
            let slot = slots[ip];
            let v = Tables::fdb_value(*ip, slot, subnets.get(mac).copied());
            if have_v != Some(&v) {
                if !held.contains(&(*ip, slot)) {
                    ops.push(Op::ResetPeer(slot));
                }
                ops.push(Op::SetFdb(*mac, v));
            }
        }
    }
    p.phase("fdb map", ops);

    // 2. ARP map and neighbours on flannel.1.
    let mut ops = Vec::new();
    if maps.is_some() {
        for (vtep, want_mac, have_mac) in join(&want.arp, &have.arp) {
            match want_mac {
                None => stale_arp.push(Op::DelArp(*vtep)),
                Some(mac) if have_mac != Some(mac) => ops.push(Op::SetArp(*vtep, *mac)),
                Some(_) => {}
            }
        }
    }
    if let Some(v) = scope.vtep {
        let have_neigh: BTreeMap<Ipv4Addr, (Option<Mac>, bool)> = seen
            .neighbours
            .iter()
            .map(|n| (n.ip, (n.mac, n.permanent)))
            .collect();
        for (ip, mac) in &k_neigh {
            if have_neigh.get(ip) != Some(&(Some(*mac), true)) {
                ops.push(Op::Neighbour {
                    dev: v.index,
                    ip: *ip,
                    mac: *mac,
                });
            }
        }
    }
    p.phase("arp", ops);

    // 3. Kernel FDB, only for the kernel data path (after the neighbour, as flanneld).
    let mut ops = Vec::new();
    if let (Some(v), KernelFdb::Program) = (scope.vtep, mode.fdb) {
        let have: BTreeSet<(Mac, Ipv4Addr)> = seen.fdb.iter().map(|k| (k.mac, k.dst)).collect();
        for (mac, ip) in &want.fdb {
            if !have.contains(&(*mac, *ip)) {
                ops.push(Op::KernelFdb {
                    dev: v.index,
                    mac: *mac,
                    dst: *ip,
                });
            }
        }
    }
    p.phase("kernel fdb", ops);

    // 4. Routes, last on add: the route map, flannel.1's routes, direct routes.
    let mut ops = Vec::new();
    if maps.is_some() {
        for (dst, want_vtep, have_v) in join(&want.routes, &have.routes) {
            let Some(vtep) = want_vtep else {
                stale_routes.push(Op::DelRoute(*dst));
                continue;
            };
            let Some(mac) = want.arp.get(vtep) else {
                continue;
            };
            let Some(ip) = want.fdb.get(mac) else {
                continue;
            };
            let v = Tables::route_value(*dst, *mac, *ip, slots[ip]);
            if have_v != Some(&v) {
                ops.push(Op::SetRoute(*dst, v));
            }
        }
    }
    if let Some(v) = scope.vtep {
        let have: BTreeSet<(Subnet, Option<Ipv4Addr>)> = seen
            .routes_via(v.index, network)
            .map(|r| (r.dst, r.gateway))
            .collect();
        for (dst, gw) in &k_routes {
            if !have.contains(&(*dst, Some(*gw))) {
                ops.push(Op::Route {
                    dev: v.index,
                    dst: *dst,
                    gw: *gw,
                });
            }
        }
    }
    if mode.direct {
        let have: BTreeSet<(Subnet, Option<Ipv4Addr>)> = seen
            .routes_via(scope.underlay_index, network)
            .map(|r| (r.dst, r.gateway))
            .collect();
        for (dst, gw) in &want.direct {
            if !have.contains(&(*dst, Some(*gw))) {
                ops.push(Op::Route {
                    dev: scope.underlay_index,
                    dst: *dst,
                    gw: *gw,
                });
            }
        }
    }
    p.phase("routes", ops);

    // 5. Stale routes, first on delete: the kernel's, then the map's.
    let mut ops = Vec::new();
    if let Some(v) = scope.vtep.filter(|_| touch_vtep) {
        for r in seen.routes_via(v.index, network) {
            if k_routes.get(&r.dst) != r.gateway.as_ref() {
                ops.push(Op::DelKernelRoute(r.clone()));
            }
        }
    }
    if mode.direct {
        for r in seen.routes_via(scope.underlay_index, network) {
            if want.direct.get(&r.dst) != r.gateway.as_ref() {
                ops.push(Op::DelKernelRoute(r.clone()));
            }
        }
    }
    p.phase("stale kernel routes", ops);
    p.phase("stale route map", stale_routes);

    // 6. Stale neighbours: any on flannel.1 this mode does not want (flanneld's too).
    let mut ops = stale_arp;
    if touch_vtep && scope.vtep.is_some() {
        ops.extend(
            seen.neighbours
                .iter()
                .filter(|n| !k_neigh.contains_key(&n.ip))
                .map(|n| Op::DelNeighbour(n.clone())),
        );
    }
    p.phase("stale arp", ops);

    // 7. Stale FDB entries, last: map entries of vanished nodes; kernel
    // entries as the mode says.
    let mut ops = stale_fdb;
    if scope.vtep.is_some() {
        ops.extend(
            seen.fdb
                .iter()
                .filter(|k| match mode.fdb {
                    KernelFdb::Program => want.fdb.get(&k.mac) != Some(&k.dst),
                    KernelFdb::Remove => true,
                    KernelFdb::Keep => false,
                })
                .map(|k| Op::DelKernelFdb(k.clone())),
        );
    }
    p.phase("stale fdb", ops);
    p
}
