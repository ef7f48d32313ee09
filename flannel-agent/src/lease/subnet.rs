//! IPv4 subnets as Flannel names them: `10.244.1.0/24`, and `10.244.1.0-24` in lease keys.
use std::{fmt, net::Ipv4Addr, str::FromStr};

use anyhow::{Context, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet {
    addr: Ipv4Addr,
    len: u8,
}

impl Subnet {
    /// No IPv4 subnet: flanneld's empty IP4Net, `0.0.0.0-0` in the key of an
    /// IPv6-only lease.
    pub const NONE: Subnet = Subnet {
        addr: Ipv4Addr::UNSPECIFIED,
        len: 0,
    };

    /// A subnet whose address has no host bits set.
    pub fn new(addr: Ipv4Addr, len: u8) -> anyhow::Result<Self> {
        if len > 32 {
            bail!("prefix length {len} is larger than 32");
        }
        let s = Self { addr, len };
        if s.network() != addr {
            bail!(
                "{addr}/{len} has host bits set (network is {}/{len})",
                s.network()
            );
        }
        Ok(s)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn mask(len: u8) -> u32 {
        if len == 0 { 0 } else { u32::MAX << (32 - len) }
    }

    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & Self::mask(self.len))
    }

    /// The netmask, as an address (`255.255.255.0` for a /24).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask(self.prefix_len()))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.addr)
    }

    pub fn contains_subnet(&self, other: &Subnet) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    /// Flannel's VTEP address for a lease: the network address itself (`10.244.1.0`).
    /// Whether the two share any address (one contains the other).
    pub fn overlaps(&self, other: &Subnet) -> bool {
        self.contains_subnet(other) || other.contains_subnet(self)
    }

    pub fn vtep_addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The first usable address, the cni0 gateway (`10.244.1.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }

    /// The `n`-th subnet of length `len` inside `self`.
    pub fn nth_child(&self, len: u8, n: u32) -> Option<Subnet> {
        if len < self.len || len > 32 {
            return None;
        }
        let count = 1u64 << (len - self.len);
        if n as u64 >= count {
            return None;
        }
        let step = 1u64 << (32 - len);
        let addr = u32::from(self.addr) as u64 + n as u64 * step;
        Some(Subnet {
            addr: Ipv4Addr::from(addr as u32),
            len,
        })
    }

    /// Index of `child` among the subnets of its length inside `self`.
    pub fn child_index(&self, child: &Subnet) -> Option<u32> {
        if !self.contains_subnet(child) {
            return None;
        }
        let offset = u32::from(child.addr) - u32::from(self.addr);
        Some((offset as u64 >> (32 - child.len)) as u32)
    }

    /// Parse the etcd key form `10.244.1.0-24`.
    pub fn from_key(key: &str) -> anyhow::Result<Self> {
        let (a, l) = key
            .split_once('-')
            .with_context(|| format!("lease key {key:?} is not <ip>-<prefixlen>"))?;
        let addr: Ipv4Addr = a
            .parse()
            .with_context(|| format!("lease key {key:?}: {a:?} is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .with_context(|| format!("lease key {key:?}: {l:?} is not a prefix length"))?;
        Self::new(addr, len).with_context(|| format!("lease key {key:?}"))
    }

    pub fn to_key(&self) -> String {
        format!("{}-{}", self.addr, self.len)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Subnet {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (a, l) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not <ip>/<prefixlen>"))?;
        let addr: Ipv4Addr = a
            .parse()
            .with_context(|| format!("{a:?} is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .with_context(|| format!("{l:?} is not a prefix length"))?;
        Self::new(addr, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_round_trip() {
        let s = Subnet::from_key("10.244.1.0-24").unwrap();
        assert_eq!(s.to_string(), "10.244.1.0/24");
        assert_eq!(s.to_key(), "10.244.1.0-24");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 244, 1, 1));
    }

    #[test]
    fn rejects_host_bits_and_garbage() {
        assert!(Subnet::from_key("10.244.1.5-24").is_err());
        assert!(Subnet::from_key("10.244.1.0").is_err());
        assert!(Subnet::from_key("10.244.1.0-33").is_err());
        assert!("10.244.0.0/16x".parse::<Subnet>().is_err());
    }

    #[test]
    fn children() {
        let net: Subnet = "10.244.0.0/16".parse().unwrap();
        let c = net.nth_child(24, 3).unwrap();
        assert_eq!(c.to_string(), "10.244.3.0/24");
        assert_eq!(net.child_index(&c), Some(3));
        assert!(net.nth_child(24, 256).is_none());
    }
}
