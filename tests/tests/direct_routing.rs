//! Backend.DirectRouting: peers whose public IP is on-link get a plain route
//! on the underlay and no VXLAN; when the topology changes so that a peer is
//! no longer on-link, it moves to VXLAN (Flannel never re-evaluates).
use std::time::Duration;

use flannel_tests::{
    lab::{Kind, Lab, NETWORK, Topology},
    prereq,
    traffic::{ping, wait_reachable},
    wait_for,
};

#[test]
fn on_link_peers_are_routed_directly_and_re_evaluated() {
    if !prereq::ready("direct_routing") {
        return;
    }
    let mut lab = Lab::new(
        "drt",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    std::fs::write(
        lab.lease_dir().join("config"),
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan","DirectRouting":true}}}}"#),
    )
    .unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_stock(2, 3).unwrap();
    lab.nodes[0].agent_args = ["--resync-interval", "1"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    // The stock peers route back to us directly too (as flanneld with DirectRouting).
    for i in [1, 2] {
        lab.nodes[i]
            .ns
            .sh("ip route replace 10.244.1.0/24 via 10.1.5.11 dev eth0")
            .unwrap();
    }
    let n = &lab.nodes[0];
    wait_for("direct routes", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -4 route show").ok()?;
        (r.contains("10.244.2.0/24 via 10.1.5.12 dev eth0")
            && r.contains("10.244.3.0/24 via 10.1.5.13 dev eth0"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", n.ns.sh("ip -4 route").unwrap(), lab.logs()));
    // No VXLAN route for on-link peers; the kernel keeps only the Network route.
    assert!(
        n.overlay_routes().trim().is_empty(),
        "{}",
        n.overlay_routes()
    );
    assert!(n.has_one_kernel_route(), "{:?}", n.vtep_kernel_tables());
    assert!(lab.fdb(0).is_empty(), "no VXLAN entries for on-link peers");
    let tx = lab.counter(0, "tx_encap");
    for i in [1, 2] {
        wait_reachable(&n.pod, lab.nodes[i].pod_ip(), Duration::from_secs(10)).unwrap();
        assert_eq!(
            ping(&n.pod, lab.nodes[i].pod_ip(), 5, 0.05).unwrap(),
            (5, 5)
        );
    }
    assert_eq!(
        lab.counter(0, "tx_encap"),
        tx,
        "direct routing must not encapsulate"
    );

    // Node 3 is now reached through node 2 (a more specific route with a
    // gateway): no longer on-link, so it moves to VXLAN at the next pass.
    n.ns.sh("ip route add 10.1.5.13/32 via 10.1.5.12 dev eth0")
        .unwrap();
    wait_for("node 3 to move to VXLAN", Duration::from_secs(5), || {
        let r = n.overlay_routes();
        (r.contains("10.244.3.0/24 via 10.244.3.0") && lab.fdb(0).len() == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", n.ns.sh("ip -4 route").unwrap(), lab.logs()));
    assert!(
        n.ns.sh("ip -4 route show")
            .unwrap()
            .contains("10.244.2.0/24 via 10.1.5.12 dev eth0")
    );
    wait_reachable(&n.pod, lab.nodes[2].pod_ip(), Duration::from_secs(10)).unwrap();
    assert_eq!(
        ping(&n.pod, lab.nodes[2].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );
    assert!(
        lab.counter(0, "tx_encap") >= tx + 5,
        "node 3 now goes through VXLAN"
    );
}
