//! The node around the data path: which interface is the underlay, the
//! sysctls it needs, ip-masq rules, the nftables membership guard, the xfrm
//! check, and the watchdog that notices the node changing under the agent.
pub mod guard;
pub mod masq;
pub mod nat_mark;
pub mod overlay6;
pub mod pod_ports;
pub mod sysctl;
pub mod underlay;
pub mod watchdog;
pub mod xfrm;
