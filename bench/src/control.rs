//! Control plane: time to apply N leases (maps + kernel routes and
//! neighbours) against programming the same tables the way flanneld does
//! (one neighbour, one FDB entry, one route per node, each waited for); and
//! the agent's peak RSS with 5000 leases.
use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use flannel_agent::{
    datapath,
    lease::{Lease, LeaseBackend},
    mac::Mac,
    netlink::{Netlink, VtepSpec},
    reconcile::{Desired, KernelFdb, Own, apply},
    subnet::Subnet,
    tables::Tables,
};
use flannel_ebpf_common::NodeConfig;
use flannel_tests::{
    lab::{Kind, Lab, Topology},
    netns::Netns,
    sh, wait_for,
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
    })
}

fn peer_mac(i: usize) -> Mac {
    let (hi, lo) = ((i >> 8) as u8, (i & 0xff) as u8);
    Mac([0x02, 0x42, 0x10, hi, lo, 0x01])
}

/// (N, flannel-ebpf ms, flannel-style netlink ms) for each N.
pub fn apply_times(counts: &[usize], object: &[u8]) -> anyhow::Result<Vec<(usize, f64, f64)>> {
    let ns = Netns::new("bench-cp")?;
    ns.sh("ip link add ul0 type veth peer name ul1")?;
    ns.sh("ip addr add 10.255.0.1/24 dev ul0")?;
    ns.sh("ip link set ul0 up")?;
    ns.sh("ip link set ul1 up")?;
    let root = Path::new("/sys/fs/bpf/flannel-bench-cp").to_path_buf();
    let _ = datapath::uninstall(&root);
    let res = ns.run(|| -> anyhow::Result<Vec<(usize, f64, f64)>> {
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
                local: own.public_ip,
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
            let mut out = Vec::new();
            for &n in counts {
                let leases: Vec<Lease> = (1..=n).map(peer).collect::<anyhow::Result<_>>()?;
                let (want, _) = Desired::from_leases(&leases, &own, &Desired::default());
                let t = Instant::now();
                let o = apply(
                    &want,
                    Some(&mut tables),
                    &nl,
                    Some(vtep.index),
                    &own,
                    KernelFdb::Remove,
                )
                .await?;
                let ours = t.elapsed().as_secs_f64() * 1e3;
                anyhow::ensure!(o.errors.is_empty(), "apply failed: {:?}", o.errors.first());
                apply(
                    &Desired::default(),
                    Some(&mut tables),
                    &nl,
                    Some(vtep.index),
                    &own,
                    KernelFdb::Remove,
                )
                .await?;

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
                out.push((n, ours, flannel));
            }
            Ok(out)
        })
    })?;
    let _ = datapath::uninstall(&root);
    res
}

/// End to end with the release agent: N lease files present at start →
/// seconds until all N routes are in, and the agent's peak RSS (MiB).
pub fn agent_rss(agent: &Path, n: usize) -> anyhow::Result<(f64, f64)> {
    let lab = Lab::new("bench-rss", Topology::Switched, &[Kind::Ebpf])?;
    std::fs::write(
        lab.lease_dir().join("config"),
        format!(r#"{{"Network":"{NETWORK}","SubnetMin":"10.255.1.0","SubnetMax":"10.255.200.0"}}"#),
    )?;
    for i in 1..=n {
        let l = peer(i)?;
        std::fs::write(
            lab.lease_dir().join("subnets").join(l.subnet.to_key()),
            l.to_json(1),
        )?;
    }
    let leases = lab.lease_dir();
    let node = &lab.nodes[0];
    let t = Instant::now();
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", node.ns.name))
        .arg(agent)
        .args([
            "run",
            "--subnet-mgr",
            "file",
            "--iface",
            "eth0",
            "--log-level",
            "warn",
            "--subnet-dir",
        ])
        .arg(&leases)
        .arg("--subnet-file")
        .arg(&node.subnet_file)
        .arg("--pin-root")
        .arg(&node.pin_root)
        .arg("--bpf-object")
        .arg(flannel_tests::object_path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the release agent")?;
    let pid = child.id();
    let ns = node.ns.name.clone();
    let done = wait_for(&format!("{n} routes"), Duration::from_secs(120), || {
        let c = sh(&format!(
            "ip -n {ns} -4 route show dev flannel.1 2>/dev/null | wc -l"
        ))
        .ok()?;
        (c.trim().parse::<usize>().ok()? >= n).then_some(())
    });
    let secs = t.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let _ = child.kill();
    let _ = child.wait();
    done?;
    Ok((secs, hwm_kb / 1024.0))
}
