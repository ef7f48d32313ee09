//! Pod-to-pod traffic figures on one lab per data path: TCP throughput
//! (iperf3), 64-byte UDP packet rate, request/response latency (sockperf), and
//! system+softirq CPU per delivered Gbit.
use std::{
    net::IpAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use flannel_tests::{
    lab::{Kind, Lab, Topology},
    netns::Netns,
    traffic::wait_reachable,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Datapath {
    /// flannel-ebpf as it runs by default: the direct path.
    Ebpf,
    /// flannel-ebpf with `--direct-path=false`: the stack path through flannel.1.
    EbpfStack,
    KernelVxlan,
    HostGw,
}

impl Datapath {
    pub const ALL: [Datapath; 4] = [
        Datapath::Ebpf,
        Datapath::EbpfStack,
        Datapath::KernelVxlan,
        Datapath::HostGw,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Datapath::Ebpf => "flannel-ebpf",
            Datapath::EbpfStack => "flannel-ebpf, direct path off",
            Datapath::KernelVxlan => "kernel VXLAN",
            Datapath::HostGw => "no encap (routes)",
        }
    }
}

/// Two nodes on one underlay (one bridge, or each behind a router with
/// `routed`), a pod behind cni0 on each (MTU 1450), wired for one data path.
/// Unencapsulated routing is host-gw's on one bridge and pod-subnet routes
/// on the router when routed.
/// With `ipv6`, dual-stack labs whose pods are measured over IPv6.
pub fn lab(
    dp: Datapath,
    segmenting_underlay: bool,
    routed: bool,
    ipv6: bool,
) -> anyhow::Result<Lab> {
    let (prefix, kind) = match dp {
        Datapath::Ebpf => ("bench-e", Kind::Ebpf),
        Datapath::EbpfStack => ("bench-s", Kind::Ebpf),
        Datapath::KernelVxlan => ("bench-k", Kind::Stock),
        Datapath::HostGw => ("bench-h", Kind::Stock),
    };
    let topology = if routed {
        Topology::Routed
    } else {
        Topology::Switched
    };
    let mut lab = if ipv6 {
        Lab::new_dual(prefix, topology, &[kind, kind])?
    } else {
        Lab::new(prefix, topology, &[kind, kind])?
    };
    match dp {
        Datapath::Ebpf | Datapath::EbpfStack => {
            if dp == Datapath::EbpfStack {
                for n in &mut lab.nodes {
                    n.agent_args = vec!["--direct-path=false".into()];
                }
            }
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
            if routed {
                for n in &lab.nodes {
                    let subnet = n.subnet.as_deref().context("plain node without a subnet")?;
                    lab.fabric
                        .sh(&format!("ip route replace {subnet} via {}", n.public_ip))?;
                    if let (Some(s6), Some(ip6)) = (&n.subnet6, n.public_ipv6) {
                        lab.fabric
                            .sh(&format!("ip -6 route replace {s6} via {ip6}"))?;
                    }
                }
            } else {
                lab.program_hostgw_routes()?;
            }
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
    wait_reachable(&lab.nodes[0].pod, dst(&lab), Duration::from_secs(10)).with_context(|| {
        format!(
            "{} lab: pods cannot reach each other\n{}",
            dp.name(),
            lab.logs()
        )
    })?;
    Ok(lab)
}

/// The measured pod's address: IPv6 in the dual-stack labs.
fn dst(lab: &Lab) -> IpAddr {
    if lab.ipv6 {
        lab.nodes[1].pod_ip6().into()
    } else {
        lab.nodes[1].pod_ip().into()
    }
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
    dst: IpAddr,
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
        dst(lab),
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
        dst(lab),
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

/// Request/response latency with sockperf's ping-pong (UDP, 14-byte
/// messages, full round trips) for `secs`: (p50, p99) in microseconds.
pub fn rr(lab: &Lab, secs: u32, port: u16) -> anyhow::Result<(f64, f64)> {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    let mut srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            &b.pod.name,
            "timeout",
            "120",
            "sockperf",
            "sr",
        ])
        .args(["-i", &b.pod_ip().to_string(), "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting sockperf sr (apt-get install sockperf)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &a.pod.name,
            "timeout",
            "60",
            "sockperf",
            "pp",
        ])
        .args(["-i", &b.pod_ip().to_string(), "-p", &port.to_string()])
        .args(["-t", &secs.to_string(), "--full-rtt"])
        .output()
        .context("running sockperf pp");
    let _ = srv.kill();
    let _ = srv.wait();
    let text = String::from_utf8_lossy(&out?.stdout).into_owned();
    let pct = |p: &str| -> anyhow::Result<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {p} percentile in sockperf's output:\n{text}"))
    };
    Ok((pct("50.000")?, pct("99.000")?))
}

/// The flannel programs' own cost while traffic runs (kernel.bpf_stats):
/// run time and runs per program name, summed over both nodes.
pub struct ProgStats(std::collections::BTreeMap<String, (u64, u64)>);

impl ProgStats {
    pub fn now() -> ProgStats {
        let mut m = std::collections::BTreeMap::new();
        for p in aya::programs::loaded_programs().filter_map(Result::ok) {
            let Some(name) = p.name_as_str().filter(|n| n.starts_with("flannel_")) else {
                continue;
            };
            let e = m.entry(name.to_string()).or_insert((0, 0));
            e.0 += p.run_time().as_nanos() as u64;
            e.1 += p.run_count();
        }
        ProgStats(m)
    }

    /// ns per run of each program between `self` and `later`.
    pub fn ns_per_run(&self, later: &ProgStats) -> Vec<(String, f64, u64)> {
        later
            .0
            .iter()
            .filter_map(|(name, (t, n))| {
                let (t0, n0) = self.0.get(name).copied().unwrap_or((0, 0));
                let runs = n.saturating_sub(n0);
                (runs > 0).then(|| (name.clone(), (t - t0) as f64 / runs as f64, runs))
            })
            .collect()
    }
}
