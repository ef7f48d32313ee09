//! Capturing what an interface sends, GSO aggregates whole (AF_PACKET
//! with PACKET_VNET_HDR), to check the bytes on the wire.
use std::{os::fd::AsRawFd, time::Duration};

use anyhow::Context;

use crate::netns::Netns;

/// A frame seen on an interface, with the GSO size the kernel gave it
/// (0: a single packet).
pub struct Captured {
    pub gso_size: u16,
    pub frame: Vec<u8>,
}

/// The frames an interface in `ns` sends (AF_PACKET, outgoing only), GSO
/// aggregates whole, for a bounded window or until `stop` is called.
pub struct WireCapture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<anyhow::Result<Vec<Captured>>>,
}

impl WireCapture {
    pub fn start_outgoing(ns: &Netns, ifname: &str, window: Duration) -> anyhow::Result<Self> {
        let ifindex: i32 = ns
            .sh(&format!("cat /sys/class/net/{ifname}/ifindex"))?
            .trim()
            .parse()
            .with_context(|| format!("ifindex of {ifname}"))?;
        let path = format!("/run/netns/{}", ns.name);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || -> anyhow::Result<Vec<Captured>> {
            let fd = match crate::netns::enter(&path).and_then(|_| packet_socket(ifindex)) {
                Ok(fd) => {
                    let _ = tx.send(Ok(()));
                    fd
                }
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("{e:#}")));
                    return Ok(Vec::new());
                }
            };
            let end = std::time::Instant::now() + window;
            let mut got = Vec::new();
            // virtio_net_hdr (10 bytes) then the frame, a whole aggregate.
            let mut buf = vec![0u8; 10 + 65_536 + 256];
            while std::time::Instant::now() < end
                && !flag.load(std::sync::atomic::Ordering::Relaxed)
            {
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: buf and from are live buffers of the sizes given.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut _,
                        buf.len(),
                        0,
                        &mut from as *mut _ as *mut libc::sockaddr,
                        &mut len,
                    )
                };
                if n < 10 || from.sll_pkttype != libc::PACKET_OUTGOING {
                    continue;
                }
                got.push(Captured {
                    gso_size: u16::from_ne_bytes([buf[4], buf[5]]),
                    frame: buf[10..n as usize].to_vec(),
                });
            }
            Ok(got)
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("capture did not start")??;
        Ok(WireCapture { stop, handle })
    }

    pub fn finish(self) -> anyhow::Result<Vec<Captured>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("capture thread panicked"))?
    }
}

/// An AF_PACKET socket on `ifindex` that hands GSO metadata over
/// (PACKET_VNET_HDR) and wakes up every 100 ms.
fn packet_socket(ifindex: i32) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls; the fd is owned from creation on.
    unsafe {
        let raw = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        );
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(raw);
        let on: libc::c_int = 1;
        if libc::setsockopt(
            raw,
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            &on as *const _ as *const _,
            size_of::<libc::c_int>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("PACKET_VNET_HDR");
        }
        // Room for a burst of aggregates (best effort: gaps are allowed for).
        let buf: libc::c_int = 16 << 20;
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &buf as *const _ as *const _,
            size_of::<libc::c_int>() as u32,
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        if libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const _,
            size_of::<libc::timeval>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = ifindex;
        if libc::bind(
            raw,
            &addr as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_ll>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("binding the capture");
        }
        Ok(fd)
    }
}
