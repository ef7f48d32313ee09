//! Backend host-gw: routes only. Peers announced as host-gw (ours and stock
//! flanneld's lease shape) get `<subnet> via <PublicIP>` on the underlay, no
//! VXLAN device and no eBPF programs; a peer that is not on-link is named in
//! an error and gets no route; a vxlan lease is ignored with a reason.
use std::{fs, time::Duration};

use flannel_tests::{
    lab::{Kind, Lab, NETWORK, Topology},
    prereq,
    traffic::{ping, wait_reachable},
    wait_for,
};

#[test]
fn host_gw_routes_on_link_peers_and_names_the_others() {
    if !prereq::ready("host_gw") {
        return;
    }
    let mut lab = Lab::new(
        "hgw",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Ebpf, Kind::Stock],
    )
    .unwrap();
    fs::write(
        lab.lease_dir().join("config"),
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"host-gw"}}}}"#),
    )
    .unwrap();
    // Node 3 is stock flanneld with host-gw: its lease exactly as flanneld
    // writes it, its routes as flanneld programs them.
    lab.start_plain(2, 9).unwrap();
    fs::write(
        lab.lease_dir().join("subnets/10.244.9.0-24"),
        r#"{"PublicIP":"10.1.5.13","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#,
    )
    .unwrap();
    // Node 2 ran vxlan before: its flannel.1 is still there.
    lab.nodes[1]
        .ns
        .sh("ip link add flannel.1 type vxlan id 1 dstport 8472 nolearning")
        .unwrap();
    for i in [0, 1] {
        lab.nodes[i].agent_args = ["--resync-interval", "1"].map(String::from).to_vec();
        lab.start_agent(i).unwrap();
    }
    let log = lab.nodes[1].log_text();
    assert!(
        log.contains("flannel.1 or pins under")
            && log.contains("remain from a vxlan run")
            && log.contains("ip link del flannel.1"),
        "{log}"
    );
    assert!(
        !lab.nodes[0].log_text().contains("remain from a vxlan run"),
        "a clean node is not warned"
    );
    for i in [0, 1] {
        let peer = &lab.nodes[i];
        let subnet = peer.subnet.clone().unwrap();
        lab.nodes[2]
            .ns
            .sh(&format!(
                "ip route replace {subnet} via {} dev eth0",
                peer.public_ip
            ))
            .unwrap();
    }

    // Our leases say host-gw in flanneld's shape; subnet.env has the underlay MTU.
    let key = lab.nodes[0].subnet.clone().unwrap().replace('/', "-");
    let ours = fs::read_to_string(lab.lease_dir().join("subnets").join(key)).unwrap();
    assert_eq!(
        ours,
        r#"{"PublicIP":"10.1.5.11","BackendType":"host-gw","BackendData":null}"#
    );
    let env = fs::read_to_string(&lab.nodes[0].subnet_file).unwrap();
    assert!(env.contains("FLANNEL_MTU=1500"), "{env}");

    let n = &lab.nodes[0];
    let n2 = lab.nodes[1].subnet.clone().unwrap();
    wait_for("host-gw routes", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -4 route show").ok()?;
        (r.contains(&format!("{n2} via 10.1.5.12 dev eth0"))
            && r.contains("10.244.9.0/24 via 10.1.5.13 dev eth0"))
        .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", n.ns.sh("ip -4 route").unwrap(), lab.logs()));
    assert!(
        n.ns.sh("ip link show flannel.1").is_err(),
        "host-gw must not create a VXLAN device"
    );
    assert!(!n.pin_root.exists(), "host-gw must not pin eBPF objects");
    for i in [1, 2] {
        wait_reachable(&n.pod, lab.nodes[i].pod_ip(), Duration::from_secs(10)).unwrap();
        assert_eq!(
            ping(&n.pod, lab.nodes[i].pod_ip(), 5, 0.05).unwrap(),
            (5, 5),
            "pod on node 1 to pod on node {}",
            i + 1
        );
    }

    // A vxlan node in a host-gw cluster is ignored, with the reason logged.
    fs::write(
        lab.lease_dir().join("subnets/10.244.20.0-24"),
        r#"{"PublicIP":"10.1.5.20","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:42:8f:11:22:99"}}"#,
    )
    .unwrap();
    // Node 3 is now behind node 2 (a route with a gateway): host-gw cannot
    // reach it, the operator is told which node and why, and its route goes.
    n.ns.sh("ip route add 10.1.5.13/32 via 10.1.5.12 dev eth0")
        .unwrap();
    let log = wait_for("the not-on-link error", Duration::from_secs(5), || {
        let log = n.log_text();
        (log.contains("host-gw cannot reach node 10.1.5.13")
            && log.contains("not on-link on eth0")
            && log.contains("BackendType vxlan differs"))
        .then_some(log)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", lab.logs()));
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("lease 10.244.9.0/24 skipped")),
        "{log}"
    );
    wait_for("node 3's route to go", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -4 route show").ok()?;
        (!r.contains("10.244.9.0/24") && !r.contains("10.244.20.0/24")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", n.ns.sh("ip -4 route").unwrap()));
    assert_eq!(
        ping(&n.pod, lab.nodes[1].pod_ip(), 3, 0.05).unwrap(),
        (3, 3),
        "the on-link peer keeps its route"
    );
    // On-link again: the route comes back at the next pass.
    n.ns.sh("ip route del 10.1.5.13/32").unwrap();
    wait_for("node 3's route to return", Duration::from_secs(5), || {
        let r = n.ns.sh("ip -4 route show").ok()?;
        r.contains("10.244.9.0/24 via 10.1.5.13 dev eth0")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", n.ns.sh("ip -4 route").unwrap()));
}
