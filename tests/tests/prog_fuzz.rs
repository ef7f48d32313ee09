//! Generated frames through BPF_PROG_TEST_RUN for each program (encap, XDP
//! decap, TC decap): valid and mutated (every header field, lengths, IP
//! options, fragments, VLAN tags, truncations). Each verdict and output is
//! checked against a reference model written here, and at the end the
//! counters must account for every frame.
//!
//! A fixed-seed run of FLANNEL_FUZZ_FRAMES frames per program (100 000 by
//! default) runs in the suite; `cargo xtask fuzz` runs 1 000 000.
use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use flannel_agent::ebpf::bpf_sys::lookup_per_cpu;
use flannel_ebpf_common::{Counter, PROG_DECAP, PROG_DECAP_TC, PROG_ENCAP, PeerStats};
use flannel_tests::{
    frames::{csum, eth, ipv4},
    prereq,
    progs::{
        self, Bench, LOCAL_VTEP, REMOTE_SLOT, REMOTE_VTEP, UNDERLAY_PEER_MAC, bench, load, map_fd,
    },
};

const PEER_MAC: [u8; 6] = UNDERLAY_PEER_MAC;
const OUR_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x01];
const PUBLIC_IP: [u8; 4] = progs::PUBLIC_IP.octets();
const REMOTE_IP: [u8; 4] = progs::REMOTE_IP.octets();
const REMOTE_SUBNET: [u8; 3] = [10, 244, 2];

/// xorshift64*: fixed seed, the same frames every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

fn frames_per_program() -> usize {
    std::env::var("FLANNEL_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

/// What a program did to a frame.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Passed on, untouched.
    Pass,
    Drop,
    /// Decapsulated: the inner frame behind the outer MACs.
    Decap(Vec<u8>),
}

/// The reference model of both decap programs, with the test's maps: one
/// member (REMOTE_IP, REMOTE_VTEP, 10.244.2.0/24), Network 10.244.0.0/16.
/// Returns the verdict and the counter it must bump (if any), and whether a
/// peer counter moves (rx_packets on decap, rx_drops on a member's drop).
fn model_decap(f: &[u8], hook: Hook) -> (Verdict, Option<Counter>, (u64, u64)) {
    use Verdict::*;
    let be = |o: usize| u16::from_be_bytes([f[o], f[o + 1]]);
    let none = (0, 0);
    if f.len() < 14 {
        return (Pass, None, none);
    }
    let l2 = match (be(12), hook) {
        (0x0800, _) => 14,
        (0x8100, Hook::Xdp) if f.len() >= 18 && be(14) & 0x0fff == 0 && be(16) == 0x0800 => 18,
        _ => return (Pass, None, none),
    };
    if f.len() < l2 + 20 {
        return (Pass, Some(Counter::RxPassMalformed), none);
    }
    let ip = &f[l2..];
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    if saddr[0..2] == [10, 244] {
        return (Drop, Some(Counter::RxDropPodSourceOnUnderlay), none);
    }
    if ip[9] != 17 {
        return (Pass, None, none);
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 || (u16::from_be_bytes([ip[2], ip[3]]) as usize) < ihl + 8 {
        return (Pass, Some(Counter::RxPassMalformed), none);
    }
    if ip[16..20] != PUBLIC_IP {
        return (Pass, None, none);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x1fff != 0 {
        return (Pass, Some(Counter::RxPassFragment), none);
    }
    let first_fragment = frag & 0x2000 != 0;
    let l4 = l2 + ihl;
    if f.len() < l4 + 8 {
        return (Pass, Some(Counter::RxPassMalformed), none);
    }
    if be(l4 + 2) != 8472 {
        return (Pass, None, none);
    }
    let vx = l4 + 8;
    let ip_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    // A first fragment must hold the headers within its IPv4 length too.
    if f.len() < vx + 8 + 14 + 20 || (first_fragment && l2 + ip_len < vx + 8 + 14 + 20) {
        let c = if first_fragment {
            Counter::RxDropTinyFragment
        } else {
            Counter::RxDropTruncated
        };
        return (Drop, Some(c), none);
    }
    if f[vx] != 0x08 || f[vx + 1..vx + 4] != [0, 0, 0] || f[vx + 7] != 0 {
        return (Drop, Some(Counter::RxDropBadFlags), none);
    }
    if f[vx + 4..vx + 7] != [0, 0, 1] {
        return (Drop, Some(Counter::RxDropBadVni), none);
    }
    let inner = vx + 8;
    if f[inner + 6..inner + 12] != REMOTE_VTEP || saddr != REMOTE_IP {
        return (Drop, Some(Counter::RxDropNonMember), none);
    }
    if f[inner..inner + 6] != LOCAL_VTEP {
        return (Drop, Some(Counter::RxDropBadInnerDst), (0, 1));
    }
    match be(inner + 12) {
        0x0800 => {}
        0x0806 => return (Pass, Some(Counter::RxPassInnerNotIpv4), none),
        _ => return (Drop, Some(Counter::RxDropInnerNotIpv4), (0, 1)),
    }
    if f[inner + 14 + 9] == 17 && f[inner + 14 + 16..inner + 14 + 20] == PUBLIC_IP {
        return (Drop, Some(Counter::RxDropNested), (0, 1));
    }
    let isrc = &f[inner + 14 + 12..inner + 14 + 16];
    if isrc[0..2] == [10, 244] && isrc[0..3] != REMOTE_SUBNET {
        return (Drop, Some(Counter::RxDropSpoofedInner), (0, 1));
    }
    if first_fragment {
        return (Pass, Some(Counter::RxPassFragment), none);
    }
    let mut out = f[0..12].to_vec();
    out.extend_from_slice(&f[inner + 12..]);
    (Decap(out), Some(Counter::RxDecap), (1, 0))
}

/// The encap model: Some(()) when the frame must be encapsulated, else the
/// fallback counter (frame passed unchanged).
fn model_encap(f: &[u8]) -> Result<(), Counter> {
    if f.len() < 34 {
        return Err(Counter::TxFallbackMalformed);
    }
    if u16::from_be_bytes([f[12], f[13]]) != 0x0800 {
        return Err(Counter::TxFallbackNotIpv4);
    }
    if f[0..6] != REMOTE_VTEP {
        return Err(Counter::TxFallbackNoFdb);
    }
    Ok(())
}

/// A member's valid VXLAN frame: optional IP options, VLAN 0 tag, first
/// fragment; the inner packet a UDP or ICMP datagram of random size.
fn valid_vxlan(rng: &mut Rng, hook: Hook) -> Vec<u8> {
    let payload: Vec<u8> = (0..rng.below(120)).map(|_| rng.byte()).collect();
    let inner_src = Ipv4Addr::new(10, 244, 2, 1 + rng.below(250) as u8);
    let inner_ip = ipv4(
        inner_src,
        Ipv4Addr::new(10, 244, 1, 10),
        rng.pick(&[1, 6, 17]),
        0,
        &payload,
    );
    let inner = eth(LOCAL_VTEP, REMOTE_VTEP, 0x0800, &inner_ip);
    let mut vx = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vx.extend_from_slice(&inner);
    let mut udp = (49152 + rng.below(16000) as u16).to_be_bytes().to_vec();
    udp.extend_from_slice(&8472u16.to_be_bytes());
    udp.extend_from_slice(&((8 + vx.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&vx);
    let mut ip = ipv4(
        Ipv4Addr::from(REMOTE_IP),
        Ipv4Addr::from(PUBLIC_IP),
        17,
        0,
        &udp,
    );
    ip[6] = 0;
    if rng.chance(5) {
        let words = 1 + rng.below(3);
        ip[0] = 0x45 + words as u8;
        let tot = (ip.len() + 4 * words) as u16;
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        ip.splice(20..20, std::iter::repeat_n(1u8, 4 * words));
    }
    if rng.chance(6) {
        ip[6] = 0x20; // a first fragment
    }
    let ihl = (ip[0] & 0x0f) as usize * 4;
    ip[10..12].copy_from_slice(&[0, 0]);
    let c = csum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    if hook == Hook::Xdp && rng.chance(6) {
        let mut tagged = vec![rng.byte() & 0xe0, 0, 0x08, 0x00];
        tagged.extend_from_slice(&ip);
        return eth(OUR_MAC, PEER_MAC, 0x8100, &tagged);
    }
    eth(OUR_MAC, PEER_MAC, 0x0800, &ip)
}

/// Offsets of the fields worth mutating in an untagged, option-less frame.
const FIELDS: &[usize] = &[
    12, 13, // ethertype
    14, 15, 16, 17, 20, 21, 23, // ver/ihl, tos, tot_len, frag, proto
    26, 29, 30, 33, // saddr, daddr
    36, 37, // dport
    42, 43, 45, 46, 48, 49, // VXLAN flags, reserved, VNI
    50, 55, 56, 61, 62, 63, // inner dst, src, proto
    73, // inner proto
    76, 77, 78, // inner saddr
    16, 17, // tot_len (a first fragment's headers beyond it)
];

fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        match rng.below(10) {
            // A field set to a value that matters, or to anything.
            0..=4 => {
                let off = rng.pick(FIELDS);
                if off < f.len() {
                    f[off] = match rng.below(4) {
                        0 => rng.byte(),
                        1 => f[off] ^ (1 << rng.below(8)),
                        2 => 0,
                        _ => 0xff,
                    };
                }
            }
            // Whole addresses to interesting values.
            5 => {
                let (off, vals): (usize, &[[u8; 4]]) = match rng.below(3) {
                    0 => (
                        26,
                        &[REMOTE_IP, [10, 9, 0, 99], [10, 244, 2, 10], [10, 244, 3, 7]],
                    ),
                    1 => (30, &[PUBLIC_IP, [10, 9, 0, 7], [255, 255, 255, 255]]),
                    _ => (
                        rng.pick(&[76usize, 80]),
                        &[
                            [10, 244, 2, 9],
                            [10, 244, 3, 9],
                            [10, 244, 1, 9],
                            [192, 168, 1, 1],
                            PUBLIC_IP,
                        ],
                    ),
                };
                if off + 4 <= f.len() {
                    f[off..off + 4].copy_from_slice(&rng.pick(vals));
                }
            }
            // Fragment bits and offsets.
            6 => {
                if f.len() > 21 {
                    let (a, b, c) = (0x20 | (rng.byte() & 0x1f), rng.byte(), rng.byte());
                    f[20] = rng.pick(&[0x00, 0x20, 0x40, a, b]);
                    f[21] = rng.pick(&[0, c]);
                }
            }
            // Truncated anywhere.
            7 => {
                let keep = 14 + rng.below(f.len().saturating_sub(13).max(1));
                f.truncate(keep.max(14));
            }
            // Any byte at all.
            8 => {
                let off = rng.below(f.len());
                f[off] = rng.byte();
            }
            // MACs: the inner ones swapped for strangers.
            _ => {
                let off = rng.pick(&[50usize, 56]);
                if off + 6 <= f.len() {
                    f[off..off + 6].copy_from_slice(&[0x02, rng.byte(), 1, 2, 3, 4]);
                }
            }
        }
    }
}

fn counters(ebpf: &Ebpf) -> BTreeMap<&'static str, u64> {
    Counter::ALL
        .iter()
        .map(|c| (c.name(), progs::counter(ebpf, *c)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn peer(ebpf: &Ebpf) -> (u64, u64) {
    lookup_per_cpu::<u32, PeerStats>(map_fd(ebpf, "PEER_STATS"), &REMOTE_SLOT)
        .unwrap()
        .unwrap()
        .iter()
        .fold((0, 0), |(p, d), v| (p + v.rx_packets, d + v.rx_drops))
}

/// Run `frame` through the program: (return code, output frame), or None
/// when the kernel builds no test context for a frame that short.
fn run(ebpf: &mut Ebpf, name: &str, xdp: bool, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 128];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    };
    let r = if xdp {
        let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.test_run(opts)
    } else {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.test_run(opts)
    }
    .ok()?;
    out.truncate(r.data_size_out as usize);
    Some((r.return_value, out))
}

/// Frame `n` of a decap run: valid, mutated, or noise.
fn decap_frame(rng: &mut Rng, hook: Hook) -> Vec<u8> {
    let mut f = valid_vxlan(rng, hook);
    match rng.below(10) {
        0..=1 => {}
        2..=8 => mutate(rng, &mut f),
        _ => f = (0..14 + rng.below(200)).map(|_| rng.byte()).collect(),
    }
    f
}

fn fuzz_decap(s: &Bench, hook: Hook, n: usize, seed: u64) {
    let mut ebpf = load(s);
    let (name, xdp, pass, drop) = match hook {
        Hook::Xdp => (PROG_DECAP, true, 2, 1),
        Hook::Tc => (PROG_DECAP_TC, false, 0, 2),
    };
    let mut rng = Rng(seed);
    let mut want: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut want_peer = (0, 0);
    let (mut ran, mut skipped) = (0usize, 0usize);
    let mut verdicts: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..n {
        let f = decap_frame(&mut rng, hook);
        let Some((rc, out)) = run(&mut ebpf, name, xdp, &f) else {
            // TC builds no skb for a runt; such a frame never reaches a hook on an skb.
            assert!(
                f.len() < 34 && hook == Hook::Tc,
                "frame {i} not run: {f:02x?}"
            );
            skipped += 1;
            continue;
        };
        ran += 1;
        let (expect, counter, peer_delta) = model_decap(&f, hook);
        let got = match rc {
            r if r == pass && out == f => Verdict::Pass,
            r if r == pass => Verdict::Decap(out.clone()),
            r if r == drop => Verdict::Drop,
            r => panic!("{hook:?} frame {i}: return code {r}"),
        };
        assert_eq!(
            got,
            expect,
            "{hook:?} frame {i} ({} bytes): {f:02x?}",
            f.len()
        );
        if got == Verdict::Drop {
            assert_eq!(out, f, "{hook:?} frame {i}: a dropped frame was changed");
        }
        if let Some(c) = counter {
            *want.entry(c.name()).or_default() += 1;
        }
        want_peer.0 += peer_delta.0;
        want_peer.1 += peer_delta.1;
        let v = match &expect {
            Verdict::Decap(_) => "decap".to_string(),
            v => format!("{v:?}").to_lowercase(),
        };
        *verdicts.entry(v).or_default() += 1;
    }
    assert_eq!(
        counters(&ebpf),
        want,
        "{hook:?}: the counters account for every frame"
    );
    assert_eq!(
        peer(&ebpf),
        want_peer,
        "{hook:?}: the peer's rx_packets and rx_drops"
    );
    eprintln!(
        "fuzz {hook:?} decap: {ran} frames run ({skipped} runts TC cannot take), verdicts {verdicts:?}, counters {want:?}"
    );
}

fn fuzz_encap(s: &Bench, n: usize, seed: u64) {
    let mut ebpf = load(s);
    let mut rng = Rng(seed);
    let mut want: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut encapped = 0u64;
    for i in 0..n {
        // The frames flannel.1 hands over: IPv4 to the member's VtepMAC,
        // mostly; ARP, unknown VtepMACs, runts and noise too.
        let len = 14 + rng.below(300);
        let mut f: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        if !rng.chance(5) {
            f[0..6].copy_from_slice(&REMOTE_VTEP);
        }
        if !rng.chance(5) {
            f[12..14].copy_from_slice(&[0x08, 0x00]);
        }
        f[6..12].copy_from_slice(&LOCAL_VTEP);
        let Some((rc, out)) = run(&mut ebpf, PROG_ENCAP, false, &f) else {
            assert!(f.len() < 34, "frame {i} not run");
            continue;
        };
        match model_encap(&f) {
            Err(c) => {
                assert_eq!(
                    (rc, &out),
                    (0, &f),
                    "encap frame {i}: {} must pass unchanged",
                    c.name()
                );
                *want.entry(c.name()).or_default() += 1;
            }
            Ok(()) => {
                assert_eq!(rc, 7, "encap frame {i}: redirect expected: {f:02x?}");
                assert_eq!(out.len(), f.len() + 50);
                let ip = &out[14..34];
                assert_eq!(out[0..6], PEER_MAC);
                assert_eq!(out[12..14], [0x08, 0x00]);
                assert_eq!(ip[0], 0x45);
                let ecn = f[15] & 3;
                assert_eq!(
                    ip[1],
                    if ecn == 3 { 2 } else { ecn },
                    "frame {i}: outer TOS"
                );
                assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, f.len() + 36);
                assert_eq!((ip[6], ip[7], ip[8], ip[9]), (0, 0, 64, 17));
                assert_eq!((&ip[12..16], &ip[16..20]), (&PUBLIC_IP[..], &REMOTE_IP[..]));
                assert_eq!(csum(ip), 0, "frame {i}: outer IPv4 checksum");
                let sport = u16::from_be_bytes([out[34], out[35]]);
                assert!((32768..61000).contains(&sport));
                assert_eq!(out[36..38], 8472u16.to_be_bytes());
                assert_eq!(
                    u16::from_be_bytes([out[38], out[39]]) as usize,
                    f.len() + 16
                );
                assert_eq!(out[40..50], [0, 0, 0x08, 0, 0, 0, 0, 0, 1, 0]);
                assert_eq!(out[50..], f[..], "frame {i}: inner frame untouched");
                *want.entry(Counter::TxEncap.name()).or_default() += 1;
                encapped += 1;
            }
        }
    }
    assert_eq!(
        counters(&ebpf),
        want,
        "encap: the counters account for every frame"
    );
    eprintln!("fuzz encap: {n} frames, {encapped} encapsulated, counters {want:?}");
}

#[test]
fn generated_frames_match_the_reference_model() {
    if !prereq::ready("prog_fuzz") {
        return;
    }
    let n = frames_per_program();
    let s = bench("ptr-fuzz");
    s.ns.run(|| {
        fuzz_encap(&s, n, 0x5eed_0001);
        fuzz_decap(&s, Hook::Xdp, n, 0x5eed_0002);
        fuzz_decap(&s, Hook::Tc, n, 0x5eed_0003);
    })
    .unwrap();
}
