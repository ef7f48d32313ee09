//! Control plane: time to classify and apply N leases (maps, and the kernel
//! side: one Network route, or per-node routes and neighbours) against
//! programming the same tables the way flanneld does (one neighbour, one FDB
//! entry, one route per node, each waited for); one lease change against
//! 5000; and the release agent's cold start (applied after listing, peak
//! RSS) from the file source and from a real etcd.
use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use flannel_agent::{
    ebpf::datapath,
    ebpf::tables::Tables,
    lease::mac::Mac,
    lease::subnet::Subnet,
    lease::{Lease, LeaseBackend},
    netlink::{Netlink, VtepSpec},
    reconcile::{
        Desired, KernelFdb, KernelRoutes, Mode, NodeWriter, Own, Scope, Vtep, apply, execute,
        network_gateway, observe, plan,
    },
};
use flannel_ebpf_common::NodeConfig;
use flannel_tests::{
    lab::{Kind, Lab, Topology},
    netns::Netns,
    wait_for,
};

const NETWORK: &str = "10.0.0.0/8";

/// Peer `i` (from 1): subnet 10.<i/256>.<i%256>.0/24, node 192.168.<i/256>.<i%256>.
fn peer(i: usize) -> anyhow::Result<Lease> {
    let (hi, lo) = ((i >> 8) as u8, (i & 0xff) as u8);
    Ok(Lease {
        subnet: Subnet::new(Ipv4Addr::new(10, hi, lo, 0), 24)?,
        public_ip: Ipv4Addr::new(192, 168, hi, lo),
        backend: LeaseBackend::Vxlan {
            vtep_mac: peer_mac(i),
        },
        v6: None,
    })
}

fn peer_mac(i: usize) -> Mac {
    let (hi, lo) = ((i >> 8) as u8, (i & 0xff) as u8);
    Mac([0x02, 0x42, 0x10, hi, lo, 0x01])
}

/// What [`apply_times`] measured.
pub struct ApplyTimes {
    /// (N, flannel-ebpf ms with one kernel route, with per-node routes,
    /// flanneld-style netlink ms) for each N.
    pub rows: Vec<(usize, f64, f64, f64)>,
    /// One lease changed (a new VtepMAC) with [`CHANGE_BASE`] applied:
    /// classify, observe, plan, apply, in ms, one sample per change.
    pub change_ms: Vec<f64>,
}

pub const CHANGE_BASE: usize = 5000;
const CHANGES: usize = 40;

pub fn apply_times(counts: &[usize], object: &[u8]) -> anyhow::Result<ApplyTimes> {
    let ns = Netns::new("bench-cp")?;
    ns.sh("ip link add ul0 type veth peer name ul1")?;
    ns.sh("ip addr add 10.255.0.1/24 dev ul0")?;
    ns.sh("ip link set ul0 up")?;
    ns.sh("ip link set ul1 up")?;
    let root = Path::new("/sys/fs/bpf/flannel-bench-cp").to_path_buf();
    let _ = datapath::uninstall(&root);
    let res = ns.run(|| -> anyhow::Result<ApplyTimes> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let nl = Netlink::connect()?;
            let ul = nl.link_by_name("ul0").await?.context("ul0")?;
            let own_mac = Mac([0x02, 0x42, 0x10, 0xff, 0xff, 0x01]);
            let own = Own {
                subnet: Subnet::new(Ipv4Addr::new(10, 255, 255, 0), 24)?,
                network: NETWORK.parse()?,
                public_ip: Ipv4Addr::new(10, 255, 0, 1),
                backend: LeaseBackend::Vxlan { vtep_mac: own_mac },
                underlay_index: ul.index,
                underlay_name: "ul0".into(),
            };
            let spec = |name: &str, vni: u32, port: u16, mac: Mac| VtepSpec {
                name: name.into(),
                vni,
                port,
                local: std::net::IpAddr::V4(own.public_ip),
                underlay_index: ul.index,
                mac,
                mtu: 1450,
            };
            let vtep = nl.ensure_vtep(&spec("flannel.1", 1, 8472, own_mac)).await?;
            nl.ensure_only_addr(vtep.index, own.subnet.vtep_addr())
                .await?;
            let cfg = NodeConfig {
                public_ip: own.public_ip.octets(),
                vni: 1,
                port: 8472,
                src_port_min: 32768,
                src_port_max: 61000,
                vtep_mac: own_mac.0,
                underlay_ifindex: ul.index,
                vtep_ifindex: vtep.index,
                ready: 1,
                ..NodeConfig::default()
            };
            datapath::install(
                &root,
                object,
                cfg,
                "flannel.1",
                "ul0",
                log::LevelFilter::Info,
            )?;
            let mut tables = Tables::open(&root)?;
            let scope = Scope {
                network: own.network,
                vtep: Some(Vtep {
                    index: vtep.index,
                    mac: own_mac,
                    gateway: network_gateway(own.network, own.subnet),
                }),
                underlay_index: ul.index,
            };
            let mode = |routes| Mode {
                routes,
                fdb: KernelFdb::Remove,
                direct: true,
            };
            let mut out = Vec::new();
            let mut change_ms = Vec::new();
            for &n in counts {
                let leases: Vec<Lease> = (1..=n).map(peer).collect::<anyhow::Result<_>>()?;
                let mut timed = Vec::new();
                for routes in [KernelRoutes::Network, KernelRoutes::PerNode] {
                    // Classification and apply, as one pass of the agent after the source listed.
                    let t = Instant::now();
                    let (want, _) = Desired::from_leases(&leases, &own, &Desired::default());
                    let o = apply(&want, Some(&mut tables), &nl, &scope, &mode(routes)).await?;
                    timed.push(t.elapsed().as_secs_f64() * 1e3);
                    anyhow::ensure!(o.errors.is_empty(), "apply failed: {:?}", o.errors.first());
                    if n == CHANGE_BASE && routes == KernelRoutes::Network {
                        change_ms =
                            one_change(&leases, &own, &mut tables, &nl, &scope, o.target).await?;
                    }
                    let o = apply(
                        &Desired::default(),
                        Some(&mut tables),
                        &nl,
                        &scope,
                        &mode(routes),
                    )
                    .await?;
                    anyhow::ensure!(
                        o.errors.is_empty(),
                        "clearing failed: {:?}",
                        o.errors.first()
                    );
                }

                // flanneld's way: per node a neighbour, an FDB entry and a route, in turn.
                let kv = nl
                    .ensure_vtep(&spec("flannel.9", 9, 8473, Mac([2, 0x42, 9, 9, 9, 9])))
                    .await?;
                let t = Instant::now();
                for (i, l) in leases.iter().enumerate() {
                    let mac = peer_mac(i + 1);
                    nl.replace_neighbour(kv.index, l.subnet.vtep_addr(), mac)
                        .await?;
                    nl.replace_fdb(kv.index, mac, l.public_ip).await?;
                    nl.replace_route(kv.index, l.subnet, l.subnet.vtep_addr())
                        .await?;
                }
                let flannel = t.elapsed().as_secs_f64() * 1e3;
                nl.delete_link(kv.index).await?;
                out.push((n, timed[0], timed[1], flannel));
            }
            Ok(ApplyTimes {
                rows: out,
                change_ms,
            })
        })
    })?;
    let _ = datapath::uninstall(&root);
    res
}

/// One lease after another gets a new VtepMAC, each applied as the agent's
/// pass does it between resyncs: classify all leases, observe the kernel
/// (the maps as the previous pass left them), plan, apply.
async fn one_change(
    leases: &[Lease],
    own: &Own,
    tables: &mut Tables,
    nl: &Netlink,
    scope: &Scope,
    mut known: Option<flannel_agent::reconcile::MapView>,
) -> anyhow::Result<Vec<f64>> {
    let mode = Mode {
        routes: KernelRoutes::Network,
        fdb: KernelFdb::Remove,
        direct: true,
    };
    let mut leases = leases.to_vec();
    let mut live = Desired::default();
    let mut out = Vec::new();
    for i in 0..CHANGES {
        let k = (i * 97) % leases.len();
        leases[k].backend = LeaseBackend::Vxlan {
            vtep_mac: Mac([0x02, 0x43, (i >> 8) as u8, i as u8, (k >> 8) as u8, k as u8]),
        };
        let t = Instant::now();
        let (want, _) = Desired::from_leases(&leases, own, &live);
        let t1 = t.elapsed();
        let seen = observe(Some(&*tables), known.take(), nl, scope).await?;
        let t2 = t.elapsed();
        let p = plan(&want, &seen, scope, &mode);
        let t3 = t.elapsed();
        if std::env::var_os("FLANNEL_BENCH_STAGES").is_some() {
            eprintln!("classify {t1:?} observe {:?} plan {:?}", t2 - t1, t3 - t2);
        }
        let changed = p.len();
        let o = execute(
            p,
            seen.maps,
            &mut NodeWriter {
                tables: Some(&mut *tables),
                nl,
            },
        )
        .await;
        out.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(o.errors.is_empty(), "apply failed: {:?}", o.errors.first());
        // A new VtepMAC: FDB and ARP written, the route rewritten, the old FDB entry gone.
        anyhow::ensure!(changed == 4, "one changed lease planned {changed} writes");
        known = o.target;
        live = want;
    }
    Ok(out)
}

/// Where the cold-start leases are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    File,
    Etcd,
}

/// What the release agent reported from a cold start with N leases.
pub struct ColdStart {
    /// The agent's own figures from its log line: the passes that write the
    /// tables after the listed snapshot (the maps, then the kernel side)…
    pub applied_ms: f64,
    /// …and the programs' attach between them (the same whatever N).
    pub attach_ms: f64,
    /// From starting the process to that line (source listing included).
    pub total_secs: f64,
    /// Resident a second after, and the start-up's peak.
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

/// End to end with the release agent: N leases present at start → the
/// agent's "tables applied" line, and its peak RSS.
pub fn cold_start(agent: &Path, n: usize, store: Store) -> anyhow::Result<ColdStart> {
    let lab = Lab::new(
        if store == Store::File {
            "bench-cold"
        } else {
            "bench-coldetcd"
        },
        Topology::Switched,
        &[Kind::Ebpf],
    )?;
    let config =
        format!(r#"{{"Network":"{NETWORK}","SubnetMin":"10.255.1.0","SubnetMax":"10.255.200.0"}}"#);
    let leases: Vec<Lease> = (1..=n).map(peer).collect::<anyhow::Result<_>>()?;
    let node = &lab.nodes[0];
    let mut source_args: Vec<String> = Vec::new();
    let _etcd = match store {
        Store::File => {
            std::fs::write(lab.lease_dir().join("config"), &config)?;
            for l in &leases {
                std::fs::write(
                    lab.lease_dir().join("subnets").join(l.subnet.to_key()),
                    l.to_json(1),
                )?;
            }
            source_args.extend(["--subnet-mgr".into(), "file".into(), "--subnet-dir".into()]);
            source_args.push(lab.lease_dir().display().to_string());
            None
        }
        Store::Etcd => {
            let etcd = flannel_tests::etcd::Etcd::start(&node.ns, 2479)?;
            etcd.client(&node.ns, async |c| {
                c.put("/coreos.com/network/config", config.as_str(), None)
                    .await?;
                // etcd's default limit is 128 operations per transaction.
                for chunk in leases.chunks(128) {
                    let ops: Vec<etcd_client::TxnOp> = chunk
                        .iter()
                        .map(|l| {
                            etcd_client::TxnOp::put(
                                format!("/coreos.com/network/subnets/{}", l.subnet.to_key()),
                                l.to_json(1),
                                None,
                            )
                        })
                        .collect();
                    c.txn(etcd_client::Txn::new().and_then(ops)).await?;
                }
                Ok(())
            })?;
            source_args.extend([
                "--subnet-mgr".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                etcd.endpoint(),
            ]);
            Some(etcd)
        }
    };
    let log_path = std::env::temp_dir().join(format!("flannel-bench-cold-{n}.log"));
    let log = std::fs::File::create(&log_path)?;
    let t = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.ns.name))
        .arg(agent)
        .arg("run")
        .args(&source_args)
        .args(["--iface", "eth0", "--log-level", "info"])
        .arg("--subnet-file")
        .arg(&node.subnet_file)
        .arg("--pin-root")
        .arg(&node.pin_root)
        .arg("--bpf-object")
        .arg(flannel_tests::object_path())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the release agent")?;
    let pid = child.id();
    let applied = wait_for(
        &format!("{n} leases applied"),
        Duration::from_secs(120),
        || {
            let text = std::fs::read_to_string(&log_path).ok()?;
            let line = text.lines().find(|l| l.contains("tables applied in"))?;
            let ms = |what: &str| -> Option<f64> {
                line.split(what).nth(1)?.split(' ').next()?.parse().ok()
            };
            Some((ms("first pass ")? + ms("kernel pass ")?, ms("attach ")?))
        },
    );
    let total_secs = t.elapsed().as_secs_f64();
    // Resident once settled, and the peak of the start-up.
    std::thread::sleep(Duration::from_secs(1));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |field: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (rss_kb, hwm_kb) = (kb("VmRSS:"), kb("VmHWM:"));
    let routes = node.show("routes").map(|r| r.lines().count());
    let _ = child.kill();
    let _ = child.wait();
    let (applied_ms, attach_ms) =
        applied.with_context(|| std::fs::read_to_string(&log_path).unwrap_or_default())?;
    let routes = routes?;
    anyhow::ensure!(routes == n, "the route map holds {routes} of {n} leases");
    Ok(ColdStart {
        applied_ms,
        attach_ms,
        total_secs,
        rss_mib: rss_kb / 1024.0,
        peak_rss_mib: hwm_kb / 1024.0,
    })
}
