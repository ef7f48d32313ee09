//! The data path is pinned: killing the agent loses no packet, and a new
//! agent adopts what is pinned and converges.
use std::time::Duration;

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    prereq,
    traffic::{BackgroundPing, wait_reachable},
};

#[test]
fn sigkill_during_a_10ms_ping_loses_nothing() {
    if !prereq::ready("sigkill") {
        return;
    }
    let mut lab = Lab::new("kill", Topology::Switched, &[Kind::Ebpf, Kind::Ebpf]).unwrap();
    lab.start_agent(0).unwrap();
    lab.start_agent(1).unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    lab.wait_fdb_entries(1, 1).unwrap();
    let dst = lab.nodes[1].pod_ip();
    wait_reachable(&lab.nodes[0].pod, dst, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    // 400 pings, one every 10 ms: 4 s of traffic across the kill and the restart.
    let bg = BackgroundPing::start(&lab.nodes[0].pod, dst, 400, 10).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.nodes[0].kill_agent();
    lab.nodes[1].kill_agent();
    std::thread::sleep(Duration::from_millis(800));
    let fdb_before = lab.fdb(0);
    lab.spawn_agent(0).unwrap();
    lab.spawn_agent(1).unwrap();
    let (sent, received) = bg.finish().unwrap();
    assert_eq!(sent, 400);
    assert_eq!(
        received,
        sent,
        "lost {} replies across SIGKILL and restart\n{}",
        sent - received,
        lab.logs()
    );

    // The restarted agents adopted the pinned links and kept the same tables.
    for i in 0..2 {
        assert!(lab.nodes[i].agent_running(), "{}", lab.logs());
    }
    flannel_tests::wait_for(
        "the restarted agent to report",
        Duration::from_secs(10),
        || {
            lab.nodes[0]
                .log_text()
                .contains("adopted from the pin")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_eq!(lab.fdb(0), fdb_before);
    let log = lab.nodes[0].log_text();
    assert!(log.contains("reusing lease"), "{log}");
}
