//! Developer commands: `cargo xtask build-ebpf | build | test | demo`.
mod demo;
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
    /// Measure flannel-ebpf against kernel VXLAN and no encapsulation; results in results/.
    Bench {
        /// Short runs for everyday use (under two minutes once built).
        #[arg(long)]
        quick: bool,
        /// GSO/TSO off on the labs' underlay ports, so every data path puts
        /// MTU-sized frames on the "wire" as with real NICs (results/bench-segmenting.*).
        #[arg(long)]
        segmenting_underlay: bool,
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

fn build_agent(release: bool) -> anyhow::Result<()> {
    toolchain::ensure_protoc()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["build", "--locked", "-p", "flannel-agent"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::BuildEbpf => build_ebpf().map(|_| ()),
        Cmd::Build => {
            build_ebpf()?;
            build_agent(true)
        }
        Cmd::Test { args } => {
            build_ebpf()?;
            build_agent(false)?;
            // Lab tests build namespaces: run them a couple at a time on 2 cores.
            run(Command::new("cargo")
                .current_dir(root())
                .args(["test", "--locked", "--workspace", "--"])
                .args(["--test-threads", "2"])
                .args(&args))
        }
        Cmd::Bench {
            quick,
            segmenting_underlay,
        } => {
            build_ebpf()?;
            build_agent(true)?;
            toolchain::ensure_apt("iperf3", "iperf3")?;
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
                .arg(root.join("target/release/flannel-agent"))
                .arg("--out")
                .arg(root.join("results"));
            if quick {
                cmd.arg("--quick");
            }
            if segmenting_underlay {
                cmd.arg("--segmenting-underlay");
            }
            run(&mut cmd)
        }
        Cmd::Demo => {
            build_ebpf()?;
            build_agent(false)?;
            demo::run()
        }
    }
}
