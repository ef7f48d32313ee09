//! Leases → desired tables → diff against the maps and kernel tables → apply.
//!
//! Order keeps every packet on a whole entry: on add the FDB entry (what the
//! datapath reads), then the neighbour, then the route last; on delete the
//! route first, then the neighbour, then the FDB entry.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use crate::{
    lease::{Lease, LeaseBackend},
    mac::Mac,
    netlink::Netlink,
    subnet::Subnet,
    tables::Tables,
};

/// The tables Flannel would program for a set of peer leases.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    pub fdb: BTreeMap<Mac, Ipv4Addr>,
    pub arp: BTreeMap<Ipv4Addr, Mac>,
    pub routes: BTreeMap<Subnet, Ipv4Addr>,
    /// DirectRouting and host-gw: remote subnet → node public IP, routed on
    /// the underlay without VXLAN.
    pub direct: BTreeMap<Subnet, Ipv4Addr>,
}

/// This node, as the reconciler needs it.
pub struct Own {
    pub subnet: Subnet,
    pub network: Subnet,
    pub public_ip: Ipv4Addr,
    /// This node's backend: peers must announce the same one.
    pub backend: LeaseBackend,
    /// The underlay interface, for DirectRouting and host-gw routes.
    pub underlay_index: u32,
    pub underlay_name: String,
}

impl Desired {
    /// Each VtepMAC's pod subnet (its lease): the inner sources it may use.
    pub fn subnet_by_mac(&self) -> BTreeMap<Mac, Subnet> {
        self.routes
            .iter()
            .filter_map(|(subnet, vtep)| Some((*self.arp.get(vtep)?, *subnet)))
            .collect()
    }

    /// DirectRouting: peers whose public IP is on-link get `<subnet> via
    /// <PublicIP>` on the underlay and no VXLAN entries; the others keep them.
    pub fn with_direct_routing(mut self, onlink: impl Fn(Ipv4Addr) -> bool) -> Desired {
        let mut direct = BTreeMap::new();
        for (subnet, vtep) in &self.routes {
            let ip = self.arp.get(vtep).and_then(|mac| self.fdb.get(mac));
            if let Some(ip) = ip.filter(|ip| onlink(**ip)) {
                direct.insert(*subnet, *ip);
            }
        }
        for (subnet, ip) in &direct {
            if let Some(vtep) = self.routes.remove(subnet)
                && let Some(mac) = self.arp.remove(&vtep)
                && self.fdb.get(&mac) == Some(ip)
                && !self.arp.values().any(|m| *m == mac)
            {
                self.fdb.remove(&mac);
            }
        }
        self.direct = direct;
        self
    }

    /// host-gw: a peer whose public IP is not on-link cannot be reached by a
    /// route alone; its lease is taken out and returned with the reason.
    pub fn retain_on_link(
        &mut self,
        onlink: impl Fn(Ipv4Addr) -> bool,
        underlay: &str,
    ) -> Vec<(Subnet, String)> {
        let mut skipped = Vec::new();
        self.direct.retain(|subnet, ip| {
            let keep = onlink(*ip);
            if !keep {
                skipped.push((
                    *subnet,
                    format!(
                        "host-gw cannot reach node {ip}: it is not on-link on {underlay} (a route to it has a gateway); host-gw needs every node on one L2 segment, use Backend.Type vxlan (with DirectRouting) across routers"
                    ),
                ));
            }
            keep
        });
        skipped
    }

    /// Peers from `leases`; a lease that cannot be used is skipped with a
    /// reason. One rule for every source: the subnet inside the Network and
    /// overlapping no other lease (nor ours), a public IP a node can have,
    /// the backend ours, the VtepMAC not ours and not another node's.
    ///
    /// `live` is what the previous pass applied: where two leases conflict
    /// (overlapping subnets, one VtepMAC on two nodes), the live one stays
    /// and only the newcomer is skipped, so a bogus lease never evicts a
    /// working peer. Where neither is live, both are skipped: which one is
    /// right cannot be told from here, and either would misroute the other.
    pub fn from_leases<'a>(
        leases: impl IntoIterator<Item = &'a Lease>,
        own: &Own,
        live: &Desired,
    ) -> (Desired, Vec<(Subnet, String)>) {
        let mut d = Desired::default();
        let mut skipped = Vec::new();
        let leases: Vec<&Lease> = leases.into_iter().collect();
        let is_live = |s: &Subnet| live.routes.contains_key(s) || live.direct.contains_key(s);
        // Every node announcing each VtepMAC.
        let mut mac_nodes: BTreeMap<Mac, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for l in &leases {
            if let LeaseBackend::Vxlan { vtep_mac } = l.backend {
                mac_nodes.entry(vtep_mac).or_default().insert(l.public_ip);
            }
        }
        for l in &leases {
            if l.subnet == own.subnet {
                continue;
            }
            let overlap = leases
                .iter()
                .map(|o| o.subnet)
                .chain([own.subnet])
                .filter(|o| *o != l.subnet && o.overlaps(&l.subnet))
                // A live lease keeps its place against newcomers.
                .find(|o| *o == own.subnet || !is_live(&l.subnet) || is_live(o));
            let why = if !own.network.contains_subnet(&l.subnet) {
                Some(format!("subnet is outside the Network {}", own.network))
            } else if let Some(o) = overlap {
                Some(if o == own.subnet {
                    format!("subnet overlaps this node's subnet {o}")
                } else if is_live(&o) {
                    format!("subnet overlaps the live lease {o}")
                } else {
                    format!("subnet overlaps the lease {o}")
                })
            } else if let Some(why) = unusable_public_ip(l.public_ip) {
                Some(format!("PublicIP {} is {why}", l.public_ip))
            } else if l.public_ip == own.public_ip {
                Some(format!(
                    "PublicIP {} is this node's, but the subnet is not our lease",
                    l.public_ip
                ))
            } else if l.backend.type_name() != own.backend.type_name() {
                // flanneld ignores such a lease with a warning too.
                Some(format!(
                    "BackendType {} differs from this node's {}",
                    l.backend.type_name(),
                    own.backend.type_name()
                ))
            } else if let LeaseBackend::Vxlan { vtep_mac } = l.backend {
                let others: Vec<String> = mac_nodes
                    .get(&vtep_mac)
                    .into_iter()
                    .flatten()
                    .filter(|ip| **ip != l.public_ip)
                    .map(Ipv4Addr::to_string)
                    .collect();
                let holder = live.fdb.get(&vtep_mac);
                if Some(vtep_mac) == own.backend.vtep_mac() {
                    Some(format!("VtepMAC {vtep_mac} is this node's"))
                } else if others.is_empty() || holder == Some(&l.public_ip) {
                    None
                } else if let Some(ip) = holder {
                    Some(format!("VtepMAC {vtep_mac} is already used by node {ip}"))
                } else {
                    Some(format!(
                        "VtepMAC {vtep_mac} is also announced by node {}",
                        others.join(", ")
                    ))
                }
            } else {
                None
            };
            if let Some(why) = why {
                skipped.push((l.subnet, why));
                continue;
            }
            match l.backend {
                LeaseBackend::Vxlan { vtep_mac } => {
                    d.fdb.insert(vtep_mac, l.public_ip);
                    d.arp.insert(l.subnet.vtep_addr(), vtep_mac);
                    d.routes.insert(l.subnet, l.subnet.vtep_addr());
                }
                LeaseBackend::HostGw => {
                    d.direct.insert(l.subnet, l.public_ip);
                }
            }
        }
        (d, skipped)
    }
}

/// Why no node can have `ip` as its public (underlay) address.
fn unusable_public_ip(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else {
        None
    }
}

/// The map side of the tables, empty for the kernel data path.
#[derive(Default)]
struct MapView {
    fdb: BTreeMap<Mac, (Ipv4Addr, u32)>,
    fdb_values: BTreeMap<Mac, flannel_ebpf_common::FdbValue>,
    arp: BTreeMap<Ipv4Addr, Mac>,
    routes: BTreeMap<Subnet, Ipv4Addr>,
}

/// What one reconcile pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub changes: usize,
    pub errors: Vec<String>,
}

/// Netlink requests in flight at once: the kernel answers them in order on one
/// socket, so a phase costs one round trip per batch, not per entry.
const NETLINK_PIPELINE: usize = 256;

impl Outcome {
    /// Run one phase's kernel updates, many in flight, and record each result.
    async fn record_all<F: std::future::Future<Output = anyhow::Result<()>>>(
        &mut self,
        updates: Vec<F>,
    ) {
        use futures::StreamExt;
        let results: Vec<_> = futures::stream::iter(updates)
            .buffer_unordered(NETLINK_PIPELINE)
            .collect()
            .await;
        for r in results {
            self.record(r);
        }
    }

    fn record(&mut self, what: anyhow::Result<()>) {
        match what {
            Ok(()) => self.changes += 1,
            Err(e) => {
                log::warn!("{e:#}");
                self.errors.push(format!("{e:#}"));
            }
        }
    }
}

/// What to do with kernel FDB entries on flannel.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFdb {
    /// `--datapath kernel`: the kernel's FDB is the data path; program it.
    Program,
    /// The eBPF programs are attached and read the FDB map: kernel entries
    /// (flanneld's leftovers) are stale, remove them.
    Remove,
    /// The eBPF maps are being filled before the programs attach: the kernel
    /// still carries the traffic (a takeover), leave its entries alone.
    Keep,
}

/// Bring the tables to `want`: the maps when given (the eBPF data path), the
/// neighbours and routes on flannel.1, and the kernel FDB as `kernel_fdb`
/// says. Without a VTEP device (host-gw) only the routes on the underlay are
/// kept.
pub async fn apply(
    want: &Desired,
    mut tables: Option<&mut Tables>,
    nl: &Netlink,
    vtep: Option<u32>,
    own: &Own,
    kernel_fdb: KernelFdb,
) -> anyhow::Result<Outcome> {
    let Some(vtep_index) = vtep else {
        if !(want.fdb.is_empty() && want.arp.is_empty() && want.routes.is_empty()) {
            anyhow::bail!("VXLAN entries are wanted but this node has no VTEP device");
        }
        let mut out = Outcome::default();
        apply_direct(want, nl, own, &mut out).await?;
        return Ok(out);
    };
    let mut out = Outcome::default();
    let view = match tables.as_deref() {
        Some(t) => {
            let values = t.fdb_values()?;
            MapView {
                fdb: values
                    .iter()
                    .map(|(m, v)| (*m, (Ipv4Addr::from(v.node_ip), v.peer_slot)))
                    .collect(),
                fdb_values: values,
                arp: t.arp_entries()?,
                routes: t.route_entries()?,
            }
        }
        None => MapView::default(),
    };
    let (fdb, arp, routes) = (&view.fdb, &view.arp, &view.routes);
    let kfdb = nl.fdb_entries(vtep_index).await?;
    let kroutes: Vec<_> = nl
        .routes_via(vtep_index)
        .await?
        .into_iter()
        .filter(|r| own.network.contains_subnet(&r.dst))
        .collect();
    let kneigh = nl.neighbours(vtep_index).await?;

    // 1. FDB map: what the datapath reads, first. Each node keeps its stats slot.
    if let Some(t) = tables.as_deref_mut() {
        let slots = assign_slots(want, fdb);
        let subnets = want.subnet_by_mac();
        for (mac, ip) in &want.fdb {
            let slot = slots[ip];
            let v = Tables::fdb_value(*ip, slot, subnets.get(mac).copied());
            if view.fdb_values.get(mac) != Some(&v) {
                if !fdb.values().any(|(i, s)| *s == slot && i == ip) {
                    // A slot new to this node: it must not inherit another node's counts.
                    out.record(t.reset_peer(slot));
                }
                out.record(t.set_fdb(*mac, v));
            }
        }
    }
    // 2. ARP: map and kernel neighbour.
    let have_neigh: BTreeMap<Ipv4Addr, (Option<Mac>, bool)> = kneigh
        .iter()
        .map(|n| (n.ip, (n.mac, n.permanent)))
        .collect();
    let mut neigh_adds = Vec::new();
    for (vtep, mac) in &want.arp {
        if let Some(t) = tables.as_deref_mut()
            && arp.get(vtep) != Some(mac)
        {
            out.record(t.set_arp(*vtep, *mac));
        }
        if have_neigh.get(vtep) != Some(&(Some(*mac), true)) {
            neigh_adds.push(nl.replace_neighbour(vtep_index, *vtep, *mac));
        }
    }
    out.record_all(neigh_adds).await;
    // 2b. Kernel FDB, only for the kernel data path (after the neighbour, as flanneld).
    if kernel_fdb == KernelFdb::Program {
        let fdb_adds: Vec<_> = want
            .fdb
            .iter()
            .filter(|(mac, ip)| !kfdb.iter().any(|k| k.mac == **mac && k.dst == **ip))
            .map(|(mac, ip)| nl.replace_fdb(vtep_index, *mac, *ip))
            .collect();
        out.record_all(fdb_adds).await;
    }
    // 3. Routes, last on add.
    let have_route: BTreeMap<Subnet, Option<Ipv4Addr>> =
        kroutes.iter().map(|r| (r.dst, r.gateway)).collect();
    let mut route_adds = Vec::new();
    for (dst, vtep) in &want.routes {
        if let Some(t) = tables.as_deref_mut()
            && routes.get(dst) != Some(vtep)
        {
            out.record(t.set_route(*dst, *vtep));
        }
        if have_route.get(dst) != Some(&Some(*vtep)) {
            route_adds.push(nl.replace_route(vtep_index, *dst, *vtep));
        }
    }
    out.record_all(route_adds).await;
    // 3b. DirectRouting routes on the underlay (replacing a VXLAN route for the same subnet).
    apply_direct(want, nl, own, &mut out).await?;
    // 4. Stale routes, first on delete: kernel, then map.
    let route_dels: Vec<_> = kroutes
        .iter()
        .filter(|r| want.routes.get(&r.dst) != r.gateway.as_ref())
        .map(|r| nl.delete_route(r))
        .collect();
    out.record_all(route_dels).await;
    if let Some(t) = tables.as_deref_mut() {
        for dst in routes.keys().filter(|d| !want.routes.contains_key(d)) {
            out.record(t.del_route(*dst));
        }
    }
    // 5. Stale neighbours: any on flannel.1 we do not want (flanneld leftovers too).
    let neigh_dels: Vec<_> = kneigh
        .iter()
        .filter(|n| !want.arp.contains_key(&n.ip))
        .map(|n| nl.delete_neighbour(n))
        .collect();
    out.record_all(neigh_dels).await;
    if let Some(t) = tables.as_deref_mut() {
        for vtep in arp.keys().filter(|v| !want.arp.contains_key(v)) {
            out.record(t.del_arp(*vtep));
        }
    }
    // 6. Stale FDB entries, last: map entries of vanished nodes; kernel entries
    // as `kernel_fdb` says.
    if let Some(t) = tables {
        let stale_fdb: BTreeSet<_> = fdb.keys().filter(|m| !want.fdb.contains_key(m)).collect();
        for mac in stale_fdb {
            out.record(t.del_fdb(*mac));
        }
    }
    let kfdb_dels: Vec<_> = kfdb
        .iter()
        .filter(|k| match kernel_fdb {
            KernelFdb::Program => want.fdb.get(&k.mac) != Some(&k.dst),
            KernelFdb::Remove => true,
            KernelFdb::Keep => false,
        })
        .map(|k| nl.delete_fdb(k))
        .collect();
    out.record_all(kfdb_dels).await;
    Ok(out)
}

/// Routes to peers' public IPs on the underlay (DirectRouting, host-gw): add
/// or replace what is wanted, then remove what is not.
async fn apply_direct(
    want: &Desired,
    nl: &Netlink,
    own: &Own,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let kdirect: Vec<_> = nl
        .routes_via(own.underlay_index)
        .await?
        .into_iter()
        .filter(|r| own.network.contains_subnet(&r.dst))
        .collect();
    let direct_adds: Vec<_> = want
        .direct
        .iter()
        .filter(|(dst, gw)| {
            !kdirect
                .iter()
                .any(|r| r.dst == **dst && r.gateway == Some(**gw))
        })
        .map(|(dst, gw)| nl.replace_route(own.underlay_index, *dst, *gw))
        .collect();
    out.record_all(direct_adds).await;
    let direct_dels: Vec<_> = kdirect
        .iter()
        .filter(|r| want.direct.get(&r.dst) != r.gateway.as_ref())
        .map(|r| nl.delete_route(r))
        .collect();
    out.record_all(direct_dels).await;
    Ok(())
}

/// A PEER_STATS slot per node IP: the one it has, else the lowest free. A
/// slot still named by an FDB entry that goes in this pass is not free yet
/// (the departing node's packets may still count into it until its entry is
/// deleted); it is reused, zeroed, in a later pass.
fn assign_slots(want: &Desired, fdb: &BTreeMap<Mac, (Ipv4Addr, u32)>) -> BTreeMap<Ipv4Addr, u32> {
    let mut slots: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
    for (ip, slot) in fdb.values() {
        if want.fdb.values().any(|w| w == ip) {
            slots.entry(*ip).or_insert(*slot);
        }
    }
    let mut used: BTreeSet<u32> = fdb.values().map(|(_, s)| *s).collect();
    let mut next = 0u32;
    for ip in want.fdb.values() {
        if slots.contains_key(ip) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        slots.insert(*ip, next);
        used.insert(next);
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(subnet: &str, ip: &str, mac: &str) -> Lease {
        Lease {
            subnet: Subnet::from_key(subnet).unwrap(),
            public_ip: ip.parse().unwrap(),
            backend: LeaseBackend::Vxlan {
                vtep_mac: mac.parse().unwrap(),
            },
        }
    }

    fn own() -> Own {
        Own {
            subnet: Subnet::from_key("10.244.1.0-24").unwrap(),
            network: "10.244.0.0/16".parse().unwrap(),
            public_ip: "10.1.5.10".parse().unwrap(),
            backend: LeaseBackend::Vxlan {
                vtep_mac: "02:42:8f:11:22:10".parse().unwrap(),
            },
            underlay_index: 2,
            underlay_name: "eth0".into(),
        }
    }

    #[test]
    fn one_route_arp_fdb_per_peer_like_flannel() {
        let leases = [
            lease("10.244.1.0-24", "10.1.5.10", "02:42:8f:11:22:10"),
            lease("10.244.2.0-24", "10.1.8.10", "02:42:8f:11:22:20"),
            lease("10.244.3.0-24", "10.1.9.10", "02:42:8f:11:22:30"),
        ];
        let (d, skipped) = Desired::from_leases(&leases, &own(), &Desired::default());
        assert!(skipped.is_empty());
        assert_eq!(d.routes.len(), 2);
        assert_eq!(
            d.routes[&Subnet::from_key("10.244.2.0-24").unwrap()],
            "10.244.2.0".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            d.arp[&"10.244.3.0".parse().unwrap()].to_string(),
            "02:42:8f:11:22:30"
        );
        assert_eq!(
            d.fdb[&"02:42:8f:11:22:20".parse().unwrap()],
            "10.1.8.10".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn direct_routing_takes_on_link_peers_out_of_vxlan() {
        let leases = [
            lease("10.244.2.0-24", "10.1.5.20", "02:42:8f:11:22:20"),
            lease("10.244.3.0-24", "10.1.9.10", "02:42:8f:11:22:30"),
        ];
        let (d, _) = Desired::from_leases(&leases, &own(), &Desired::default());
        let d = d.with_direct_routing(|ip| ip.octets()[2] == 5);
        assert_eq!(d.direct.len(), 1);
        assert_eq!(
            d.direct[&Subnet::from_key("10.244.2.0-24").unwrap()],
            "10.1.5.20".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!((d.routes.len(), d.arp.len(), d.fdb.len()), (1, 1, 1));
        assert!(
            d.routes
                .contains_key(&Subnet::from_key("10.244.3.0-24").unwrap())
        );
    }

    #[test]
    fn host_gw_routes_on_link_peers_and_names_the_others() {
        let own = Own {
            backend: LeaseBackend::HostGw,
            ..own()
        };
        let hostgw = |subnet: &str, ip: &str| Lease {
            subnet: Subnet::from_key(subnet).unwrap(),
            public_ip: ip.parse().unwrap(),
            backend: LeaseBackend::HostGw,
        };
        let leases = [
            hostgw("10.244.2.0-24", "10.1.5.20"),
            hostgw("10.244.3.0-24", "10.1.9.10"),
            lease("10.244.4.0-24", "10.1.5.40", "02:42:8f:11:22:40"),
        ];
        let (mut d, mut skipped) = Desired::from_leases(&leases, &own, &Desired::default());
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].1.contains("BackendType vxlan"), "{skipped:?}");
        skipped.extend(d.retain_on_link(|ip| ip.octets()[2] == 5, "eth0"));
        assert_eq!(
            d.direct,
            BTreeMap::from([(
                Subnet::from_key("10.244.2.0-24").unwrap(),
                "10.1.5.20".parse().unwrap()
            )])
        );
        assert!(d.routes.is_empty() && d.arp.is_empty() && d.fdb.is_empty());
        let why = &skipped[1];
        assert_eq!(why.0, Subnet::from_key("10.244.3.0-24").unwrap());
        assert!(
            why.1.contains("10.1.9.10") && why.1.contains("not on-link on eth0"),
            "{why:?}"
        );
    }

    #[test]
    fn peers_keep_their_stats_slot() {
        let leases = [
            lease("10.244.2.0-24", "10.1.8.10", "02:42:8f:11:22:20"),
            lease("10.244.3.0-24", "10.1.9.10", "02:42:8f:11:22:30"),
        ];
        let (d, _) = Desired::from_leases(&leases, &own(), &Desired::default());
        // 10.1.9.10 already has slot 0; the new node gets the lowest free one.
        let fdb = BTreeMap::from([(
            "02:42:8f:11:22:30".parse().unwrap(),
            ("10.1.9.10".parse().unwrap(), 0),
        )]);
        let slots = assign_slots(&d, &fdb);
        assert_eq!(slots[&"10.1.9.10".parse::<Ipv4Addr>().unwrap()], 0);
        assert_eq!(slots[&"10.1.8.10".parse::<Ipv4Addr>().unwrap()], 1);
    }

    #[test]
    fn a_departing_nodes_slot_is_not_reused_in_the_same_pass() {
        // 10.1.8.10 leaves (slot 0 still in the FDB), 10.1.9.10 arrives.
        let leases = [lease("10.244.3.0-24", "10.1.9.10", "02:42:8f:11:22:30")];
        let (d, _) = Desired::from_leases(&leases, &own(), &Desired::default());
        let fdb = BTreeMap::from([(
            "02:42:8f:11:22:20".parse().unwrap(),
            ("10.1.8.10".parse().unwrap(), 0),
        )]);
        let slots = assign_slots(&d, &fdb);
        assert_eq!(slots[&"10.1.9.10".parse::<Ipv4Addr>().unwrap()], 1);
        // Next pass: slot 0 is free again.
        let slots = assign_slots(&d, &BTreeMap::new());
        assert_eq!(slots[&"10.1.9.10".parse::<Ipv4Addr>().unwrap()], 0);
    }

    #[test]
    fn overlapping_leases_and_unusable_public_ips_are_skipped() {
        let leases = [
            // A /25 inside our /24.
            lease("10.244.1.128-25", "10.1.8.10", "02:42:8f:11:22:20"),
            // Two leases overlapping each other: neither is applied.
            lease("10.244.4.0-23", "10.1.8.11", "02:42:8f:11:22:21"),
            lease("10.244.5.0-24", "10.1.8.12", "02:42:8f:11:22:22"),
            lease("10.244.6.0-24", "0.0.0.0", "02:42:8f:11:22:23"),
            lease("10.244.7.0-24", "255.255.255.255", "02:42:8f:11:22:24"),
            lease("10.244.8.0-24", "224.0.0.5", "02:42:8f:11:22:25"),
            lease("10.244.9.0-24", "10.1.8.19", "02:42:8f:11:22:26"),
        ];
        let (d, skipped) = Desired::from_leases(&leases, &own(), &Desired::default());
        let why: BTreeMap<String, String> = skipped
            .iter()
            .map(|(s, w)| (s.to_string(), w.clone()))
            .collect();
        assert_eq!(d.routes.len(), 1, "{why:?}");
        assert!(
            d.routes
                .contains_key(&Subnet::from_key("10.244.9.0-24").unwrap())
        );
        assert!(why["10.244.1.128/25"].contains("overlaps this node's subnet 10.244.1.0/24"));
        assert!(why["10.244.4.0/23"].contains("overlaps the lease 10.244.5.0/24"));
        assert!(why["10.244.5.0/24"].contains("overlaps the lease 10.244.4.0/23"));
        assert!(why["10.244.6.0/24"].contains("unspecified"));
        assert!(why["10.244.7.0/24"].contains("broadcast"));
        assert!(why["10.244.8.0/24"].contains("multicast"));
    }

    #[test]
    fn unusable_leases_are_skipped_with_a_reason() {
        let leases = [
            lease("10.245.2.0-24", "10.1.8.10", "02:42:8f:11:22:20"),
            lease("10.244.4.0-24", "10.1.5.10", "02:42:8f:11:22:40"),
            lease("10.244.5.0-24", "10.1.9.9", "02:42:8f:11:22:10"),
            lease("10.244.6.0-24", "10.1.9.10", "02:42:8f:11:22:60"),
            lease("10.244.7.0-24", "10.1.9.11", "02:42:8f:11:22:60"),
        ];
        let (d, skipped) = Desired::from_leases(&leases, &own(), &Desired::default());
        // Two nodes announcing one VtepMAC, neither live: both are left out.
        assert!(d.routes.is_empty(), "{skipped:?}");
        assert_eq!(skipped.len(), 5);
        assert!(skipped[0].1.contains("outside"));
        assert!(skipped[1].1.contains("is this node's"));
        assert!(
            skipped[2]
                .1
                .contains("VtepMAC 02:42:8f:11:22:10 is this node's")
        );
        assert!(skipped[3].1.contains("also announced by node 10.1.9.11"));
        assert!(skipped[4].1.contains("also announced by node 10.1.9.10"));
    }

    #[test]
    fn a_newcomer_never_evicts_a_live_peer() {
        let live_peer = lease("10.244.4.0-24", "10.1.9.10", "02:42:8f:11:22:40");
        let (live, skipped) = Desired::from_leases([&live_peer], &own(), &Desired::default());
        assert!(skipped.is_empty());
        let leases = [
            live_peer,
            // A /25 inside the live /24, and a second node claiming its VtepMAC.
            lease("10.244.4.128-25", "10.1.9.11", "02:42:8f:11:22:41"),
            lease("10.244.5.0-24", "10.1.9.12", "02:42:8f:11:22:40"),
        ];
        let (d, skipped) = Desired::from_leases(&leases, &own(), &live);
        assert_eq!(d, live, "{skipped:?}");
        let why: BTreeMap<String, String> = skipped
            .iter()
            .map(|(s, w)| (s.to_string(), w.clone()))
            .collect();
        assert!(why["10.244.4.128/25"].contains("overlaps the live lease 10.244.4.0/24"));
        assert!(
            why["10.244.5.0/24"]
                .contains("VtepMAC 02:42:8f:11:22:40 is already used by node 10.1.9.10")
        );
        assert_eq!(why.len(), 2);
    }
}
