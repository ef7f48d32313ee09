//! Bad input never corrupts state: a bad lease is skipped with a logged
//! reason and the rest applied; a bad net-conf.json refuses to start.
use std::{fs, process::Command};

use flannel_tests::{
    agent_path,
    lab::{Kind, Lab, Topology},
    prereq,
};

fn run_with_config(name: &str, config: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("flannel-badconf-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("subnets")).unwrap();
    fs::write(dir.join("config"), config).unwrap();
    let out = Command::new(agent_path())
        .args(["run", "--subnet-mgr", "file", "--subnet-dir"])
        .arg(&dir)
        .args(["--pin-root", "/sys/fs/bpf/flannel-never-used"])
        .output()
        .unwrap();
    let _ = fs::remove_dir_all(&dir);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_net_conf_refuses_to_start_naming_the_field() {
    if !prereq::ready("bad_net_conf") {
        return;
    }
    for (name, config, field) in [
        (
            "len",
            r#"{"Network":"10.244.0.0/16","SubnetLen":8}"#,
            "SubnetLen",
        ),
        ("net", r#"{"Network":"10.244.0.0/33"}"#, "Network"),
        (
            "vni",
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":"x"}}"#,
            "VNI",
        ),
        (
            "v6",
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#,
            "EnableIPv6",
        ),
        ("json", r#"{"Network":"#, "not valid JSON"),
    ] {
        let (ok, stderr) = run_with_config(name, config);
        assert!(!ok, "{name}: agent started with a bad config");
        assert!(
            stderr.contains(field),
            "{name}: error does not name {field}: {stderr}"
        );
        assert!(
            stderr.contains("config"),
            "{name}: error does not name the file: {stderr}"
        );
    }
    assert!(!std::path::Path::new("/sys/fs/bpf/flannel-never-used").exists());
}

#[test]
fn bad_leases_are_skipped_and_the_rest_applied() {
    if !prereq::ready("bad_leases") {
        return;
    }
    let mut lab = Lab::new("badl", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    lab.start_stock(1, 2).unwrap();
    let subnets = lab.lease_dir().join("subnets");
    fs::write(subnets.join("10.244.9.0-24"), "{\"PublicIP\": ").unwrap();
    fs::write(subnets.join("10.244.8.0-24"), r#"{"PublicIP":"10.1.5.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:zz"}}"#).unwrap();
    fs::write(subnets.join("not-a-subnet"), "{}").unwrap();
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1).unwrap();
    // Our own lease was not allocated over a bad file's subnet either.
    assert_eq!(lab.nodes[0].subnet.as_deref(), Some("10.244.1.0/24"));
    let log = lab.nodes[0].log_text();
    for (file, why) in [
        ("10.244.9.0-24", "not Flannel's lease JSON"),
        ("10.244.8.0-24", "VtepMAC"),
        ("not-a-subnet", "not an IPv4 address"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("skipping lease file") && l.contains(file) && l.contains(why)),
            "no skip line for {file} ({why}):\n{log}"
        );
    }
    // Reported once, not on every poll.
    assert_eq!(log.matches("10.244.9.0-24").count(), 1, "{log}");
    flannel_tests::traffic::wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        std::time::Duration::from_secs(10),
    )
    .unwrap();
}
