//! The membership guard around the kernel's VXLAN socket.
//!
//! flannel.1's socket listens on 0.0.0.0:<port> and decapsulates whatever
//! reaches it; our programs check what they see on the underlay, but some
//! VXLAN reaches the socket without being decapsulated by them: reassembled
//! fragments, GSO aggregates, a member's non-IPv4 frames (all checked by the
//! programs first), and frames our hook never sees (to another local
//! address, from another interface, from a pod on this node). One nftables
//! table closes those paths: VXLAN reaches the socket only to our public IP,
//! through the underlay, from a member. A second rule stops anything this
//! node forwards from its pods (any source: a pod with CAP_NET_RAW can forge
//! a member's) to the VXLAN port of a member: with --ip-masq, or forged, such
//! a datagram would pass there as overlay traffic.
//! Each write is one `nft -f` transaction, so there is no unguarded moment.
//! Dual-stack nodes get the same table in the ip6 family for flannel-v6's socket.
use std::{collections::BTreeSet, net::IpAddr};

use anyhow::Context;

use crate::node::masq::pipe;

pub const TABLE: &str = "flannel-ebpf-guard";

/// The named counters, one per reason, as `nft list counters` shows them.
pub const COUNTERS: &[(&str, &str)] = &[
    ("vxlan_not_to_public_ip", "VXLAN to another local address"),
    (
        "vxlan_not_via_underlay",
        "VXLAN arriving on another interface",
    ),
    (
        "vxlan_from_non_member",
        "VXLAN from a host that is not a member",
    ),
    (
        "pod_to_vxlan_port",
        "a pod sending to a member's VXLAN port",
    ),
];

/// What the guard protects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub port: u16,
    /// Our public IP: its family is the table's (ip or ip6).
    pub public_ip: IpAddr,
    pub underlay: String,
}

impl Spec {
    /// nftables' family, set type and address match for our public IP's family.
    fn family(&self) -> (&'static str, &'static str) {
        match self.public_ip {
            IpAddr::V4(_) => ("ip", "ipv4_addr"),
            IpAddr::V6(_) => ("ip6", "ipv6_addr"),
        }
    }
}

/// The guard as installed: re-written whole at start-up, its member set
/// after that.
pub struct Guard {
    spec: Spec,
    members: Option<BTreeSet<IpAddr>>,
}

fn elements(members: &BTreeSet<IpAddr>) -> String {
    members
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The whole table, replacing any earlier one in the same transaction.
pub fn script(spec: &Spec, members: &BTreeSet<IpAddr>) -> String {
    let Spec {
        port,
        public_ip,
        underlay,
    } = spec;
    let (ip, addr_type) = spec.family();
    let mut s = format!(
        "table {ip} {TABLE} {{}}\n\
         delete table {ip} {TABLE}\n\
         table {ip} {TABLE} {{\n\
         \tset members {{ type {addr_type}; }}\n"
    );
    for (name, _) in COUNTERS {
        s.push_str(&format!("\tcounter {name} {{}}\n"));
    }
    s.push_str(&format!(
        "\tchain input {{\n\
         \t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\tudp dport {port} {ip} daddr != {public_ip} counter name vxlan_not_to_public_ip drop\n\
         \t\tudp dport {port} iifname != \"{underlay}\" counter name vxlan_not_via_underlay drop\n\
         \t\tudp dport {port} {ip} saddr != @members counter name vxlan_from_non_member drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\tiifname != \"{underlay}\" {ip} daddr @members udp dport {port} counter name pod_to_vxlan_port drop\n\
         \t}}\n\
         }}\n"
    ));
    if !members.is_empty() {
        s.push_str(&format!(
            "add element {ip} {TABLE} members {{ {} }}\n",
            elements(members)
        ));
    }
    s
}

impl Guard {
    pub fn new(spec: Spec) -> Guard {
        Guard {
            spec,
            members: None,
        }
    }

    /// Make the member set `members`: the first call (re)installs the whole
    /// table, later ones only change the set, and only when it changed.
    pub fn set_members(&mut self, members: BTreeSet<IpAddr>) -> anyhow::Result<()> {
        if self.members.as_ref() == Some(&members) {
            return Ok(());
        }
        let (ip, _) = self.spec.family();
        let script = match &self.members {
            None => script(&self.spec, &members),
            Some(_) => {
                let mut s = format!("flush set {ip} {TABLE} members\n");
                if !members.is_empty() {
                    s.push_str(&format!(
                        "add element {ip} {TABLE} members {{ {} }}\n",
                        elements(&members)
                    ));
                }
                s
            }
        };
        pipe("nft", &["-f", "-"], &script)
            .with_context(|| format!("writing the nftables table {ip} {TABLE}"))?;
        if self.members.is_none() {
            log::info!(
                "guard: VXLAN to port {} is taken only to {} via {} from the {} members (nftables table {ip} {TABLE})",
                self.spec.port,
                self.spec.public_ip,
                self.spec.underlay,
                members.len()
            );
        }
        self.members = Some(members);
        Ok(())
    }
}

/// The guard's named counters: name → (packets, bytes); empty without it.
pub fn counters(family: &str) -> std::collections::BTreeMap<String, (u64, u64)> {
    let out = std::process::Command::new("nft")
        .args(["-j", "list", "counters", "table", family, TABLE])
        .output();
    let Ok(out) = out else {
        return Default::default();
    };
    if !out.status.success() {
        return Default::default();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let c = e.get("counter")?;
            let name = c["name"].as_str()?.to_string();
            Some((name, (c["packets"].as_u64()?, c["bytes"].as_u64()?)))
        })
        .collect()
}

/// Fail now, naming it, when nft is not there (before the node is touched);
/// `who` needs it, and `way_out` says how to run without.
pub fn require_nft(who: &str, way_out: &str) -> anyhow::Result<()> {
    let ok = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        anyhow::bail!("{who} needs nft (nftables) on this node; install it, or {way_out}");
    }
    Ok(())
}

/// Remove the table (uninstall, or a data path that has no use for it).
pub fn remove() {
    crate::node::masq::nft_delete_table(TABLE);
    remove6();
}

/// Remove the ip table alone (an IPv6-only node has no flannel.1 socket).
pub fn remove4() {
    crate::node::masq::nft_delete_table(TABLE);
}

/// Remove the ip6 table alone (IPv6 switched off).
pub fn remove6() {
    crate::node::masq::nft_delete_table_in("ip6", TABLE);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_takes_vxlan_only_from_members_to_our_address() {
        let spec = Spec {
            port: 8472,
            public_ip: "10.1.5.11".parse().unwrap(),
            underlay: "eth0".into(),
        };
        let members = BTreeSet::from(["10.1.5.12".parse().unwrap(), "10.1.5.13".parse().unwrap()]);
        let s = script(&spec, &members);
        assert!(s.contains(
            "udp dport 8472 ip daddr != 10.1.5.11 counter name vxlan_not_to_public_ip drop"
        ));
        assert!(s.contains(
            "udp dport 8472 iifname != \"eth0\" counter name vxlan_not_via_underlay drop"
        ));
        assert!(s.contains(
            "udp dport 8472 ip saddr != @members counter name vxlan_from_non_member drop"
        ));
        assert!(s.contains("iifname != \"eth0\" ip daddr @members udp dport 8472 counter name pod_to_vxlan_port drop"));
        assert!(
            s.ends_with("add element ip flannel-ebpf-guard members { 10.1.5.12, 10.1.5.13 }\n")
        );
        assert!(!script(&spec, &BTreeSet::new()).contains("add element"));
        // flannel-v6's socket: the same rules in the ip6 family.
        let spec6 = Spec {
            public_ip: "fc00::11".parse().unwrap(),
            ..spec
        };
        let s = script(&spec6, &BTreeSet::from(["fc00::12".parse().unwrap()]));
        assert!(s.contains("table ip6 flannel-ebpf-guard {\n\tset members { type ipv6_addr; }"));
        assert!(s.contains(
            "udp dport 8472 ip6 daddr != fc00::11 counter name vxlan_not_to_public_ip drop"
        ));
        assert!(s.contains(
            "udp dport 8472 ip6 saddr != @members counter name vxlan_from_non_member drop"
        ));
        assert!(
            s.contains("ip6 daddr @members udp dport 8472 counter name pod_to_vxlan_port drop")
        );
        assert!(s.ends_with("add element ip6 flannel-ebpf-guard members { fc00::12 }\n"));
    }
}
