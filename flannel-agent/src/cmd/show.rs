//! `flannel-agent show`: the pinned tables in the shape of the iproute2
//! commands operators already use on Flannel nodes, or as JSON.
use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use anyhow::Context;
use clap::ValueEnum;
use flannel_ebpf_common::{NodeConfig, PeerStats};
use serde_json::{Value, json};

use crate::{ebpf::tables::Tables, lease::mac::Mac};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum View {
    /// Like `ip route show dev flannel.1`.
    Routes,
    /// Like `ip neigh show dev flannel.1`.
    Arp,
    /// Like `bridge fdb show dev flannel.1`.
    Fdb,
    /// Dual-stack: like `bridge fdb show dev flannel-v6.1`, with each
    /// member's IPv6 subnet (what ingress checks VXLAN over IPv6 against).
    Fdb6,
    /// Dual-stack direct path: the ROUTE6 table, like flanneld's
    /// `ip -6 route show dev flannel-v6.1`, with each member's public IPv6
    /// address and VtepMAC (what the direct path encapsulates with).
    Routes6,
    /// One line per remote node: subnet, VTEP, VtepMAC, public IP, traffic.
    Peers,
    /// Datapath counters, every drop and fallback reason by name.
    Stats,
}

/// One remote node, joined across the tables.
#[derive(Debug, Clone)]
pub struct Peer {
    pub subnets: Vec<String>,
    pub vtep_addrs: Vec<String>,
    pub vtep_mac: Mac,
    pub public_ip: std::net::IpAddr,
    pub stats: PeerStats,
}

/// Remote nodes, from the FDB (one per VtepMAC) joined with ARP and route
/// entries, then IPv6-only nodes from the FDB6 (their own stats slots).
pub fn peers(t: &Tables) -> anyhow::Result<Vec<Peer>> {
    let routes = t.route_entries()?;
    let arp = t.arp_entries()?;
    let mut out = Vec::new();
    let fdb = t.fdb_entries()?;
    let v4_slots: std::collections::BTreeSet<u32> = fdb.values().map(|(_, s)| *s).collect();
    for (mac, v) in t.fdb6_values()? {
        if v4_slots.contains(&v.peer_slot) || v.peer_slot >= flannel_ebpf_common::MAX_NODES {
            continue; // a dual-stack node, shown with its IPv4 half
        }
        let subnet = crate::lease::subnet6::Subnet6::new(v.subnet6.into(), v.subnet6_len)
            .context("FDB6 map: a subnet with host bits set")?;
        out.push(Peer {
            subnets: vec![subnet.to_string()],
            vtep_addrs: vec![subnet.vtep_addr().to_string()],
            vtep_mac: mac,
            public_ip: std::net::Ipv6Addr::from(v.node_ip6).into(),
            stats: t.peer(v.peer_slot)?,
        });
    }
    for (mac, (ip, slot)) in fdb {
        let vtep_addrs: Vec<Ipv4Addr> = arp
            .iter()
            .filter(|(_, m)| **m == mac)
            .map(|(a, _)| *a)
            .collect();
        let subnets = routes
            .iter()
            .filter(|(_, v)| vtep_addrs.contains(v))
            .map(|(s, _)| s.to_string())
            .collect();
        out.push(Peer {
            subnets,
            vtep_addrs: vtep_addrs.iter().map(|a| a.to_string()).collect(),
            vtep_mac: mac,
            public_ip: ip.into(),
            stats: t.peer(slot)?,
        });
    }
    Ok(out)
}

/// Seconds since a CLOCK_MONOTONIC timestamp from the datapath.
pub fn seconds_ago(ns: u64) -> Option<f64> {
    if ns == 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    Some(now.saturating_sub(ns) as f64 / 1e9)
}

fn vtep_name(cfg: &NodeConfig) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(cfg.vtep_ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        // Not in this network namespace: Flannel's name for it.
        return format!("flannel.{}", cfg.vni);
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

pub fn render(root: &Path, view: View, as_json: bool) -> anyhow::Result<String> {
    let t =
        Tables::open(root).with_context(|| format!("nothing to show under {}", root.display()))?;
    let cfg = t.node_config()?;
    let dev = vtep_name(&cfg);
    let mut s = String::new();
    let j: Value = match view {
        View::Routes => {
            let r = t.route_entries()?;
            for (dst, via) in &r {
                writeln!(s, "{dst} via {via} dev {dev} onlink")?;
            }
            json!(
                r.iter()
                    .map(
                        |(d, v)| json!({"dst": d.to_string(), "gateway": v.to_string(), "dev": dev})
                    )
                    .collect::<Vec<_>>()
            )
        }
        View::Arp => {
            let a = t.arp_entries()?;
            for (ip, mac) in &a {
                writeln!(s, "{ip} dev {dev} lladdr {mac} PERMANENT")?;
            }
            json!(
                a.iter()
                    .map(
                        |(i, m)| json!({"dst": i.to_string(), "lladdr": m.to_string(), "dev": dev})
                    )
                    .collect::<Vec<_>>()
            )
        }
        View::Fdb => {
            let f = t.fdb_entries()?;
            for (mac, (ip, _)) in &f {
                writeln!(s, "{mac} dev {dev} dst {ip} self permanent")?;
            }
            json!(f.iter().map(|(m, (i, _))| json!({"mac": m.to_string(), "dst": i.to_string(), "dev": dev})).collect::<Vec<_>>())
        }
        View::Fdb6 => {
            let f = t.fdb6_entries()?;
            let dev6 = format!("flannel-v6.{}", cfg.vni);
            for (mac, (ip, subnet)) in &f {
                writeln!(s, "{mac} dev {dev6} dst {ip} self permanent  # {subnet}")?;
            }
            json!(f.iter().map(|(m, (i, sub))| json!({"mac": m.to_string(), "dst": i.to_string(), "subnet": sub.to_string(), "dev": dev6})).collect::<Vec<_>>())
        }
        View::Routes6 => {
            let len = match &t.config6 {
                Some(c) => c.get(&0).context("reading the CONFIG6 map")?,
                None => None,
            }
            .map_or(0, |c| c.subnet6_len);
            let dev6 = format!("flannel-v6.{}", cfg.vni);
            let r = t.route6_entries()?;
            let mut rows = Vec::new();
            for (k, v) in &r {
                let (net, node) = (
                    std::net::Ipv6Addr::from(k.subnet6),
                    std::net::Ipv6Addr::from(v.node_ip6),
                );
                let mac = Mac(v.vtep_mac6);
                writeln!(
                    s,
                    "{net}/{len} via {net} dev {dev6} onlink  # {mac} dst {node}"
                )?;
                rows.push(json!({"dst": format!("{net}/{len}"), "gateway": net.to_string(), "dev": dev6, "lladdr": mac.to_string(), "node": node.to_string()}));
            }
            json!(rows)
        }
        View::Peers => {
            let ps = peers(&t)?;
            writeln!(
                s,
                "{:<18} {:<15} {:<17} {:<15} {:>10} {:>12} {:>10} {:>12} {:>9} {:>7} {:>10}",
                "SUBNET",
                "VTEP",
                "VTEP-MAC",
                "PUBLIC-IP",
                "TX-PKTS",
                "TX-BYTES",
                "RX-PKTS",
                "RX-BYTES",
                "FALLBACKS",
                "DROPS",
                "LAST-SEEN"
            )?;
            for p in &ps {
                let seen = seconds_ago(p.stats.last_rx_ns)
                    .map_or("never".into(), |x| format!("{x:.1}s ago"));
                writeln!(
                    s,
                    "{:<18} {:<15} {:<17} {:<15} {:>10} {:>12} {:>10} {:>12} {:>9} {:>7} {:>10}",
                    join(&p.subnets),
                    join(&p.vtep_addrs),
                    p.vtep_mac.to_string(),
                    p.public_ip.to_string(),
                    p.stats.tx_packets,
                    p.stats.tx_bytes,
                    p.stats.rx_packets,
                    p.stats.rx_bytes,
                    p.stats.tx_fallbacks,
                    p.stats.rx_drops,
                    seen
                )?;
            }
            json!(ps.iter().map(|p| json!({
                "subnets": p.subnets.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
                "vtep_addrs": p.vtep_addrs.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
                "vtep_mac": p.vtep_mac.to_string(),
                "public_ip": p.public_ip.to_string(),
                "tx_packets": p.stats.tx_packets,
                "tx_bytes": p.stats.tx_bytes,
                "rx_packets": p.stats.rx_packets,
                "rx_bytes": p.stats.rx_bytes,
                "tx_fallbacks": p.stats.tx_fallbacks,
                "rx_drops": p.stats.rx_drops,
                "last_seen_seconds_ago": seconds_ago(p.stats.last_rx_ns),
            })).collect::<Vec<_>>())
        }
        View::Stats => {
            let c = t.counters()?;
            writeln!(s, "{:<32} {:>12} {:>14}", "COUNTER", "PACKETS", "BYTES")?;
            for (ctr, v) in &c {
                writeln!(s, "{:<32} {:>12} {:>14}", ctr.name(), v.packets, v.bytes)?;
            }
            let mut m: BTreeMap<String, Value> = c
                .iter()
                .map(|(ctr, v)| {
                    (
                        ctr.name().to_string(),
                        json!({"packets": v.packets, "bytes": v.bytes}),
                    )
                })
                .collect();
            // The membership guard's drops at the kernel's sockets, by reason
            // (guard6_*: flannel-v6's socket on a dual-stack node).
            for (family, prefix) in [("ip", "guard"), ("ip6", "guard6")] {
                let guard = crate::node::guard::counters(family);
                if !guard.is_empty() {
                    writeln!(
                        s,
                        "\nguard (nftables table {family} {}):",
                        crate::node::guard::TABLE
                    )?;
                }
                for (name, (packets, bytes)) in guard {
                    writeln!(
                        s,
                        "{:<32} {:>12} {:>14}",
                        format!("{prefix}_{name}"),
                        packets,
                        bytes
                    )?;
                    m.insert(
                        format!("{prefix}_{name}"),
                        json!({"packets": packets, "bytes": bytes}),
                    );
                }
            }
            json!(m)
        }
    };
    if as_json {
        return Ok(serde_json::to_string_pretty(&j)? + "\n");
    }
    Ok(s)
}

fn join<T: ToString>(v: &[T]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
