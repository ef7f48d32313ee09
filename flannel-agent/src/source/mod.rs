//! Where leases come from. Every source yields the same snapshot shape, so one
//! reconciler serves them all.
pub mod etcd;
pub mod file;
pub mod kube;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::bail;

use crate::{
    lease::netconf::NetConf,
    lease::subnet::Subnet,
    lease::subnet6::Subnet6,
    lease::{Lease, LeaseBackend, LeaseV6, mac::Mac},
};

/// What this node asks of its lease store: its addresses and VTEPs, and the
/// subnets its last subnet.env named (to keep the pods' addresses).
#[derive(Clone, Copy, Debug)]
pub struct Want {
    pub public_ip: Ipv4Addr,
    pub backend: LeaseBackend,
    /// With EnableIPv6: our IPv6 underlay address and flannel-v6's MAC.
    pub v6: Option<(Ipv6Addr, Option<Mac>)>,
    pub previous: Option<Subnet>,
    pub previous6: Option<Subnet6>,
}

impl Want {
    /// Our lease for `subnet`, its IPv6 half settled by [`own_v6`].
    pub fn lease(
        &self,
        conf: &NetConf,
        subnet: Subnet,
        have: Option<LeaseV6>,
        taken6: &[Subnet6],
    ) -> anyhow::Result<Lease> {
        Ok(Lease {
            subnet,
            public_ip: self.public_ip,
            backend: self.backend,
            v6: own_v6(conf, self, have, taken6)?,
        })
    }
}

impl Want {
    /// Our addresses, for log lines: `PublicIP …`, with ` PublicIPv6 …` when set.
    pub fn addresses(&self) -> String {
        let v6 = self.v6.map(|(ip6, _)| ip6);
        match (self.public_ip.is_unspecified(), v6) {
            (true, Some(ip6)) => format!("PublicIPv6 {ip6}"),
            (false, Some(ip6)) => format!("PublicIP {} PublicIPv6 {ip6}", self.public_ip),
            _ => format!("PublicIP {}", self.public_ip),
        }
    }
}

/// Why no lease could be taken: the range that is full.
pub fn no_free_subnet(conf: &NetConf) -> String {
    match (&conf.ipv6, conf.ipv4) {
        (Some(c6), false) => format!(
            "no free IPv6 subnet left in [{}, {}] of {}",
            c6.subnet_min, c6.subnet_max, c6.network
        ),
        _ => format!(
            "no free subnet left in [{}, {}] of {}",
            conf.subnet_min, conf.subnet_max, conf.network
        ),
    }
}

/// A node's wish without IPv6, for the sources' tests.
#[cfg(test)]
pub fn want_v4(public_ip: &str, backend: LeaseBackend, previous: Option<Subnet>) -> Want {
    Want {
        public_ip: public_ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED),
        backend,
        v6: None,
        previous,
        previous6: None,
    }
}

/// The IPv6 half of our lease, for every lease store: the one the lease
/// already has if still leasable, else the previous subnet.env's if free,
/// else one of the first 100 free subnets from IPv6SubnetMin, picked at
/// random as flanneld's allocator does.
pub fn own_v6(
    conf: &NetConf,
    want: &Want,
    have: Option<LeaseV6>,
    taken: &[Subnet6],
) -> anyhow::Result<Option<LeaseV6>> {
    let (Some(c6), Some((public_ip, vtep_mac))) = (&conf.ipv6, want.v6) else {
        return Ok(None);
    };
    let mine = |s: Subnet6| LeaseV6 {
        subnet: s,
        public_ip,
        vtep_mac,
    };
    if let Some(h) =
        have.filter(|h| c6.is_leasable(&h.subnet) && !taken.iter().any(|t| t.overlaps(&h.subnet)))
    {
        return Ok(Some(mine(h.subnet)));
    }
    if let Some(p) = want
        .previous6
        .filter(|p| c6.is_leasable(p) && !taken.iter().any(|t| t.overlaps(p)))
    {
        return Ok(Some(mine(p)));
    }
    let free = c6.free(taken, 100);
    if free.is_empty() {
        bail!(
            "no free IPv6 subnet left in [{}, {}] of {}",
            c6.subnet_min,
            c6.subnet_max,
            c6.network
        );
    }
    let mut order: Vec<usize> = (0..free.len()).collect();
    // Seeded by our address too: IPv6-only nodes have no IPv4 one.
    let o = public_ip.octets();
    let seed = Ipv4Addr::from(
        u32::from(want.public_ip) ^ u32::from_be_bytes([o[12], o[13], o[14], o[15]]),
    );
    shuffle(&mut order, seed);
    Ok(Some(mine(free[order[0]])))
}

/// Sources push: whoever sees the leases change (a watch, inotify) wakes
/// the control loop here, so a change is applied when it is reported, not
/// at the next poll. A permit is kept when nobody waits: no wake is lost.
static LEASES_CHANGED: tokio::sync::Notify = tokio::sync::Notify::const_new();

pub fn wake() {
    LEASES_CHANGED.notify_one();
}

/// Until a source reports a change.
pub async fn woken() {
    LEASES_CHANGED.notified().await
}

/// Whether `l` is this node's own lease, for every source alike: it holds
/// our public IP, or (after the node's address changed) it is the subnet of
/// our last subnet.env announced with our VtepMAC. Re-keying it keeps the
/// pods' subnet instead of orphaning the lease and taking a new one.
pub fn is_own_lease(l: &Lease, conf: &NetConf, want: &Want) -> bool {
    let (public_ip, backend, previous) = (want.public_ip, want.backend, want.previous);
    if !conf.ipv4 {
        // IPv6-only: every lease has the same empty IPv4 half; ours holds
        // our public IPv6 address.
        // After our address changed: the lease of our last subnet.env's
        // IPv6 subnet with our flannel-v6 VtepMAC moves with us.
        return match (l.v6, want.v6, &conf.ipv6) {
            (Some(v6), Some((ip6, mac6)), Some(c6)) => {
                let moved =
                    want.previous6 == Some(v6.subnet) && mac6.is_some() && v6.vtep_mac == mac6;
                !l.has_v4() && (v6.public_ip == ip6 || moved) && c6.is_leasable(&v6.subnet)
            }
            _ => false,
        };
    }
    let moved = previous == Some(l.subnet)
        && backend.vtep_mac().is_some()
        && l.backend.vtep_mac() == backend.vtep_mac();
    (l.public_ip == public_ip || moved)
        && l.has_v4()
        && conf.network.contains_subnet(&l.subnet)
        && l.subnet.prefix_len() == conf.subnet_len
}

/// The subnets a new lease may take, in the order to try them, for every
/// lease store: the previous subnet.env's subnet if still leasable and free,
/// then every free leasable subnet — lowest first, or shuffled when
/// `shuffle_seed` is given (flanneld's etcd registry picks at random, so
/// nodes starting together do not race for one subnet). The store then
/// creates the first it can, create-if-absent.
pub fn lease_candidates(
    conf: &NetConf,
    previous: Option<Subnet>,
    taken: &BTreeSet<Subnet>,
    shuffle_seed: Option<Ipv4Addr>,
) -> Vec<Subnet> {
    let mut free: Vec<Subnet> = conf.leasable().filter(|s| !taken.contains(s)).collect();
    if let Some(seed) = shuffle_seed {
        shuffle(&mut free, seed);
    }
    if !conf.ipv4 {
        // IPv6-only: the key is `0.0.0.0-0&<IPv6 subnet>`, own_v6 picks the
        // IPv6 subnet anew for each try.
        return vec![Subnet::NONE; 8];
    }
    let first = previous.filter(|s| conf.is_leasable(s) && !taken.contains(s));
    first
        .into_iter()
        .chain(free.into_iter().filter(|s| Some(*s) != first))
        .collect()
}

/// A small xorshift, seeded by time, address and pid: dependency-free.
fn shuffle<T>(v: &mut [T], seed: Ipv4Addr) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ (u32::from(seed) as u64) << 17 ^ std::process::id() as u64 | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

/// Unusable entries of a lease store (a file, a key, a node), each reported
/// once per reason: a poll or a watch that sees the same bad lease again
/// stays quiet, and says it again only if the reason changes.
#[derive(Debug, Default)]
pub struct Reported(BTreeMap<String, String>);

impl Reported {
    /// Record why `key` is unusable; true if that was not already said.
    pub fn report(&mut self, key: &str, why: &str) -> bool {
        if self.0.get(key).map(String::as_str) == Some(why) {
            return false;
        }
        self.0.insert(key.to_string(), why.to_string());
        true
    }

    /// `key` is fine now (or gone): a new problem with it is reported again.
    pub fn clear(&mut self, key: &str) {
        self.0.remove(key);
    }

    /// Forget every key not in `present`.
    pub fn retain(&mut self, present: impl Fn(&str) -> bool) {
        self.0.retain(|k, _| present(k));
    }

    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// The lease sources behind one interface.
pub enum LeaseSource {
    File(file::FileSource),
    Etcd(Box<etcd::EtcdSource>),
    Kube(Box<kube::KubeSource>),
}

impl LeaseSource {
    /// net-conf.json, from where this source keeps it.
    pub async fn config(&mut self) -> anyhow::Result<NetConf> {
        match self {
            LeaseSource::File(f) => f.read_config(),
            LeaseSource::Etcd(e) => e.config().await,
            LeaseSource::Kube(k) => k.config().await,
        }
    }

    /// A public IP the lease store asks us to use (kube: `node-public-ip`).
    pub async fn public_ip_hint(&mut self) -> anyhow::Result<Option<Ipv4Addr>> {
        match self {
            LeaseSource::Kube(k) => k.public_ip_hint().await,
            _ => Ok(None),
        }
    }

    /// Tell the cluster this node's network is ready (kube: NetworkUnavailable=False).
    pub async fn ready(&mut self) -> anyhow::Result<()> {
        match self {
            LeaseSource::Kube(k) => k.set_network_available().await,
            _ => Ok(()),
        }
    }

    /// The lease that already holds `public_ip`, if any (to keep our VtepMAC).
    pub async fn lease_of(&mut self, public_ip: Ipv4Addr) -> anyhow::Result<Option<Lease>> {
        match self {
            LeaseSource::File(f) => Ok(f
                .read()?
                .leases
                .values()
                .find(|l| l.public_ip == public_ip)
                .copied()),
            LeaseSource::Etcd(e) => e.lease_of(public_ip).await,
            LeaseSource::Kube(k) => k.lease_of(public_ip).await,
        }
    }

    /// Take (or keep) this node's lease.
    pub async fn acquire(&mut self, conf: &NetConf, want: &Want) -> anyhow::Result<Lease> {
        match self {
            LeaseSource::File(f) => f.acquire(conf, want),
            LeaseSource::Etcd(e) => e.acquire(conf, want).await,
            LeaseSource::Kube(k) => k.acquire(conf, want).await,
        }
    }

    /// Whether a new snapshot is worth taking (cheap).
    pub async fn changed(&mut self) -> anyhow::Result<bool> {
        match self {
            LeaseSource::File(f) => f.changed(),
            LeaseSource::Etcd(e) => e.changed().await,
            LeaseSource::Kube(k) => k.changed().await,
        }
    }

    /// Why the source cannot be read now (watch or list failing), if so.
    /// The last complete view stays in force meanwhile.
    pub fn degraded(&self) -> Option<String> {
        match self {
            LeaseSource::File(_) => None,
            LeaseSource::Etcd(e) => e.degraded(),
            LeaseSource::Kube(k) => k.degraded(),
        }
    }

    /// Every lease, or None while the source has not completed its first
    /// list (a watch still starting): then nothing may be reconciled from it,
    /// or an empty view would remove every peer.
    pub async fn snapshot(&mut self) -> anyhow::Result<Option<Snapshot>> {
        match self {
            LeaseSource::File(f) => f.read().map(Some),
            LeaseSource::Etcd(e) => e.snapshot().await,
            LeaseSource::Kube(k) => k.snapshot().await,
        }
    }

    /// Wait for the first complete list of leases. The node's tables (and a
    /// pinned data path from an earlier run) stand as they are meanwhile.
    pub async fn first_snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let started = std::time::Instant::now();
        let mut said = started;
        loop {
            if let Some(s) = self.snapshot().await? {
                return Ok(s);
            }
            if said.elapsed() >= std::time::Duration::from_secs(5) {
                log::warn!(
                    "still waiting for the first list of leases ({:.0}s); the node's tables stand as they are",
                    started.elapsed().as_secs_f64()
                );
                said = std::time::Instant::now();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Keep our own lease alive and ours (renewal, re-creation after deletion).
    pub async fn maintain(&mut self, own: &Lease, vni: u32) -> anyhow::Result<()> {
        match self {
            LeaseSource::File(f) => {
                if !f.holds(own) {
                    // flanneld would exit here; we keep the node reachable by writing it back.
                    log::error!(
                        "OUR LEASE {} WAS DELETED OR CHANGED by someone else: writing it back (PublicIP {}, {})",
                        own.key(),
                        own.public_ip,
                        own.backend
                    );
                    f.write_lease(own, vni, true)?;
                }
                Ok(())
            }
            LeaseSource::Etcd(e) => e.maintain().await,
            // The node object is ours; the subnet is the podCIDR the cluster assigned.
            LeaseSource::Kube(_) => Ok(()),
        }
    }
}

/// All usable VXLAN leases at one moment, keyed by their store key
/// ([`Lease::key`]: IPv6-only leases share the empty IPv4 subnet).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub leases: BTreeMap<String, Lease>,
}

/// How many leases were added, changed and removed between two snapshots.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
}

/// A lease's backend as one log field: `vtep_mac=…` for VXLAN, else `backend=…`.
fn backend_kv(b: &LeaseBackend) -> String {
    match b {
        LeaseBackend::Vxlan { vtep_mac } => format!("vtep_mac={vtep_mac}"),
        other => format!("backend={}", other.type_name()),
    }
}

/// One log line per lease change, saying what changed.
pub fn log_changes(old: &Snapshot, new: &Snapshot) -> Changes {
    let mut c = Changes::default();
    // The first listing is summed up by the agent; each lease at debug.
    let level = if old.leases.is_empty() {
        log::Level::Debug
    } else {
        log::Level::Info
    };
    for (s, o, l) in crate::reconcile::plan::join(&old.leases, &new.leases) {
        match (o, l) {
            (None, Some(l)) => {
                c.added += 1;
                log::log!(
                    level,
                    "lease added subnet={s} public_ip={} {}",
                    l.public_ip,
                    backend_kv(&l.backend)
                )
            }
            (Some(o), Some(l)) if o != l => {
                c.changed += 1;
                let mut what = Vec::new();
                if o.public_ip != l.public_ip {
                    what.push(format!("public_ip={}→{}", o.public_ip, l.public_ip));
                }
                match (o.backend, l.backend) {
                    (a, b) if a == b => {}
                    (LeaseBackend::Vxlan { vtep_mac: a }, LeaseBackend::Vxlan { vtep_mac: b }) => {
                        what.push(format!("vtep_mac={a}→{b}"))
                    }
                    (a, b) => what.push(format!("{}→{}", backend_kv(&a), backend_kv(&b))),
                }
                log::info!("lease changed subnet={s} {}", what.join(" "));
            }
            (Some(_), None) => {
                c.removed += 1;
                log::info!("lease removed subnet={s}");
            }
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf() -> NetConf {
        NetConf::parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.5.0"}"#,
        )
        .unwrap()
    }

    fn s(x: &str) -> Subnet {
        x.parse().unwrap()
    }

    #[test]
    fn candidates_put_the_previous_subnet_first_and_skip_taken_ones() {
        let taken = BTreeSet::from([s("10.244.1.0/24"), s("10.244.3.0/24")]);
        let c = lease_candidates(&conf(), Some(s("10.244.4.0/24")), &taken, None);
        assert_eq!(
            c,
            ["10.244.4.0/24", "10.244.2.0/24", "10.244.5.0/24"].map(s)
        );
        // A taken or out-of-range previous subnet is not tried first.
        let c = lease_candidates(&conf(), Some(s("10.244.3.0/24")), &taken, None);
        assert_eq!(c[0], s("10.244.2.0/24"));
        let c = lease_candidates(&conf(), Some(s("10.244.9.0/24")), &taken, None);
        assert_eq!(c.len(), 3);
        // Shuffled: the same free subnets, none taken.
        let mut c = lease_candidates(&conf(), None, &taken, Some(Ipv4Addr::new(10, 1, 5, 11)));
        c.sort();
        assert_eq!(
            c,
            ["10.244.2.0/24", "10.244.4.0/24", "10.244.5.0/24"].map(s)
        );
    }

    #[test]
    fn the_ipv6_half_is_kept_then_previous_then_free() {
        let conf = NetConf::parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/60"}"#,
        )
        .unwrap();
        let s6 = |x: &str| -> Subnet6 { x.parse().unwrap() };
        let mut want = Want {
            public_ip: Ipv4Addr::new(10, 1, 5, 11),
            backend: LeaseBackend::HostGw,
            v6: Some(("fc00::11".parse().unwrap(), None)),
            previous: None,
            previous6: Some(s6("fd00:0:0:3::/64")),
        };
        let have = LeaseV6 {
            subnet: s6("fd00:0:0:7::/64"),
            public_ip: "fc00::99".parse().unwrap(),
            vtep_mac: None,
        };
        let got = own_v6(&conf, &want, Some(have), &[]).unwrap().unwrap();
        assert_eq!(
            (got.subnet, got.public_ip),
            (have.subnet, "fc00::11".parse().unwrap())
        );
        let got = own_v6(&conf, &want, None, &[]).unwrap().unwrap();
        assert_eq!(got.subnet, s6("fd00:0:0:3::/64"));
        // The previous one is taken: any free one, never a taken one.
        let taken: Vec<Subnet6> = (1..15)
            .filter(|i| *i != 9)
            .map(|i| s6(&format!("fd00:0:0:{i:x}::/64")))
            .collect();
        let got = own_v6(&conf, &want, None, &taken).unwrap().unwrap();
        assert!(
            got.subnet == s6("fd00:0:0:9::/64") || got.subnet == s6("fd00:0:0:f::/64"),
            "{}",
            got.subnet
        );
        let all: Vec<Subnet6> = (1..16)
            .map(|i| s6(&format!("fd00:0:0:{i:x}::/64")))
            .collect();
        let err = own_v6(&conf, &want, None, &all).unwrap_err().to_string();
        assert!(err.contains("no free IPv6 subnet"), "{err}");
        want.v6 = None;
        assert_eq!(own_v6(&conf, &want, Some(have), &[]).unwrap(), None);
    }

    #[test]
    fn an_ipv6_only_lease_is_ours_by_its_public_ipv6_or_after_a_move() {
        let conf = NetConf::parse(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}"#,
        )
        .unwrap();
        let mac = Mac::stable_from(b"ours");
        let lease = |ip: &str, s6: &str, m: Mac| {
            Lease::v6_only(
                s6.parse().unwrap(),
                "vxlan",
                Some(ip),
                Some(serde_json::json!({"VNI": 1, "VtepMAC": m.to_string()})),
            )
            .unwrap()
            .unwrap()
        };
        let want = Want {
            public_ip: Ipv4Addr::UNSPECIFIED,
            backend: LeaseBackend::Vxlan { vtep_mac: mac },
            v6: Some(("fc00::11".parse().unwrap(), Some(mac))),
            previous: None,
            previous6: Some("fd00:10:244:7::/64".parse().unwrap()),
        };
        assert!(is_own_lease(
            &lease("fc00::11", "fd00:10:244:3::/64", mac),
            &conf,
            &want
        ));
        // Another node's: not ours, though every IPv6-only PublicIP is 0.0.0.0.
        let other = Mac::stable_from(b"other");
        assert!(!is_own_lease(
            &lease("fc00::12", "fd00:10:244:4::/64", other),
            &conf,
            &want
        ));
        // Our address changed: the previous subnet with our VtepMAC moves with us.
        assert!(is_own_lease(
            &lease("fc00::99", "fd00:10:244:7::/64", mac),
            &conf,
            &want
        ));
        assert!(!is_own_lease(
            &lease("fc00::99", "fd00:10:244:7::/64", other),
            &conf,
            &want
        ));
    }

    #[test]
    fn a_bad_lease_is_reported_once_per_reason() {
        let mut r = Reported::default();
        assert!(r.report("10.244.2.0-24", "bad JSON"));
        assert!(!r.report("10.244.2.0-24", "bad JSON"));
        assert!(r.report("10.244.2.0-24", "bad VtepMAC"));
        r.clear("10.244.2.0-24");
        assert!(r.report("10.244.2.0-24", "bad VtepMAC"));
        r.retain(|k| k != "10.244.2.0-24");
        assert_eq!(r.entries().count(), 0);
    }
}
