//! bpf(2) calls done here rather than through aya 0.14: map elements
//! (lookup, update, delete, next key) and a link's interface.
//!
//! Why: aya hands the kernel the address of its `MaybeUninit::zeroed()` out
//! value only as an integer inside `bpf_attr` (`ptr as u64`). In release
//! builds rustc 1.95's LLVM, after inlining, forwards the zero it stored to the
//! load after the syscall, as if the kernel could not have written there: our
//! `show arp` printed `00:00:00:00:00:00` for every VtepMAC (the optimised
//! `Tables::arp_entries` inserted a constant zero MAC and never read the
//! value), while the debug build and `bpftool` showed the right ones. Here
//! every buffer the kernel reads or writes escapes as a pointer
//! (`black_box`) before the syscall, and what the kernel wrote is read back
//! with a volatile load, so no optimiser can assume the memory unchanged.
use std::{
    io,
    marker::PhantomData,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    ptr,
};

use aya::{
    Pod,
    maps::{Map, MapData},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The element commands' part of `union bpf_attr`; the kernel zero-fills
/// the rest of the union when the size passed is smaller.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value`, or `next_key` for BPF_MAP_GET_NEXT_KEY.
    value: u64,
    flags: u64,
}

/// The address of a buffer for the kernel, its provenance exposed to the
/// optimiser as well (a pointer passed to an opaque barrier escapes).
fn addr<T>(p: *const T) -> u64 {
    std::hint::black_box(p).expose_provenance() as u64
}

fn sys_bpf(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    key: u64,
    value: u64,
    flags: u64,
) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key,
        value,
        flags,
    };
    let attr_ptr = std::hint::black_box(ptr::from_mut(&mut attr));
    // SAFETY: attr points to a live ElemAttr of the size given; the kernel
    // reads key/value buffers of the map's sizes, which callers guarantee.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr_ptr,
            size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn not_found(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

/// The fd of a map as aya's loader hands it out (the kinds this project uses).
pub fn fd_of(map: &Map) -> Option<BorrowedFd<'_>> {
    match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d) => Some(d.fd().as_fd()),
        _ => None,
    }
}

/// Possible CPUs: per-CPU maps hold one value per possible CPU.
pub fn possible_cpus() -> io::Result<usize> {
    aya::util::nr_cpus().map_err(|(_, e)| e)
}

/// A map whose key and value types the caller vouches for (the pinned map's
/// sizes are checked against them when it is opened).
pub struct TypedMap<K, V> {
    data: MapData,
    _types: PhantomData<(K, V)>,
}

impl<K: Pod, V: Pod> TypedMap<K, V> {
    pub fn new(data: MapData) -> Self {
        TypedMap {
            data,
            _types: PhantomData,
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.data.fd().as_fd()
    }

    pub fn get(&self, key: &K) -> io::Result<Option<V>> {
        lookup(self.fd(), key)
    }

    pub fn set(&self, key: &K, value: &V) -> io::Result<()> {
        update(self.fd(), key, value)
    }

    /// Remove `key`; true if it was there.
    pub fn remove(&self, key: &K) -> io::Result<bool> {
        match sys_bpf(BPF_MAP_DELETE_ELEM, self.fd(), addr(key), 0, 0) {
            Ok(()) => Ok(true),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every key at the time of the walk.
    pub fn keys(&self) -> io::Result<Vec<K>> {
        let mut out: Vec<K> = Vec::new();
        loop {
            let mut next = MaybeUninit::<K>::zeroed();
            let prev = out.last().map_or(0, |k| addr(k));
            match sys_bpf(
                BPF_MAP_GET_NEXT_KEY,
                self.fd(),
                prev,
                addr(next.as_mut_ptr()),
                0,
            ) {
                // SAFETY: the kernel wrote a whole key; K is Pod.
                Ok(()) => out.push(unsafe { ptr::read_volatile(next.as_ptr()) }),
                Err(e) if not_found(&e) => return Ok(out),
                Err(e) => return Err(e),
            }
        }
    }

    /// Every entry; a key deleted between the walk and its lookup is left out.
    pub fn entries(&self) -> io::Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        for k in self.keys()? {
            if let Some(v) = self.get(&k)? {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// A per-CPU map's values for `key`, one per possible CPU.
    pub fn get_per_cpu(&self, key: &K) -> io::Result<Option<Vec<V>>> {
        lookup_per_cpu(self.fd(), key)
    }

    /// Set a per-CPU map's value for `key` to `value` on every CPU.
    pub fn set_per_cpu(&self, key: &K, value: &V) -> io::Result<()> {
        update_per_cpu(self.fd(), key, value)
    }

    /// Many [`Self::set`]s in one call; `Err((done, e))` as [`update_batch`].
    pub fn set_many(&self, keys: &[K], values: &[V]) -> Result<(), (usize, io::Error)> {
        update_batch(self.fd(), keys, values)
    }

    /// Many [`Self::set_per_cpu`]s of one value in one call.
    pub fn set_many_per_cpu(&self, keys: &[K], value: &V) -> Result<(), (usize, io::Error)> {
        update_batch_per_cpu(self.fd(), keys, value)
    }
}

/// One element of the map behind `fd`.
pub fn lookup<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = MaybeUninit::<V>::zeroed();
    match sys_bpf(
        BPF_MAP_LOOKUP_ELEM,
        fd,
        addr(key),
        addr(value.as_mut_ptr()),
        0,
    ) {
        // SAFETY: the kernel wrote a whole value; V is Pod.
        Ok(()) => Ok(Some(unsafe { ptr::read_volatile(value.as_ptr()) })),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Insert or replace one element of the map behind `fd`.
pub fn update<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    sys_bpf(BPF_MAP_UPDATE_ELEM, fd, addr(key), addr(value), 0)
}

/// A per-CPU map's values for `key`, one per possible CPU.
pub fn lookup_per_cpu<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K) -> io::Result<Option<Vec<V>>> {
    let cpus = possible_cpus()?;
    let stride = size_of::<V>().next_multiple_of(8);
    let mut buf = vec![0u8; stride * cpus];
    match sys_bpf(
        BPF_MAP_LOOKUP_ELEM,
        fd,
        addr(key),
        addr(buf.as_mut_ptr()),
        0,
    ) {
        Ok(()) => {}
        Err(e) if not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok(Some(
        (0..cpus)
            // SAFETY: each stride holds one V as the kernel wrote it.
            .map(|c| unsafe { ptr::read_volatile(buf.as_ptr().add(c * stride).cast::<V>()) })
            .collect(),
    ))
}

/// Set a per-CPU map's value for `key` to `value` on every possible CPU.
pub fn update_per_cpu<K: Pod, V: Pod>(fd: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let cpus = possible_cpus()?;
    let stride = size_of::<V>().next_multiple_of(8);
    let mut buf = vec![0u8; stride * cpus];
    for c in 0..cpus {
        // SAFETY: in bounds; unaligned write of a Pod value.
        unsafe { ptr::write_unaligned(buf.as_mut_ptr().add(c * stride).cast::<V>(), *value) };
    }
    sys_bpf(BPF_MAP_UPDATE_ELEM, fd, addr(key), addr(buf.as_ptr()), 0)
}

/// `union bpf_attr`'s batch part (BPF_MAP_*_BATCH).
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: elements given; out: elements done.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Insert or replace `keys[i]` → the value bytes `values[i * stride..]` in
/// one call: a few thousand entries cost one syscall, not one each. On an
/// error, `Err((done, e))`: the first `done` elements are written, the rest
/// not (the kernel stops at the first failure). Maps without batch support
/// fail with EINVAL or ENOTSUPP and `done` 0.
fn update_batch_raw<K: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
) -> Result<(), (usize, io::Error)> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: addr(keys.as_ptr()),
        values: addr(values.as_ptr()),
        count: keys.len() as u32,
        map_fd: fd.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    let attr_ptr = std::hint::black_box(ptr::from_mut(&mut attr));
    // SAFETY: attr points to a live BatchAttr; keys and values hold `count`
    // elements of the map's key and value sizes (callers guarantee).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            attr_ptr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: the kernel wrote count back into the live attr.
        let done = unsafe { ptr::read_volatile(&raw const (*attr_ptr).count) } as usize;
        return Err((done.min(keys.len()), e));
    }
    Ok(())
}

/// [`update`] for many elements at once (see [`update_batch_raw`]).
pub fn update_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    let n = keys.len().min(values.len());
    // SAFETY: V is Pod: its bytes may be viewed as a slice.
    let bytes =
        unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), n * size_of::<V>()) };
    update_batch_raw(fd, &keys[..n], bytes)
}

/// [`update_per_cpu`] for many keys at once, every CPU's value `value`.
pub fn update_batch_per_cpu<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    value: &V,
) -> Result<(), (usize, io::Error)> {
    let cpus = possible_cpus().map_err(|e| (0, e))?;
    let stride = size_of::<V>().next_multiple_of(8);
    let mut buf = vec![0u8; stride * cpus * keys.len()];
    for i in 0..cpus * keys.len() {
        // SAFETY: in bounds; unaligned write of a Pod value.
        unsafe { ptr::write_unaligned(buf.as_mut_ptr().add(i * stride).cast::<V>(), *value) };
    }
    update_batch_raw(fd, keys, &buf)
}

/// The interface the TCX or XDP link pinned at `path` is attached to; 0 once
/// that interface is gone (the link is then defunct). aya 0.14 exposes
/// neither a pinned link's fd nor this field.
pub fn pinned_link_ifindex(path: &std::path::Path) -> io::Result<u32> {
    link_ifindex(open_pinned(path)?.as_fd())
}

/// Detach the program of the link pinned at `path` now. Unlinking the pin
/// alone frees the link only after an RCU grace period and a work item, so
/// the program could still see packets after `uninstall` returned.
pub fn detach_pinned_link(path: &std::path::Path) -> io::Result<()> {
    let fd = open_pinned(path)?;
    #[repr(C)]
    struct DetachAttr {
        link_fd: u32,
    }
    let mut attr = DetachAttr {
        link_fd: fd.as_raw_fd() as u32,
    };
    let attr_ptr = std::hint::black_box(ptr::from_mut(&mut attr));
    // SAFETY: attr points to a live DetachAttr naming an open link fd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr_ptr,
            size_of::<DetachAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An fd for the object pinned at `path` (BPF_OBJ_GET).
fn open_pinned(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd, unix::ffi::OsStrExt};
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    #[repr(C)]
    struct GetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = GetAttr {
        pathname: addr(c.as_ptr()),
        bpf_fd: 0,
        file_flags: 0,
    };
    let attr_ptr = std::hint::black_box(ptr::from_mut(&mut attr));
    // SAFETY: attr points to a live GetAttr naming a NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr_ptr,
            size_of::<GetAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

fn link_ifindex(link: BorrowedFd<'_>) -> io::Result<u32> {
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the union
    // whose xdp and tcx members both start with the ifindex.
    let mut info = [0u64; 32];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: addr(info.as_mut_ptr()),
    };
    let attr_ptr = std::hint::black_box(ptr::from_mut(&mut attr));
    // SAFETY: attr points to a live InfoAttr; info is info_len bytes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr_ptr,
            size_of::<InfoAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: in bounds of info; the kernel wrote it.
    let word = unsafe { ptr::read_volatile(info.as_ptr().add(2)) };
    Ok(word as u32)
}
