//! flannel-agent next to stock Flannel nodes (the kernel's own VXLAN device,
//! programmed exactly as flanneld programs flannel.1): the wire is Flannel's.
use std::time::Duration;

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    prereq,
    traffic::{ping, tcp_exchange, wait_reachable},
};

#[test]
fn ebpf_node_talks_to_stock_flannel_nodes() {
    if !prereq::ready("mixed_cluster") {
        return;
    }
    let mut lab = Lab::new(
        "mix",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_stock(2, 3).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 2).unwrap();

    let tx0 = lab.counter(0, "tx_encap");
    let rx0 = lab.counter(0, "rx_decap");
    for peer in [1, 2] {
        let (a, p) = (&lab.nodes[0], &lab.nodes[peer]);
        wait_reachable(&a.pod, p.pod_ip(), Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
        assert_eq!(
            ping(&a.pod, p.pod_ip(), 10, 0.05).unwrap(),
            (10, 10),
            "ebpf → stock {}",
            p.name
        );
        assert_eq!(
            ping(&p.pod, a.pod_ip(), 10, 0.05).unwrap(),
            (10, 10),
            "stock {} → ebpf",
            p.name
        );
    }
    // Our programs carried every one of those packets, both ways.
    assert!(
        lab.counter(0, "tx_encap") - tx0 >= 40,
        "tx_encap moved by {}",
        lab.counter(0, "tx_encap") - tx0
    );
    assert!(
        lab.counter(0, "rx_decap") - rx0 >= 40,
        "rx_decap moved by {}",
        lab.counter(0, "rx_decap") - rx0
    );
    // The stock nodes' kernel decapsulated what we sent (their flannel.1 RX counters moved).
    let rx = lab.nodes[1]
        .ns
        .sh("cat /sys/class/net/flannel.1/statistics/rx_packets")
        .unwrap();
    assert!(rx.trim().parse::<u64>().unwrap() >= 20);
    // Bulk TCP both ways, content checked (GSO super-packets on our side).
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    tcp_exchange(&a.pod, &b.pod, b.pod_ip(), 5101, 4 << 20).unwrap();
    tcp_exchange(&b.pod, &a.pod, a.pod_ip(), 5102, 4 << 20).unwrap();
}
