//! `--ip-masq`: flanneld's masquerade and forward-accept rules, in nftables
//! (tables `ip flannel-ipv4` and `ip6 flannel-ipv6`) or iptables and
//! ip6tables (chains FLANNEL-POSTRTG, FLANNEL-FWD), the same rules for each
//! family as flanneld writes them.
//! Each write is one transaction — an `nft -f` script or an
//! `iptables-restore --noflush` commit — so a restart never leaves external
//! traffic unmasqueraded (flanneld flushes, then refills).
use std::{
    fmt::Display,
    io::Write,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use clap::ValueEnum;

use crate::lease::subnet::Subnet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MasqBackend {
    Nftables,
    Iptables,
}

pub const NFT_TABLE: &str = "flannel-ipv4";
pub const NFT_TABLE6: &str = "flannel-ipv6";

/// Which family's rules: the names and the one address that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// nft's table family and address keyword (`ip saddr`, `ip6 saddr`).
    fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
    fn table(self) -> &'static str {
        match self {
            Family::V4 => NFT_TABLE,
            Family::V6 => NFT_TABLE6,
        }
    }
    /// Multicast is never masqueraded.
    fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
    fn iptables_restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

/// Delete nftables table `ip NAME` if it exists (one transaction; nothing
/// to report when there is none).
pub(crate) fn nft_delete_table(name: &str) {
    nft_delete_table_in("ip", name);
}

/// The same for a table of another family (ip6, inet).
pub(crate) fn nft_delete_table_in(family: &str, name: &str) {
    let _ = pipe(
        "nft",
        &["-f", "-"],
        &format!("table {family} {name} {{}}\ndelete table {family} {name}\n"),
    );
}

pub(crate) fn pipe(cmd: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd} (is it installed?)"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The nft script: (re)create the family's table in one transaction.
pub fn nft_script(family: Family, network: impl Display, pod_cidr: impl Display) -> String {
    let (f, table, mcast) = (family.nft(), family.table(), family.multicast());
    format!(
        "table {f} {table} {{}}\n\
         delete table {f} {table}\n\
         table {f} {table} {{\n\
         \tchain postrtg {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & 0x4000 == 0x4000 return comment \"kube-proxy already NATs these\"\n\
         \t\t{f} saddr {pod_cidr} {f} daddr {network} return\n\
         \t\t{f} saddr {network} {f} daddr {pod_cidr} return\n\
         \t\t{f} saddr != {network} {f} daddr {pod_cidr} return\n\
         \t\t{f} saddr {network} {f} daddr != {mcast} masquerade fully-random\n\
         \t\t{f} saddr != {network} {f} daddr {network} masquerade fully-random\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\t{f} saddr {network} accept\n\
         \t\t{f} daddr {network} accept\n\
         \t}}\n\
         }}\n"
    )
}

/// The iptables-restore input: declaring a chain flushes it within the same commit.
pub fn iptables_script(
    family: Family,
    network: impl Display,
    pod_cidr: impl Display,
    jumps: (bool, bool),
) -> String {
    let mcast = family.multicast();
    let mut s = String::from("*nat\n:FLANNEL-POSTRTG - [0:0]\n");
    if !jumps.0 {
        s.push_str("-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n");
    }
    s.push_str(&format!(
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {pod_cidr} -d {network} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {network} -d {pod_cidr} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {network} -d {pod_cidr} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {network} ! -d {mcast} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {network} -d {network} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
         COMMIT\n*filter\n:FLANNEL-FWD - [0:0]\n"
    ));
    if !jumps.1 {
        s.push_str("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n");
    }
    s.push_str(&format!(
        "-A FLANNEL-FWD -s {network} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         -A FLANNEL-FWD -d {network} -m comment --comment \"flanneld forward\" -j ACCEPT\n\
         COMMIT\n"
    ));
    s
}

fn iptables_has(family: Family, table: &str, chain: &str, target: &str) -> bool {
    Command::new(family.iptables())
        .args(["-w", "-t", table, "-C", chain, "-m", "comment", "--comment"])
        .arg(if target == "FLANNEL-FWD" {
            "flanneld forward"
        } else {
            "flanneld masq"
        })
        .args(["-j", target])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Install (or atomically replace) the IPv4 rules; the other backend's are removed.
pub fn install(backend: MasqBackend, network: Subnet, pod_cidr: Subnet) -> anyhow::Result<()> {
    install_family(backend, Family::V4, network, pod_cidr)
}

/// The same for IPv6 (EnableIPv6): table `ip6 flannel-ipv6`, or ip6tables.
pub fn install6(
    backend: MasqBackend,
    network: crate::lease::subnet6::Subnet6,
    pod_cidr: crate::lease::subnet6::Subnet6,
) -> anyhow::Result<()> {
    install_family(backend, Family::V6, network, pod_cidr)
}

fn install_family(
    backend: MasqBackend,
    family: Family,
    network: impl Display + Copy,
    pod_cidr: impl Display + Copy,
) -> anyhow::Result<()> {
    match backend {
        MasqBackend::Nftables => remove_iptables(family),
        MasqBackend::Iptables => remove_nftables(family),
    }
    match backend {
        MasqBackend::Nftables => pipe("nft", &["-f", "-"], &nft_script(family, network, pod_cidr))
            .with_context(|| format!("installing the nftables masquerade rules ({family:?})"))?,
        MasqBackend::Iptables => {
            let jumps = (
                iptables_has(family, "nat", "POSTROUTING", "FLANNEL-POSTRTG"),
                iptables_has(family, "filter", "FORWARD", "FLANNEL-FWD"),
            );
            pipe(
                family.iptables_restore(),
                &["-w", "--noflush"],
                &iptables_script(family, network, pod_cidr, jumps),
            )
            .with_context(|| format!("installing the {} masquerade rules", family.iptables()))?
        }
    }
    log::info!(
        "ip-masq: {backend:?} rules for {network} (pod subnet {pod_cidr}) in place ({family:?})"
    );
    Ok(())
}

/// Remove whatever rules an earlier run installed, with either backend,
/// for both families.
pub fn remove_all() {
    for family in [Family::V4, Family::V6] {
        remove_nftables(family);
        remove_iptables(family);
    }
}

/// Remove one family's rules (IPv6 switched off or --ip-masq dropped).
pub fn remove_family(family: Family) {
    remove_nftables(family);
    remove_iptables(family);
}

fn remove_nftables(family: Family) {
    nft_delete_table_in(family.nft(), family.table());
}

fn remove_iptables(family: Family) {
    // No ip6tables on the node: nothing of ours can be there.
    if Command::new(family.iptables())
        .arg("--version")
        .output()
        .is_err()
    {
        return;
    }
    for (table, chain, target) in [
        ("nat", "POSTROUTING", "FLANNEL-POSTRTG"),
        ("filter", "FORWARD", "FLANNEL-FWD"),
    ] {
        while iptables_has(family, table, chain, target) {
            let comment = if target == "FLANNEL-FWD" {
                "flanneld forward"
            } else {
                "flanneld masq"
            };
            let ok = Command::new(family.iptables())
                .args([
                    "-w",
                    "-t",
                    table,
                    "-D",
                    chain,
                    "-m",
                    "comment",
                    "--comment",
                    comment,
                    "-j",
                    target,
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if !ok {
                break;
            }
        }
        let _ = Command::new(family.iptables())
            .args(["-w", "-t", table, "-F", target])
            .output();
        let _ = Command::new(family.iptables())
            .args(["-w", "-t", table, "-X", target])
            .output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_in_flanneld_order() {
        let net: Subnet = "10.244.0.0/16".parse().unwrap();
        let pod: Subnet = "10.244.1.0/24".parse().unwrap();
        let nft = nft_script(Family::V4, net, pod);
        let order = [
            "mark & 0x4000",
            "saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return",
            "masquerade fully-random",
        ];
        let pos: Vec<usize> = order.iter().map(|p| nft.find(p).unwrap()).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{nft}");
        let ipt = iptables_script(Family::V4, net, pod, (true, false));
        assert!(
            !ipt.contains("-A POSTROUTING"),
            "jump already present: not added twice"
        );
        assert!(
            ipt.contains("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD")
        );
        assert!(ipt.contains("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"));
    }

    #[test]
    fn ipv6_rules_as_flanneld_writes_them() {
        use crate::lease::subnet6::Subnet6;
        let net: Subnet6 = "fd00:10:244::/56".parse().unwrap();
        let pod: Subnet6 = "fd00:10:244:1::/64".parse().unwrap();
        let nft = nft_script(Family::V6, net, pod);
        assert!(nft.contains("table ip6 flannel-ipv6 {\n"), "{nft}");
        assert!(
            nft.contains(
                "ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade fully-random"
            ),
            "{nft}"
        );
        assert!(!nft.contains("ip saddr"), "{nft}");
        let ipt = iptables_script(Family::V6, net, pod, (false, false));
        assert!(ipt.contains("-A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"), "{ipt}");
        assert!(ipt.contains("-A FLANNEL-FWD -d fd00:10:244::/56 -m comment --comment \"flanneld forward\" -j ACCEPT"), "{ipt}");
    }
}
