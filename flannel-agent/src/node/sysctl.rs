//! The few sysctls the datapath depends on.
use std::fs;

use anyhow::Context;

fn path(iface: &str, key: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{iface}/{key}")
}

fn read(iface: &str, key: &str) -> anyhow::Result<u32> {
    let p = path(iface, key);
    let v = fs::read_to_string(&p).with_context(|| format!("reading {p}"))?;
    v.trim()
        .parse()
        .with_context(|| format!("parsing {p}: {v:?}"))
}

/// Decapsulated packets enter the stack on the underlay while the route back
/// to their source is via flannel.1, so strict reverse-path filtering would
/// drop them. Relax the underlay to loose mode (2), which still drops
/// unroutable sources, and say so.
pub fn loosen_rp_filter(underlay: &str) -> anyhow::Result<()> {
    let effective = read("all", "rp_filter")?.max(read(underlay, "rp_filter")?);
    if effective == 1 {
        let p = path(underlay, "rp_filter");
        fs::write(&p, "2").with_context(|| format!("writing {p}"))?;
        log::warn!(
            "rp_filter on {underlay} was strict (1): set to loose (2), because decapsulated pod traffic arrives on {underlay}"
        );
    }
    Ok(())
}

pub fn warn_if_not_forwarding() {
    if fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() == "0") {
        log::warn!(
            "net.ipv4.ip_forward is 0: pod traffic will not be forwarded between cni0 and the overlay"
        );
    }
}

/// flanneld sets accept_ra=0 on flannel-v6: no router advertisement may
/// add addresses or routes to the VTEP.
pub fn refuse_router_advertisements(dev: &str) -> anyhow::Result<()> {
    let p = format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra");
    fs::write(&p, "0").with_context(|| format!("writing {p}"))
}

pub fn warn_if_not_forwarding6() {
    if fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").is_ok_and(|v| v.trim() == "0") {
        log::warn!(
            "net.ipv6.conf.all.forwarding is 0: IPv6 pod traffic will not be forwarded between cni0 and flannel-v6"
        );
    }
}

/// The kernel's local port range: the outer UDP source ports, as flannel.1 picks them.
pub fn local_port_range() -> (u16, u16) {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|x| x.parse::<u16>());
            match (it.next(), it.next()) {
                (Some(Ok(a)), Some(Ok(b))) if a < b => Some((a, b)),
                _ => None,
            }
        })
        .unwrap_or((32768, 60999))
}
