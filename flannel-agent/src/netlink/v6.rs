//! The IPv6 half of the kernel tables, on flannel-v6.<VNI> as flanneld
//! programs it: `<subnet> via <subnet addr> onlink` routes, permanent
//! neighbours for the peers' VTEP addresses, FDB entries with IPv6 destinations.
use std::net::{IpAddr, Ipv6Addr};

use anyhow::Context;
use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressFlag},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteFlag, RouteMessage, RouteProtocol, RouteScope},
};
use rtnetlink::IpVersion;

use super::{Netlink, gone_is_fine};
use crate::lease::{mac::Mac, subnet6::Subnet6};

/// An IPv6 route on flannel-v6: `<dst> via <gateway> dev flannel-v6.1 onlink`.
#[derive(Clone, Debug)]
pub struct KernelRoute6 {
    pub dst: Subnet6,
    pub gateway: Option<Ipv6Addr>,
    /// The route's metric: of two with one prefix the lower one is used.
    pub metric: u32,
    message: RouteMessage,
}

/// An IPv6 neighbour on flannel-v6: `<ip> lladdr <mac> nud …`.
#[derive(Clone, Debug)]
pub struct KernelNeigh6 {
    pub ip: Ipv6Addr,
    pub mac: Option<Mac>,
    pub permanent: bool,
    message: NeighbourMessage,
}

/// An FDB entry with an IPv6 destination: `<mac> dst <ipv6> self permanent`.
#[derive(Clone, Debug)]
pub struct KernelFdb6 {
    pub mac: Mac,
    pub dst: Ipv6Addr,
    message: NeighbourMessage,
}

fn neigh6_fields(n: &NeighbourMessage) -> (Option<Ipv6Addr>, Option<Mac>) {
    let (mut ip, mut mac) = (None, None);
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(i)) => ip = Some(*i),
            // In AF_BRIDGE dumps the parser cannot tell the address family.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 16 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(b);
                ip = Some(Ipv6Addr::from(o))
            }
            NeighbourAttribute::LinkLocalAddress(l) => mac = Mac::from_slice(l),
            _ => {}
        }
    }
    (ip, mac)
}

impl Netlink {
    /// Make `addr/128` the only global IPv6 address on the interface (its
    /// link-local address stays), without duplicate address detection.
    pub async fn ensure_only_addr6(&self, index: u32, addr: Ipv6Addr) -> anyhow::Result<()> {
        let mut req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut have = false;
        let mut stale = Vec::new();
        while let Some(m) = req.try_next().await.context("listing addresses")? {
            if m.header.family != AddressFamily::Inet6 {
                continue;
            }
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                _ => None,
            });
            let Some(local) = local else { continue };
            if local.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
            if local == addr && m.header.prefix_len == 128 {
                have = true;
            } else {
                stale.push(m);
            }
        }
        for m in stale {
            log::info!(
                "removing stale IPv6 address {:?} from interface #{index}",
                m.attributes
            );
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .context("removing a stale IPv6 address")?;
        }
        if !have {
            let mut req = self.handle.address().add(index, IpAddr::V6(addr), 128);
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(vec![AddressFlag::Nodad]));
            req.execute()
                .await
                .with_context(|| format!("adding {addr}/128"))?;
        }
        Ok(())
    }

    /// IPv6 routes in the main table whose output device is `index`.
    pub async fn routes6_via(&self, index: u32) -> anyhow::Result<Vec<KernelRoute6>> {
        Ok(self
            .routes6()
            .await?
            .into_iter()
            .filter(|(oif, _)| *oif == Some(index))
            .map(|(_, r)| r)
            .collect())
    }

    /// Every IPv6 route in the main table, with its output device (None:
    /// several next hops, or none).
    pub async fn routes6(&self) -> anyhow::Result<Vec<(Option<u32>, KernelRoute6)>> {
        let mut out = Vec::new();
        let mut req = self.handle.route().get(IpVersion::V6).execute();
        while let Some(r) = req.try_next().await.context("listing IPv6 routes")? {
            if r.header.table != 254 {
                continue;
            }
            let mut oif = None;
            let mut dst = Ipv6Addr::UNSPECIFIED;
            let mut gateway = None;
            let mut metric = 0;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(m) => metric = *m,
                    RouteAttribute::Destination(RouteAddress::Inet6(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(*g),
                    _ => {}
                }
            }
            let Ok(dst) = Subnet6::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            out.push((
                oif,
                KernelRoute6 {
                    dst,
                    gateway,
                    metric,
                    message: r,
                },
            ));
        }
        Ok(out)
    }

    /// `ip -6 route replace <dst> via <gw> dev <index> [onlink]` (onlink:
    /// flannel-v6's routes, whose gateway is no neighbour the kernel knows).
    pub async fn replace_route6(
        &self,
        index: u32,
        dst: Subnet6,
        gw: Ipv6Addr,
        onlink: bool,
    ) -> anyhow::Result<()> {
        let mut req = self
            .handle
            .route()
            .add()
            .v6()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .gateway(gw)
            .output_interface(index)
            .protocol(RouteProtocol::Boot)
            .scope(RouteScope::Universe)
            .replace();
        if onlink {
            req.message_mut().header.flags.push(RouteFlag::Onlink);
        }
        let flag = if onlink { " onlink" } else { "" };
        req.execute()
            .await
            .with_context(|| format!("ip -6 route replace {dst} via {gw}{flag} (ifindex {index})"))
    }

    pub async fn delete_route6(&self, route: &KernelRoute6) -> anyhow::Result<()> {
        let res = self
            .handle
            .route()
            .del(route.message.clone())
            .execute()
            .await;
        gone_is_fine(res).with_context(|| format!("ip -6 route del {}", route.dst))
    }

    /// IPv6 neighbours on the interface.
    pub async fn neighbours6(&self, index: u32) -> anyhow::Result<Vec<KernelNeigh6>> {
        let mut out = Vec::new();
        let mut req = self
            .handle
            .neighbours()
            .get()
            .set_family(IpVersion::V6)
            .execute();
        while let Some(n) = req.try_next().await.context("listing IPv6 neighbours")? {
            if n.header.ifindex != index {
                continue;
            }
            let (ip, mac) = neigh6_fields(&n);
            let Some(ip) = ip else { continue };
            out.push(KernelNeigh6 {
                ip,
                mac,
                permanent: n.header.state == NeighbourState::Permanent,
                message: n,
            });
        }
        Ok(out)
    }

    /// `ip -6 neigh replace <ip> lladdr <mac> dev <index> nud permanent`
    pub async fn replace_neighbour6(
        &self,
        index: u32,
        ip: Ipv6Addr,
        mac: Mac,
    ) -> anyhow::Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V6(ip))
            .link_local_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .with_context(|| {
                format!("ip -6 neigh replace {ip} lladdr {mac} nud permanent (ifindex {index})")
            })
    }

    pub async fn delete_neighbour6(&self, n: &KernelNeigh6) -> anyhow::Result<()> {
        let res = self
            .handle
            .neighbours()
            .del(n.message.clone())
            .execute()
            .await;
        gone_is_fine(res).with_context(|| format!("ip -6 neigh del {}", n.ip))
    }

    /// `bridge fdb replace <mac> dev <index> dst <ipv6> self permanent`
    pub async fn replace_fdb6(&self, index: u32, mac: Mac, dst: Ipv6Addr) -> anyhow::Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .destination(IpAddr::V6(dst))
            .flags(vec![netlink_packet_route::neighbour::NeighbourFlag::Own])
            .replace()
            .execute()
            .await
            .with_context(|| {
                format!("bridge fdb replace {mac} dst {dst} self permanent (ifindex {index})")
            })
    }

    /// Unicast FDB entries with an IPv6 destination on the VXLAN device.
    pub async fn fdb6_entries(&self, index: u32) -> anyhow::Result<Vec<KernelFdb6>> {
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = AddressFamily::Bridge;
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(n) = stream.try_next().await.context("listing FDB entries")? {
            if n.header.ifindex != index {
                continue;
            }
            let (dst, mac) = neigh6_fields(&n);
            if let (Some(mac), Some(dst)) = (mac, dst)
                && mac.is_unicast()
            {
                out.push(KernelFdb6 {
                    mac,
                    dst,
                    message: n,
                });
            }
        }
        Ok(out)
    }

    pub async fn delete_fdb6(&self, e: &KernelFdb6) -> anyhow::Result<()> {
        let res = self
            .handle
            .neighbours()
            .del(e.message.clone())
            .execute()
            .await;
        gone_is_fine(res).with_context(|| format!("bridge fdb del {} dst {}", e.mac, e.dst))
    }

    /// The interface holding the global IPv6 address `ip`, if one does.
    pub async fn link_with_addr6(
        &self,
        ip: Ipv6Addr,
    ) -> anyhow::Result<Option<crate::netlink::Link>> {
        for l in self.links().await? {
            if self
                .ipv6_addrs(l.index)
                .await?
                .iter()
                .any(|(a, _)| *a == ip)
            {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    /// Global IPv6 addresses on the interface, with their prefix lengths.
    pub async fn ipv6_addrs(&self, index: u32) -> anyhow::Result<Vec<(Ipv6Addr, u8)>> {
        let mut req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut out = Vec::new();
        while let Some(m) = req.try_next().await.context("listing addresses")? {
            if m.header.family != AddressFamily::Inet6 {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V6(ip)) = a
                    && ip.segments()[0] & 0xffc0 != 0xfe80
                    && !ip.is_loopback()
                {
                    out.push((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }
}

/// Whether `ip` is on-link through `underlay`: the longest matching route
/// leaves by that device with no gateway (Flannel's DirectRouting test);
/// of equally long ones, the lowest metric, as the kernel picks.
pub fn onlink6(routes: &[(Option<u32>, KernelRoute6)], underlay: u32, ip: Ipv6Addr) -> bool {
    routes
        .iter()
        .filter(|(_, r)| r.dst.contains(ip))
        .max_by_key(|(_, r)| (r.dst.prefix_len(), std::cmp::Reverse(r.metric)))
        .is_some_and(|(oif, r)| *oif == Some(underlay) && r.gateway.is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(dst: &str, gateway: Option<&str>, metric: u32) -> KernelRoute6 {
        KernelRoute6 {
            dst: dst.parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            metric,
            message: RouteMessage::default(),
        }
    }

    #[test]
    fn on_link_is_judged_by_the_route_the_kernel_would_use() {
        let peer: Ipv6Addr = "fc00::12".parse().unwrap();
        // The connected /64 on the underlay (2), a default route with a gateway.
        let mut routes = vec![
            (Some(2), route("::/0", Some("fe80::1"), 1024)),
            (Some(2), route("fc00::/64", None, 256)),
        ];
        assert!(onlink6(&routes, 2, peer));
        assert!(!onlink6(&routes, 3, peer), "another device's");
        assert!(
            !onlink6(&routes, 2, "fc01::1".parse().unwrap()),
            "via the gateway"
        );
        // The same /64 on another device with a lower metric wins, whatever the order.
        routes.push((Some(3), route("fc00::/64", None, 100)));
        assert!(!onlink6(&routes, 2, peer));
        routes.reverse();
        assert!(!onlink6(&routes, 2, peer));
        // A more specific route with a gateway: behind a router.
        let routes = vec![
            (Some(2), route("fc00::/64", None, 256)),
            (Some(2), route("fc00::12/128", Some("fc00::13"), 1024)),
        ];
        assert!(!onlink6(&routes, 2, peer));
    }
}
