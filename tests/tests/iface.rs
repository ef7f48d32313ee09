//! Underlay selection as flanneld: --iface (name or address, repeatable, the
//! first that exists), --iface-regex (addresses first, then names),
//! --iface-can-reach, and the default-route interface.
use flannel_tests::{
    lab::{Kind, Lab, Topology},
    prereq,
};

/// Start the agent with `args` on a node that also has a second interface
/// (`side0`, 192.168.50.1/24), and return the public IP it chose.
fn chosen(lab: &mut Lab, args: &[&str]) -> String {
    chosen_with(lab, args, &[])
}

/// As `chosen`, with flags given as `FLANNELD_<NAME>` environment variables.
fn chosen_with(lab: &mut Lab, args: &[&str], env: &[(&str, &str)]) -> String {
    let lease = lease_of_run(lab, args, env, "FLANNEL_SUBNET=");
    lease["PublicIP"].as_str().unwrap().to_string()
}

/// Run the agent on node 0 with `args` and `env` until subnet.env has
/// `line`, then hand the node back (uninstall, VTEPs deleted); the lease it
/// took.
fn lease_of_run(
    lab: &mut Lab,
    args: &[&str],
    env: &[(&str, &str)],
    line: &str,
) -> serde_json::Value {
    let _ = lab.nodes[0].stop_agent();
    let _ = std::fs::remove_file(&lab.nodes[0].subnet_file);
    let _ = std::fs::remove_dir_all(lab.lease_dir().join("subnets"));
    std::fs::create_dir_all(lab.lease_dir().join("subnets")).unwrap();
    lab.nodes[0].agent_args = args.iter().map(|s| s.to_string()).collect();
    lab.nodes[0].agent_env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    lab.spawn_agent(0).unwrap();
    lab.wait_subnet_env_line(0, line).unwrap();
    let lease = std::fs::read_dir(lab.lease_dir().join("subnets"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lease.path()).unwrap()).unwrap();
    lab.nodes[0].stop_agent().unwrap();
    let root = lab.nodes[0].pin_root.clone();
    lab.nodes[0]
        .ns
        .nsenter(&format!(
            "{} uninstall --pin-root {}",
            flannel_tests::agent_path().display(),
            root.display()
        ))
        .unwrap();
    let _ = lab.nodes[0].ns.sh("ip link del flannel.1");
    let _ = lab.nodes[0].ns.sh("ip link del flannel-v6.1");
    v
}

#[test]
fn underlay_selection_flags() {
    if !prereq::ready("iface_selection") {
        return;
    }
    // Routed lab: eth0 holds the default route (10.1.5.10).
    let mut lab = Lab::new("ifs", Topology::Routed, &[Kind::Ebpf]).unwrap();
    let ns = &lab.nodes[0].ns;
    ns.sh("ip link add side0 type veth peer name side1")
        .unwrap();
    ns.sh("ip addr add 192.168.50.1/24 dev side0").unwrap();
    ns.sh("ip link set side0 up").unwrap();
    ns.sh("ip link set side1 up").unwrap();

    assert_eq!(
        chosen(&mut lab, &[]),
        "10.1.5.10",
        "default: the default route's interface"
    );
    assert_eq!(chosen(&mut lab, &["--iface", "side0"]), "192.168.50.1");
    assert_eq!(
        chosen(&mut lab, &["--iface", "nosuch", "--iface", "side0"]),
        "192.168.50.1",
        "first that exists"
    );
    assert_eq!(
        chosen(&mut lab, &["--iface", "192.168.50.1"]),
        "192.168.50.1",
        "by address"
    );
    assert_eq!(
        chosen(&mut lab, &["--iface-regex", "^192\\.168\\."]),
        "192.168.50.1",
        "regex on addresses"
    );
    assert_eq!(
        chosen(&mut lab, &["--iface-regex", "^side0$"]),
        "192.168.50.1",
        "regex on names"
    );
    assert_eq!(
        chosen(&mut lab, &["--iface-can-reach", "192.168.50.77"]),
        "192.168.50.1"
    );
    assert_eq!(
        chosen(&mut lab, &["--iface-can-reach", "10.1.9.10"]),
        "10.1.5.10",
        "via the default route"
    );
    // Every flag also from FLANNELD_<NAME>, as flanneld reads them.
    assert_eq!(
        chosen_with(&mut lab, &[], &[("FLANNELD_IFACE", "nosuch,side0")]),
        "192.168.50.1",
        "FLANNELD_IFACE"
    );
    assert_eq!(
        chosen_with(&mut lab, &[], &[("FLANNELD_IFACE_REGEX", "^side0")]),
        "192.168.50.1",
        "FLANNELD_IFACE_REGEX"
    );
    assert_eq!(
        chosen_with(
            &mut lab,
            &[],
            &[("FLANNELD_IFACE_CAN_REACH", "192.168.50.9")]
        ),
        "192.168.50.1",
        "FLANNELD_IFACE_CAN_REACH"
    );
}

/// As `chosen`, for labs with IPv6: the lease's (PublicIP, PublicIPv6).
fn chosen6(lab: &mut Lab, args: &[&str]) -> (String, String) {
    let v = lease_of_run(lab, args, &[], "FLANNEL_IPV6_SUBNET=");
    (
        v["PublicIP"].as_str().unwrap().to_string(),
        v["PublicIPv6"].as_str().unwrap().to_string(),
    )
}

/// A second interface with an IPv6 (and, dual-stack, an IPv4) address.
fn side_interface(lab: &Lab) {
    let ns = &lab.nodes[0].ns;
    ns.sh("ip link add side0 type veth peer name side1")
        .unwrap();
    ns.sh("ip -6 addr add fc00:50::1/64 dev side0 nodad")
        .unwrap();
    if lab.ipv4 {
        ns.sh("ip addr add 192.168.50.1/24 dev side0").unwrap();
    }
    ns.sh("ip link set side0 up").unwrap();
    ns.sh("ip link set side1 up").unwrap();
}

#[test]
fn ipv6_underlay_selection_flags() {
    if !prereq::ready("iface_selection_ipv6") {
        return;
    }
    // IPv6-only: eth0 holds the IPv6 default route (fc00:0:5::10).
    let mut lab = Lab::new_v6_only("ifs6", Topology::Routed, &[Kind::Ebpf]).unwrap();
    side_interface(&lab);
    let v6 = |lab: &mut Lab, args: &[&str]| chosen6(lab, args).1;
    assert_eq!(
        v6(&mut lab, &[]),
        "fc00:0:5::10",
        "the IPv6 default route's"
    );
    assert_eq!(v6(&mut lab, &["--iface", "side0"]), "fc00:50::1");
    assert_eq!(
        v6(&mut lab, &["--iface", "nosuch", "--iface", "fc00:50::1"]),
        "fc00:50::1",
        "by IPv6 address, the first that exists"
    );
    assert_eq!(
        v6(&mut lab, &["--iface-regex", "^fc00:50:"]),
        "fc00:50::1",
        "regex on IPv6 addresses"
    );
    assert_eq!(
        v6(&mut lab, &["--public-ipv6", "fc00:50::1"]),
        "fc00:50::1",
        "--public-ipv6's interface"
    );
    let (v4, _) = chosen6(&mut lab, &["--iface", "side0"]);
    assert_eq!(v4, "0.0.0.0", "IPv6-only leases have no PublicIP");

    // Dual-stack: --iface with an IPv6 address picks that interface for both.
    let mut lab = Lab::new_dual("ifs46", Topology::Routed, &[Kind::Ebpf]).unwrap();
    side_interface(&lab);
    assert_eq!(
        chosen6(&mut lab, &["--iface", "fc00:50::1"]),
        ("192.168.50.1".to_string(), "fc00:50::1".to_string())
    );
    assert_eq!(
        chosen6(&mut lab, &[]),
        ("10.1.5.10".to_string(), "fc00:0:5::10".to_string())
    );
}
