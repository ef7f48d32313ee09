//! What the eBPF build needs beyond stable Rust, installed on first use:
//! the nightly's rust-src, and bpf-linker built against the nightly's own LLVM.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::run;

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let s = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly toolchain is needed for the eBPF build (rustup toolchain install nightly)",
    )?;
    Ok(PathBuf::from(s.trim()))
}

fn llvm_major() -> anyhow::Result<String> {
    let v = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let line = v
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV does not say its LLVM version")?;
    Ok(line.split('.').next().unwrap_or(line).to_string())
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib/src/rust/library/core").exists()
}

fn has_bpf_linker() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn ensure() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if !has_rust_src(&sysroot) {
        println!(
            "xtask: installing rust-src for the nightly toolchain (needed by -Z build-std=core)"
        );
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if !has_bpf_linker() {
        install_bpf_linker(&sysroot)?;
    }
    Ok(())
}

/// bpf-linker must use the same LLVM as the nightly's rustc: point LLVM_PREFIX
/// at a directory whose lib/ holds links to the nightly's libLLVM.
fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let major = llvm_major()?;
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so")))
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = PathBuf::from(home).join(".cache/flannel-ebpf/llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_string(), libllvm.clone()] {
        let link = prefix_lib.join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&libllvm), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "xtask: bpf-linker is missing: building it from crates.io against the nightly's LLVM {major} ({}), this takes a few minutes",
        lib.join(&libllvm).display()
    );
    run(Command::new("cargo")
        .env("LLVM_PREFIX", &prefix)
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}")))
}
