//! `--subnet-mgr file`: Flannel's etcd layout on disk.
//! `DIR/config` holds net-conf.json; `DIR/subnets/10.244.1.0-24` holds a lease.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context, bail};

use super::{Snapshot, Want};
use crate::{
    lease::Lease, lease::netconf::NetConf, lease::subnet::Subnet, lease::subnet6::Subnet6,
};

pub struct FileSource {
    dir: PathBuf,
    /// (name, mtime, len) of every lease file at the last read: a cheap change test.
    fingerprint: BTreeMap<String, (Option<SystemTime>, u64)>,
    /// Bad files already reported, so a poll loop does not repeat itself.
    reported: super::Reported,
    /// inotify on the leases directory, once it exists.
    watching: bool,
}

impl FileSource {
    pub fn new(dir: &Path) -> FileSource {
        FileSource {
            dir: dir.to_path_buf(),
            fingerprint: BTreeMap::new(),
            reported: super::Reported::default(),
            watching: false,
        }
    }

    /// Wake the control loop whenever an entry of the leases directory is
    /// created, written, moved or removed (the poll stays as the fallback).
    fn watch(&mut self) {
        if self.watching {
            return;
        }
        let Ok(dir) = std::ffi::CString::new(self.subnets_dir().as_os_str().as_encoded_bytes())
        else {
            return;
        };
        // SAFETY: plain inotify calls; the descriptor is owned by the thread below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return;
        }
        let mask = libc::IN_CREATE
            | libc::IN_DELETE
            | libc::IN_CLOSE_WRITE
            | libc::IN_MOVED_TO
            | libc::IN_MOVED_FROM
            | libc::IN_ATTRIB;
        // SAFETY: fd is ours, dir a valid C string.
        if unsafe { libc::inotify_add_watch(fd, dir.as_ptr(), mask) } < 0 {
            unsafe { libc::close(fd) };
            return; // not there yet: try again at the next poll
        }
        self.watching = true;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // SAFETY: reads into a buffer of its length from our descriptor.
            while unsafe { libc::read(fd, buf.as_mut_ptr() as *mut _, buf.len()) } > 0 {
                super::wake();
            }
        });
    }

    fn subnets_dir(&self) -> PathBuf {
        self.dir.join("subnets")
    }

    pub fn read_config(&self) -> anyhow::Result<NetConf> {
        let path = self.dir.join("config");
        let bytes = read_capped(&path, MAX_CONFIG_BYTES)
            .with_context(|| format!("reading net-conf.json from {}", path.display()))?;
        let text =
            String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))?;
        NetConf::parse(&text).with_context(|| format!("{}", path.display()))
    }

    fn scan(&self) -> anyhow::Result<BTreeMap<String, (Option<SystemTime>, u64)>> {
        let dir = self.subnets_dir();
        let mut out = BTreeMap::new();
        // The leases' directory itself must not lead elsewhere either.
        if fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink()) {
            bail!(
                "{} is a symbolic link: lease files are read only from a real directory",
                dir.display()
            );
        }
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for e in entries {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // our own temporary files
            }
            let meta = e.metadata().ok();
            out.insert(
                name,
                (
                    meta.as_ref().and_then(|m| m.modified().ok()),
                    meta.map_or(0, |m| m.len()),
                ),
            );
        }
        Ok(out)
    }

    /// Whether any lease file appeared, vanished or changed since the last `read`.
    pub fn changed(&mut self) -> anyhow::Result<bool> {
        self.watch();
        Ok(self.scan()? != self.fingerprint)
    }

    /// Read every lease; a bad file is skipped with a log line naming it and why.
    pub fn read(&mut self) -> anyhow::Result<Snapshot> {
        let scan = self.scan()?;
        let mut snap = Snapshot::default();
        for name in scan.keys() {
            let path = self.subnets_dir().join(name);
            match read_lease(&path, name) {
                Ok(Some(l)) => {
                    self.reported.clear(name);
                    snap.leases.insert(l.key(), l);
                }
                Ok(None) => self.reported.clear(name),
                Err(e) => {
                    let reason = format!("{e:#}");
                    if self.reported.report(name, &reason) {
                        log::warn!("skipping lease file {}: {reason}", path.display());
                    }
                }
            }
        }
        self.reported.retain(|name| scan.contains_key(name));
        self.fingerprint = scan;
        Ok(snap)
    }

    /// Our lease: reuse the one holding our public IP, else the subnet from
    /// the previous subnet.env if free, else the lowest free subnet in
    /// [SubnetMin, SubnetMax]. Written create-if-absent, so two nodes can
    /// never take the same subnet.
    pub fn acquire(&mut self, conf: &NetConf, want: &Want) -> anyhow::Result<Lease> {
        let (public_ip, backend, previous) = (want.public_ip, want.backend, want.previous);
        let snap = self.read()?;
        let keys: Vec<(Subnet, Option<Subnet6>)> = self
            .scan()?
            .keys()
            .filter_map(|k| crate::lease::parse_key(k).ok())
            .collect();
        let taken: BTreeSet<Subnet> = keys.iter().map(|k| k.0).collect();
        let mine = snap
            .leases
            .values()
            .find(|l| l.public_ip == public_ip && super::is_own_lease(l, conf, want))
            .or_else(|| {
                snap.leases
                    .values()
                    .find(|l| super::is_own_lease(l, conf, want))
            });
        if let Some(l) = mine {
            if l.public_ip != public_ip {
                log::warn!(
                    "this node's address changed from {} to {public_ip}: lease {} moves with it",
                    l.public_ip,
                    l.subnet
                );
            }
            let others6: Vec<Subnet6> = keys
                .iter()
                .filter(|k| **k != (l.subnet, l.v6.map(|v| v.subnet)))
                .filter_map(|k| k.1)
                .collect();
            let lease = want.lease(conf, l.subnet, l.v6, &others6)?;
            if *l != lease {
                self.write_lease(&lease, conf.backend.vni, true)?;
                if lease.key() != l.key() {
                    // The IPv6 half changed the lease's name: the old file goes.
                    let _ = fs::remove_file(self.subnets_dir().join(l.key()));
                }
            }
            log::info!("reusing lease {} ({})", lease.key(), want.addresses());
            return Ok(lease);
        }
        let mut taken6: Vec<Subnet6> = keys.iter().filter_map(|k| k.1).collect();
        for subnet in super::lease_candidates(conf, previous, &taken, None) {
            let lease = want.lease(conf, subnet, None, &taken6)?;
            if self.write_lease(&lease, conf.backend.vni, false)? {
                log::info!(
                    "acquired lease {} ({}, {backend})",
                    lease.key(),
                    want.addresses()
                );
                return Ok(lease);
            }
            // Taken meanwhile (IPv6-only: the key is the IPv6 subnet's).
            taken6.extend(lease.v6.map(|v| v.subnet));
        }
        bail!("{}", super::no_free_subnet(conf))
    }

    /// Whether our lease file still says what we wrote.
    pub fn holds(&self, lease: &Lease) -> bool {
        let path = self.subnets_dir().join(lease.key());
        read_capped(&path, MAX_LEASE_BYTES)
            .ok()
            .and_then(|b| Lease::parse(&lease.key(), &b).ok().flatten())
            .is_some_and(|l| l == *lease)
    }

    /// Write a lease atomically. With `replace` false the write only happens
    /// if no lease for that subnet exists (returns false then).
    pub fn write_lease(&self, lease: &Lease, vni: u32, replace: bool) -> anyhow::Result<bool> {
        let dir = self.subnets_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let target = dir.join(lease.key());
        let tmp = dir.join(format!(".{}.{}", lease.key(), std::process::id()));
        // Ours alone: a leftover of a crashed run with our pid goes first, and
        // create_new (O_EXCL) never follows a link someone put in its place.
        let _ = fs::remove_file(&tmp);
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(lease.to_json(vni).as_bytes())?;
            f.sync_all()?;
        }
        let result = if replace {
            fs::rename(&tmp, &target).map(|_| true)
        } else {
            // link() fails if the target exists: create-only-if-absent.
            let r = match fs::hard_link(&tmp, &target) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            };
            let _ = fs::remove_file(&tmp);
            r
        };
        result.with_context(|| format!("writing lease {}", target.display()))
    }
}

/// A lease is a few hundred bytes; net-conf.json a few.
const MAX_LEASE_BYTES: u64 = 64 * 1024;
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Read a regular file of at most `cap` bytes, never through a symlink and
/// never blocking on a FIFO or device someone put in the lease directory.
fn read_capped(path: &Path, cap: u64) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => anyhow::anyhow!("is a symbolic link (not followed)"),
            _ => anyhow::Error::new(e).context("unreadable"),
        })?;
    let meta = f.metadata().context("unreadable")?;
    if !meta.is_file() {
        bail!("not a regular file");
    }
    if meta.len() > cap {
        bail!("{} bytes, more than the {cap} a lease may have", meta.len());
    }
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(cap + 1)
        .read_to_end(&mut out)
        .context("unreadable")?;
    if out.len() as u64 > cap {
        bail!("grew past {cap} bytes while being read");
    }
    Ok(out)
}

fn read_lease(path: &Path, name: &str) -> anyhow::Result<Option<Lease>> {
    crate::lease::parse_key(name)?;
    let bytes = read_capped(path, MAX_LEASE_BYTES)?;
    Lease::parse(name, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseBackend;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("flannel-file-source-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("subnets")).unwrap();
        d
    }

    fn conf() -> NetConf {
        NetConf::parse(r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.3.0"}"#).unwrap()
    }

    #[test]
    fn allocates_free_subnets_then_reuses_by_public_ip() {
        let d = dir("alloc");
        let mut src = FileSource::new(&d);
        let mac = LeaseBackend::Vxlan {
            vtep_mac: crate::lease::mac::Mac::stable_from(b"a"),
        };
        let a = src
            .acquire(&conf(), &crate::source::want_v4("10.1.5.10", mac, None))
            .map(|l| l.subnet)
            .unwrap();
        let b = src
            .acquire(&conf(), &crate::source::want_v4("10.1.5.11", mac, None))
            .map(|l| l.subnet)
            .unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("10.244.1.0/24".into(), "10.244.2.0/24".into())
        );
        // Same public IP again: the same lease, not a new one.
        let again = src
            .acquire(&conf(), &crate::source::want_v4("10.1.5.10", mac, None))
            .map(|l| l.subnet)
            .unwrap();
        assert_eq!(again, a);
        // The previous subnet.env's subnet is preferred when free.
        let prev = Subnet::from_key("10.244.3.0-24").unwrap();
        let c = src
            .acquire(
                &conf(),
                &crate::source::want_v4("10.1.5.12", mac, Some(prev)),
            )
            .map(|l| l.subnet)
            .unwrap();
        assert_eq!(c, prev);
        // The range is full now.
        let err = src
            .acquire(&conf(), &crate::source::want_v4("10.1.5.13", mac, None))
            .unwrap_err();
        assert!(format!("{err:#}").contains("no free subnet"), "{err:#}");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn dual_stack_leases_are_named_and_kept_as_flanneld_names_them() {
        let d = dir("dual");
        fs::write(
            d.join("config"),
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let mut src = FileSource::new(&d);
        let conf = src.read_config().unwrap();
        let mac6 = crate::lease::mac::Mac::stable_from(b"v6");
        let backend = LeaseBackend::Vxlan {
            vtep_mac: crate::lease::mac::Mac::stable_from(b"v4"),
        };
        let mut want = crate::source::want_v4("10.1.5.11", backend, None);
        want.v6 = Some(("fc00::11".parse().unwrap(), Some(mac6)));
        want.previous6 = Some("fd00:10:244:7::/64".parse().unwrap());
        let l = src.acquire(&conf, &want).unwrap();
        assert_eq!(l.key(), "10.244.1.0-24&fd00:10:244:7::-64");
        let text = fs::read_to_string(d.join("subnets").join(l.key())).unwrap();
        assert!(text.contains(r#""PublicIPv6":"fc00::11""#), "{text}");
        assert!(
            text.contains(&format!(
                r#""BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}"#
            )),
            "{text}"
        );
        // Restarted without the previous subnet.env: the same lease.
        want.previous6 = None;
        assert_eq!(src.acquire(&conf, &want).unwrap(), l);
        // A v4-only lease of ours gains its IPv6 half under the new name.
        let d4 = dir("dual-upgrade");
        fs::write(d4.join("config"), fs::read(d.join("config")).unwrap()).unwrap();
        let mut src4 = FileSource::new(&d4);
        let old = src4
            .acquire(&conf, &crate::source::want_v4("10.1.5.11", backend, None))
            .unwrap();
        assert_eq!(old.key(), "10.244.1.0-24");
        let new = src4.acquire(&conf, &want).unwrap();
        assert_eq!(new.subnet, old.subnet);
        assert!(new.v6.is_some());
        let names: Vec<String> = fs::read_dir(d4.join("subnets"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [new.key()]);
        // Another node does not take a taken IPv6 subnet.
        let mut theirs = crate::source::want_v4("10.1.5.12", backend, None);
        theirs.v6 = Some(("fc00::12".parse().unwrap(), Some(mac6)));
        theirs.previous6 = l.v6.map(|v| v.subnet);
        let t = src.acquire(&conf, &theirs).unwrap();
        assert_ne!(t.v6.unwrap().subnet, l.v6.unwrap().subnet);
        let _ = fs::remove_dir_all(&d);
        let _ = fs::remove_dir_all(&d4);
    }

    #[test]
    fn ipv6_only_leases_are_named_and_kept_as_flanneld_names_them() {
        let d = dir("v6only");
        fs::write(
            d.join("config"),
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let mut src = FileSource::new(&d);
        let conf = src.read_config().unwrap();
        let want = |ip: &str, seed: &[u8]| {
            let mac = crate::lease::mac::Mac::stable_from(seed);
            Want {
                public_ip: std::net::Ipv4Addr::UNSPECIFIED,
                backend: LeaseBackend::Vxlan { vtep_mac: mac },
                v6: Some((ip.parse().unwrap(), Some(mac))),
                previous: None,
                previous6: None,
            }
        };
        let a = src.acquire(&conf, &want("fc00::11", b"a")).unwrap();
        assert!(!a.has_v4());
        let key = a.key();
        assert!(key.starts_with("0.0.0.0-0&fd00:10:244:"), "{key}");
        let text = fs::read_to_string(d.join("subnets").join(&key)).unwrap();
        assert!(text.contains(r#""PublicIP":"0.0.0.0""#), "{text}");
        assert!(!text.contains(r#""BackendData""#), "{text}");
        // Other nodes get other IPv6 subnets, though every key starts alike.
        let b = src.acquire(&conf, &want("fc00::12", b"b")).unwrap();
        let c = src.acquire(&conf, &want("fc00::13", b"c")).unwrap();
        let subnets: BTreeSet<_> = [a, b, c].iter().map(|l| l.v6.unwrap().subnet).collect();
        assert_eq!(subnets.len(), 3);
        // A restart keeps the lease of our public IPv6 address.
        assert_eq!(src.acquire(&conf, &want("fc00::12", b"b")).unwrap(), b);
        assert_eq!(src.read().unwrap().leases.len(), 3);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn create_if_absent_never_overwrites() {
        let d = dir("excl");
        let src = FileSource::new(&d);
        let l = Lease {
            subnet: Subnet::from_key("10.244.1.0-24").unwrap(),
            public_ip: "10.1.5.10".parse().unwrap(),
            backend: LeaseBackend::Vxlan {
                vtep_mac: crate::lease::mac::Mac::stable_from(b"x"),
            },
            v6: None,
        };
        assert!(src.write_lease(&l, 1, false).unwrap());
        let other = Lease {
            public_ip: "10.1.5.99".parse().unwrap(),
            ..l
        };
        assert!(!src.write_lease(&other, 1, false).unwrap());
        assert!(src.holds(&l));
        assert!(!src.holds(&other));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn only_small_regular_lease_files_are_read() {
        let d = dir("unsafe");
        let subnets = d.join("subnets");
        let good = r#"{"PublicIP":"10.1.5.12","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"02:42:8f:11:22:20"}}"#;
        fs::write(subnets.join("10.244.2.0-24"), good).unwrap();
        // A symlink to a lease elsewhere: not followed.
        let outside = d.join("elsewhere");
        fs::write(&outside, good.replace("10.1.5.12", "10.1.5.13")).unwrap();
        std::os::unix::fs::symlink(&outside, subnets.join("10.244.3.0-24")).unwrap();
        // A FIFO: reading it would block the agent forever.
        let fifo = std::ffi::CString::new(subnets.join("10.244.4.0-24").to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        // A directory, and a file far larger than any lease.
        fs::create_dir(subnets.join("10.244.5.0-24")).unwrap();
        fs::write(subnets.join("10.244.6.0-24"), vec![b' '; 100_000]).unwrap();
        let mut src = FileSource::new(&d);
        let snap = src.read().unwrap();
        assert_eq!(
            snap.leases
                .keys()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
            ["10.244.2.0-24"]
        );
        let why: BTreeMap<String, String> = src
            .reported
            .entries()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(why["10.244.3.0-24"].contains("symbolic link"), "{why:?}");
        assert!(
            why["10.244.4.0-24"].contains("not a regular file"),
            "{why:?}"
        );
        assert!(
            why["10.244.5.0-24"].contains("not a regular file"),
            "{why:?}"
        );
        assert!(why["10.244.6.0-24"].contains("more than"), "{why:?}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_link_in_place_of_our_temp_file_is_not_written_through() {
        let d = dir("tmplink");
        let victim = d.join("victim");
        fs::write(&victim, "untouched").unwrap();
        let lease = Lease {
            subnet: Subnet::from_key("10.244.2.0-24").unwrap(),
            public_ip: "10.1.5.12".parse().unwrap(),
            backend: LeaseBackend::HostGw,
            v6: None,
        };
        let tmp = d
            .join("subnets")
            .join(format!(".10.244.2.0-24.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        assert!(FileSource::new(&d).write_lease(&lease, 1, false).unwrap());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        let _ = fs::remove_dir_all(&d);
    }
    #[test]
    fn a_symlinked_leases_directory_is_refused() {
        let d = dir("dirlink");
        let real = d.join("real");
        fs::create_dir(&real).unwrap();
        fs::remove_dir_all(d.join("subnets")).unwrap();
        std::os::unix::fs::symlink(&real, d.join("subnets")).unwrap();
        let err = FileSource::new(&d).read().err().unwrap();
        assert!(format!("{err:#}").contains("is a symbolic link"), "{err:#}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn our_lease_moves_with_a_changed_address() {
        let d = dir("moved");
        fs::write(
            d.join("config"),
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        let mut src = FileSource::new(&d);
        let conf = src.read_config().unwrap();
        let backend = LeaseBackend::Vxlan {
            vtep_mac: crate::lease::mac::Mac::stable_from(b"ours"),
        };
        let first = src
            .acquire(&conf, &crate::source::want_v4("10.1.5.11", backend, None))
            .map(|l| l.subnet)
            .unwrap();
        // New address, same VtepMAC and last subnet.env: the same subnet, re-keyed.
        let again = src
            .acquire(
                &conf,
                &crate::source::want_v4("10.1.5.31", backend, Some(first)),
            )
            .map(|l| l.subnet)
            .unwrap();
        assert_eq!(again, first);
        let snap = src.read().unwrap();
        assert_eq!(snap.leases.len(), 1);
        assert_eq!(
            snap.leases[&first.to_key()].public_ip.to_string(),
            "10.1.5.31"
        );
        // Another node's VtepMAC does not take it over.
        let other = LeaseBackend::Vxlan {
            vtep_mac: crate::lease::mac::Mac::stable_from(b"other"),
        };
        let theirs = src
            .acquire(
                &conf,
                &crate::source::want_v4("10.1.5.40", other, Some(first)),
            )
            .map(|l| l.subnet)
            .unwrap();
        assert_ne!(theirs, first);
        let _ = fs::remove_dir_all(&d);
    }
}
