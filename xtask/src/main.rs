//! Developer commands: `cargo xtask build-ebpf | build | test | demo | bench`.
//!
//! The xtask itself builds from a fresh machine (anyhow, clap, libc): it
//! installs what everything else needs before that is built or run.
mod chaos;
mod prereq;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel programs (installs rust-src and bpf-linker when missing).
    BuildEbpf,
    /// Build the kernel programs and the agent (release).
    Build,
    /// Build everything and run the whole test suite (needs root for the lab tests).
    Test {
        /// Extra arguments for `cargo test`, e.g. a test name filter.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build everything and run a three-node lab in network namespaces, then tear it down.
    Demo,
    /// Run the fault tests under traffic and print what each fault cost.
    Chaos,
    /// Generated frames through every program (BPF_PROG_TEST_RUN), each
    /// verdict checked against the reference model; prints the figures.
    Fuzz {
        /// Frames per program.
        #[arg(long, default_value_t = 1_000_000)]
        frames: usize,
    },
    /// Measure flannel-ebpf against kernel VXLAN and no encapsulation; results in results/.
    Bench {
        /// Short runs for everyday use (under two minutes once built).
        #[arg(long)]
        quick: bool,
        /// GSO/TSO off on the labs' underlay ports, so every data path puts
        /// MTU-sized frames on the "wire" as with real NICs (results/bench-segmenting.*).
        #[arg(long)]
        segmenting_underlay: bool,
        /// Each node behind a router instead of one bridge; traffic only
        /// (results/bench-routed.*).
        #[arg(long)]
        routed_underlay: bool,
        /// Only the control plane: apply times, one lease change, the agent's
        /// cold start with 5000 and 50 000 leases (file, etcd) and its RSS
        /// (results/control-plane.*).
        #[arg(long)]
        control_plane: bool,
        /// IPv6 pod traffic on dual-stack labs against flannel-v6.1 and IPv6
        /// routes; traffic only (results/bench-ipv6.*).
        #[arg(long)]
        ipv6: bool,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Run a command, failing with its command line when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Build the eBPF object and copy it to target/flannel-ebpf.o, where the agent
/// and the tests look for it.
pub fn build_ebpf() -> anyhow::Result<PathBuf> {
    toolchain::ensure()?;
    let root = root();
    let crate_dir = root.join("flannel-ebpf");
    let target_dir = root.join("target/ebpf");
    println!("xtask: building the kernel programs (nightly, bpfel-unknown-none, BTF)");
    run(Command::new("cargo")
        .current_dir(&crate_dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args(["+nightly", "build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir))?;
    let built = target_dir.join("bpfel-unknown-none/release/flannel-ebpf");
    let out = root.join("target/flannel-ebpf.o");
    std::fs::copy(&built, &out)
        .with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
    println!("xtask: kernel object at {}", out.display());
    Ok(out)
}

/// The release agent: what the image ships, what the labs and the bench run.
fn build_agent() -> anyhow::Result<PathBuf> {
    println!("xtask: building the release agent");
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--locked",
        "--release",
        "-p",
        "flannel-agent",
    ]))?;
    Ok(root().join("target/release/flannel-agent"))
}

/// The kernel object and the release agent, with every tool the labs use.
fn build_for_labs(extra: &[&[prereq::Tool]]) -> anyhow::Result<PathBuf> {
    let mut sets = vec![prereq::BUILD, prereq::LAB];
    sets.extend_from_slice(extra);
    prereq::ensure(&sets)?;
    build_ebpf()?;
    build_agent()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf => build_ebpf().map(|_| ()),
        Cmd::Build => {
            prereq::ensure(&[prereq::BUILD])?;
            build_ebpf()?;
            build_agent().map(|_| ())
        }
        Cmd::Test { args } => {
            let agent = build_for_labs(&[])?;
            // Lab tests build namespaces: run them a couple at a time on 2 cores.
            // They run the release agent just built (FLANNEL_AGENT), as users do.
            run(Command::new("cargo")
                .current_dir(root())
                .env("FLANNEL_AGENT", &agent)
                .args(["test", "--locked", "--workspace", "--"])
                .args(["--test-threads", "2"])
                .args(&args))
        }
        Cmd::Bench {
            quick,
            segmenting_underlay,
            routed_underlay,
            control_plane,
            ipv6,
        } => {
            let agent = build_for_labs(&[prereq::BENCH])?;
            let root = root();
            let mut cmd = Command::new("cargo");
            cmd.current_dir(&root)
                .args([
                    "run",
                    "--locked",
                    "--release",
                    "-q",
                    "-p",
                    "flannel-bench",
                    "--",
                    "--agent",
                ])
                .arg(&agent)
                .env("FLANNEL_AGENT", &agent)
                .arg("--out")
                .arg(root.join("results"));
            if quick {
                cmd.arg("--quick");
            }
            if segmenting_underlay {
                cmd.arg("--segmenting-underlay");
            }
            if routed_underlay {
                cmd.arg("--routed-underlay");
            }
            if control_plane {
                cmd.arg("--control-plane");
            }
            if ipv6 {
                cmd.arg("--ipv6");
            }
            run(&mut cmd)
        }
        Cmd::Fuzz { frames } => {
            build_for_labs(&[])?;
            println!("xtask: {frames} generated frames through each program");
            run(Command::new("cargo")
                .current_dir(root())
                .env("FLANNEL_FUZZ_FRAMES", frames.to_string())
                .env("CI", "true")
                .args([
                    "test",
                    "--locked",
                    "-p",
                    "flannel-tests",
                    "--test",
                    "prog_fuzz",
                ])
                .args(["--", "--nocapture"]))
        }
        Cmd::Chaos => {
            let agent = build_for_labs(&[])?;
            chaos::run(&agent)
        }
        Cmd::Demo => {
            let agent = build_for_labs(&[])?;
            run(Command::new("cargo")
                .current_dir(root())
                .env("FLANNEL_AGENT", &agent)
                .args(["run", "--locked", "-q", "-p", "flannel-tests"])
                .args(["--bin", "flannel-demo"]))
        }
    }
}
