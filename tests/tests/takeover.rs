//! Swapping in for stock Flannel: `--datapath kernel` programs flannel.1 as
//! flanneld does; on a node where stock Flannel runs, `flannel-agent run`
//! takes over and `flannel-agent uninstall` hands back, each during a 10 ms
//! ping and a TCP stream that must lose nothing.
use std::time::Duration;

use flannel_tests::{
    agent_path,
    lab::{Kind, Lab, Topology},
    prereq,
    traffic::{BackgroundPing, BackgroundTcp, ping, tcp_retransmits, wait_reachable},
    wait_for,
};

fn kernel_fdb(lab: &Lab, i: usize) -> String {
    lab.nodes[i].ns.sh("bridge fdb show dev flannel.1").unwrap()
}

/// A TCP stream from node 1's pod to node 2's: 16 KiB every 10 ms for 3 s.
fn stream(lab: &Lab, port: u16) -> BackgroundTcp {
    let dst = lab.nodes[1].pod_ip();
    BackgroundTcp::start(
        &lab.nodes[0].pod,
        &lab.nodes[1].pod,
        dst,
        port,
        (300, 16 * 1024, 10),
    )
    .unwrap()
}

/// Retransmitted TCP segments in both pods.
fn retrans(lab: &Lab) -> u64 {
    (0..2)
        .map(|i| tcp_retransmits(&lab.nodes[i].pod).unwrap())
        .sum()
}

#[test]
fn kernel_datapath_programs_flannels_tables() {
    if !prereq::ready("kernel_datapath") {
        return;
    }
    let mut lab = Lab::new("kdp", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.nodes[0].agent_args = ["--datapath", "kernel", "--healthz-port", "10244"]
        .map(String::from)
        .to_vec();
    lab.start_agent(0).unwrap();
    // Health: alive, and ready now that subnet.env is written.
    let ns = &lab.nodes[0].ns;
    assert!(
        ns.http_get(10244, "/healthz")
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        ns.http_get(10244, "/readyz")
            .unwrap()
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        ns.http_get(10244, "/other")
            .unwrap()
            .starts_with("HTTP/1.1 404")
    );
    lab.program_stock_peers().unwrap();
    // One neighbour, one FDB entry, one route per remote node; no BPF at all.
    wait_for("the kernel FDB entry", Duration::from_secs(5), || {
        kernel_fdb(&lab, 0)
            .contains("02:42:8f:11:22:20 dst 10.1.5.12 self permanent")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", kernel_fdb(&lab, 0), lab.logs()));
    let n = &lab.nodes[0];
    assert!(
        n.ns.sh("ip neigh show dev flannel.1")
            .unwrap()
            .contains("10.244.2.0 lladdr 02:42:8f:11:22:20 PERMANENT")
    );
    assert!(
        n.ns.sh("ip route show dev flannel.1")
            .unwrap()
            .contains("10.244.2.0/24 via 10.244.2.0 onlink")
    );
    assert!(!n.pin_root.exists(), "the kernel data path pins nothing");
    assert!(
        n.ns.sh("ip link show flannel.1")
            .unwrap()
            .contains("flannel.1")
    );
    assert!(
        !n.ns.sh("ip -d link show eth0").unwrap().contains("xdp"),
        "no XDP program on the underlay"
    );
    wait_reachable(&n.pod, lab.nodes[1].pod_ip(), Duration::from_secs(10)).unwrap();
    assert_eq!(
        ping(&lab.nodes[1].pod, n.pod_ip(), 5, 0.05).unwrap(),
        (5, 5)
    );

    // The lease goes: all three entries go.
    std::fs::remove_file(lab.lease_dir().join("subnets/10.244.2.0-24")).unwrap();
    wait_for("the kernel entries to go", Duration::from_secs(2), || {
        (!kernel_fdb(&lab, 0).contains("02:42:8f:11:22:20")).then_some(())
    })
    .unwrap();
    assert!(
        !n.ns
            .sh("ip route show dev flannel.1")
            .unwrap()
            .contains("10.244.2.0")
    );
    assert!(
        !n.ns
            .sh("ip neigh show dev flannel.1")
            .unwrap()
            .contains("10.244.2.0")
    );
}

#[test]
fn live_takeover_from_stock_flannel_and_back_lose_nothing() {
    if !prereq::ready("takeover") {
        return;
    }
    // Both nodes start as stock Flannel: kernel flannel.1 with its neighbour, FDB and route.
    let mut lab = Lab::new("take", Topology::Switched, &[Kind::Stock, Kind::Stock]).unwrap();
    lab.start_stock(0, 1).unwrap();
    lab.start_stock(1, 2).unwrap();
    lab.program_stock_peers().unwrap();
    let dst = lab.nodes[1].pod_ip();
    wait_reachable(&lab.nodes[0].pod, dst, Duration::from_secs(10)).unwrap();
    assert!(kernel_fdb(&lab, 0).contains("dst 10.1.5.12"));

    // Pings every 10 ms and a TCP stream (16 KiB every 10 ms) across the
    // takeover, then across the hand-back.
    let retrans_before = retrans(&lab);
    let tcp = stream(&lab, 5201);
    let bg = BackgroundPing::start(&lab.nodes[0].pod, dst, 350, 10).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.spawn_agent(0).unwrap();
    wait_for("the agent to take over", Duration::from_secs(10), || {
        lab.nodes[0]
            .log_text()
            .contains("attached flannel_decap")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.nodes[0].log_text()));
    // The adopted flannel.1 kept its MAC; flanneld's FDB entry is gone: the map carries it.
    assert_eq!(
        lab.nodes[0]
            .ns
            .sh("cat /sys/class/net/flannel.1/address")
            .unwrap()
            .trim(),
        "02:42:8f:11:22:10"
    );
    wait_for(
        "flanneld's FDB entry to be removed",
        Duration::from_secs(5),
        || (!kernel_fdb(&lab, 0).contains("dst 10.1.5.12")).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}: {}", kernel_fdb(&lab, 0)));
    // flanneld's per-node route and neighbour gave way to the one Network
    // route: the kernel's tables no longer grow with the cluster.
    let vtep_tables = |lab: &Lab| {
        let n = &lab.nodes[0];
        (
            n.ns.sh("ip -4 route show dev flannel.1").unwrap(),
            n.ns.sh("ip -4 neigh show dev flannel.1").unwrap(),
        )
    };
    wait_for(
        "one kernel route on flannel.1",
        Duration::from_secs(5),
        || {
            let (r, n) = vtep_tables(&lab);
            (r.trim() == "10.244.0.0/16 via 10.244.0.0 onlink"
                && n.trim() == "10.244.0.0 lladdr 02:42:8f:11:22:10 PERMANENT")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", vtep_tables(&lab)));
    std::thread::sleep(Duration::from_millis(1500));
    let carried = lab.counter(0, "tx_encap");
    assert!(carried > 50, "our programs carried only {carried} packets");
    let (sent, received) = bg.finish().unwrap();
    assert_eq!(sent, 350);
    // The decap program attaches only once the FDB map holds every peer, so
    // no reply is dropped as coming from a non-member.
    let dropped = lab.counter(0, "rx_drop_non_member");
    assert_eq!(
        received,
        sent,
        "lost {} replies across the takeover ({dropped} frames dropped as non-member)",
        sent - received
    );
    assert_eq!(tcp.finish().unwrap(), 300 * 16 * 1024);
    assert_eq!(
        retrans(&lab) - retrans_before,
        0,
        "TCP retransmitted segments across the takeover"
    );
    let retrans_before = retrans(&lab);
    let tcp = stream(&lab, 5202);
    let bg = BackgroundPing::start(&lab.nodes[0].pod, dst, 300, 10).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // Hand back: the agent stops, uninstall writes the kernel FDB, then detaches.
    lab.nodes[0].stop_agent().unwrap();
    let root = lab.nodes[0].pin_root.clone();
    let out = lab.nodes[0]
        .ns
        .nsenter(&format!(
            "{} uninstall --pin-root {}",
            agent_path().display(),
            root.display()
        ))
        .unwrap();
    let _ = out;
    let (sent, received) = bg.finish().unwrap();
    assert_eq!(sent, 300);
    assert_eq!(
        received,
        sent,
        "lost {} replies across the hand-back",
        sent - received
    );
    assert_eq!(tcp.finish().unwrap(), 300 * 16 * 1024);
    assert_eq!(
        retrans(&lab) - retrans_before,
        0,
        "TCP retransmitted segments across the hand-back"
    );

    // Nothing of ours is left; the kernel data path has its FDB entry back.
    assert!(!root.exists(), "pins left under {}", root.display());
    assert!(kernel_fdb(&lab, 0).contains("02:42:8f:11:22:20 dst 10.1.5.12 self permanent"));
    // flanneld's per-node route and neighbour are back, the Network route gone.
    let (routes, neigh) = vtep_tables(&lab);
    assert_eq!(
        routes.trim(),
        "10.244.2.0/24 via 10.244.2.0 onlink",
        "{routes}"
    );
    assert_eq!(
        neigh.trim(),
        "10.244.2.0 lladdr 02:42:8f:11:22:20 PERMANENT",
        "{neigh}"
    );
    assert!(
        !lab.nodes[0]
            .ns
            .sh("ip -d link show eth0")
            .unwrap()
            .contains("xdp")
    );
    assert_eq!(ping(&lab.nodes[0].pod, dst, 5, 0.05).unwrap(), (5, 5));
}

/// `flannel-agent run` on node `i` with its own pin root and object; it must
/// fail, so it is bounded by `timeout`: (exit ok, stderr).
fn run_refused(lab: &Lab, i: usize, pin_root: &str, object: &str) -> (bool, String) {
    let n = &lab.nodes[i];
    let out = std::process::Command::new("timeout")
        .arg("20")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", n.ns.name))
        .arg(agent_path())
        .args(["run", "--subnet-mgr", "file", "--subnet-dir"])
        .arg(lab.lease_dir())
        .args(["--iface", "eth0", "--pin-root", pin_root])
        .args(["--bpf-object", object, "--decap", "xdp", "--subnet-file"])
        .arg(lab.dir.join(format!("refused-{i}.env")))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes a pin root whatever the test's outcome.
struct RemoveOnDrop(String);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new(agent_path())
            .args(["uninstall", "--pin-root", &self.0])
            .output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn ebpf_datapath_refuses_to_start_where_it_cannot_attach() {
    if !prereq::ready("refuse") {
        return;
    }
    let mut lab = Lab::new("refuse", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.start_stock(1, 2).unwrap();
    let spare_root = format!(
        "/sys/fs/bpf/flannel-test-refuse-spare-{}",
        std::process::id()
    );
    let _cleanup = RemoveOnDrop(spare_root.clone());

    // No object: refused before anything on the node is touched.
    let (ok, err) = run_refused(&lab, 0, &spare_root, "/nonexistent/flannel-ebpf.o");
    assert!(!ok, "started without an eBPF object");
    assert!(
        err.contains("/nonexistent/flannel-ebpf.o") && err.contains("--datapath kernel"),
        "{err}"
    );
    assert!(lab.nodes[0].ns.sh("ip link show flannel.1").is_err());

    // XDP attach impossible: another agent's XDP decap link holds the underlay.
    lab.nodes[0].agent_args = ["--decap", "xdp"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    let (ok, err) = run_refused(
        &lab,
        0,
        &spare_root,
        &flannel_tests::object_path().display().to_string(),
    );
    assert!(!ok, "a second data path attached over the first");
    assert!(
        err.contains("attaching the decap program (XDP) to eth0")
            && err.contains("use --datapath kernel"),
        "{err}"
    );
    // Nothing of the refused run is left: its process is gone, and without
    // pins its encap link (attached before the decap failed) is gone too.
    assert!(
        !std::path::Path::new(&spare_root).exists(),
        "the refused run left {spare_root}"
    );
    // The running data path is unharmed.
    let dst = lab.nodes[1].pod_ip();
    wait_reachable(&lab.nodes[0].pod, dst, Duration::from_secs(10)).unwrap();
    assert_eq!(ping(&lab.nodes[0].pod, dst, 5, 0.05).unwrap(), (5, 5));

    // --datapath kernel over a pinned eBPF data path says who carries the
    // traffic and how to hand it back.
    lab.nodes[0].stop_agent().unwrap();
    lab.nodes[0].agent_args = ["--datapath", "kernel"].map(String::from).to_vec();
    lab.start_agent(0).unwrap();
    let log = lab.nodes[0].log_text();
    assert!(
        log.contains("an eBPF data path is still pinned")
            && log.contains("flannel-agent uninstall --pin-root"),
        "{log}"
    );
}
