//! `flannel-agent uninstall`: give the node back to the kernel's VXLAN data
//! path without a gap — flanneld's per-node entries (neighbour, FDB entry,
//! route) are written from the maps while the programs still carry the
//! traffic, the one Network route is removed once they are in, then the
//! links (detaching the programs) and the maps are removed.
use std::{net::Ipv4Addr, path::Path};

use crate::{
    ebpf::datapath,
    ebpf::tables::Tables,
    lease::mac::Mac,
    lease::subnet::Subnet,
    netlink::Netlink,
    reconcile::{self, KernelFdb, KernelRoutes, MapView, Mode, Scope, Vtep},
};

pub async fn uninstall(root: &Path) -> anyhow::Result<()> {
    match Tables::open(root) {
        Ok(t) => {
            let cfg = t.node_config()?;
            if cfg.vtep_ifindex == 0 && cfg.ready != 0 {
                // IPv6-only: flannel-v6's kernel tables were kept as
                // flanneld keeps them all along; detaching hands it over.
                datapath::uninstall(root)?;
                remove_node_rules();
                log::info!(
                    "removed the IPv6-only data path under {} and the ip-masq rules; flannel-v6 carries the traffic",
                    root.display()
                );
                return Ok(());
            }
            let nl = Netlink::connect()?;
            // The same index in another namespace is another device: match the MAC too.
            let vtep = nl
                .link_by_index(cfg.vtep_ifindex)
                .await?
                .filter(|l| l.vxlan.is_some() && l.mac.map(|m| m.0) == Some(cfg.vtep_mac));
            let Some(vtep) = vtep else {
                log::warn!(
                    "the VTEP (ifindex {}) is not in this network namespace: not handing FDB entries back (run uninstall on the node itself)",
                    cfg.vtep_ifindex
                );
                datapath::uninstall(root)?;
                return Ok(());
            };
            let network = Subnet::new(
                Ipv4Addr::from(cfg.network),
                u32::from(Ipv4Addr::from(cfg.network_mask)).count_ones() as u8,
            )?;
            let scope = Scope {
                network,
                vtep: Some(Vtep {
                    index: vtep.index,
                    mac: Mac(cfg.vtep_mac),
                    gateway: network.addr(),
                }),
                underlay_index: cfg.underlay_ifindex,
            };
            // flanneld's tables from the maps; DirectRouting routes stay as they are.
            let want = MapView::read(&t)?.desired();
            let mode = Mode {
                routes: KernelRoutes::PerNode,
                fdb: KernelFdb::Program,
                direct: false,
            };
            // Kernel writes only: the maps carry the traffic until the end.
            let out = reconcile::apply(&want, None, &nl, &scope, &mode).await?;
            if let Some(e) = out.errors.first() {
                anyhow::bail!(
                    "handing the peers back failed ({} errors, first: {e}); the programs stay attached, run uninstall again",
                    out.errors.len()
                );
            }
            log::info!(
                "handed {} peers back to the kernel data path on {} (per node: ip route, ip neigh, bridge fdb … self permanent)",
                want.fdb.len(),
                vtep.name
            );
        }
        Err(e) => log::info!("nothing to hand back: {e:#}"),
    }
    datapath::uninstall(root)?;
    remove_node_rules();
    log::info!(
        "removed every pinned object under {} and the ip-masq rules",
        root.display()
    );
    Ok(())
}

/// The node's nftables/iptables rules the agent installed: --ip-masq's
/// (both families), the membership guard, the NAT mark.
fn remove_node_rules() {
    crate::node::masq::remove_all();
    crate::node::guard::remove();
    crate::node::nat_mark::remove();
}
