//! Where leases come from. Every source yields the same snapshot shape, so one
//! reconciler serves them all.
pub mod file;

use std::collections::BTreeMap;

use crate::{lease::Lease, subnet::Subnet};

/// All usable VXLAN leases at one moment, keyed by subnet.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub leases: BTreeMap<Subnet, Lease>,
}

/// How many leases were added, changed and removed between two snapshots.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
}

/// One log line per lease change, saying what changed.
pub fn log_changes(old: &Snapshot, new: &Snapshot) -> Changes {
    let mut c = Changes::default();
    for (s, l) in &new.leases {
        match old.leases.get(s) {
            None => {
                c.added += 1;
                log::info!(
                    "lease added subnet={s} public_ip={} vtep_mac={}",
                    l.public_ip,
                    l.vtep_mac
                )
            }
            Some(o) if o != l => {
                c.changed += 1;
                let mut what = Vec::new();
                if o.public_ip != l.public_ip {
                    what.push(format!("public_ip={}→{}", o.public_ip, l.public_ip));
                }
                if o.vtep_mac != l.vtep_mac {
                    what.push(format!("vtep_mac={}→{}", o.vtep_mac, l.vtep_mac));
                }
                log::info!("lease changed subnet={s} {}", what.join(" "));
            }
            _ => {}
        }
    }
    for s in old.leases.keys().filter(|s| !new.leases.contains_key(s)) {
        c.removed += 1;
        log::info!("lease removed subnet={s}");
    }
    c
}
