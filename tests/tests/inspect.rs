//! Operating a node: `flannel-agent show` views and the metrics endpoint,
//! against a lab with two known stock-Flannel peers and a known amount of
//! traffic, read by the release agent that ships (a release-only misread of
//! the ARP map once printed zero VtepMACs here).
use std::time::Duration;

use flannel_tests::{
    agent_path,
    lab::{Kind, Lab, Topology},
    prereq, sh,
    traffic::{ping, wait_reachable},
};
use serde_json::Value;

fn peers(lab: &Lab) -> Value {
    serde_json::from_str(&lab.nodes[0].show("peers --json").unwrap()).unwrap()
}

fn stat(lab: &Lab, name: &str) -> u64 {
    let v: Value = serde_json::from_str(&lab.nodes[0].show("stats --json").unwrap()).unwrap();
    v[name]["packets"].as_u64().unwrap()
}

fn scrape(lab: &Lab, port: u16) -> String {
    lab.nodes[0].ns.http_get(port, "/metrics").unwrap()
}

#[test]
fn show_views_and_metrics_match_known_leases_and_traffic() {
    if !prereq::ready("inspect") {
        return;
    }
    let mut lab = Lab::new(
        "insp",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.start_stock(2, 3).unwrap();
    lab.nodes[0].agent_args = ["--metrics-port", "9464", "--log-level", "debug"]
        .map(String::from)
        .to_vec();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 2).unwrap();
    let n = &lab.nodes[0];

    // The pinned maps and links are root's alone.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&n.pin_root), 0o700, "pin root");
        for e in std::fs::read_dir(&n.pin_root).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }

    // The three tables, in iproute2's shapes.
    assert_eq!(
        n.show("routes").unwrap(),
        "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink\n\
         10.244.3.0/24 via 10.244.3.0 dev flannel.1 onlink\n"
    );
    assert_eq!(
        n.show("arp").unwrap(),
        "10.244.2.0 dev flannel.1 lladdr 02:42:8f:11:22:20 PERMANENT\n\
         10.244.3.0 dev flannel.1 lladdr 02:42:8f:11:22:30 PERMANENT\n"
    );
    assert_eq!(
        n.show("fdb").unwrap(),
        "02:42:8f:11:22:20 dev flannel.1 dst 10.1.5.12 self permanent\n\
         02:42:8f:11:22:30 dev flannel.1 dst 10.1.5.13 self permanent\n"
    );
    let routes: Value = serde_json::from_str(&n.show("routes --json").unwrap()).unwrap();
    assert_eq!(routes[0]["dst"], "10.244.2.0/24");
    assert_eq!(routes[0]["gateway"], "10.244.2.0");

    wait_reachable(&n.pod, lab.nodes[1].pod_ip(), Duration::from_secs(10)).unwrap();
    let p0 = peers(&lab);
    let (tx0, rx0) = (stat(&lab, "tx_encap"), stat(&lab, "rx_decap"));
    // Exactly 10 requests out and 10 replies in.
    assert_eq!(
        ping(&n.pod, lab.nodes[1].pod_ip(), 10, 0.05).unwrap(),
        (10, 10)
    );
    let p1 = peers(&lab);
    assert_eq!(p1.as_array().unwrap().len(), 2, "{p1:#}");
    let by_ip = |v: &Value, ip: &str| -> Value {
        v.as_array()
            .unwrap()
            .iter()
            .find(|p| p["public_ip"] == ip)
            .cloned()
            .unwrap_or_else(|| panic!("no peer {ip} in {v:#}"))
    };
    let peer = by_ip(&p1, "10.1.5.12");
    assert_eq!(peer["vtep_mac"], "02:42:8f:11:22:20");
    assert_eq!(peer["subnets"][0], "10.244.2.0/24");
    assert_eq!(peer["vtep_addrs"][0], "10.244.2.0");
    let other = by_ip(&p1, "10.1.5.13");
    assert_eq!(other["vtep_mac"], "02:42:8f:11:22:30");
    assert_eq!(other["subnets"][0], "10.244.3.0/24");
    assert_eq!(other["vtep_addrs"][0], "10.244.3.0");
    let before = by_ip(&p0, "10.1.5.12");
    let d = |k: &str| peer[k].as_u64().unwrap() - before[k].as_u64().unwrap();
    assert_eq!((d("tx_packets"), d("rx_packets")), (10, 10));
    // ICMP echo of 84 bytes in a 98-byte frame each way.
    assert_eq!((d("tx_bytes"), d("rx_bytes")), (980, 980));
    assert!(peer["last_seen_seconds_ago"].as_f64().unwrap() < 5.0);
    assert_eq!(
        (stat(&lab, "tx_encap") - tx0, stat(&lab, "rx_decap") - rx0),
        (10, 10)
    );

    // The text views carry the same numbers.
    let text = n.show("peers").unwrap();
    assert!(text.starts_with("SUBNET"), "{text}");
    for (subnet, vtep, mac, ip) in [
        (
            "10.244.2.0/24",
            "10.244.2.0",
            "02:42:8f:11:22:20",
            "10.1.5.12",
        ),
        (
            "10.244.3.0/24",
            "10.244.3.0",
            "02:42:8f:11:22:30",
            "10.1.5.13",
        ),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(ip))
            .unwrap_or_else(|| panic!("no line for {ip}:\n{text}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[..4], [subnet, vtep, mac, ip], "{text}");
    }
    let stats = n.show("stats").unwrap();
    for (guard, _) in flannel_agent::node::guard::COUNTERS {
        assert!(
            stats.contains(&format!("guard_{guard}")),
            "stats misses the guard's {guard}:\n{stats}"
        );
    }
    for c in flannel_ebpf_common::Counter::ALL {
        assert!(
            stats.contains(c.name()),
            "stats misses {}:\n{stats}",
            c.name()
        );
    }

    // Metrics: the same counters, per reason and per peer, plus agent metrics.
    let m = scrape(&lab, 9464);
    assert!(m.starts_with("HTTP/1.1 200 OK"), "{m}");
    let tx_now = stat(&lab, "tx_encap");
    assert!(
        m.contains(&format!(
            "flannel_ebpf_datapath_packets_total{{reason=\"tx_encap\"}} {tx_now}"
        )),
        "{m}"
    );
    assert!(
        m.contains("flannel_ebpf_datapath_packets_total{reason=\"rx_drop_non_member\"} 0"),
        "{m}"
    );
    assert!(m.contains("flannel_ebpf_datapath_peer_packets_total{peer=\"10.1.5.12\",vtep_mac=\"02:42:8f:11:22:20\",direction=\"rx\"}"), "{m}");
    assert!(
        m.contains("flannel_ebpf_leases{state=\"applied\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("flannel_ebpf_lease_changes_total{kind=\"added\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("flannel_ebpf_reconcile_duration_seconds_count"),
        "{m}"
    );
    assert!(m.contains("flannel_ebpf_build_info{version="), "{m}");

    // A foreign VXLAN segment (VNI 7) aimed at us: dropped, counted, and
    // explained by the program's debug-level diagnostics in the agent log.
    let stock = &lab.nodes[1].ns;
    stock
        .sh("ip link add vx7 type vxlan id 7 dstport 8472 local 10.1.5.12 dev eth0 nolearning")
        .unwrap();
    stock.sh("ip addr add 192.168.77.2/24 dev vx7").unwrap();
    stock.sh("ip link set vx7 up").unwrap();
    stock
        .sh("bridge fdb append 00:00:00:00:00:00 dev vx7 dst 10.1.5.11")
        .unwrap();
    let before = stat(&lab, "rx_drop_bad_vni");
    let _ = stock.sh("ping -c 2 -i 0.2 -W 1 192.168.77.1");
    assert!(stat(&lab, "rx_drop_bad_vni") >= before + 2);
    flannel_tests::wait_for("the debug diagnostic", Duration::from_secs(5), || {
        lab.nodes[0]
            .log_text()
            .contains("decap: drop, VNI 7 from 10.1.5.12")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    // Nothing pinned: a clear message, not a crash.
    let err = sh(&format!(
        "{} show routes --pin-root /sys/fs/bpf/flannel-nothing-here",
        agent_path().display()
    ))
    .unwrap_err();
    assert!(
        format!("{err}").contains("no flannel-ebpf map pinned"),
        "{err}"
    );
}
