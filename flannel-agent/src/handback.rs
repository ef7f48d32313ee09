//! `flannel-agent uninstall`: give the node back to the kernel's VXLAN data
//! path without a gap — the kernel FDB entries are written from the FDB map
//! while the programs still carry the traffic, then the links (detaching the
//! programs) and the maps are removed. Routes and neighbours are Flannel's
//! already and stay.
use std::path::Path;

use crate::{datapath, netlink::Netlink, tables::Tables};

pub async fn uninstall(root: &Path) -> anyhow::Result<()> {
    match Tables::open(root) {
        Ok(t) => {
            let cfg = t.node_config()?;
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
            let fdb = t.fdb_entries()?;
            for (mac, (ip, _)) in &fdb {
                nl.replace_fdb(vtep.index, *mac, *ip).await?;
            }
            log::info!(
                "handed {} peers back to the kernel data path on {} (bridge fdb … self permanent)",
                fdb.len(),
                vtep.name
            );
        }
        Err(e) => log::info!("nothing to hand back: {e:#}"),
    }
    datapath::uninstall(root)?;
    crate::masq::remove_all();
    crate::guard::remove();
    log::info!(
        "removed every pinned object under {} and the ip-masq rules",
        root.display()
    );
    Ok(())
}
