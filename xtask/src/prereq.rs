//! The machine's tools each command needs, installed from Debian's packages
//! before anything uses them. A fresh machine has only the Rust toolchains;
//! a tool that cannot be installed stops the command with its name.
use std::process::Command;

use anyhow::bail;

/// A command (or, given as an absolute path, a file) from a Debian package,
/// and what we use it for.
pub struct Tool {
    pub command: &'static str,
    pub package: &'static str,
    pub why: &'static str,
}

const fn tool(command: &'static str, package: &'static str, why: &'static str) -> Tool {
    Tool {
        command,
        package,
        why,
    }
}

/// Building the agent: the etcd client's build script generates its gRPC code with protoc.
pub const BUILD: &[Tool] = &[
    tool(
        "protoc",
        "protobuf-compiler",
        "the etcd client's generated gRPC code",
    ),
    tool(
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
        "the well-known types the etcd protos import",
    ),
];

/// The labs (tests and demo): namespaces, devices, traffic, netfilter, map dumps, etcd.
pub const LAB: &[Tool] = &[
    tool("ip", "iproute2", "namespaces, veth, bridges, vxlan"),
    tool(
        "bridge",
        "iproute2",
        "FDB entries of the stock-Flannel peers",
    ),
    tool("ping", "iputils-ping", "traffic between pods"),
    tool(
        "nsenter",
        "util-linux",
        "running the agent in a node's namespace",
    ),
    tool("sysctl", "procps", "forwarding and rp_filter in the labs"),
    tool("timeout", "coreutils", "bounding commands the tests run"),
    tool("iptables", "iptables", "FORWARD counters and --ip-masq"),
    tool("nft", "nftables", "--ip-masq in nftables mode"),
    tool("bpftool", "bpftool", "map dumps the tests and demo check"),
    tool("etcd", "etcd-server", "the etcd lease source's tests"),
    tool("etcdctl", "etcd-client", "inspecting etcd leases"),
    tool("openssl", "openssl", "certificates for etcd over TLS"),
    tool(
        "ethtool",
        "ethtool",
        "checksum offloads off, so IPv6 VXLAN checksums are verified",
    ),
];

/// The benchmark: standard tools against kernel VXLAN and plain routing.
pub const BENCH: &[Tool] = &[
    tool("iperf3", "iperf3", "TCP and UDP throughput"),
    tool("sockperf", "sockperf", "request/response latency"),
    tool("ethtool", "ethtool", "offloads of the segmenting underlay"),
];

fn present(t: &Tool) -> bool {
    if t.command.starts_with('/') {
        return std::path::Path::new(t.command).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {}", t.command)])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn missing<'a>(tools: &'a [&'a Tool]) -> Vec<&'a Tool> {
    tools.iter().copied().filter(|t| !present(t)).collect()
}

fn describe(tools: &[&Tool]) -> String {
    tools
        .iter()
        .map(|t| format!("{} ({}: {})", t.command, t.package, t.why))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Install every missing tool of `sets` in one apt-get, saying what and why;
/// fail naming any tool still missing afterwards.
pub fn ensure(sets: &[&[Tool]]) -> anyhow::Result<()> {
    let all: Vec<&Tool> = sets.iter().flat_map(|s| s.iter()).collect();
    let need = missing(&all);
    if need.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = need.iter().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing: {}; install them as root: apt-get install {}",
            describe(&need),
            packages.join(" ")
        );
    }
    println!(
        "xtask: installing {} from Debian's packages, for {}",
        packages.join(" "),
        describe(&need)
    );
    let quiet = [
        ("DEBIAN_FRONTEND", "noninteractive"),
        ("NEEDRESTART_MODE", "a"),
    ];
    // A fresh machine has no package lists yet: update first, once.
    quiet_run(Command::new("apt-get").envs(quiet).args(["update"]))
        .map_err(|e| anyhow::anyhow!("{e:#}: cannot update the package lists"))?;
    let installed = quiet_run(
        Command::new("apt-get")
            .envs(quiet)
            .args(["install", "-y", "--no-install-recommends"])
            .args(&packages),
    );
    let still = missing(&need);
    if !still.is_empty() {
        bail!(
            "still missing after apt-get install {}: {}{}",
            packages.join(" "),
            describe(&still),
            installed
                .err()
                .map(|e| format!(" ({e:#})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Run a command with its output kept back, shown only when it fails.
fn quiet_run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("starting {cmd:?}: {e}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
