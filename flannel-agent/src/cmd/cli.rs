//! Command line. Every `run` flag can also come from `FLANNELD_<NAME>`, as flanneld accepts.
use std::{net::Ipv4Addr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The version, and which build: operators and the lab tests can tell a
/// debug binary from the release one that ships.
const VERSION: &str = if cfg!(debug_assertions) {
    concat!(env!("CARGO_PKG_VERSION"), " (debug build)")
} else {
    concat!(env!("CARGO_PKG_VERSION"), " (release build)")
};

#[derive(Parser, Debug)]
#[command(
    name = "flannel-agent",
    version = VERSION,
    about = "Flannel's VXLAN overlay with an eBPF data path"
)]
pub struct Cli {
    /// error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "FLANNELD_LOG_LEVEL"
    )]
    pub log_level: String,
    /// text (human) or json (one object per line, for log pipelines).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "FLANNELD_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Set up flannel.1, attach the programs and keep the tables in sync with the leases.
    Run(Box<RunArgs>),
    /// Hand the node back to the kernel's VXLAN data path (FDB entries from the
    /// maps), then detach the programs and remove every pinned object.
    Uninstall(PinArgs),
    /// Print the pinned tables and counters (the agent need not be running).
    Show(ShowArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DatapathKind {
    /// TC encap and XDP decap programs reading BPF maps.
    Ebpf,
    /// The kernel's VXLAN device programmed as flanneld does (no BPF).
    Kernel,
}

/// Where the decap program runs (`--decap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DecapMode {
    /// TC ingress on a veth underlay (XDP there turns off the peer's GSO), else XDP.
    Auto,
    /// XDP on the underlay.
    Xdp,
    /// TC ingress on the underlay.
    Tc,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SubnetMgr {
    /// Flannel's etcd layout in a directory (--subnet-dir).
    File,
    /// etcd v3, as flanneld keeps leases there (--etcd-*).
    Etcd,
    /// Kubernetes Node objects, as flanneld's --kube-subnet-mgr.
    Kube,
}

#[derive(Args, Debug, Clone)]
pub struct PinArgs {
    /// bpffs directory holding the maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/flannel", env = "FLANNELD_PIN_ROOT")]
    pub pin_root: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ShowArgs {
    #[arg(value_enum)]
    pub view: crate::cmd::show::View,
    /// JSON instead of the iproute2-like text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub pins: PinArgs,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The data path: eBPF programs, or the kernel's VXLAN device as flanneld programs it.
    #[arg(long, value_enum, default_value = "ebpf", env = "FLANNELD_DATAPATH")]
    pub datapath: DatapathKind,
    /// Where the eBPF decap program runs: auto (TC on veth underlays, else XDP), xdp or tc.
    #[arg(long, value_enum, default_value = "auto", env = "FLANNELD_DECAP")]
    pub decap: DecapMode,
    /// Serve /healthz and /readyz on this port; off when not given.
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT")]
    pub healthz_port: Option<u16>,
    /// The address /healthz and /readyz listen on (the kubelet probes the node's IP).
    #[arg(long, default_value = "0.0.0.0", env = "FLANNELD_HEALTHZ_IP")]
    pub healthz_ip: std::net::IpAddr,
    /// Where leases come from.
    #[arg(long, value_enum, default_value = "file", env = "FLANNELD_SUBNET_MGR")]
    pub subnet_mgr: SubnetMgr,
    /// Directory with `config` (net-conf.json) and `subnets/<ip>-<len>` lease files.
    #[arg(long, env = "FLANNELD_SUBNET_DIR")]
    pub subnet_dir: Option<PathBuf>,
    /// kubeconfig for --subnet-mgr kube; default: the in-cluster config.
    #[arg(long, alias = "kubeconfig-file", env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (kube).
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node_name: String,
    /// net-conf.json for --subnet-mgr kube (the kube-flannel-cfg ConfigMap).
    #[arg(
        long,
        default_value = "/etc/kube-flannel/net-conf.json",
        env = "FLANNELD_NET_CONFIG_PATH"
    )]
    pub net_config_path: PathBuf,
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        default_value = "http://127.0.0.1:2379",
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    pub etcd_endpoints: Vec<String>,
    /// etcd key prefix of the network.
    #[arg(
        long,
        default_value = "/coreos.com/network",
        env = "FLANNELD_ETCD_PREFIX"
    )]
    pub etcd_prefix: String,
    /// CA certificate for etcd TLS.
    #[arg(long, env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<String>,
    /// Client certificate for etcd TLS.
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<String>,
    /// Client key for etcd TLS.
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<String>,
    #[arg(long, env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    #[arg(long, env = "FLANNELD_ETCD_PASSWORD")]
    pub etcd_password: Option<String>,
    /// Renew our lease this many minutes before it expires.
    #[arg(long, default_value_t = 60, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN")]
    pub subnet_lease_renew_margin: u64,
    /// TTL of our lease in seconds (flanneld: 24 h); for tests.
    #[arg(
        long,
        default_value_t = 86400,
        hide = true,
        env = "FLANNELD_SUBNET_LEASE_TTL"
    )]
    pub subnet_lease_ttl: u64,
    /// Underlay interface (name or IPv4 address); repeat to list candidates,
    /// the first that exists wins. Default: the interface of the default route.
    #[arg(long, env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,
    /// Underlay by regular expression on an IPv4 address or an interface name
    /// (addresses tried first, as flanneld); repeatable.
    #[arg(long, env = "FLANNELD_IFACE_REGEX", value_delimiter = ',')]
    pub iface_regex: Vec<String>,
    /// Underlay: the interface the kernel would use to reach this address.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,
    /// This node's public IP; default: the underlay interface's first IPv4 address.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// This node's public IPv6 address (EnableIPv6); default: the underlay
    /// interface's first global IPv6 address.
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<std::net::Ipv6Addr>,
    /// File for the flannel CNI plugin.
    #[arg(
        long,
        default_value = "/run/flannel/subnet.env",
        env = "FLANNELD_SUBNET_FILE"
    )]
    pub subnet_file: PathBuf,
    /// Masquerade pod traffic leaving the Network, as flanneld's --ip-masq
    /// (also written as FLANNEL_IPMASQ in the subnet file).
    #[arg(long, env = "FLANNELD_IP_MASQ")]
    pub ip_masq: bool,
    /// Where the --ip-masq rules go.
    #[arg(
        long,
        value_enum,
        default_value = "nftables",
        env = "FLANNELD_MASQ_BACKEND"
    )]
    pub masq_backend: crate::node::masq::MasqBackend,
    /// The nftables guard around flannel.1's socket (eBPF data path): VXLAN
    /// the programs do not decapsulate reaches it only from members, to our
    /// public IP, through the underlay; pods cannot send to members' VXLAN
    /// port. `--membership-guard=false` leaves the kernel's socket open to
    /// anyone, as stock Flannel does.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        env = "FLANNELD_MEMBERSHIP_GUARD"
    )]
    pub membership_guard: bool,
    /// eBPF data path: program a kernel route and neighbour per remote node
    /// on flannel.1, as stock Flannel does, so `ip route` lists every node.
    /// Off by default: the kernel then holds one route for the Network (via
    /// one gateway neighbour) whatever the cluster's size, and the encap
    /// program finds each node in the route map. `show routes|arp|fdb` prints
    /// Flannel's three views either way. The kernel data path and
    /// DirectRouting peers always get per-node routes.
    #[arg(
        long,
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        env = "FLANNELD_PER_NODE_ROUTES"
    )]
    pub per_node_routes: bool,
    /// eBPF data path: carry pod-to-pod traffic between the pod bridge and
    /// the underlay without the host's IP stack (encapsulated at cni0's
    /// ingress, delivered to cni0 after decapsulation). Flows the host stack
    /// carries (kube-proxy's NAT: Services, NodePorts) keep to it both ways.
    /// Netfilter FORWARD rules (iptables NetworkPolicy) no longer see direct
    /// pod-to-pod packets: turn it off (`--direct-path=false`) where they
    /// must. Needs TC decap (`--decap auto` picks it while this is on).
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        env = "FLANNELD_DIRECT_PATH"
    )]
    pub direct_path: bool,
    /// The pod bridge the CNI bridge plugin creates (flannel's CNI config: cni0).
    #[arg(long, default_value = "cni0", env = "FLANNELD_POD_BRIDGE")]
    pub pod_bridge: String,
    #[command(flatten)]
    pub pins: PinArgs,
    /// The compiled kernel programs; default: next to the binary, then the build tree.
    #[arg(long, env = "FLANNELD_BPF_OBJECT")]
    pub bpf_object: Option<PathBuf>,
    /// Name of the VTEP device; default flannel.<VNI> as flanneld names it.
    #[arg(long, env = "FLANNELD_VTEP_NAME")]
    pub vtep_name: Option<String>,
    /// How often the lease source is checked for changes, in milliseconds.
    #[arg(long, default_value_t = 200, env = "FLANNELD_POLL_INTERVAL_MS")]
    pub poll_interval_ms: u64,
    /// Serve Prometheus metrics on this port (`/metrics`); off when not given.
    #[arg(long, env = "FLANNELD_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// The address /metrics listens on. Loopback by default: the peer table
    /// names every node's VtepMAC, half of what the decap check trusts; give
    /// the node's IP (or 0.0.0.0) for a Prometheus outside the node.
    #[arg(long, default_value = "127.0.0.1", env = "FLANNELD_METRICS_IP")]
    pub metrics_ip: std::net::IpAddr,
    /// Full resync of maps and kernel tables (repairs drift), in seconds.
    #[arg(long, default_value_t = 10, env = "FLANNELD_RESYNC_INTERVAL")]
    pub resync_interval: u64,
}

impl Cli {
    pub fn init_logging(&self) {
        // netlink-packet-route warns about every attribute newer than itself.
        let filter = format!("{},netlink_packet_route=error", self.log_level);
        let env = env_logger::Env::default().default_filter_or(filter);
        env_logger::Builder::from_env(env)
            .format_timestamp_millis()
            .init();
    }
}
