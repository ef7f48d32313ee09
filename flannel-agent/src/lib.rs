//! flannel-agent: the control plane of flannel-ebpf.
pub mod agent;
pub mod bpffs;
pub mod cli;
pub mod datapath;
pub mod lease;
pub mod mac;
pub mod metrics;
pub mod netconf;
pub mod netlink;
pub mod reconcile;
pub mod show;
pub mod source;
pub mod subnet;
pub mod subnet_env;
pub mod sysctl;
pub mod tables;
pub mod underlay;
