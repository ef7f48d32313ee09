//! What start-up set on the node, checked while the agent runs: the VTEP
//! device, the underlay's address and MTU, the pinned data path. When one of
//! them changes under us the agent runs its start-up again (re-executing
//! itself), which is the one path that builds all of them consistently.
use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use crate::{ebpf::datapath, netlink::Netlink};

/// The node as start-up left it.
pub struct NodeState {
    /// flannel.<VNI> (flannel-v6.<VNI> when IPv6-only): (name, ifindex);
    /// none with host-gw.
    pub vtep: Option<(String, u32)>,
    pub underlay_index: u32,
    pub underlay_name: String,
    pub underlay_mtu: u32,
    pub public_ip: IpAddr,
    /// Whether the public IP was on the underlay at start-up (a --public-ip
    /// that is not is reported then; only losing it later is drift).
    pub public_ip_local: bool,
    /// The pin root, for the eBPF data path, and the encap link pinned
    /// there (link_encap, or link_encap6 on an IPv6-only node).
    pub pins: Option<(PathBuf, &'static str)>,
}

impl NodeState {
    /// Why the node no longer matches what start-up set, if it does not.
    pub async fn drift(&self, nl: &Netlink) -> anyhow::Result<Option<String>> {
        if let Some((name, index)) = &self.vtep {
            match nl.link_by_name(name).await? {
                None => return Ok(Some(format!("{name} was deleted"))),
                Some(l) if l.index != *index => {
                    return Ok(Some(format!(
                        "{name} was re-created (index {index} → {})",
                        l.index
                    )));
                }
                Some(_) => {}
            }
        }
        let Some(underlay) = nl.link_by_index(self.underlay_index).await? else {
            return Ok(Some(format!("the underlay {} is gone", self.underlay_name)));
        };
        if underlay.mtu != self.underlay_mtu {
            return Ok(Some(format!(
                "the underlay {}'s MTU changed ({} → {})",
                self.underlay_name, self.underlay_mtu, underlay.mtu
            )));
        }
        let present = match self.public_ip {
            IpAddr::V4(ip) => nl
                .ipv4_addrs(self.underlay_index)
                .await?
                .iter()
                .any(|(a, _)| *a == ip),
            IpAddr::V6(ip) => nl
                .ipv6_addrs(self.underlay_index)
                .await?
                .iter()
                .any(|(a, _)| *a == ip),
        };
        if self.public_ip_local && !present {
            return Ok(Some(format!(
                "the public IP {} is no longer on the underlay {}",
                self.public_ip, self.underlay_name
            )));
        }
        if let Some((root, encap)) = &self.pins
            && let Some(missing) = missing_pin(root, encap)
        {
            return Ok(Some(format!(
                "{} is gone (bpffs unmounted or the pin removed)",
                missing.display()
            )));
        }
        Ok(None)
    }
}

/// Whether `ip` is on the underlay; if not, say once what that means.
pub async fn check_public_ip(
    nl: &Netlink,
    underlay_index: u32,
    underlay: &str,
    ip: Ipv4Addr,
    vxlan: bool,
) -> anyhow::Result<bool> {
    let local = nl
        .ipv4_addrs(underlay_index)
        .await?
        .iter()
        .any(|(a, _)| *a == ip);
    if !local {
        log::error!(
            "the public IP {ip} is not an address of the underlay {underlay}: peers send to it{}; \
             use --public-ip only for an address of this node, or --iface to pick the interface that has it",
            if vxlan {
                ", and the decap program accepts VXLAN only for it, so overlay traffic reaches this node only if something forwards it here unchanged"
            } else {
                ""
            }
        );
    }
    Ok(local)
}

fn missing_pin(root: &Path, encap_link: &str) -> Option<PathBuf> {
    let encap = root.join(encap_link);
    if !encap.exists() {
        return Some(encap);
    }
    if !datapath::decap_pinned(root) {
        return Some(root.join(datapath::LINK_DECAP_TC));
    }
    datapath::MAPS
        .iter()
        .map(|m| root.join(m.file))
        .find(|p| !p.exists())
}

/// Run start-up again: replace this process with a fresh copy of itself and
/// the same arguments (the pin root's lock is released with the old image).
pub fn restart_self(why: &str) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    log::error!("{why}: running start-up again to rebuild the node's data path");
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    // /proc/self/exe still names this binary if its file was replaced (an upgrade).
    let err = std::process::Command::new("/proc/self/exe")
        .args(args)
        .exec();
    anyhow::anyhow!("{why}, and re-running start-up failed: {err}")
}
