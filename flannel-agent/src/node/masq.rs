//! `--ip-masq`: flanneld's masquerade and forward-accept rules, in nftables
//! (table `ip flannel-ipv4`) or iptables (chains FLANNEL-POSTRTG, FLANNEL-FWD).
//! Each write is one transaction — an `nft -f` script or an
//! `iptables-restore --noflush` commit — so a restart never leaves external
//! traffic unmasqueraded (flanneld flushes, then refills).
use std::{
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

/// The nft script: (re)create the table in one transaction.
pub fn nft_script(network: Subnet, pod_cidr: Subnet) -> String {
    format!(
        "table ip {NFT_TABLE} {{}}\n\
         delete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
         \tchain postrtg {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & 0x4000 == 0x4000 return comment \"kube-proxy already NATs these\"\n\
         \t\tip saddr {pod_cidr} ip daddr {network} return\n\
         \t\tip saddr {network} ip daddr {pod_cidr} return\n\
         \t\tip saddr != {network} ip daddr {pod_cidr} return\n\
         \t\tip saddr {network} ip daddr != 224.0.0.0/4 masquerade fully-random\n\
         \t\tip saddr != {network} ip daddr {network} masquerade fully-random\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tip saddr {network} accept\n\
         \t\tip daddr {network} accept\n\
         \t}}\n\
         }}\n"
    )
}

/// The iptables-restore input: declaring a chain flushes it within the same commit.
pub fn iptables_script(network: Subnet, pod_cidr: Subnet, jumps: (bool, bool)) -> String {
    let mut s = String::from("*nat\n:FLANNEL-POSTRTG - [0:0]\n");
    if !jumps.0 {
        s.push_str("-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n");
    }
    s.push_str(&format!(
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {pod_cidr} -d {network} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {network} -d {pod_cidr} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {network} -d {pod_cidr} -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A FLANNEL-POSTRTG -s {network} ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
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

fn iptables_has(table: &str, chain: &str, target: &str) -> bool {
    Command::new("iptables")
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

/// Install (or atomically replace) the rules; the other backend's are removed.
pub fn install(backend: MasqBackend, network: Subnet, pod_cidr: Subnet) -> anyhow::Result<()> {
    match backend {
        MasqBackend::Nftables => remove_iptables(),
        MasqBackend::Iptables => remove_nftables(),
    }
    match backend {
        MasqBackend::Nftables => pipe("nft", &["-f", "-"], &nft_script(network, pod_cidr))
            .context("installing the nftables masquerade rules")?,
        MasqBackend::Iptables => {
            let jumps = (
                iptables_has("nat", "POSTROUTING", "FLANNEL-POSTRTG"),
                iptables_has("filter", "FORWARD", "FLANNEL-FWD"),
            );
            pipe(
                "iptables-restore",
                &["-w", "--noflush"],
                &iptables_script(network, pod_cidr, jumps),
            )
            .context("installing the iptables masquerade rules")?
        }
    }
    log::info!("ip-masq: {backend:?} rules for {network} (pod subnet {pod_cidr}) in place");
    Ok(())
}

/// Remove whatever rules an earlier run installed, with either backend.
pub fn remove_all() {
    remove_nftables();
    remove_iptables();
}

fn remove_nftables() {
    let _ = pipe(
        "nft",
        &["-f", "-"],
        &format!("table ip {NFT_TABLE} {{}}\ndelete table ip {NFT_TABLE}\n"),
    );
}

fn remove_iptables() {
    for (table, chain, target) in [
        ("nat", "POSTROUTING", "FLANNEL-POSTRTG"),
        ("filter", "FORWARD", "FLANNEL-FWD"),
    ] {
        while iptables_has(table, chain, target) {
            let comment = if target == "FLANNEL-FWD" {
                "flanneld forward"
            } else {
                "flanneld masq"
            };
            let ok = Command::new("iptables")
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
        let _ = Command::new("iptables")
            .args(["-w", "-t", table, "-F", target])
            .output();
        let _ = Command::new("iptables")
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
        let nft = nft_script(net, pod);
        let order = [
            "mark & 0x4000",
            "saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return",
            "masquerade fully-random",
        ];
        let pos: Vec<usize> = order.iter().map(|p| nft.find(p).unwrap()).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{nft}");
        let ipt = iptables_script(net, pod, (true, false));
        assert!(
            !ipt.contains("-A POSTROUTING"),
            "jump already present: not added twice"
        );
        assert!(
            ipt.contains("-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD")
        );
        assert!(ipt.contains("-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"));
    }
}
