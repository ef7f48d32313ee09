//! `--subnet-mgr etcd` against a real etcd server: leases written exactly as
//! flanneld writes them, reservations, our own lease deleted by someone else,
//! etcd restarted and its history compacted mid-watch, lease renewal; TLS
//! with client certificates and a user and password.
use std::time::Duration;

use etcd_client::{GetOptions, Permission, PutOptions};
use flannel_tests::{
    etcd::{Etcd, EtcdTls},
    lab::{Kind, Lab, NETWORK, NETWORK6, Topology},
    prereq,
    traffic::{ping, wait_reachable},
    wait_for,
};

const PREFIX: &str = "/coreos.com/network";

fn ready(test: &str) -> bool {
    if !prereq::ready(test) {
        return false;
    }
    let has_etcd = std::process::Command::new("bash")
        .args(["-c", "command -v etcd"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_etcd {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: etcd is not installed (apt-get install etcd-server)");
        }
        eprintln!("SKIPPED {test}: etcd is not installed");
        return false;
    }
    true
}

/// Put a lease as flanneld does: attached to a 24 h etcd lease.
fn put_flanneld_lease(etcd: &Etcd, lab: &Lab, node: usize) {
    let (key, value) = lab.lease_kv(node).unwrap();
    etcd.client(&lab.nodes[0].ns, async move |c| {
        let lease = c.lease_grant(86400, None).await?.id();
        c.put(
            format!("{PREFIX}/subnets/{key}"),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
        Ok(())
    })
    .unwrap();
}

fn etcd_args(etcd: &Etcd, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "--subnet-mgr".to_string(),
        "etcd".into(),
        "--etcd-endpoints".into(),
        etcd.endpoint(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn get(etcd: &Etcd, lab: &Lab, key: &str) -> Option<(String, i64)> {
    let key = format!("{PREFIX}/subnets/{key}");
    etcd.client(&lab.nodes[0].ns, async move |c| {
        let r = c.get(key, None).await?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value_str().unwrap_or("").to_string(), kv.lease())))
    })
    .unwrap()
}

#[test]
fn leases_from_etcd_as_flanneld_writes_them() {
    if !ready("etcd_leases") {
        return;
    }
    let mut lab = Lab::new(
        "etcd1",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    let etcd = Etcd::start(&lab.nodes[0].ns, 2379).unwrap();
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.put(
            format!("{PREFIX}/config"),
            format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan"}}}}"#),
            None,
        )
        .await?;
        // A reservation for our node: a key without TTL holding only our PublicIP.
        c.put(
            format!("{PREFIX}/subnets/10.244.7.0-24"),
            r#"{"PublicIP":"10.1.5.11"}"#,
            None,
        )
        .await?;
        // Garbage next to real leases: skipped, the rest applied.
        c.put(format!("{PREFIX}/subnets/10.244.9.0-24"), "{not json", None)
            .await?;
        Ok(())
    })
    .unwrap();
    lab.start_stock_device(1, 2).unwrap();
    lab.start_stock_device(2, 3).unwrap();
    put_flanneld_lease(&etcd, &lab, 1);
    put_flanneld_lease(&etcd, &lab, 2);

    lab.nodes[0].agent_args = etcd_args(&etcd, &[]);
    lab.start_agent(0).unwrap();
    // The reservation was honoured: our subnet, still without TTL, now with our VtepMAC.
    assert_eq!(lab.nodes[0].subnet.as_deref(), Some("10.244.7.0/24"));
    let (value, lease) = get(&etcd, &lab, "10.244.7.0-24").unwrap();
    assert_eq!(lease, 0, "a reservation must stay without TTL");
    let v: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert_eq!(v["PublicIP"], "10.1.5.11");
    assert_eq!(v["BackendType"], "vxlan");
    assert_eq!(
        v["BackendData"]["VtepMAC"].as_str(),
        lab.nodes[0].vtep_mac.as_deref()
    );

    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let routes = lab.nodes[0].overlay_routes();
    assert!(
        routes.contains("10.244.2.0/24 via 10.244.2.0")
            && routes.contains("10.244.3.0/24 via 10.244.3.0"),
        "{routes}"
    );
    assert!(
        lab.nodes[0]
            .log_text()
            .contains("skipping etcd lease 10.244.9.0-24"),
        "{}",
        lab.logs()
    );
    for peer in [1, 2] {
        wait_reachable(
            &lab.nodes[0].pod,
            lab.nodes[peer].pod_ip(),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(
            ping(&lab.nodes[peer].pod, lab.nodes[0].pod_ip(), 5, 0.05).unwrap(),
            (5, 5)
        );
    }

    // A peer's lease deleted: its entries go within a second.
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.delete(format!("{PREFIX}/subnets/10.244.3.0-24"), None)
            .await?;
        Ok(())
    })
    .unwrap();
    wait_for(
        "the deleted lease to leave the maps",
        Duration::from_secs(1),
        || (lab.fdb(0).len() == 1).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let routes = lab.nodes[0].overlay_routes();
    assert!(!routes.contains("10.244.3.0"), "{routes}");

    // Our own lease deleted by someone else: said loudly, and written back.
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.delete(format!("{PREFIX}/subnets/10.244.7.0-24"), None)
            .await?;
        Ok(())
    })
    .unwrap();
    wait_for("our lease to be re-created", Duration::from_secs(5), || {
        get(&etcd, &lab, "10.244.7.0-24")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(
        lab.nodes[0].log_text().contains("WAS DELETED from etcd"),
        "{}",
        lab.logs()
    );
}

#[test]
fn etcd_restart_and_compaction_mid_watch_converge() {
    if !ready("etcd_restart") {
        return;
    }
    let mut lab = Lab::new(
        "etcd2",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    let mut etcd = Etcd::start(&lab.nodes[0].ns, 2379).unwrap();
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.put(
            format!("{PREFIX}/config"),
            format!(r#"{{"Network":"{NETWORK}"}}"#),
            None,
        )
        .await?;
        Ok(())
    })
    .unwrap();
    lab.start_stock_device(1, 2).unwrap();
    lab.start_stock_device(2, 3).unwrap();
    put_flanneld_lease(&etcd, &lab, 1);
    // A short TTL so renewal is exercised within the test (renewed at half the TTL).
    lab.nodes[0].agent_args = etcd_args(&etcd, &["--subnet-lease-ttl", "4"]);
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let own_key = lab.nodes[0].subnet.clone().unwrap().replace('/', "-");
    let (_, own_lease) = get(&etcd, &lab, &own_key).unwrap();
    assert_ne!(own_lease, 0, "our lease is attached to an etcd lease");

    // etcd goes away under the watch. While the agent cannot reach it (it
    // serves another client port for a moment), leases change and the history
    // is compacted; then it comes back where the agent expects it.
    etcd.stop();
    etcd.restart_on(2479).unwrap();
    put_flanneld_lease(&etcd, &lab, 2);
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.delete(format!("{PREFIX}/subnets/10.244.2.0-24"), None)
            .await?;
        let rev = c.get("x", None).await?.header().map_or(0, |h| h.revision());
        c.compact(rev, None).await?;
        Ok(())
    })
    .unwrap();
    etcd.restart_on(2379).unwrap();
    wait_for(
        "the agent to converge after restart and compaction",
        Duration::from_secs(15),
        || {
            let fdb = lab.fdb(0);
            (fdb.len() == 1 && fdb[0].0 == "02:42:8f:11:22:30").then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", lab.fdb(0), lab.logs()));
    let routes = lab.nodes[0].overlay_routes();
    assert!(
        routes.contains("10.244.3.0/24") && !routes.contains("10.244.2.0"),
        "{routes}"
    );
    let log = lab.nodes[0].log_text();
    assert!(log.contains("etcd: watch on"), "no lost-watch line:\n{log}");
    assert!(
        log.contains("was compacted") && log.contains("re-listing"),
        "compaction not seen:\n{log}"
    );
    lab.program_stock_peers().unwrap();
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[2].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap();

    // Renewed: well past the 4 s TTL our key is still there.
    std::thread::sleep(Duration::from_secs(5));
    let left = etcd
        .client(&lab.nodes[0].ns, async |c| {
            let all = c
                .get(
                    format!("{PREFIX}/subnets/"),
                    Some(GetOptions::new().with_prefix()),
                )
                .await?;
            Ok(all.kvs().len())
        })
        .unwrap();
    assert!(
        get(&etcd, &lab, &own_key).is_some(),
        "our lease expired: not renewed ({left} keys)\n{}",
        lab.logs()
    );
}

#[test]
fn etcd_over_tls_with_client_certificates_and_a_password() {
    if !ready("etcd_tls") {
        return;
    }
    let mut lab = Lab::new("etcdtls", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let tls = EtcdTls::generate(&lab.dir.join("pki")).unwrap();
    let (ca, cert, key) = (
        tls.ca.display().to_string(),
        tls.client_cert.display().to_string(),
        tls.client_key.display().to_string(),
    );
    let etcd = Etcd::start_tls(&lab.nodes[0].ns, 2379, tls).unwrap();
    // Auth on: root, and a flannel user that may only touch the prefix.
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.put(
            format!("{PREFIX}/config"),
            format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan"}}}}"#),
            None,
        )
        .await?;
        c.user_add("root", "root-pw", None).await?;
        c.user_grant_role("root", "root").await?;
        c.user_add("flannel", "flannel-pw", None).await?;
        c.role_add("flannel").await?;
        c.role_grant_permission("flannel", Permission::read_write(PREFIX).with_prefix())
            .await?;
        c.user_grant_role("flannel", "flannel").await?;
        c.auth_enable().await?;
        Ok(())
    })
    .unwrap();
    lab.start_stock(1, 2).unwrap();
    let (key2, value2) = lab.lease_kv(1).unwrap();
    etcd.client_as(&lab.nodes[0].ns, Some(("root", "root-pw")), async |c| {
        c.put(format!("{PREFIX}/subnets/{key2}"), value2, None)
            .await?;
        Ok(())
    })
    .unwrap();

    let flags = |password: &str| {
        etcd_args(
            &etcd,
            &[
                "--etcd-cafile",
                &ca,
                "--etcd-certfile",
                &cert,
                "--etcd-keyfile",
                &key,
                "--etcd-username",
                "flannel",
                "--etcd-password",
                password,
            ],
        )
    };
    // A wrong password: refused at start, naming etcd.
    lab.nodes[0].agent_args = flags("wrong");
    lab.spawn_agent(0).unwrap();
    wait_for("the agent to give up", Duration::from_secs(20), || {
        (!lab.nodes[0].agent_running()).then_some(())
    })
    .unwrap();
    let log = lab.nodes[0].log_text();
    assert!(
        log.contains("connecting to etcd at https://127.0.0.1:2379")
            && log.to_lowercase().contains("authentication failed"),
        "{log}"
    );

    // The right one: the lease is taken and the peer reached.
    lab.nodes[0].agent_args = flags("flannel-pw");
    lab.start_agent(0).unwrap();
    let subnet = lab.nodes[0].subnet.clone().unwrap();
    let ours = etcd
        .client_as(
            &lab.nodes[0].ns,
            Some(("root", "root-pw")),
            async move |c| {
                let key = format!("{PREFIX}/subnets/{}", subnet.replace('/', "-"));
                let r = c.get(key, None).await?;
                Ok(r.kvs().first().map(|kv| kv.lease()))
            },
        )
        .unwrap();
    assert!(
        ours.is_some_and(|lease| lease != 0),
        "our lease is in etcd with a TTL"
    );
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let dst = lab.nodes[1].pod_ip();
    wait_reachable(&lab.nodes[0].pod, dst, Duration::from_secs(10)).unwrap();
    assert_eq!(ping(&lab.nodes[0].pod, dst, 5, 0.05).unwrap(), (5, 5));
}

/// Restarts (SIGKILL, SIGTERM, an upgrade) on the etcd source lose no ping
/// and retransmit no TCP segment: the
/// new agent waits for the watch's first list before it touches the tables.
#[test]
fn etcd_restarts_under_traffic_lose_nothing() {
    if !ready("etcd_restart_traffic") {
        return;
    }
    let mut lab = Lab::new("etcdrs", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let etcd = Etcd::start(&lab.nodes[0].ns, 2379).unwrap();
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.put(
            format!("{PREFIX}/config"),
            format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan"}}}}"#),
            None,
        )
        .await?;
        Ok(())
    })
    .unwrap();
    lab.start_stock_device(1, 2).unwrap();
    put_flanneld_lease(&etcd, &lab, 1);
    lab.nodes[0].agent_args = etcd_args(&etcd, &[]);
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let fdb_before = lab.fdb(0);
    let cost = lab.restarts_under_traffic(0, 1).unwrap();
    flannel_tests::chaos(
        "agent restarts (SIGKILL, SIGTERM, upgrade), etcd source",
        cost.pings_sent,
        cost.pings_received,
    );
    assert_eq!(
        (cost.pings_sent, cost.pings_received, cost.retransmits),
        (500, 500, 0),
        "pings lost or TCP segments retransmitted across the restarts\n{}",
        lab.logs()
    );
    assert!(
        lab.nodes[0]
            .log_text()
            .contains("replacing the program in place"),
        "the upgrade did not swap the programs\n{}",
        lab.logs()
    );
    assert!(lab.nodes[0].agent_running(), "{}", lab.logs());
    assert_eq!(lab.fdb(0), fdb_before);
}

/// etcd down for 30 s while traffic runs: the data path is untouched, no
/// entry is removed, the agent says it is degraded (log, /readyz, metric),
/// and converges when etcd is back, including a lease written before its
/// watch has resumed.
#[test]
fn etcd_outage_keeps_the_data_path_and_converges() {
    if !ready("etcd_outage") {
        return;
    }
    let mut lab = Lab::new(
        "etcdout",
        Topology::Switched,
        &[Kind::Ebpf, Kind::Stock, Kind::Stock],
    )
    .unwrap();
    let mut etcd = Etcd::start(&lab.nodes[0].ns, 2379).unwrap();
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.put(
            format!("{PREFIX}/config"),
            format!(r#"{{"Network":"{NETWORK}","Backend":{{"Type":"vxlan"}}}}"#),
            None,
        )
        .await?;
        Ok(())
    })
    .unwrap();
    lab.start_stock_device(1, 2).unwrap();
    lab.start_stock_device(2, 3).unwrap();
    put_flanneld_lease(&etcd, &lab, 1);
    lab.nodes[0].agent_args = etcd_args(
        &etcd,
        &["--healthz-port", "10244", "--metrics-port", "9464"],
    );
    lab.start_agent(0).unwrap();
    lab.program_stock_peers().unwrap();
    lab.wait_fdb_entries(0, 1)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let http =
        |lab: &Lab, port: u16, path: &str| lab.nodes[0].ns.http_get(port, path).unwrap_or_default();
    assert!(http(&lab, 10244, "/readyz").starts_with("HTTP/1.1 200"));
    let fdb_before = lab.fdb(0);
    let routes_before = lab.nodes[0].show("routes").unwrap();

    // 700 pings, one every 50 ms: 35 s across the outage.
    let bg = flannel_tests::traffic::BackgroundPing::start(
        &lab.nodes[0].pod,
        lab.nodes[1].pod_ip(),
        700,
        50,
    )
    .unwrap();
    etcd.stop();
    wait_for("/readyz to say degraded", Duration::from_secs(10), || {
        let r = http(&lab, 10244, "/readyz");
        (r.starts_with("HTTP/1.1 503") && r.contains("lease source degraded")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(
        http(&lab, 9464, "/metrics").contains("flannel_ebpf_lease_source_up 0"),
        "{}",
        http(&lab, 9464, "/metrics")
    );
    assert!(lab.nodes[0].log_text().contains("lease source degraded"));
    assert!(http(&lab, 10244, "/healthz").starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_secs(30));
    assert_eq!(lab.fdb(0), fdb_before, "an entry went while etcd was down");
    assert_eq!(lab.nodes[0].show("routes").unwrap(), routes_before);
    assert!(lab.nodes[0].agent_running(), "{}", lab.logs());

    etcd.restart().unwrap();
    put_flanneld_lease(&etcd, &lab, 2);
    lab.wait_fdb_entries(0, 2)
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_for("/readyz to recover", Duration::from_secs(15), || {
        http(&lab, 10244, "/readyz")
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(http(&lab, 9464, "/metrics").contains("flannel_ebpf_lease_source_up 1"));
    let (sent, received) = bg.finish().unwrap();
    flannel_tests::chaos("etcd down for 30 s", sent, received);
    assert_eq!((sent, received), (700, 700), "{}", lab.logs());
    wait_reachable(
        &lab.nodes[0].pod,
        lab.nodes[2].pod_ip(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
}

#[test]
fn dual_stack_leases_in_etcd_as_flanneld_writes_them() {
    if !ready("etcd_dual_stack") {
        return;
    }
    let mut lab = Lab::new_dual("etcd6", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    let etcd = Etcd::start(&lab.nodes[0].ns, 2379).unwrap();
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.put(
            format!("{PREFIX}/config"),
            format!(
                r#"{{"Network":"{NETWORK}","EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{{"Type":"vxlan"}}}}"#
            ),
            None,
        )
        .await?;
        // A reservation from before IPv6: our node keeps its subnet and adds the IPv6 half.
        c.put(
            format!("{PREFIX}/subnets/10.244.7.0-24"),
            r#"{"PublicIP":"10.1.5.11"}"#,
            None,
        )
        .await?;
        Ok(())
    })
    .unwrap();
    lab.start_stock_device(1, 2).unwrap();
    put_flanneld_lease(&etcd, &lab, 1);
    lab.nodes[0].agent_args = etcd_args(&etcd, &[]);
    lab.start_agent(0).unwrap();
    let ours = &lab.nodes[0];
    assert_eq!(ours.subnet.as_deref(), Some("10.244.7.0/24"));
    let key = format!(
        "10.244.7.0-24&{}",
        ours.subnet6.as_deref().unwrap().replace('/', "-")
    );
    // Renamed to the dual-stack key, still a reservation (no TTL); the old key is gone.
    let (value, lease) =
        get(&etcd, &lab, &key).unwrap_or_else(|| panic!("no {key}\n{}", lab.logs()));
    assert_eq!(lease, 0, "a reservation must stay without TTL");
    assert!(get(&etcd, &lab, "10.244.7.0-24").is_none());
    let v: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert_eq!(
        v["PublicIPv6"],
        ours.public_ipv6.unwrap().to_string(),
        "{value}"
    );
    assert_eq!(
        v["BackendV6Data"]["VtepMAC"].as_str(),
        ours.vtep_mac6.as_deref(),
        "{value}"
    );
    lab.program_stock_peers().unwrap();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    wait_reachable(&a.pod, b.pod_ip6(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert_eq!(ping(&b.pod, a.pod_ip6(), 5, 0.05).unwrap(), (5, 5));
    assert_eq!(ping(&b.pod, a.pod_ip(), 5, 0.05).unwrap(), (5, 5));
    // Our dual-stack lease deleted by someone else: written back under the same key.
    let k = key.clone();
    etcd.client(&lab.nodes[0].ns, async move |c| {
        c.delete(format!("{PREFIX}/subnets/{k}"), None).await?;
        Ok(())
    })
    .unwrap();
    wait_for("our lease to be re-created", Duration::from_secs(5), || {
        get(&etcd, &lab, &key)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
}

#[test]
fn ipv6_only_leases_in_etcd_as_flanneld_writes_them() {
    if !ready("etcd_ipv6_only") {
        return;
    }
    let mut lab =
        Lab::new_v6_only("etcd6o", Topology::Switched, &[Kind::Ebpf, Kind::Stock]).unwrap();
    // etcd listens on IPv4 loopback inside node 1's namespace.
    lab.nodes[0].ns.sh("ip link set lo up").unwrap();
    let etcd = Etcd::start(&lab.nodes[0].ns, 2379).unwrap();
    etcd.client(&lab.nodes[0].ns, async |c| {
        c.put(
            format!("{PREFIX}/config"),
            format!(
                r#"{{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"{NETWORK6}","Backend":{{"Type":"vxlan"}}}}"#
            ),
            None,
        )
        .await?;
        Ok(())
    })
    .unwrap();
    lab.start_stock_device(1, 2).unwrap();
    put_flanneld_lease(&etcd, &lab, 1);
    lab.nodes[0].agent_args = etcd_args(&etcd, &[]);
    lab.start_agent(0).unwrap();
    let key = format!(
        "0.0.0.0-0&{}",
        lab.nodes[0].subnet6.as_deref().unwrap().replace('/', "-")
    );
    let (value, lease) =
        get(&etcd, &lab, &key).unwrap_or_else(|| panic!("no {key}\n{}", lab.logs()));
    assert_ne!(lease, 0, "a lease with a TTL");
    let v: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert_eq!(v["PublicIP"], "0.0.0.0", "{value}");
    assert!(v.get("BackendData").is_none(), "{value}");
    assert_ne!(
        lab.nodes[0].subnet6, lab.nodes[1].subnet6,
        "the stock node's IPv6 subnet is taken"
    );
    lab.program_stock_peers().unwrap();
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    wait_reachable(&a.pod, b.pod_ip6(), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.ipv6_tables(), lab.logs()));
    assert_eq!(ping(&b.pod, a.pod_ip6(), 5, 0.05).unwrap(), (5, 5));
    // A restart keeps the lease of our public IPv6 address.
    let before = lab.nodes[0].subnet6.clone();
    lab.nodes[0].stop_agent().unwrap();
    lab.start_agent(0).unwrap();
    assert_eq!(lab.nodes[0].subnet6, before, "{}", lab.logs());
    // Overwritten by someone else (a stock IPv6-only flanneld on etcd takes
    // any PublicIP-0.0.0.0 lease for its own): ours is written back.
    let (k, ours6) = (key.clone(), lab.nodes[0].public_ipv6.unwrap().to_string());
    etcd.client(&lab.nodes[0].ns, async move |c| {
        c.put(
            format!("{PREFIX}/subnets/{k}"),
            r#"{"PublicIP":"0.0.0.0","PublicIPv6":"fc00::99","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"02:00:00:00:00:99"}}"#,
            None,
        )
        .await?;
        Ok(())
    })
    .unwrap();
    wait_for(
        "our lease to be written back",
        Duration::from_secs(5),
        || get(&etcd, &lab, &key).filter(|(v, _)| v.contains(&ours6)),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(lab.nodes[0].log_text().contains("WAS OVERWRITTEN"));
    let k = key.clone();
    // Deleted by someone else: written back under the same key.
    etcd.client(&lab.nodes[0].ns, async move |c| {
        c.delete(format!("{PREFIX}/subnets/{k}"), None).await?;
        Ok(())
    })
    .unwrap();
    wait_for("our lease to be re-created", Duration::from_secs(5), || {
        get(&etcd, &lab, &key)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
}
