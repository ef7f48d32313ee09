//! `--subnet-mgr kube` against a local server speaking the API's Node
//! list/watch shapes: own subnet from podCIDR, peers from annotations,
//! our annotations and NetworkUnavailable=False through nodes/status, the
//! VtepMAC read back, a watch that ends, 410 Gone forcing a re-list.
use std::time::Duration;

use flannel_tests::{
    kube_api::{FakeApi, node},
    lab::{Kind, Lab, NETWORK, NETWORK6, Topology},
    prereq,
    traffic::{ping, wait_reachable},
    wait_for,
};

const SM: &str = "flannel.alpha.coreos.com/kube-subnet-manager";
const BT: &str = "flannel.alpha.coreos.com/backend-type";
const BD: &str = "flannel.alpha.coreos.com/backend-data";
const IP: &str = "flannel.alpha.coreos.com/public-ip";

fn flannel_node(name: &str, cidr: &str, mac: &str, ip: &str) -> serde_json::Value {
    let data = format!(r#"{{"VNI":1,"VtepMAC":"{mac}"}}"#);
    node(
        name,
        cidr,
        &[(SM, "true"), (BT, "vxlan"), (BD, &data), (IP, ip)],
    )
}

#[test]
fn kube_nodes_are_leases_and_we_announce_ourselves() {
    if !prereq::ready("kube_source") {
        return;
    }
    let mut lab = Lab::new(
        "kube",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    let api = FakeApi::start(&lab.nodes[0].ns, 6443).unwrap();
    // Our node, with the VtepMAC an earlier run announced.
    api.put_node(node(
        "n1",
        "10.244.1.0/24",
        &[(BD, r#"{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:01"}"#)],
    ));
    api.put_node(flannel_node(
        "n2",
        "10.244.2.0/24",
        "02:42:8f:11:22:20",
        "10.1.5.12",
    ));
    // Annotations that do not parse: skipped with a log line.
    api.put_node(node(
        "n3",
        "10.244.3.0/24",
        &[
            (SM, "true"),
            (BT, "vxlan"),
            (BD, "{VNI:1"),
            (IP, "10.1.5.13"),
        ],
    ));
    // Not managed by flannel at all: ignored.
    api.put_node(node("other", "10.244.9.0/24", &[]));

    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let netconf = lab.dir.join("net-conf.json");
    std::fs::write(
        &netconf,
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan"}}}}"#),
    )
    .unwrap();
    lab.nodes[0].agent_args = vec![
        "--subnet-mgr".into(),
        "kube".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--node-name".into(),
        "n1".into(),
        "--net-config-path".into(),
        netconf.display().to_string(),
    ];
    lab.start_stock_device(1, 2).unwrap();
    lab.start_stock_device(2, 3).unwrap();
    lab.start_agent(0).unwrap();

    // Own subnet from podCIDR; VtepMAC read back from our annotation.
    assert_eq!(lab.nodes[0].subnet.as_deref(), Some("10.244.1.0/24"));
    assert_eq!(lab.nodes[0].vtep_mac.as_deref(), Some("0a:58:0a:f4:01:01"));
    let n1 = api.node("n1").unwrap();
    let ann = &n1["metadata"]["annotations"];
    assert_eq!(ann[BT], "vxlan");
    assert_eq!(
        ann[BD], r#"{"VNI":1,"VtepMAC":"0a:58:0a:f4:01:01"}"#,
        "exact shape flanneld re-parses"
    );
    assert_eq!(ann[IP], "10.1.5.11");
    assert_eq!(ann[SM], "true");
    let cond = n1["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "NetworkUnavailable")
        .cloned()
        .unwrap_or_else(|| panic!("no NetworkUnavailable condition: {n1}"));
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("FlannelIsUp"))
    );
    assert!(
        api.patches().iter().all(|(n, _)| n == "n1"),
        "patched only our own node"
    );

    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(
        lab.nodes[0].log_text().contains("skipping node n3"),
        "{}",
        lab.logs()
    );
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        ping(&lab.nodes[1].pod, lab.nodes[0].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );

    // n3's annotations get fixed: it appears within a second.
    api.put_node(flannel_node(
        "n3",
        "10.244.3.0/24",
        "02:42:8f:11:22:30",
        "10.1.5.13",
    ));
    wait_for("n3 to appear", Duration::from_secs(1), || {
        (lab.fdb(0).len() == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[2].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap();

    // The watch ends: the agent watches again and keeps following changes.
    let watches = api.watches();
    api.end_watches();
    wait_for("a new watch", Duration::from_secs(10), || {
        (api.watches() > watches).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    api.delete_node("n3");
    wait_for("n3 to go", Duration::from_secs(2), || {
        (lab.fdb(0).len() == 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    // History expires while n2 disappears: the re-watch gets 410 Gone, the
    // agent re-lists and n2's entries go too.
    let lists = api.lists();
    api.expire_history();
    api.delete_node("n2");
    wait_for("a re-list after 410 Gone", Duration::from_secs(10), || {
        (api.lists() > lists).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_for("n2 to go after the re-list", Duration::from_secs(5), || {
        lab.fdb(0).is_empty().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let routes = lab.nodes[0].overlay_routes();
    assert!(routes.trim().is_empty(), "stale routes: {routes}");
}

#[test]
fn kube_host_gw_nodes_announce_and_route_as_flanneld() {
    if !prereq::ready("kube_host_gw") {
        return;
    }
    let mut lab = Lab::new("kubehg", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let api = FakeApi::start(&lab.nodes[0].ns, 6443).unwrap();
    api.put_node(node("n1", "10.244.1.0/24", &[]));
    // A stock flanneld host-gw node: backend-data is "null".
    api.put_node(node(
        "n2",
        "10.244.2.0/24",
        &[
            (SM, "true"),
            (BT, "host-gw"),
            (BD, "null"),
            (IP, "10.1.5.12"),
        ],
    ));
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let netconf = lab.dir.join("net-conf.json");
    std::fs::write(
        &netconf,
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"host-gw"}}}}"#),
    )
    .unwrap();
    lab.nodes[0].agent_args = [
        "--subnet-mgr",
        "kube",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--node-name",
        "n1",
        "--net-config-path",
        &netconf.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    lab.start_plain(1, 2).unwrap();
    lab.nodes[1]
        .ns
        .sh("ip route replace 10.244.1.0/24 via 10.1.5.11 dev eth0")
        .unwrap();
    lab.start_agent(0).unwrap();

    let n1 = api.node("n1").unwrap();
    let ann = &n1["metadata"]["annotations"];
    assert_eq!(ann[BT], "host-gw");
    assert_eq!(ann[BD], "null", "flanneld's empty BackendData");
    assert_eq!(ann[IP], "10.1.5.11");
    let n = &lab.nodes[0];
    wait_for("the host-gw route", Duration::from_secs(5), || {
        n.ns.sh("ip -4 route show")
            .ok()?
            .contains("10.244.2.0/24 via 10.1.5.12 dev eth0")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_reachable(&n.pod, lab.nodes[1].pod_ip(), Duration::from_secs(10)).unwrap();
    assert_eq!(
        ping(&n.pod, lab.nodes[1].pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );
}

/// Restarts (SIGKILL, SIGTERM, an upgrade) on the kube source lose no ping
/// and retransmit no TCP segment: the
/// new agent waits for the node list before it touches the tables.
#[test]
fn kube_restarts_under_traffic_lose_nothing() {
    if !prereq::ready("kube_restart_traffic") {
        return;
    }
    let mut lab = Lab::new("kubers", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let api = FakeApi::start(&lab.nodes[0].ns, 6443).unwrap();
    api.put_node(node("n1", "10.244.1.0/24", &[]));
    api.put_node(flannel_node(
        "n2",
        "10.244.2.0/24",
        "02:42:8f:11:22:20",
        "10.1.5.12",
    ));
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let netconf = lab.dir.join("net-conf.json");
    std::fs::write(
        &netconf,
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan"}}}}"#),
    )
    .unwrap();
    lab.nodes[0].agent_args = [
        "--subnet-mgr",
        "kube",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--node-name",
        "n1",
        "--net-config-path",
        &netconf.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    lab.start_stock_device(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let fdb_before = lab.fdb(0);
    let cost = lab.restarts_under_traffic(0, 1).unwrap();
    flannel_tests::chaos(
        "agent restarts (SIGKILL, SIGTERM, upgrade), kube source",
        cost.pings_sent,
        cost.pings_received,
    );
    assert_eq!(
        (cost.pings_sent, cost.pings_received, cost.retransmits),
        (500, 500, 0),
        "pings lost or TCP segments retransmitted across the restarts\n{}",
        lab.logs()
    );
    assert!(
        lab.nodes[0]
            .log_text()
            .contains("replacing the program in place"),
        "the upgrade did not swap the programs\n{}",
        lab.logs()
    );
    assert!(lab.nodes[0].agent_running(), "{}", lab.logs());
    assert_eq!(lab.fdb(0), fdb_before);
}

/// The API server failing for 30 s under traffic: nothing lost or removed,
/// degraded in /readyz and the metric, and a node added meanwhile (visible
/// once the API answers again) applied after.
#[test]
fn api_server_outage_keeps_the_data_path_and_converges() {
    if !prereq::ready("kube_outage") {
        return;
    }
    let mut lab = Lab::new(
        "kubeout",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    let api = FakeApi::start(&lab.nodes[0].ns, 6443).unwrap();
    api.put_node(node("n1", "10.244.1.0/24", &[]));
    api.put_node(flannel_node(
        "n2",
        "10.244.2.0/24",
        "02:42:8f:11:22:20",
        "10.1.5.12",
    ));
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let netconf = lab.dir.join("net-conf.json");
    std::fs::write(
        &netconf,
        format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan"}}}}"#),
    )
    .unwrap();
    lab.nodes[0].agent_args = [
        "--subnet-mgr",
        "kube",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--node-name",
        "n1",
        "--net-config-path",
        &netconf.display().to_string(),
        "--healthz-port",
        "10244",
        "--metrics-port",
        "9464",
    ]
    .map(String::from)
    .to_vec();
    lab.start_stock_device(1, 2).unwrap();
    lab.start_stock_device(2, 3).unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let http =
        |lab: &Lab, port: u16, path: &str| lab.nodes[0].ns.http_get(port, path).unwrap_or_default();
    let fdb_before = lab.fdb(0);
    let bg = flannel_tests::traffic::BackgroundPing::start(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        700,
        50,
    )
    .unwrap();
    api.unavailable_for(Duration::from_secs(30));
    wait_for("/readyz to say degraded", Duration::from_secs(15), || {
        let r = http(&lab, 10244, "/readyz");
        (r.starts_with("HTTP/1.1 503") && r.contains("lease source degraded")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(http(&lab, 9464, "/metrics").contains("flannel_ebpf_lease_source_up 0"));
    // A node joins during the outage; the agent sees it once the API is back.
    api.put_node(flannel_node(
        "n3",
        "10.244.3.0/24",
        "02:42:8f:11:22:30",
        "10.1.5.13",
    ));
    std::thread::sleep(Duration::from_secs(28));
    assert_eq!(lab.fdb(0), fdb_before, "an entry went during the outage");
    lab.wait_fdb_entries(0, 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_for("/readyz to recover", Duration::from_secs(15), || {
        http(&lab, 10244, "/readyz")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let (sent, received) = bg.finish().unwrap();
    flannel_tests::chaos("API server failing for 30 s", sent, received);
    assert_eq!((sent, received), (700, 700), "{}", lab.logs());
    // An outage in which no node changes: the resumed watch yields nothing,
    // and the agent must still see that the API server is back.
    api.unavailable_for(Duration::from_secs(8));
    wait_for(
        "/readyz to say degraded again",
        Duration::from_secs(15),
        || {
            http(&lab, 10244, "/readyz")
                .starts_with("HTTP/1.1 503")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_for(
        "/readyz to recover after a quiet outage",
        Duration::from_secs(20),
        || {
            http(&lab, 10244, "/readyz")
                .starts_with("HTTP/1.1 200")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(http(&lab, 9464, "/metrics").contains("flannel_ebpf_lease_source_up 1"));
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[2].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
}

#[test]
fn kube_dual_stack_nodes_as_flanneld_annotates_them() {
    if !prereq::ready("kube_dual_stack") {
        return;
    }
    const BD6: &str = "flannel.alpha.coreos.com/backend-v6-data";
    const IP6: &str = "flannel.alpha.coreos.com/public-ipv6";
    let dual = |mut n: serde_json::Value, v4: &str, v6: &str| {
        n["spec"]["podCIDRs"] = serde_json::json!([v4, v6]);
        n
    };
    let mut lab = Lab::new_dual("kube6", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let api = FakeApi::start(&lab.nodes[0].ns, 6443).unwrap();
    api.put_node(dual(
        node("n1", "10.244.1.0/24", &[]),
        "10.244.1.0/24",
        "fd00:10:244:1::/64",
    ));
    let mut n2 = flannel_node("n2", "10.244.2.0/24", "02:42:8f:11:22:20", "10.1.5.12");
    n2["metadata"]["annotations"][BD6] = r#"{"VNI":1,"VtepMAC":"02:42:8f:66:22:20"}"#.into();
    n2["metadata"]["annotations"][IP6] = "fc00::12".into();
    api.put_node(dual(n2, "10.244.2.0/24", "fd00:10:244:2::/64"));
    // A dual-stack node whose backend-v6-data does not parse: skipped, said why.
    let mut n3 = flannel_node("n3", "10.244.3.0/24", "02:42:8f:11:22:30", "10.1.5.13");
    n3["metadata"]["annotations"][BD6] = "{VNI:1".into();
    n3["metadata"]["annotations"][IP6] = "fc00::13".into();
    api.put_node(dual(n3, "10.244.3.0/24", "fd00:10:244:3::/64"));

    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let netconf = lab.dir.join("net-conf.json");
    std::fs::write(
        &netconf,
        format!(
            r#"{{"Network":"{NETWORK}","EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{{"Type":"vxlan"}}}}"#
        ),
    )
    .unwrap();
    lab.nodes[0].agent_args = vec![
        "--subnet-mgr".into(),
        "kube".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--node-name".into(),
        "n1".into(),
        "--net-config-path".into(),
        netconf.display().to_string(),
    ];
    lab.start_stock_device(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    // Both subnets from podCIDRs; both halves announced as flanneld does.
    assert_eq!(lab.nodes[0].subnet6.as_deref(), Some("fd00:10:244:1::/64"));
    let ann = api.node("n1").unwrap()["metadata"]["annotations"].clone();
    assert_eq!(ann[IP6], "fc00::11");
    assert_eq!(
        ann[BD6],
        format!(
            r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
            lab.nodes[0].vtep_mac6.as_deref().unwrap()
        ),
        "exact shape flanneld re-parses"
    );
    lab.program_stock_peers().unwrap();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    wait_reachable(&a.pod, b.pod_ip6(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert_eq!(ping(&b.pod, a.pod_ip6(), 5, 0.05).unwrap(), (5, 5));
    assert!(
        lab.nodes[0].log_text().contains("skipping node n3"),
        "{}",
        lab.logs()
    );
    let routes = lab.nodes[0]
        .ns
        .sh("ip -6 route show dev flannel-v6.1")
        .unwrap();
    assert!(!routes.contains("fd00:10:244:3::"), "{routes}");
}

#[test]
fn kube_ipv6_only_nodes_as_flanneld_annotates_them() {
    if !prereq::ready("kube_ipv6_only") {
        return;
    }
    const BD6: &str = "flannel.alpha.coreos.com/backend-v6-data";
    const IP6: &str = "flannel.alpha.coreos.com/public-ipv6";
    let mut lab =
        Lab::new_v6_only("kube6o", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let api = FakeApi::start(&lab.nodes[0].ns, 6443).unwrap();
    api.put_node(node("n1", "fd00:10:244:1::/64", &[]));
    // A stock IPv6-only node: no public-ip or backend-data, as flanneld announces it.
    api.put_node(node(
        "n2",
        "fd00:10:244:2::/64",
        &[
            (SM, "true"),
            (BT, "vxlan"),
            (BD6, r#"{"VNI":1,"VtepMAC":"02:42:8f:66:22:20"}"#),
            (IP6, "fc00::12"),
        ],
    ));
    let kubeconfig = lab.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let netconf = lab.dir.join("net-conf.json");
    std::fs::write(
        &netconf,
        format!(
            r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{{"Type":"vxlan"}}}}"#
        ),
    )
    .unwrap();
    lab.nodes[0].agent_args = vec![
        "--subnet-mgr".into(),
        "kube".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--node-name".into(),
        "n1".into(),
        "--net-config-path".into(),
        netconf.display().to_string(),
    ];
    lab.start_stock_device(1, 2).unwrap();
    lab.start_agent(0).unwrap();
    assert_eq!(lab.nodes[0].subnet6.as_deref(), Some("fd00:10:244:1::/64"));
    let ann = api.node("n1").unwrap()["metadata"]["annotations"].clone();
    assert_eq!(ann[IP6], "fc00::11");
    assert_eq!(
        ann[BD6],
        format!(
            r#"{{"VNI":1,"VtepMAC":"{}"}}"#,
            lab.nodes[0].vtep_mac6.as_deref().unwrap()
        )
    );
    assert!(ann.get(IP).is_none() && ann.get(BD).is_none(), "{ann}");
    lab.program_stock_peers().unwrap();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    wait_reachable(&a.pod, b.pod_ip6(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert_eq!(ping(&b.pod, a.pod_ip6(), 5, 0.05).unwrap(), (5, 5));
}
