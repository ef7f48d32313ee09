//! The IPv6 half of a dual-stack overlay, on the kernel's VXLAN device
//! flannel-v6.<VNI> exactly as flanneld configures it: the device on the
//! underlay's IPv6 address, `<own subnet addr>/128` on it, and per peer an FDB
//! entry (VtepMAC → PublicIPv6), a permanent neighbour (subnet addr →
//! VtepMAC) and an onlink route (subnet via subnet addr). The kernel's
//! device carries IPv6; with the eBPF data path the ingress programs check
//! every VXLAN-over-IPv6 frame first (FDB6, CONFIG6: membership and inner
//! sources, as for IPv4), and the guard's ip6 table keeps the socket to members.
//! With DirectRouting an on-link peer gets `<subnet> via <PublicIPv6>` on the
//! underlay instead (no VXLAN); with host-gw every peer does and there is no
//! flannel-v6 at all, as flanneld's route network programs it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
};

use anyhow::Context;
use flannel_ebpf_common::{Fdb6Value, MAX_NODES, NodeConfig6, Route6Key, Route6Value};

use crate::{
    ebpf::tables::Tables,
    lease::{Lease, LeaseBackend, LeaseV6, mac::Mac, netconf::NetConf6, subnet6::Subnet6},
    netlink::{Netlink, v6::KernelRoute6},
    source::Reported,
};

/// VXLAN over IPv6: outer Ethernet is not counted by MTU, so IPv6 (40) +
/// UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN6_OVERHEAD: u32 = 70;

/// flanneld's name for the IPv6 VTEP.
pub fn vtep_name(vni: u32) -> String {
    format!("flannel-v6.{vni}")
}

/// The kernel's IPv6 tables as flanneld would program them for these leases.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired6 {
    pub fdb: BTreeMap<Mac, Ipv6Addr>,
    pub neigh: BTreeMap<Ipv6Addr, Mac>,
    pub routes: BTreeMap<Subnet6, Ipv6Addr>,
    /// DirectRouting and host-gw: subnet → the peer's public IPv6, routed
    /// on the underlay.
    pub direct: BTreeMap<Subnet6, Ipv6Addr>,
}

/// How IPv6 peers are reached (Backend.Type and DirectRouting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing6 {
    /// vxlan: every peer over flannel-v6.
    Vxlan,
    /// vxlan with DirectRouting: on-link peers by a plain route, the rest
    /// over flannel-v6.
    DirectRouting,
    /// host-gw: plain routes only; a peer that is not on-link gets none.
    HostGw,
}

/// [`Routing6`] with the on-link test of this pass (Flannel's DirectRouting
/// test: the route to the address leaves by the underlay with no gateway).
#[derive(Clone, Copy)]
pub struct Reach6<'a> {
    pub routing: Routing6,
    pub onlink: &'a dyn Fn(Ipv6Addr) -> bool,
    /// The underlay's name, for the reason a host-gw peer is skipped.
    pub underlay: &'a str,
}

impl Reach6<'static> {
    /// Every peer over flannel-v6.
    pub const VXLAN: Reach6<'static> = Reach6 {
        routing: Routing6::Vxlan,
        onlink: &|_| false,
        underlay: "",
    };
}

/// Why a peer's IPv6 half cannot be used, if it cannot.
fn unusable(v6: &LeaseV6, own: &LeaseV6, conf: &NetConf6, accepted: &Desired6) -> Option<String> {
    let s = v6.subnet;
    if v6.public_ip == own.public_ip {
        return Some(format!("PublicIPv6 {} is ours", v6.public_ip));
    }
    if !conf.network.contains_subnet(&s) || s.prefix_len() != conf.subnet_len {
        return Some(format!(
            "IPv6 subnet {s} is not a /{} of IPv6Network {}",
            conf.subnet_len, conf.network
        ));
    }
    if s.overlaps(&own.subnet) {
        return Some(format!("IPv6 subnet {s} overlaps ours ({})", own.subnet));
    }
    if let Some(o) = accepted
        .routes
        .keys()
        .chain(accepted.direct.keys())
        .find(|o| o.overlaps(&s))
    {
        return Some(format!("IPv6 subnet {s} overlaps {o}, leased first"));
    }
    let mac = v6.vtep_mac?;
    if accepted.fdb.contains_key(&mac) {
        return Some(format!("flannel-v6 VtepMAC {mac} is another node's"));
    }
    None
}

/// One FDB entry, neighbour and route per usable peer; every other lease's
/// IPv6 half is skipped with its reason. Where two conflict (one IPv6
/// subnet, one VtepMAC) the one `live` (the last pass) applied wins, then
/// the first in lease order: a newcomer never evicts a working peer.
/// `v6_only`: an IPv6-only cluster; in a dual-stack one an IPv6-only
/// node's lease does not belong and is skipped. `reach`: which peers get a
/// plain route on the underlay instead of VXLAN.
pub fn desired<'a>(
    own: &LeaseV6,
    conf: &NetConf6,
    v6_only: bool,
    reach: Reach6,
    live: &Desired6,
    leases: impl IntoIterator<Item = &'a Lease>,
    skipped: &mut Vec<(String, String)>,
) -> Desired6 {
    let mut d = Desired6::default();
    let is_live = |l: &Lease| {
        l.v6.is_some_and(|v6| {
            live.direct.get(&v6.subnet) == Some(&v6.public_ip)
                || v6.vtep_mac.is_some_and(|m| {
                    live.fdb.get(&m) == Some(&v6.public_ip)
                        && live.neigh.get(&v6.subnet.vtep_addr()) == Some(&m)
                }) && live.routes.contains_key(&v6.subnet)
        })
    };
    let (first, rest): (Vec<&Lease>, Vec<&Lease>) = leases.into_iter().partition(|l| is_live(l));
    for l in first.into_iter().chain(rest) {
        let Some(v6) = l.v6 else { continue };
        if l.v6 == Some(*own) {
            continue;
        }
        if !v6_only && !l.has_v4() {
            skipped.push((
                l.key(),
                "an IPv6-only node's lease in a dual-stack cluster (EnableIPv4 differs)".into(),
            ));
            continue;
        }
        if let Some(why) = unusable(&v6, own, conf, &d) {
            skipped.push((l.key(), why));
            continue;
        }
        if reach.routing == Routing6::HostGw {
            if l.backend != LeaseBackend::HostGw {
                skipped.push((
                    l.key(),
                    format!(
                        "BackendType {} (this node's is host-gw)",
                        l.backend.type_name()
                    ),
                ));
            } else if !(reach.onlink)(v6.public_ip) {
                skipped.push((
                    l.key(),
                    format!(
                        "host-gw cannot reach node {}: it is not on-link on {} (a route to it has a gateway); host-gw needs every node on one L2 segment, use Backend.Type vxlan (with DirectRouting) across routers",
                        v6.public_ip, reach.underlay
                    ),
                ));
            } else {
                d.direct.insert(v6.subnet, v6.public_ip);
            }
            continue;
        }
        let Some(mac) = v6.vtep_mac else {
            skipped.push((l.key(), "no flannel-v6 VtepMAC (not a vxlan lease)".into()));
            continue;
        };
        if reach.routing == Routing6::DirectRouting && (reach.onlink)(v6.public_ip) {
            d.direct.insert(v6.subnet, v6.public_ip);
            continue;
        }
        d.fdb.insert(mac, v6.public_ip);
        d.neigh.insert(v6.subnet.vtep_addr(), mac);
        d.routes.insert(v6.subnet, v6.subnet.vtep_addr());
    }
    d
}

/// The FDB6 map for `want`: every usable peer's flannel-v6 VtepMAC → its
/// public IPv6 address, IPv6 subnet and stats slot.
pub fn fdb6_entries<'a>(
    want: &Desired6,
    leases: impl IntoIterator<Item = &'a Lease>,
    slot_of: impl Fn(&Lease) -> u32,
) -> BTreeMap<Mac, Fdb6Value> {
    leases
        .into_iter()
        .filter_map(|l| {
            let v6 = l.v6?;
            let mac = v6.vtep_mac?;
            (want.fdb.get(&mac) == Some(&v6.public_ip) && want.routes.contains_key(&v6.subnet))
                .then(|| {
                    (
                        mac,
                        Fdb6Value {
                            node_ip6: v6.public_ip.octets(),
                            subnet6: v6.subnet.addr().octets(),
                            subnet6_len: v6.subnet.prefix_len(),
                            _pad: [0; 3],
                            peer_slot: slot_of(l),
                        },
                    )
                })
        })
        .collect()
}

/// The direct path's ROUTE6 table from the FDB6 entries: each member's
/// IPv6 subnet → its public IPv6 address, VtepMAC and stats slot. Only
/// subnets of our own length: the programs look them up by it (every lease
/// of one cluster has IPv6SubnetLen; one that does not stays with
/// flannel-v6's route).
pub fn route6_entries(
    fdb6: &BTreeMap<Mac, Fdb6Value>,
    subnet6_len: u8,
) -> BTreeMap<Route6Key, Route6Value> {
    fdb6.iter()
        .filter(|(_, v)| v.subnet6_len == subnet6_len)
        .map(|(mac, v)| {
            (
                Route6Key { subnet6: v.subnet6 },
                Route6Value {
                    node_ip6: v.node_ip6,
                    vtep_mac6: mac.0,
                    _pad: [0; 2],
                    peer_slot: v.peer_slot,
                },
            )
        })
        .collect()
}

/// Stats slots for IPv6-only peers (no IPv4 FDB entry to share one with):
/// the one their FDB6 entry holds, else the lowest no peer uses. Returns
/// them by flannel-v6 VtepMAC, and the newly taken ones (to be zeroed).
pub fn v6_only_slots<'a>(
    want: &Desired6,
    leases: impl IntoIterator<Item = &'a Lease>,
    v4_slots: &BTreeMap<Mac, u32>,
    held6: &BTreeMap<Mac, u32>,
) -> (BTreeMap<Mac, u32>, Vec<u32>) {
    // Only peers that get an FDB6 entry (not ours, not skipped ones).
    let macs: BTreeSet<Mac> = leases
        .into_iter()
        .filter(|l| !l.has_v4())
        .filter_map(|l| l.v6?.vtep_mac)
        .filter(|m| want.fdb.contains_key(m))
        .collect();
    let v4: BTreeSet<u32> = v4_slots.values().copied().collect();
    let mut used: BTreeSet<u32> = v4.iter().chain(held6.values()).copied().collect();
    let (mut out, mut fresh) = (BTreeMap::new(), Vec::new());
    let mut next = 0u32;
    for mac in macs {
        // Kept unless an IPv4 peer took it (left from a dual-stack run).
        if let Some(s) = held6
            .get(&mac)
            .filter(|s| **s < MAX_NODES && !v4.contains(s))
        {
            out.insert(mac, *s);
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        if next >= MAX_NODES {
            break; // more peers than slots: the rest go uncounted
        }
        used.insert(next);
        out.insert(mac, next);
        fresh.push(next);
    }
    (out, fresh)
}

/// How many kernel entries one pass added (or replaced) and removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub written: usize,
    pub removed: usize,
}

/// Make the underlay's direct routes and flannel-v6's FDB, neighbours and
/// routes exactly `want` (`vtep` 0: there is no flannel-v6, host-gw): new
/// entries in flanneld's order (FDB, neighbour, then the route that uses
/// them), stale ones in the reverse order, every stale one before any new
/// one (a peer moving between the underlay and flannel-v6 keeps its subnet
/// in one place). Kernel-made entries (link-local routes, learnt
/// neighbours) and routes outside the IPv6Network are left alone. `main`:
/// this pass's dump of the main table.
pub async fn sync(
    nl: &Netlink,
    main: &[(Option<u32>, KernelRoute6)],
    vtep: u32,
    underlay: u32,
    conf: &NetConf6,
    want: &Desired6,
) -> anyhow::Result<Changed> {
    let mut c = Changed::default();
    let ours = |r: &KernelRoute6| is_ours(r, &conf.network, conf.subnet_len);
    let via = |index: u32| {
        main.iter()
            .filter(move |(oif, _)| *oif == Some(index))
            .map(|(_, r)| r)
    };
    let direct: Vec<&KernelRoute6> = via(underlay).collect();
    for r in direct.iter().filter(|r| ours(r)) {
        if want.direct.get(&r.dst) != r.gateway.as_ref() {
            nl.delete_route6(r).await?;
            c.removed += 1;
        }
    }
    if vtep != 0 {
        sync_vtep(nl, vtep, via(vtep).filter(|r| ours(r)), want, &mut c).await?;
    }
    let have: BTreeSet<(Subnet6, Ipv6Addr)> = direct
        .iter()
        .filter_map(|r| Some((r.dst, r.gateway?)))
        .collect();
    // One route the kernel refuses (a lease naming one of our own addresses
    // as a peer's, say) does not keep the others out.
    let mut refused = Vec::new();
    for (dst, gw) in &want.direct {
        if !have.contains(&(*dst, *gw)) {
            match nl.replace_route6(underlay, *dst, *gw, false).await {
                Ok(()) => c.written += 1,
                Err(e) => refused.push(format!("{e:#}")),
            }
        }
    }
    if !refused.is_empty() {
        anyhow::bail!(
            "{} IPv6 direct routes refused: {}",
            refused.len(),
            refused.join("; ")
        );
    }
    Ok(c)
}

/// Ours: gateway routes to one subnet of the IPv6Network; anything else (a
/// route to the whole Network, say) an operator's.
fn is_ours(r: &KernelRoute6, network: &Subnet6, subnet_len: u8) -> bool {
    r.gateway.is_some() && network.contains_subnet(&r.dst) && r.dst.prefix_len() == subnet_len
}

/// IPv6 switched off: the DirectRouting and host-gw routes an earlier run
/// put on the underlay for `network`'s /`subnet_len` subnets go too.
pub async fn remove_direct_routes(
    nl: &Netlink,
    underlay: u32,
    network: &Subnet6,
    subnet_len: u8,
) -> anyhow::Result<usize> {
    let mut n = 0;
    for r in nl.routes6_via(underlay).await? {
        if is_ours(&r, network, subnet_len) {
            nl.delete_route6(&r).await?;
            n += 1;
        }
    }
    Ok(n)
}

/// flannel-v6's part of [`sync`]; `routes`: ours on flannel-v6.
async fn sync_vtep<'r>(
    nl: &Netlink,
    index: u32,
    routes: impl Iterator<Item = &'r KernelRoute6> + Clone,
    want: &Desired6,
    c: &mut Changed,
) -> anyhow::Result<()> {
    for r in routes.clone() {
        if want.routes.get(&r.dst) != r.gateway.as_ref() {
            nl.delete_route6(r).await?;
            c.removed += 1;
        }
    }
    let neigh = nl.neighbours6(index).await?;
    for n in neigh.iter().filter(|n| n.permanent) {
        if n.mac.is_none() || want.neigh.get(&n.ip) != n.mac.as_ref() {
            nl.delete_neighbour6(n).await?;
            c.removed += 1;
        }
    }
    let fdb = nl.fdb6_entries(index).await?;
    for e in &fdb {
        if want.fdb.get(&e.mac) != Some(&e.dst) {
            nl.delete_fdb6(e).await?;
            c.removed += 1;
        }
    }
    let have_fdb: BTreeSet<(Mac, Ipv6Addr)> = fdb.iter().map(|e| (e.mac, e.dst)).collect();
    for (mac, dst) in &want.fdb {
        if !have_fdb.contains(&(*mac, *dst)) {
            nl.replace_fdb6(index, *mac, *dst).await?;
            c.written += 1;
        }
    }
    let have_neigh: BTreeSet<(Ipv6Addr, Mac)> = neigh
        .iter()
        .filter(|n| n.permanent)
        .filter_map(|n| Some((n.ip, n.mac?)))
        .collect();
    for (ip, mac) in &want.neigh {
        if !have_neigh.contains(&(*ip, *mac)) {
            nl.replace_neighbour6(index, *ip, *mac).await?;
            c.written += 1;
        }
    }
    let have_routes: BTreeSet<(Subnet6, Ipv6Addr)> =
        routes.filter_map(|r| Some((r.dst, r.gateway?))).collect();
    for (dst, gw) in &want.routes {
        if !have_routes.contains(&(*dst, *gw)) {
            nl.replace_route6(index, *dst, *gw, true).await?;
            c.written += 1;
        }
    }
    Ok(())
}

/// The IPv6 overlay as it runs: flannel-v6's index, our IPv6 lease, and the
/// peers already reported as unusable (each said once per reason).
pub struct Overlay6 {
    /// flannel-v6's index; 0 with host-gw (no VTEP).
    pub index: u32,
    /// The underlay: where DirectRouting and host-gw routes go.
    pub underlay: (u32, String),
    pub routing: Routing6,
    /// flannel-v6's MTU (0 until it exists): what the direct path may send.
    pub vtep6_mtu: u32,
    pub own: LeaseV6,
    pub conf: NetConf6,
    /// An IPv6-only cluster (EnableIPv4 false).
    pub v6_only: bool,
    /// What the last pass applied (conflicts keep its peers).
    applied: Desired6,
    reported: Reported,
    /// The last pass's usable IPv6 peers and skipped IPv6 halves (metrics).
    pub peers: usize,
    pub skipped: usize,
}

impl Overlay6 {
    pub fn new(
        own: LeaseV6,
        conf: NetConf6,
        v6_only: bool,
        routing: Routing6,
        underlay: (u32, String),
    ) -> Overlay6 {
        Overlay6 {
            index: 0,
            underlay,
            routing,
            vtep6_mtu: 0,
            own,
            conf,
            v6_only,
            applied: Desired6::default(),
            reported: Reported::default(),
            peers: 0,
            skipped: 0,
        }
    }

    /// The peers' public IPv6 addresses: the guard's ip6 members.
    pub fn members<'a>(&self, leases: impl IntoIterator<Item = &'a Lease>) -> BTreeSet<Ipv6Addr> {
        leases
            .into_iter()
            .filter(|l| self.v6_only || l.has_v4())
            .filter_map(|l| l.v6)
            .filter(|v6| v6.public_ip != self.own.public_ip && v6.vtep_mac.is_some())
            .map(|v6| v6.public_ip)
            .collect()
    }

    /// What the eBPF programs check VXLAN over IPv6 against (CONFIG6).
    pub fn node_config(&self) -> NodeConfig6 {
        NodeConfig6 {
            ready: 1,
            public_ip6: self.own.public_ip.octets(),
            network6: self.conf.network.addr().octets(),
            vtep_mac6: self.own.vtep_mac.map_or([0; 6], |m| m.0),
            network6_len: self.conf.network.prefix_len(),
            subnet6_len: self.own.subnet.prefix_len(),
            subnet6: self.own.subnet.addr().octets(),
            vtep6_mtu: self.vtep6_mtu,
        }
    }

    /// One pass over the kernel's IPv6 tables for this snapshot, and the
    /// programs' FDB6 mirror of them when the eBPF data path runs (each
    /// member under its IPv4 lease's stats slot).
    pub async fn sync<'a>(
        &mut self,
        nl: &Netlink,
        leases: impl IntoIterator<Item = &'a Lease> + Clone,
        tables: Option<&Tables>,
    ) -> anyhow::Result<Changed> {
        let mut skipped = Vec::new();
        // The on-link test against this pass's routes: a peer that moves
        // behind a router (or back) changes sides at the next pass.
        let main = nl.routes6().await?;
        let onlink = |ip| crate::netlink::v6::onlink6(&main, self.underlay.0, ip);
        let reach = Reach6 {
            routing: self.routing,
            onlink: &onlink,
            underlay: &self.underlay.1,
        };
        let want = desired(
            &self.own,
            &self.conf,
            self.v6_only,
            reach,
            &self.applied,
            leases.clone(),
            &mut skipped,
        );
        if let Some(t) = tables {
            let slots: BTreeMap<Mac, u32> = t
                .fdb_values()?
                .into_iter()
                .map(|(m, v)| (m, v.peer_slot))
                .collect();
            let held6: BTreeMap<Mac, u32> = t
                .fdb6_values()?
                .into_iter()
                .map(|(m, v)| (m, v.peer_slot))
                .collect();
            let (own_slots, fresh) = if self.v6_only {
                v6_only_slots(&want, leases.clone(), &slots, &held6)
            } else {
                Default::default()
            };
            for r in t.reset_peers(&fresh) {
                r.context("zeroing an IPv6-only peer's stats slot")?;
            }
            let entries = fdb6_entries(&want, leases, |l| {
                let slot = if l.has_v4() {
                    l.backend.vtep_mac().and_then(|m| slots.get(&m))
                } else {
                    l.v6.and_then(|v6| v6.vtep_mac)
                        .and_then(|m| own_slots.get(&m))
                };
                slot.copied().unwrap_or(u32::MAX)
            });
            t.sync_fdb6(&entries)?;
            t.sync_route6(&route6_entries(&entries, self.own.subnet.prefix_len()))?;
            t.set_config6(Some(self.node_config()))?;
        }
        for (key, why) in &skipped {
            if self.reported.report(key, why) {
                log::warn!("skipping the IPv6 half of lease {key}: {why}");
            }
        }
        self.reported
            .retain(|k| skipped.iter().any(|(key, _)| key == k));
        let peers = want.routes.len() + want.direct.len();
        (self.peers, self.skipped) = (peers, skipped.len());
        let c = sync(nl, &main, self.index, self.underlay.0, &self.conf, &want).await?;
        self.applied = want.clone();
        if c != Changed::default() {
            log::info!(
                "IPv6: {peers} peers ({} over flannel-v6, {} routed on {}); {} kernel entries written, {} removed",
                want.routes.len(),
                want.direct.len(),
                self.underlay.1,
                c.written,
                c.removed
            );
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::{LeaseBackend, netconf::NetConf};

    #[test]
    fn route6_holds_members_of_our_subnet_length_by_network_address() {
        let entry = |ip: &str, subnet: &str, len: u8, slot: u32| Fdb6Value {
            node_ip6: ip.parse::<Ipv6Addr>().unwrap().octets(),
            subnet6: subnet.parse::<Ipv6Addr>().unwrap().octets(),
            subnet6_len: len,
            _pad: [0; 3],
            peer_slot: slot,
        };
        let (m1, m2) = (Mac([2, 0, 0, 0, 0, 1]), Mac([2, 0, 0, 0, 0, 2]));
        let fdb6 = BTreeMap::from([
            (m1, entry("fc00::11", "fd00:10:244:2::", 64, 3)),
            // Another length: the programs' exact lookup could not find it.
            (m2, entry("fc00::12", "fd00:10:244:3::", 80, 4)),
        ]);
        let routes = route6_entries(&fdb6, 64);
        assert_eq!(routes.len(), 1, "{routes:?}");
        let key = Route6Key {
            subnet6: "fd00:10:244:2::".parse::<Ipv6Addr>().unwrap().octets(),
        };
        let v = routes[&key];
        assert_eq!(v.node_ip6, "fc00::11".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!((v.vtep_mac6, v.peer_slot), (m1.0, 3));
    }

    fn conf() -> NetConf6 {
        NetConf::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap()
        .ipv6
        .unwrap()
    }

    /// [`desired`] in the test IPv6Network, with the skipped halves.
    fn desired_of<'a>(
        own: &LeaseV6,
        v6_only: bool,
        reach: Reach6,
        live: &Desired6,
        leases: impl IntoIterator<Item = &'a Lease>,
    ) -> (Desired6, Vec<(String, String)>) {
        let mut skipped = Vec::new();
        let d = desired(own, &conf(), v6_only, reach, live, leases, &mut skipped);
        (d, skipped)
    }

    fn lease(n: u8, s6: &str, mac6: Option<&[u8]>) -> Lease {
        Lease {
            subnet: format!("10.244.{n}.0/24").parse().unwrap(),
            public_ip: format!("10.1.5.{n}").parse().unwrap(),
            backend: LeaseBackend::Vxlan {
                vtep_mac: Mac::stable_from(&[n]),
            },
            v6: Some(LeaseV6 {
                subnet: s6.parse().unwrap(),
                public_ip: format!("fc00::{n}").parse().unwrap(),
                vtep_mac: mac6.map(Mac::stable_from),
            }),
        }
    }

    #[test]
    fn one_fdb_neighbour_and_route_per_peer_like_flanneld() {
        let own = lease(1, "fd00:10:244:1::/64", Some(b"1")).v6.unwrap();
        let peers = [
            lease(1, "fd00:10:244:1::/64", Some(b"1")),
            lease(2, "fd00:10:244:2::/64", Some(b"2")),
            Lease {
                v6: None,
                ..lease(3, "fd00:10:244:3::/64", Some(b"3"))
            },
        ];
        let (d, skipped) = desired_of(&own, false, Reach6::VXLAN, &Desired6::default(), &peers);
        let s2: Subnet6 = "fd00:10:244:2::/64".parse().unwrap();
        assert_eq!(d.routes, BTreeMap::from([(s2, s2.addr())]));
        assert_eq!(
            d.neigh,
            BTreeMap::from([(s2.addr(), Mac::stable_from(b"2"))])
        );
        assert_eq!(
            d.fdb,
            BTreeMap::from([(Mac::stable_from(b"2"), "fc00::2".parse().unwrap())])
        );
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn the_fdb6_map_holds_the_usable_peers_under_their_slots() {
        let own = lease(1, "fd00:10:244:1::/64", Some(b"1")).v6.unwrap();
        let peers = [
            lease(2, "fd00:10:244:2::/64", Some(b"2")),
            lease(3, "fd00:99::/64", Some(b"3")),
        ];
        let (d, _) = desired_of(&own, false, Reach6::VXLAN, &Desired6::default(), &peers);
        let m = fdb6_entries(&d, &peers, |l| u32::from(l.public_ip.octets()[3]));
        assert_eq!(m.len(), 1);
        let v = m[&Mac::stable_from(b"2")];
        assert_eq!(v.node_ip6, "fc00::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(
            (v.subnet6, v.subnet6_len, v.peer_slot),
            (
                "fd00:10:244:2::".parse::<Ipv6Addr>().unwrap().octets(),
                64,
                2
            )
        );
    }

    #[test]
    fn ipv6_only_peers_get_their_own_stats_slots_and_keep_them() {
        let v6_only = |n: u8| {
            let mac = Mac::stable_from(&[n]);
            Lease::v6_only(
                format!("fd00:10:244:{n}::/64").parse().unwrap(),
                "vxlan",
                Some(&format!("fc00::{n}")),
                Some(serde_json::json!({"VNI": 1, "VtepMAC": mac.to_string()})),
            )
            .unwrap()
            .unwrap()
        };
        let (a, b, c) = (v6_only(2), v6_only(3), v6_only(4));
        let mac = |l: &Lease| l.v6.unwrap().vtep_mac.unwrap();
        // Slot 0 is an IPv4 peer's; b already holds 5.
        let v4 = BTreeMap::from([(Mac::stable_from(b"v4"), 0)]);
        let held = BTreeMap::from([(mac(&b), 5)]);
        let own = lease(1, "fd00:10:244:1::/64", Some(b"1")).v6.unwrap();
        let (want, _) = desired_of(
            &own,
            true,
            Reach6::VXLAN,
            &Desired6::default(),
            [&a, &b, &c],
        );
        let (slots, fresh) = v6_only_slots(&want, [&a, &b, &c], &v4, &held);
        assert_eq!(slots[&mac(&b)], 5);
        let mut got = vec![slots[&mac(&a)], slots[&mac(&c)]];
        got.sort();
        assert_eq!(got, [1, 2]);
        assert_eq!(fresh.len(), 2);
        // Dual-stack leases share their IPv4 slot: none of their own.
        let dual = lease(7, "fd00:10:244:7::/64", Some(b"7"));
        assert!(v6_only_slots(&want, [&dual], &v4, &held).0.is_empty());
        // A held slot an IPv4 peer has taken since is given up.
        let taken = BTreeMap::from([(Mac::stable_from(b"v4"), 5)]);
        let (slots, _) = v6_only_slots(&want, [&b], &taken, &held);
        assert_ne!(slots[&mac(&b)], 5);
        // In a dual-stack cluster an IPv6-only lease is skipped, said why.
        let (d, skipped) = desired_of(&own, false, Reach6::VXLAN, &Desired6::default(), [&a]);
        assert!(d.fdb.is_empty());
        assert!(skipped[0].1.contains("IPv6-only"), "{skipped:?}");
    }

    #[test]
    fn a_newcomer_never_evicts_a_live_ipv6_peer() {
        let own = lease(1, "fd00:10:244:1::/64", Some(b"1")).v6.unwrap();
        let live_peer = lease(9, "fd00:10:244:2::/64", Some(b"9"));
        // Sorts first (a lower key) and claims the live peer's IPv6 subnet.
        let claim = lease(3, "fd00:10:244:2::/64", Some(b"3"));
        let (live, _) = desired_of(
            &own,
            false,
            Reach6::VXLAN,
            &Desired6::default(),
            [&live_peer],
        );
        let (d, skipped) = desired_of(&own, false, Reach6::VXLAN, &live, [&claim, &live_peer]);
        assert_eq!(d, live);
        assert!(
            skipped.iter().any(|(k, _)| *k == claim.key()),
            "{skipped:?}"
        );
    }

    #[test]
    fn unusable_ipv6_halves_are_skipped_with_a_reason() {
        let own = lease(1, "fd00:10:244:1::/64", Some(b"1")).v6.unwrap();
        let peers = [
            lease(2, "fd00:10:244:2::/64", Some(b"2")),
            lease(3, "fd00:10:244:2::/64", Some(b"3")),
            lease(4, "fd00:99::/64", Some(b"4")),
            lease(5, "fd00:10:244:5::/64", Some(b"2")),
            lease(6, "fd00:10:244:1::/64", Some(b"6")),
            lease(7, "fd00:10:244:7::/64", None),
            lease(8, "fd00:10:244:8::/64", Some(b"8")),
        ];
        let (d, skipped) = desired_of(&own, false, Reach6::VXLAN, &Desired6::default(), &peers);
        assert_eq!(d.routes.len(), 2, "{d:?}");
        let why: BTreeMap<String, String> = skipped.into_iter().collect();
        let of = |n: u8, s6: &str| why[&lease(n, s6, None).key()].clone();
        assert!(of(3, "fd00:10:244:2::/64").contains("leased first"));
        assert!(of(4, "fd00:99::/64").contains("not a /64 of IPv6Network"));
        assert!(of(5, "fd00:10:244:5::/64").contains("another node's"));
        assert!(of(6, "fd00:10:244:1::/64").contains("overlaps ours"));
        assert!(of(7, "fd00:10:244:7::/64").contains("no flannel-v6 VtepMAC"));
    }

    #[test]
    fn direct_routing_routes_on_link_peers_on_the_underlay() {
        let own = lease(1, "fd00:10:244:1::/64", Some(b"1")).v6.unwrap();
        let peers = [
            lease(2, "fd00:10:244:2::/64", Some(b"2")),
            lease(3, "fd00:10:244:3::/64", Some(b"3")),
        ];
        // fc00::2 is on-link, fc00::3 behind a router.
        let onlink = |ip: Ipv6Addr| ip == "fc00::2".parse::<Ipv6Addr>().unwrap();
        let reach = Reach6 {
            routing: Routing6::DirectRouting,
            onlink: &onlink,
            underlay: "eth0",
        };
        let (d, skipped) = desired_of(&own, false, reach, &Desired6::default(), &peers);
        assert!(skipped.is_empty(), "{skipped:?}");
        let (s2, s3): (Subnet6, Subnet6) = (
            "fd00:10:244:2::/64".parse().unwrap(),
            "fd00:10:244:3::/64".parse().unwrap(),
        );
        assert_eq!(d.direct, BTreeMap::from([(s2, "fc00::2".parse().unwrap())]));
        assert_eq!(d.routes, BTreeMap::from([(s3, s3.addr())]));
        assert_eq!(d.fdb.len(), 1, "no VXLAN entries for the on-link peer");
        // The programs expect VXLAN only from the peer behind the router.
        let m = fdb6_entries(&d, &peers, |_| 0);
        assert_eq!(m.keys().collect::<Vec<_>>(), [&Mac::stable_from(b"3")]);
        // A direct peer's subnet is taken: an overlapping newcomer is skipped.
        let claim = lease(4, "fd00:10:244:2::/64", Some(b"4"));
        let (again, skipped) = desired_of(&own, false, reach, &d, [&peers[0], &peers[1], &claim]);
        assert_eq!(again, d);
        assert!(skipped[0].1.contains("leased first"), "{skipped:?}");
    }

    #[test]
    fn host_gw_routes_every_on_link_host_gw_peer_and_names_the_others() {
        let own = LeaseV6 {
            vtep_mac: None,
            ..lease(1, "fd00:10:244:1::/64", None).v6.unwrap()
        };
        let host_gw = |n: u8| Lease {
            backend: LeaseBackend::HostGw,
            ..lease(n, &format!("fd00:10:244:{n}::/64"), None)
        };
        let peers = [
            host_gw(2),
            host_gw(3),
            lease(4, "fd00:10:244:4::/64", Some(b"4")),
        ];
        let onlink = |ip: Ipv6Addr| ip != "fc00::3".parse::<Ipv6Addr>().unwrap();
        let reach = Reach6 {
            routing: Routing6::HostGw,
            onlink: &onlink,
            underlay: "eth0",
        };
        let (d, skipped) = desired_of(&own, false, reach, &Desired6::default(), &peers);
        let s2: Subnet6 = "fd00:10:244:2::/64".parse().unwrap();
        assert_eq!(d.direct, BTreeMap::from([(s2, "fc00::2".parse().unwrap())]));
        assert!(d.routes.is_empty() && d.fdb.is_empty() && d.neigh.is_empty());
        let why: BTreeMap<String, String> = skipped.into_iter().collect();
        assert!(
            why[&peers[1].key()].contains("host-gw cannot reach node fc00::3")
                && why[&peers[1].key()].contains("not on-link on eth0"),
            "{why:?}"
        );
        assert!(
            why[&peers[2].key()].contains("BackendType vxlan"),
            "{why:?}"
        );
    }
}
