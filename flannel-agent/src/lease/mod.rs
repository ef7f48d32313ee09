//! A Flannel subnet lease: who holds a pod subnet and how to reach it.
pub mod mac;
pub mod netconf;
pub mod subnet;
pub mod subnet6;
pub mod subnet_env;

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::{lease::mac::Mac, lease::subnet::Subnet, lease::subnet6::Subnet6};

/// Flannel's lease value, with its exact key names.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LeaseAttrs {
    #[serde(rename = "PublicIP")]
    pub public_ip: String,
    #[serde(
        rename = "PublicIPv6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_ipv6: Option<String>,
    #[serde(rename = "BackendType")]
    pub backend_type: String,
    #[serde(
        rename = "BackendData",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_data: Option<serde_json::Value>,
    #[serde(
        rename = "BackendV6Data",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub backend_v6_data: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VxlanBackendData {
    #[serde(rename = "VNI")]
    pub vni: u32,
    #[serde(rename = "VtepMAC")]
    pub vtep_mac: String,
}

/// What a lease says about how its node is reached: the backends we speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeaseBackend {
    /// VXLAN to the node's VTEP.
    Vxlan { vtep_mac: Mac },
    /// Plain routes to the node's public IP; the lease carries no BackendData.
    HostGw,
}

impl LeaseBackend {
    /// The lease's `BackendType`.
    pub fn type_name(&self) -> &'static str {
        match self {
            LeaseBackend::Vxlan { .. } => "vxlan",
            LeaseBackend::HostGw => "host-gw",
        }
    }

    pub fn vtep_mac(&self) -> Option<Mac> {
        match self {
            LeaseBackend::Vxlan { vtep_mac } => Some(*vtep_mac),
            LeaseBackend::HostGw => None,
        }
    }
}

impl std::fmt::Display for LeaseBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseBackend::Vxlan { vtep_mac } => write!(f, "vxlan VtepMAC {vtep_mac}"),
            LeaseBackend::HostGw => f.write_str("host-gw"),
        }
    }
}

/// A validated lease of a node we can reach (VXLAN or host-gw).
/// An IPv6-only lease (EnableIPv4 false) has no IPv4 half: `subnet` is
/// [`Subnet::NONE`] and `public_ip` unspecified, as flanneld leaves them, and
/// `backend` carries flannel-v6's VtepMAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub subnet: Subnet,
    pub public_ip: Ipv4Addr,
    pub backend: LeaseBackend,
    /// The IPv6 half of a dual-stack lease (`PublicIPv6`, `BackendV6Data`).
    pub v6: Option<LeaseV6>,
}

/// A node's IPv6 subnet, underlay address and flannel-v6 VTEP MAC (None: host-gw).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseV6 {
    pub subnet: Subnet6,
    pub public_ip: Ipv6Addr,
    pub vtep_mac: Option<Mac>,
}

/// A lease's name in a store, as flanneld's MakeSubnetKey writes it:
/// `10.244.1.0-24`, or `10.244.1.0-24&fd00:1::-64` for a dual-stack lease.
pub fn parse_key(key: &str) -> anyhow::Result<(Subnet, Option<Subnet6>)> {
    match key.split_once('&') {
        None => Ok((Subnet::from_key(key)?, None)),
        Some((v4, v6)) => Ok((Subnet::from_key(v4)?, Some(Subnet6::from_key(v6)?))),
    }
}

/// A store key as [`Lease::key`] writes it (e.g. `10.244.01.0-24` is
/// `10.244.1.0-24`); None if it names no lease.
pub fn canonical_key(key: &str) -> Option<String> {
    match parse_key(key).ok()? {
        (s, None) => Some(s.to_key()),
        (s, Some(s6)) => Some(format!("{}&{}", s.to_key(), s6.to_key())),
    }
}

impl Lease {
    /// Parse a lease value as stored under `<prefix>/subnets/<key>`.
    /// Returns Ok(None) for leases of backends we do not speak (udp,
    /// wireguard, …), which peers ignore as flanneld does. Whether a vxlan or
    /// host-gw lease suits this node's backend is the reconciler's call.
    pub fn parse(key: &str, value: &[u8]) -> anyhow::Result<Option<Lease>> {
        let (subnet, subnet6) = parse_key(key)?;
        let attrs: LeaseAttrs =
            serde_json::from_slice(value).context("lease is not Flannel's lease JSON")?;
        if subnet == Subnet::NONE {
            // `0.0.0.0-0&<v6>-<len>`: an IPv6-only node's lease.
            let s6 = subnet6.with_context(|| format!("lease key {key:?} names no subnet"))?;
            return Lease::v6_only(
                s6,
                &attrs.backend_type,
                attrs.public_ipv6.as_deref(),
                attrs.backend_v6_data,
            );
        }
        let Some(lease) = Lease::from_parts(
            subnet,
            &attrs.backend_type,
            &attrs.public_ip,
            attrs.backend_data,
        )?
        else {
            return Ok(None);
        };
        // As flanneld: the key says whether the lease is dual-stack.
        match subnet6 {
            None => Ok(Some(lease)),
            Some(s6) => lease
                .with_v6(s6, attrs.public_ipv6.as_deref(), attrs.backend_v6_data)
                .map(Some),
        }
    }

    /// An IPv6-only node's lease (EnableIPv4 false), from its IPv6 half's
    /// parts; Ok(None) for a backend we do not speak.
    pub fn v6_only(
        subnet: Subnet6,
        backend_type: &str,
        public_ipv6: Option<&str>,
        backend_v6_data: Option<serde_json::Value>,
    ) -> anyhow::Result<Option<Lease>> {
        if !Lease::speaks(backend_type) {
            return Ok(None);
        }
        let text =
            public_ipv6.with_context(|| format!("IPv6 subnet {subnet} has no PublicIPv6"))?;
        let public_ip = parse_public_ipv6(text)?;
        if backend_type == "host-gw" {
            // No BackendV6Data: flanneld's host-gw has none.
            return Ok(Some(Lease {
                subnet: Subnet::NONE,
                public_ip: Ipv4Addr::UNSPECIFIED,
                backend: LeaseBackend::HostGw,
                v6: Some(LeaseV6 {
                    subnet,
                    public_ip,
                    vtep_mac: None,
                }),
            }));
        }
        let data = backend_v6_data
            .filter(|d| !d.is_null())
            .with_context(|| format!("IPv6 subnet {subnet} has no BackendV6Data"))?;
        let mac = vxlan_vtep_mac(data).context("BackendV6Data")?;
        Ok(Some(Lease {
            subnet: Subnet::NONE,
            public_ip: Ipv4Addr::UNSPECIFIED,
            backend: LeaseBackend::Vxlan { vtep_mac: mac },
            v6: Some(LeaseV6 {
                subnet,
                public_ip,
                vtep_mac: Some(mac),
            }),
        }))
    }

    /// Whether the lease has an IPv4 half (not an IPv6-only node's).
    pub fn has_v4(&self) -> bool {
        self.subnet != Subnet::NONE
    }

    /// The store key naming this lease.
    pub fn key(&self) -> String {
        match &self.v6 {
            None => self.subnet.to_key(),
            Some(v6) => format!("{}&{}", self.subnet.to_key(), v6.subnet.to_key()),
        }
    }

    /// Add the IPv6 half: the subnet from the key (or podCIDRs), the address
    /// from `PublicIPv6`, the VtepMAC from `BackendV6Data` (vxlan only).
    pub fn with_v6(
        mut self,
        subnet: Subnet6,
        public_ipv6: Option<&str>,
        backend_v6_data: Option<serde_json::Value>,
    ) -> anyhow::Result<Lease> {
        let text =
            public_ipv6.with_context(|| format!("IPv6 subnet {subnet} has no PublicIPv6"))?;
        let public_ip = parse_public_ipv6(text)?;
        let vtep_mac = match self.backend {
            LeaseBackend::HostGw => None,
            LeaseBackend::Vxlan { .. } => {
                let data = backend_v6_data
                    .filter(|d| !d.is_null())
                    .with_context(|| format!("IPv6 subnet {subnet} has no BackendV6Data"))?;
                Some(vxlan_vtep_mac(data).context("BackendV6Data")?)
            }
        };
        self.v6 = Some(LeaseV6 {
            subnet,
            public_ip,
            vtep_mac,
        });
        Ok(self)
    }

    /// Whether a lease of this BackendType is one we can route to (others —
    /// udp, wireguard, … — peers ignore, as flanneld does).
    pub fn speaks(backend_type: &str) -> bool {
        matches!(backend_type, "vxlan" | "host-gw")
    }

    /// The one lease rule of every source, from a lease's parts (the etcd
    /// and file JSON's fields, or a Node's annotations): BackendType,
    /// PublicIP and BackendData. Ok(None) for a backend we do not speak.
    pub fn from_parts(
        subnet: Subnet,
        backend_type: &str,
        public_ip: &str,
        backend_data: Option<serde_json::Value>,
    ) -> anyhow::Result<Option<Lease>> {
        if !Lease::speaks(backend_type) {
            return Ok(None);
        }
        let vxlan = backend_type == "vxlan";
        let public_ip = parse_public_ip(public_ip)?;
        let backend = if vxlan {
            let data = backend_data
                .filter(|d| !d.is_null())
                .context("BackendData is missing for a vxlan lease")?;
            LeaseBackend::Vxlan {
                vtep_mac: vxlan_vtep_mac(data)?,
            }
        } else {
            LeaseBackend::HostGw
        };
        Ok(Some(Lease {
            subnet,
            public_ip,
            backend,
            v6: None,
        }))
    }

    /// The JSON flanneld writes for a lease of this backend (host-gw's
    /// BackendData is null, as flanneld's empty one serializes).
    pub fn to_json(&self, vni: u32) -> String {
        let data = |mac: Mac| serde_json::json!({ "VNI": vni, "VtepMAC": mac.to_string() });
        // IPv6-only: PublicIP 0.0.0.0 and no BackendData, as flanneld writes it.
        let attrs = LeaseAttrs {
            public_ip: self.public_ip.to_string(),
            public_ipv6: self.v6.map(|v6| v6.public_ip.to_string()),
            backend_type: self.backend.type_name().into(),
            backend_data: self.has_v4().then(|| {
                self.backend
                    .vtep_mac()
                    .map_or(serde_json::Value::Null, data)
            }),
            backend_v6_data: self.v6.and_then(|v6| v6.vtep_mac).map(data),
        };
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(&attrs).unwrap_or_default()
    }
}

/// A lease's PublicIP, which must be a usable unicast IPv4 address.
pub fn parse_public_ip(text: &str) -> anyhow::Result<Ipv4Addr> {
    let ip: Ipv4Addr = text
        .parse()
        .with_context(|| format!("PublicIP {text:?} is not an IPv4 address"))?;
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        bail!("PublicIP {ip} cannot be a node address");
    }
    Ok(ip)
}

/// A lease's PublicIPv6, which must be a usable unicast IPv6 address.
pub fn parse_public_ipv6(text: &str) -> anyhow::Result<Ipv6Addr> {
    let ip: Ipv6Addr = text
        .parse()
        .with_context(|| format!("PublicIPv6 {text:?} is not an IPv6 address"))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        bail!("PublicIPv6 {ip} cannot be a node address");
    }
    Ok(ip)
}

/// The VtepMAC of a vxlan lease's BackendData.
pub fn vxlan_vtep_mac(data: serde_json::Value) -> anyhow::Result<Mac> {
    let data: VxlanBackendData =
        serde_json::from_value(data).context("BackendData is not {\"VNI\":…,\"VtepMAC\":…}")?;
    data.vtep_mac
        .parse()
        .with_context(|| format!("VtepMAC {:?}", data.vtep_mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "10.244.1.0-24";

    #[test]
    fn parses_flanneld_json() {
        let v = br#"{"PublicIP":"172.18.0.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"}}"#;
        let l = Lease::parse(KEY, v).unwrap().unwrap();
        assert_eq!(l.public_ip, Ipv4Addr::new(172, 18, 0, 3));
        assert_eq!(
            l.backend.vtep_mac().map(|m| m.to_string()).as_deref(),
            Some("e6:7c:02:8e:e8:7e")
        );
        let round = Lease::parse(KEY, l.to_json(1).as_bytes()).unwrap().unwrap();
        assert_eq!(round, l);
    }

    #[test]
    fn host_gw_leases_as_flanneld_writes_them() {
        let v = br#"{"PublicIP":"172.18.0.3","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#;
        let l = Lease::parse(KEY, v).unwrap().unwrap();
        assert_eq!(l.backend, LeaseBackend::HostGw);
        assert_eq!(
            l.to_json(1),
            r#"{"PublicIP":"172.18.0.3","BackendType":"host-gw","BackendData":null}"#
        );
        let bare = br#"{"PublicIP":"172.18.0.3","BackendType":"host-gw"}"#;
        assert_eq!(Lease::parse(KEY, bare).unwrap(), Some(l));
        let bad = br#"{"PublicIP":"0.0.0.0","BackendType":"host-gw"}"#;
        assert!(Lease::parse(KEY, bad).is_err());
    }

    #[test]
    fn dual_stack_leases_as_flanneld_writes_them() {
        let v = br#"{"PublicIP":"172.18.0.3","PublicIPv6":"fc00:f853:ccd:e793::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"},"BackendV6Data":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:5f"}}"#;
        let key = "10.244.1.0-24&fd00:10:244:1::-64";
        let l = Lease::parse(key, v).unwrap().unwrap();
        let v6 = l.v6.unwrap();
        assert_eq!(v6.subnet.to_string(), "fd00:10:244:1::/64");
        assert_eq!(v6.public_ip.to_string(), "fc00:f853:ccd:e793::3");
        assert_eq!(
            v6.vtep_mac.map(|m| m.to_string()).as_deref(),
            Some("9a:1b:2c:3d:4e:5f")
        );
        assert_eq!(l.key(), key);
        assert_eq!(Lease::parse(key, l.to_json(1).as_bytes()).unwrap(), Some(l));
        // A v4 key ignores the IPv6 attributes (flanneld: EnableIPv6 comes from the key).
        assert_eq!(Lease::parse(KEY, v).unwrap().unwrap().v6, None);
        // The key names an IPv6 subnet the value does not back up: unusable, said why.
        for (bad, why) in [
            (&br#"{"PublicIP":"172.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"}}"#[..], "PublicIPv6"),
            (br#"{"PublicIP":"172.18.0.3","PublicIPv6":"fc00::3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"}}"#, "BackendV6Data"),
            (br#"{"PublicIP":"172.18.0.3","PublicIPv6":"172.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"},"BackendV6Data":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:5f"}}"#, "IPv6"),
            (br#"{"PublicIP":"172.18.0.3","PublicIPv6":"ff02::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"},"BackendV6Data":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:5f"}}"#, "node address"),
        ] {
            let err = format!("{:#}", Lease::parse(key, bad).unwrap_err());
            assert!(err.contains(why), "{err}");
        }
        for bad_key in ["10.244.1.0-24&", "10.244.1.0-24&fd00::5-64", "fd00::-64"] {
            assert!(Lease::parse(bad_key, v).is_err(), "{bad_key}");
        }
    }

    #[test]
    fn ipv6_only_leases_as_flanneld_writes_them() {
        // flanneld with EnableIPv4 false: the empty IPv4 subnet in the key,
        // PublicIP 0.0.0.0, no BackendData.
        let key = "0.0.0.0-0&fd00:10:244:3::-64";
        let v = br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fc00::13","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:5f"}}"#;
        let l = Lease::parse(key, v).unwrap().unwrap();
        assert!(!l.has_v4());
        let v6 = l.v6.unwrap();
        assert_eq!(v6.subnet.to_string(), "fd00:10:244:3::/64");
        assert_eq!(v6.public_ip.to_string(), "fc00::13");
        assert_eq!(l.key(), key);
        let json = l.to_json(1);
        assert!(json.contains(r#""PublicIP":"0.0.0.0""#), "{json}");
        assert!(!json.contains("\"BackendData\""), "{json}");
        assert_eq!(Lease::parse(key, json.as_bytes()).unwrap(), Some(l));
        for (bad, why) in [
            (&br#"{"PublicIP":"0.0.0.0","BackendType":"vxlan","BackendV6Data":{"VNI":1,"VtepMAC":"9a:1b:2c:3d:4e:5f"}}"#[..], "PublicIPv6"),
            (br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fc00::13","BackendType":"vxlan"}"#, "BackendV6Data"),
        ] {
            let err = format!("{:#}", Lease::parse(key, bad).unwrap_err());
            assert!(err.contains(why), "{err}");
        }
        // flanneld's IPv6-only host-gw lease: no BackendV6Data, and none written.
        let hgw = br#"{"PublicIP":"0.0.0.0","PublicIPv6":"fc00::13","BackendType":"host-gw"}"#;
        let l = Lease::parse(key, hgw).unwrap().unwrap();
        assert_eq!(
            (l.backend, l.v6.unwrap().vtep_mac, l.has_v4()),
            (LeaseBackend::HostGw, None, false)
        );
        assert_eq!(l.to_json(1).as_bytes(), &hgw[..]);
        // The empty IPv4 subnet alone names nothing.
        assert!(Lease::parse("0.0.0.0-0", v).is_err());
        // A v4 lease is still a v4 lease.
        let v4 = br#"{"PublicIP":"172.18.0.3","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"}}"#;
        assert!(Lease::parse(KEY, v4).unwrap().unwrap().has_v4());
    }

    #[test]
    fn ignores_other_backends_and_rejects_garbage() {
        let udp = br#"{"PublicIP":"172.18.0.3","BackendType":"udp","BackendData":null}"#;
        assert!(Lease::parse(KEY, udp).unwrap().is_none());
        for bad in [
            &b"{"[..],
            br#"{"PublicIP":"x","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"}}"#,
            br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#,
            br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan"}"#,
        ] {
            assert!(Lease::parse(KEY, bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
