//! Internet checksums: of a 20-byte IPv4 header (no options: we only build
//! those), and the pieces of an outer UDP-over-IPv6 checksum.

#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += ((hdr[i] as u32) << 8) | hdr[i + 1] as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// One's complement sum of `b` in 16-bit big-endian words (even length),
/// unfolded. Eight bytes per load: byte-wise, the sums of a few addresses
/// keep more values alive than BPF's registers hold, and the spills overflow
/// the 512-byte stack.
#[inline(always)]
pub fn sum16<const N: usize>(b: &[u8; N]) -> u32 {
    let mut sum: u64 = 0;
    let mut i = 0;
    while i + 8 <= N {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        let x = u64::from_be_bytes(w);
        sum += (x >> 48) + ((x >> 32) & 0xffff) + ((x >> 16) & 0xffff) + (x & 0xffff);
        i += 8;
    }
    while i + 1 < N {
        sum += (((b[i] as u32) << 8) | b[i + 1] as u32) as u64;
        i += 2;
    }
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

/// Fold a 32-bit one's complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The IPv6 pseudo-header's sum: addresses, upper-layer length, next header.
#[inline(always)]
pub fn pseudo6(src: &[u8; 16], dst: &[u8; 16], len: u32, next: u8) -> u32 {
    sum16(src) + sum16(dst) + (len >> 16) + (len & 0xffff) + next as u32
}
