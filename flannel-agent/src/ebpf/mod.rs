//! The eBPF data path from userspace: loading, verifying, pinning and
//! attaching the programs ([`datapath`]), the pinned maps ([`tables`]), the
//! bpf(2) calls under them ([`bpf_sys`]) and the bpffs mount ([`bpffs`]).
pub mod bpf_sys;
pub mod bpffs;
pub mod datapath;
pub mod tables;
