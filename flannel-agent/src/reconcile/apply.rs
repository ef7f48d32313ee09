//! Reading the node's state once per pass, and writing a [`Plan`] through a
//! [`Writer`]: the maps and netlink on a node, a recording in tests.
use std::future::Future;

use super::plan::{MapView, Observed, Op, Plan, Scope};
use crate::{ebpf::tables::Tables, netlink::Netlink};

/// Read the maps and the kernel's tables once: one dump each of the main
/// routing table, flannel.1's neighbours and its FDB. `known` is what the
/// maps hold when the caller knows it (the previous pass's target, all
/// written); the maps are read only without it.
pub async fn observe(
    tables: Option<&Tables>,
    known: Option<MapView>,
    nl: &Netlink,
    scope: &Scope,
) -> anyhow::Result<Observed> {
    let maps = match (tables, known) {
        (None, _) => None,
        (Some(_), Some(m)) => Some(m),
        (Some(t), None) => Some(MapView::read(t)?),
    };
    let main_routes = nl.main_routes().await?;
    let (neighbours, fdb) = match scope.vtep {
        Some(v) => (
            nl.neighbours(v.index).await?,
            nl.fdb_entries(v.index).await?,
        ),
        None => (Vec::new(), Vec::new()),
    };
    Ok(Observed {
        maps,
        main_routes,
        neighbours,
        fdb,
    })
}

/// Where a plan's writes go.
pub trait Writer {
    /// One map write (a syscall; made in plan order).
    fn map(&mut self, op: &Op) -> anyhow::Result<()>;
    /// A phase's map writes, one result per op in `ops`' order. They are
    /// independent, so a writer may group them (batch syscalls).
    fn maps(&mut self, ops: &[Op]) -> Vec<anyhow::Result<()>> {
        ops.iter().map(|op| self.map(op)).collect()
    }
    /// A phase's kernel writes: independent, so they may be in flight together.
    fn kernel(&mut self, ops: &[Op]) -> impl Future<Output = Vec<anyhow::Result<()>>>;
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub changes: usize,
    pub errors: Vec<String>,
    /// The maps after this pass, if every write succeeded.
    pub target: Option<MapView>,
}

impl Outcome {
    fn record(&mut self, what: anyhow::Result<()>) {
        match what {
            Ok(()) => self.changes += 1,
            Err(e) => {
                log::warn!("{e:#}");
                self.errors.push(format!("{e:#}"));
            }
        }
    }
}

/// Apply `plan` phase by phase. A failed write is logged and counted, and the
/// rest goes on (the next pass retries it); a phase never starts before the
/// previous one has finished.
///
/// `view` is what the maps held when the plan was made; it comes back in
/// [`Outcome::target`] with every write applied, if all succeeded.
pub async fn execute(plan: Plan, view: Option<MapView>, w: &mut impl Writer) -> Outcome {
    let mut out = Outcome {
        target: view,
        ..Outcome::default()
    };
    for (_, ops) in plan.phases {
        let (maps, kernel): (Vec<Op>, Vec<Op>) = ops.into_iter().partition(Op::is_map);
        for (op, r) in maps.iter().zip(w.maps(&maps)) {
            if r.is_ok()
                && let Some(v) = out.target.as_mut()
            {
                v.apply(op);
            }
            out.record(r);
        }
        if !kernel.is_empty() {
            for r in w.kernel(&kernel).await {
                out.record(r);
            }
        }
    }
    if !out.errors.is_empty() {
        // What the maps hold now is not known: the next pass reads them.
        out.target = None;
    }
    out
}

/// Netlink requests in flight at once: the kernel answers them in order on one
/// socket, so a phase costs one round trip per batch, not per entry.
const NETLINK_PIPELINE: usize = 256;

/// Writes of one kind gathered for one batch call, with their ops' places.
struct Batch<T> {
    at: Vec<usize>,
    items: Vec<T>,
}

impl<T> Default for Batch<T> {
    fn default() -> Self {
        Batch {
            at: Vec::new(),
            items: Vec::new(),
        }
    }
}

impl<T> Batch<T> {
    fn push(&mut self, at: usize, item: T) {
        self.at.push(at);
        self.items.push(item);
    }

    /// Write the batch and put each result at its op's place.
    fn write(
        &self,
        results: &mut [Option<anyhow::Result<()>>],
        f: impl FnOnce(&[T]) -> Vec<anyhow::Result<()>>,
    ) {
        if self.items.is_empty() {
            return;
        }
        for (i, r) in self.at.iter().zip(f(&self.items)) {
            results[*i] = Some(r);
        }
    }
}

/// The node's maps (when the eBPF data path runs) and its kernel tables.
pub struct NodeWriter<'a> {
    pub tables: Option<&'a mut Tables>,
    pub nl: &'a Netlink,
}

impl Writer for NodeWriter<'_> {
    fn map(&mut self, op: &Op) -> anyhow::Result<()> {
        let Some(t) = self.tables.as_deref_mut() else {
            anyhow::bail!("{op}: this node has no eBPF maps");
        };
        match op {
            Op::ResetPeer(slot) => t.reset_peer(*slot),
            Op::SetFdb(mac, v) => t.set_fdb(*mac, *v),
            Op::SetArp(vtep, mac) => t.set_arp(*vtep, *mac),
            Op::SetRoute(dst, v) => t.set_route(*dst, *v),
            Op::DelRoute(dst) => t.del_route(*dst),
            Op::DelArp(vtep) => t.del_arp(*vtep),
            Op::DelFdb(mac) => t.del_fdb(*mac),
            other => anyhow::bail!("{other} is not a map write"),
        }
    }

    fn maps(&mut self, ops: &[Op]) -> Vec<anyhow::Result<()>> {
        let Some(t) = self.tables.as_deref_mut() else {
            return ops.iter().map(|op| self.map(op)).collect();
        };
        // Same-kind writes in one batch each, in this order: resets before
        // the FDB entries naming their slots. Each list keeps the ops' places.
        let (mut resets, mut fdbs, mut arps, mut routes) = (
            Batch::default(),
            Batch::default(),
            Batch::default(),
            Batch::default(),
        );
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::ResetPeer(slot) => resets.push(i, *slot),
                Op::SetFdb(m, v) => fdbs.push(i, (*m, *v)),
                Op::SetArp(ip, m) => arps.push(i, (*ip, *m)),
                Op::SetRoute(d, v) => routes.push(i, (*d, *v)),
                _ => {}
            }
        }
        let mut results: Vec<Option<anyhow::Result<()>>> = ops.iter().map(|_| None).collect();
        resets.write(&mut results, |x| t.reset_peers(x));
        fdbs.write(&mut results, |x| t.set_fdbs(x));
        arps.write(&mut results, |x| t.set_arps(x));
        routes.write(&mut results, |x| t.set_routes(x));
        ops.iter()
            .zip(results)
            .map(|(op, r)| r.unwrap_or_else(|| self.map(op)))
            .collect()
    }

    async fn kernel(&mut self, ops: &[Op]) -> Vec<anyhow::Result<()>> {
        use futures::StreamExt;
        let nl = self.nl;
        futures::stream::iter(ops.iter().map(|op| async move {
            match op {
                Op::Neighbour { dev, ip, mac } => nl.replace_neighbour(*dev, *ip, *mac).await,
                Op::KernelFdb { dev, mac, dst } => nl.replace_fdb(*dev, *mac, *dst).await,
                Op::Route { dev, dst, gw } => nl.replace_route(*dev, *dst, *gw).await,
                Op::DelKernelRoute(r) => nl.delete_route(r).await,
                Op::DelNeighbour(n) => nl.delete_neighbour(n).await,
                Op::DelKernelFdb(e) => nl.delete_fdb(e).await,
                other => Err(anyhow::anyhow!("{other} is not a kernel write")),
            }
        }))
        .buffer_unordered(NETLINK_PIPELINE)
        .collect()
        .await
    }
}
