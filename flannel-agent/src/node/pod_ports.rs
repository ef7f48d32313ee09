//! The direct path's delivery table: which veth on the pod bridge each
//! local pod sits behind, so a decapsulated packet can go to that veth's
//! peer in the pod (bpf_redirect_peer) instead of through cni0's bridging.
//! Read from what the kernel already knows: cni0's neighbours (pod IPv4 and
//! IPv6 → MAC) joined with the bridge's learned MACs (MAC → port). A pod missing
//! from either (silent since the FDB aged out, just started) has no entry,
//! and its packets take cni0 as before; the program also checks that the
//! host's neighbour for the pod is still the MAC recorded here.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
};

use flannel_ebpf_common::{PodPort, pod_port_key};

use crate::{lease::mac::Mac, netlink::Netlink};

/// The pod ports behind the bridge with index `bridge`: pod address (IPv6,
/// or IPv4-mapped) → port.
pub async fn read(nl: &Netlink, bridge: u32) -> anyhow::Result<BTreeMap<[u8; 16], PodPort>> {
    // Only veths whose peer is in another namespace (bpf_redirect_peer
    // drops a packet whose peer is in this one), and with no qdisc of their
    // own: the redirect skips the host veth's transmit, so a pod whose
    // ingress is shaped there (the CNI bandwidth plugin's TBF) or filtered
    // (clsact) keeps the way through cni0.
    let queued = nl.queued_links().await?;
    let ports: HashSet<u32> = nl
        .links()
        .await?
        .into_iter()
        .filter(|l| {
            l.master == Some(bridge) && l.veth && l.peer_elsewhere && !queued.contains(&l.index)
        })
        .map(|l| l.index)
        .collect();
    let learned = nl.learned_macs().await?;
    let mut neighbours: Vec<(IpAddr, Mac)> = nl
        .neighbours(bridge)
        .await?
        .iter()
        .filter_map(|n| Some((IpAddr::V4(n.ip), n.mac?)))
        .collect();
    // Link-local neighbours are never an overlay packet's destination.
    neighbours.extend(
        nl.neighbours6(bridge)
            .await?
            .iter()
            .filter(|n| !n.ip.is_unicast_link_local())
            .filter_map(|n| Some((IpAddr::V6(n.ip), n.mac?))),
    );
    Ok(join(&ports, &learned, &neighbours))
}

fn key(ip: &IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => pod_port_key(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Pod IP → port for every neighbour whose MAC was learned on exactly one
/// of `ports` (a MAC seen on two ports is ambiguous: no entry).
fn join(
    ports: &HashSet<u32>,
    learned: &[(Mac, u32)],
    neighbours: &[(IpAddr, Mac)],
) -> BTreeMap<[u8; 16], PodPort> {
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
                key(ip),
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
    use std::net::Ipv4Addr;

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
        let v4 = |last| IpAddr::V4(Ipv4Addr::new(10, 244, 1, last));
        let pod6: IpAddr = "fd00:10:244:1::10".parse().unwrap();
        let neighbours = [
            (v4(10), mac(10)),
            (pod6, mac(10)),
            (v4(11), mac(11)),
            (v4(12), mac(12)),
            (v4(13), mac(13)),
            // No learned MAC: no entry.
            (v4(14), mac(14)),
        ];
        let got = join(&ports, &learned, &neighbours);
        let mut want = vec![(key(&v4(10)), 7), (key(&pod6), 7), (key(&v4(11)), 8)];
        want.sort();
        assert_eq!(
            got.iter().map(|(k, v)| (*k, v.ifindex)).collect::<Vec<_>>(),
            want
        );
        assert_eq!(got[&key(&v4(10))].mac, mac(10).0);
        assert_eq!(key(&v4(10))[10..], [0xff, 0xff, 10, 244, 1, 10]);
    }
}
