//! Picking the underlay interface and public IP, as flanneld does.
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, bail};

use crate::netlink::{Link, Netlink};

pub struct Underlay {
    pub link: Link,
    pub public_ip: Ipv4Addr,
}

/// How the operator asked for the underlay, in flanneld's order of precedence.
#[derive(Debug, Default, Clone)]
pub struct Choice {
    pub iface: Vec<String>,
    pub iface_regex: Vec<String>,
    pub can_reach: Option<Ipv4Addr>,
    pub public_ip: Option<Ipv4Addr>,
}

/// The first of `--iface` (name or address) that exists here.
async fn by_iface(nl: &Netlink, specs: &[String]) -> anyhow::Result<(Link, Option<Ipv4Addr>)> {
    for spec in specs {
        // An IPv6 address names its interface (dual-stack: the IPv4 public
        // IP is then that interface's first).
        let found = match (spec.parse::<Ipv4Addr>(), spec.parse::<Ipv6Addr>()) {
            (Ok(ip), _) => nl.link_with_addr(ip).await?.map(|l| (l, Some(ip))),
            (_, Ok(ip6)) => nl.link_with_addr6(ip6).await?.map(|l| (l, None)),
            _ => nl.link_by_name(spec).await?.map(|l| (l, None)),
        };
        if let Some(f) = found {
            return Ok(f);
        }
    }
    bail!(
        "--iface {}: none of these interfaces or addresses exists here",
        specs.join(",")
    )
}

/// The first interface whose IPv4 address, else whose name, matches a regex.
async fn by_regex(nl: &Netlink, patterns: &[String]) -> anyhow::Result<(Link, Option<Ipv4Addr>)> {
    let links = nl.links().await?;
    for p in patterns {
        let re = regex::Regex::new(p).with_context(|| format!("--iface-regex {p:?}"))?;
        for l in &links {
            for (ip, _) in nl.ipv4_addrs(l.index).await? {
                if re.is_match(&ip.to_string()) {
                    return Ok((l.clone(), Some(ip)));
                }
            }
        }
        if let Some(l) = links.iter().find(|l| re.is_match(&l.name)) {
            return Ok((l.clone(), None));
        }
    }
    bail!(
        "--iface-regex {}: no interface address or name matches",
        patterns.join(",")
    )
}

/// The interface of the longest route to `dst` in the main table.
async fn by_reach(nl: &Netlink, dst: Ipv4Addr) -> anyhow::Result<Link> {
    let routes = nl.main_routes().await?;
    let index = routes
        .iter()
        .filter(|(oif, r)| oif.is_some() && r.dst.contains(dst))
        .max_by_key(|(_, r)| r.dst.prefix_len())
        .and_then(|(oif, _)| *oif)
        .with_context(|| format!("--iface-can-reach {dst}: no route to it"))?;
    nl.link_by_index(index)
        .await?
        .with_context(|| format!("--iface-can-reach {dst}: interface #{index} vanished"))
}

pub async fn select(nl: &Netlink, choice: &Choice) -> anyhow::Result<Underlay> {
    let (link, addr) = if !choice.iface.is_empty() {
        by_iface(nl, &choice.iface).await?
    } else if !choice.iface_regex.is_empty() {
        by_regex(nl, &choice.iface_regex).await?
    } else if let Some(dst) = choice.can_reach {
        (by_reach(nl, dst).await?, None)
    } else if let Some(ip) = choice.public_ip {
        match nl.link_with_addr(ip).await? {
            Some(l) => (l, Some(ip)),
            None => (default_link(nl).await?, None),
        }
    } else {
        (default_link(nl).await?, None)
    };
    let public_ip = match choice.public_ip.or(addr) {
        Some(ip) => ip,
        None => nl
            .ipv4_addrs(link.index)
            .await?
            .first()
            .map(|(ip, _)| *ip)
            .with_context(|| {
                format!("{} has no IPv4 address to use as the public IP", link.name)
            })?,
    };
    if link.mtu < 576 + 50 {
        bail!("{} has MTU {}: too small for VXLAN", link.name, link.mtu);
    }
    Ok(Underlay { link, public_ip })
}

/// IPv6-only (EnableIPv4 false): the underlay and public IPv6 address, in
/// flanneld's order — `--iface` (a name or an IPv6 address), `--iface-regex`
/// (an IPv6 address or a name), `--public-ipv6`'s interface, else the IPv6
/// default route's; the address is `--public-ipv6` or the first global one.
pub async fn select6(
    nl: &Netlink,
    choice: &Choice,
    public_ipv6: Option<Ipv6Addr>,
) -> anyhow::Result<(Link, Ipv6Addr)> {
    if choice.can_reach.is_some() {
        bail!(
            "--iface-can-reach takes an IPv4 address: with EnableIPv4 false use --iface or --public-ipv6"
        );
    }
    let links = nl.links().await?;
    let mut found: Option<(Link, Option<Ipv6Addr>)> = None;
    if !choice.iface.is_empty() {
        for spec in &choice.iface {
            found = match spec.parse::<Ipv6Addr>() {
                Ok(ip) => nl.link_with_addr6(ip).await?.map(|l| (l, Some(ip))),
                Err(_) => links
                    .iter()
                    .find(|l| l.name == *spec)
                    .map(|l| (l.clone(), None)),
            };
            if found.is_some() {
                break;
            }
        }
        if found.is_none() {
            bail!(
                "--iface {}: none of these interfaces or IPv6 addresses exists here",
                choice.iface.join(",")
            );
        }
    } else if !choice.iface_regex.is_empty() {
        'patterns: for p in &choice.iface_regex {
            let re = regex::Regex::new(p).with_context(|| format!("--iface-regex {p:?}"))?;
            for l in &links {
                for (ip, _) in nl.ipv6_addrs(l.index).await? {
                    if re.is_match(&ip.to_string()) {
                        found = Some((l.clone(), Some(ip)));
                        break 'patterns;
                    }
                }
            }
            if let Some(l) = links.iter().find(|l| re.is_match(&l.name)) {
                found = Some((l.clone(), None));
                break;
            }
        }
        if found.is_none() {
            bail!(
                "--iface-regex {}: no interface IPv6 address or name matches",
                choice.iface_regex.join(",")
            );
        }
    } else if let Some(ip) = public_ipv6 {
        found = nl.link_with_addr6(ip).await?.map(|l| (l, Some(ip)));
    }
    let (link, addr) = match found {
        Some(f) => f,
        None => (
            nl.default_route6_link().await?.context(
                "EnableIPv4 is false, no --iface given and no IPv6 default route to pick the underlay interface from",
            )?,
            None,
        ),
    };
    let ip6 = match public_ipv6.or(addr) {
        Some(ip) => ip,
        None => nl
            .ipv6_addrs(link.index)
            .await?
            .first()
            .map(|(ip, _)| *ip)
            .with_context(|| {
                format!(
                    "{} has no global IPv6 address to use as the public IPv6 address",
                    link.name
                )
            })?,
    };
    if link.mtu < 1280 + 70 {
        bail!(
            "{} has MTU {}: too small for VXLAN over IPv6",
            link.name,
            link.mtu
        );
    }
    Ok((link, ip6))
}

async fn default_link(nl: &Netlink) -> anyhow::Result<Link> {
    nl.default_route_link()
        .await?
        .context("no --iface given and no IPv4 default route to pick the underlay interface from")
}
