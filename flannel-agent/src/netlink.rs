//! rtnetlink operations on flannel.1 and the underlay: the kernel half of
//! Flannel's tables (routes and neighbours), the VTEP device, interface lookup.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, bail};
use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteFlag, RouteMessage, RouteProtocol, RouteScope},
};
use rtnetlink::{Handle, IpVersion};

use crate::{lease::mac::Mac, lease::subnet::Subnet};

pub mod v6;

/// What we know of a network interface.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// For VXLAN devices: (VNI, UDP port).
    pub vxlan: Option<(u32, u16)>,
    /// One end of a veth pair (a kind or container node's eth0).
    pub veth: bool,
    /// The bridge (or other master) it is a port of.
    pub master: Option<u32>,
    /// Its peer is in another network namespace (a pod's veth).
    pub peer_elsewhere: bool,
}

/// Settings of the VTEP device, as flanneld creates flannel.1.
#[derive(Clone, Debug)]
pub struct VtepSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// flannel.<VNI>'s IPv4 or flannel-v6.<VNI>'s IPv6 underlay address.
    pub local: IpAddr,
    pub underlay_index: u32,
    pub mac: Mac,
    pub mtu: u32,
}

/// A kernel route on flannel.1: `<dst> via <gateway> dev flannel.1 onlink`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: Subnet,
    pub gateway: Option<Ipv4Addr>,
    /// The route's metric: of two with one prefix the lower one is used.
    pub metric: u32,
    message: RouteMessage,
}

#[cfg(test)]
impl KernelRoute {
    /// A route as a dump would return it, for planning tests.
    pub fn synthetic(dst: Subnet, gateway: Option<Ipv4Addr>) -> KernelRoute {
        KernelRoute {
            dst,
            gateway,
            metric: 0,
            message: RouteMessage::default(),
        }
    }
}

#[cfg(test)]
impl KernelNeigh {
    /// A permanent neighbour as a dump would return it, for planning tests.
    pub fn synthetic(ip: Ipv4Addr, mac: Mac) -> KernelNeigh {
        KernelNeigh {
            ip,
            mac: Some(mac),
            permanent: true,
            message: Default::default(),
        }
    }
}

/// A kernel neighbour on flannel.1: `<ip> lladdr <mac> nud …`.
#[derive(Clone, Debug)]
pub struct KernelNeigh {
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    pub permanent: bool,
    message: netlink_packet_route::neighbour::NeighbourMessage,
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

fn link_from_message(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        vxlan: None,
        veth: false,
        master: None,
        peer_elsewhere: false,
    };
    for attr in &m.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Address(a) => link.mac = Mac::from_slice(a),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Controller(i) => link.master = Some(*i),
            LinkAttribute::NetnsId(_) => link.peer_elsewhere = true,
            LinkAttribute::LinkInfo(infos) => {
                let mut is_vxlan = false;
                let (mut vni, mut port) = (0, 0);
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Vxlan) => is_vxlan = true,
                        LinkInfo::Kind(InfoKind::Veth) => link.veth = true,
                        LinkInfo::Data(InfoData::Vxlan(v)) => {
                            for x in v {
                                match x {
                                    InfoVxlan::Id(id) => vni = *id,
                                    InfoVxlan::Port(p) => port = *p,
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
                if is_vxlan {
                    link.vxlan = Some((vni, port));
                }
            }
            _ => {}
        }
    }
    link
}

/// A delete of something already gone has done its job.
fn gone_is_fine(res: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match res {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

fn is_not_found(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::ENODEV || m.raw_code() == -libc::ENOENT || m.raw_code() == -libc::ESRCH)
}

impl Netlink {
    /// Opens a netlink connection in the current network namespace.
    pub fn connect() -> anyhow::Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link_by_name(&self, name: &str) -> anyhow::Result<Option<Link>> {
        let mut req = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match req.try_next().await {
            Ok(Some(m)) => Ok(Some(link_from_message(&m))),
            Ok(None) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up interface {name}")),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> anyhow::Result<Option<Link>> {
        let mut req = self.handle.link().get().match_index(index).execute();
        match req.try_next().await {
            Ok(Some(m)) => Ok(Some(link_from_message(&m))),
            Ok(None) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("looking up interface #{index}")),
        }
    }

    /// Every interface.
    pub async fn links(&self) -> anyhow::Result<Vec<Link>> {
        let mut out = Vec::new();
        let mut req = self.handle.link().get().execute();
        while let Some(m) = req.try_next().await.context("listing interfaces")? {
            out.push(link_from_message(&m));
        }
        Ok(out)
    }

    /// IPv4 addresses on an interface.
    pub async fn ipv4_addrs(&self, index: u32) -> anyhow::Result<Vec<(Ipv4Addr, u8)>> {
        let mut out = Vec::new();
        let mut req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = req.try_next().await.context("listing addresses")? {
            if m.header.family != AddressFamily::Inet {
                continue;
            }
            for a in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) = a {
                    out.push((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    /// The interface holding `ip`.
    pub async fn link_with_addr(&self, ip: Ipv4Addr) -> anyhow::Result<Option<Link>> {
        let mut req = self.handle.address().get().execute();
        let mut index = None;
        while let Some(m) = req.try_next().await.context("listing addresses")? {
            if m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(x)) if *x == ip))
            {
                index = Some(m.header.index);
            }
        }
        match index {
            Some(i) => self.link_by_index(i).await,
            None => Ok(None),
        }
    }

    /// The interface of the IPv4 default route in the main table.
    pub async fn default_route_link(&self) -> anyhow::Result<Option<Link>> {
        self.default_link_of(IpVersion::V4).await
    }

    /// The interface of the IPv6 default route in the main table.
    pub async fn default_route6_link(&self) -> anyhow::Result<Option<Link>> {
        self.default_link_of(IpVersion::V6).await
    }

    async fn default_link_of(&self, family: IpVersion) -> anyhow::Result<Option<Link>> {
        let mut req = self.handle.route().get(family).execute();
        let mut index = None;
        while let Some(r) = req.try_next().await.context("listing routes")? {
            if r.header.destination_prefix_length != 0 || r.header.table != 254 {
                continue;
            }
            for a in &r.attributes {
                if let RouteAttribute::Oif(i) = a {
                    index.get_or_insert(*i);
                }
            }
        }
        match index {
            Some(i) => self.link_by_index(i).await,
            None => Ok(None),
        }
    }

    /// Create flannel.1 as flanneld does, or adopt an existing one whose VNI
    /// and port match (re-created otherwise). Sets MAC and MTU, brings it up.
    pub async fn ensure_vtep(&self, spec: &VtepSpec) -> anyhow::Result<Link> {
        if let Some(existing) = self.link_by_name(&spec.name).await? {
            match existing.vxlan {
                Some((vni, port)) if vni == spec.vni && port == spec.port => {}
                other => {
                    log::warn!(
                        "{} exists with {:?} (VNI, port); expected ({}, {}): re-creating it",
                        spec.name,
                        other,
                        spec.vni,
                        spec.port
                    );
                    self.handle
                        .link()
                        .del(existing.index)
                        .execute()
                        .await
                        .with_context(|| format!("deleting {}", spec.name))?;
                    return Box::pin(self.ensure_vtep(spec)).await;
                }
            }
        } else {
            let add = self
                .handle
                .link()
                .add()
                .vxlan(spec.name.clone(), spec.vni)
                .port(spec.port);
            let add = match spec.local {
                IpAddr::V4(a) => add.local(a),
                IpAddr::V6(a) => add.local6(a),
            };
            add.link(spec.underlay_index)
                .learning(false)
                .execute()
                .await
                .with_context(|| {
                    format!(
                        "creating {} (vxlan id {} dstport {})",
                        spec.name, spec.vni, spec.port
                    )
                })?;
            log::info!(
                "created {} (vxlan id {} dstport {} nolearning local {})",
                spec.name,
                spec.vni,
                spec.port,
                spec.local
            );
        }
        let link = self
            .link_by_name(&spec.name)
            .await?
            .with_context(|| format!("{} vanished after creation", spec.name))?;
        if link.mac != Some(spec.mac) || link.mtu != spec.mtu {
            self.handle
                .link()
                .set(link.index)
                .address(spec.mac.0.to_vec())
                .mtu(spec.mtu)
                .execute()
                .await
                .with_context(|| {
                    format!(
                        "setting MAC {} and MTU {} on {}",
                        spec.mac, spec.mtu, spec.name
                    )
                })?;
        }
        self.handle
            .link()
            .set(link.index)
            .up()
            .execute()
            .await
            .with_context(|| format!("bringing {} up", spec.name))?;
        self.link_by_index(link.index)
            .await?
            .with_context(|| format!("{} vanished", spec.name))
    }

    /// Make `addr/32` the only IPv4 address on the interface.
    pub async fn ensure_only_addr(&self, index: u32, addr: Ipv4Addr) -> anyhow::Result<()> {
        let mut req = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut have = false;
        let mut stale = Vec::new();
        while let Some(m) = req.try_next().await.context("listing addresses")? {
            if m.header.family != AddressFamily::Inet {
                continue;
            }
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            if local == Some(addr) && m.header.prefix_len == 32 {
                have = true;
            } else {
                stale.push(m);
            }
        }
        for m in stale {
            log::info!(
                "removing stale address {:?} from interface #{index}",
                m.attributes
            );
            self.handle
                .address()
                .del(m)
                .execute()
                .await
                .context("removing a stale address")?;
        }
        if !have {
            self.handle
                .address()
                .add(index, IpAddr::V4(addr), 32)
                .execute()
                .await
                .with_context(|| format!("adding {addr}/32"))?;
        }
        Ok(())
    }

    /// IPv4 routes in the main table whose output device is `index`.
    pub async fn routes_via(&self, index: u32) -> anyhow::Result<Vec<KernelRoute>> {
        Ok(self
            .main_routes()
            .await?
            .into_iter()
            .filter(|(oif, _)| *oif == Some(index))
            .map(|(_, r)| r)
            .collect())
    }

    /// Every IPv4 route of the main table, with its output device.
    pub async fn main_routes(&self) -> anyhow::Result<Vec<(Option<u32>, KernelRoute)>> {
        let mut out = Vec::new();
        let mut req = self.handle.route().get(IpVersion::V4).execute();
        while let Some(r) = req.try_next().await.context("listing routes")? {
            if r.header.table != 254 {
                continue;
            }
            let mut oif = None;
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut gateway = None;
            let mut metric = 0;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Priority(m) => metric = *m,
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
                    _ => {}
                }
            }
            let Ok(dst) = Subnet::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            out.push((
                oif,
                KernelRoute {
                    dst,
                    gateway,
                    metric,
                    message: r,
                },
            ));
        }
        Ok(out)
    }

    /// `ip route replace <dst> via <gw> dev <index> onlink`
    pub async fn replace_route(&self, index: u32, dst: Subnet, gw: Ipv4Addr) -> anyhow::Result<()> {
        let mut req = self
            .handle
            .route()
            .add()
            .v4()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .gateway(gw)
            .output_interface(index)
            .protocol(RouteProtocol::Boot)
            .scope(RouteScope::Universe)
            .replace();
        req.message_mut().header.flags.push(RouteFlag::Onlink);
        req.execute()
            .await
            .with_context(|| format!("ip route replace {dst} via {gw} onlink (ifindex {index})"))
    }

    pub async fn delete_route(&self, route: &KernelRoute) -> anyhow::Result<()> {
        let res = self
            .handle
            .route()
            .del(route.message.clone())
            .execute()
            .await;
        gone_is_fine(res).with_context(|| format!("ip route del {}", route.dst))
    }

    /// IPv4 neighbours on the interface.
    pub async fn neighbours(&self, index: u32) -> anyhow::Result<Vec<KernelNeigh>> {
        let mut out = Vec::new();
        let mut req = self
            .handle
            .neighbours()
            .get()
            .set_family(IpVersion::V4)
            .execute();
        while let Some(n) = req.try_next().await.context("listing neighbours")? {
            if n.header.ifindex != index {
                continue;
            }
            let (ip, mac) = neigh_fields(&n);
            let Some(ip) = ip else { continue };
            out.push(KernelNeigh {
                ip,
                mac,
                permanent: n.header.state == NeighbourState::Permanent,
                message: n,
            });
        }
        Ok(out)
    }

    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`
    pub async fn replace_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: Mac,
    ) -> anyhow::Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_local_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .with_context(|| {
                format!("ip neigh replace {ip} lladdr {mac} nud permanent (ifindex {index})")
            })
    }

    pub async fn delete_neighbour(&self, n: &KernelNeigh) -> anyhow::Result<()> {
        let res = self
            .handle
            .neighbours()
            .del(n.message.clone())
            .execute()
            .await;
        gone_is_fine(res).with_context(|| format!("ip neigh del {}", n.ip))
    }
}

impl Netlink {
    /// `bridge fdb replace <mac> dev <index> dst <ip> self permanent`: the
    /// kernel VXLAN device's forwarding entry, as flanneld programs it.
    pub async fn replace_fdb(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> anyhow::Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .destination(IpAddr::V4(dst))
            .flags(vec![netlink_packet_route::neighbour::NeighbourFlag::Own])
            .replace()
            .execute()
            .await
            .with_context(|| {
                format!("bridge fdb replace {mac} dst {dst} self permanent (ifindex {index})")
            })
    }

    /// Unicast FDB entries with a destination on the VXLAN device.
    pub async fn fdb_entries(&self, index: u32) -> anyhow::Result<Vec<KernelFdb>> {
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = AddressFamily::Bridge;
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(n) = stream.try_next().await.context("listing FDB entries")? {
            if n.header.ifindex != index {
                continue;
            }
            let (dst, mac) = neigh_fields(&n);
            if let (Some(mac), Some(dst)) = (mac, dst)
                && mac.is_unicast()
            {
                out.push(KernelFdb {
                    mac,
                    dst,
                    message: n,
                });
            }
        }
        Ok(out)
    }

    /// Interfaces with a queueing discipline of their own (anything but
    /// `noqueue`: e.g. the CNI bandwidth plugin's TBF, a clsact for filters).
    pub async fn queued_links(&self) -> anyhow::Result<std::collections::HashSet<u32>> {
        let mut stream = self.handle.qdisc().get().execute();
        let mut out = std::collections::HashSet::new();
        while let Some(q) = stream.try_next().await.context("listing qdiscs")? {
            let noqueue = q.attributes.iter().any(
                |a| matches!(a, netlink_packet_route::tc::TcAttribute::Kind(k) if k == "noqueue"),
            );
            if !noqueue && let Ok(index) = u32::try_from(q.header.index) {
                out.insert(index);
            }
        }
        Ok(out)
    }

    /// MACs the bridges have learned, with the port each was learned on
    /// (`bridge fdb show` without the ports' own, permanent addresses).
    pub async fn learned_macs(&self) -> anyhow::Result<Vec<(Mac, u32)>> {
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = AddressFamily::Bridge;
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(n) = stream
            .try_next()
            .await
            .context("listing bridge FDB entries")?
        {
            if matches!(
                n.header.state,
                NeighbourState::Permanent | NeighbourState::Noarp
            ) {
                continue;
            }
            if let (_, Some(mac)) = neigh_fields(&n)
                && mac.is_unicast()
            {
                out.push((mac, n.header.ifindex));
            }
        }
        Ok(out)
    }

    pub async fn delete_fdb(&self, e: &KernelFdb) -> anyhow::Result<()> {
        let res = self
            .handle
            .neighbours()
            .del(e.message.clone())
            .execute()
            .await;
        gone_is_fine(res).with_context(|| format!("bridge fdb del {} dst {}", e.mac, e.dst))
    }

    /// `ip link del`.
    pub async fn delete_link(&self, index: u32) -> anyhow::Result<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .with_context(|| format!("deleting interface #{index}"))
    }
}

/// A kernel FDB entry on a VXLAN device: `<mac> dst <ip> self permanent`.
#[derive(Clone, Debug)]
pub struct KernelFdb {
    pub mac: Mac,
    pub dst: Ipv4Addr,
    message: netlink_packet_route::neighbour::NeighbourMessage,
}

/// The IPv4 destination and link-layer address of a neighbour or FDB message.
fn neigh_fields(
    n: &netlink_packet_route::neighbour::NeighbourMessage,
) -> (Option<Ipv4Addr>, Option<Mac>) {
    let (mut ip, mut mac) = (None, None);
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
            // In AF_BRIDGE dumps the parser cannot tell the address family.
            NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                ip = Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            NeighbourAttribute::LinkLocalAddress(l) => mac = Mac::from_slice(l),
            _ => {}
        }
    }
    (ip, mac)
}

/// Whether `ip` is on-link through `underlay`: the longest matching route
/// leaves by that device with no gateway (Flannel's DirectRouting test);
/// of equally long ones, the lowest metric, as the kernel picks.
pub fn onlink(routes: &[(Option<u32>, KernelRoute)], underlay: u32, ip: Ipv4Addr) -> bool {
    routes
        .iter()
        .filter(|(_, r)| r.dst.contains(ip))
        .max_by_key(|(_, r)| (r.dst.prefix_len(), std::cmp::Reverse(r.metric)))
        .is_some_and(|(oif, r)| *oif == Some(underlay) && r.gateway.is_none())
}

/// Reject a VTEP name that could not be an interface name.
pub fn check_ifname(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.contains(char::is_whitespace)
    {
        bail!("{name:?} is not a valid interface name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_link_takes_the_lowest_metric_of_equally_long_routes() {
        let net: Subnet = "10.1.5.0/24".parse().unwrap();
        let with_metric = |metric| KernelRoute {
            metric,
            ..KernelRoute::synthetic(net, None)
        };
        let peer = Ipv4Addr::new(10, 1, 5, 12);
        let mut routes = vec![(Some(2), with_metric(100)), (Some(3), with_metric(50))];
        assert!(!onlink(&routes, 2, peer), "eth1's route is used");
        routes.reverse();
        assert!(!onlink(&routes, 2, peer), "whatever the dump order");
        assert!(onlink(&routes, 3, peer));
    }
}
