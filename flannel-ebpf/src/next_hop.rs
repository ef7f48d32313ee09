//! The underlay next hop of an outer packet, either family: the FIB lookup
//! and its per-peer, per-CPU cache (NEXT_HOPS, NEXT_HOPS6), refreshed after
//! NEXT_HOP_TTL_NS or when the peer's address changes. The outer IPv4 ID
//! counter lives in the IPv4 entry.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_OUTPUT, bpf_fib_lookup,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32},
    programs::TcContext,
};
use flannel_ebpf_common::{Counter, NEXT_HOP_TTL_NS, NextHop, NextHop6};

/// Where the outer packet goes.
pub(crate) struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The neighbour is not resolved yet: let `bpf_redirect_neigh` resolve it.
    pub resolve: bool,
    /// The outer IPv4 ID to send (unused over IPv6).
    pub ip_id: u16,
}

/// A cache entry for one peer: NextHop (IPv4) or NextHop6.
pub(crate) trait HopEntry {
    type Addr: PartialEq;
    /// The peer address it was resolved for, if it holds an answer.
    fn resolved_for(&self) -> Option<&Self::Addr>;
    fn resolved_ns(&self) -> u64;
    fn hop(&self) -> Hop;
    fn store(&mut self, addr: &Self::Addr, hop: &Hop, now: u64);
    /// The first of `segs` outer IDs to send (IPv4 only).
    fn next_id(&mut self, segs: u16) -> u16;
}

/// The next hop toward `addr` from the cache entry while it is fresh and
/// for the same address (taking its next outer IDs). None: look it up, then
/// [`remember`] it. `segs`: how many packets this one becomes on the wire
/// (GSO), for the ID counter. Two calls around the caller's lookup rather
/// than one taking a closure: LLVM may outline a closure, and BTF cannot
/// describe the Result it would return.
#[inline(always)]
pub(crate) fn fresh<E: HopEntry>(
    entry: &mut Option<&mut E>,
    addr: &E::Addr,
    segs: u16,
    now: u64,
) -> Option<Hop> {
    let c = entry.as_deref_mut()?;
    if c.resolved_for() == Some(addr) && now.wrapping_sub(c.resolved_ns()) < NEXT_HOP_TTL_NS {
        let mut hop = c.hop();
        hop.ip_id = c.next_id(segs);
        return Some(hop);
    }
    None
}

/// Cache a hop just looked up (when resolved) and give it its outer ID.
#[inline(always)]
pub(crate) fn remember<E: HopEntry>(
    entry: Option<&mut E>,
    addr: &E::Addr,
    segs: u16,
    now: u64,
    mut hop: Hop,
) -> Hop {
    match entry {
        Some(c) if !hop.resolve => {
            c.store(addr, &hop, now);
            hop.ip_id = c.next_id(segs);
        }
        // No counter runs (an unresolved neighbour): a random ID.
        _ => hop.ip_id = unsafe { bpf_get_prandom_u32() } as u16,
    }
    hop
}

impl HopEntry for NextHop {
    type Addr = [u8; 4];
    fn resolved_for(&self) -> Option<&[u8; 4]> {
        (self.ifindex != 0).then_some(&self.node_ip)
    }
    fn resolved_ns(&self) -> u64 {
        self.resolved_ns
    }
    fn hop(&self) -> Hop {
        Hop {
            ifindex: self.ifindex,
            smac: self.smac,
            dmac: self.dmac,
            resolve: false,
            ip_id: 0,
        }
    }
    fn store(&mut self, addr: &[u8; 4], hop: &Hop, now: u64) {
        if self.node_ip != *addr {
            // Another node in the slot: its counter starts anew.
            self.node_ip = *addr;
            self.id_seeded = 0;
        }
        self.ifindex = hop.ifindex;
        self.smac = hop.smac;
        self.dmac = hop.dmac;
        self.resolved_ns = now;
    }
    /// A GSO aggregate's segments take consecutive IDs (as the kernel's
    /// ip_select_ident_segs reserves them): the counter moves past all. It
    /// starts at random for a new node, and for an entry an earlier version
    /// left (whose counter every CPU would share from zero).
    fn next_id(&mut self, segs: u16) -> u16 {
        if self.id_seeded == 0 {
            self.ip_id = unsafe { bpf_get_prandom_u32() } as u16;
            self.id_seeded = 1;
        }
        let id = self.ip_id.wrapping_add(1);
        self.ip_id = self.ip_id.wrapping_add(segs);
        id
    }
}

impl HopEntry for NextHop6 {
    type Addr = [u8; 16];
    fn resolved_for(&self) -> Option<&[u8; 16]> {
        (self.ifindex != 0).then_some(&self.node_ip6)
    }
    fn resolved_ns(&self) -> u64 {
        self.resolved_ns
    }
    fn hop(&self) -> Hop {
        Hop {
            ifindex: self.ifindex,
            smac: self.smac,
            dmac: self.dmac,
            resolve: false,
            ip_id: 0,
        }
    }
    fn store(&mut self, addr: &[u8; 16], hop: &Hop, now: u64) {
        self.node_ip6 = *addr;
        self.ifindex = hop.ifindex;
        self.smac = hop.smac;
        self.dmac = hop.dmac;
        self.resolved_ns = now;
    }
    fn next_id(&mut self, _segs: u16) -> u16 {
        0
    }
}

/// Look up the outer packet's route and neighbour (`p` filled in) for
/// either family. IPv6 lookups answer only on interfaces forwarding IPv6.
#[inline(always)]
pub(crate) fn fib_lookup_outer(ctx: &TcContext, p: &mut bpf_fib_lookup) -> Result<Hop, Counter> {
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            p,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    let resolve = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => false,
        BPF_FIB_LKUP_RET_NO_NEIGH => true,
        BPF_FIB_LKUP_RET_FWD_DISABLED => return Err(Counter::TxFallbackForwardingOff),
        _ => return Err(Counter::TxFallbackNoRoute),
    };
    Ok(Hop {
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
        resolve,
        ip_id: 0,
    })
}
