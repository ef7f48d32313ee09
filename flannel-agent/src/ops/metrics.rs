//! `--metrics-port`: Prometheus text exposition of the datapath counters (per
//! reason, per peer), lease counts, reconcile durations and errors, build info.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{cmd::show, ebpf::tables::Tables};

type Labels = Vec<(String, String)>;

/// What the control loop records; the datapath's counters are read at scrape time.
pub struct AgentMetrics {
    registry: Registry,
    /// 1 while the lease source is reachable and listed, 0 while degraded.
    pub lease_source_up: Gauge,
    pub reconcile_seconds: Histogram,
    pub reconcile_errors: Counter,
    pub leases: Family<Labels, Gauge>,
    pub lease_changes: Family<Labels, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("flannel_ebpf");
        let reconcile_seconds =
            Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        let reconcile_errors = Counter::default();
        let leases = Family::<Labels, Gauge>::default();
        let lease_changes = Family::<Labels, Counter>::default();
        let lease_source_up = Gauge::default();
        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        registry.register(
            "reconcile_duration_seconds",
            "Time to apply leases to maps and kernel tables",
            reconcile_seconds.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Table updates that failed (retried at the next resync)",
            reconcile_errors.clone(),
        );
        registry.register(
            "leases",
            "Leases seen, by state (applied, skipped; applied_ipv6, skipped_ipv6: their IPv6 halves)",
            leases.clone(),
        );
        registry.register(
            "lease_changes",
            "Lease changes applied, by kind (added, changed, removed)",
            lease_changes.clone(),
        );
        registry.register(
            "lease_source_up",
            "Whether the lease source is reachable (1) or degraded (0; tables kept as they are)",
            lease_source_up.clone(),
        );
        registry.register("build_info", "Build information", build);
        AgentMetrics {
            registry,
            lease_source_up,
            reconcile_seconds,
            reconcile_errors,
            leases,
            lease_changes,
        }
    }
}

/// The exposition text: agent metrics plus the pinned datapath counters.
/// The agent's lock is held only to encode its own metrics, never while the
/// maps are read: a scrape cannot stall the control loop.
pub fn render(agent: &Mutex<AgentMetrics>, pin_root: &std::path::Path) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let m = agent
            .lock()
            .map_err(|_| anyhow::anyhow!("metrics lock poisoned"))?;
        encode(&mut out, &m.registry)?;
    }
    // encode() ends with "# EOF"; the datapath part follows, so drop it here.
    if let Some(i) = out.rfind("# EOF") {
        out.truncate(i);
    }
    let mut reg = Registry::with_prefix("flannel_ebpf_datapath");
    let t = Tables::open(pin_root)?;
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for (c, v) in t.counters()? {
        let l = vec![("reason".to_string(), c.name().to_string())];
        packets.get_or_create(&l).inc_by(v.packets);
        bytes.get_or_create(&l).inc_by(v.bytes);
    }
    reg.register(
        "packets",
        "Packets by datapath outcome (encap, decap, each drop and fallback reason)",
        packets,
    );
    reg.register("bytes", "Bytes by datapath outcome", bytes);
    let p_packets = Family::<Labels, Counter>::default();
    let p_bytes = Family::<Labels, Counter>::default();
    let p_drops = Family::<Labels, Counter>::default();
    let p_seen = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    for p in show::peers(&t)? {
        let base = vec![
            ("peer".to_string(), p.public_ip.to_string()),
            ("vtep_mac".to_string(), p.vtep_mac.to_string()),
        ];
        for (dir, pk, by) in [
            ("tx", p.stats.tx_packets, p.stats.tx_bytes),
            ("rx", p.stats.rx_packets, p.stats.rx_bytes),
        ] {
            let mut l = base.clone();
            l.push(("direction".into(), dir.into()));
            p_packets.get_or_create(&l).inc_by(pk);
            p_bytes.get_or_create(&l).inc_by(by);
        }
        for (kind, n) in [
            ("tx_fallback", p.stats.tx_fallbacks),
            ("rx_drop", p.stats.rx_drops),
        ] {
            let mut l = base.clone();
            l.push(("kind".into(), kind.into()));
            p_drops.get_or_create(&l).inc_by(n);
        }
        if let Some(ago) = show::seconds_ago(p.stats.last_rx_ns) {
            p_seen.get_or_create(&base).set(ago);
        }
    }
    reg.register(
        "peer_packets",
        "Packets to and from each remote node",
        p_packets,
    );
    reg.register("peer_bytes", "Bytes to and from each remote node", p_bytes);
    reg.register(
        "peer_drops",
        "Packets of each remote node dropped or left to the kernel",
        p_drops,
    );
    reg.register(
        "peer_last_seen_seconds",
        "Seconds since the last packet from each remote node",
        p_seen,
    );
    encode(&mut out, &reg)?;
    Ok(out)
}

/// Serve `/metrics` on `addr:port` until the process exits.
pub async fn serve(
    addr: std::net::IpAddr,
    port: u16,
    agent: Arc<Mutex<AgentMetrics>>,
    pin_root: PathBuf,
) -> anyhow::Result<()> {
    let handler: crate::ops::http::Handler = Arc::new(move |path| {
        if path != "/metrics" {
            return ("404 Not Found", "try /metrics\n".into());
        }
        match render(&agent, &pin_root) {
            Ok(t) => ("200 OK", t),
            Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
        }
    });
    crate::ops::http::serve(addr, port, "--metrics-port", handler).await?;
    log::info!("metrics on http://{addr}:{port}/metrics");
    Ok(())
}
