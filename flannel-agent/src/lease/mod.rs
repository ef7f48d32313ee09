//! A Flannel subnet lease: who holds a pod subnet and how to reach it.
pub mod mac;
pub mod netconf;
pub mod subnet;
pub mod subnet_env;

use std::net::Ipv4Addr;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::{lease::mac::Mac, lease::subnet::Subnet};

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
    #[serde(rename = "BackendData", default)]
    pub backend_data: Option<serde_json::Value>,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub subnet: Subnet,
    pub public_ip: Ipv4Addr,
    pub backend: LeaseBackend,
}

impl Lease {
    /// Parse a lease value as stored under `<prefix>/subnets/<key>`.
    /// Returns Ok(None) for leases of backends we do not speak (udp,
    /// wireguard, …), which peers ignore as flanneld does. Whether a vxlan or
    /// host-gw lease suits this node's backend is the reconciler's call.
    pub fn parse(subnet: Subnet, value: &[u8]) -> anyhow::Result<Option<Lease>> {
        let attrs: LeaseAttrs =
            serde_json::from_slice(value).context("lease is not Flannel's lease JSON")?;
        Lease::from_parts(
            subnet,
            &attrs.backend_type,
            &attrs.public_ip,
            attrs.backend_data,
        )
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
        }))
    }

    /// The JSON flanneld writes for a lease of this backend (host-gw's
    /// BackendData is null, as flanneld's empty one serializes).
    pub fn to_json(&self, vni: u32) -> String {
        let attrs = LeaseAttrs {
            public_ip: self.public_ip.to_string(),
            public_ipv6: None,
            backend_type: self.backend.type_name().into(),
            backend_data: self.backend.vtep_mac().map(|mac| {
                serde_json::json!({
                    "VNI": vni,
                    "VtepMAC": mac.to_string(),
                })
            }),
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

    fn subnet() -> Subnet {
        Subnet::from_key("10.244.1.0-24").unwrap()
    }

    #[test]
    fn parses_flanneld_json() {
        let v = br#"{"PublicIP":"172.18.0.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"}}"#;
        let l = Lease::parse(subnet(), v).unwrap().unwrap();
        assert_eq!(l.public_ip, Ipv4Addr::new(172, 18, 0, 3));
        assert_eq!(
            l.backend.vtep_mac().map(|m| m.to_string()).as_deref(),
            Some("e6:7c:02:8e:e8:7e")
        );
        let round = Lease::parse(subnet(), l.to_json(1).as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(round, l);
    }

    #[test]
    fn host_gw_leases_as_flanneld_writes_them() {
        let v = br#"{"PublicIP":"172.18.0.3","PublicIPv6":null,"BackendType":"host-gw","BackendData":null}"#;
        let l = Lease::parse(subnet(), v).unwrap().unwrap();
        assert_eq!(l.backend, LeaseBackend::HostGw);
        assert_eq!(
            l.to_json(1),
            r#"{"PublicIP":"172.18.0.3","BackendType":"host-gw","BackendData":null}"#
        );
        let bare = br#"{"PublicIP":"172.18.0.3","BackendType":"host-gw"}"#;
        assert_eq!(Lease::parse(subnet(), bare).unwrap(), Some(l));
        let bad = br#"{"PublicIP":"0.0.0.0","BackendType":"host-gw"}"#;
        assert!(Lease::parse(subnet(), bad).is_err());
    }

    #[test]
    fn ignores_other_backends_and_rejects_garbage() {
        let udp = br#"{"PublicIP":"172.18.0.3","BackendType":"udp","BackendData":null}"#;
        assert!(Lease::parse(subnet(), udp).unwrap().is_none());
        for bad in [
            &b"{"[..],
            br#"{"PublicIP":"x","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"e6:7c:02:8e:e8:7e"}}"#,
            br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#,
            br#"{"PublicIP":"1.2.3.4","BackendType":"vxlan"}"#,
        ] {
            assert!(Lease::parse(subnet(), bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
