//! Host IPsec (xfrm) policies that could cover the overlay's UDP port.
//!
//! The eBPF data path sends outer VXLAN packets with a redirect and takes
//! them in before the IP layer: neither passes the kernel's xfrm policy
//! checks. Where a policy could select udp/<port>, the eBPF data path
//! refuses to start rather than silently send in the clear what the policy
//! says must be protected (or take in what it says to reject).

use anyhow::{Context, bail};

const NETLINK_XFRM: i32 = 6;
const XFRM_MSG_NEWPOLICY: u16 = 0x13;
const XFRM_MSG_GETPOLICY: u16 = 0x15;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const IPPROTO_UDP: u8 = 17;
const XFRMA_TMPL: u16 = 5;

/// A policy's selector, as far as it matters here.
#[derive(Debug, PartialEq, Eq)]
pub struct Selector {
    pub family: u16,
    pub proto: u8,
    pub dport: u16,
    pub dport_mask: u16,
    pub sport: u16,
    pub sport_mask: u16,
    /// 0 in, 1 out, 2 fwd.
    pub dir: u8,
    /// 0 allow, 1 block.
    pub action: u8,
    /// Whether it names IPsec templates (XFRMA_TMPL): traffic must be protected.
    pub protects: bool,
}

impl Selector {
    /// struct xfrm_userpolicy_info: the selector (56 bytes: addresses,
    /// ports and masks big-endian, family, prefix lengths, proto), lifetimes
    /// (96), priority, index, then dir and action; attributes after the
    /// 168-byte struct.
    fn parse(b: &[u8]) -> Option<Selector> {
        let mut protects = false;
        let mut attrs = b.get(168..).unwrap_or_default();
        while attrs.len() >= 4 {
            let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
            let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
            if len < 4 {
                break;
            }
            protects |= kind == XFRMA_TMPL;
            attrs = attrs.get((len + 3) & !3..).unwrap_or_default();
        }
        let be = |o: usize| Some(u16::from_be_bytes([*b.get(o)?, *b.get(o + 1)?]));
        Some(Selector {
            dport: be(32)?,
            dport_mask: be(34)?,
            sport: be(36)?,
            sport_mask: be(38)?,
            family: u16::from_ne_bytes([*b.get(40)?, *b.get(41)?]),
            proto: *b.get(44)?,
            dir: *b.get(160)?,
            action: *b.get(161)?,
            protects,
        })
    }

    /// Whether this policy would act on our VXLAN datagrams: it blocks or
    /// protects (an allow without templates changes nothing), in or out
    /// (fwd policies see forwarded traffic, not ours), and selects UDP to
    /// `port` (the source port is a flow hash, so any source selector can
    /// match some of them).
    pub fn covers_udp_port(&self, port: u16) -> bool {
        (self.action == 1 || self.protects)
            && self.dir != 2
            && (self.family == 0 || self.family == libc::AF_INET as u16)
            && (self.proto == 0 || self.proto == IPPROTO_UDP)
            && (self.dport_mask == 0 || self.dport & self.dport_mask == port & self.dport_mask)
    }
}

/// Every xfrm policy of this network namespace's kernel.
pub fn policies() -> anyhow::Result<Vec<Selector>> {
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_XFRM,
        );
        if fd < 0 {
            // No xfrm in this kernel: no policy can exist.
            return Ok(Vec::new());
        }
        let res = dump(fd);
        libc::close(fd);
        res
    }
}

unsafe fn dump(fd: i32) -> anyhow::Result<Vec<Selector>> {
    let mut req = [0u8; 16];
    req[0..4].copy_from_slice(&16u32.to_ne_bytes());
    req[4..6].copy_from_slice(&XFRM_MSG_GETPOLICY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: req is a valid buffer of its length.
    if unsafe { libc::send(fd, req.as_ptr() as *const _, req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error())
            .context("asking the kernel for its xfrm policies");
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is a valid buffer of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("reading the xfrm policies");
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= 16 {
            let len = u32::from_ne_bytes([msgs[0], msgs[1], msgs[2], msgs[3]]) as usize;
            let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
            if len < 16 || len > msgs.len() {
                bail!("a malformed xfrm netlink message ({len} bytes)");
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = msgs
                        .get(16..20)
                        .map_or(0, |e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]));
                    if errno == 0 {
                        return Ok(out);
                    }
                    return Err(std::io::Error::from_raw_os_error(-errno))
                        .context("listing the xfrm policies");
                }
                XFRM_MSG_NEWPOLICY => {
                    if let Some(s) = Selector::parse(&msgs[16..len]) {
                        out.push(s);
                    }
                }
                _ => {}
            }
            let step = (len + 3) & !3;
            msgs = &msgs[step.min(msgs.len())..];
        }
    }
}

/// Refuse the eBPF data path where an xfrm policy could cover udp/`port`.
pub fn refuse_if_covered(port: u16) -> anyhow::Result<()> {
    let covering: Vec<Selector> = policies()?
        .into_iter()
        .filter(|p| p.covers_udp_port(port))
        .collect();
    if let Some(p) = covering.first() {
        let dir = match p.dir {
            0 => "in",
            1 => "out",
            _ => "fwd",
        };
        bail!(
            "{} IPsec (xfrm) polic{} on this node can select udp/{port} (e.g. dir {dir}, proto {}): \
             the eBPF data path sends and takes VXLAN around xfrm, so it would bypass them; \
             use --datapath kernel, which keeps them (see `ip xfrm policy`)",
            covering.len(),
            if covering.len() == 1 { "y" } else { "ies" },
            if p.proto == 0 {
                "any".to_string()
            } else {
                p.proto.to_string()
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(proto: u8, dport: u16, mask: u16) -> Selector {
        Selector {
            family: libc::AF_INET as u16,
            proto,
            dport,
            dport_mask: mask,
            sport: 0,
            sport_mask: 0,
            dir: 1,
            action: 1,
            protects: false,
        }
    }

    #[test]
    fn which_policies_cover_the_vxlan_port() {
        assert!(sel(17, 8472, 0xffff).covers_udp_port(8472));
        assert!(sel(0, 0, 0).covers_udp_port(8472), "any protocol, any port");
        assert!(sel(17, 0, 0).covers_udp_port(8472), "all of UDP");
        assert!(!sel(6, 22, 0xffff).covers_udp_port(8472), "TCP");
        assert!(!sel(17, 53, 0xffff).covers_udp_port(8472), "another port");
        let allow = Selector {
            action: 0,
            ..sel(0, 0, 0)
        };
        assert!(!allow.covers_udp_port(8472), "an allow without templates");
        assert!(
            Selector {
                protects: true,
                ..allow
            }
            .covers_udp_port(8472),
            "IPsec for all traffic"
        );
        assert!(
            !Selector {
                dir: 2,
                ..sel(0, 0, 0)
            }
            .covers_udp_port(8472),
            "fwd"
        );
    }
}
