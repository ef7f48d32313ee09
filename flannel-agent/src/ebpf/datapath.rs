//! Loading the kernel programs, pinning maps and links under one root, and
//! adopting what an earlier agent pinned.
use std::os::unix::fs::OpenOptionsExt;
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use aya::{
    EbpfLoader,
    maps::{MapData, MapInfo, MapType},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        loaded_programs,
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use flannel_ebpf_common::{
    ArpKey, ArpValue, COUNTER_SLOTS, CounterValue, Fdb6Value, FdbKey, FdbValue, FlowKey, MAP_ARP,
    MAP_CONFIG, MAP_CONFIG6, MAP_COUNTERS, MAP_FDB, MAP_FDB6, MAP_NEXT_HOPS, MAP_NEXT_HOPS6,
    MAP_PEER_STATS, MAP_POD_HOPS, MAP_POD_PORTS, MAP_ROUTE, MAP_ROUTE6, MAP_STACK_FLOWS,
    MAP_STACK_FLOWS6, MAX_NODES, MAX_STACK_FLOWS, NextHop, NextHop6, NodeConfig, NodeConfig6,
    POD_HOP_SLOTS, PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP, PROG_ENCAP6, PROG_POD_EGRESS, PeerStats,
    PodHop, Route6Key, Route6Value, RouteValue,
};

/// Where each map is pinned under the pin root, and what it must look like.
pub struct MapSpec {
    pub name: &'static str,
    pub file: &'static str,
    pub kind: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

pub const MAPS: &[MapSpec] = &[
    MapSpec {
        name: MAP_CONFIG,
        file: "config",
        kind: MapType::Array,
        key_size: 4,
        value_size: size_of::<NodeConfig>() as u32,
        max_entries: 1,
    },
    MapSpec {
        name: MAP_ROUTE,
        file: "route",
        kind: MapType::LpmTrie,
        key_size: 8,
        value_size: size_of::<RouteValue>() as u32,
        max_entries: MAX_NODES,
    },
    MapSpec {
        name: MAP_ARP,
        file: "arp",
        kind: MapType::Hash,
        key_size: size_of::<ArpKey>() as u32,
        value_size: size_of::<ArpValue>() as u32,
        max_entries: MAX_NODES,
    },
    MapSpec {
        name: MAP_FDB,
        file: "fdb",
        kind: MapType::Hash,
        key_size: size_of::<FdbKey>() as u32,
        value_size: size_of::<FdbValue>() as u32,
        max_entries: MAX_NODES,
    },
    MapSpec {
        name: MAP_PEER_STATS,
        file: "peer_stats",
        kind: MapType::PerCpuArray,
        key_size: 4,
        value_size: size_of::<PeerStats>() as u32,
        max_entries: MAX_NODES,
    },
    MapSpec {
        name: MAP_STACK_FLOWS,
        file: "stack_flows",
        kind: MapType::LruHash,
        key_size: size_of::<FlowKey>() as u32,
        value_size: 8,
        max_entries: MAX_STACK_FLOWS,
    },
    MapSpec {
        name: MAP_NEXT_HOPS,
        file: "next_hops",
        kind: MapType::PerCpuArray,
        key_size: 4,
        value_size: size_of::<NextHop>() as u32,
        max_entries: MAX_NODES,
    },
    MapSpec {
        name: MAP_CONFIG6,
        file: "config6",
        kind: MapType::Array,
        key_size: 4,
        value_size: size_of::<NodeConfig6>() as u32,
        max_entries: 1,
    },
    MapSpec {
        name: MAP_FDB6,
        file: "fdb6",
        kind: MapType::Hash,
        key_size: size_of::<FdbKey>() as u32,
        value_size: size_of::<Fdb6Value>() as u32,
        max_entries: MAX_NODES,
    },
    MapSpec {
        name: MAP_NEXT_HOPS6,
        file: "next_hops6",
        kind: MapType::PerCpuArray,
        key_size: 4,
        value_size: size_of::<NextHop6>() as u32,
        max_entries: MAX_NODES,
    },
    MapSpec {
        name: MAP_POD_HOPS,
        file: "pod_hops",
        kind: MapType::PerCpuArray,
        key_size: 4,
        value_size: size_of::<PodHop>() as u32,
        max_entries: POD_HOP_SLOTS,
    },
    MapSpec {
        name: MAP_ROUTE6,
        file: "route6",
        kind: MapType::Hash,
        key_size: size_of::<Route6Key>() as u32,
        value_size: size_of::<Route6Value>() as u32,
        max_entries: MAX_NODES,
    },
    MapSpec {
        name: MAP_STACK_FLOWS6,
        file: "stack_flows6",
        kind: MapType::LruHash,
        key_size: size_of::<flannel_ebpf_common::FlowKey6>() as u32,
        value_size: 8,
        max_entries: MAX_STACK_FLOWS,
    },
    MapSpec {
        name: MAP_POD_PORTS,
        file: "pod_ports",
        kind: MapType::Hash,
        key_size: 16,
        value_size: size_of::<flannel_ebpf_common::PodPort>() as u32,
        max_entries: flannel_ebpf_common::MAX_POD_PORTS,
    },
    MapSpec {
        name: MAP_COUNTERS,
        file: "counters",
        kind: MapType::PerCpuArray,
        key_size: 4,
        value_size: size_of::<CounterValue>() as u32,
        max_entries: COUNTER_SLOTS,
    },
];

pub const LINK_ENCAP: &str = "link_encap";
/// Dual-stack: the IPv6 encap link on flannel-v6's egress.
pub const LINK_ENCAP6: &str = "link_encap6";
pub const LINK_DECAP: &str = "link_decap";
/// The decap link when it hangs off TC ingress (`--decap tc`).
pub const LINK_DECAP_TC: &str = "link_decap_tc";
/// The direct path's link on the pod bridge's TC ingress.
pub const LINK_POD_EGRESS: &str = "link_pod_egress";

/// Where the decap program sees the underlay's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapHook {
    /// XDP: before the kernel builds an skb; best on real NICs.
    Xdp,
    /// TC ingress: on veth underlays, where XDP turns off the peer's GSO.
    Tc,
}

/// Whether a decap program of either hook is pinned under `root`.
pub fn decap_pinned(root: &Path) -> bool {
    [LINK_DECAP, LINK_DECAP_TC]
        .iter()
        .any(|l| root.join(l).exists())
}

pub fn map_path(root: &Path, name: &str) -> PathBuf {
    let spec = MAPS.iter().find(|m| m.name == name);
    root.join(spec.map_or(name, |s| s.file))
}

/// Check a pinned map is the one this build expects, so a stale pin from
/// another version is never written with the wrong layout.
fn check_map(spec: &MapSpec, info: &MapInfo, path: &Path) -> anyhow::Result<()> {
    let kind = info.map_type().context("reading the map type")?;
    let got = (kind, info.key_size(), info.value_size(), info.max_entries());
    let want = (spec.kind, spec.key_size, spec.value_size, spec.max_entries);
    if got != want {
        bail!(
            "pinned map {} is (type, key, value, entries) = {:?}, this agent expects {:?}; \
             it was made by another version: remove the pin root (flannel-agent uninstall) or pick another --pin-root",
            path.display(),
            got,
            want
        );
    }
    Ok(())
}

/// Maps a pin root from an earlier version may not have.
const ADDED_LATER: &[&str] = &[
    MAP_CONFIG6,
    MAP_FDB6,
    MAP_NEXT_HOPS6,
    MAP_POD_HOPS,
    MAP_ROUTE6,
    MAP_STACK_FLOWS6,
    MAP_POD_PORTS,
];

/// Every pinned map, opened and checked. Errors when nothing is pinned.
pub fn open_pinned_maps(root: &Path) -> anyhow::Result<Vec<(&'static MapSpec, MapData)>> {
    let mut out = Vec::new();
    for spec in MAPS {
        let path = root.join(spec.file);
        // Pin roots of earlier versions lack the maps added since: what reads
        // them (show, uninstall) goes on without; the agent's load adds them.
        if ADDED_LATER.contains(&spec.name) && !path.exists() {
            continue;
        }
        let data = MapData::from_pin(&path).with_context(|| {
            format!(
                "no flannel-ebpf map pinned at {} (is the agent installed on this node, with this --pin-root?)",
                path.display()
            )
        })?;
        let checked = check_map(spec, &data.info().context("reading map info")?, &path);
        match checked {
            // An earlier version's layout of a map added later (CONFIG6
            // grew with the IPv6 direct path): read without it, as if it
            // were absent; the agent's load replaces it.
            Err(e) if ADDED_LATER.contains(&spec.name) => {
                log::warn!("{e:#}: reading the pin root without it");
                continue;
            }
            checked => checked?,
        }
        out.push((spec, data));
    }
    Ok(out)
}

/// This agent's hold on a node: one agent per data path. Released when the
/// process exits, however it exits (an flock).
pub struct NodeLock(#[allow(dead_code)] std::os::fd::OwnedFd);

/// Take the pin root for this agent, creating it (and mounting bpffs) if
/// needed; refuse when another agent holds it.
pub fn lock_pin_root(root: &Path) -> anyhow::Result<NodeLock> {
    crate::ebpf::bpffs::ensure_mounted(root)?;
    fs::create_dir_all(root).with_context(|| {
        format!(
            "creating pin root {} (is bpffs mounted at /sys/fs/bpf?)",
            root.display()
        )
    })?;
    restrict_to_root(root)?;
    let dir =
        fs::File::open(root).with_context(|| format!("opening pin root {}", root.display()))?;
    flock(dir, &format!("pin root {}", root.display()), "--pin-root")
}

/// The pin root is root's alone (0700): with its maps, anyone could rewrite
/// who is a member. The pins themselves are made 0600 by the kernel.
fn restrict_to_root(root: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making pin root {} root-only", root.display()))
}

/// The same hold for the data paths without pins (kernel VXLAN, host-gw): a
/// lock file beside subnet.env.
pub fn lock_file(path: &Path) -> anyhow::Result<NodeLock> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    flock(
        file,
        &format!("lock file {}", path.display()),
        "--subnet-file",
    )
}

fn flock(file: fs::File, what: &str, flag: &str) -> anyhow::Result<NodeLock> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "another flannel-agent is running with {what} on this node; \
                 stop it first (or give this one another {flag})"
            );
        }
        return Err(e).with_context(|| format!("locking {what}"));
    }
    Ok(NodeLock(file.into()))
}

/// What was attached where, for the start-up report.
pub struct Attached {
    pub encap: String,
    pub decap: String,
    /// A program now running in the encap link, or the decap link when
    /// there is no IPv4 VTEP (IPv6-only); its log ring is shared by all.
    pub encap_prog_id: u32,
}

/// Load the object, pin maps and attach in one step (for callers that fill
/// the maps afterwards and carry no traffic meanwhile, e.g. benchmarks).
pub fn install(
    root: &Path,
    object: &[u8],
    config: NodeConfig,
    vtep_if: &str,
    underlay_if: &str,
    log_level: log::LevelFilter,
) -> anyhow::Result<Attached> {
    Ok(load(root, object, config, log_level)?
        .attach(Some(vtep_if), underlay_if, DecapHook::Xdp)?
        .0)
}

/// The object loaded and its maps pinned, programs not attached yet: the
/// agent fills the maps in between, so that the decap program never sees a
/// peer's frame before that peer is in the FDB (it would drop it as a
/// non-member: a lost packet during a takeover).
pub struct Loaded {
    ebpf: aya::Ebpf,
    root: PathBuf,
    /// Replace pinned programs even when their tag matches (debug logging).
    force: bool,
    /// Nothing was pinned before this load: a failed attach removes it all again.
    fresh: bool,
}

/// Load the object, pin maps (reusing pins) and write the node config.
pub fn load(
    root: &Path,
    object: &[u8],
    config: NodeConfig,
    log_level: log::LevelFilter,
) -> anyhow::Result<Loaded> {
    crate::ebpf::bpffs::ensure_mounted(root)?;
    fs::create_dir_all(root).with_context(|| {
        format!(
            "creating pin root {} (is bpffs mounted at /sys/fs/bpf?)",
            root.display()
        )
    })?;
    let fresh = MAPS.iter().all(|spec| !root.join(spec.file).exists());
    let mut replaced = false;
    for spec in MAPS {
        let path = root.join(spec.file);
        if path.exists() {
            let info = MapInfo::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            // Another version's layout (an upgrade): every map is derived
            // from the leases and the config, so a new one is made and
            // filled before the programs that read it are swapped in; the
            // running programs keep the old one until then. Only counters
            // start again from zero.
            if let Err(e) = check_map(spec, &info, &path) {
                log::warn!("{e:#}: replacing it with this version's map");
                fs::remove_file(&path)
                    .with_context(|| format!("removing the old map pin {}", path.display()))?;
                replaced = true;
            }
        }
    }
    let mut loader = EbpfLoader::new();
    // aya-log's level is a read-only global: below debug the verifier prunes
    // every diagnostic, so the per-packet paths pay nothing for them.
    let ebpf_level = log_level as usize as u8;
    loader.override_global("AYA_LOG_LEVEL", &ebpf_level, false);
    // A pinned program keeps the level it was loaded with: swap it when asked for debug.
    // Programs that read a replaced map must be swapped even when their tag
    // (which ignores the maps) is unchanged.
    let force = log_level >= log::LevelFilter::Debug || replaced;
    for spec in MAPS {
        loader.map_pin_path(spec.name, root.join(spec.file));
    }
    let mut ebpf = loader
        .load(object)
        .context("loading the flannel-ebpf object into the kernel")?;

    // Config first: programs pass everything until it says ready.
    {
        let map = ebpf
            .map_mut(MAP_CONFIG)
            .context("object has no CONFIG map")?;
        let fd = crate::ebpf::bpf_sys::fd_of(map).context("CONFIG is not an array map")?;
        crate::ebpf::bpf_sys::update(fd, &0u32, &config).context("writing the node config map")?;
    }
    Ok(Loaded {
        ebpf,
        root: root.to_path_buf(),
        force,
        fresh,
    })
}

impl Loaded {
    /// Make sure the pinned links run this build's programs — adopting them
    /// when they already do, swapping the program inside the link when they
    /// do not, attaching and pinning them when there are none. A failed
    /// attach on a fresh pin root leaves nothing behind (an encap
    /// link attached before the decap failed is detached again).
    /// `vtep_if` None: an IPv6-only node, without flannel.1 (an encap link
    /// left by an earlier dual-stack run is detached).
    pub fn attach(
        mut self,
        vtep_if: Option<&str>,
        underlay_if: &str,
        hook: DecapHook,
    ) -> anyhow::Result<(Attached, PodHook)> {
        let res = self.attach_links(vtep_if, underlay_if, hook);
        if res.is_err()
            && self.fresh
            && let Err(e) = uninstall(&self.root)
        {
            log::warn!(
                "cleaning up {} after the failed attach: {e:#}",
                self.root.display()
            );
        }
        let attached = res?;
        Ok((
            attached,
            PodHook {
                ebpf: self.ebpf,
                root: self.root,
                force: self.force,
                on: None,
            },
        ))
    }

    /// Have the kernel verify the programs `attach` will use, ahead of it:
    /// a program the verifier refuses stops the agent before any table is
    /// written, and the attach after the first pass only links.
    pub fn verify(&mut self, hook: DecapHook) -> anyhow::Result<()> {
        let res = self.verify_programs(hook);
        if res.is_err()
            && self.fresh
            && let Err(e) = uninstall(&self.root)
        {
            log::warn!(
                "cleaning up {} after the failed verification: {e:#}",
                self.root.display()
            );
        }
        res
    }

    fn verify_programs(&mut self, hook: DecapHook) -> anyhow::Result<()> {
        let tc = |ebpf: &mut aya::Ebpf, name: &str| -> anyhow::Result<()> {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("object has no {name} program"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifying the {name} (TC) program"))?;
            Ok(())
        };
        // (flannel_encap6 is verified when a dual-stack node attaches it.)
        tc(&mut self.ebpf, PROG_ENCAP)?;
        tc(&mut self.ebpf, PROG_POD_EGRESS)?;
        match hook {
            DecapHook::Tc => tc(&mut self.ebpf, PROG_DECAP_TC),
            DecapHook::Xdp => {
                let prog: &mut Xdp = self
                    .ebpf
                    .program_mut(PROG_DECAP)
                    .context("object has no decap program")?
                    .try_into()?;
                prog.load().context("verifying the decap (XDP) program")?;
                Ok(())
            }
        }
    }

    fn attach_links(
        &mut self,
        vtep_if: Option<&str>,
        underlay_if: &str,
        hook: DecapHook,
    ) -> anyhow::Result<Attached> {
        let (root, force) = (self.root.as_path(), self.force);
        let ebpf = &mut self.ebpf;
        let encap_link = root.join(LINK_ENCAP);
        let encap_state = match vtep_if {
            Some(vtep_if) => Some(attach_tc(
                ebpf,
                PROG_ENCAP,
                &encap_link,
                vtep_if,
                TcAttachType::Egress,
                force,
            )?),
            None => {
                if encap_link.exists() {
                    fs::remove_file(&encap_link)
                        .with_context(|| format!("removing {}", encap_link.display()))?;
                    log::info!("IPv6-only: detached the IPv4 encap program ({LINK_ENCAP})");
                }
                None
            }
        };
        let (decap_state, decap) = match hook {
            DecapHook::Tc => {
                let state = attach_tc(
                    ebpf,
                    PROG_DECAP_TC,
                    &root.join(LINK_DECAP_TC),
                    underlay_if,
                    TcAttachType::Ingress,
                    force,
                )?;
                (
                    state,
                    format!("{PROG_DECAP_TC} on {underlay_if} ingress (TCX)"),
                )
            }
            DecapHook::Xdp => (
                attach_xdp(ebpf, &root.join(LINK_DECAP), underlay_if, force)?,
                format!("{PROG_DECAP} on {underlay_if} (XDP)"),
            ),
        };
        // The other hook's link, from a run with another --decap: detached
        // only now, so one of the two decapsulated all along.
        let other = root.join(match hook {
            DecapHook::Tc => LINK_DECAP,
            DecapHook::Xdp => LINK_DECAP_TC,
        });
        if other.exists() {
            fs::remove_file(&other).with_context(|| format!("removing {}", other.display()))?;
            log::info!("detached the decap program of {}", other.display());
        }
        let logged_link = match vtep_if {
            Some(_) => encap_link,
            None => root.join(match hook {
                DecapHook::Tc => LINK_DECAP_TC,
                DecapHook::Xdp => LINK_DECAP,
            }),
        };
        let encap_prog_id = FdLink::from(PinnedLink::from_pin(&logged_link)?)
            .info()?
            .program_id();
        Ok(Attached {
            encap_prog_id,
            encap: match (vtep_if, encap_state) {
                (Some(v), Some(state)) => format!("{PROG_ENCAP} on {v} egress (TCX), {state}"),
                _ => format!("no {PROG_ENCAP}: no IPv4 VTEP (IPv6-only)"),
            },
            decap: format!("{decap}, {decap_state}"),
        })
    }
}

/// The direct path's program on the pod bridge, which the CNI plugin
/// creates with the first pod: attached whenever the bridge is there.
pub struct PodHook {
    ebpf: aya::Ebpf,
    root: PathBuf,
    force: bool,
    /// The bridge's interface index the program was last attached on.
    on: Option<u32>,
}

impl PodHook {
    /// Make sure the program runs on `bridge`'s TC ingress. Ok(Some(index))
    /// once attached (a message says what was done the first time), Ok(None)
    /// while the bridge does not exist.
    pub fn ensure(&mut self, bridge: &str) -> anyhow::Result<Option<u32>> {
        let Ok(index) = ifindex(bridge) else {
            self.on = None;
            return Ok(None);
        };
        if self.on == Some(index) {
            return Ok(Some(index));
        }
        let state = attach_tc(
            &mut self.ebpf,
            PROG_POD_EGRESS,
            &self.root.join(LINK_POD_EGRESS),
            bridge,
            TcAttachType::Ingress,
            self.force,
        )?;
        log::info!(
            "attached {PROG_POD_EGRESS} on {bridge} ingress (TCX), {state}: the direct path"
        );
        self.on = Some(index);
        Ok(Some(index))
    }

    /// Dual-stack: the IPv6 encap program on `vtep6`'s egress (flannel-v6);
    /// None: IPv6 is off, and a link left by a dual-stack run is removed.
    pub fn ensure_encap6(&mut self, vtep6: Option<&str>) -> anyhow::Result<()> {
        let pin = self.root.join(LINK_ENCAP6);
        let Some(dev) = vtep6 else {
            if pin.exists() {
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
                log::info!("IPv6 off: detached {PROG_ENCAP6}");
            }
            return Ok(());
        };
        let state = attach_tc(
            &mut self.ebpf,
            PROG_ENCAP6,
            &pin,
            dev,
            TcAttachType::Egress,
            self.force,
        )?;
        log::info!("attached {PROG_ENCAP6} on {dev} egress (TCX), {state}");
        Ok(())
    }

    /// The bridge's index the program was last attached on (None: not attached).
    pub fn attached_on(&self) -> Option<u32> {
        self.on
    }
}

/// The pod bridge the pinned direct path runs on, when it still does
/// (its link pinned and attached to `bridge` as the pinned config says): a
/// restart carries it over so the direct path never pauses.
pub fn running_bridge(root: &Path, bridge: &str) -> Option<u32> {
    let pinned = crate::ebpf::tables::Tables::open(root)
        .ok()?
        .node_config()
        .ok()?;
    let link = root.join(LINK_POD_EGRESS);
    let on = crate::ebpf::bpf_sys::pinned_link_ifindex(&link).ok()?;
    (pinned.bridge_ifindex != 0 && on == pinned.bridge_ifindex && ifindex(bridge).ok() == Some(on))
        .then_some(on)
}

/// Detach the direct path's program, if pinned; whether it was.
pub fn remove_pod_link(root: &Path) -> anyhow::Result<bool> {
    let p = root.join(LINK_POD_EGRESS);
    if !p.exists() {
        return Ok(false);
    }
    fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    Ok(true)
}

/// Load TC program `name` and make the link pinned at `pin` run it on
/// `ifname` (TCX; a clsact qdisc before 6.6).
fn attach_tc(
    ebpf: &mut aya::Ebpf,
    name: &str,
    pin: &Path,
    ifname: &str,
    at: TcAttachType,
    force: bool,
) -> anyhow::Result<&'static str> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .with_context(|| format!("object has no {name} program"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("verifying the {name} (TC) program"))?;
    }
    ensure_link(
        pin,
        ifname,
        prog.info()?.tag(),
        force,
        |existing| match existing {
            // The pin keeps naming the same link; only its program changes.
            Some(link) => {
                prog.attach_to_link(SchedClassifierLink::try_from(link)?)?;
                Ok(())
            }
            None => {
                if !has_tcx() {
                    // Before TCX (6.6) the program hangs off a clsact qdisc; an existing one is fine.
                    let _ = aya::programs::tc::qdisc_add_clsact(ifname);
                }
                let id = prog.attach(ifname, at).with_context(|| {
                    format!("attaching the {name} program to {ifname} ({at:?})")
                })?;
                let link: FdLink = prog.take_link(id)?.try_into()?;
                link.pin(pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
                Ok(())
            }
        },
    )
}

/// Load the XDP decap program and make the link pinned at `pin` run it on `ifname`.
fn attach_xdp(
    ebpf: &mut aya::Ebpf,
    pin: &Path,
    ifname: &str,
    force: bool,
) -> anyhow::Result<&'static str> {
    let prog: &mut Xdp = ebpf
        .program_mut(PROG_DECAP)
        .context("object has no decap program")?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load().context("verifying the decap (XDP) program")?;
    }
    ensure_link(
        pin,
        ifname,
        prog.info()?.tag(),
        force,
        |existing| match existing {
            Some(link) => {
                prog.attach_to_link(XdpLink::try_from(link)?)?;
                Ok(())
            }
            None => {
                let id = prog
                    .attach(ifname, XdpMode::Default)
                    .with_context(|| format!("attaching the decap program (XDP) to {ifname}"))?;
                let link: FdLink = prog.take_link(id)?.try_into()?;
                link.pin(pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
                Ok(())
            }
        },
    )
}

/// An interface's index in this network namespace.
fn ifindex(ifname: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(ifname).with_context(|| format!("interface name {ifname:?}"))?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
    }
    Ok(i)
}

fn has_tcx() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// Keep a pinned link on `ifname` whose program has `tag`; otherwise call
/// `attach` with the existing link (to swap its program) or None (to attach
/// anew). A pinned link on another or a vanished interface (flannel.1
/// deleted or re-created since) is dropped and attached anew.
fn ensure_link(
    path: &Path,
    ifname: &str,
    tag: u64,
    force: bool,
    attach: impl FnOnce(Option<FdLink>) -> anyhow::Result<()>,
) -> anyhow::Result<&'static str> {
    if path.exists() {
        let pinned = PinnedLink::from_pin(path)
            .with_context(|| format!("opening pinned link {}", path.display()))?;
        let link: FdLink = pinned.into();
        let want = ifindex(ifname)?;
        let on = crate::ebpf::bpf_sys::pinned_link_ifindex(path)
            .with_context(|| format!("reading where {} is attached", path.display()))?;
        if on != want {
            log::warn!(
                "pinned link {} is attached to interface index {on} ({}), not to {ifname} (index {want}): attaching anew",
                path.display(),
                if on == 0 { "gone" } else { "another interface" }
            );
            drop(link);
            fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
            attach(None)?;
            return Ok("attached anew (the pinned link's interface had changed)");
        }
        let prog_id = link.info().context("reading link info")?.program_id();
        let current = loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == prog_id)
            .map(|p| p.tag());
        if current == Some(tag) && !force {
            return Ok("adopted from the pin");
        }
        log::info!(
            "pinned link {} runs program tag {:?}, this build is {tag:016x}: replacing the program in place",
            path.display(),
            current.map(|t| format!("{t:016x}"))
        );
        attach(Some(link))?;
        return Ok("program replaced in the pinned link");
    }
    attach(None)?;
    Ok("attached and pinned")
}

/// Remove every pinned object: links first (detaching the programs), then maps.
pub fn uninstall(root: &Path) -> anyhow::Result<()> {
    // The direct path first: its packets would otherwise meet a detached decap.
    for f in [
        LINK_POD_EGRESS,
        LINK_ENCAP6,
        LINK_ENCAP,
        LINK_DECAP,
        LINK_DECAP_TC,
    ] {
        let p = root.join(f);
        if p.exists() {
            // Detached now, not when the kernel frees the unpinned link;
            // if it refuses, removing the pin still detaches, only later.
            if let Err(e) = crate::ebpf::bpf_sys::detach_pinned_link(&p) {
                log::warn!("detaching {}: {e}; removing the pin", p.display());
            }
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    for spec in MAPS {
        let p = root.join(spec.file);
        if p.exists() {
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    if root.exists() {
        fs::remove_dir(root).with_context(|| format!("removing {}", root.display()))?;
    }
    Ok(())
}
