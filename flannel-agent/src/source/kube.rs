//! `--subnet-mgr kube`: leases as flanneld's Kubernetes subnet manager keeps
//! them — our subnet is `node.spec.podCIDR`, every node announces its VTEP in
//! `flannel.alpha.coreos.com/*` annotations written through `nodes/status`.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::{self, Event},
};

use super::{Snapshot, Want};
use crate::{
    lease::mac::Mac,
    lease::netconf::NetConf,
    lease::subnet::Subnet,
    lease::subnet6::Subnet6,
    lease::{Lease, LeaseBackend},
};

const PREFIX: &str = "flannel.alpha.coreos.com/";
pub const BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
pub const NODE_PUBLIC_IP: &str = "flannel.alpha.coreos.com/node-public-ip";
pub const BACKEND_V6_DATA: &str = "flannel.alpha.coreos.com/backend-v6-data";
pub const PUBLIC_IPV6: &str = "flannel.alpha.coreos.com/public-ipv6";
pub const PUBLIC_IPV6_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ipv6-overwrite";
pub const KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

#[derive(Clone, Debug)]
pub struct KubeOptions {
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
    pub net_config_path: PathBuf,
}

#[derive(Default)]
struct WatchState {
    /// Lease per node name.
    by_node: BTreeMap<String, Lease>,
    /// Nodes seen during a (re-)list, replacing `by_node` when it completes.
    relist: Option<BTreeMap<String, Lease>>,
    /// The first list has completed: until then the snapshot says nothing.
    listed: bool,
    /// The watch's last error, until it works again.
    error: Option<String>,
    dirty: bool,
    reported: super::Reported,
    /// EnableIPv4 false: nodes are read as flanneld's nodeToLease reads
    /// them then, by their IPv6 half alone.
    v6_only: bool,
}

pub struct KubeSource {
    nodes: Api<Node>,
    /// The same API without the client's own retries: the watch has its
    /// backoff, and an API server answering 503 must show as degraded, not
    /// vanish into minutes of silent retrying.
    watch_nodes: Api<Node>,
    opts: KubeOptions,
    state: Arc<Mutex<WatchState>>,
    watching: bool,
}

/// The subnet in `spec.podCIDR`, or the first IPv4 one in `spec.podCIDRs`.
fn pod_cidr(node: &Node) -> anyhow::Result<Subnet> {
    let spec = node.spec.as_ref();
    let cidrs: Vec<String> = spec
        .and_then(|s| s.pod_cidr.clone())
        .into_iter()
        .chain(spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default())
        .collect();
    let first = cidrs
        .iter()
        .find(|c| c.parse::<Subnet>().is_ok())
        .context("pod cidr not assigned")?;
    first.parse().with_context(|| format!("podCIDR {first:?}"))
}

/// The IPv6 subnet in `spec.podCIDRs` (or `spec.podCIDR`), if the node has one.
fn pod_cidr6(node: &Node) -> Option<Subnet6> {
    let spec = node.spec.as_ref();
    spec.and_then(|s| s.pod_cidr.clone())
        .into_iter()
        .chain(spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default())
        .find_map(|c| c.parse::<Subnet6>().ok())
}

fn json_annotation(node: &Node, key: &str) -> anyhow::Result<Option<serde_json::Value>> {
    annotation(node, key)
        .map(|d| serde_json::from_str(d).with_context(|| format!("{key} {d:?} is not JSON")))
        .transpose()
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// A peer's lease from its Node; Ok(None) for nodes flanneld would ignore
/// (not managed by a kube subnet manager, or of a backend we do not speak).
pub fn node_lease(node: &Node) -> anyhow::Result<Option<Lease>> {
    if annotation(node, KUBE_SUBNET_MANAGER) != Some("true") {
        return Ok(None);
    }
    let Some(backend_type) = annotation(node, BACKEND_TYPE).filter(|t| Lease::speaks(t)) else {
        return Ok(None);
    };
    let ip6 = annotation(node, PUBLIC_IPV6_OVERWRITE).or(annotation(node, PUBLIC_IPV6));
    let Ok(subnet) = pod_cidr(node) else {
        // An IPv6-only node (EnableIPv4 false): only an IPv6 podCIDR, and
        // no public-ip or backend-data, as flanneld announces it.
        if let Some(s6) = pod_cidr6(node) {
            return Lease::v6_only(
                s6,
                backend_type,
                ip6,
                json_annotation(node, BACKEND_V6_DATA)?,
            );
        }
        return pod_cidr(node).map(|_| None);
    };
    let data = json_annotation(node, BACKEND_DATA)?;
    // Peers use the overwrite when a node has one, as flanneld does.
    let ip = annotation(node, PUBLIC_IP_OVERWRITE)
        .or(annotation(node, PUBLIC_IP))
        .context("public-ip annotation missing")?;
    // The same rule as a lease in etcd or a file.
    let Some(lease) = Lease::from_parts(subnet, backend_type, ip, data)? else {
        return Ok(None);
    };
    // Dual-stack: an IPv6 podCIDR announced with a public-ipv6.
    match (pod_cidr6(node), ip6) {
        (Some(s6), Some(ip6)) => lease
            .with_v6(s6, Some(ip6), json_annotation(node, BACKEND_V6_DATA)?)
            .map(Some),
        _ => Ok(Some(lease)),
    }
}

/// A peer's lease in an IPv6-only cluster: its IPv6 podCIDR, public-ipv6
/// (or its overwrite) and backend-v6-data, whatever IPv4 it also has.
pub fn node_lease_v6_only(node: &Node) -> anyhow::Result<Option<Lease>> {
    if annotation(node, KUBE_SUBNET_MANAGER) != Some("true") {
        return Ok(None);
    }
    let Some(backend_type) = annotation(node, BACKEND_TYPE).filter(|t| Lease::speaks(t)) else {
        return Ok(None);
    };
    let s6 = pod_cidr6(node).context("no IPv6 podCIDR")?;
    let ip6 = annotation(node, PUBLIC_IPV6_OVERWRITE).or(annotation(node, PUBLIC_IPV6));
    Lease::v6_only(
        s6,
        backend_type,
        ip6,
        json_annotation(node, BACKEND_V6_DATA)?,
    )
}

/// RFC 3339 UTC, seconds precision, for condition timestamps.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl KubeSource {
    pub async fn connect(opts: KubeOptions) -> anyhow::Result<KubeSource> {
        if opts.node_name.is_empty() {
            bail!("--subnet-mgr kube needs the node name: --node-name or NODE_NAME");
        }
        let config = match &opts.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .with_context(|| format!("reading kubeconfig {}", path.display()))?;
                Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .with_context(|| format!("kubeconfig {}", path.display()))?
            }
            None => Config::incluster().context(
                "no --kubeconfig given and not running in a pod (in-cluster config unavailable)",
            )?,
        };
        let mut watch_config = config.clone();
        watch_config.default_retry = false;
        let client = Client::try_from(config).context("building the Kubernetes client")?;
        let watch_client =
            Client::try_from(watch_config).context("building the Kubernetes client")?;
        Ok(KubeSource {
            nodes: Api::all(client),
            watch_nodes: Api::all(watch_client),
            opts,
            state: Arc::new(Mutex::new(WatchState::default())),
            watching: false,
        })
    }

    async fn own_node(&self) -> anyhow::Result<Node> {
        self.nodes
            .get(&self.opts.node_name)
            .await
            .with_context(|| format!("reading node {}", self.opts.node_name))
    }

    pub async fn config(&mut self) -> anyhow::Result<NetConf> {
        let p = &self.opts.net_config_path;
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("reading net-conf.json from {}", p.display()))?;
        let conf = NetConf::parse(&text).with_context(|| format!("{}", p.display()))?;
        if let Ok(mut s) = self.state.lock() {
            s.v6_only = !conf.ipv4;
        }
        Ok(conf)
    }

    /// `node-public-ip` on our node: the address to use as our public IP.
    pub async fn public_ip_hint(&mut self) -> anyhow::Result<Option<Ipv4Addr>> {
        let node = self.own_node().await?;
        annotation(&node, NODE_PUBLIC_IP)
            .map(|s| {
                s.parse()
                    .with_context(|| format!("{NODE_PUBLIC_IP} {s:?} is not an IPv4 address"))
            })
            .transpose()
    }

    /// Our previous announcement, to keep the VtepMAC across restarts.
    pub async fn lease_of(&mut self, public_ip: Ipv4Addr) -> anyhow::Result<Option<Lease>> {
        let node = self.own_node().await?;
        let Some(data) = annotation(&node, BACKEND_DATA) else {
            return Ok(None);
        };
        let Ok(data) = serde_json::from_str::<crate::lease::VxlanBackendData>(data) else {
            return Ok(None);
        };
        let (Ok(vtep_mac), Ok(subnet)) = (data.vtep_mac.parse::<Mac>(), pod_cidr(&node)) else {
            return Ok(None);
        };
        let v6 = pod_cidr6(&node).and_then(|s6| {
            let data: crate::lease::VxlanBackendData =
                serde_json::from_str(annotation(&node, BACKEND_V6_DATA)?).ok()?;
            Some(crate::lease::LeaseV6 {
                subnet: s6,
                public_ip: annotation(&node, PUBLIC_IPV6)?.parse().ok()?,
                vtep_mac: data.vtep_mac.parse().ok(),
            })
        });
        Ok(Some(Lease {
            subnet,
            public_ip,
            backend: LeaseBackend::Vxlan { vtep_mac },
            v6,
        }))
    }

    /// Our subnet is the node's podCIDR; announce our VTEP on the node as
    /// flanneld does, through a patch of `nodes/status`.
    pub async fn acquire(&mut self, conf: &NetConf, want: &Want) -> anyhow::Result<Lease> {
        let (public_ip, backend) = (want.public_ip, want.backend);
        let node = self.own_node().await?;
        if !conf.ipv4 {
            return self.acquire_v6_only(conf, want, &node).await;
        }
        let subnet = pod_cidr(&node).with_context(|| format!("node {}", self.opts.node_name))?;
        if !conf.network.contains_subnet(&subnet) {
            bail!(
                "node {} has podCIDR {subnet}, outside the Network {}",
                self.opts.node_name,
                conf.network
            );
        }
        let announced = annotation(&node, PUBLIC_IP_OVERWRITE)
            .map(str::to_string)
            .unwrap_or_else(|| public_ip.to_string());
        // The exact shape stock flanneld writes and re-parses; host-gw's
        // empty BackendData is written as "null", as flanneld does.
        let backend_data = match backend {
            LeaseBackend::Vxlan { vtep_mac } => {
                format!(r#"{{"VNI":{},"VtepMAC":"{vtep_mac}"}}"#, conf.backend.vni)
            }
            LeaseBackend::HostGw => "null".to_string(),
        };
        let mut annotations = serde_json::json!({
            BACKEND_TYPE: backend.type_name(),
            BACKEND_DATA: backend_data,
            PUBLIC_IP: announced,
            KUBE_SUBNET_MANAGER: "true",
        });
        let v6 = self.announce_v6(conf, want, &node, &mut annotations)?;
        let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
        self.patch_own_status(&patch)
            .await
            .with_context(|| format!("annotating node {} ({PREFIX}*)", self.opts.node_name))?;
        log::info!(
            "node {}: podCIDR {subnet}{}, announced {backend} and public IP {announced}",
            self.opts.node_name,
            v6.map(|v| format!(" and {} (PublicIPv6 {})", v.subnet, v.public_ip))
                .unwrap_or_default()
        );
        Ok(Lease {
            subnet,
            public_ip,
            backend,
            v6,
        })
    }

    /// IPv6-only (EnableIPv4 false): the node's IPv6 podCIDR is our lease;
    /// flanneld announces no public-ip or backend-data then.
    async fn acquire_v6_only(
        &mut self,
        conf: &NetConf,
        want: &Want,
        node: &Node,
    ) -> anyhow::Result<Lease> {
        let mut annotations = serde_json::json!({
            BACKEND_TYPE: want.backend.type_name(),
            KUBE_SUBNET_MANAGER: "true",
        });
        let v6 = self
            .announce_v6(conf, want, node, &mut annotations)?
            .context("EnableIPv4 is false: IPv6-only needs EnableIPv6 and --public-ipv6")?;
        let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
        self.patch_own_status(&patch)
            .await
            .with_context(|| format!("annotating node {} ({PREFIX}*)", self.opts.node_name))?;
        log::info!(
            "node {}: IPv6 podCIDR {}, announced {} and public IPv6 {} (IPv6-only)",
            self.opts.node_name,
            v6.subnet,
            want.backend,
            v6.public_ip
        );
        Ok(Lease {
            subnet: Subnet::NONE,
            public_ip: Ipv4Addr::UNSPECIFIED,
            backend: want.backend,
            v6: Some(v6),
        })
    }

    /// The IPv6 half: the node's IPv6 podCIDR, announced as flanneld does
    /// (public-ipv6, backend-v6-data) into `annotations`.
    fn announce_v6(
        &self,
        conf: &NetConf,
        want: &Want,
        node: &Node,
        annotations: &mut serde_json::Value,
    ) -> anyhow::Result<Option<crate::lease::LeaseV6>> {
        Ok(match (&conf.ipv6, want.v6) {
            (Some(c6), Some((ip6, mac6))) => {
                let s6 = pod_cidr6(node).with_context(|| {
                    format!(
                        "node {} has no IPv6 podCIDR while EnableIPv6 is true",
                        self.opts.node_name
                    )
                })?;
                if !c6.network.contains_subnet(&s6) {
                    bail!(
                        "node {} has IPv6 podCIDR {s6}, outside the IPv6Network {}",
                        self.opts.node_name,
                        c6.network
                    );
                }
                let announced6 = annotation(node, PUBLIC_IPV6_OVERWRITE)
                    .map(str::to_string)
                    .unwrap_or_else(|| ip6.to_string());
                let data6 = match mac6 {
                    Some(m) => format!(r#"{{"VNI":{},"VtepMAC":"{m}"}}"#, conf.backend.vni),
                    None => "null".to_string(),
                };
                annotations[PUBLIC_IPV6] = announced6.into();
                annotations[BACKEND_V6_DATA] = data6.into();
                Some(crate::lease::LeaseV6 {
                    subnet: s6,
                    public_ip: ip6,
                    vtep_mac: mac6,
                })
            }
            _ => None,
        })
    }

    /// A strategic-merge patch of our own Node through `nodes/status`, the
    /// one subresource flanneld's RBAC lets it write.
    async fn patch_own_status(&self, patch: &serde_json::Value) -> kube::Result<Node> {
        self.nodes
            .patch_status(
                &self.opts.node_name,
                &PatchParams::default(),
                &Patch::Strategic(patch),
            )
            .await
    }

    /// NetworkUnavailable=False, once our tables are in place (as flanneld).
    pub async fn set_network_available(&mut self) -> anyhow::Result<()> {
        let now = now_rfc3339();
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        self.patch_own_status(&patch).await.with_context(|| {
            format!(
                "setting NetworkUnavailable=False on {}",
                self.opts.node_name
            )
        })?;
        Ok(())
    }

    fn start_watch(&mut self) {
        if self.watching {
            return;
        }
        self.watching = true;
        let api = self.watch_nodes.clone();
        let state = self.state.clone();
        tokio::spawn(async move {
            // The watcher lists, watches, re-watches when a watch ends and
            // re-lists on 410 Gone; it retries errors with backoff.
            let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
            let mut backoff = std::time::Duration::from_millis(200);
            loop {
                // A watch resumed after an outage yields nothing until a node
                // changes: while degraded, a one-item list every second says
                // whether the API server answers again.
                let degraded = state.lock().map(|s| s.error.is_some()).unwrap_or(false);
                let next = if degraded {
                    tokio::select! {
                        next = stream.next() => next,
                        back = api_answers(&api) => {
                            if back && let Ok(mut s) = state.lock() {
                                log::info!("kube: the API server answers again");
                                s.error = None;
                            }
                            continue;
                        }
                    }
                } else {
                    stream.next().await
                };
                match next {
                    Some(Ok(ev)) => {
                        backoff = std::time::Duration::from_millis(200);
                        let changed = state.lock().is_ok_and(|mut s| {
                            s.error = None;
                            s.handle(ev);
                            s.dirty
                        });
                        if changed {
                            super::wake();
                        }
                    }
                    Some(Err(e)) => {
                        log::warn!("kube: watching nodes: {e}; retrying in {backoff:?}");
                        if let Ok(mut s) = state.lock() {
                            s.error = Some(format!("kube: watching nodes: {e}"));
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    }
                    None => break,
                }
            }
        });
    }

    pub async fn changed(&mut self) -> anyhow::Result<bool> {
        self.start_watch();
        Ok(self.state.lock().map(|s| s.dirty).unwrap_or(true))
    }

    pub fn degraded(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.error.clone())
    }

    /// The nodes' leases; None until the first list has completed.
    pub async fn snapshot(&mut self) -> anyhow::Result<Option<Snapshot>> {
        self.start_watch();
        let mut s = self
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("kube watch state poisoned"))?;
        if !s.listed {
            return Ok(None);
        }
        s.dirty = false;
        Ok(Some(Snapshot {
            leases: s.by_node.values().map(|l| (l.key(), *l)).collect(),
        }))
    }
}

/// Whether the API server lists nodes again, asked after a pause.
async fn api_answers(api: &Api<Node>) -> bool {
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    api.list(&kube::api::ListParams::default().limit(1))
        .await
        .is_ok()
}

impl WatchState {
    fn lease(&mut self, node: &Node) -> Option<(String, Lease)> {
        let name = node.metadata.name.clone()?;
        let lease = if self.v6_only {
            node_lease_v6_only(node)
        } else {
            node_lease(node)
        };
        match lease {
            Ok(Some(l)) => {
                self.reported.clear(&name);
                Some((name, l))
            }
            Ok(None) => None,
            Err(e) => {
                let why = format!("{e:#}");
                if self.reported.report(&name, &why) {
                    log::warn!("skipping node {name}: {why}");
                }
                None
            }
        }
    }

    fn handle(&mut self, ev: Event<Node>) {
        match ev {
            Event::Init => self.relist = Some(BTreeMap::new()),
            Event::InitApply(node) => {
                if let Some((name, l)) = self.lease(&node) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(name, l);
                }
            }
            Event::InitDone => {
                // A (re-)list is complete: nodes that vanished meanwhile go.
                self.by_node = self.relist.take().unwrap_or_default();
                self.listed = true;
                self.dirty = true;
            }
            Event::Apply(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                // Status heartbeats change no lease: no pass for them.
                let changed = match self.lease(&node) {
                    Some((name, l)) => self.by_node.insert(name, l) != Some(l),
                    None => self.by_node.remove(&name).is_some(),
                };
                self.dirty |= changed;
            }
            Event::Delete(node) => {
                if let Some(name) = node.metadata.name.as_ref() {
                    self.by_node.remove(name);
                    self.reported.clear(name);
                }
                self.dirty = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(annotations: &[(&str, &str)], pod_cidr: Option<&str>) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "n",
                "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            },
            "spec": {"podCIDR": pod_cidr},
        }))
        .unwrap()
    }

    const GOOD: &[(&str, &str)] = &[
        (KUBE_SUBNET_MANAGER, "true"),
        (BACKEND_TYPE, "vxlan"),
        (BACKEND_DATA, r#"{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"}"#),
        (PUBLIC_IP, "172.18.0.3"),
    ];

    #[test]
    fn node_annotations_make_a_lease() {
        let l = node_lease(&node(GOOD, Some("10.244.1.0/24")))
            .unwrap()
            .unwrap();
        assert_eq!(l.subnet.to_string(), "10.244.1.0/24");
        assert_eq!(l.public_ip, Ipv4Addr::new(172, 18, 0, 3));
        assert_eq!(
            l.backend.vtep_mac().map(|m| m.to_string()).as_deref(),
            Some("e6:7c:02:8e:e8:7e")
        );
        let mut over = GOOD.to_vec();
        over.push((PUBLIC_IP_OVERWRITE, "203.0.113.9"));
        let l = node_lease(&node(&over, Some("10.244.1.0/24")))
            .unwrap()
            .unwrap();
        assert_eq!(l.public_ip, Ipv4Addr::new(203, 0, 113, 9));
    }

    #[test]
    fn an_ipv6_only_node_makes_an_ipv6_only_lease() {
        // flanneld with EnableIPv4 false announces no public-ip or backend-data.
        let n = node(
            &[
                (KUBE_SUBNET_MANAGER, "true"),
                (BACKEND_TYPE, "vxlan"),
                (
                    BACKEND_V6_DATA,
                    r#"{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:5f"}"#,
                ),
                (PUBLIC_IPV6, "fc00::13"),
            ],
            Some("fd00:10:244:3::/64"),
        );
        let l = node_lease(&n).unwrap().unwrap();
        assert!(!l.has_v4());
        assert_eq!(l.key(), "0.0.0.0-0&fd00:10:244:3::-64");
        assert_eq!(l.v6.unwrap().public_ip.to_string(), "fc00::13");
        // In an IPv6-only cluster a node with both podCIDRs is read by its
        // IPv6 half (flanneld: nodeToLease without EnableIPv4).
        let mut both = n.clone();
        if let Some(spec) = both.spec.as_mut() {
            spec.pod_cidrs = Some(vec!["10.244.3.0/24".into(), "fd00:10:244:3::/64".into()]);
            spec.pod_cidr = Some("10.244.3.0/24".into());
        }
        assert!(
            node_lease(&both).is_err(),
            "no public-ip: not an IPv4 lease"
        );
        let l6 = node_lease_v6_only(&both).unwrap().unwrap();
        assert_eq!(l6, l);
        // Without its public-ipv6 it is unusable, and says so.
        let bare = node(
            &[(KUBE_SUBNET_MANAGER, "true"), (BACKEND_TYPE, "vxlan")],
            Some("fd00:10:244:3::/64"),
        );
        let err = format!("{:#}", node_lease(&bare).unwrap_err());
        assert!(err.contains("PublicIPv6"), "{err}");
    }

    #[test]
    fn nodes_flanneld_ignores_or_cannot_parse() {
        assert!(
            node_lease(&node(&GOOD[1..], Some("10.244.1.0/24")))
                .unwrap()
                .is_none()
        );
        let mut udp = GOOD.to_vec();
        udp[1] = (BACKEND_TYPE, "udp");
        assert!(
            node_lease(&node(&udp, Some("10.244.1.0/24")))
                .unwrap()
                .is_none()
        );
        // host-gw nodes carry backend-data "null": a lease without a VtepMAC.
        let hostgw = [
            (KUBE_SUBNET_MANAGER, "true"),
            (BACKEND_TYPE, "host-gw"),
            (BACKEND_DATA, "null"),
            (PUBLIC_IP, "172.18.0.4"),
        ];
        let l = node_lease(&node(&hostgw, Some("10.244.2.0/24")))
            .unwrap()
            .unwrap();
        assert_eq!(l.backend, LeaseBackend::HostGw);
        let mut bad = GOOD.to_vec();
        bad[2] = (BACKEND_DATA, "{VNI:1}");
        assert!(
            format!(
                "{:#}",
                node_lease(&node(&bad, Some("10.244.1.0/24"))).unwrap_err()
            )
            .contains("backend-data")
        );
        // The same PublicIP rule as etcd and file leases.
        let mut unspecified = GOOD.to_vec();
        unspecified.retain(|(k, _)| *k != PUBLIC_IP);
        unspecified.push((PUBLIC_IP, "0.0.0.0"));
        let err = node_lease(&node(&unspecified, Some("10.244.1.0/24"))).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot be a node address"),
            "{err:#}"
        );
        let err = node_lease(&node(GOOD, None)).unwrap_err();
        assert!(format!("{err:#}").contains("pod cidr not assigned"));
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }
}
