//! Ethernet addresses (VtepMACs) in the `e6:7c:02:8e:e8:7e` form.
use std::{fmt, str::FromStr};

use anyhow::{Context, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A unicast, locally administered address derived from `seed`, so a
    /// node's VtepMAC stays the same across restarts and re-creation of flannel.1.
    pub fn stable_from(seed: &[u8]) -> Mac {
        // FNV-1a: tiny, deterministic, no dependency.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in seed {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        // Finalizer so near-identical seeds give unrelated addresses.
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51afd7ed558ccd);
        h ^= h >> 33;
        let b = h.to_be_bytes();
        Mac([(b[0] & 0xfe) | 0x02, b[1], b[2], b[3], b[4], b[5]])
    }

    /// From a 6-byte link-layer address as netlink carries it.
    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl FromStr for Mac {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Mac> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let p = parts
                .next()
                .with_context(|| format!("{s:?} has fewer than 6 octets"))?;
            if p.len() != 2 {
                bail!("{s:?}: octet {p:?} is not two hex digits");
            }
            *byte = u8::from_str_radix(p, 16).with_context(|| format!("{s:?}: octet {p:?}"))?;
        }
        if parts.next().is_some() {
            bail!("{s:?} has more than 6 octets");
        }
        let mac = Mac(out);
        if !mac.is_unicast() {
            bail!("{s:?} is not a unicast address");
        }
        Ok(mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let m: Mac = "9e:01:3d:09:66:39".parse().unwrap();
        assert_eq!(m.to_string(), "9e:01:3d:09:66:39");
        assert!("9e:01:3d:09:66".parse::<Mac>().is_err());
        assert!("ff:ff:ff:ff:ff:ff".parse::<Mac>().is_err());
        assert!("9e:01:3d:09:66:3g".parse::<Mac>().is_err());
    }

    #[test]
    fn stable_mac_is_local_unicast() {
        let a = Mac::stable_from(b"10.1.5.10");
        assert_eq!(a, Mac::stable_from(b"10.1.5.10"));
        assert_ne!(a, Mac::stable_from(b"10.1.8.10"));
        assert!(a.is_unicast());
        assert_eq!(a.0[0] & 2, 2);
    }
}
