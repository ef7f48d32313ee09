//! /run/flannel/subnet.env, as flanneld writes it for the flannel CNI plugin.
use std::{fs, io::Write, path::Path};

use anyhow::Context;

use crate::lease::{subnet::Subnet, subnet6::Subnet6};

/// flanneld's order: the IPv4 pair (none when IPv6-only), the IPv6 pair
/// (EnableIPv6), MTU, masquerade.
pub fn render(
    v4: Option<(Subnet, Subnet)>,
    v6: Option<(Subnet6, Subnet6)>,
    mtu: u32,
    ip_masq: bool,
) -> String {
    let mut out = String::new();
    if let Some((network, subnet)) = v4 {
        out += &format!(
            "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={}/{}\n",
            subnet.gateway(),
            subnet.prefix_len()
        );
    }
    if let Some((network6, subnet6)) = v6 {
        out += &format!(
            "FLANNEL_IPV6_NETWORK={network6}\nFLANNEL_IPV6_SUBNET={}/{}\n",
            subnet6.gateway(),
            subnet6.prefix_len()
        );
    }
    out + &format!("FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n")
}

/// The IPv6 subnet a previous run wrote, for reuse after a restart.
/// The IPv6Network of an earlier run's subnet.env (FLANNEL_IPV6_NETWORK).
pub fn previous_network6(path: &Path) -> Option<Subnet6> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_NETWORK="))?
        .trim()
        .parse()
        .ok()
}

pub fn previous_subnet6(path: &Path) -> Option<Subnet6> {
    let text = fs::read_to_string(path).ok()?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_IPV6_SUBNET="))?;
    let (gw, len) = value.trim().split_once('/')?;
    Subnet6::containing(gw.parse().ok()?, len.parse().ok()?).ok()
}

/// Write atomically (temp file + rename) so the CNI plugin never reads half a file.
pub fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    // Created exclusively (O_EXCL): a link put in the temp file's place is
    // never written through.
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// The subnet a previous run wrote, for reuse after a restart.
pub fn previous_subnet(path: &Path) -> Option<Subnet> {
    let text = fs::read_to_string(path).ok()?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))?;
    let (gw, len) = value.trim().split_once('/')?;
    let gw: std::net::Ipv4Addr = gw.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Subnet::new((u32::from(gw) & mask).into(), len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_flanneld() {
        let text = render(
            Some((
                "10.244.0.0/16".parse().unwrap(),
                "10.244.1.0/24".parse().unwrap(),
            )),
            None,
            1450,
            false,
        );
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
        let dir = std::env::temp_dir().join(format!("subnet-env-test-{}", std::process::id()));
        let path = dir.join("subnet.env");
        write(&path, &text).unwrap();
        assert_eq!(previous_subnet(&path).unwrap().to_string(), "10.244.1.0/24");
        fs::remove_dir_all(dir).unwrap();
    }
    #[test]
    fn renders_dual_stack_like_flanneld() {
        let text = render(
            Some((
                "10.244.0.0/16".parse().unwrap(),
                "10.244.1.0/24".parse().unwrap(),
            )),
            Some((
                "fd00:10:244::/56".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            )),
            1430,
            true,
        );
        assert_eq!(
            text,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=true\n"
        );
        let dir = std::env::temp_dir().join(format!("subnet-env6-test-{}", std::process::id()));
        let path = dir.join("subnet.env");
        write(&path, &text).unwrap();
        assert_eq!(
            previous_subnet6(&path).unwrap().to_string(),
            "fd00:10:244:1::/64"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn renders_ipv6_only_like_flanneld() {
        let text = render(
            None,
            Some((
                "fd00:10:244::/56".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            )),
            1430,
            false,
        );
        assert_eq!(
            text,
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn a_link_in_place_of_the_temp_file_is_not_written_through() {
        let dir = std::env::temp_dir().join(format!("subnet-env-link-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, "untouched").unwrap();
        let path = dir.join("subnet.env");
        std::os::unix::fs::symlink(&victim, path.with_extension("tmp")).unwrap();
        write(&path, "FLANNEL_MTU=1450\n").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(fs::read_to_string(&path).unwrap(), "FLANNEL_MTU=1450\n");
        fs::remove_dir_all(dir).unwrap();
    }
}
