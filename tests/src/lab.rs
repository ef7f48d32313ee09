//! A Flannel cluster in network namespaces: nodes on an underlay (one L2
//! segment, or one subnet each behind a router as in seed 000's lab), a cni0
//! bridge and a pod per node. A node runs flannel-agent or, as stock Flannel
//! does, the kernel's VXLAN device programmed like flannel.1.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::{agent_path, netns::Netns, object_path, sh, wait_for};

pub const NETWORK: &str = "10.244.0.0/16";
/// The one kernel route of the eBPF data path on flannel.1 for [`NETWORK`].
pub const NETWORK_ROUTE: &str = "10.244.0.0/16 via 10.244.0.0 onlink";
/// The IPv6 Network of the dual-stack labs (IPv6SubnetLen 64).
pub const NETWORK6: &str = "fd00:10:244::/56";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Every node on one bridge, 10.1.5.0/24.
    Switched,
    /// Node i on its own /24 behind a router namespace (10.1.5/8/9.0/24, …).
    Routed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ebpf,
    /// Stock Flannel's data path: kernel vxlan, one route, neighbour, FDB entry per peer.
    Stock,
}

/// The outside host's IPv6 address on a switched underlay (see
/// [`Lab::outside_host`]); it has no route to the pods either.
pub const OUTSIDE_IP6: Ipv6Addr = Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0x100);

pub struct Node {
    pub name: String,
    pub kind: Kind,
    pub ns: Netns,
    pub pod: Netns,
    pub public_ip: Ipv4Addr,
    pub subnet: Option<String>,
    pub vtep_mac: Option<String>,
    /// Dual-stack labs: the underlay's IPv6 address, the IPv6 pod subnet,
    /// flannel-v6.1's MAC.
    pub public_ipv6: Option<Ipv6Addr>,
    pub subnet6: Option<String>,
    pub vtep_mac6: Option<String>,
    pub pin_root: PathBuf,
    pub subnet_file: PathBuf,
    pub log: PathBuf,
    /// Extra flags for `flannel-agent run` on this node.
    pub agent_args: Vec<String>,
    /// Extra environment for it (`FLANNELD_<NAME>` flags).
    pub agent_env: Vec<(String, String)>,
    agent: Option<Child>,
}

impl Node {
    /// A named counter of the membership guard's `family` table (ip, ip6) here.
    pub fn guard_counter(&self, family: &str, name: &str) -> u64 {
        self.ns
            .run(|| flannel_agent::node::guard::counters(family))
            .unwrap_or_default()
            .get(name)
            .map_or(0, |(packets, _)| *packets)
    }

    /// What a member `from` would send this node's pod over VXLAN on IPv6: a
    /// UDP datagram from `src` to the pod's `[pod_ip6]:port`, framed for our
    /// flannel-v6 (`pad` bytes of padding after `tag`).
    pub fn vxlan6_to_pod(
        &self,
        from: &Node,
        src: Ipv6Addr,
        port: u16,
        tag: &str,
        pad: usize,
    ) -> Vec<u8> {
        let mut payload = tag.as_bytes().to_vec();
        payload.resize(tag.len() + pad, b'.');
        let inner = crate::frames::ipv6_udp(src, self.pod_ip6(), 4000, port, &payload);
        let frame = crate::frames::eth(
            crate::frames::mac(self.vtep_mac6.as_deref().unwrap_or_default()),
            crate::frames::mac(from.vtep_mac6.as_deref().unwrap_or_default()),
            0x86dd,
            &inner,
        );
        crate::frames::vxlan(1, &frame)
    }
    /// The pod's address: `<subnet>.10`.
    pub fn pod_ip(&self) -> Ipv4Addr {
        let s = self.subnet.as_deref().unwrap_or("0.0.0.0/24");
        let base: Ipv4Addr = s
            .split('/')
            .next()
            .unwrap_or("0.0.0.0")
            .parse()
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        Ipv4Addr::from(u32::from(base) + 10)
    }

    /// The pod's IPv6 address: `<subnet6>::10`.
    pub fn pod_ip6(&self) -> Ipv6Addr {
        let base = self.subnet6_base();
        Ipv6Addr::from(u128::from(base) + 0x10)
    }

    /// The IPv6 subnet's network address (flannel-v6's VTEP address).
    pub fn subnet6_base(&self) -> Ipv6Addr {
        self.subnet6
            .as_deref()
            .and_then(|s| s.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or(Ipv6Addr::UNSPECIFIED)
    }

    pub fn subnet_base(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pod_ip()) - 10)
    }

    /// A device's counter on this node (`rx_packets` of `flannel-v6.1`, say).
    pub fn dev_stat(&self, dev: &str, stat: &str) -> u64 {
        self.ns
            .sh(&format!("cat /sys/class/net/{dev}/statistics/{stat}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {stat} for {dev} on {}", self.name))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn agent_running(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The running agent's pid (nsenter execs it in place).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }

    /// SIGKILL the agent (no clean-up at all).
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the agent and wait for it.
    pub fn stop_agent(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.agent.take() {
            // SAFETY: plain kill(2) on our child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            wait_for("the agent to exit", Duration::from_secs(10), || {
                c.try_wait().ok().flatten()
            })?;
        }
        Ok(())
    }

    /// Run `flannel-agent show …` inside this node's namespace.
    pub fn show(&self, args: &str) -> anyhow::Result<String> {
        self.ns.nsenter(&format!(
            "{} show {args} --pin-root {}",
            agent_path().display(),
            self.pin_root.display()
        ))
    }

    /// The route map as `show routes` prints it: Flannel's `ip route` view of
    /// flannel.1, one line per remote subnet (empty if nothing is pinned).
    pub fn overlay_routes(&self) -> String {
        self.show("routes").unwrap_or_default()
    }

    /// flannel.1 as the kernel holds it: (`ip -4 route`, `ip -4 neigh`).
    pub fn vtep_kernel_tables(&self) -> (String, String) {
        (
            self.ns
                .sh("ip -4 route show dev flannel.1")
                .unwrap_or_default(),
            self.ns
                .sh("ip -4 neigh show dev flannel.1")
                .unwrap_or_default(),
        )
    }

    /// Whether the kernel holds the eBPF path's constant flannel.1 tables:
    /// one route for the Network via one gateway neighbour (our VtepMAC).
    pub fn has_one_kernel_route(&self) -> bool {
        let (r, n) = self.vtep_kernel_tables();
        let mac = self
            .ns
            .sh("cat /sys/class/net/flannel.1/address")
            .unwrap_or_default();
        r.trim() == NETWORK_ROUTE
            && n.trim() == format!("10.244.0.0 lladdr {} PERMANENT", mac.trim())
    }

    /// Dump a pinned map as JSON with bpftool.
    pub fn dump_map(&self, map: &str) -> anyhow::Result<serde_json::Value> {
        let out = sh(&format!(
            "bpftool -j map dump pinned {}/{map}",
            self.pin_root.display()
        ))?;
        serde_json::from_str(&out).context("bpftool output is not JSON")
    }
}

pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub topology: Topology,
    pub fabric: Netns,
    pub nodes: Vec<Node>,
    /// A dual-stack lab: IPv6 underlay, EnableIPv6 in net-conf.json, pods with both families.
    pub ipv6: bool,
    /// False in an IPv6-only lab (EnableIPv4 false): no IPv4 on the
    /// underlay, the pods or the overlay.
    pub ipv4: bool,
}

/// Underlay subnet (third octet) of node `i` in the routed topology; seed 000 uses 5, 8, 9.
fn routed_octet(i: usize) -> u8 {
    [5u8, 8, 9, 10, 11, 12]
        .get(i)
        .copied()
        .unwrap_or(20 + i as u8)
}

impl Lab {
    /// Namespaces are named `<prefix>-…`: give every test its own prefix.
    pub fn new(prefix: &str, topology: Topology, kinds: &[Kind]) -> anyhow::Result<Lab> {
        Lab::build(prefix, topology, kinds, false, true)
    }

    /// An IPv6-only lab (EnableIPv4 false): nodes have only IPv6 underlay
    /// addresses and routes, pods only IPv6 addresses.
    pub fn new_v6_only(prefix: &str, topology: Topology, kinds: &[Kind]) -> anyhow::Result<Lab> {
        Lab::build(prefix, topology, kinds, true, false)
    }

    /// A dual-stack lab: every node also has an IPv6 underlay address and
    /// its pod an IPv6 address, net-conf.json has EnableIPv6 and [`NETWORK6`].
    pub fn new_dual(prefix: &str, topology: Topology, kinds: &[Kind]) -> anyhow::Result<Lab> {
        Lab::build(prefix, topology, kinds, true, true)
    }

    fn build(
        prefix: &str,
        topology: Topology,
        kinds: &[Kind],
        ipv6: bool,
        ipv4: bool,
    ) -> anyhow::Result<Lab> {
        let dir = std::env::temp_dir().join(format!("flannel-lab-{prefix}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("leases/subnets"))?;
        let v6 = if ipv6 {
            format!(r#","EnableIPv6":true,"IPv6Network":"{NETWORK6}""#)
        } else {
            String::new()
        };
        let config = if ipv4 {
            format!(r#"{{"Network":"{NETWORK}"{v6},"Backend":{{"Type":"vxlan"}}}}"#)
        } else {
            format!(r#"{{"EnableIPv4":false{v6},"Backend":{{"Type":"vxlan"}}}}"#)
        };
        fs::write(dir.join("leases/config"), config)?;
        let fabric = Netns::new(&format!("{prefix}-fab"))?;
        let mut lab = Lab {
            prefix: prefix.into(),
            dir,
            topology,
            fabric,
            nodes: Vec::new(),
            ipv6,
            ipv4,
        };
        match topology {
            Topology::Switched => {
                lab.fabric.sh("ip link add br0 type bridge")?;
                lab.fabric.sh("ip link set br0 up")?;
            }
            Topology::Routed => {
                lab.fabric.sh("sysctl -qw net.ipv4.ip_forward=1")?;
                if ipv6 {
                    lab.fabric.sh("sysctl -qw net.ipv6.conf.all.forwarding=1")?;
                }
            }
        }
        for (i, kind) in kinds.iter().enumerate() {
            lab.add_node(i, *kind)?;
        }
        Ok(lab)
    }

    fn add_node(&mut self, i: usize, kind: Kind) -> anyhow::Result<()> {
        let name = format!("n{}", i + 1);
        let ns = Netns::new(&format!("{}-{name}", self.prefix))?;
        let pod = Netns::new(&format!("{}-{name}-pod", self.prefix))?;
        let port = format!("p{}", i + 1);
        sh(&format!(
            "ip link add eth0 netns {} type veth peer name {port} netns {}",
            ns.name, self.fabric.name
        ))?;
        let public_ip = match self.topology {
            Topology::Switched => {
                self.fabric
                    .sh(&format!("ip link set {port} master br0 up"))?;
                let ip = Ipv4Addr::new(10, 1, 5, 11 + i as u8);
                ns.sh(&format!("ip addr add {ip}/24 dev eth0"))?;
                ns.sh("ip link set eth0 up")?;
                ip
            }
            Topology::Routed => {
                let o = routed_octet(i);
                self.fabric
                    .sh(&format!("ip addr add 10.1.{o}.1/24 dev {port}"))?;
                self.fabric.sh(&format!("ip link set {port} up"))?;
                let ip = Ipv4Addr::new(10, 1, o, 10);
                ns.sh(&format!("ip addr add {ip}/24 dev eth0"))?;
                ns.sh("ip link set eth0 up")?;
                ns.sh(&format!("ip route add default via 10.1.{o}.1 dev eth0"))?;
                ip
            }
        };
        let public_ipv6 = if self.ipv6 {
            // No duplicate address detection: addresses usable at once.
            let ip6 = match self.topology {
                Topology::Switched => {
                    let ip6 = Ipv6Addr::from(0xfc00_u128 << 112 | (0x11 + i as u128));
                    ns.sh(&format!("ip -6 addr add {ip6}/64 dev eth0 nodad"))?;
                    ip6
                }
                Topology::Routed => {
                    let o = routed_octet(i) as u128;
                    let net = 0xfc00_u128 << 112 | o << 80;
                    let gw = Ipv6Addr::from(net | 1);
                    self.fabric
                        .sh(&format!("ip -6 addr add {gw}/64 dev {port} nodad"))?;
                    let ip6 = Ipv6Addr::from(net | 0x10);
                    ns.sh(&format!("ip -6 addr add {ip6}/64 dev eth0 nodad"))?;
                    ns.sh(&format!("ip -6 route add default via {gw} dev eth0"))?;
                    ip6
                }
            };
            ns.sh("sysctl -qw net.ipv6.conf.all.forwarding=1")?;
            Some(ip6)
        } else {
            None
        };
        if !self.ipv4 {
            // IPv6-only: the node has no IPv4 address or route at all.
            ns.sh("ip -4 addr flush dev eth0")?;
        }
        ns.sh("sysctl -qw net.ipv4.ip_forward=1")?;
        ns.sh("ip link add cni0 type bridge")?;
        ns.sh("ip link set cni0 up")?;
        sh(&format!(
            "ip link add veth0 netns {} type veth peer name eth0 netns {}",
            ns.name, pod.name
        ))?;
        ns.sh("ip link set veth0 master cni0 up")?;
        pod.sh("ip link set eth0 mtu 1450 up")?;
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/flannel-test-{}-{name}", self.prefix));
        // Left over by a run that was killed: never adopt another run's tables.
        let _ = fs::remove_dir_all(&pin_root);
        let node = Node {
            subnet_file: self.dir.join(format!("{name}-subnet.env")),
            log: self.dir.join(format!("{name}-agent.log")),
            name,
            kind,
            ns,
            pod,
            public_ip,
            subnet: None,
            vtep_mac: None,
            public_ipv6,
            subnet6: None,
            vtep_mac6: None,
            pin_root,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            agent: None,
        };
        self.nodes.push(node);
        Ok(())
    }

    /// A host outside the Network on the switched underlay, 10.1.5.100, with
    /// no route to the pods (a NodePort client, a masqueraded pod's peer).
    pub fn outside_host(&self) -> anyhow::Result<(Netns, Ipv4Addr)> {
        let ext = Netns::new(&format!("{}-ext", self.prefix))?;
        sh(&format!(
            "ip link add eth0 netns {} type veth peer name px netns {}",
            ext.name, self.fabric.name
        ))?;
        self.fabric.sh("ip link set px master br0 up")?;
        ext.sh("ip addr add 10.1.5.100/24 dev eth0")?;
        ext.sh(&format!("ip -6 addr add {OUTSIDE_IP6}/64 dev eth0 nodad"))?;
        ext.sh("ip link set eth0 up")?;
        Ok((ext, Ipv4Addr::new(10, 1, 5, 100)))
    }

    pub fn lease_dir(&self) -> PathBuf {
        self.dir.join("leases")
    }

    /// Start flannel-agent on node `i` (without waiting).
    pub fn spawn_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let leases = self.lease_dir();
        let node = &mut self.nodes[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", node.ns.name))
            .arg(agent_path())
            .arg("run");
        if !node.agent_args.iter().any(|a| a == "--subnet-mgr") {
            cmd.args(["--subnet-mgr", "file", "--subnet-dir"])
                .arg(&leases);
        }
        cmd.arg("--subnet-file")
            .arg(&node.subnet_file)
            .arg("--pin-root")
            .arg(&node.pin_root)
            .arg("--bpf-object")
            .arg(object_path())
            .args(&node.agent_args)
            .envs(node.agent_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if !node.agent_args.iter().any(|a| a == "--log-level") {
            cmd.args(["--log-level", "info"]);
        }
        if self.topology == Topology::Switched {
            // The routed lab finds the underlay from the default route.
            cmd.args(["--iface", "eth0"]);
        }
        // The agent must not outlive a test that crashed or was killed.
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        node.agent = Some(cmd.spawn().context("starting flannel-agent")?);
        Ok(())
    }

    /// Start flannel-agent on node `i`, wait for its subnet.env, and give its pod an address in that subnet.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let _ = fs::remove_file(&self.nodes[i].subnet_file);
        self.spawn_agent(i)?;
        if self.ipv4 {
            let subnet = self.wait_subnet_env(i)?;
            self.attach_pod(i, &subnet)?;
        } else {
            self.wait_subnet_env_line(i, "FLANNEL_IPV6_SUBNET=")?;
        }
        // Our VtepMAC: the address of the flannel.1 the agent set up (none with host-gw).
        self.nodes[i].vtep_mac = self.nodes[i]
            .ns
            .sh("cat /sys/class/net/flannel.1/address")
            .ok()
            .map(|mac| mac.trim().to_string());
        if self.ipv6 {
            let text = fs::read_to_string(&self.nodes[i].subnet_file)?;
            let gw6 = text
                .lines()
                .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))
                .with_context(|| format!("no FLANNEL_IPV6_SUBNET in subnet.env:\n{text}"))?;
            let (gw, len) = gw6.split_once('/').context("FLANNEL_IPV6_SUBNET")?;
            let gw: Ipv6Addr = gw.parse()?;
            let subnet6 = format!("{}/{len}", Ipv6Addr::from(u128::from(gw) - 1));
            self.attach_pod6(i, &subnet6)?;
            // The pod MTU the CNI plugin would give it (both families' smaller VTEP's).
            if let Some(mtu) = text.lines().find_map(|l| l.strip_prefix("FLANNEL_MTU=")) {
                self.nodes[i]
                    .pod
                    .sh(&format!("ip link set eth0 mtu {}", mtu.trim()))?;
            }
            self.nodes[i].vtep_mac6 = self.nodes[i]
                .ns
                .sh("cat /sys/class/net/flannel-v6.1/address")
                .ok()
                .map(|mac| mac.trim().to_string());
        }
        Ok(())
    }

    /// Give node `i`'s cni0 and pod their IPv6 addresses in `subnet6`.
    fn attach_pod6(&mut self, i: usize, subnet6: &str) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        if node.subnet6.as_deref() == Some(subnet6) {
            return Ok(());
        }
        node.subnet6 = Some(subnet6.to_string());
        let gw = Ipv6Addr::from(u128::from(node.subnet6_base()) + 1);
        node.ns.sh("ip -6 addr flush dev cni0 scope global")?;
        node.ns
            .sh(&format!("ip -6 addr add {gw}/64 dev cni0 nodad"))?;
        node.pod.sh("ip -6 addr flush dev eth0 scope global")?;
        node.pod.sh(&format!(
            "ip -6 addr add {}/64 dev eth0 nodad",
            node.pod_ip6()
        ))?;
        node.pod
            .sh(&format!("ip -6 route replace default via {gw}"))?;
        Ok(())
    }

    /// Wait for the agent's subnet.env to have a line starting with `prefix`.
    pub fn wait_subnet_env_line(&mut self, i: usize, prefix: &str) -> anyhow::Result<String> {
        let file = self.nodes[i].subnet_file.clone();
        let res = wait_for(
            "the agent to write subnet.env",
            Duration::from_secs(20),
            || {
                let text = fs::read_to_string(&file).ok()?;
                text.lines()
                    .find_map(|l| l.strip_prefix(prefix))
                    .map(str::to_string)
            },
        );
        if res.is_err() || !self.nodes[i].agent_running() {
            bail!(
                "agent on {} did not come up: {:?}\n--- log ---\n{}",
                self.nodes[i].name,
                res.as_ref().err(),
                self.nodes[i].log_text()
            );
        }
        res
    }

    /// Wait for the agent's subnet.env and return the pod subnet it names.
    pub fn wait_subnet_env(&mut self, i: usize) -> anyhow::Result<String> {
        let gw = self.wait_subnet_env_line(i, "FLANNEL_SUBNET=")?;
        let (ip, len) = gw
            .trim()
            .split_once('/')
            .with_context(|| format!("FLANNEL_SUBNET={gw}"))?;
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("FLANNEL_SUBNET={gw}"))?;
        Ok(format!("{}/{len}", Ipv4Addr::from(u32::from(ip) - 1)))
    }

    fn attach_pod(&mut self, i: usize, subnet: &str) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        if node.subnet.as_deref() == Some(subnet) {
            return Ok(());
        }
        node.subnet = Some(subnet.to_string());
        let base = node.subnet_base();
        let gw = Ipv4Addr::from(u32::from(base) + 1);
        node.ns.sh("ip -4 addr flush dev cni0")?;
        node.ns.sh(&format!("ip addr add {gw}/24 dev cni0"))?;
        node.pod.sh("ip -4 addr flush dev eth0")?;
        node.pod
            .sh(&format!("ip addr add {}/24 dev eth0", node.pod_ip()))?;
        node.pod.sh(&format!("ip route add default via {gw}"))?;
        Ok(())
    }

    /// Bring up node `i` as stock Flannel would: kernel flannel.1 (vxlan id 1
    /// dstport 8472 nolearning), its lease written as flanneld writes it.
    pub fn start_stock(&mut self, i: usize, subnet_third_octet: u8) -> anyhow::Result<()> {
        self.start_stock_device(i, subnet_third_octet)?;
        self.write_lease(i)
    }

    /// Node `i`'s kernel flannel.1 and pod only (the test writes the lease where it wants).
    pub fn start_stock_device(&mut self, i: usize, subnet_third_octet: u8) -> anyhow::Result<()> {
        let subnet = format!("10.244.{subnet_third_octet}.0/24");
        let mac = format!("02:42:8f:11:22:{:02x}", 0x10 * (i as u8 + 1));
        if self.ipv4 {
            let node = &self.nodes[i];
            let ip = node.public_ip;
            node.ns.sh(&format!(
                "ip link add flannel.1 type vxlan id 1 local {ip} dev eth0 dstport 8472 nolearning"
            ))?;
            node.ns
                .sh(&format!("ip link set flannel.1 address {mac} mtu 1450 up"))?;
            node.ns.sh(&format!(
                "ip addr add 10.244.{subnet_third_octet}.0/32 dev flannel.1"
            ))?;
        }
        if self.ipv4 {
            self.attach_pod(i, &subnet)?;
            self.nodes[i].vtep_mac = Some(mac);
        }
        if let Some(ip6) = self.nodes[i].public_ipv6 {
            // flannel-v6.1 as flanneld creates it: the same VNI and port as
            // flannel.1, on the underlay's IPv6 address, no RAs. flanneld asks
            // for flannel.1's MTU (1450); the kernel caps a vxlan6 device at
            // the underlay's MTU - 70, so it gets 1430.
            let subnet6 = format!("fd00:10:244:{subnet_third_octet:x}::/64");
            let mac6 = format!("02:42:8f:66:22:{:02x}", 0x10 * (i as u8 + 1));
            let node = &self.nodes[i];
            node.ns.sh(&format!(
                "ip link add flannel-v6.1 type vxlan id 1 local {ip6} dev eth0 dstport 8472 nolearning"
            ))?;
            node.ns
                .sh("sysctl -qw net.ipv6.conf.flannel-v6/1.accept_ra=0")?;
            node.ns.sh(&format!(
                "ip link set flannel-v6.1 address {mac6} mtu 1430 up"
            ))?;
            node.ns.sh(&format!(
                "ip -6 addr add fd00:10:244:{subnet_third_octet:x}::/128 dev flannel-v6.1 nodad"
            ))?;
            self.attach_pod6(i, &subnet6)?;
            self.nodes[i].vtep_mac6 = Some(mac6);
        }
        Ok(())
    }

    /// Node `i`'s lease key (`10.244.2.0-24`) and value, exactly as flanneld writes them.
    pub fn lease_kv(&self, i: usize) -> anyhow::Result<(String, String)> {
        let n = &self.nodes[i];
        if !self.ipv4 {
            // flanneld with EnableIPv4 false: the empty IPv4 subnet in the
            // key, PublicIP 0.0.0.0, no BackendData.
            let (ip6, subnet6, mac6) = (
                n.public_ipv6.context("node has no IPv6 address")?,
                n.subnet6.as_deref().context("node has no IPv6 subnet")?,
                n.vtep_mac6.as_deref().context("node has no IPv6 VtepMAC")?,
            );
            let value = format!(
                r#"{{"PublicIP":"0.0.0.0","PublicIPv6":"{ip6}","BackendType":"vxlan","BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#
            );
            return Ok((format!("0.0.0.0-0&{}", subnet6.replace('/', "-")), value));
        }
        let subnet = n.subnet.as_deref().context("node has no subnet")?;
        let mac = n.vtep_mac.as_deref().context("node has no VtepMAC")?;
        if let (Some(ip6), Some(subnet6), Some(mac6)) = (n.public_ipv6, &n.subnet6, &n.vtep_mac6) {
            let value = format!(
                r#"{{"PublicIP":"{}","PublicIPv6":"{ip6}","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}"#,
                n.public_ip
            );
            let key = format!("{}&{}", subnet.replace('/', "-"), subnet6.replace('/', "-"));
            return Ok((key, value));
        }
        let value = format!(
            r#"{{"PublicIP":"{}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#,
            n.public_ip
        );
        Ok((subnet.replace('/', "-"), value))
    }

    /// Write node `i`'s lease file, the value exactly as flanneld writes it to etcd.
    pub fn write_lease(&self, i: usize) -> anyhow::Result<()> {
        let (key, value) = self.lease_kv(i)?;
        let path = self.lease_dir().join("subnets").join(key);
        let tmp = path.with_extension("tmp-write");
        fs::write(&tmp, value)?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Node `i` with a pod in `10.244.<octet>.0/24` and no overlay at all
    /// (host-gw: plain routes, the upper bound on this machine).
    pub fn start_plain(&mut self, i: usize, subnet_third_octet: u8) -> anyhow::Result<()> {
        self.attach_pod(i, &format!("10.244.{subnet_third_octet}.0/24"))?;
        if self.ipv6 {
            self.attach_pod6(i, &format!("fd00:10:244:{subnet_third_octet:x}::/64"))?;
        }
        Ok(())
    }

    /// Routes between plain nodes: `<subnet> via <public IP>`.
    pub fn program_hostgw_routes(&self) -> anyhow::Result<()> {
        for (i, n) in self.nodes.iter().enumerate() {
            for (j, p) in self.nodes.iter().enumerate() {
                if let (true, Some(subnet)) = (i != j, &p.subnet) {
                    n.ns.sh(&format!("ip route replace {subnet} via {}", p.public_ip))?;
                }
                if let (true, Some(subnet6), Some(ip6)) = (i != j, &p.subnet6, p.public_ipv6) {
                    n.ns.sh(&format!("ip -6 route replace {subnet6} via {ip6}"))?;
                }
            }
        }
        Ok(())
    }

    /// Program every stock node's kernel tables for every other node, in
    /// Flannel's order: neighbour, FDB entry, route.
    pub fn program_stock_peers(&self) -> anyhow::Result<()> {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.kind != Kind::Stock || (n.subnet.is_none() && n.subnet6.is_none()) {
                continue; // not a stock node, or not started yet
            }
            for (j, p) in self.nodes.iter().enumerate() {
                if i == j {
                    continue;
                }
                if let (Some(subnet), Some(mac)) = (&p.subnet, &p.vtep_mac) {
                    let vtep = p.subnet_base();
                    n.ns.sh(&format!(
                        "ip neigh replace {vtep} lladdr {mac} dev flannel.1 nud permanent"
                    ))?;
                    n.ns.sh(&format!(
                        "bridge fdb replace {mac} dev flannel.1 dst {} self permanent",
                        p.public_ip
                    ))?;
                    n.ns.sh(&format!(
                        "ip route replace {subnet} via {vtep} dev flannel.1 onlink"
                    ))?;
                }
                // flannel-v6.1, in the same order (dual-stack nodes).
                if let (Some(subnet6), Some(mac6), Some(ip6), true) =
                    (&p.subnet6, &p.vtep_mac6, p.public_ipv6, n.subnet6.is_some())
                {
                    let vtep6 = p.subnet6_base();
                    n.ns.sh(&format!(
                        "ip -6 neigh replace {vtep6} lladdr {mac6} dev flannel-v6.1 nud permanent"
                    ))?;
                    n.ns.sh(&format!(
                        "bridge fdb replace {mac6} dev flannel-v6.1 dst {ip6} self permanent"
                    ))?;
                    n.ns.sh(&format!(
                        "ip -6 route replace {subnet6} via {vtep6} dev flannel-v6.1 onlink"
                    ))?;
                }
            }
        }
        Ok(())
    }

    /// Every node's and pod's IPv6 tables, for a failure message.
    pub fn ipv6_tables(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            for c in [
                "ip -6 addr",
                "ip -6 route",
                "ip -6 neigh",
                "bridge fdb show dev flannel-v6.1",
                "ip -s link show flannel-v6.1",
            ] {
                let text = n.ns.sh(c).unwrap_or_else(|e| e.to_string());
                out += &format!("# {} {c}\n{text}\n", n.name);
            }
            for c in ["ip -6 addr", "ip -6 route", "ip -6 neigh"] {
                let text = n.pod.sh(c).unwrap_or_else(|e| e.to_string());
                out += &format!("# {} pod {c}\n{text}\n", n.name);
            }
        }
        out
    }

    /// Wait until node `i`'s agent has `n` entries in its FDB map.
    pub fn wait_fdb_entries(&self, i: usize, n: usize) -> anyhow::Result<()> {
        self.wait_map_entries(i, "fdb", n)
    }

    /// Wait until node `i`'s pinned map `map` holds `n` entries.
    pub fn wait_map_entries(&self, i: usize, map: &str, n: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        wait_for(
            &format!("{n} {map} entries on {}", node.name),
            Duration::from_secs(10),
            || {
                node.dump_map(map)
                    .ok()
                    .and_then(|v| v.as_array().map(|a| a.len()))
                    .filter(|l| *l == n)
            },
        )
        .map(|_| ())
    }

    /// Per-CPU sum of a datapath counter on node `i`, by its name.
    pub fn counter(&self, i: usize, name: &str) -> u64 {
        self.counter_field(i, name, "packets")
    }

    /// Bytes side of a datapath counter.
    pub fn counter_bytes(&self, i: usize, name: &str) -> u64 {
        self.counter_field(i, name, "bytes")
    }

    fn counter_field(&self, i: usize, name: &str, field: &str) -> u64 {
        let idx = flannel_ebpf_common::Counter::ALL
            .iter()
            .position(|c| c.name() == name)
            .unwrap_or(usize::MAX) as u64;
        let Ok(dump) = self.nodes[i].dump_map("counters") else {
            return 0;
        };
        dump.as_array()
            .into_iter()
            .flatten()
            .find(|e| e["formatted"]["key"].as_u64() == Some(idx))
            .map(|e| {
                e["formatted"]["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v["value"][field].as_u64().unwrap_or(0))
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The FDB map of node `i` as (VtepMAC, node IP) strings.
    pub fn fdb(&self, i: usize) -> Vec<(String, String)> {
        let Ok(v) = self.nodes[i].dump_map("fdb") else {
            return Vec::new();
        };
        let bytes = |x: &serde_json::Value| -> Vec<u64> {
            x.as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b.as_u64())
                .collect()
        };
        let mut out: Vec<_> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let mac = bytes(&e["formatted"]["key"]["vtep_mac"]);
                let ip = bytes(&e["formatted"]["value"]["node_ip"]);
                (
                    mac.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                    ip.iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join("."),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Number of entries in a pinned map of node `i`.
    pub fn map_len(&self, i: usize, map: &str) -> usize {
        self.nodes[i]
            .dump_map(map)
            .ok()
            .and_then(|v| v.as_array().map(|a| a.len()))
            .unwrap_or(0)
    }

    /// Agent logs of every node, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.kind == Kind::Ebpf)
            .map(|n| format!("--- {} ---\n{}", n.name, n.log_text()))
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill_agent();
            if n.pin_root.exists() {
                let _ = Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", n.ns.name))
                    .arg(agent_path())
                    .args(["uninstall", "--pin-root"])
                    .arg(&n.pin_root)
                    .output();
                let _ = fs::remove_dir_all(&n.pin_root);
            }
        }
        // Namespaces go with the nodes and the fabric (Netns::drop).
        self.nodes.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// What three restarts under traffic cost (see [`Lab::restarts_under_traffic`]).
#[derive(Debug)]
pub struct RestartCost {
    pub pings_sent: u32,
    pub pings_received: u32,
    /// TCP segments the two pods retransmitted.
    pub retransmits: u64,
}

impl Lab {
    /// Restart node `i`'s agent three times while its pod pings node
    /// `peer`'s pod every 10 ms (500 pings) and streams 6.4 MB of TCP to it:
    /// SIGKILL and an immediate new start, SIGTERM and a new start, and an
    /// upgrade — SIGTERM and a start whose programs differ from the pinned
    /// ones (`--log-level debug` keeps the diagnostics in, a new program
    /// tag), so they are swapped into the pinned links.
    pub fn restarts_under_traffic(&mut self, i: usize, peer: usize) -> anyhow::Result<RestartCost> {
        use crate::traffic::{BackgroundPing, BackgroundTcp, tcp_retransmits};
        let dst = self.nodes[peer].pod_ip();
        let retrans = |lab: &Lab| -> anyhow::Result<u64> {
            Ok(tcp_retransmits(&lab.nodes[i].pod)? + tcp_retransmits(&lab.nodes[peer].pod)?)
        };
        let r0 = retrans(self)?;
        let bg = BackgroundPing::start(&self.nodes[i].pod, dst, 500, 10)?;
        let tcp = BackgroundTcp::start(
            &self.nodes[i].pod,
            &self.nodes[peer].pod,
            dst,
            5301,
            (400, 16 << 10, 10),
        )?;
        std::thread::sleep(Duration::from_millis(500));
        self.nodes[i].kill_agent();
        self.spawn_agent(i)?;
        std::thread::sleep(Duration::from_millis(1200));
        self.nodes[i].stop_agent()?;
        self.spawn_agent(i)?;
        std::thread::sleep(Duration::from_millis(1200));
        self.nodes[i].stop_agent()?;
        let args = self.nodes[i].agent_args.clone();
        self.nodes[i]
            .agent_args
            .extend(["--log-level".to_string(), "debug".to_string()]);
        self.spawn_agent(i)?;
        self.nodes[i].agent_args = args;
        let (pings_sent, pings_received) = bg.finish()?;
        tcp.finish()?;
        Ok(RestartCost {
            pings_sent,
            pings_received,
            retransmits: retrans(self)? - r0,
        })
    }
}
