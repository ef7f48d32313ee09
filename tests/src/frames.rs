//! Crafting Ethernet/IPv4 frames for BPF_PROG_TEST_RUN (tests and benchmark).
use std::net::Ipv4Addr;

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
