//! `cargo xtask demo`: seed 000's routed lab in network namespaces — three
//! nodes on three underlay subnets behind a router, flannel-agent on each with
//! the file lease source, pods pinging and a TCP transfer across, the maps
//! dumped with bpftool — then everything torn down. Run by `cargo xtask demo`,
//! which builds the release agent and the kernel object and installs the tools first.
use std::time::Duration;

use anyhow::{Context, bail};
use flannel_tests::{
    lab::{Kind, Lab, Topology},
    sh,
    traffic::{ping, tcp_exchange, wait_reachable},
};

fn step(s: &str) {
    println!("\n==> {s}");
}

fn main() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads BPF programs: run it as root");
    }
    step(
        "building the lab: router + 3 nodes (10.1.5.10, 10.1.8.10, 10.1.9.10), cni0 and a pod on each",
    );
    let mut lab = Lab::new(
        "demo",
        Topology::Routed,
        &[Kind::Ebpf, Kind::Ebpf, Kind::Ebpf],
    )?;
    println!(
        "lease directory (Flannel's etcd layout on disk): {}",
        lab.lease_dir().display()
    );
    lab.nodes[0].agent_args = vec!["--metrics-port".into(), "9464".into()];
    for i in 0..3 {
        step(&format!(
            "starting flannel-agent on node {} (logs in {})",
            i + 1,
            lab.nodes[i].log.display()
        ));
        lab.start_agent(i)?;
        let n = &lab.nodes[i];
        println!(
            "node {} public IP {}: lease {}, VtepMAC {}, pod {}",
            n.name,
            n.public_ip,
            n.subnet.as_deref().unwrap_or("?"),
            n.vtep_mac.as_deref().unwrap_or("?"),
            n.pod_ip()
        );
    }
    for i in 0..3 {
        lab.wait_fdb_entries(i, 2)?;
    }
    step("pod-to-pod ping across the overlay");
    for (i, j) in [(0, 1), (0, 2), (1, 2), (2, 0)] {
        let (a, b) = (&lab.nodes[i], &lab.nodes[j]);
        wait_reachable(&a.pod, b.pod_ip(), Duration::from_secs(10)).with_context(|| lab.logs())?;
        let (sent, got) = ping(&a.pod, b.pod_ip(), 5, 0.1)?;
        println!(
            "{} pod → {} pod ({}): {got}/{sent} replies",
            a.name,
            b.name,
            b.pod_ip()
        );
    }
    step("TCP transfer of 16 MiB each way between node 1's pod and node 3's pod, content checked");
    let (a, c) = (&lab.nodes[0], &lab.nodes[2]);
    let t0 = std::time::Instant::now();
    tcp_exchange(&a.pod, &c.pod, c.pod_ip(), 5201, 16 << 20)?;
    println!("32 MiB moved and verified in {:?}", t0.elapsed());

    let n1 = &lab.nodes[0];
    step(&format!(
        "node {}: the kernel's view (ip route / ip neigh on flannel.1, no FDB entries needed)",
        n1.name
    ));
    print!("{}", n1.ns.sh("ip route show dev flannel.1")?);
    print!("{}", n1.ns.sh("ip neigh show dev flannel.1")?);
    for map in ["route", "arp", "fdb", "config"] {
        let cmd = format!("bpftool map dump pinned {}/{map}", n1.pin_root.display());
        step(&cmd);
        print!("{}", sh(&cmd)?);
    }
    for view in ["routes", "arp", "fdb", "peers", "stats"] {
        step(&format!("flannel-agent show {view}"));
        print!("{}", n1.show(view)?);
    }
    step("curl http://127.0.0.1:9464/metrics on node 1 (non-zero flannel_ebpf samples)");
    let metrics = n1.ns.run(|| -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", 9464))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: demo\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("flannel_ebpf") && !l.ends_with(" 0"))
    {
        println!("{line}");
    }
    step("tearing the lab down");
    drop(lab);
    println!("done: namespaces, pinned maps and links removed");
    Ok(())
}
