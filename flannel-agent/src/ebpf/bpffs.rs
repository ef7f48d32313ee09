//! Making sure the pin root lives on a BPF filesystem.
use std::{ffi::CString, path::Path};

use anyhow::{Context, bail};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid C string and st a valid out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Mount bpffs at /sys/fs/bpf when the pin root is under it and nothing is
/// mounted there yet (as systemd does on most distributions).
pub fn ensure_mounted(pin_root: &Path) -> anyhow::Result<()> {
    let mut probe = pin_root;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if is_bpffs(probe) {
        return Ok(());
    }
    let base = Path::new("/sys/fs/bpf");
    if !pin_root.starts_with(base) {
        bail!("pin root {} is not on a BPF filesystem", pin_root.display());
    }
    let target = CString::new("/sys/fs/bpf").context("path")?;
    let fstype = CString::new("bpf").context("fstype")?;
    // SAFETY: all pointers are valid C strings; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    log::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}
