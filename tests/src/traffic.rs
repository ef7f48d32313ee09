//! Traffic between pods: ping counts and TCP transfers whose content is checked.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::netns::Netns;

/// `ping` from inside `ns`: (sent, received). Bounded by count and deadline.
pub fn ping(
    ns: &Netns,
    dst: impl Into<IpAddr>,
    count: u32,
    interval: f32,
) -> anyhow::Result<(u32, u32)> {
    let dst: IpAddr = dst.into();
    // Bounded by -c and -W (no -w: with it ping sends until it has -c replies).
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ping", "-n", "-q"])
        .args(["-c", &count.to_string(), "-i", &interval.to_string()])
        .args(["-W", "1", &dst.to_string()])
        .output()
        .context("running ping")?;
    parse_ping(&String::from_utf8_lossy(&out.stdout))
}

fn parse_ping(text: &str) -> anyhow::Result<(u32, u32)> {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary in {text:?}"))?;
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .filter_map(|s| s.parse().ok())
        .collect();
    match nums[..] {
        [sent, received] => Ok((sent, received)),
        _ => bail!("cannot read ping summary {line:?}"),
    }
}

/// Ping until `dst` answers once (bounded), e.g. after set-up.
pub fn wait_reachable(ns: &Netns, dst: impl Into<IpAddr>, timeout: Duration) -> anyhow::Result<()> {
    let dst: IpAddr = dst.into();
    crate::wait_for(
        &format!("{dst} to answer from {}", ns.name),
        timeout,
        || ping(ns, dst, 1, 0.2).ok().filter(|(_, r)| *r == 1),
    )
    .map(|_| ())
}

/// A ping running in the background; `finish` returns (sent, received).
pub struct BackgroundPing {
    child: Child,
}

impl BackgroundPing {
    /// `count` pings every `interval_ms`: bounded, it stops by itself.
    pub fn start(ns: &Netns, dst: Ipv4Addr, count: u32, interval_ms: u32) -> anyhow::Result<Self> {
        let interval = format!("{:.3}", interval_ms as f32 / 1000.0);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "ping", "-n", "-q"])
            .args(["-c", &count.to_string(), "-i", &interval, "-W", "1"])
            .arg(dst.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ping")?;
        Ok(BackgroundPing { child })
    }

    pub fn finish(self) -> anyhow::Result<(u32, u32)> {
        let out = self.child.wait_with_output().context("waiting for ping")?;
        parse_ping(&String::from_utf8_lossy(&out.stdout))
    }
}

/// Deterministic payload so the receiver can check every byte.
fn payload(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Send `len` bytes from `client` pod to `server` pod and `len` other bytes
/// back over one TCP connection; both sides check the content.
/// Accept one connection, or fail after `limit` (a client that never
/// connects must not hang the test).
fn accept_within(l: &TcpListener, limit: Duration) -> anyhow::Result<TcpStream> {
    l.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((c, _)) => {
                c.set_nonblocking(false)?;
                return Ok(c);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    bail!("no connection within {limit:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

pub fn tcp_exchange(
    client: &Netns,
    server: &Netns,
    server_ip: impl Into<IpAddr>,
    port: u16,
    len: usize,
) -> anyhow::Result<()> {
    let server_ip: IpAddr = server_ip.into();
    // Bound to the server address's family's wildcard.
    let any: IpAddr = match server_ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let up = payload(len, 0x1234_5678 ^ port as u32);
    let down = payload(len, 0x8765_4321 ^ port as u32);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let srv = s.spawn(|| -> anyhow::Result<()> {
            server.run(|| -> anyhow::Result<()> {
                let l = TcpListener::bind((any, port)).context("bind")?;
                let _ = ready_tx.send(());
                let mut c = accept_within(&l, Duration::from_secs(15))?;
                c.set_read_timeout(Some(Duration::from_secs(20)))?;
                let mut got = vec![0u8; len];
                c.read_exact(&mut got).context("server reading")?;
                if got != up {
                    bail!("server received {len} bytes that differ from what was sent");
                }
                c.write_all(&down).context("server writing")?;
                Ok(())
            })?
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("server did not start")?;
        let cli = client.run(|| -> anyhow::Result<()> {
            let addr = SocketAddr::from((server_ip, port));
            let mut c =
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).context("connect")?;
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            c.write_all(&up).context("client writing")?;
            let mut got = vec![0u8; len];
            c.read_exact(&mut got).context("client reading")?;
            if got != down {
                bail!("client received {len} bytes that differ from what was sent");
            }
            Ok(())
        })?;
        let srv = srv
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
        cli.context("client side")?;
        srv.context("server side")
    })
}

/// A paced TCP stream running in the background from one pod to another:
/// `chunks` writes of `chunk` bytes every `pace_ms` (bounded, it stops by
/// itself); the server checks every byte and confirms the count.
pub struct BackgroundTcp {
    client: std::thread::JoinHandle<anyhow::Result<u64>>,
    server: std::thread::JoinHandle<anyhow::Result<u64>>,
}

impl BackgroundTcp {
    pub fn start(
        client: &Netns,
        server: &Netns,
        server_ip: Ipv4Addr,
        port: u16,
        (chunks, chunk, pace_ms): (usize, usize, u64),
    ) -> anyhow::Result<Self> {
        let total = chunks * chunk;
        let data = payload(total, 0x5eed ^ port as u32);
        let expect = data.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server_path = format!("/run/netns/{}", server.name);
        let server = std::thread::spawn(move || -> anyhow::Result<u64> {
            crate::netns::enter(&server_path)?;
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).context("bind")?;
            let _ = ready_tx.send(());
            let (mut c, _) = l.accept().context("accept")?;
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut got = vec![0u8; total];
            c.read_exact(&mut got)
                .context("server reading the stream")?;
            if got != expect {
                bail!("the stream's {total} bytes differ from what was sent");
            }
            c.write_all(&(total as u64).to_be_bytes())
                .context("server confirming")?;
            Ok(total as u64)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("stream server did not start")?;
        let client_path = format!("/run/netns/{}", client.name);
        let client = std::thread::spawn(move || -> anyhow::Result<u64> {
            crate::netns::enter(&client_path)?;
            let addr = SocketAddr::from((server_ip, port));
            let mut c =
                TcpStream::connect_timeout(&addr, Duration::from_secs(5)).context("connect")?;
            c.set_read_timeout(Some(Duration::from_secs(20)))?;
            c.set_write_timeout(Some(Duration::from_secs(20)))?;
            for part in data.chunks(chunk) {
                c.write_all(part).context("client writing the stream")?;
                std::thread::sleep(Duration::from_millis(pace_ms));
            }
            let mut n = [0u8; 8];
            c.read_exact(&mut n)
                .context("client reading the confirmation")?;
            Ok(u64::from_be_bytes(n))
        });
        Ok(BackgroundTcp { client, server })
    }

    /// Bytes the server received and checked.
    pub fn finish(self) -> anyhow::Result<u64> {
        let c = self
            .client
            .join()
            .map_err(|_| anyhow::anyhow!("stream client panicked"))?;
        let s = self
            .server
            .join()
            .map_err(|_| anyhow::anyhow!("stream server panicked"))?;
        s.context("stream server")?;
        c.context("stream client")
    }
}

/// TCP segments retransmitted by the stack of `ns` (TcpRetransSegs).
pub fn tcp_retransmits(ns: &Netns) -> anyhow::Result<u64> {
    let snmp = ns.sh("cat /proc/net/snmp")?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next(), tcp.next());
    let (Some(names), Some(values)) = (names, values) else {
        bail!("no Tcp lines in /proc/net/snmp");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .context("no RetransSegs in /proc/net/snmp")
}

/// Put raw Ethernet frames on `ifname` inside `ns` (AF_PACKET): traffic no
/// socket of a well-behaved host would send.
pub fn inject(ns: &Netns, ifname: &str, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    let ifindex: i32 = ns
        .sh(&format!("cat /sys/class/net/{ifname}/ifindex"))?
        .trim()
        .parse()?;
    ns.run(|| -> anyhow::Result<()> {
        // SAFETY: plain socket calls on a descriptor this function owns.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex;
            addr.sll_halen = 6;
            let mut res = Ok(());
            for f in frames {
                addr.sll_addr[..6].copy_from_slice(&f[..6]);
                let n = libc::sendto(
                    fd,
                    f.as_ptr() as *const _,
                    f.len(),
                    0,
                    &addr as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if n < 0 {
                    res = Err(std::io::Error::last_os_error().into());
                    break;
                }
            }
            libc::close(fd);
            res
        }
    })?
}

/// Send `bytes` to `dst` from a raw IPv4 socket of `protocol` in `ns`:
/// with IPPROTO_RAW `bytes` is the whole IPv4 packet (any source), otherwise
/// the transport header and payload as written (a broken checksum stays).
pub fn send_raw(ns: &Netns, protocol: i32, dst: Ipv4Addr, bytes: &[u8]) -> anyhow::Result<()> {
    ns.run(|| -> anyhow::Result<()> {
        // SAFETY: a raw socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol);
            if fd < 0 {
                return Err(std::io::Error::last_os_error()).context("raw socket");
            }
            let mut to: libc::sockaddr_in = std::mem::zeroed();
            to.sin_family = libc::AF_INET as u16;
            to.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
            let n = libc::sendto(
                fd,
                bytes.as_ptr() as *const _,
                bytes.len(),
                0,
                &to as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n < 0 {
                return Err(err).context("sendto");
            }
            Ok(())
        }
    })?
}

/// Datagrams a UDP socket in `ns` receives on `port` for `window`.
pub struct UdpSink {
    handle: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl UdpSink {
    pub fn start(ns: &Netns, port: u16, window: Duration) -> anyhow::Result<UdpSink> {
        UdpSink::start_on(ns, "0.0.0.0", port, window)
    }

    /// The same on IPv6 (`[::]:port`).
    pub fn start6(ns: &Netns, port: u16, window: Duration) -> anyhow::Result<UdpSink> {
        UdpSink::start_on(ns, "::", port, window)
    }

    fn start_on(
        ns: &Netns,
        any: &'static str,
        port: u16,
        window: Duration,
    ) -> anyhow::Result<UdpSink> {
        let path = format!("/run/netns/{}", ns.name);
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            let sock = crate::netns::enter(&path)
                .and_then(|_| Ok(std::net::UdpSocket::bind((any, port))?));
            let sock = match sock {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Vec::new();
                }
            };
            let end = std::time::Instant::now() + window;
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
                let _ = sock.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                if let Ok(n) = sock.recv(&mut buf) {
                    got.push(buf[..n].to_vec());
                }
            }
            got
        });
        rx.recv()??;
        Ok(UdpSink { handle })
    }

    pub fn finish(self) -> Vec<Vec<u8>> {
        self.handle.join().unwrap_or_default()
    }
}

/// One UDP datagram from `ns`, bound to `src`, to `[dst]:port` (the kernel
/// fragments it when it is larger than the path MTU).
pub fn send_udp6(
    ns: &Netns,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    port: u16,
    bytes: &[u8],
) -> anyhow::Result<()> {
    ns.run(|| -> anyhow::Result<()> {
        let s = std::net::UdpSocket::bind((src, 0))?;
        s.send_to(bytes, (dst, port))?;
        Ok(())
    })?
    .with_context(|| format!("sending from {src} to [{dst}]:{port}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_ping_summary() {
        let t = "--- x ping statistics ---\n5 packets transmitted, 4 received, 20% packet loss, time 4005ms\n";
        assert_eq!(super::parse_ping(t).unwrap(), (5, 4));
    }
}
