//! flannel-agent: the control plane of flannel-ebpf.
//!
//! - [`cmd`]: the command entry points (`run`, `show`, `uninstall`) and the CLI;
//! - [`lease`]: Flannel's model — leases, subnets, VtepMACs, net-conf.json, subnet.env;
//! - [`source`]: where leases come from (file, etcd, Kubernetes), one interface;
//! - [`reconcile`]: leases → tables: classify, observe, plan, apply;
//! - [`node`]: the node around the data path (underlay choice, sysctls,
//!   ip-masq, the membership guard, xfrm check, the watchdog);
//! - [`ebpf`]: loading and attaching the programs, the pinned maps;
//! - [`netlink`]: links, addresses, routes, neighbours, FDB entries;
//! - [`ops`]: what operators scrape: /healthz, /readyz, /metrics.
pub mod cmd;
pub mod ebpf;
pub mod lease;
pub mod netlink;
pub mod node;
pub mod ops;
pub mod reconcile;
pub mod source;
