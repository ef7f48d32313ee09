//! An IPv6 pod subnet (flanneld's `IP6Net`): the network address and a
//! prefix length, with no host bits set.
use std::{fmt, net::Ipv6Addr, str::FromStr};

use anyhow::{Context, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Subnet6 {
    addr: Ipv6Addr,
    len: u8,
}

fn mask(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    }
}

impl Subnet6 {
    pub fn new(addr: Ipv6Addr, len: u8) -> anyhow::Result<Self> {
        if len > 128 {
            bail!("prefix length {len} is larger than 128");
        }
        let network = Ipv6Addr::from(u128::from(addr) & mask(len));
        if network != addr {
            bail!("{addr}/{len} has host bits set (network is {network}/{len})");
        }
        Ok(Self { addr, len })
    }

    /// The subnet of `len` bits holding `ip` (host bits cleared).
    pub fn containing(ip: Ipv6Addr, len: u8) -> anyhow::Result<Self> {
        Self::new(Ipv6Addr::from(u128::from(ip) & mask(len.min(128))), len)
    }

    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) & mask(self.len) == u128::from(self.addr)
    }

    pub fn contains_subnet(&self, other: &Subnet6) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }

    pub fn overlaps(&self, other: &Subnet6) -> bool {
        self.contains_subnet(other) || other.contains_subnet(self)
    }

    /// The address flanneld gives flannel-v6.<VNI> and routes to (`<subnet>/128`).
    pub fn vtep_addr(&self) -> Ipv6Addr {
        self.addr
    }

    /// The first usable address: cni0's gateway, FLANNEL_IPV6_SUBNET's address.
    pub fn gateway(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) + 1)
    }

    /// The next subnet of the same length, None past the end of the space.
    pub fn next(&self) -> Option<Subnet6> {
        if self.len == 0 {
            return None;
        }
        let step = 1u128 << (128 - self.len);
        u128::from(self.addr).checked_add(step).map(|a| Subnet6 {
            addr: Ipv6Addr::from(a),
            len: self.len,
        })
    }

    /// flanneld's key form: `fd00:1::-64`.
    pub fn to_key(&self) -> String {
        format!("{}-{}", self.addr, self.len)
    }

    pub fn from_key(key: &str) -> anyhow::Result<Self> {
        let (a, l) = key
            .rsplit_once('-')
            .with_context(|| format!("{key:?} is not <ipv6>-<prefixlen>"))?;
        parts(a, l).with_context(|| format!("lease key part {key:?}"))
    }
}

fn parts(a: &str, l: &str) -> anyhow::Result<Subnet6> {
    let addr: Ipv6Addr = a
        .parse()
        .with_context(|| format!("{a:?} is not an IPv6 address"))?;
    let len: u8 = l
        .parse()
        .with_context(|| format!("{l:?} is not a prefix length"))?;
    Subnet6::new(addr, len)
}

impl fmt::Display for Subnet6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Subnet6 {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (a, l) = s
            .split_once('/')
            .with_context(|| format!("{s:?} is not <ipv6>/<prefixlen>"))?;
        parts(a, l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_text_round_trip() {
        let s = Subnet6::from_key("fd00:1::-64").unwrap();
        assert_eq!(s.to_string(), "fd00:1::/64");
        assert_eq!(s.to_key(), "fd00:1::-64");
        assert_eq!(s.gateway().to_string(), "fd00:1::1");
        assert_eq!(s.next().unwrap().to_string(), "fd00:1:0:1::/64");
        assert_eq!("fd00:1::/64".parse::<Subnet6>().unwrap(), s);
    }

    #[test]
    fn rejects_host_bits_and_garbage() {
        assert!(Subnet6::from_key("fd00:1::5-64").is_err());
        assert!(Subnet6::from_key("fd00:1::").is_err());
        assert!(Subnet6::from_key("fd00:1::-129").is_err());
        assert!(Subnet6::from_key("10.244.1.0-24").is_err());
        assert!("fd00::/64x".parse::<Subnet6>().is_err());
    }

    #[test]
    fn containment() {
        let net: Subnet6 = "fd00::/48".parse().unwrap();
        let child: Subnet6 = "fd00:0:0:5::/64".parse().unwrap();
        assert!(net.contains_subnet(&child) && net.overlaps(&child));
        assert!(!child.contains_subnet(&net));
        assert!(!net.contains("fd01::1".parse().unwrap()));
        let last: Subnet6 = "ffff:ffff:ffff:ffff::/64".parse().unwrap();
        assert!(last.next().is_none());
    }
}
