//! `cargo xtask bench`: flannel-ebpf against the kernel's VXLAN (as stock
//! Flannel configures flannel.1) and against no encapsulation (host-gw), on
//! the same two-node topology, interleaved (A B C A B C …) so the machine's
//! noise falls on all three; then the programs' per-packet cost and the
//! control plane. Writes results/bench.{md,svg,json} (bench-segmenting.* with
//! --segmenting-underlay).
mod control;
mod prog;
mod report;
mod traffic;

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use report::{Metric, svg, table};
use traffic::Datapath;

#[derive(Parser)]
struct Args {
    /// Short runs (one round, 2 s each, fewer repeats): under two minutes.
    #[arg(long)]
    quick: bool,
    /// Where the results go.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Make the underlay behave like a wire: GSO/TSO off on the underlay
    /// ports of every lab, so all data paths see MTU-sized frames there.
    #[arg(long)]
    segmenting_underlay: bool,
    /// The release agent, for the RSS and end-to-end figures.
    #[arg(long)]
    agent: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stem = if args.segmenting_underlay {
        "bench-segmenting"
    } else {
        "bench"
    };
    let started = Instant::now();
    let (rounds, secs, rr_count, prog_n) = if args.quick {
        (1, 2, 3_000, 100_000)
    } else {
        (3, 5, 20_000, 1_000_000)
    };
    let counts: &[usize] = &[10, 100, 1000, 5000];
    let object = std::fs::read(flannel_tests::object_path())
        .context("the kernel object (cargo xtask build-ebpf)")?;

    println!("bench: building three labs (flannel-ebpf, kernel VXLAN, host-gw)");
    let labs: Vec<(Datapath, flannel_tests::lab::Lab)> = Datapath::ALL
        .iter()
        .map(|dp| traffic::lab(*dp, args.segmenting_underlay).map(|l| (*dp, l)))
        .collect::<anyhow::Result<_>>()?;

    let mut tcp1 = Metric::new("TCP, 1 stream", "Gbit/s", true);
    let mut tcp4 = Metric::new("TCP, 4 streams", "Gbit/s", true);
    let mut udp = Metric::new("UDP 64 B delivered", "kpps", true);
    let mut loss = Metric::new("UDP 64 B loss", "%", false);
    let mut p50 = Metric::new("RR latency p50", "µs", false);
    let mut p99 = Metric::new("RR latency p99", "µs", false);
    let mut cpu = Metric::new("kernel CPU per Gbit", "CPU-s/Gbit", false);
    let mut port = 5300u16;
    for round in 0..rounds {
        for (dp, lab) in &labs {
            println!("bench: round {}/{rounds}: {}", round + 1, dp.name());
            port += 1;
            let (g, c) = traffic::tcp(lab, 1, secs, port)?;
            tcp1.push(*dp, g);
            cpu.push(*dp, c);
            port += 1;
            tcp4.push(*dp, traffic::tcp(lab, 4, secs, port)?.0);
            port += 1;
            let (pps, l) = traffic::udp64(lab, secs, port)?;
            udp.push(*dp, pps / 1e3);
            loss.push(*dp, l);
            port += 1;
            let (a, b) = traffic::rr(lab, rr_count, Duration::from_secs(secs as u64 * 2), port)?;
            p50.push(*dp, a);
            p99.push(*dp, b);
        }
    }
    drop(labs);
    let metrics = [tcp1, tcp4, udp, loss, p50, p99, cpu];

    println!("bench: per-packet cost with BPF_PROG_TEST_RUN ({prog_n} runs each)");
    let costs = prog::costs(prog_n)?;
    println!("bench: control plane (N = {counts:?})");
    let cp = control::apply_times(counts, &object)?;
    let (e2e_secs, rss_mib) = control::agent_rss(&args.agent, 5000)?;

    // Report.
    std::fs::create_dir_all(&args.out)?;
    let mut md = String::new();
    let machine = flannel_tests::sh("uname -r; nproc; grep -m1 'model name' /proc/cpuinfo || true")
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "# flannel-ebpf benchmark{}\n",
        if args.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        md,
        "Two nodes in network namespaces on one bridge, a pod behind cni0 on each (MTU 1450); {rounds} interleaved round(s), {secs} s per run; medians (min–max over rounds). Machine: kernel {}.\n",
        machine.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    md.push_str(&table(&metrics));
    let _ = writeln!(
        md,
        "\n![chart]({stem}.svg)\n\n## Per-packet cost (BPF_PROG_TEST_RUN, {prog_n} runs)\n\n| case | ns/packet |\n|---|---|"
    );
    for (case, ns) in &costs {
        let _ = writeln!(md, "| {case} | {ns:.1} |");
    }
    let _ = writeln!(
        md,
        "\n## Control plane\n\n| leases | flannel-ebpf apply (ms) | flanneld-style netlink (ms) | speed-up |\n|---|---|---|---|"
    );
    for (n, ours, fl) in &cp {
        let _ = writeln!(md, "| {n} | {ours:.1} | {fl:.1} | {:.1}× |", fl / ours);
    }
    let _ = writeln!(
        md,
        "\nRelease agent, file source with 5000 leases present at start: all 5000 routes in after {e2e_secs:.2} s (start-up included); peak RSS {rss_mib:.1} MiB.\n"
    );

    let mut verdicts = Vec::new();
    let check = |name: &str, ok: bool, detail: String| {
        format!("- {} {name}: {detail}", if ok { "✅" } else { "❌" })
    };
    let m = &metrics;
    verdicts.push(check(
        "TCP ≥ 1.15× kernel VXLAN",
        m[0].ratio(Datapath::KernelVxlan) >= 1.15,
        format!(
            "{:.2}× (1 stream), {:.2}× (4 streams)",
            m[0].ratio(Datapath::KernelVxlan),
            m[1].ratio(Datapath::KernelVxlan)
        ),
    ));
    verdicts.push(check(
        "TCP ≥ 0.9× no encap",
        m[0].ratio(Datapath::HostGw) >= 0.9,
        format!(
            "{:.2}× (1 stream), {:.2}× (4 streams)",
            m[0].ratio(Datapath::HostGw),
            m[1].ratio(Datapath::HostGw)
        ),
    ));
    verdicts.push(check(
        "64 B packet rate ≥ 1.3× kernel VXLAN",
        m[2].ratio(Datapath::KernelVxlan) >= 1.3,
        format!("{:.2}×", m[2].ratio(Datapath::KernelVxlan)),
    ));
    verdicts.push(check(
        "RR p50 ≤ 0.9× kernel VXLAN",
        m[4].ratio(Datapath::KernelVxlan) <= 0.9,
        format!("{:.2}×", m[4].ratio(Datapath::KernelVxlan)),
    ));
    let cost = |needle: &str| {
        costs
            .iter()
            .find(|(c, _)| c.contains(needle))
            .map_or(f64::NAN, |c| c.1)
    };
    verdicts.push(check(
        "XDP decap ≤ 50 ns",
        cost("XDP decap") <= 50.0,
        format!("{:.1} ns", cost("XDP decap")),
    ));
    verdicts.push(check(
        "TC encap ≤ 100 ns",
        cost("encap") <= 100.0,
        format!("{:.1} ns", cost("encap")),
    ));
    if let Some((_, ours, fl)) = cp.iter().find(|(n, _, _)| *n == 5000) {
        verdicts.push(check(
            "5000 leases ≤ 200 ms",
            *ours <= 200.0,
            format!("{ours:.1} ms"),
        ));
        verdicts.push(check(
            "≥ 10× flanneld-style netlink",
            fl / ours >= 10.0,
            format!("{:.1}×", fl / ours),
        ));
    }
    verdicts.push(check(
        "RSS ≤ 30 MB",
        rss_mib <= 30.0,
        format!("{rss_mib:.1} MiB"),
    ));
    let _ = writeln!(md, "## Targets\n\n{}\n", verdicts.join("\n"));
    let _ = writeln!(
        md,
        "Reproduce: `sudo cargo xtask bench` (or `--quick`). Took {:.0} s.",
        started.elapsed().as_secs_f64()
    );

    std::fs::write(args.out.join(format!("{stem}.md")), &md)?;
    std::fs::write(
        args.out.join(format!("{stem}.svg")),
        svg(
            &metrics[..3]
                .iter()
                .chain(metrics[4..5].iter())
                .map(|m| Metric {
                    name: m.name,
                    unit: m.unit,
                    higher_is_better: m.higher_is_better,
                    per_dp: m.per_dp.clone(),
                })
                .collect::<Vec<_>>(),
            "flannel-ebpf vs kernel VXLAN vs no encap",
        ),
    )?;
    let json = serde_json::json!({
        "quick": args.quick,
        "metrics": metrics.iter().map(|m| serde_json::json!({
            "name": m.name, "unit": m.unit,
            "samples": Datapath::ALL.iter().map(|d| (d.name(), m.per_dp[Datapath::ALL.iter().position(|x| x == d).unwrap_or(0)].0.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        })).collect::<Vec<_>>(),
        "prog_ns": costs.iter().map(|(c, v)| (c.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
        "control_plane_ms": cp.iter().map(|(n, a, b)| serde_json::json!({"leases": n, "ebpf": a, "flanneld_style": b})).collect::<Vec<_>>(),
        "agent_5000": {"seconds_to_all_routes": e2e_secs, "peak_rss_mib": rss_mib},
    });
    std::fs::write(
        args.out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json)?,
    )?;

    println!("\n{md}");
    println!("ratios to kernel VXLAN / to no encap:");
    for m in &metrics {
        println!(
            "  {:<22} {:>6.2}×  {:>6.2}×",
            m.name,
            m.ratio(Datapath::KernelVxlan),
            m.ratio(Datapath::HostGw)
        );
    }
    println!("results in {}", args.out.display());
    Ok(())
}
