//! net-conf.json, read as flanneld reads it: key names match case-insensitively,
//! and an invalid value is reported with the name of its field.
use anyhow::{Context, anyhow, bail};
use serde_json::{Map, Value};

use crate::lease::{subnet::Subnet, subnet6::Subnet6};
use flannel_ebpf_common::{DEFAULT_VNI, DEFAULT_VXLAN_PORT};

#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    /// `EnableIPv4` (default true). False: an IPv6-only cluster, and the
    /// IPv4 fields are [`Subnet::NONE`] (flanneld ignores them then).
    pub ipv4: bool,
    pub network: Subnet,
    pub subnet_len: u8,
    pub subnet_min: Subnet,
    pub subnet_max: Subnet,
    pub backend: Backend,
    /// `EnableIPv6`: the IPv6 half of a dual-stack overlay.
    pub ipv6: Option<NetConf6>,
}

/// `IPv6Network`, `IPv6SubnetLen`, `IPv6SubnetMin/Max`, with flanneld's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf6 {
    pub network: Subnet6,
    pub subnet_len: u8,
    pub subnet_min: Subnet6,
    pub subnet_max: Subnet6,
}

/// Backend.Type: the backends flannel-ebpf speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendType {
    /// VXLAN on Flannel's wire, by the eBPF or the kernel data path.
    Vxlan,
    /// Routes only: `<peer subnet> via <peer public IP>` on the underlay.
    HostGw,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub kind: BackendType,
    pub vni: u32,
    pub port: u16,
    /// Overlay MTU override; None → underlay MTU − 50.
    pub mtu: Option<u32>,
    /// Peers on the same L2 segment are routed directly, without VXLAN.
    pub direct_routing: bool,
}

fn lowercase_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), lowercase_keys(v)))
                .collect::<Map<_, _>>(),
        ),
        other => other,
    }
}

fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(&name.to_ascii_lowercase()).filter(|v| !v.is_null())
}

fn uint(obj: &Map<String, Value>, name: &str, max: u64) -> anyhow::Result<Option<u64>> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| anyhow!("{name}: {v} is not a non-negative integer"))?;
            if n > max {
                bail!("{name}: {n} is larger than {max}");
            }
            Ok(Some(n))
        }
    }
}

fn boolean(obj: &Map<String, Value>, name: &str) -> anyhow::Result<Option<bool>> {
    field(obj, name)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| anyhow!("{name}: {v} is not true or false"))
        })
        .transpose()
}

fn subnet(obj: &Map<String, Value>, name: &str) -> anyhow::Result<Option<Subnet>> {
    field(obj, name)
        .map(|v| {
            let s = v
                .as_str()
                .ok_or_else(|| anyhow!("{name}: {v} is not a string"))?;
            s.parse::<Subnet>()
                .with_context(|| format!("{name}: {s:?}"))
        })
        .transpose()
}

fn address_as_subnet(
    obj: &Map<String, Value>,
    name: &str,
    len: u8,
) -> anyhow::Result<Option<Subnet>> {
    field(obj, name)
        .map(|v| {
            let s = v
                .as_str()
                .ok_or_else(|| anyhow!("{name}: {v} is not a string"))?;
            let ip = s
                .parse()
                .with_context(|| format!("{name}: {s:?} is not an IPv4 address"))?;
            Subnet::new(ip, len)
                .with_context(|| format!("{name}: {s:?} is not a /{len} subnet address"))
        })
        .transpose()
}

impl NetConf {
    pub fn parse(text: &str) -> anyhow::Result<NetConf> {
        let v: Value = serde_json::from_str(text).context("net-conf.json is not valid JSON")?;
        let Value::Object(obj) = lowercase_keys(v) else {
            bail!("net-conf.json is not a JSON object");
        };
        let ipv6 = if boolean(&obj, "EnableIPv6")?.unwrap_or(false) {
            Some(NetConf6::parse(&obj)?)
        } else {
            None
        };
        let backend = match field(&obj, "Backend") {
            None => Backend::default(),
            Some(Value::Object(b)) => Backend::parse(b)?,
            Some(v) => bail!("Backend: {v} is not an object"),
        };
        if !boolean(&obj, "EnableIPv4")?.unwrap_or(true) {
            if ipv6.is_none() {
                bail!("EnableIPv4 is false and EnableIPv6 is not true: no address family to run");
            }
            return Ok(NetConf {
                ipv4: false,
                network: Subnet::NONE,
                subnet_len: 0,
                subnet_min: Subnet::NONE,
                subnet_max: Subnet::NONE,
                backend,
                ipv6,
            });
        }
        let network =
            subnet(&obj, "Network")?.context("Network: missing (e.g. \"10.244.0.0/16\")")?;
        let subnet_len = uint(&obj, "SubnetLen", 32)?.unwrap_or(24) as u8;
        if subnet_len <= network.prefix_len() || subnet_len > 30 {
            bail!(
                "SubnetLen: {subnet_len} must be larger than the Network's /{} and at most 30",
                network.prefix_len()
            );
        }
        let count = 1u64 << (subnet_len - network.prefix_len());
        let first = network.nth_child(subnet_len, 0).context("SubnetLen")?;
        let last = network
            .nth_child(subnet_len, (count - 1) as u32)
            .context("SubnetLen")?;
        // flanneld's default SubnetMin skips the first subnet (its .0 is the network address).
        let default_min = network.nth_child(subnet_len, 1).unwrap_or(first);
        let subnet_min = address_as_subnet(&obj, "SubnetMin", subnet_len)?.unwrap_or(default_min);
        let subnet_max = address_as_subnet(&obj, "SubnetMax", subnet_len)?.unwrap_or(last);
        if !network.contains_subnet(&subnet_min) {
            bail!(
                "SubnetMin: {} is outside Network {network}",
                subnet_min.addr()
            );
        }
        if !network.contains_subnet(&subnet_max) {
            bail!(
                "SubnetMax: {} is outside Network {network}",
                subnet_max.addr()
            );
        }
        if subnet_max < subnet_min {
            bail!(
                "SubnetMax: {} is below SubnetMin {}",
                subnet_max.addr(),
                subnet_min.addr()
            );
        }
        Ok(NetConf {
            ipv4: true,
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            backend,
            ipv6,
        })
    }
}

fn subnet6(obj: &Map<String, Value>, name: &str) -> anyhow::Result<Option<Subnet6>> {
    field(obj, name)
        .map(|v| {
            let s = v
                .as_str()
                .ok_or_else(|| anyhow!("{name}: {v} is not a string"))?;
            s.parse::<Subnet6>()
                .with_context(|| format!("{name}: {s:?}"))
        })
        .transpose()
}

fn address6(obj: &Map<String, Value>, name: &str) -> anyhow::Result<Option<std::net::Ipv6Addr>> {
    field(obj, name)
        .map(|v| {
            let s = v
                .as_str()
                .ok_or_else(|| anyhow!("{name}: {v} is not a string"))?;
            s.parse()
                .with_context(|| format!("{name}: {s:?} is not an IPv6 address"))
        })
        .transpose()
}

impl NetConf6 {
    /// As flanneld's CheckNetworkConfig: IPv6SubnetLen defaults to 64 (or the
    /// network's length + 2 for networks longer than /62), at most 126, and
    /// leaves at least four subnets; SubnetMin defaults to the second subnet
    /// and SubnetMax to the last; both on a subnet boundary inside the network.
    fn parse(obj: &Map<String, Value>) -> anyhow::Result<NetConf6> {
        let network = subnet6(obj, "IPv6Network")?
            .context("IPv6Network: missing while EnableIPv6 is true (e.g. \"fd00:10:244::/56\")")?;
        let plen = network.prefix_len();
        let subnet_len = match uint(obj, "IPv6SubnetLen", 128)? {
            Some(n) if n > 0 => {
                let n = n as u8;
                if n > 126 {
                    bail!("IPv6SubnetLen: {n} must be at most 126");
                }
                if n < plen.saturating_add(2) {
                    bail!(
                        "IPv6SubnetLen: {n} leaves fewer than four subnets in IPv6Network {network}"
                    );
                }
                n
            }
            _ if plen > 124 => {
                bail!("IPv6Network: {network} is too small (the longest useful prefix is /124)")
            }
            _ if plen <= 62 => 64,
            _ => plen + 2,
        };
        let first = Subnet6::containing(network.addr(), subnet_len).context("IPv6SubnetLen")?;
        let step = 1u128 << (128 - subnet_len);
        let last = Subnet6::containing(
            std::net::Ipv6Addr::from(
                u128::from(network.addr()) | (u128::MAX >> plen.min(127)) & !(step - 1),
            ),
            subnet_len,
        )?;
        let bound = |name: &str, default: Subnet6| -> anyhow::Result<Subnet6> {
            let Some(ip) = address6(obj, name)? else {
                return Ok(default);
            };
            if !network.contains(ip) {
                bail!("{name}: {ip} is outside IPv6Network {network}");
            }
            Subnet6::new(ip, subnet_len)
                .with_context(|| format!("{name}: {ip} is not on a /{subnet_len} boundary"))
        };
        let subnet_min = bound("IPv6SubnetMin", first.next().unwrap_or(first))?;
        let subnet_max = bound("IPv6SubnetMax", last)?;
        if subnet_max < subnet_min {
            bail!(
                "IPv6SubnetMax: {} is below IPv6SubnetMin {}",
                subnet_max.addr(),
                subnet_min.addr()
            );
        }
        Ok(NetConf6 {
            network,
            subnet_len,
            subnet_min,
            subnet_max,
        })
    }

    /// Whether `s` is a subnet a node may lease.
    pub fn is_leasable(&self, s: &Subnet6) -> bool {
        s.prefix_len() == self.subnet_len && *s >= self.subnet_min && *s <= self.subnet_max
    }

    /// The first `limit` free leasable subnets from SubnetMin, as flanneld's
    /// allocator lists them before picking one at random.
    pub fn free(&self, taken: &[Subnet6], limit: usize) -> Vec<Subnet6> {
        let mut out = Vec::new();
        let mut s = Some(self.subnet_min);
        while let Some(c) = s {
            if c > self.subnet_max || out.len() >= limit {
                break;
            }
            if !taken.iter().any(|t| t.overlaps(&c)) {
                out.push(c);
            }
            s = c.next();
        }
        out
    }
}

impl NetConf {
    /// Every subnet a node may lease: [SubnetMin, SubnetMax] of SubnetLen.
    pub fn leasable(&self) -> impl Iterator<Item = Subnet> + '_ {
        let first = self
            .network
            .child_index(&self.subnet_min)
            .unwrap_or(u32::MAX);
        let last = self.network.child_index(&self.subnet_max).unwrap_or(0);
        (first..=last).filter_map(|i| self.network.nth_child(self.subnet_len, i))
    }

    /// Whether `s` is a subnet a node may lease.
    pub fn is_leasable(&self, s: &Subnet) -> bool {
        s.prefix_len() == self.subnet_len && *s >= self.subnet_min && *s <= self.subnet_max
    }
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            kind: BackendType::Vxlan,
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
            mtu: None,
            direct_routing: false,
        }
    }
}

impl Backend {
    fn parse(b: &Map<String, Value>) -> anyhow::Result<Backend> {
        let kind = match field(b, "Type") {
            None => BackendType::Vxlan,
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "vxlan" => BackendType::Vxlan,
                "host-gw" => BackendType::HostGw,
                _ => bail!(
                    "Backend.Type: {s:?} is not supported by flannel-ebpf (\"vxlan\" or \"host-gw\")"
                ),
            },
            Some(v) => bail!("Backend.Type: {v} is not a string"),
        };
        let vni = uint(b, "VNI", 0xff_ffff)
            .context("Backend")?
            .unwrap_or(DEFAULT_VNI as u64) as u32;
        let vni = if vni == 0 { DEFAULT_VNI } else { vni };
        // Flannel on Linux: Port 0 means the kernel default, 8472.
        let port = match uint(b, "Port", 65535).context("Backend")? {
            None | Some(0) => DEFAULT_VXLAN_PORT,
            Some(p) => p as u16,
        };
        let mtu = uint(b, "MTU", 65535)
            .context("Backend")?
            .filter(|m| *m != 0)
            .map(|m| m as u32);
        if let Some(m) = mtu
            && m < 576
        {
            bail!("Backend.MTU: {m} is below the IPv4 minimum of 576");
        }
        if boolean(b, "GBP").context("Backend")?.unwrap_or(false) {
            bail!("Backend.GBP: group-based policy is not supported by flannel-ebpf");
        }
        let direct_routing = boolean(b, "DirectRouting")
            .context("Backend")?
            .unwrap_or(false);
        Ok(Backend {
            kind,
            vni,
            port,
            mtu,
            direct_routing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_as_flanneld() {
        let c =
            NetConf::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min.to_string(), "10.244.1.0/24");
        assert_eq!(c.subnet_max.to_string(), "10.244.255.0/24");
        assert_eq!((c.backend.vni, c.backend.port), (1, 8472));
    }

    #[test]
    fn ipv6_defaults_as_flanneld() {
        let c = NetConf::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let v6 = c.ipv6.unwrap();
        assert_eq!(v6.subnet_len, 64);
        assert_eq!(v6.subnet_min.to_string(), "fd00:10:244:1::/64");
        assert_eq!(v6.subnet_max.to_string(), "fd00:10:244:ff::/64");
        let free = v6.free(&["fd00:10:244:2::/64".parse().unwrap()], 3);
        let free: Vec<String> = free.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            free,
            [
                "fd00:10:244:1::/64",
                "fd00:10:244:3::/64",
                "fd00:10:244:4::/64"
            ]
        );
        // Networks longer than /62 are split into four.
        let c = NetConf::parse(
            r#"{"network":"10.244.0.0/16","enableipv6":true,"ipv6network":"fd00::/120"}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6.unwrap().subnet_len, 122);
        let c = NetConf::parse(r#"{"Network":"10.244.0.0/16","EnableIPv6":false}"#).unwrap();
        assert!(c.ipv6.is_none());
    }

    #[test]
    fn ipv6_only_as_flanneld() {
        // EnableIPv4 false: Network is not needed (flanneld ignores it then).
        let c = NetConf::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#,
        )
        .unwrap();
        assert!(!c.ipv4);
        assert_eq!(c.network, Subnet::NONE);
        assert_eq!(c.ipv6.unwrap().subnet_len, 64);
        assert!(
            NetConf::parse(r#"{"Network":"10.244.0.0/16"}"#)
                .unwrap()
                .ipv4
        );
    }

    #[test]
    fn keys_are_case_insensitive() {
        let c = NetConf::parse(r#"{"network":"10.244.0.0/16","subnetlen":25,"backend":{"type":"VXLAN","vni":4,"port":4789}}"#).unwrap();
        assert_eq!(c.subnet_len, 25);
        assert_eq!((c.backend.vni, c.backend.port), (4, 4789));
        let c =
            NetConf::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#).unwrap();
        assert_eq!(c.backend.kind, BackendType::HostGw);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"Backend":{}}"#, "Network"),
            (r#"{"Network":"10.244.0.0/33"}"#, "Network"),
            (r#"{"Network":"10.244.0.0/16","SubnetLen":16}"#, "SubnetLen"),
            (
                r#"{"Network":"10.244.0.0/16","SubnetMin":"10.245.0.0"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"VNI":"one"}}"#,
                "VNI",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Port":70000}}"#,
                "Port",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#,
                "Backend.Type",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true}"#,
                "IPv6Network",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/64","IPv6SubnetLen":65}"#,
                "IPv6SubnetLen",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd01::"}"#,
                "IPv6SubnetMin",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48","IPv6SubnetMax":"fd00:0:0:1::5"}"#,
                "IPv6SubnetMax",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/125"}"#,
                "too small",
            ),
            (r#"{"EnableIPv4":false}"#, "EnableIPv6"),
            (r#"{"EnableIPv4":false,"EnableIPv6":true}"#, "IPv6Network"),
            ("not json", "JSON"),
        ];
        for (text, name) in cases {
            let err = format!("{:#}", NetConf::parse(text).unwrap_err());
            assert!(err.contains(name), "{text}: {err}");
        }
    }
}
