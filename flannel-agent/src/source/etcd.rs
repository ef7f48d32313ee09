//! `--subnet-mgr etcd`: leases where flanneld keeps them.
//! `<prefix>/config` holds net-conf.json; `<prefix>/subnets/10.244.1.0-24`
//! holds a lease, attached to a 24 h etcd lease (no TTL: a reservation).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};

use super::{Snapshot, Want};
use crate::{
    lease::Lease, lease::netconf::NetConf, lease::subnet::Subnet, lease::subnet6::Subnet6,
};

#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub cafile: Option<String>,
    pub certfile: Option<String>,
    pub keyfile: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TTL of our lease (flanneld: 24 h).
    pub lease_ttl: Duration,
    /// Renew this long before expiry (flanneld: 60 min).
    pub renew_margin: Duration,
}

/// What the watch task has seen.
#[derive(Default)]
struct WatchState {
    leases: BTreeMap<String, Lease>,
    /// Keys present under subnets/, parseable or not (taken for allocation).
    keys: BTreeSet<String>,
    revision: i64,
    /// The first list has completed: until then the snapshot says nothing.
    listed: bool,
    /// The watch's last error, until it works again.
    error: Option<String>,
    dirty: bool,
    reported: super::Reported,
}

/// Our own lease in etcd.
#[derive(Clone, Copy, Debug)]
struct Own {
    lease: Lease,
    /// etcd lease id; 0 for a reservation (key without TTL).
    lease_id: i64,
    renew_at: Instant,
    /// Revision of our last write: the watch must have passed it before a
    /// missing key means someone deleted it.
    revision: i64,
}

pub struct EtcdSource {
    client: Client,
    opts: EtcdOptions,
    state: Arc<Mutex<WatchState>>,
    own: Option<Own>,
    /// When we last wrote our lease back over someone else's value.
    written_back: Option<Instant>,
    vni: u32,
    watching: bool,
}

fn subnets_prefix(prefix: &str) -> String {
    format!("{}/subnets/", prefix.trim_end_matches('/'))
}

impl EtcdSource {
    pub async fn connect(opts: EtcdOptions) -> anyhow::Result<EtcdSource> {
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let (Some(u), Some(p)) = (&opts.username, &opts.password) {
            co = co.with_user(u.clone(), p.clone());
        }
        if opts.cafile.is_some() || opts.certfile.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.cafile {
                let pem = std::fs::read(ca).with_context(|| format!("--etcd-cafile {ca}"))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            match (&opts.certfile, &opts.keyfile) {
                (Some(c), Some(k)) => {
                    let cert = std::fs::read(c).with_context(|| format!("--etcd-certfile {c}"))?;
                    let key = std::fs::read(k).with_context(|| format!("--etcd-keyfile {k}"))?;
                    tls = tls.identity(Identity::from_pem(cert, key));
                }
                (None, None) => {}
                _ => bail!("--etcd-certfile and --etcd-keyfile go together"),
            }
            co = co.with_tls(tls);
        }
        let client = Client::connect(&opts.endpoints, Some(co))
            .await
            .with_context(|| format!("connecting to etcd at {}", opts.endpoints.join(",")))?;
        Ok(EtcdSource {
            client,
            opts,
            state: Arc::new(Mutex::new(WatchState::default())),
            own: None,
            written_back: None,
            vni: 1,
            watching: false,
        })
    }

    fn config_key(&self) -> String {
        format!("{}/config", self.opts.prefix.trim_end_matches('/'))
    }

    fn lease_key(&self, lease: &Lease) -> String {
        format!("{}{}", subnets_prefix(&self.opts.prefix), lease.key())
    }

    pub async fn config(&mut self) -> anyhow::Result<NetConf> {
        let key = self.config_key();
        let resp = self
            .client
            .get(key.as_str(), None)
            .await
            .with_context(|| format!("reading {key} from etcd"))?;
        let kv = resp
            .kvs()
            .first()
            .with_context(|| format!("{key} is not in etcd: write net-conf.json there first"))?;
        let text = kv
            .value_str()
            .with_context(|| format!("{key} is not UTF-8"))?;
        let conf = NetConf::parse(text).with_context(|| key.clone())?;
        self.vni = conf.backend.vni;
        Ok(conf)
    }

    /// Every lease key and its parsed lease (or why it is unusable), plus the etcd lease id.
    async fn list(&mut self) -> anyhow::Result<(i64, Vec<ListedLease>)> {
        let prefix = subnets_prefix(&self.opts.prefix);
        let (rev, kvs) = list_prefix(&mut self.client, &prefix)
            .await
            .with_context(|| format!("listing {prefix} in etcd"))?;
        let out = kvs
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
                ListedLease {
                    parsed: parse(&name, kv.value()),
                    public_ip: public_ip_of(kv.value()),
                    name,
                    lease_id: kv.lease(),
                }
            })
            .collect();
        Ok((rev, out))
    }

    pub async fn lease_of(&mut self, public_ip: Ipv4Addr) -> anyhow::Result<Option<Lease>> {
        let (_, all) = self.list().await?;
        Ok(all
            .into_iter()
            .filter_map(|l| l.parsed.ok().flatten())
            .find(|l| l.public_ip == public_ip))
    }

    async fn grant(&mut self) -> anyhow::Result<i64> {
        let ttl = self.opts.lease_ttl.as_secs().max(2) as i64;
        let r = self
            .client
            .lease_grant(ttl, None)
            .await
            .context("granting an etcd lease for our subnet")?;
        Ok(r.id())
    }

    fn renew_after(&self) -> Duration {
        let ttl = self.opts.lease_ttl;
        if self.opts.renew_margin < ttl {
            ttl - self.opts.renew_margin
        } else {
            ttl / 2
        }
    }

    /// Our lease: reuse the one with our public IP (a reservation stays one),
    /// else the previous subnet if free, else a random free subnet in
    /// [SubnetMin, SubnetMax], created only if absent in one transaction.
    pub async fn acquire(&mut self, conf: &NetConf, want: &Want) -> anyhow::Result<Lease> {
        let (public_ip, backend, previous) = (want.public_ip, want.backend, want.previous);
        self.vni = conf.backend.vni;
        let (_, all) = self.list().await?;
        let keys: Vec<(Subnet, Option<Subnet6>)> = all
            .iter()
            .filter_map(|l| crate::lease::parse_key(&l.name).ok())
            .collect();
        // Ours: any key holding our PublicIP, a reservation ({"PublicIP":…} without TTL) included.
        let by_ip = all.iter().find_map(|l| {
            let (subnet, _) = crate::lease::parse_key(&l.name).ok()?;
            // A reservation's key may name its IPv6 subnet with no IPv6 attributes yet.
            let v6 = l
                .parsed
                .as_ref()
                .ok()
                .and_then(|p| p.as_ref())
                .and_then(|p| p.v6)
                .or_else(|| {
                    let s6 = crate::lease::parse_key(&l.name).ok()?.1?;
                    Some(crate::lease::LeaseV6 {
                        subnet: s6,
                        public_ip: std::net::Ipv6Addr::UNSPECIFIED,
                        vtep_mac: None,
                    })
                });
            (conf.ipv4
                && l.public_ip == Some(public_ip)
                && conf.network.contains_subnet(&subnet)
                && subnet.prefix_len() == conf.subnet_len)
                .then_some((subnet, v6, l.lease_id, l.name.clone()))
        });
        // After our address changed: the lease of our last subnet.env with
        // our VtepMAC. (IPv6-only: the lease holding our public IPv6.)
        let moved = || {
            all.iter().find_map(|l| {
                let parsed = l.parsed.as_ref().ok()?.as_ref()?;
                super::is_own_lease(parsed, conf, want).then(|| {
                    if conf.ipv4 {
                        log::warn!(
                        "this node's address changed from {} to {public_ip}: lease {} moves with it",
                        parsed.public_ip,
                        parsed.subnet
                    );
                    }
                    (parsed.subnet, parsed.v6, l.lease_id, l.name.clone())
                })
            })
        };
        let mine = by_ip.or_else(moved);
        if let Some((subnet, have6, lease_id, name)) = mine {
            let others6: Vec<Subnet6> = keys
                .iter()
                .filter(|k| **k != (subnet, have6.map(|v| v.subnet)))
                .filter_map(|k| k.1)
                .collect();
            let lease = want.lease(conf, subnet, have6, &others6)?;
            let key = self.lease_key(&lease);
            if lease.key() != name {
                // The IPv6 half changed the lease's name: the old key goes.
                let old = format!("{}{name}", subnets_prefix(&self.opts.prefix));
                self.client
                    .delete(old.as_str(), None)
                    .await
                    .with_context(|| format!("deleting {old} (renamed to {key})"))?;
            }
            let (id, what) = if lease_id == 0 {
                (0, "reservation")
            } else {
                (self.grant().await?, "lease")
            };
            let opts = (id != 0).then(|| PutOptions::new().with_lease(id));
            let r = self
                .client
                .put(key.as_str(), lease.to_json(self.vni), opts)
                .await
                .with_context(|| format!("renewing {key}"))?;
            self.own = Some(Own {
                lease,
                lease_id: id,
                renew_at: Instant::now() + self.renew_after(),
                revision: r.header().map_or(0, |h| h.revision()),
            });
            log::info!("reusing {what} {} ({})", lease.key(), want.addresses());
            return Ok(lease);
        }
        let taken: BTreeSet<Subnet> = keys.iter().map(|k| k.0).collect();
        let mut taken6: Vec<Subnet6> = keys.iter().filter_map(|k| k.1).collect();
        for subnet in super::lease_candidates(conf, previous, &taken, Some(public_ip)) {
            let lease = want.lease(conf, subnet, None, &taken6)?;
            if let Some(own) = self.create(&lease).await? {
                self.own = Some(own);
                log::info!(
                    "acquired lease {} ({}, {backend}) with a {:?} TTL",
                    lease.key(),
                    want.addresses(),
                    self.opts.lease_ttl
                );
                return Ok(lease);
            }
            // Taken meanwhile (IPv6-only: the key is the IPv6 subnet's).
            taken6.extend(lease.v6.map(|v| v.subnet));
        }
        bail!("{}", super::no_free_subnet(conf))
    }

    /// Create our lease key if absent, attached to a fresh etcd lease.
    async fn create(&mut self, lease: &Lease) -> anyhow::Result<Option<Own>> {
        let key = self.lease_key(lease);
        let id = self.grant().await?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                lease.to_json(self.vni),
                Some(PutOptions::new().with_lease(id)),
            )]);
        let r = self
            .client
            .txn(txn)
            .await
            .with_context(|| format!("creating {key}"))?;
        if !r.succeeded() {
            let _ = self.client.lease_revoke(id).await;
            return Ok(None);
        }
        Ok(Some(Own {
            lease: *lease,
            lease_id: id,
            renew_at: Instant::now() + self.renew_after(),
            revision: r.header().map_or(0, |h| h.revision()),
        }))
    }

    fn start_watch(&mut self) {
        if self.watching {
            return;
        }
        self.watching = true;
        let client = self.client.clone();
        let prefix = subnets_prefix(&self.opts.prefix);
        let state = self.state.clone();
        tokio::spawn(watch_loop(client, prefix, state));
    }

    pub async fn changed(&mut self) -> anyhow::Result<bool> {
        self.start_watch();
        Ok(self.state.lock().map(|s| s.dirty).unwrap_or(true))
    }

    pub fn degraded(&self) -> Option<String> {
        self.state.lock().ok().and_then(|s| s.error.clone())
    }

    /// The leases; None until the watch task's first list has completed.
    pub async fn snapshot(&mut self) -> anyhow::Result<Option<Snapshot>> {
        self.start_watch();
        let mut s = self
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("etcd watch state poisoned"))?;
        if !s.listed {
            return Ok(None);
        }
        s.dirty = false;
        Ok(Some(Snapshot {
            leases: s.leases.clone(),
        }))
    }

    /// Renew our lease before it expires; if someone deleted our key, say so
    /// loudly and write it back (flanneld exits instead and is restarted).
    pub async fn maintain(&mut self) -> anyhow::Result<()> {
        let Some(own) = self.own else { return Ok(()) };
        let (seen_rev, present, ours) = match self.state.lock() {
            Ok(s) => (
                s.revision,
                s.keys.contains(&own.lease.key()),
                s.leases.get(&own.lease.key()) == Some(&own.lease),
            ),
            Err(_) => return Ok(()),
        };
        if seen_rev >= own.revision && present && !ours {
            // Overwritten again soon after our write-back: another node
            // claims the key too. Writing back and forth would flip every
            // peer's tables; stop and say so (flanneld would exit).
            if self
                .written_back
                .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
            {
                bail!(
                    "our lease {} keeps being overwritten: another node claims it too (same public address?); not writing it back again",
                    own.lease.key()
                );
            }
            self.written_back = Some(Instant::now());
            // Someone wrote another node's lease under our key (a stock
            // IPv6-only flanneld on etcd takes any lease with PublicIP
            // 0.0.0.0 as its own): ours goes back, and it is said loudly.
            let key = self.lease_key(&own.lease);
            log::error!(
                "OUR LEASE {} WAS OVERWRITTEN in etcd by someone else: writing ours back",
                own.lease.key()
            );
            let opts = (own.lease_id != 0).then(|| PutOptions::new().with_lease(own.lease_id));
            let r = self
                .client
                .put(key.as_str(), own.lease.to_json(self.vni), opts)
                .await
                .with_context(|| format!("re-writing {key}"))?;
            self.own = Some(Own {
                revision: r.header().map_or(0, |h| h.revision()),
                ..own
            });
            return Ok(());
        }
        if seen_rev >= own.revision && !present {
            log::error!(
                "OUR LEASE {} WAS DELETED from etcd by someone else: re-creating it (PublicIP {}, {})",
                own.lease.key(),
                own.lease.public_ip,
                own.lease.backend
            );
            match self.create(&own.lease).await? {
                Some(new) => self.own = Some(new),
                None => bail!(
                    "our subnet {} was deleted and is now held by another node: restart to take a new one",
                    own.lease.subnet
                ),
            }
            return Ok(());
        }
        if own.lease_id != 0 && Instant::now() >= own.renew_at {
            let (mut keeper, mut stream) = self
                .client
                .lease_keep_alive(own.lease_id)
                .await
                .context("renewing our etcd lease")?;
            keeper
                .keep_alive()
                .await
                .context("renewing our etcd lease")?;
            let ttl = stream
                .message()
                .await
                .context("renewing our etcd lease")?
                .map_or(0, |r| r.ttl());
            if ttl <= 0 {
                log::warn!(
                    "our etcd lease {:x} expired: creating a new one",
                    own.lease_id
                );
                let id = self.grant().await?;
                let key = self.lease_key(&own.lease);
                let r = self
                    .client
                    .put(
                        key.as_str(),
                        own.lease.to_json(self.vni),
                        Some(PutOptions::new().with_lease(id)),
                    )
                    .await
                    .with_context(|| format!("re-writing {key}"))?;
                self.own = Some(Own {
                    lease_id: id,
                    renew_at: Instant::now() + self.renew_after(),
                    revision: r.header().map_or(0, |h| h.revision()),
                    ..own
                });
            } else {
                log::debug!(
                    "renewed our etcd lease for {} (TTL {ttl}s)",
                    own.lease.subnet
                );
                self.own = Some(Own {
                    renew_at: Instant::now() + self.renew_after(),
                    ..own
                });
            }
        }
        Ok(())
    }
}

struct ListedLease {
    name: String,
    parsed: anyhow::Result<Option<Lease>>,
    /// PublicIP alone: a reservation may hold nothing else.
    public_ip: Option<Ipv4Addr>,
    lease_id: i64,
}

fn public_ip_of(value: &[u8]) -> Option<Ipv4Addr> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    v.get("PublicIP")?.as_str()?.parse().ok()
}

fn parse(name: &str, value: &[u8]) -> anyhow::Result<Option<Lease>> {
    Lease::parse(name, value)
}

impl WatchState {
    fn apply(&mut self, name: &str, value: Option<&[u8]>) {
        match value {
            None => {
                self.keys.remove(name);
                self.reported.clear(name);
                if let Some(k) = crate::lease::canonical_key(name) {
                    self.leases.remove(&k);
                }
            }
            Some(v) => {
                self.keys.insert(name.to_string());
                let subnet = crate::lease::canonical_key(name);
                match parse(name, v) {
                    Ok(Some(l)) => {
                        self.reported.clear(name);
                        self.leases.insert(l.key(), l);
                    }
                    other => {
                        if let Some(s) = subnet {
                            self.leases.remove(&s);
                        }
                        if let Err(e) = other {
                            let why = format!("{e:#}");
                            if self.reported.report(name, &why) {
                                log::warn!("skipping etcd lease {name}: {why}");
                            }
                        }
                    }
                }
            }
        }
        self.dirty = true;
    }
}

fn set_error(state: &Mutex<WatchState>, why: String) {
    if let Ok(mut s) = state.lock() {
        s.error = Some(why);
    }
}

/// Keys listed per request: a 50 000-node cluster's leases (~8 MB) exceed
/// the 4 MB a gRPC response may carry, so the listing is paged.
const LIST_PAGE: i64 = 2000;

/// Every key under `prefix` at one revision (the first page's), paged.
async fn list_prefix(
    client: &mut Client,
    prefix: &str,
) -> Result<(i64, Vec<etcd_client::KeyValue>), etcd_client::Error> {
    let mut end = prefix.as_bytes().to_vec();
    // The range end of a prefix: its last byte plus one ('/' → '0').
    if let Some(last) = end.last_mut() {
        *last = last.saturating_add(1);
    }
    let mut from = prefix.as_bytes().to_vec();
    let mut rev = 0;
    let mut out = Vec::new();
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE);
        if rev != 0 {
            opts = opts.with_revision(rev);
        }
        let mut resp = client.get(from.clone(), Some(opts)).await?;
        if rev == 0 {
            rev = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let kvs = resp.take_kvs();
        match kvs.last() {
            // The next page starts just after the last key of this one.
            Some(kv) if more => {
                from = kv.key().to_vec();
                from.push(0);
            }
            _ => {
                out.extend(kvs);
                return Ok((rev, out));
            }
        }
        out.extend(kvs);
    }
}

/// List, then watch from the next revision. A lost connection resumes the
/// watch from the last revision seen; a compacted revision (or anything else
/// the watch cannot resume from) re-lists, so leases that vanished meanwhile go.
async fn watch_loop(mut client: Client, prefix: String, state: Arc<Mutex<WatchState>>) {
    let mut need_list = true;
    let mut backoff = Duration::from_millis(500);
    loop {
        if need_list {
            match list_prefix(&mut client, &prefix).await {
                Ok((rev, kvs)) => {
                    if let Ok(mut s) = state.lock() {
                        s.leases.clear();
                        s.keys.clear();
                        for kv in &kvs {
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
                            s.apply(&name, Some(kv.value()));
                        }
                        s.revision = rev;
                        s.listed = true;
                        s.error = None;
                        s.dirty = true;
                    }
                    super::wake();
                    need_list = false;
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    log::warn!("etcd: listing {prefix} failed, retrying in {backoff:?}: {e}");
                    set_error(&state, format!("etcd: listing {prefix}: {e}"));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let from = state.lock().map_or(0, |s| s.revision) + 1;
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = match client.watch(prefix.as_str(), Some(opts)).await {
            Ok(stream) => {
                if let Ok(mut s) = state.lock() {
                    s.error = None;
                }
                stream
            }
            Err(e) => {
                log::warn!("etcd: watching {prefix} failed, retrying in {backoff:?}: {e}");
                set_error(&state, format!("etcd: watching {prefix}: {e}"));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    backoff = Duration::from_millis(500);
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            log::warn!(
                                "etcd: revision {from} was compacted (now {}): re-listing and resyncing",
                                resp.compact_revision()
                            );
                        } else {
                            log::warn!(
                                "etcd: watch canceled ({}): re-listing",
                                resp.cancel_reason()
                            );
                        }
                        need_list = true;
                        break;
                    }
                    let Ok(mut s) = state.lock() else { return };
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let key = String::from_utf8_lossy(kv.key()).into_owned();
                        let name = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
                        match ev.event_type() {
                            EventType::Put => s.apply(&name, Some(kv.value())),
                            EventType::Delete => s.apply(&name, None),
                        }
                        s.revision = s.revision.max(kv.mod_revision());
                    }
                    if let Some(h) = resp.header() {
                        s.revision = s.revision.max(h.revision());
                    }
                    let changed = s.dirty;
                    drop(s);
                    if changed {
                        super::wake();
                    }
                }
                Ok(None) => {
                    log::warn!("etcd: watch on {prefix} ended: resuming");
                    break;
                }
                Err(e) => {
                    log::warn!("etcd: watch on {prefix} lost ({e}): resuming in {backoff:?}");
                    set_error(&state, format!("etcd: watch on {prefix} lost: {e}"));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    break;
                }
            }
        }
    }
}
