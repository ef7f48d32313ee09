//! A Flannel subnet lease: who holds a pod subnet and how to reach it.
use std::net::Ipv4Addr;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::{mac::Mac, subnet::Subnet};

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

/// A validated lease of a VXLAN node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub subnet: Subnet,
    pub public_ip: Ipv4Addr,
    pub vtep_mac: Mac,
}

impl Lease {
    /// Parse a lease value as stored under `<prefix>/subnets/<key>`.
    /// Returns Ok(None) for leases of other backends, which peers ignore as flanneld does.
    pub fn parse(subnet: Subnet, value: &[u8]) -> anyhow::Result<Option<Lease>> {
        let attrs: LeaseAttrs =
            serde_json::from_slice(value).context("lease is not Flannel's lease JSON")?;
        if attrs.backend_type != "vxlan" {
            return Ok(None);
        }
        let public_ip: Ipv4Addr = attrs
            .public_ip
            .parse()
            .with_context(|| format!("PublicIP {:?} is not an IPv4 address", attrs.public_ip))?;
        let data = attrs
            .backend_data
            .context("BackendData is missing for a vxlan lease")?;
        let data: VxlanBackendData =
            serde_json::from_value(data).context("BackendData is not {\"VNI\":…,\"VtepMAC\":…}")?;
        let vtep_mac: Mac = data
            .vtep_mac
            .parse()
            .with_context(|| format!("VtepMAC {:?}", data.vtep_mac))?;
        if public_ip.is_unspecified() || public_ip.is_broadcast() || public_ip.is_multicast() {
            bail!("PublicIP {public_ip} cannot be a node address");
        }
        Ok(Some(Lease {
            subnet,
            public_ip,
            vtep_mac,
        }))
    }

    /// The JSON flanneld writes for a VXLAN lease.
    pub fn to_json(&self, vni: u32) -> String {
        let attrs = LeaseAttrs {
            public_ip: self.public_ip.to_string(),
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(serde_json::json!({
                "VNI": vni,
                "VtepMAC": self.vtep_mac.to_string(),
            })),
        };
        // Serializing plain strings and numbers cannot fail.
        serde_json::to_string(&attrs).unwrap_or_default()
    }
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
        assert_eq!(l.vtep_mac.to_string(), "e6:7c:02:8e:e8:7e");
        let round = Lease::parse(subnet(), l.to_json(1).as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(round, l);
    }

    #[test]
    fn ignores_other_backends_and_rejects_garbage() {
        let hostgw = br#"{"PublicIP":"172.18.0.3","BackendType":"host-gw"}"#;
        assert!(Lease::parse(subnet(), hostgw).unwrap().is_none());
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
