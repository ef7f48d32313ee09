//! deploy/: the manifest parses as the Kubernetes objects kube-flannel ships
//! (same namespace objects, RBAC, ConfigMap), its DaemonSet runs the agent
//! with flags the agent accepts, bpffs mounted and only the capabilities it
//! needs; its net-conf.json is one the agent accepts.
use clap::Parser;
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap, rbac::v1::ClusterRole};

fn docs() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(flannel_tests::root().join("deploy/kube-flannel-ebpf.yml"))
        .unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            serde_yaml::with::singleton_map_recursive::deserialize::<serde_json::Value, _>(d)
                .unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn find<T: serde::de::DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let v = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{kind} does not parse as Kubernetes' type: {e}"))
}

#[test]
fn manifest_has_kube_flannels_objects_and_a_valid_daemonset() {
    let docs = docs();
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "ServiceAccount",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    for d in &docs {
        assert!(
            d["apiVersion"].is_string() && d["metadata"]["name"].is_string(),
            "{d}"
        );
    }

    // RBAC as flanneld's: nodes get/list/watch, nodes/status patch.
    let role: ClusterRole = find(&docs, "ClusterRole");
    let rules = role.rules.unwrap();
    let has = |res: &str, verb: &str| {
        rules.iter().any(|r| {
            r.resources
                .as_ref()
                .is_some_and(|x| x.iter().any(|s| s == res))
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for verb in ["get", "list", "watch"] {
        assert!(has("nodes", verb), "nodes {verb}");
    }
    assert!(has("nodes/status", "patch"));

    // The same ConfigMap, and a net-conf.json the agent accepts.
    let cm: ConfigMap = find(&docs, "ConfigMap");
    assert_eq!(cm.metadata.name.as_deref(), Some("kube-flannel-cfg"));
    let data = cm.data.unwrap();
    let conf = flannel_agent::lease::netconf::NetConf::parse(&data["net-conf.json"]).unwrap();
    assert_eq!(conf.network.to_string(), "10.244.0.0/16");
    let cni: serde_json::Value = serde_json::from_str(&data["cni-conf.json"]).unwrap();
    assert_eq!(cni["plugins"][0]["type"], "flannel");

    // The DaemonSet: host network, the agent with flags it accepts, bpffs, capabilities.
    let ds: DaemonSet = find(&docs, "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("flannel"));
    let c = pod
        .containers
        .iter()
        .find(|c| c.name == "kube-flannel")
        .unwrap();
    let mut argv = vec!["flannel-agent".to_string()];
    argv.extend(c.args.clone().unwrap());
    flannel_agent::cmd::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("agent rejects {argv:?}: {e}"));
    assert!(argv.iter().any(|a| a == "kube"));
    let env: Vec<String> = c.env.clone().unwrap().into_iter().map(|e| e.name).collect();
    assert!(env.contains(&"NODE_NAME".to_string()));
    let mounts = c.volume_mounts.clone().unwrap();
    assert!(
        mounts.iter().any(|m| m.mount_path == "/sys/fs/bpf"),
        "bpffs not mounted"
    );
    assert!(mounts.iter().any(|m| m.mount_path == "/run/flannel"));
    let sc = c.security_context.clone().unwrap();
    assert_ne!(
        sc.privileged,
        Some(true),
        "must not need a privileged container"
    );
    let caps = sc.capabilities.unwrap().add.unwrap();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON"]);
    let probes = [
        c.readiness_probe.clone().unwrap(),
        c.liveness_probe.clone().unwrap(),
    ];
    let paths: Vec<String> = probes
        .iter()
        .filter_map(|p| p.http_get.as_ref()?.path.clone())
        .collect();
    assert_eq!(paths, ["/readyz", "/healthz"]);
    let vols = pod.volumes.unwrap();
    let bpffs = vols.iter().find(|v| v.name == "bpffs").unwrap();
    assert_eq!(bpffs.host_path.as_ref().unwrap().path, "/sys/fs/bpf");
}
