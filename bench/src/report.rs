//! Results: medians with spread, a markdown table, an SVG chart, ratios.
use std::fmt::Write as _;

use crate::traffic::Datapath;

/// Samples of one metric for one data path.
#[derive(Default, Clone, Debug)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    pub fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.0.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let m = v.len() / 2;
        if v.len() % 2 == 1 {
            v[m]
        } else {
            (v[m - 1] + v[m]) / 2.0
        }
    }

    pub fn spread(&self) -> (f64, f64) {
        let v: Vec<f64> = self.0.iter().copied().filter(|x| x.is_finite()).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    }
}

/// (median, min, max) of samples.
pub fn median_spread(v: &[f64]) -> (f64, f64, f64) {
    let s = Samples(v.to_vec());
    let (lo, hi) = s.spread();
    (s.median(), lo, hi)
}

pub struct Metric {
    pub name: &'static str,
    pub unit: &'static str,
    /// Larger is better (throughput) or smaller (latency, CPU).
    pub higher_is_better: bool,
    pub per_dp: [Samples; 4],
}

fn idx(dp: Datapath) -> usize {
    Datapath::ALL.iter().position(|d| *d == dp).unwrap_or(0)
}

impl Metric {
    pub fn new(name: &'static str, unit: &'static str, higher_is_better: bool) -> Metric {
        Metric {
            name,
            unit,
            higher_is_better,
            per_dp: Default::default(),
        }
    }

    pub fn push(&mut self, dp: Datapath, v: f64) {
        self.per_dp[idx(dp)].0.push(v);
    }

    pub fn median(&self, dp: Datapath) -> f64 {
        self.per_dp[idx(dp)].median()
    }

    /// flannel-ebpf against `other`, as "how many times better" for throughput
    /// and as the plain ratio (ours / theirs) for latency and CPU.
    pub fn ratio(&self, other: Datapath) -> f64 {
        self.median(Datapath::Ebpf) / self.median(other)
    }
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

pub fn table(metrics: &[Metric]) -> String {
    let mut s = String::new();
    let names: Vec<&str> = Datapath::ALL.iter().map(|d| d.name()).collect();
    let _ = writeln!(
        s,
        "| metric | {} | ebpf / kernel VXLAN | ebpf / no encap | ebpf / direct path off |",
        names.join(" | ")
    );
    let _ = writeln!(s, "|---|{}---|---|---|", "---|".repeat(names.len()));
    for m in metrics {
        let cell = |dp: Datapath| {
            let sm = &m.per_dp[idx(dp)];
            let (lo, hi) = sm.spread();
            if sm.0.len() > 1 {
                format!("{} ({}–{})", fmt(sm.median()), fmt(lo), fmt(hi))
            } else {
                fmt(sm.median())
            }
        };
        let cells: Vec<String> = Datapath::ALL.iter().map(|d| cell(*d)).collect();
        let _ = writeln!(
            s,
            "| {} [{}] | {} | {:.2}× | {:.2}× | {:.2}× |",
            m.name,
            m.unit,
            cells.join(" | "),
            m.ratio(Datapath::KernelVxlan),
            m.ratio(Datapath::HostGw),
            m.ratio(Datapath::EbpfStack)
        );
    }
    s
}

/// Grouped bars, each metric normalised to kernel VXLAN = 1 (latency and CPU
/// inverted so that taller is better everywhere).
pub fn svg(metrics: &[Metric], title: &str) -> String {
    let (w, h, top, bottom, left) = (820.0, 420.0, 50.0, 80.0, 60.0);
    let plot_h = h - top - bottom;
    let groups = metrics.len().max(1) as f64;
    let gw = (w - left - 20.0) / groups;
    let colors = ["#2b8a3e", "#8ce99a", "#1c7ed6", "#868e96"];
    let score = |m: &Metric, dp: Datapath| {
        let r = m.median(dp) / m.median(Datapath::KernelVxlan);
        if m.higher_is_better { r } else { 1.0 / r }
    };
    let max = metrics
        .iter()
        .flat_map(|m| Datapath::ALL.iter().map(move |d| score(m, *d)))
        .filter(|x| x.is_finite())
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{title}</text>"#,
        w / 2.0
    );
    let y1 = top + plot_h - plot_h / max;
    let _ = write!(
        s,
        r##"<line x1="{left}" x2="{}" y1="{y1}" y2="{y1}" stroke="#999" stroke-dasharray="4"/><text x="{}" y="{}" text-anchor="end">1.0</text>"##,
        w - 20.0,
        left - 4.0,
        y1 + 4.0
    );
    for (gi, m) in metrics.iter().enumerate() {
        let gx = left + gi as f64 * gw;
        let bw = gw / 5.0;
        for (di, dp) in Datapath::ALL.iter().enumerate() {
            let v = score(m, *dp);
            let v = if v.is_finite() { v } else { 0.0 };
            let bh = plot_h * v / max;
            let x = gx + bw * (di as f64 + 0.5);
            let y = top + plot_h - bh;
            let _ = write!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{v:.2}</text>"#,
                bw * 0.9,
                colors[di],
                x + bw * 0.45,
                y - 3.0
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + gw / 2.0,
            top + plot_h + 18.0,
            m.name
        );
    }
    for (di, dp) in Datapath::ALL.iter().enumerate() {
        let x = left + di as f64 * 190.0;
        let y = h - 20.0;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{y}">{}</text>"#,
            y - 10.0,
            colors[di],
            x + 16.0,
            dp.name()
        );
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end" font-size="10">relative to kernel VXLAN = 1 (latency and CPU inverted: taller is better)</text></svg>"#,
        w - 20.0,
        h - 50.0
    );
    s
}
