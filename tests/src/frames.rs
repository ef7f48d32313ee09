//! Crafting Ethernet/IPv4 frames for BPF_PROG_TEST_RUN (tests and benchmark).
use std::net::{Ipv4Addr, Ipv6Addr};

/// Internet checksum; 0 when `bytes` already carries a correct one.
pub fn csum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header (no options, DF set, TTL 64, checksum filled) and payload.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, tos: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, tos];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// An Ethernet frame.
pub fn eth(dst: [u8; 6], src: [u8; 6], proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A UDP datagram (header and payload) from `src` to `dst`, its checksum
/// right, or broken on purpose with `bad_checksum`.
pub fn udp(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
    bad_checksum: bool,
) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut d = sport.to_be_bytes().to_vec();
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut pseudo = src.octets().to_vec();
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&len.to_be_bytes());
    pseudo.extend_from_slice(&d);
    let mut c = csum(&pseudo);
    if c == 0 {
        c = 0xffff;
    }
    if bad_checksum {
        c ^= 0x5a5a;
    }
    d[6..8].copy_from_slice(&c.to_be_bytes());
    d
}

/// An IPv4 packet (20-byte header) carrying UDP `datagram`, without DF.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, datagram: &[u8]) -> Vec<u8> {
    let mut p = ipv4(src, dst, 17, 0, datagram);
    p[6] = 0; // DF clear, as the kernel's VXLAN sends
    p[10..12].copy_from_slice(&[0, 0]);
    let c = csum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// An IPv6 packet (no extension headers, hop limit 64) carrying a UDP
/// datagram to `dport` with `payload`, its checksum right.
pub fn ipv6_udp(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut d = sport.to_be_bytes().to_vec();
    d.extend_from_slice(&dport.to_be_bytes());
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut pseudo = src.octets().to_vec();
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&d);
    let c = match csum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    d[6..8].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[17, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&d);
    p
}

/// The VXLAN payload (header and inner frame) for `vni`.
pub fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0];
    v.extend_from_slice(&(vni << 8).to_be_bytes());
    v.extend_from_slice(inner);
    v
}

/// Split an IPv4 packet (20-byte header) into fragments whose payloads hold
/// at most `chunk` bytes (a multiple of 8), headers and checksums right.
pub fn fragments(packet: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let (hdr, payload) = packet.split_at(20);
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    let n = pieces.len();
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut h = hdr.to_vec();
            h[2..4].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
            let off = (i * chunk / 8) as u16 | if i + 1 < n { 0x2000 } else { 0 };
            h[6..8].copy_from_slice(&off.to_be_bytes());
            h[10..12].copy_from_slice(&[0, 0]);
            let c = csum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            h.extend_from_slice(piece);
            h
        })
        .collect()
}

/// Parse `aa:bb:…` into bytes.
pub fn mac(s: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (b, p) in m.iter_mut().zip(s.trim().split(':')) {
        *b = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    m
}
