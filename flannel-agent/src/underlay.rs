//! Picking the underlay interface and public IP, as flanneld does by default.
use std::net::Ipv4Addr;

use anyhow::{Context, bail};

use crate::netlink::{Link, Netlink};

pub struct Underlay {
    pub link: Link,
    pub public_ip: Ipv4Addr,
}

pub async fn select(
    nl: &Netlink,
    iface: Option<&str>,
    public_ip: Option<Ipv4Addr>,
) -> anyhow::Result<Underlay> {
    let link = match (iface, public_ip) {
        (Some(spec), _) => match spec.parse::<Ipv4Addr>() {
            Ok(ip) => nl
                .link_with_addr(ip)
                .await?
                .with_context(|| format!("--iface {spec}: no interface has that address"))?,
            Err(_) => nl
                .link_by_name(spec)
                .await?
                .with_context(|| format!("--iface {spec}: no such interface"))?,
        },
        (None, Some(ip)) => match nl.link_with_addr(ip).await? {
            Some(l) => l,
            None => default_link(nl).await?,
        },
        (None, None) => default_link(nl).await?,
    };
    let public_ip = match public_ip {
        Some(ip) => ip,
        None => match iface.and_then(|s| s.parse::<Ipv4Addr>().ok()) {
            Some(ip) => ip,
            None => nl
                .ipv4_addrs(link.index)
                .await?
                .first()
                .map(|(ip, _)| *ip)
                .with_context(|| {
                    format!("{} has no IPv4 address to use as the public IP", link.name)
                })?,
        },
    };
    if link.mtu < 576 + 50 {
        bail!("{} has MTU {}: too small for VXLAN", link.name, link.mtu);
    }
    Ok(Underlay { link, public_ip })
}

async fn default_link(nl: &Netlink) -> anyhow::Result<Link> {
    nl.default_route_link()
        .await?
        .context("no --iface given and no IPv4 default route to pick the underlay interface from")
}
