//! Pod-to-pod traffic figures on one lab per data path: TCP throughput
//! (iperf3), 64-byte UDP packet rate, TCP request/response latency, and
//! system+softirq CPU per delivered Gbit.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use flannel_tests::{
    lab::{Kind, Lab, Topology},
    netns::Netns,
    traffic::wait_reachable,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Datapath {
    Ebpf,
    KernelVxlan,
    HostGw,
}

impl Datapath {
    pub const ALL: [Datapath; 3] = [Datapath::Ebpf, Datapath::KernelVxlan, Datapath::HostGw];

    pub fn name(self) -> &'static str {
        match self {
            Datapath::Ebpf => "flannel-ebpf",
            Datapath::KernelVxlan => "kernel VXLAN",
            Datapath::HostGw => "no encap (host-gw)",
        }
    }
}

/// Two nodes on one underlay, a pod behind cni0 on each (MTU 1450), wired
/// for one data path.
pub fn lab(dp: Datapath, segmenting_underlay: bool) -> anyhow::Result<Lab> {
    let (prefix, kind) = match dp {
        Datapath::Ebpf => ("bench-e", Kind::Ebpf),
        Datapath::KernelVxlan => ("bench-k", Kind::Stock),
        Datapath::HostGw => ("bench-h", Kind::Stock),
    };
    let mut lab = Lab::new(prefix, Topology::Switched, &[kind, kind])?;
    match dp {
        Datapath::Ebpf => {
            lab.start_agent(0)?;
            lab.start_agent(1)?;
            lab.wait_fdb_entries(0, 1)?;
            lab.wait_fdb_entries(1, 1)?;
        }
        Datapath::KernelVxlan => {
            lab.start_stock(0, 1)?;
            lab.start_stock(1, 2)?;
            lab.program_stock_peers()?;
        }
        Datapath::HostGw => {
            lab.start_plain(0, 1)?;
            lab.start_plain(1, 2)?;
            lab.program_hostgw_routes()?;
        }
    }
    if segmenting_underlay {
        // A wire carries MTU-sized frames: no GSO/TSO on the underlay, for
        // every data path alike (veth would otherwise pass 64 KB super-packets).
        for (i, n) in lab.nodes.iter().enumerate() {
            n.ns.sh("ethtool -K eth0 tso off gso off tx-udp_tnl-segmentation off gro on 2>/dev/null || true")?;
            lab.fabric.sh(&format!(
                "ethtool -K p{} tso off gso off tx-udp_tnl-segmentation off 2>/dev/null || true",
                i + 1
            ))?;
        }
    }
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .with_context(|| {
        format!(
            "{} lab: pods cannot reach each other\n{}",
            dp.name(),
            lab.logs()
        )
    })?;
    Ok(lab)
}

/// system + irq + softirq CPU seconds so far (all CPUs; only the lab runs).
fn kernel_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // user nice system idle iowait irq softirq
    (f.get(2).unwrap_or(&0.0) + f.get(5).unwrap_or(&0.0) + f.get(6).unwrap_or(&0.0)) / hz
}

fn iperf_server(pod: &Netns, port: u16) -> anyhow::Result<std::process::Child> {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &pod.name,
            "iperf3",
            "-s",
            "-1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (apt-get install iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(child)
}

fn iperf_client(
    pod: &Netns,
    dst: Ipv4Addr,
    port: u16,
    args: &[&str],
) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("ip")
        .args([
            "netns", "exec", &pod.name, "timeout", "60", "iperf3", "-J", "-c",
        ])
        .arg(dst.to_string())
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .context("running iperf3 -c")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// TCP throughput (Gbit/s) with `streams` streams, and kernel CPU-seconds per Gbit.
pub fn tcp(lab: &Lab, streams: u32, secs: u32, port: u16) -> anyhow::Result<(f64, f64)> {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let mut srv = iperf_server(&b.pod, port)?;
    let cpu0 = kernel_cpu_seconds();
    let v = iperf_client(
        &a.pod,
        b.pod_ip(),
        port,
        &["-t", &secs.to_string(), "-P", &streams.to_string()],
    );
    let cpu = kernel_cpu_seconds() - cpu0;
    let _ = srv.wait();
    let v = v?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no sum_received")?;
    let gbits = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0) * 8.0 / 1e9;
    Ok((bps / 1e9, if gbits > 0.0 { cpu / gbits } else { f64::NAN }))
}

/// 64-byte UDP: delivered packets per second and loss percentage.
pub fn udp64(lab: &Lab, secs: u32, port: u16) -> anyhow::Result<(f64, f64)> {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let mut srv = iperf_server(&b.pod, port)?;
    let v = iperf_client(
        &a.pod,
        b.pod_ip(),
        port,
        &["-u", "-l", "64", "-b", "0", "-t", &secs.to_string()],
    );
    let _ = srv.wait();
    let v = v?;
    let sum = &v["end"]["sum"];
    let packets = sum["packets"].as_f64().context("no packets")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let seconds = sum["seconds"].as_f64().unwrap_or(secs as f64).max(0.001);
    let loss = if packets > 0.0 {
        100.0 * lost / packets
    } else {
        100.0
    };
    Ok(((packets - lost).max(0.0) / seconds, loss))
}

/// TCP request/response: one byte each way, `count` times or `max` time,
/// whichever comes first. Returns (p50, p99) in microseconds.
pub fn rr(lab: &Lab, count: usize, max: Duration, port: u16) -> anyhow::Result<(f64, f64)> {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let dst = SocketAddr::from((b.pod_ip(), port));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> anyhow::Result<(f64, f64)> {
        let server = s.spawn(|| {
            b.pod.run(|| -> anyhow::Result<()> {
                let l = TcpListener::bind(("0.0.0.0", port))?;
                let _ = tx.send(());
                let (mut c, _) = l.accept()?;
                c.set_nodelay(true)?;
                c.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut buf = [0u8; 1];
                while c.read_exact(&mut buf).is_ok() {
                    c.write_all(&buf)?;
                }
                Ok(())
            })
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("rr server did not start")?;
        let samples = a.pod.run(|| -> anyhow::Result<Vec<f64>> {
            let mut c = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut out = Vec::with_capacity(count);
            let mut buf = [7u8; 1];
            let end = Instant::now() + max;
            while out.len() < count && Instant::now() < end {
                let t = Instant::now();
                c.write_all(&buf)?;
                c.read_exact(&mut buf)?;
                out.push(t.elapsed().as_secs_f64() * 1e6);
            }
            Ok(out)
        })??;
        let _ = server.join();
        let mut s = samples;
        if s.is_empty() {
            bail!("no request/response completed");
        }
        s.sort_by(|x, y| x.total_cmp(y));
        let pct = |p: f64| s[((s.len() as f64 - 1.0) * p).round() as usize];
        Ok((pct(0.50), pct(0.99)))
    })
}
