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
    /// Only the control plane (no traffic): results/control-plane.{md,json}.
    #[arg(long)]
    control_plane: bool,
    /// With --control-plane: the in-process apply times only (no agent cold starts).
    #[arg(long, hide = true)]
    apply_only: bool,
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
    let object = std::fs::read(flannel_tests::object_path())
        .context("the kernel object (cargo xtask build-ebpf)")?;
    if args.control_plane {
        let (md, verdicts, json) = control_plane(&args, &object)?;
        let md = format!(
            "# flannel-ebpf control-plane benchmark{}\n{md}\n## Targets\n\n{}\n\nReproduce: `sudo cargo xtask bench --control-plane`. Took {:.0} s.\n",
            if args.quick { " (--quick)" } else { "" },
            verdicts.join("\n"),
            started.elapsed().as_secs_f64()
        );
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(args.out.join("control-plane.md"), &md)?;
        std::fs::write(
            args.out.join("control-plane.json"),
            serde_json::to_string_pretty(&json)?,
        )?;
        println!("\n{md}");
        return Ok(());
    }

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
    let (cp_md, cp_verdicts, cp_json) = control_plane(&args, &object)?;

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
    md.push_str(&cp_md);

    let mut verdicts = Vec::new();
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
    verdicts.extend(cp_verdicts);
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
        "control_plane": cp_json,
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

fn check(name: &str, ok: bool, detail: String) -> String {
    format!("- {} {name}: {detail}", if ok { "✅" } else { "❌" })
}

/// The control-plane figures: markdown section, target verdicts, JSON.
fn control_plane(
    args: &Args,
    object: &[u8],
) -> anyhow::Result<(String, Vec<String>, serde_json::Value)> {
    let counts: &[usize] = if args.quick {
        &[100, 5000]
    } else {
        &[10, 100, 1000, 5000, 50_000]
    };
    println!("bench: control plane (N = {counts:?})");
    let times = control::apply_times(counts, object)?;
    let mut cold = Vec::new();
    let stores: &[(usize, control::Store)] = if args.apply_only {
        &[]
    } else {
        &[
            (5000, control::Store::File),
            (50_000, control::Store::File),
            (50_000, control::Store::Etcd),
        ]
    };
    for &(n, store) in stores {
        println!("bench: release agent cold start, {n} leases in {store:?}");
        cold.push((n, store, control::cold_start(&args.agent, n, store)?));
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## Control plane\n\nClassify and apply N leases in one pass (release build, in-process), against flanneld-style netlink programming of the same tables (per node a neighbour, an FDB entry and a route, each waited for).\n\n| leases | flannel-ebpf, one kernel route (ms) | flannel-ebpf, --per-node-routes (ms) | flanneld-style netlink (ms) | speed-up (one route) |\n|---|---|---|---|---|"
    );
    for (n, ours, per_node, fl) in &times.rows {
        let _ = writeln!(
            md,
            "| {n} | {ours:.1} | {per_node:.1} | {fl:.1} | {:.0}× |",
            fl / ours
        );
    }
    let change = report::median_spread(&times.change_ms);
    let _ = writeln!(
        md,
        "\nOne lease change (new VtepMAC) with {} leases applied: {:.2} ms median ({:.2}–{:.2} ms over {} changes), classify + observe + plan + apply.\n\nRelease agent cold start (leases present before it starts). \"Applied\" is the agent's own figure for its two passes after the listed snapshot (every map entry, then the kernel side); the programs' attach between them is shown apart (it costs the same whatever the number of leases). RSS a second after, and the start-up's peak:\n\n| leases | source | applied after listing (ms) | attach (ms) | start to applied (s) | RSS (MiB) | peak RSS (MiB) |\n|---|---|---|---|---|---|---|",
        control::CHANGE_BASE,
        change.0,
        change.1,
        change.2,
        times.change_ms.len()
    );
    for (n, store, c) in &cold {
        let _ = writeln!(
            md,
            "| {n} | {store:?} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
            c.applied_ms, c.attach_ms, c.total_secs, c.rss_mib, c.peak_rss_mib
        );
    }
    let mut verdicts = Vec::new();
    if let Some((_, ours, _, fl)) = times.rows.iter().find(|(n, ..)| *n == 5000) {
        verdicts.push(check(
            "5000 leases applied ≤ 50 ms",
            *ours <= 50.0,
            format!("{ours:.1} ms"),
        ));
        verdicts.push(check(
            "≥ 10× flanneld-style netlink",
            fl / ours >= 10.0,
            format!("{:.0}×", fl / ours),
        ));
    }
    verdicts.push(check(
        "one lease change ≤ 5 ms",
        change.0 <= 5.0,
        format!("{:.2} ms median, {:.2} ms worst", change.0, change.2),
    ));
    for (n, store, c) in &cold {
        if *n == 5000 {
            verdicts.push(check(
                "RSS ≤ 30 MB at 5000",
                c.rss_mib <= 30.0,
                format!(
                    "{:.1} MiB (start-up peak {:.1} MiB)",
                    c.rss_mib, c.peak_rss_mib
                ),
            ));
            verdicts.push(check(
                "5000 leases applied by the agent ≤ 50 ms after listing",
                c.applied_ms <= 50.0,
                format!("{:.1} ms", c.applied_ms),
            ));
        } else {
            verdicts.push(check(
                &format!("{n} leases ({store:?}) applied ≤ 1 s, RSS ≤ 100 MB"),
                c.applied_ms <= 1000.0 && c.peak_rss_mib <= 100.0,
                format!(
                    "{:.0} ms, {:.1} MiB (peak {:.1} MiB)",
                    c.applied_ms, c.rss_mib, c.peak_rss_mib
                ),
            ));
        }
    }
    let json = serde_json::json!({
        "apply_ms": times.rows.iter().map(|(n, a, p, b)| serde_json::json!({"leases": n, "one_route": a, "per_node_routes": p, "flanneld_style": b})).collect::<Vec<_>>(),
        "one_change_ms": times.change_ms,
        "cold_start": cold.iter().map(|(n, store, c)| serde_json::json!({"leases": n, "source": format!("{store:?}"), "applied_ms": c.applied_ms, "attach_ms": c.attach_ms, "total_secs": c.total_secs, "rss_mib": c.rss_mib, "peak_rss_mib": c.peak_rss_mib})).collect::<Vec<_>>(),
    });
    Ok((md, verdicts, json))
}
