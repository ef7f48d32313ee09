//! `flannel-agent run`: set the node up, then keep its tables in sync with the leases.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use flannel_ebpf_common::{NodeConfig, VXLAN_OVERHEAD};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cmd::cli::{DatapathKind, DecapMode, RunArgs, SubnetMgr},
    ebpf::datapath::{self, DecapHook},
    ebpf::tables::Tables,
    lease::mac::Mac,
    lease::netconf::BackendType,
    lease::subnet_env,
    lease::{Lease, LeaseBackend},
    netlink::{Netlink, VtepSpec, check_ifname},
    node::sysctl,
    node::underlay,
    ops::metrics::{self, AgentMetrics},
    reconcile::{
        self, Desired, KernelFdb, KernelRoutes, MapView, Mode, Own, Scope, Vtep, network_gateway,
    },
    source::{
        LeaseSource, Snapshot,
        etcd::{EtcdOptions, EtcdSource},
        file::FileSource,
        kube::{KubeOptions, KubeSource},
        log_changes,
    },
};

/// Where the kernel object is looked for when --bpf-object is not given.
fn find_object(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let mut tried = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        tried.push(dir.join("flannel-ebpf.o"));
        tried.push(dir.join("../flannel-ebpf.o"));
    }
    tried.push(PathBuf::from("/usr/lib/flannel-ebpf/flannel-ebpf.o"));
    tried
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| format!("no eBPF object found (run `cargo xtask build-ebpf`, or pass --bpf-object); looked at {tried:?}"))
}

async fn open_source(args: &RunArgs) -> anyhow::Result<LeaseSource> {
    Ok(match args.subnet_mgr {
        SubnetMgr::File => {
            let dir = args
                .subnet_dir
                .as_deref()
                .context("--subnet-mgr file needs --subnet-dir DIR")?;
            LeaseSource::File(FileSource::new(dir))
        }
        SubnetMgr::Etcd => LeaseSource::Etcd(Box::new(
            EtcdSource::connect(EtcdOptions {
                endpoints: args.etcd_endpoints.clone(),
                prefix: args.etcd_prefix.clone(),
                cafile: args.etcd_cafile.clone(),
                certfile: args.etcd_certfile.clone(),
                keyfile: args.etcd_keyfile.clone(),
                username: args.etcd_username.clone(),
                password: args.etcd_password.clone(),
                lease_ttl: Duration::from_secs(args.subnet_lease_ttl),
                renew_margin: Duration::from_secs(args.subnet_lease_renew_margin * 60),
            })
            .await?,
        )),
        SubnetMgr::Kube => LeaseSource::Kube(Box::new(
            KubeSource::connect(KubeOptions {
                kubeconfig: args.kubeconfig.clone(),
                node_name: args.node_name.clone(),
                net_config_path: args.net_config_path.clone(),
            })
            .await?,
        )),
    })
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let health = serve_health(&args).await?;
    let mut source = open_source(&args).await?;
    let conf = source.config().await?;
    // Before the lease store or the node is written: never two agents on one
    // node's data path (the second would re-announce our lease and tear
    // down what the first attached).
    let _node_lock = match (conf.backend.kind, args.datapath) {
        (BackendType::Vxlan, DatapathKind::Ebpf) => datapath::lock_pin_root(&args.pins.pin_root)?,
        _ => datapath::lock_file(&args.subnet_file.with_extension("lock"))?,
    };
    let guarded = conf.backend.kind == BackendType::Vxlan
        && args.datapath == DatapathKind::Ebpf
        && args.membership_guard;
    if guarded {
        crate::node::guard::require_nft(
            "the membership guard",
            "run with --membership-guard=false to leave flannel.1's socket open as stock Flannel does",
        )?;
    }
    if conf.backend.kind == BackendType::Vxlan
        && args.datapath == DatapathKind::Ebpf
        && args.direct_path
    {
        crate::node::guard::require_nft(
            "the direct path (its mark for NAT'd connections)",
            "run with --direct-path=false",
        )?;
    }
    let object = read_object(&args, &conf)?;
    if !conf.ipv4 {
        return super::run6::run(&args, &conf, &health, &mut source, object, guarded).await;
    }
    let nl = Netlink::connect()?;
    let joined = join(&args, &conf, &nl, &mut source).await?;
    // Nothing on the node changes before the source has listed every lease:
    // on a restart the pinned data path keeps carrying the traffic meanwhile.
    let snap = source.first_snapshot().await?;
    let guard = guarded
        .then(|| install_guard(&conf, &joined, &snap))
        .transpose()?;
    if !guarded {
        crate::node::guard::remove();
    }
    let setup = set_up_node(
        &args,
        &conf,
        &nl,
        &joined.underlay,
        &joined.vtep_name,
        &joined.own,
        Ok(object),
    )
    .await?;
    let mut setup = setup;
    let tables = setup.ebpf.as_ref().map(|(t, _)| t);
    setup.v6 = set_up_v6(
        &conf,
        &nl,
        &joined,
        &snap,
        guarded,
        tables,
        &args.subnet_file,
    )
    .await?;
    sysctl::warn_if_not_forwarding();
    let mut running = first_passes(&args, &conf, &nl, &joined, setup, guard, &snap).await?;
    drop(snap);
    // Start-up's temporaries (the object and kernel BTF parsed by the loader,
    // the first listing) go back to the system rather than stay resident.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
    announce(&args, &conf, &joined, &mut source, &health, &running).await?;
    control_loop(
        &args,
        &conf,
        &nl,
        &joined,
        &mut source,
        &health,
        &mut running,
    )
    .await?;
    if let Some(t) = running.tables.as_ref() {
        PodPorts::clear(t)?;
    }
    log::info!(
        "stopping: programs, maps and routes stay in place (pinned under {}), traffic keeps flowing",
        args.pins.pin_root.display()
    );
    Ok(())
}

/// /healthz and /readyz, served from the start (not ready until the tables are in).
async fn serve_health(args: &RunArgs) -> anyhow::Result<Arc<crate::ops::health::Health>> {
    // The control loop passes every poll interval; a minute without a pass,
    // or three resync intervals if longer, means it is stuck.
    let stale = Duration::from_secs((3 * args.resync_interval).max(60));
    let health = Arc::new(crate::ops::health::Health::new(stale));
    if let Some(port) = args.healthz_port {
        let h = health.clone();
        let handler: crate::ops::http::Handler = Arc::new(move |path| match path {
            "/healthz" => h.healthz(),
            "/readyz" => h.readyz(),
            _ => ("404 Not Found", "try /healthz or /readyz\n".into()),
        });
        crate::ops::http::serve(args.healthz_ip, port, "--healthz-port", handler).await?;
    }
    Ok(health)
}

/// The kernel object, read before touching the node (only the eBPF data path needs it).
fn read_object(args: &RunArgs, conf: &crate::lease::netconf::NetConf) -> anyhow::Result<Vec<u8>> {
    match (conf.backend.kind, args.datapath) {
        (BackendType::HostGw, _) | (_, DatapathKind::Kernel) => Ok(Vec::new()),
        (BackendType::Vxlan, DatapathKind::Ebpf) => find_object(args.bpf_object.as_deref())
            .and_then(|p| {
                std::fs::read(&p)
                    .with_context(|| format!("reading the eBPF object {}", p.display()))
            })
            .map_err(|e| anyhow::anyhow!("{e:#}; or use --datapath kernel")),
    }
}

/// This node as a cluster member: its underlay, its VTEP's name, its lease.
pub(super) struct Joined {
    pub(super) underlay: underlay::Underlay,
    pub(super) vtep_name: String,
    pub(super) own: Lease,
}

/// Pick the underlay and our public IP, settle the VtepMAC and take our lease.
async fn join(
    args: &RunArgs,
    conf: &crate::lease::netconf::NetConf,
    nl: &Netlink,
    source: &mut LeaseSource,
) -> anyhow::Result<Joined> {
    let wanted_ip = match args.public_ip {
        Some(ip) => Some(ip),
        None => source.public_ip_hint().await?,
    };
    let underlay = underlay::select(
        nl,
        &underlay::Choice {
            iface: args.iface.clone(),
            iface_regex: args.iface_regex.clone(),
            can_reach: args.iface_can_reach,
            public_ip: wanted_ip,
        },
    )
    .await?;
    let public_ip = underlay.public_ip;
    let vtep_name = args
        .vtep_name
        .clone()
        .unwrap_or_else(|| format!("flannel.{}", conf.backend.vni));
    check_ifname(&vtep_name)?;
    let backend = match conf.backend.kind {
        BackendType::HostGw => LeaseBackend::HostGw,
        BackendType::Vxlan => LeaseBackend::Vxlan {
            vtep_mac: stable_vtep_mac(nl, source, &vtep_name, public_ip).await?,
        },
    };
    let v6 = match &conf.ipv6 {
        None => None,
        Some(_) => Some(join_v6(args, conf, nl, source, &underlay, backend).await?),
    };
    let want = crate::source::Want {
        public_ip,
        backend,
        v6,
        previous: subnet_env::previous_subnet(&args.subnet_file),
        previous6: subnet_env::previous_subnet6(&args.subnet_file),
    };
    let own = source.acquire(conf, &want).await?;
    Ok(Joined {
        underlay,
        vtep_name,
        own,
    })
}

/// EnableIPv6: our public IPv6 address (`--public-ipv6`, else the underlay's
/// first global IPv6 address) and flannel-v6's MAC, kept across restarts
/// like flannel.1's.
async fn join_v6(
    args: &RunArgs,
    conf: &crate::lease::netconf::NetConf,
    nl: &Netlink,
    source: &mut LeaseSource,
    underlay: &underlay::Underlay,
    backend: LeaseBackend,
) -> anyhow::Result<(std::net::Ipv6Addr, Option<Mac>)> {
    let addrs6 = nl.ipv6_addrs(underlay.link.index).await?;
    // `--iface <IPv6 address>` picked the underlay by it: that address.
    let by_iface = args
        .iface
        .iter()
        .filter_map(|s| s.parse::<std::net::Ipv6Addr>().ok())
        .find(|ip| addrs6.iter().any(|(a, _)| a == ip));
    let ip6 = match args.public_ipv6.or(by_iface) {
        Some(ip) => ip,
        None => addrs6.first().map(|(ip, _)| *ip).with_context(|| {
            format!(
                "EnableIPv6 is true but {} has no global IPv6 address; give one with --public-ipv6",
                underlay.link.name
            )
        })?,
    };
    crate::lease::parse_public_ipv6(&ip6.to_string()).context("--public-ipv6")?;
    if backend == LeaseBackend::HostGw {
        // host-gw: no flannel-v6, no BackendV6Data.
        return Ok((ip6, None));
    }
    let name = crate::node::overlay6::vtep_name(conf.backend.vni);
    let existing = nl
        .link_by_name(&name)
        .await?
        .filter(|l| l.vxlan.is_some())
        .and_then(|l| l.mac);
    let leased = source
        .lease_of(underlay.public_ip)
        .await?
        .and_then(|l| l.v6)
        .and_then(|v6| v6.vtep_mac);
    let mac = existing
        .or(leased)
        .unwrap_or_else(|| Mac::stable_from(format!("flannel-ebpf-v6/{ip6}").as_bytes()));
    Ok((ip6, Some(mac)))
}

/// The IPv6 half of a dual-stack node (EnableIPv6): the guard's ip6 table
/// first (before flannel-v6's socket can exist), then flannel-v6.<VNI> as
/// flanneld configures it, and its first pass. Returns the IPv6 VTEP's MTU.
pub(super) async fn set_up_v6(
    conf: &crate::lease::netconf::NetConf,
    nl: &Netlink,
    joined: &Joined,
    snap: &Snapshot,
    guarded: bool,
    tables: Option<&Tables>,
    subnet_file: &std::path::Path,
) -> anyhow::Result<
    Option<(
        crate::node::overlay6::Overlay6,
        Option<crate::node::guard::Guard>,
        u32,
    )>,
> {
    use crate::node::overlay6;
    let (Some(c6), Some(v6)) = (&conf.ipv6, joined.own.v6) else {
        // IPv6 switched off: the device goes before its guard, so its
        // socket is never open unguarded.
        let name = crate::node::overlay6::vtep_name(conf.backend.vni);
        if let Some(l) = nl.link_by_name(&name).await?.filter(|l| l.vxlan.is_some()) {
            nl.delete_link(l.index).await?;
            log::info!("IPv6 off: deleted {name}");
        }
        crate::node::guard::remove6();
        // And DirectRouting/host-gw routes of the last run (subnet.env says
        // which IPv6Network and subnet length it had).
        let previous = subnet_env::previous_network6(subnet_file)
            .zip(subnet_env::previous_subnet6(subnet_file));
        if let Some((network6, subnet6)) = previous {
            let n = overlay6::remove_direct_routes(
                nl,
                joined.underlay.link.index,
                &network6,
                subnet6.prefix_len(),
            )
            .await?;
            if n > 0 {
                log::info!(
                    "IPv6 off: removed {n} routes to {network6} from {}",
                    joined.underlay.link.name
                );
            }
        }
        if let Some(t) = tables {
            // IPv6 switched off: the programs stop judging it.
            t.set_config6(None)?;
            t.sync_fdb6(&Default::default())?;
            t.sync_route6(&Default::default())?;
        }
        return Ok(None);
    };
    let underlay = &joined.underlay;
    let routing = match (conf.backend.kind, conf.backend.direct_routing) {
        (BackendType::HostGw, _) => overlay6::Routing6::HostGw,
        (BackendType::Vxlan, true) => overlay6::Routing6::DirectRouting,
        (BackendType::Vxlan, false) => overlay6::Routing6::Vxlan,
    };
    let mut o6 = overlay6::Overlay6::new(
        v6,
        c6.clone(),
        !conf.ipv4,
        routing,
        (underlay.link.index, underlay.link.name.clone()),
    );
    if routing == overlay6::Routing6::HostGw {
        // As flanneld's route network: `<subnet> via <PublicIPv6>` per peer
        // on the underlay, nothing listening, so no guard.
        let name = overlay6::vtep_name(conf.backend.vni);
        if nl.link_by_name(&name).await?.is_some() {
            log::warn!(
                "{name} remains from a vxlan run; host-gw does not use it: remove it with `ip link del {name}`"
            );
        }
        crate::node::guard::remove6();
        sysctl::warn_if_not_forwarding6();
        o6.sync(nl, snap.leases.values(), None).await?;
        log::info!(
            "IPv6: lease {}, host-gw routes to peers' public IPv6 addresses on {}",
            v6.subnet,
            underlay.link.name
        );
        let mtu = conf.backend.mtu.unwrap_or(underlay.link.mtu);
        return Ok(Some((o6, None, mtu)));
    }
    let mac = v6
        .vtep_mac
        .context("our IPv6 lease has no flannel-v6 VtepMAC")?;
    let guard = if guarded {
        let mut g = crate::node::guard::Guard::new(crate::node::guard::Spec {
            port: conf.backend.port,
            public_ip: std::net::IpAddr::V6(v6.public_ip),
            underlay: underlay.link.name.clone(),
        });
        g.set_members(
            o6.members(snap.leases.values())
                .into_iter()
                .map(std::net::IpAddr::V6)
                .collect(),
        )
        .context("installing the IPv6 membership guard (nftables)")?;
        Some(g)
    } else {
        crate::node::guard::remove6();
        None
    };
    let mtu = underlay.link.mtu.saturating_sub(overlay6::VXLAN6_OVERHEAD);
    let name = overlay6::vtep_name(conf.backend.vni);
    let vtep = nl
        .ensure_vtep(&VtepSpec {
            name: name.clone(),
            vni: conf.backend.vni,
            port: conf.backend.port,
            local: std::net::IpAddr::V6(v6.public_ip),
            underlay_index: underlay.link.index,
            mac,
            mtu,
        })
        .await?;
    sysctl::refuse_router_advertisements(&name)?;
    nl.ensure_only_addr6(vtep.index, v6.subnet.vtep_addr())
        .await?;
    sysctl::warn_if_not_forwarding6();
    o6.index = vtep.index;
    o6.vtep6_mtu = mtu;
    o6.sync(nl, snap.leases.values(), tables).await?;
    log::info!(
        "IPv6: lease {}, VTEP {name} {}/128 {mac} MTU {mtu} on {} (the kernel's VXLAN data path)",
        v6.subnet,
        v6.subnet.vtep_addr(),
        v6.public_ip
    );
    Ok(Some((o6, guard, mtu)))
}

/// The guard before flannel.1's socket can exist (a fresh node) or is taken
/// over from flanneld: every node with a VXLAN lease is let in until the
/// first pass narrows that to the FDB's members.
fn install_guard(
    conf: &crate::lease::netconf::NetConf,
    joined: &Joined,
    snap: &Snapshot,
) -> anyhow::Result<crate::node::guard::Guard> {
    let public_ip = joined.own.public_ip;
    let mut g = crate::node::guard::Guard::new(crate::node::guard::Spec {
        port: conf.backend.port,
        public_ip: std::net::IpAddr::V4(public_ip),
        underlay: joined.underlay.link.name.clone(),
    });
    g.set_members(
        snap.leases
            .values()
            .filter(|l| l.has_v4() && l.public_ip != public_ip && l.backend.vtep_mac().is_some())
            .map(|l| std::net::IpAddr::V4(l.public_ip))
            .collect(),
    )
    .context("installing the membership guard (nftables)")?;
    Ok(g)
}

/// The agent once its tables are in: what the control loop keeps in sync.
struct Running {
    state: SyncState,
    own: Own,
    tables: Option<Tables>,
    mtu: u32,
    vtep: Option<u32>,
    metrics: Arc<Mutex<AgentMetrics>>,
    /// The direct path's program on the pod bridge (None: the direct path is off).
    pod_hook: Option<datapath::PodHook>,
}

/// The first pass (maps only while the programs are not attached), the
/// attach, then the pass that puts the kernel side in its final shape.
async fn first_passes(
    args: &RunArgs,
    conf: &crate::lease::netconf::NetConf,
    nl: &Netlink,
    joined: &Joined,
    setup: NodeSetup,
    guard: Option<crate::node::guard::Guard>,
    snap: &Snapshot,
) -> anyhow::Result<Running> {
    let (subnet, public_ip, backend) =
        (joined.own.subnet, joined.own.public_ip, joined.own.backend);
    let (underlay, vtep_name) = (&joined.underlay, &joined.vtep_name);
    let vtep = setup.vtep;
    // One MTU for the pods, both families: the smaller VTEP's.
    let mtu = setup.v6.as_ref().map_or(setup.mtu, |v| setup.mtu.min(v.2));
    let v6 = setup.v6.map(|(o6, g6, _)| (o6, g6));
    let (mut tables, loaded) = setup.ebpf.unzip();
    let own = Own {
        subnet,
        network: conf.network,
        public_ip,
        backend,
        underlay_index: underlay.link.index,
        underlay_name: underlay.link.name.clone(),
    };
    let metrics = Arc::new(Mutex::new(AgentMetrics::default()));
    let on_vtep = if args.per_node_routes || loaded.is_none() {
        KernelRoutes::PerNode
    } else {
        KernelRoutes::Network
    };
    let mut state = SyncState {
        metrics: metrics.clone(),
        direct_routing: conf.backend.direct_routing,
        // Until the programs are attached the kernel may still carry the
        // traffic (a takeover of flanneld's flannel.1): keep its FDB, and on
        // the one-route path its routes and neighbours too.
        mode: match (&loaded, on_vtep) {
            (None, _) => Mode {
                routes: KernelRoutes::PerNode,
                fdb: KernelFdb::Program,
                direct: true,
            },
            (Some(_), KernelRoutes::PerNode) => Mode {
                routes: KernelRoutes::PerNode,
                fdb: KernelFdb::Keep,
                direct: true,
            },
            (Some(_), _) => Mode {
                routes: KernelRoutes::Untouched,
                fdb: KernelFdb::Keep,
                direct: true,
            },
        },
        scope: Scope {
            network: conf.network,
            vtep: vtep.zip(backend.vtep_mac()).map(|(index, mac)| Vtep {
                index,
                mac,
                gateway: network_gateway(conf.network, subnet),
            }),
            underlay_index: underlay.link.index,
        },
        last: Snapshot::default(),
        skipped: BTreeSet::new(),
        applied: None,
        maps: None,
        guard,
        v6,
    };
    let first = Instant::now();
    state.sync(snap, &own, tables.as_mut(), nl, false).await?;
    let mut took = vec![("first pass", first.elapsed())];
    let mut pod_hook = None;
    if let Some(loaded) = loaded {
        // The maps hold every peer now: attach, then drop the kernel's FDB
        // (and, on the one-route path, its per-node routes and neighbours).
        let t = Instant::now();
        let (attached, mut hook) = loaded
            .attach(
                Some(vtep_name),
                &underlay.link.name,
                decap_hook(args, &underlay.link),
            )
            .map_err(no_ebpf)?;
        if log::max_level() >= log::LevelFilter::Debug {
            ebpf_logs(attached.encap_prog_id)?;
        }
        log::info!("attached {}", attached.encap);
        log::info!("attached {}", attached.decap);
        // Dual-stack: VXLAN over IPv6 from flannel-v6's egress too.
        let vtep6 = state
            .v6
            .as_ref()
            .map(|_| crate::node::overlay6::vtep_name(conf.backend.vni));
        hook.ensure_encap6(vtep6.as_deref()).map_err(no_ebpf)?;
        if let Some(t) = tables.as_ref() {
            pod_hook = switch_direct_path(args, &underlay.link, hook, t)?;
        }
        took.push(("attach", t.elapsed()));
        state.mode = Mode {
            routes: on_vtep,
            fdb: KernelFdb::Remove,
            direct: true,
        };
        let t = Instant::now();
        state.sync(snap, &own, tables.as_mut(), nl, false).await?;
        took.push(("kernel pass", t.elapsed()));
    }
    log::info!(
        "{} leases listed, tables applied in {:.1} ms ({}){}",
        snap.leases.len(),
        first.elapsed().as_secs_f64() * 1e3,
        took.iter()
            .map(|(what, d)| format!("{what} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", "),
        match state.mode.routes {
            KernelRoutes::Network => format!(
                "; kernel: one route {} via {} dev {vtep_name} (per-node routes: --per-node-routes)",
                conf.network,
                network_gateway(conf.network, subnet)
            ),
            _ => String::new(),
        }
    );

    Ok(Running {
        state,
        own,
        tables,
        mtu,
        vtep,
        metrics,
        pod_hook,
    })
}

/// Switch the direct path on (the NAT mark, an empty POD_PORTS, the
/// program on the pod bridge: the hook to keep) or off (both directions
/// before the program goes), as `args` and the decap hook allow.
pub(super) fn switch_direct_path(
    args: &RunArgs,
    underlay: &crate::netlink::Link,
    mut hook: datapath::PodHook,
    t: &Tables,
) -> anyhow::Result<Option<datapath::PodHook>> {
    if direct_path(args, underlay) {
        // The NAT mark first (its table is inet): from the moment the
        // program runs, Service packets DNAT'd on the bridge must carry it.
        crate::node::nat_mark::install()?;
        PodPorts::clear(t)?;
        ensure_pod_hook(&mut hook, &args.pod_bridge, t)?;
        return Ok(Some(hook));
    }
    if args.direct_path {
        log::warn!("direct path off: it needs the decap at TC, and --decap xdp puts it at XDP");
    }
    t.set_bridge(0)?;
    PodPorts::clear(t)?;
    if datapath::remove_pod_link(&args.pins.pin_root)? {
        log::info!(
            "direct path off: detached its program from {}",
            args.pod_bridge
        );
    }
    Ok(None)
}

/// Attach the direct path's program when the pod bridge is there, then
/// switch the direct path on in the programs (both directions at once).
pub(super) fn ensure_pod_hook(
    hook: &mut datapath::PodHook,
    bridge: &str,
    tables: &Tables,
) -> anyhow::Result<()> {
    let before = hook.attached_on();
    match hook.ensure(bridge) {
        // Most polls: attached where it was, the programs already know.
        Ok(now) if now == before => Ok(()),
        Ok(now) => tables.set_bridge(now.unwrap_or(0)),
        Err(e) => {
            tables.set_bridge(0)?;
            Err(e.context(format!("attaching the direct path to {bridge}")))
        }
    }
}

/// The direct path's POD_PORTS, followed from the agent's loop. Only a
/// watching agent may leave entries in it: a pod re-created on a new veth
/// with its old address and MAC would otherwise be redirected to the
/// deleted one. So it starts empty and is emptied when the agent stops or
/// the direct path goes off (deliveries then take cni0, as before).
#[derive(Default)]
pub(super) struct PodPorts {
    warned: Option<Instant>,
}

impl PodPorts {
    pub(super) fn clear(tables: &Tables) -> anyhow::Result<()> {
        tables
            .sync_pod_ports(&std::collections::BTreeMap::new())
            .map(|_| ())
            .context("emptying the direct path's pod ports")
    }

    /// Each poll: a pod's new veth is used once the bridge has learned its MAC.
    pub(super) async fn follow(&mut self, nl: &Netlink, hook: &datapath::PodHook, tables: &Tables) {
        let Some(bridge) = hook.attached_on() else {
            return;
        };
        let synced = async {
            let want = crate::node::pod_ports::read(nl, bridge).await?;
            let n = tables.sync_pod_ports(&want)?;
            if n > 0 {
                log::debug!(
                    "pod ports: {n} changes, {} pod addresses behind veths",
                    want.len()
                );
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = synced
            && self
                .warned
                .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
        {
            // Once per 10 s while it lasts; deliveries keep to what is in the map.
            log::warn!("the direct path's pod ports: {e:#}");
            self.warned = Some(Instant::now());
        }
    }
}

/// Tell the node and the cluster we are up: ip-masq rules, subnet.env for
/// the CNI plugin, the source's readiness (kube: NetworkUnavailable=False),
/// /readyz, /metrics, and how to inspect what runs.
async fn announce(
    args: &RunArgs,
    conf: &crate::lease::netconf::NetConf,
    joined: &Joined,
    source: &mut LeaseSource,
    health: &crate::ops::health::Health,
    running: &Running,
) -> anyhow::Result<()> {
    let (subnet, public_ip, backend) =
        (joined.own.subnet, joined.own.public_ip, joined.own.backend);
    let (underlay, vtep_name, mtu) = (&joined.underlay, &joined.vtep_name, running.mtu);
    let (tables, metrics) = (&running.tables, &running.metrics);
    let root = args.pins.pin_root.clone();
    // Rules before subnet.env: once the CNI plugin can start pods, their
    // traffic is masqueraded.
    if args.ip_masq {
        crate::node::masq::install(args.masq_backend, conf.network, subnet)?;
        match conf.ipv6.as_ref().zip(joined.own.v6) {
            Some((c6, v6)) => {
                crate::node::masq::install6(args.masq_backend, c6.network, v6.subnet)?
            }
            // IPv6 switched off since: its rules go with it.
            None => crate::node::masq::remove_family(crate::node::masq::Family::V6),
        }
    }
    subnet_env::write(
        &args.subnet_file,
        &subnet_env::render(
            Some((conf.network, subnet)),
            conf.ipv6
                .as_ref()
                .zip(joined.own.v6)
                .map(|(c6, v6)| (c6.network, v6.subnet)),
            mtu,
            args.ip_masq,
        ),
    )?;
    source.ready().await?;
    health.set_ready();
    match backend {
        LeaseBackend::Vxlan { vtep_mac } => log::info!(
            "node {public_ip}: lease {subnet}, VTEP {vtep_name} {}/32 {vtep_mac} MTU {mtu}, VNI {} port {}",
            subnet.vtep_addr(),
            conf.backend.vni,
            conf.backend.port
        ),
        LeaseBackend::HostGw => log::info!(
            "node {public_ip}: lease {subnet}, host-gw on {} MTU {mtu}",
            underlay.link.name
        ),
    }
    if tables.is_some() {
        log::info!("pin root {}; inspect with:", root.display());
        for f in ["route", "arp", "fdb", "counters", "config"] {
            log::info!("  bpftool map dump pinned {}", root.join(f).display());
        }
        log::info!(
            "  bpftool link show   (the links pinned as {}, and {} or {})",
            datapath::LINK_ENCAP,
            datapath::LINK_DECAP,
            datapath::LINK_DECAP_TC
        );
        log::info!(
            "  flannel-agent show routes|arp|fdb|peers|stats --pin-root {}",
            root.display()
        );
    }
    if let Some(port) = args.metrics_port {
        metrics::serve(args.metrics_ip, port, metrics.clone(), root.clone()).await?;
    }

    Ok(())
}

/// Follow the source until SIGTERM/SIGINT: every poll (or as soon as the
/// source reports a change) check the node, keep our lease, and pass.
async fn control_loop(
    args: &RunArgs,
    conf: &crate::lease::netconf::NetConf,
    nl: &Netlink,
    joined: &Joined,
    source: &mut LeaseSource,
    health: &crate::ops::health::Health,
    running: &mut Running,
) -> anyhow::Result<()> {
    let (public_ip, vtep_name, underlay) =
        (joined.own.public_ip, &joined.vtep_name, &joined.underlay);
    let own_lease = &joined.own;
    let Running {
        state,
        own,
        tables,
        vtep,
        metrics,
        pod_hook,
        ..
    } = running;
    let vtep = *vtep;
    let root = args.pins.pin_root.clone();
    let node = crate::node::watchdog::NodeState {
        vtep: vtep.map(|i| (vtep_name.clone(), i)),
        underlay_index: underlay.link.index,
        underlay_name: underlay.link.name.clone(),
        underlay_mtu: underlay.link.mtu,
        public_ip: std::net::IpAddr::V4(public_ip),
        public_ip_local: crate::node::watchdog::check_public_ip(
            nl,
            underlay.link.index,
            &underlay.link.name,
            public_ip,
            vtep.is_some(),
        )
        .await?,
        pins: tables
            .as_ref()
            .map(|_| (root.clone(), datapath::LINK_ENCAP)),
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let poll = Duration::from_millis(args.poll_interval_ms.max(10));
    let resync = Duration::from_secs(args.resync_interval.max(1));
    let mut next_resync = Instant::now() + resync;
    let mut last_lease_error = None;
    let mut pod_ports = PodPorts::default();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tokio::time::sleep(poll) => {}
            _ = crate::source::woken() => {}
        }
        health.beat();
        if let (Some(hook), Some(t)) = (pod_hook.as_mut(), tables.as_ref()) {
            if let Err(e) = ensure_pod_hook(hook, &args.pod_bridge, t) {
                log::warn!("{e:#}");
            }
            pod_ports.follow(nl, hook, t).await;
        }
        let source_down = source.degraded();
        if let Ok(m) = metrics.lock() {
            m.lease_source_up.set(i64::from(source_down.is_none()));
        }
        health.set_source(source_down);
        match node.drift(nl).await {
            Ok(Some(why)) => return Err(crate::node::watchdog::restart_self(&why)),
            Ok(None) => {}
            Err(e) => log::warn!("checking the node's devices: {e:#}"),
        }
        let due = Instant::now() >= next_resync;
        if due
            && pod_hook.is_some()
            && let Err(e) = crate::node::nat_mark::install()
        {
            // Someone flushed the ruleset: Services' replies depend on it.
            log::warn!("{e:#}");
        }
        if let Err(e) = source.maintain(own_lease, conf.backend.vni).await {
            // Once per 10 s while it lasts (e.g. etcd down), not on every poll.
            if last_lease_error.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10)) {
                log::error!("keeping our lease: {e:#}");
                last_lease_error = Some(Instant::now());
            }
        }
        match source.changed().await {
            Ok(false) if !due => continue,
            Ok(_) => {}
            Err(e) => {
                log::warn!("checking leases: {e:#}");
                continue;
            }
        }
        let snap = match source.snapshot().await {
            Ok(Some(s)) => s,
            // Re-listing after a lost watch: the tables stand until it completes.
            Ok(None) => continue,
            Err(e) => {
                log::warn!("reading leases: {e:#}");
                continue;
            }
        };
        match state.sync(&snap, own, tables.as_mut(), nl, due).await {
            Ok(()) => health.set_tables(None),
            Err(e) => {
                log::warn!("reconcile failed, retrying at the next resync: {e:#}");
                health.set_tables(Some(format!("{e:#}")));
            }
        }
        next_resync = Instant::now() + resync;
    }
    Ok(())
}

/// What `run` set up on the node for its backend.
struct NodeSetup {
    /// The pod MTU for subnet.env.
    mtu: u32,
    /// flannel.<VNI>'s ifindex (none with host-gw).
    vtep: Option<u32>,
    /// The eBPF data path: its maps, and its programs loaded but not attached yet.
    ebpf: Option<(Tables, datapath::Loaded)>,
    /// The IPv6 half (EnableIPv6): flannel-v6, its guard and its MTU.
    v6: Option<(
        crate::node::overlay6::Overlay6,
        Option<crate::node::guard::Guard>,
        u32,
    )>,
}

/// Set the node up for its backend: nothing but a check for host-gw; for
/// VXLAN the VTEP device, and the eBPF maps and programs unless `--datapath kernel`.
async fn set_up_node(
    args: &RunArgs,
    conf: &crate::lease::netconf::NetConf,
    nl: &Netlink,
    underlay: &underlay::Underlay,
    vtep_name: &str,
    own: &Lease,
    object: anyhow::Result<Vec<u8>>,
) -> anyhow::Result<NodeSetup> {
    let (subnet, public_ip) = (own.subnet, own.public_ip);
    let root = &args.pins.pin_root;
    Ok(match own.backend {
        LeaseBackend::HostGw => {
            log::info!(
                "backend host-gw: routes to peers' public IPs on {}, no VXLAN device and no eBPF programs",
                underlay.link.name
            );
            // Left by an earlier vxlan run: its routes would shadow ours for
            // peers host-gw cannot reach. Say so rather than delete it unasked.
            if nl.link_by_name(vtep_name).await?.is_some() || datapath::decap_pinned(root) {
                log::warn!(
                    "{vtep_name} or pins under {} remain from a vxlan run; to remove them: flannel-agent uninstall --pin-root {} && ip link del {vtep_name}",
                    root.display(),
                    root.display()
                );
            }
            NodeSetup {
                mtu: conf.backend.mtu.unwrap_or(underlay.link.mtu),
                vtep: None,
                ebpf: None,
                v6: None,
            }
        }
        LeaseBackend::Vxlan { vtep_mac } => {
            refuse_vni_change(nl, root, conf.backend.vni, vtep_name).await?;
            if args.datapath == DatapathKind::Ebpf {
                crate::node::xfrm::refuse_if_covered(conf.backend.port)?;
            }
            let mtu = conf
                .backend
                .mtu
                .unwrap_or(underlay.link.mtu.saturating_sub(VXLAN_OVERHEAD));
            let vtep = nl
                .ensure_vtep(&VtepSpec {
                    name: vtep_name.to_string(),
                    vni: conf.backend.vni,
                    port: conf.backend.port,
                    local: std::net::IpAddr::V4(public_ip),
                    underlay_index: underlay.link.index,
                    mac: vtep_mac,
                    mtu,
                })
                .await?;
            nl.ensure_only_addr(vtep.index, subnet.vtep_addr()).await?;
            sysctl::loosen_rp_filter(&underlay.link.name)?;
            let tables = match args.datapath {
                DatapathKind::Kernel => {
                    log::info!(
                        "data path: the kernel's VXLAN device, programmed as flanneld does (--datapath kernel)"
                    );
                    if datapath::decap_pinned(root) {
                        log::warn!(
                            "an eBPF data path is still pinned under {} and carries the traffic; hand it to the kernel with: flannel-agent uninstall --pin-root {}",
                            root.display(),
                            root.display()
                        );
                    }
                    None
                }
                DatapathKind::Ebpf => {
                    let (src_port_min, src_port_max) = sysctl::local_port_range();
                    let node = NodeConfig {
                        public_ip: public_ip.octets(),
                        vni: conf.backend.vni,
                        port: conf.backend.port,
                        src_port_min,
                        src_port_max,
                        vtep_mac: vtep_mac.0,
                        underlay_ifindex: underlay.link.index,
                        vtep_ifindex: vtep.index,
                        ready: 1,
                        network: conf.network.addr().octets(),
                        network_mask: conf.network.netmask().octets(),
                        // DirectRouting peers send pod traffic unencapsulated.
                        flags: if conf.backend.direct_routing {
                            flannel_ebpf_common::NODE_NATIVE_POD_SOURCES
                        } else {
                            0
                        } | if direct_path(args, &underlay.link) {
                            flannel_ebpf_common::NODE_DIRECT_PATH
                        } else {
                            0
                        },
                        subnet: subnet.addr().octets(),
                        subnet_mask: subnet.netmask().octets(),
                        // Set once the program on the bridge is attached
                        // (kept from the pinned data path on a restart).
                        bridge_ifindex: if direct_path(args, &underlay.link) {
                            datapath::running_bridge(root, &args.pod_bridge).unwrap_or(0)
                        } else {
                            0
                        },
                        vtep_mtu: mtu,
                    };
                    let mut loaded =
                        datapath::load(root, &object?, node, log::max_level()).map_err(no_ebpf)?;
                    loaded
                        .verify(decap_hook(args, &underlay.link))
                        .map_err(no_ebpf)?;
                    Some((Tables::open(root)?, loaded))
                }
            };
            NodeSetup {
                mtu,
                vtep: Some(vtep.index),
                ebpf: tables,
                v6: None,
            }
        }
    })
}

/// A data path pinned for another VNI runs on another device (flannel.<VNI>)
/// and speaks to peers on that VNI: switching would leave the old device and
/// its routes behind, and split this node from nodes not yet switched.
/// Refuse, saying how to do it, rather than half-apply it.
pub(super) async fn refuse_vni_change(
    nl: &Netlink,
    root: &Path,
    vni: u32,
    vtep_name: &str,
) -> anyhow::Result<()> {
    if let Ok(tables) = Tables::open(root) {
        let pinned = tables.node_config()?;
        if pinned.ready != 0 && pinned.vni != vni {
            bail!(
                "net-conf.json says VNI {vni} ({vtep_name}), but the data path pinned under {} runs VNI {}: \
                 a VNI change needs every node switched together; on this node first run \
                 `flannel-agent uninstall --pin-root {}` and delete flannel.{} (and flannel-v6.{}), then start again",
                root.display(),
                pinned.vni,
                root.display(),
                pinned.vni,
                pinned.vni
            );
        }
    }
    // Either data path: a VTEP of another VNI left by an earlier run would
    // keep its routes and its socket (half the change applied).
    for l in nl.links().await? {
        if let Some((old, _)) = l.vxlan
            && old != vni
            && l.name != vtep_name
            && (l.name.starts_with("flannel.") || l.name.starts_with("flannel-v6."))
        {
            bail!(
                "net-conf.json says VNI {vni} ({vtep_name}), but {} (VNI {old}) from an earlier run remains: \
                 a VNI change needs every node switched together; on this node first run \
                 `flannel-agent uninstall --pin-root {}` and `ip link del {}`, then start again",
                l.name,
                root.display(),
                l.name
            );
        }
    }
    Ok(())
}

/// The decap hook `--decap` asks for on this underlay: with `auto`, TC on
/// veth underlays (XDP there would turn off the peer's GSO) and wherever the
/// direct path runs (it delivers from TC), else XDP.
pub(super) fn decap_hook(args: &RunArgs, underlay: &crate::netlink::Link) -> DecapHook {
    match args.decap {
        DecapMode::Xdp => DecapHook::Xdp,
        DecapMode::Tc => DecapHook::Tc,
        DecapMode::Auto if underlay.veth || args.direct_path => DecapHook::Tc,
        DecapMode::Auto => DecapHook::Xdp,
    }
}

/// Whether the direct path runs: asked for, and the decap at TC. From XDP
/// the decapsulated packet can only enter the stack; sending a flow's one
/// direction around conntrack and the other through it would make it INVALID.
pub(super) fn direct_path(args: &RunArgs, underlay: &crate::netlink::Link) -> bool {
    args.direct_path && decap_hook(args, underlay) == DecapHook::Tc
}

/// Why the eBPF data path failed, and the way out.
pub(super) fn no_ebpf(e: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "the eBPF data path cannot run on this host: {e:#}; use --datapath kernel to run with the kernel's VXLAN device instead"
    )
}

/// A stable VtepMAC: the device's, else our lease's, else derived from the public IP.
async fn stable_vtep_mac(
    nl: &Netlink,
    source: &mut LeaseSource,
    vtep_name: &str,
    public_ip: std::net::Ipv4Addr,
) -> anyhow::Result<Mac> {
    let existing = nl.link_by_name(vtep_name).await?;
    let lease_mac = source
        .lease_of(public_ip)
        .await?
        .and_then(|l| l.backend.vtep_mac());
    Ok(existing
        .as_ref()
        .filter(|l| l.vxlan.is_some())
        .and_then(|l| l.mac)
        .or(lease_mac)
        .unwrap_or_else(|| Mac::stable_from(format!("flannel-ebpf/{public_ip}").as_bytes())))
}

/// Forward the programs' aya-log records (debug level only) to our logger.
pub(super) fn ebpf_logs(prog_id: u32) -> anyhow::Result<()> {
    let logger =
        aya_log::EbpfLogger::init_from_id(prog_id).context("reading the programs' log ring")?;
    // SAFETY: the ring's fd is owned by `logger`, which the AsyncFd owns for its whole life.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| anyhow::anyhow!("watching the programs' log ring: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                break;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    log::debug!("eBPF diagnostics (aya-log, debug level) are forwarded to this log");
    Ok(())
}

/// What the previous pass saw, so changes and skips are logged once.
struct SyncState {
    last: Snapshot,
    skipped: BTreeSet<String>,
    metrics: Arc<Mutex<AgentMetrics>>,
    /// Re-evaluated at every pass: the underlay's routes may have changed.
    direct_routing: bool,
    mode: Mode,
    scope: Scope,
    /// What the previous pass applied (None before the first): a conflicting
    /// newcomer is skipped, the live lease stays.
    applied: Option<Desired>,
    /// The maps as the previous pass left them, when all its writes
    /// succeeded: passes between resyncs do not read them back.
    maps: Option<MapView>,
    /// The nftables guard of the kernel's VXLAN socket (eBPF data path).
    guard: Option<crate::node::guard::Guard>,
    /// The IPv6 half (EnableIPv6): flannel-v6's tables and its guard.
    v6: Option<(
        crate::node::overlay6::Overlay6,
        Option<crate::node::guard::Guard>,
    )>,
}

impl SyncState {
    /// One pass: observe the maps and kernel once, classify the leases,
    /// plan the difference, apply it.
    async fn sync(
        &mut self,
        snap: &Snapshot,
        own: &Own,
        mut tables: Option<&mut Tables>,
        nl: &Netlink,
        resync: bool,
    ) -> anyhow::Result<()> {
        let changes = log_changes(&self.last, snap);
        let started = Instant::now();
        // A resync reads the maps back, in case anything else wrote them.
        let known = if resync { None } else { self.maps.take() };
        let seen = reconcile::observe(tables.as_deref(), known, nl, &self.scope).await?;
        let from_maps;
        let live = match (&self.applied, &seen.maps) {
            (Some(d), _) => d,
            // After a restart, what the pinned maps carry is live.
            (None, Some(m)) => {
                from_maps = MapView::desired(m);
                &from_maps
            }
            (None, None) => &Desired::default(),
        };
        let (mut want, mut skipped) = Desired::from_leases(snap.leases.values(), own, live);
        let onlink = |ip| crate::netlink::onlink(&seen.main_routes, own.underlay_index, ip);
        if own.backend == LeaseBackend::HostGw {
            skipped.extend(want.retain_on_link(onlink, &own.underlay_name));
        } else if self.direct_routing {
            want = want.with_direct_routing(onlink);
        }
        let n_skipped = skipped.len() as i64;
        let skipped: BTreeSet<String> = skipped
            .into_iter()
            .map(|(s, why)| format!("lease {s} skipped: {why}"))
            .collect();
        // A skipped lease is a node this one cannot reach: an error, once.
        for line in skipped.difference(&self.skipped) {
            log::error!("{line}");
        }
        self.skipped = skipped;
        let outcome = reconcile::apply_observed(
            &want,
            seen,
            tables.as_deref_mut(),
            nl,
            &self.scope,
            &self.mode,
        )
        .await;
        if let Ok(m) = self.metrics.lock() {
            m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
            let errors = outcome.as_ref().map_or(1, |o| o.errors.len() as u64);
            m.reconcile_errors.inc_by(errors);
            let label = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
            m.leases
                .get_or_create(&label("state", "applied"))
                .set((want.routes.len() + want.direct.len()) as i64);
            m.leases
                .get_or_create(&label("state", "skipped"))
                .set(n_skipped);
            for (kind, n) in [
                ("added", changes.added),
                ("changed", changes.changed),
                ("removed", changes.removed),
            ] {
                m.lease_changes
                    .get_or_create(&label("kind", kind))
                    .inc_by(n);
            }
        }
        let mut outcome = outcome?;
        self.maps = outcome.target.take();
        let fdb_changed = self.applied.as_ref().is_none_or(|a| a.fdb != want.fdb);
        if let Some(g) = self.guard.as_mut().filter(|_| fdb_changed) {
            // Members are the nodes in the FDB: the ones we take VXLAN from.
            g.set_members(
                want.fdb
                    .values()
                    .map(|ip| std::net::IpAddr::V4(*ip))
                    .collect(),
            )
            .context("the membership guard (nftables; --membership-guard=false to go without)")?;
        }
        if outcome.changes > 0 {
            log::debug!(
                "reconciled {} entries in {:?}",
                outcome.changes,
                started.elapsed()
            );
        }
        self.last = snap.clone();
        self.applied = Some(want);
        if let Some((o6, guard6)) = self.v6.as_mut() {
            o6.sync(nl, snap.leases.values(), tables.as_deref())
                .await
                .context("the IPv6 tables (flannel-v6, direct routes)")?;
            if let Ok(m) = self.metrics.lock() {
                let label = |v: &str| vec![("state".to_string(), v.to_string())];
                m.leases
                    .get_or_create(&label("applied_ipv6"))
                    .set(o6.peers as i64);
                m.leases
                    .get_or_create(&label("skipped_ipv6"))
                    .set(o6.skipped as i64);
            }
            if let Some(g) = guard6 {
                g.set_members(
                    o6.members(snap.leases.values())
                        .into_iter()
                        .map(std::net::IpAddr::V6)
                        .collect(),
                )
                .context("the IPv6 membership guard (nftables)")?;
            }
        }
        if !outcome.errors.is_empty() {
            bail!("{} table updates failed", outcome.errors.len());
        }
        Ok(())
    }
}
