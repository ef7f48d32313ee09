//! `run` on an IPv6-only cluster (EnableIPv4 false), as flanneld runs it:
//! flannel-v6.<VNI> on the IPv6 underlay and no flannel.1. On the eBPF data
//! path the decap program runs on the underlay, the encap6 program on
//! flannel-v6's egress and the direct path's on the pod bridge; there are no
//! IPv4 tables to keep. With host-gw: routes on the underlay only, no
//! flannel-v6 and no programs.
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use flannel_ebpf_common::NodeConfig;
use tokio::signal::unix::{SignalKind, signal};

use super::run::{
    Joined, PodPorts, decap_hook, direct_path, ebpf_logs, ensure_pod_hook, no_ebpf, set_up_v6,
    switch_direct_path,
};
use crate::{
    cmd::cli::{DatapathKind, RunArgs},
    ebpf::{datapath, tables::Tables},
    lease::{
        LeaseBackend,
        mac::Mac,
        netconf::{BackendType, NetConf},
        subnet_env,
    },
    netlink::Netlink,
    node::{overlay6, sysctl, underlay},
    ops::{
        health::Health,
        metrics::{self, AgentMetrics},
    },
    source::{LeaseSource, Want, log_changes},
};

pub async fn run(
    args: &RunArgs,
    conf: &NetConf,
    health: &Health,
    source: &mut LeaseSource,
    object: Vec<u8>,
    guarded: bool,
) -> anyhow::Result<()> {
    let c6 = conf
        .ipv6
        .clone()
        .context("EnableIPv4 is false but EnableIPv6 is not true")?;
    if args.public_ip.is_some() {
        bail!("--public-ip is an IPv4 address: with EnableIPv4 false give --public-ipv6");
    }
    let nl = Netlink::connect()?;
    let (link, ip6) = underlay::select6(
        &nl,
        &underlay::Choice {
            iface: args.iface.clone(),
            iface_regex: args.iface_regex.clone(),
            can_reach: args.iface_can_reach,
            public_ip: None,
        },
        args.public_ipv6,
    )
    .await?;
    crate::lease::parse_public_ipv6(&ip6.to_string()).context("the public IPv6 address")?;
    let name = overlay6::vtep_name(conf.backend.vni);
    let host_gw = conf.backend.kind == BackendType::HostGw;
    // flannel-v6's MAC survives restarts, as flannel.1's does.
    let mac = nl
        .link_by_name(&name)
        .await?
        .filter(|l| l.vxlan.is_some())
        .and_then(|l| l.mac)
        .unwrap_or_else(|| Mac::stable_from(format!("flannel-ebpf-v6/{ip6}").as_bytes()));
    let want = Want {
        public_ip: Ipv4Addr::UNSPECIFIED,
        backend: if host_gw {
            LeaseBackend::HostGw
        } else {
            LeaseBackend::Vxlan { vtep_mac: mac }
        },
        v6: Some((ip6, (!host_gw).then_some(mac))),
        previous: None,
        previous6: subnet_env::previous_subnet6(&args.subnet_file),
    };
    let own = source.acquire(conf, &want).await?;
    let own6 = own.v6.context("our IPv6-only lease has no IPv6 half")?;
    let joined = Joined {
        underlay: underlay::Underlay {
            link,
            public_ip: Ipv4Addr::UNSPECIFIED,
        },
        vtep_name: name.clone(),
        own,
    };
    let v4_vtep = format!("flannel.{}", conf.backend.vni);
    if nl.link_by_name(&v4_vtep).await?.is_some() {
        log::warn!(
            "{v4_vtep} remains from an IPv4 run; EnableIPv4 is false, so nothing programs it: remove it with `ip link del {v4_vtep}`"
        );
    }
    // Nothing on the node changes before the source has listed every lease.
    let snap = source.first_snapshot().await?;
    // flannel.1's guard, if an IPv4 run left one: there is no IPv4 VTEP.
    crate::node::guard::remove4();
    let root = &args.pins.pin_root;
    let underlay_link = joined.underlay.link.clone();
    // Either data path: a VTEP or pins of another VNI would split the node.
    if !host_gw {
        super::run::refuse_vni_change(&nl, root, conf.backend.vni, &name).await?;
    }
    let ebpf = match args.datapath {
        _ if host_gw => {
            log::info!(
                "backend host-gw: routes to peers' public IPv6 addresses on {}, no VXLAN device and no eBPF programs",
                underlay_link.name
            );
            // Left by a vxlan run: its programs would still judge (and drop)
            // the peers' plain pod traffic. Say so rather than remove unasked.
            if datapath::decap_pinned(root) {
                log::warn!(
                    "pins under {} remain from a vxlan run; to remove them: flannel-agent uninstall --pin-root {}",
                    root.display(),
                    root.display()
                );
            }
            None
        }
        DatapathKind::Kernel => {
            log::info!(
                "data path: the kernel's VXLAN device {name}, programmed as flanneld does (--datapath kernel)"
            );
            None
        }
        DatapathKind::Ebpf => {
            crate::node::xfrm::refuse_if_covered(conf.backend.port)?;
            let (src_port_min, src_port_max) = sysctl::local_port_range();
            let direct = direct_path(args, &underlay_link);
            // No IPv4 half: the programs pass every IPv4 frame (no address
            // of ours matches) and judge VXLAN over IPv6 from CONFIG6.
            let node = NodeConfig {
                public_ip: [0; 4],
                vni: conf.backend.vni,
                port: conf.backend.port,
                src_port_min,
                src_port_max,
                vtep_mac: [0; 6],
                underlay_ifindex: underlay_link.index,
                vtep_ifindex: 0,
                ready: 1,
                network: [0; 4],
                network_mask: [0; 4],
                // DirectRouting peers send pod traffic unencapsulated.
                flags: if conf.backend.direct_routing {
                    flannel_ebpf_common::NODE_NATIVE_POD_SOURCES
                } else {
                    0
                } | if direct {
                    flannel_ebpf_common::NODE_DIRECT_PATH
                } else {
                    0
                },
                subnet: [0; 4],
                subnet_mask: [0; 4],
                // Set once the program on the bridge is attached; a restart
                // carries over the one still running.
                bridge_ifindex: if direct {
                    datapath::running_bridge(root, &args.pod_bridge).unwrap_or(0)
                } else {
                    0
                },
                vtep_mtu: 0,
            };
            let hook = decap_hook(args, &underlay_link);
            let mut loaded =
                datapath::load(root, &object, node, log::max_level()).map_err(no_ebpf)?;
            loaded.verify(hook).map_err(no_ebpf)?;
            let mut tables = Tables::open(root)?;
            // Left by an IPv4 or dual-stack run: no IPv4 peer is one now.
            let stale = tables.clear_ipv4()?;
            if stale > 0 {
                log::info!("IPv6-only: removed {stale} IPv4 map entries of an earlier run");
            }
            Some((tables, loaded, hook))
        }
    };
    let (tables, loaded) = match ebpf {
        Some((t, l, h)) => (Some(t), Some((l, h))),
        None => (None, None),
    };
    let (mut o6, mut guard6, mtu) = set_up_v6(
        conf,
        &nl,
        &joined,
        &snap,
        guarded,
        tables.as_ref(),
        &args.subnet_file,
    )
    .await?
    .context("IPv6-only: flannel-v6 was not set up")?;
    let mut pod_hook = None;
    if let (Some(t), Some((loaded, hook))) = (&tables, loaded) {
        // The maps hold every IPv6 peer now: attach.
        let (attached, mut pod) = loaded
            .attach(None, &underlay_link.name, hook)
            .map_err(no_ebpf)?;
        if log::max_level() >= log::LevelFilter::Debug {
            ebpf_logs(attached.encap_prog_id)?;
        }
        log::info!("attached {}", attached.decap);
        pod.ensure_encap6(Some(&name)).map_err(no_ebpf)?;
        log::info!(
            "attached {} on {name} egress",
            flannel_ebpf_common::PROG_ENCAP6
        );
        pod_hook = switch_direct_path(args, &underlay_link, pod, t)?;
    }
    // Rules before subnet.env: once the CNI plugin can start pods, their
    // traffic is masqueraded.
    if args.ip_masq {
        crate::node::masq::install6(args.masq_backend, c6.network, own6.subnet)?;
        crate::node::masq::remove_family(crate::node::masq::Family::V4);
    }
    subnet_env::write(
        &args.subnet_file,
        &subnet_env::render(None, Some((c6.network, own6.subnet)), mtu, args.ip_masq),
    )?;
    source.ready().await?;
    health.set_ready();
    if host_gw {
        log::info!(
            "node {ip6} (IPv6-only): lease {}, host-gw, MTU {mtu}",
            own6.subnet
        );
    } else {
        log::info!(
            "node {ip6} (IPv6-only): lease {}, VTEP {name} {}/128 {mac} MTU {mtu}, VNI {} port {}",
            own6.subnet,
            own6.subnet.vtep_addr(),
            conf.backend.vni,
            conf.backend.port
        );
    }
    if tables.is_some() {
        log::info!(
            "pin root {}; inspect with: flannel-agent show fdb6|stats --pin-root {}",
            root.display(),
            root.display()
        );
    }
    let metrics = Arc::new(Mutex::new(AgentMetrics::default()));
    if let Some(port) = args.metrics_port {
        metrics::serve(args.metrics_ip, port, metrics.clone(), root.clone()).await?;
    }
    // What start-up set, watched: flannel-v6, the underlay, our address, the pins.
    let node = crate::node::watchdog::NodeState {
        vtep: (!host_gw).then(|| (name.clone(), o6.index)),
        underlay_index: underlay_link.index,
        underlay_name: underlay_link.name.clone(),
        underlay_mtu: underlay_link.mtu,
        public_ip: IpAddr::V6(ip6),
        // A --public-ipv6 that is not the underlay's (NAT) is not watched.
        public_ip_local: nl
            .ipv6_addrs(underlay_link.index)
            .await?
            .iter()
            .any(|(a, _)| *a == ip6),
        pins: tables
            .as_ref()
            .map(|_| (root.clone(), datapath::LINK_ENCAP6)),
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let poll = Duration::from_millis(args.poll_interval_ms.max(10));
    let resync = Duration::from_secs(args.resync_interval.max(1));
    let mut next_resync = Instant::now();
    let mut last = snap;
    let mut last_lease_error = None;
    let mut pod_ports = PodPorts::default();
    loop {
        // One pass per change (and per resync): flannel-v6's tables, FDB6,
        // the guard's members.
        let started = Instant::now();
        let pass = async {
            o6.sync(&nl, last.leases.values(), tables.as_ref())
                .await
                .context("the IPv6 tables (flannel-v6, direct routes)")?;
            if let Some(g) = guard6.as_mut() {
                g.set_members(
                    o6.members(last.leases.values())
                        .into_iter()
                        .map(IpAddr::V6)
                        .collect(),
                )
                .context("the IPv6 membership guard (nftables)")?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Ok(m) = metrics.lock() {
            m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
            let label = |v: &str| vec![("state".to_string(), v.to_string())];
            m.leases
                .get_or_create(&label("applied_ipv6"))
                .set(o6.peers as i64);
            m.leases
                .get_or_create(&label("skipped_ipv6"))
                .set(o6.skipped as i64);
            if pass.is_err() {
                m.reconcile_errors.inc();
            }
        }
        match pass {
            Ok(()) => health.set_tables(None),
            Err(e) => {
                log::warn!("reconcile failed, retrying at the next resync: {e:#}");
                health.set_tables(Some(format!("{e:#}")));
            }
        }
        next_resync = next_resync.max(Instant::now()) + resync;
        // Wait for the next change or resync.
        let snap = loop {
            tokio::select! {
                _ = term.recv() => return stopped(root, tables.as_ref()),
                _ = int.recv() => return stopped(root, tables.as_ref()),
                _ = tokio::time::sleep(poll) => {}
                _ = crate::source::woken() => {}
            }
            health.beat();
            // The pod bridge may come later (the CNI plugin makes it).
            if let (Some(hook), Some(t)) = (pod_hook.as_mut(), tables.as_ref()) {
                if let Err(e) = ensure_pod_hook(hook, &args.pod_bridge, t) {
                    log::warn!("{e:#}");
                }
                pod_ports.follow(&nl, hook, t).await;
            }
            match node.drift(&nl).await {
                Ok(Some(why)) => return Err(crate::node::watchdog::restart_self(&why)),
                Ok(None) => {}
                Err(e) => log::warn!("checking the node's devices: {e:#}"),
            }
            let down = source.degraded();
            if let Ok(m) = metrics.lock() {
                m.lease_source_up.set(i64::from(down.is_none()));
            }
            health.set_source(down);
            if let Err(e) = source.maintain(&joined.own, conf.backend.vni).await
                && last_lease_error.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10))
            {
                log::error!("keeping our lease: {e:#}");
                last_lease_error = Some(Instant::now());
            }
            let due = Instant::now() >= next_resync;
            if due
                && pod_hook.is_some()
                && let Err(e) = crate::node::nat_mark::install()
            {
                // Someone flushed the ruleset: Services' replies depend on it.
                log::warn!("{e:#}");
            }
            match source.changed().await {
                Ok(false) if !due => continue,
                Ok(_) => {}
                Err(e) => {
                    log::warn!("checking leases: {e:#}");
                    continue;
                }
            }
            match source.snapshot().await {
                Ok(Some(s)) => break s,
                Ok(None) => continue,
                Err(e) => log::warn!("reading leases: {e:#}"),
            }
        };
        let changes = log_changes(&last, &snap);
        if let Ok(m) = metrics.lock() {
            for (kind, n) in [
                ("added", changes.added),
                ("changed", changes.changed),
                ("removed", changes.removed),
            ] {
                m.lease_changes
                    .get_or_create(&vec![("kind".to_string(), kind.to_string())])
                    .inc_by(n);
            }
        }
        last = snap;
    }
}

fn stopped(root: &std::path::Path, tables: Option<&Tables>) -> anyhow::Result<()> {
    if let Some(t) = tables {
        PodPorts::clear(t)?;
    }
    log::info!(
        "stopping: programs, maps and flannel-v6's routes stay in place (pinned under {}), traffic keeps flowing",
        root.display()
    );
    Ok(())
}
