//! The HTTP endpoints cannot be used to hurt the node: 1000 idle connections
//! and parallel scrapes of a 5000-peer table neither exhaust the agent nor
//! hold up the control loop (a lease change still applies within a second).
use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use flannel_tests::{
    lab::{Kind, Lab, Topology},
    prereq, wait_for,
};

const PEERS: usize = 5000;

fn lease(i: usize) -> (String, String) {
    let (hi, lo) = (i >> 8, i & 0xff);
    (
        format!("10.{hi}.{lo}.0-24"),
        format!(
            r#"{{"PublicIP":"192.168.{hi}.{lo}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"02:42:10:{hi:02x}:{lo:02x}:01"}}}}"#
        ),
    )
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn idle_connections_and_scrapes_do_not_stall_the_control_loop() {
    if !prereq::ready("endpoints") {
        return;
    }
    let mut lab = Lab::new("http", Topology::Switched, &[Kind::Ebpf]).unwrap();
    let dir = lab.lease_dir();
    std::fs::write(
        dir.join("config"),
        r#"{"Network":"10.0.0.0/8","SubnetMin":"10.255.1.0","SubnetMax":"10.255.200.0"}"#,
    )
    .unwrap();
    for i in 1..=PEERS {
        let (k, v) = lease(i);
        std::fs::write(dir.join("subnets").join(k), v).unwrap();
    }
    lab.nodes[0].agent_args = ["--metrics-port", "9464", "--healthz-port", "10244"]
        .map(String::from)
        .to_vec();
    lab.start_agent(0).unwrap();
    wait_for("5000 routes", Duration::from_secs(60), || {
        let n = lab.nodes[0].overlay_routes().lines().count();
        (n >= PEERS).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let pid = lab.nodes[0].agent_pid().unwrap();
    let fds_before = fds(pid);

    // 1000 connections that never send a request.
    let idle: Vec<TcpStream> = lab.nodes[0]
        .ns
        .run(|| {
            (0..1000)
                .filter_map(|_| TcpStream::connect(("127.0.0.1", 9464)).ok())
                .collect()
        })
        .unwrap();
    assert!(idle.len() > 900, "only {} connections", idle.len());
    assert!(
        fds(pid) < fds_before + 150,
        "the agent holds {} fds with 1000 idle connections (had {fds_before})",
        fds(pid)
    );

    // Parallel scrapes for 6 s while a lease is added.
    let stop = Instant::now() + Duration::from_secs(6);
    let scrapes = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    lab.nodes[0]
                        .ns
                        .run(|| {
                            let mut ok = 0;
                            while Instant::now() < stop {
                                let Ok(mut c) = TcpStream::connect(("127.0.0.1", 9464)) else {
                                    std::thread::sleep(Duration::from_millis(50));
                                    continue;
                                };
                                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                                let _ = c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
                                let mut out = String::new();
                                let _ = c.read_to_string(&mut out);
                                ok += usize::from(out.starts_with("HTTP/1.1 200"));
                            }
                            ok
                        })
                        .unwrap()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let (k, v) = lease(PEERS + 1);
        let node = &lab.nodes[0];
        let t = Instant::now();
        std::fs::write(dir.join("subnets").join(&k), v).unwrap();
        wait_for("the new lease's route", Duration::from_secs(5), || {
            node.overlay_routes()
                .contains("10.19.137.0/24 via")
                .then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "lease change took {took:?}");
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .sum::<usize>()
    });
    drop(idle);
    assert!(lab.nodes[0].agent_running(), "{}", lab.logs());
    let health = lab.nodes[0].ns.http_get(10244, "/healthz").unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    // Once the idle ones are gone, scrapes are answered in full.
    let m = lab.nodes[0].ns.http_get(9464, "/metrics").unwrap();
    assert!(m.starts_with("HTTP/1.1 200"), "{}", &m[..m.len().min(200)]);
    assert!(m.contains("peer=\"192.168.19.137\""));
    eprintln!("{scrapes} scrapes answered during the test");
    // Idle connections time out and give their places to scrapes.
    assert!(
        scrapes > 0,
        "no scrape was answered while idle connections were open"
    );
}
