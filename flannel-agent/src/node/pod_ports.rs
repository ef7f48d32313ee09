//! The direct path's delivery table: which veth on the pod bridge each
//! local pod sits behind, so a decapsulated packet can go to that veth's
//! peer in the pod (bpf_redirect_peer) instead of through cni0's bridging.
//! Read from what the kernel already knows: cni0's neighbours (pod IP →
//! MAC) joined with the bridge's learned MACs (MAC → port). A pod missing
//! from either (silent since the FDB aged out, just started) has no entry,
//! and its packets take cni0 as before; the program also checks that the
//! host's neighbour for the pod is still the MAC recorded here.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use flannel_ebpf_common::PodPort;

use crate::{lease::mac::Mac, netlink::Netlink};

/// The pod ports behind the bridge with index `bridge`: pod IPv4 → port.
pub async fn read(nl: &Netlink, bridge: u32) -> anyhow::Result<BTreeMap<[u8; 4], PodPort>> {
    // Only veths whose peer is in another namespace: bpf_redirect_peer
    // drops a packet whose peer is in this one.
    let ports: HashSet<u32> = nl
        .links()
        .await?
        .into_iter()
        .filter(|l| l.master == Some(bridge) && l.veth && l.peer_elsewhere)
        .map(|l| l.index)
        .collect();
    let learned = nl.learned_macs().await?;
    let neighbours = nl.neighbours(bridge).await?;
    Ok(join(&ports, &learned, &neighbours_of(&neighbours)))
}

fn neighbours_of(n: &[crate::netlink::KernelNeigh]) -> Vec<(Ipv4Addr, Mac)> {
    n.iter().filter_map(|n| Some((n.ip, n.mac?))).collect()
}

/// Pod IP → port for every neighbour whose MAC was learned on exactly one
/// of `ports` (a MAC seen on two ports is ambiguous: no entry).
fn join(
    ports: &HashSet<u32>,
    learned: &[(Mac, u32)],
    neighbours: &[(Ipv4Addr, Mac)],
) -> BTreeMap<[u8; 4], PodPort> {
    let mut port_of: HashMap<Mac, Option<u32>> = HashMap::new();
    for (mac, port) in learned.iter().filter(|(_, p)| ports.contains(p)) {
        port_of
            .entry(*mac)
            .and_modify(|p| {
                if *p != Some(*port) {
                    *p = None
                }
            })
            .or_insert(Some(*port));
    }
    neighbours
        .iter()
        .filter_map(|(ip, mac)| {
            let ifindex = (*port_of.get(mac)?)?;
            Some((
                ip.octets(),
                PodPort {
                    ifindex,
                    mac: mac.0,
                    _pad: [0; 2],
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(last: u8) -> Mac {
        Mac([0x0a, 0x58, 0x0a, 0xf4, 0x01, last])
    }

    #[test]
    fn a_pod_is_behind_the_port_its_mac_was_learned_on() {
        let ports = HashSet::from([7, 8]);
        let learned = [
            (mac(10), 7),
            (mac(11), 8),
            // Learned on the uplink, not a pod port: ignored.
            (mac(12), 3),
            // On two ports: ambiguous.
            (mac(13), 7),
            (mac(13), 8),
        ];
        let neighbours = [
            (Ipv4Addr::new(10, 244, 1, 10), mac(10)),
            (Ipv4Addr::new(10, 244, 1, 11), mac(11)),
            (Ipv4Addr::new(10, 244, 1, 12), mac(12)),
            (Ipv4Addr::new(10, 244, 1, 13), mac(13)),
            // No learned MAC: no entry.
            (Ipv4Addr::new(10, 244, 1, 14), mac(14)),
        ];
        let got = join(&ports, &learned, &neighbours);
        let want: Vec<([u8; 4], u32)> = vec![([10, 244, 1, 10], 7), ([10, 244, 1, 11], 8)];
        assert_eq!(
            got.iter().map(|(k, v)| (*k, v.ifindex)).collect::<Vec<_>>(),
            want
        );
        assert_eq!(got[&[10, 244, 1, 10]].mac, mac(10).0);
    }
}
