//! The agent's map writes against the real pinned maps: batched writes land
//! exactly as single ones (the route trie has no batch support on some
//! kernels and falls back), and a full map says so by name.
use std::{net::Ipv4Addr, path::Path};

use flannel_agent::{ebpf::datapath, ebpf::tables::Tables, lease::mac::Mac, lease::subnet::Subnet};
use flannel_ebpf_common::{MAX_NODES, NodeConfig};
use flannel_tests::{object_path, prereq};

/// Maps pinned under a pin root of this test's own, removed afterwards.
struct Pins(&'static Path);

impl Pins {
    fn load(root: &'static Path) -> (Pins, Tables) {
        let _ = datapath::uninstall(root);
        let object = std::fs::read(object_path()).expect("the kernel object");
        let cfg = NodeConfig {
            ready: 1,
            ..NodeConfig::default()
        };
        let loaded = datapath::load(root, &object, cfg, log::LevelFilter::Info).unwrap();
        // Nothing is attached: the maps alone are what is tested.
        drop(loaded);
        (Pins(root), Tables::open(root).unwrap())
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = datapath::uninstall(self.0);
    }
}

fn node(i: u32) -> (Mac, Ipv4Addr, Subnet) {
    let b = i.to_be_bytes();
    (
        Mac([0x02, 0x42, b[1], b[2], b[3], 0x01]),
        Ipv4Addr::new(192, 168, b[2], b[3]),
        Subnet::new(Ipv4Addr::new(10, b[2], b[3], 0), 24).unwrap(),
    )
}

#[test]
fn batched_writes_land_like_single_ones_and_a_full_map_says_so() {
    if !prereq::ready("maps_batch") {
        return;
    }
    let (_pins, t) = Pins::load(Path::new("/sys/fs/bpf/flannel-test-maps"));
    let nodes: Vec<_> = (1..=3000).map(node).collect();
    let fdb: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, (m, ip, s))| (*m, Tables::fdb_value(*ip, i as u32, Some(*s))))
        .collect();
    let arp: Vec<_> = nodes.iter().map(|(m, _, s)| (s.vtep_addr(), *m)).collect();
    let routes: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, (m, ip, s))| (*s, Tables::route_value(*s, *m, *ip, i as u32)))
        .collect();
    let slots: Vec<u32> = (0..3000).collect();
    for r in t
        .reset_peers(&slots)
        .into_iter()
        .chain(t.set_fdbs(&fdb))
        .chain(t.set_arps(&arp))
        .chain(t.set_routes(&routes))
    {
        r.unwrap();
    }
    // Read back through the single-element path: every entry, every field.
    assert_eq!(t.fdb_values().unwrap(), fdb.iter().copied().collect());
    assert_eq!(t.arp_entries().unwrap(), arp.iter().copied().collect());
    assert_eq!(t.route_values().unwrap(), routes.iter().copied().collect());
    assert_eq!(t.peer(2999).unwrap().tx_packets, 0);

    // Fill the ARP map to MAX_NODES, then one more: that one is refused by name.
    let more: Vec<_> = (3001..=MAX_NODES)
        .map(|i| (node(i).2.vtep_addr(), node(i).0))
        .collect();
    assert!(t.set_arps(&more).iter().all(|r| r.is_ok()));
    assert_eq!(t.arp_entries().unwrap().len(), MAX_NODES as usize);
    let over = [(Ipv4Addr::new(172, 16, 0, 0), Mac([2, 0, 0, 0, 0, 9]))];
    let r = t.set_arps(&over);
    let e = format!("{:#}", r[0].as_ref().unwrap_err());
    assert!(
        e.contains("the ARP map is full (65536 entries"),
        "not named as full: {e}"
    );
    // A single write says the same.
    let e = format!("{:#}", t.set_arp(over[0].0, over[0].1).unwrap_err());
    assert!(e.contains("ARP map is full"), "{e}");
}
