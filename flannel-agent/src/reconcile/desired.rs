//! Leases classified once: each peer lease becomes VXLAN entries (Flannel's
//! route, ARP and FDB views), a direct route (DirectRouting, host-gw), or a
//! skip with the reason.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::Ipv4Addr,
};

use crate::{
    lease::mac::Mac,
    lease::subnet::Subnet,
    lease::{Lease, LeaseBackend},
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
    pub fn subnet_by_mac(&self) -> HashMap<Mac, Subnet> {
        // Routes and ARP entries are both in VTEP-address order (a VTEP is
        // its subnet's first address): walk them together, no lookups.
        let mut arp = self.arp.iter().peekable();
        let mut out = HashMap::with_capacity(self.routes.len());
        for (subnet, vtep) in &self.routes {
            while arp.next_if(|(a, _)| *a < vtep).is_some() {}
            let mac = match arp.peek() {
                Some((a, m)) if *a == vtep => **m,
                _ => match self.arp.get(vtep) {
                    Some(m) => *m,
                    None => continue,
                },
            };
            out.insert(mac, *subnet);
        }
        out
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
        // VTEPs per VtepMAC: its FDB entry goes with the last one.
        let mut vteps: BTreeMap<Mac, usize> = BTreeMap::new();
        for mac in self.arp.values() {
            *vteps.entry(*mac).or_default() += 1;
        }
        for (subnet, ip) in &direct {
            if let Some(vtep) = self.routes.remove(subnet)
                && let Some(mac) = self.arp.remove(&vtep)
            {
                let left = vteps.get_mut(&mac).map_or(0, |n| {
                    *n -= 1;
                    *n
                });
                if self.fdb.get(&mac) == Some(ip) && left == 0 {
                    self.fdb.remove(&mac);
                }
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
        // Collected as lists and built into maps at the end: sorted bulk
        // builds, not one tree insert per entry.
        let (mut fdb, mut arp, mut routes, mut direct) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut skipped = Vec::new();
        // An IPv6-only node's lease has no IPv4 half to route to (its empty
        // 0.0.0.0/0 would overlap every lease).
        let (leases, v6_only): (Vec<&Lease>, Vec<&Lease>) =
            leases.into_iter().partition(|l| l.has_v4());
        for l in v6_only {
            skipped.push((
                l.subnet,
                format!("{} is an IPv6-only node's lease (no IPv4 subnet)", l.key()),
            ));
        }
        let leases = one_lease_per_subnet(leases, own.subnet, live, &mut skipped);
        let is_live = |s: &Subnet| live.routes.contains_key(s) || live.direct.contains_key(s);
        let index = SubnetIndex::new(leases.iter().map(|l| l.subnet).chain([own.subnet]));
        // Every (VtepMAC, node) announced, sorted: a MAC's nodes are a range.
        let mut mac_nodes: Vec<(Mac, Ipv4Addr)> = leases
            .iter()
            .filter_map(|l| l.backend.vtep_mac().map(|m| (m, l.public_ip)))
            .collect();
        mac_nodes.sort_unstable();
        mac_nodes.dedup();
        let nodes_of = |mac: Mac| {
            let from = mac_nodes.partition_point(|(m, _)| *m < mac);
            let to = mac_nodes.partition_point(|(m, _)| *m <= mac);
            mac_nodes[from..to].iter().map(|(_, ip)| *ip)
        };
        for l in &leases {
            if l.subnet == own.subnet {
                continue;
            }
            let overlap = index
                .overlapping(&l.subnet)
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
                let others: Vec<String> = nodes_of(vtep_mac)
                    .filter(|ip| *ip != l.public_ip)
                    .map(|ip| ip.to_string())
                    .collect();
                // Who holds the MAC now matters only when it is contested.
                let holder = (!others.is_empty())
                    .then(|| live.fdb.get(&vtep_mac))
                    .flatten();
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
                    fdb.push((vtep_mac, l.public_ip));
                    arp.push((l.subnet.vtep_addr(), vtep_mac));
                    routes.push((l.subnet, l.subnet.vtep_addr()));
                }
                LeaseBackend::HostGw => direct.push((l.subnet, l.public_ip)),
            }
        }
        let d = Desired {
            fdb: fdb.into_iter().collect(),
            arp: arp.into_iter().collect(),
            routes: routes.into_iter().collect(),
            direct: direct.into_iter().collect(),
        };
        (d, skipped)
    }
}

/// Subnets sorted by address, so the ones overlapping a subnet are found
/// without comparing every pair (50 000 leases are 2.5e9 pairs): CIDR blocks
/// overlap only when one contains the other, so they are the subnet's at
/// most 32 ancestors and its descendants, a range of the order.
struct SubnetIndex {
    subnets: BTreeSet<(u32, u8)>,
    /// The prefix lengths present (a cluster has one or two): the only
    /// lengths an ancestor can have.
    lens: BTreeSet<u8>,
}

impl SubnetIndex {
    fn new(subnets: impl IntoIterator<Item = Subnet>) -> SubnetIndex {
        let subnets: BTreeSet<(u32, u8)> = subnets
            .into_iter()
            .map(|s| (u32::from(s.addr()), s.prefix_len()))
            .collect();
        let lens = subnets.iter().map(|(_, l)| *l).collect();
        SubnetIndex { subnets, lens }
    }

    /// Every other subnet overlapping `s`: the ones containing it, widest
    /// first, then the ones inside it, in address order.
    fn overlapping(&self, s: &Subnet) -> impl Iterator<Item = Subnet> + '_ {
        let (addr, len) = (u32::from(s.addr()), s.prefix_len());
        let end = addr | !u32::from(s.netmask());
        let ancestors = self.lens.range(..len).filter_map(move |&p| {
            let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
            let key = (addr & mask, p);
            self.subnets.contains(&key).then_some(key)
        });
        // A /32 has none (and its range would start after its end).
        let descendants = (len < 32)
            .then(|| self.subnets.range((addr, len + 1)..=(end, 32)))
            .into_iter()
            .flatten()
            .copied()
            .filter(move |(_, l)| *l > len);
        ancestors
            .chain(descendants)
            .filter_map(|(a, l)| Subnet::new(Ipv4Addr::from(a), l).ok())
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

/// Store keys name a lease by both halves, so two keys may name one IPv4
/// subnet (`10.244.1.0-24` and `10.244.1.0-24&…`). Where their IPv4 halves
/// agree one stands for both; where they differ the live one stays and the
/// other is skipped, and where neither is live both are (which is right
/// cannot be told here).
fn one_lease_per_subnet<'a>(
    leases: Vec<&'a Lease>,
    own: Subnet,
    live: &Desired,
    skipped: &mut Vec<(Subnet, String)>,
) -> Vec<&'a Lease> {
    let mut by_subnet: BTreeMap<Subnet, Vec<usize>> = BTreeMap::new();
    for (i, l) in leases.iter().enumerate() {
        by_subnet.entry(l.subnet).or_default().push(i);
    }
    if by_subnet.len() == leases.len() {
        return leases; // the usual case: one key per subnet
    }
    // Live: what the last pass routed for this subnet went to this node
    // (over VXLAN: its VTEP address to its MAC to its IP; DirectRouting and
    // host-gw: the subnet straight to its IP).
    let is_live = |l: &Lease| {
        live.direct.get(&l.subnet) == Some(&l.public_ip)
            || l.backend.vtep_mac().is_some_and(|mac| {
                live.arp.get(&l.subnet.vtep_addr()) == Some(&mac)
                    && live.fdb.get(&mac) == Some(&l.public_ip)
            })
    };
    let node = |l: &Lease| (l.public_ip, l.backend);
    let mut drop = vec![false; leases.len()];
    // Claims on our own subnet are the main loop's to judge.
    for (_, group) in by_subnet.iter().filter(|(s, g)| g.len() > 1 && **s != own) {
        let first = leases[group[0]];
        let agree = group.iter().all(|&i| node(leases[i]) == node(first));
        // The same live node under two keys is one live node.
        let live_ones: Vec<usize> = group
            .iter()
            .copied()
            .filter(|&i| is_live(leases[i]))
            .collect();
        let live_nodes: HashSet<_> = live_ones.iter().map(|&i| node(leases[i])).collect();
        let keep = match (agree, live_nodes.len()) {
            (true, _) => Some(group[0]),
            (false, 1) => Some(live_ones[0]),
            _ => None,
        };
        let kept = keep.map(|k| node(leases[k]));
        for &i in group.iter().filter(|&&i| Some(i) != keep) {
            drop[i] = true;
            if Some(node(leases[i])) == kept {
                continue; // the same node under another key: one peer
            }
            let why = match keep {
                Some(k) => format!(
                    "{} names the subnet of the live lease {}",
                    leases[i].key(),
                    leases[k].key()
                ),
                None => format!(
                    "{} names a subnet another key gives a different node",
                    leases[i].key()
                ),
            };
            skipped.push((leases[i].subnet, why));
        }
    }
    leases
        .into_iter()
        .zip(drop)
        .filter_map(|(l, d)| (!d).then_some(l))
        .collect()
}

/// A PEER_STATS slot per node IP: the one it has, else the lowest free. A
/// slot still named by an FDB entry that goes in this pass is not free yet
/// (the departing node's packets may still count into it until its entry is
/// deleted); it is reused, zeroed, in a later pass.
pub fn assign_slots(
    want: &Desired,
    held: impl Iterator<Item = (Ipv4Addr, u32)> + Clone,
) -> HashMap<Ipv4Addr, u32> {
    let mut slots: HashMap<Ipv4Addr, u32> = HashMap::with_capacity(want.fdb.len());
    let wanted: HashSet<&Ipv4Addr> = want.fdb.values().collect();
    for (ip, slot) in held.clone() {
        if wanted.contains(&ip) {
            slots.entry(ip).or_insert(slot);
        }
    }
    let mut used: HashSet<u32> = held.map(|(_, s)| s).collect();
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
            v6: None,
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
    fn the_index_finds_every_overlap_and_nothing_else() {
        let subnets: Vec<Subnet> = [
            "10.0.0.0/8",
            "10.244.0.0/16",
            "10.244.1.0/24",
            "10.244.1.128/25",
            "10.244.2.0/24",
            "10.245.0.0/24",
            "10.244.1.7/32",
            "11.0.0.0/24",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let index = SubnetIndex::new(subnets.iter().copied());
        for s in &subnets {
            let mut got: Vec<Subnet> = index.overlapping(s).collect();
            let mut want: Vec<Subnet> = subnets
                .iter()
                .filter(|o| *o != s && o.overlaps(s))
                .copied()
                .collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "overlaps of {s}");
        }
    }

    #[test]
    fn two_keys_for_one_subnet_never_give_one_node_two_routes() {
        let with_v6 = |mut l: Lease, s6: &str| {
            l.v6 = Some(crate::lease::LeaseV6 {
                subnet: s6.parse().unwrap(),
                public_ip: "fc00::9".parse().unwrap(),
                vtep_mac: None,
            });
            l
        };
        let peer = lease("10.244.2.0-24", "10.1.8.10", "02:42:8f:11:22:20");
        // The same node under both keys: one peer.
        let twin = with_v6(peer, "fd00:10:244:2::/64");
        let (d, skipped) = Desired::from_leases(&[peer, twin], &own(), &Desired::default());
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!((d.routes.len(), d.fdb.len()), (1, 1));
        // Another node claiming the subnet under a dual-stack key: the live
        // peer stays, the claim is skipped and never becomes an FDB member.
        let claim = with_v6(
            lease("10.244.2.0-24", "10.1.9.66", "02:42:8f:11:22:66"),
            "fd00:10:244:2::/64",
        );
        let (live, _) = Desired::from_leases(&[peer], &own(), &Desired::default());
        let (d, skipped) = Desired::from_leases(&[peer, claim], &own(), &live);
        assert_eq!(d, live);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(skipped[0].1.contains("live lease"), "{skipped:?}");
        // The live peer under two keys, and a claim: the peer stays.
        let (d, skipped) = Desired::from_leases(&[peer, twin, claim], &own(), &live);
        assert_eq!(d, live);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        // Neither live: both skipped.
        let (d, skipped) = Desired::from_leases(&[peer, claim], &own(), &Desired::default());
        assert!(d.fdb.is_empty() && d.routes.is_empty(), "{d:?}");
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        // An IPv6-only lease in an IPv4 cluster: skipped, never 0.0.0.0/0.
        let v6_only = Lease::v6_only(
            "fd00:10:244:5::/64".parse().unwrap(),
            "vxlan",
            Some("fc00::5"),
            Some(serde_json::json!({"VNI": 1, "VtepMAC": "02:42:8f:11:22:55"})),
        )
        .unwrap()
        .unwrap();
        let (d, skipped) = Desired::from_leases(&[peer, v6_only], &own(), &live);
        assert_eq!(d, live);
        assert!(skipped[0].1.contains("IPv6-only"), "{skipped:?}");
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
            v6: None,
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
        let fdb = BTreeMap::<Mac, (Ipv4Addr, u32)>::from([(
            "02:42:8f:11:22:30".parse().unwrap(),
            ("10.1.9.10".parse().unwrap(), 0),
        )]);
        let slots = assign_slots(&d, fdb.values().copied());
        assert_eq!(slots[&"10.1.9.10".parse::<Ipv4Addr>().unwrap()], 0);
        assert_eq!(slots[&"10.1.8.10".parse::<Ipv4Addr>().unwrap()], 1);
    }

    #[test]
    fn a_departing_nodes_slot_is_not_reused_in_the_same_pass() {
        // 10.1.8.10 leaves (slot 0 still in the FDB), 10.1.9.10 arrives.
        let leases = [lease("10.244.3.0-24", "10.1.9.10", "02:42:8f:11:22:30")];
        let (d, _) = Desired::from_leases(&leases, &own(), &Desired::default());
        let fdb = BTreeMap::<Mac, (Ipv4Addr, u32)>::from([(
            "02:42:8f:11:22:20".parse().unwrap(),
            ("10.1.8.10".parse().unwrap(), 0),
        )]);
        let slots = assign_slots(&d, fdb.values().copied());
        assert_eq!(slots[&"10.1.9.10".parse::<Ipv4Addr>().unwrap()], 1);
        // Next pass: slot 0 is free again.
        let slots = assign_slots(&d, std::iter::empty());
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
