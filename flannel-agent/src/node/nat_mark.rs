//! The direct path's view of kube-proxy's NAT. With br_netfilter (Kubernetes
//! nodes load it: `bridge-nf-call-iptables=1`) a pod's packet to a Service is
//! DNAT'd by conntrack while the bridge still holds it, before cni0's ingress
//! program sees it: it arrives addressed to the backend pod, like any
//! pod-to-pod packet. One nftables rule after the NAT hooks marks packets of
//! NAT'd connections; the program leaves marked packets to the stack, whose
//! egress on flannel.1 then notes the flow for the replies. Without
//! br_netfilter the program sees the Service address and declines anyway.
use anyhow::Context;

use crate::node::masq::pipe;

pub const TABLE: &str = "flannel-ebpf-direct";

/// The table: NAT'd connections' packets get [`flannel_ebpf_common::NAT_MARK`]
/// at prerouting, after the NAT (dstnat is priority -100). One `inet` table
/// for both families (ip6tables' Services on dual-stack nodes); the `ip`
/// table of earlier versions goes in the same transaction.
pub fn script() -> String {
    let mark = flannel_ebpf_common::NAT_MARK;
    format!(
        "table ip {TABLE} {{}}\n\
         delete table ip {TABLE}\n\
         table inet {TABLE} {{}}\n\
         delete table inet {TABLE}\n\
         table inet {TABLE} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority -99; policy accept;\n\
         \t\tct status dnat meta mark set meta mark or {mark:#x}\n\
         \t\tct status snat meta mark set meta mark or {mark:#x}\n\
         \t}}\n\
         }}\n"
    )
}

/// Install (or replace) the table, in one transaction.
pub fn install() -> anyhow::Result<()> {
    pipe("nft", &["-f", "-"], &script())
        .with_context(|| format!("writing the nftables table {TABLE} (the direct path's NAT mark)"))
}

/// Remove the table (the direct path off, or uninstall), and an earlier
/// version's `ip` one.
pub fn remove() {
    crate::node::masq::nft_delete_table_in("inet", TABLE);
    crate::node::masq::nft_delete_table(TABLE);
}

#[cfg(test)]
mod tests {
    #[test]
    fn marks_both_kinds_of_nat_after_the_nat_hook() {
        let s = super::script();
        assert!(s.contains("hook prerouting priority -99"), "{s}");
        assert!(
            s.contains("ct status dnat meta mark set meta mark or 0x"),
            "{s}"
        );
        assert!(
            s.contains("ct status snat meta mark set meta mark or 0x"),
            "{s}"
        );
        // Replacing is one transaction: the old tables (an earlier
        // version's ip one too) go in the same script.
        assert!(
            s.starts_with(
                "table ip flannel-ebpf-direct {}\ndelete table ip flannel-ebpf-direct\n\
                 table inet flannel-ebpf-direct {}\ndelete table inet flannel-ebpf-direct\n\
                 table inet flannel-ebpf-direct {\n"
            ),
            "{s}"
        );
    }
}
