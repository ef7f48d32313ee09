//! Leases → the tables Flannel would program → one pass of writes to the
//! maps and the kernel: classify ([`desired`]), observe and plan ([`plan`]),
//! apply ([`apply`]).
pub mod apply;
pub mod desired;
pub mod plan;

pub use apply::{NodeWriter, Outcome, Writer, execute, observe};
pub use desired::{Desired, Own};
pub use plan::{
    KernelFdb, KernelRoutes, MapView, Mode, Observed, Op, Plan, Scope, Vtep, network_gateway, plan,
};

use crate::{ebpf::tables::Tables, netlink::Netlink};

/// Observe, plan and apply in one call.
pub async fn apply(
    want: &Desired,
    tables: Option<&mut Tables>,
    nl: &Netlink,
    scope: &Scope,
    mode: &Mode,
) -> anyhow::Result<Outcome> {
    let seen = observe(tables.as_deref(), None, nl, scope).await?;
    apply_observed(want, seen, tables, nl, scope, mode).await
}

/// Plan against what was observed at the start of the pass, and apply.
pub async fn apply_observed(
    want: &Desired,
    mut seen: Observed,
    tables: Option<&mut Tables>,
    nl: &Netlink,
    scope: &Scope,
    mode: &Mode,
) -> anyhow::Result<Outcome> {
    if scope.vtep.is_none()
        && !(want.fdb.is_empty() && want.arp.is_empty() && want.routes.is_empty())
    {
        anyhow::bail!("VXLAN entries are wanted but this node has no VTEP device");
    }
    let p = plan(want, &seen, scope, mode);
    Ok(execute(p, seen.maps.take(), &mut NodeWriter { tables, nl }).await)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        lease::mac::Mac,
        lease::subnet::Subnet,
        lease::{Lease, LeaseBackend},
        netlink::{KernelNeigh, KernelRoute},
    };

    /// Records every write in the order it would reach the node.
    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl Writer for Recorder {
        fn map(&mut self, op: &Op) -> anyhow::Result<()> {
            self.0.push(op.to_string());
            Ok(())
        }

        async fn kernel(&mut self, ops: &[Op]) -> Vec<anyhow::Result<()>> {
            self.0.extend(ops.iter().map(Op::to_string));
            ops.iter().map(|_| Ok(())).collect()
        }
    }

    const VTEP: u32 = 7;
    const UNDERLAY: u32 = 2;

    fn mac(s: &str) -> Mac {
        s.parse().unwrap()
    }

    fn subnet(s: &str) -> Subnet {
        s.parse().unwrap()
    }

    fn own() -> Own {
        Own {
            subnet: subnet("10.244.1.0/24"),
            network: subnet("10.244.0.0/16"),
            public_ip: "10.1.5.10".parse().unwrap(),
            backend: LeaseBackend::Vxlan {
                vtep_mac: mac("02:42:8f:11:22:10"),
            },
            underlay_index: UNDERLAY,
            underlay_name: "eth0".into(),
        }
    }

    fn scope() -> Scope {
        let own = own();
        Scope {
            network: own.network,
            vtep: Some(Vtep {
                index: VTEP,
                mac: mac("02:42:8f:11:22:10"),
                gateway: network_gateway(own.network, own.subnet),
            }),
            underlay_index: UNDERLAY,
        }
    }

    fn want(peers: &[(&str, &str, &str)]) -> Desired {
        let leases: Vec<Lease> = peers
            .iter()
            .map(|(s, ip, m)| Lease {
                subnet: subnet(s),
                public_ip: ip.parse().unwrap(),
                backend: LeaseBackend::Vxlan { vtep_mac: mac(m) },
                v6: None,
            })
            .collect();
        let (d, skipped) = Desired::from_leases(&leases, &own(), &Desired::default());
        assert!(skipped.is_empty(), "{skipped:?}");
        d
    }

    async fn record(want: &Desired, seen: &Observed, mode: Mode) -> Vec<String> {
        let mut r = Recorder::default();
        let out = execute(plan(want, seen, &scope(), &mode), None, &mut r).await;
        assert!(out.errors.is_empty());
        r.0
    }

    /// Index of the first write starting with `prefix`, so orders can be compared.
    fn at(writes: &[String], prefix: &str) -> usize {
        writes
            .iter()
            .position(|w| w.starts_with(prefix))
            .unwrap_or_else(|| panic!("no write {prefix:?} in {writes:#?}"))
    }

    const NETWORK_MODE: Mode = Mode {
        routes: KernelRoutes::Network,
        fdb: KernelFdb::Remove,
        direct: true,
    };

    fn maps_seen() -> Observed {
        Observed {
            maps: Some(MapView::default()),
            ..Observed::default()
        }
    }

    #[tokio::test]
    async fn a_new_peer_is_written_fdb_first_and_route_last_with_one_kernel_route() {
        let w = want(&[("10.244.2.0/24", "10.1.8.10", "02:42:8f:11:22:20")]);
        let writes = record(&w, &maps_seen(), NETWORK_MODE).await;
        assert_eq!(
            writes,
            [
                "map peer_stats reset 0",
                "map fdb 02:42:8f:11:22:20 → 10.1.8.10",
                "map arp 10.244.2.0 → 02:42:8f:11:22:20",
                // The one gateway neighbour and route; nothing per node.
                "ip neigh replace 10.244.0.0 lladdr 02:42:8f:11:22:10 dev #7",
                "map route 10.244.2.0/24 → 10.244.2.0 02:42:8f:11:22:20 10.1.8.10",
                "ip route replace 10.244.0.0/16 via 10.244.0.0 dev #7",
            ]
        );
        // A second pass over what the first wrote plans nothing.
        let mut seen = maps_seen();
        let maps = seen.maps.as_mut().unwrap();
        for (m, ip) in &w.fdb {
            maps.fdb.insert(
                *m,
                Tables::fdb_value(*ip, 0, w.subnet_by_mac().get(m).copied()),
            );
        }
        maps.arp = w.arp.clone();
        for (s, v) in &w.routes {
            let m = w.arp[v];
            maps.routes
                .insert(*s, Tables::route_value(*s, m, w.fdb[&m], 0));
        }
        seen.main_routes = vec![(
            Some(VTEP),
            KernelRoute::synthetic(subnet("10.244.0.0/16"), Some("10.244.0.0".parse().unwrap())),
        )];
        seen.neighbours = vec![KernelNeigh::synthetic(
            "10.244.0.0".parse().unwrap(),
            mac("02:42:8f:11:22:10"),
        )];
        assert!(plan(&w, &seen, &scope(), &NETWORK_MODE).is_empty());
        // The view a pass hands to the next (its writes applied to what it
        // observed) is what the maps then hold: nothing is planned again.
        let before = maps_seen();
        let mut r = Recorder::default();
        let out = execute(
            plan(&w, &before, &scope(), &NETWORK_MODE),
            before.maps.clone(),
            &mut r,
        )
        .await;
        let target = out.target.expect("all writes succeeded");
        assert_eq!(
            (&target.fdb, &target.arp, &target.routes),
            (
                &seen.maps.as_ref().unwrap().fdb,
                &seen.maps.as_ref().unwrap().arp,
                &seen.maps.as_ref().unwrap().routes
            )
        );
    }

    #[tokio::test]
    async fn a_departing_peer_loses_route_then_arp_then_fdb() {
        let mut seen = maps_seen();
        let old = want(&[("10.244.3.0/24", "10.1.9.10", "02:42:8f:11:22:30")]);
        let maps = seen.maps.as_mut().unwrap();
        maps.fdb.insert(
            mac("02:42:8f:11:22:30"),
            Tables::fdb_value("10.1.9.10".parse().unwrap(), 0, None),
        );
        maps.arp = old.arp.clone();
        maps.routes.insert(
            subnet("10.244.3.0/24"),
            Tables::route_value(
                subnet("10.244.3.0/24"),
                mac("02:42:8f:11:22:30"),
                "10.1.9.10".parse().unwrap(),
                0,
            ),
        );
        let writes = record(&Desired::default(), &seen, NETWORK_MODE).await;
        let (r, a, f) = (
            at(&writes, "map route del"),
            at(&writes, "map arp del"),
            at(&writes, "map fdb del"),
        );
        assert!(r < a && a < f, "{writes:#?}");
    }

    #[tokio::test]
    async fn taking_over_per_node_entries_adds_the_network_route_before_removing_them() {
        let w = want(&[("10.244.2.0/24", "10.1.8.10", "02:42:8f:11:22:20")]);
        let mut seen = maps_seen();
        // flanneld's entries for the peer.
        seen.main_routes = vec![(
            Some(VTEP),
            KernelRoute::synthetic(subnet("10.244.2.0/24"), Some("10.244.2.0".parse().unwrap())),
        )];
        seen.neighbours = vec![KernelNeigh::synthetic(
            "10.244.2.0".parse().unwrap(),
            mac("02:42:8f:11:22:20"),
        )];
        let writes = record(&w, &seen, NETWORK_MODE).await;
        let add = at(&writes, "ip route replace 10.244.0.0/16");
        let del = at(&writes, "ip route del 10.244.2.0/24");
        let neigh_del = at(&writes, "ip neigh del 10.244.2.0");
        assert!(add < del && del < neigh_del, "{writes:#?}");
        // Untouched (before the programs attach): maps only, the kernel's entries stay.
        let untouched = Mode {
            routes: KernelRoutes::Untouched,
            fdb: KernelFdb::Keep,
            direct: true,
        };
        let writes = record(&w, &seen, untouched).await;
        assert!(writes.iter().all(|w| w.starts_with("map ")), "{writes:#?}");
    }

    #[tokio::test]
    async fn per_node_mode_programs_flannels_own_entries_in_flannels_order() {
        let w = want(&[("10.244.2.0/24", "10.1.8.10", "02:42:8f:11:22:20")]);
        let mode = Mode {
            routes: KernelRoutes::PerNode,
            fdb: KernelFdb::Program,
            direct: true,
        };
        // The kernel data path: no maps.
        let writes = record(&w, &Observed::default(), mode).await;
        assert_eq!(
            writes,
            [
                "ip neigh replace 10.244.2.0 lladdr 02:42:8f:11:22:20 dev #7",
                "bridge fdb replace 02:42:8f:11:22:20 dev #7 dst 10.1.8.10",
                "ip route replace 10.244.2.0/24 via 10.244.2.0 dev #7",
            ]
        );
    }

    #[test]
    fn the_network_gateway_is_never_our_own_address() {
        let n = subnet("10.244.0.0/16");
        assert_eq!(
            network_gateway(n, subnet("10.244.1.0/24")),
            "10.244.0.0".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(
            network_gateway(n, subnet("10.244.0.0/24")),
            "10.244.255.255".parse::<Ipv4Addr>().unwrap()
        );
    }
}
