//! Bounds-checked access to packet bytes, shared by the TC and XDP programs.

pub const ETH_LEN: usize = 14;

/// `skb->pkt_type` of a frame addressed to this host.
pub const PACKET_HOST: u32 = 0;
pub const IPV4_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
pub const VXLAN_LEN: usize = 8;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_TCP: u8 = 6;
/// An IPv4 header without options, version 4.
pub const IPV4_VER_IHL: u8 = 0x45;
/// VXLAN flags byte with only the I (valid VNI) bit.
pub const VXLAN_FLAG_I: u8 = 0x08;

/// Pointer to `len` bytes at `off`, or None if they are not all in the linear data.
#[inline(always)]
pub fn ptr_at<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn be16(b: &[u8; 2]) -> u16 {
    u16::from_be_bytes(*b)
}

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub ver_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

#[repr(C)]
pub struct VxlanHdr {
    pub flags: u8,
    pub reserved1: [u8; 3],
    pub vni: [u8; 3],
    pub reserved2: u8,
}

impl VxlanHdr {
    #[inline(always)]
    pub fn vni(&self) -> u32 {
        ((self.vni[0] as u32) << 16) | ((self.vni[1] as u32) << 8) | self.vni[2] as u32
    }

    /// Only the I bit set and every reserved bit zero, as the kernel requires
    /// of a VXLAN device with no extensions.
    #[inline(always)]
    pub fn flags_valid(&self) -> bool {
        self.flags == VXLAN_FLAG_I
            && self.reserved1[0] == 0
            && self.reserved1[1] == 0
            && self.reserved1[2] == 0
            && self.reserved2 == 0
    }
}

impl Ipv4Hdr {
    /// More fragments follow, or this is a later one.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        be16(&self.frag_off) & 0x3fff != 0
    }

    #[inline(always)]
    pub fn as_bytes(&self) -> &[u8; IPV4_LEN] {
        // SAFETY: repr(C) of byte fields only: 20 bytes, align 1.
        unsafe { &*(self as *const Ipv4Hdr as *const [u8; IPV4_LEN]) }
    }
}

/// The first four bytes of a TCP or UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

/// What the encapsulation writes in front of the inner IPv4 packet: outer
/// Ethernet, IPv4, UDP and VXLAN headers, and the inner Ethernet header.
#[repr(C)]
pub struct VxlanFrame {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vx: VxlanHdr,
    pub inner: EthHdr,
}

/// The same over IPv6.
#[repr(C)]
pub struct Vxlan6Frame {
    pub eth: EthHdr,
    pub ip6: Ipv6Hdr,
    pub udp: UdpHdr,
    pub vx: VxlanHdr,
    pub inner: EthHdr,
}

impl VxlanFrame {
    #[inline(always)]
    pub fn as_bytes(&self) -> &[u8; size_of::<VxlanFrame>()] {
        // SAFETY: repr(C) of byte fields only, align 1, no padding.
        unsafe { &*(self as *const VxlanFrame as *const [u8; size_of::<VxlanFrame>()]) }
    }
}

/// A copy of the `T` at `off` in an skb: read in place when the linear data
/// holds it (no helper call), else through bpf_skb_load_bytes.
#[inline(always)]
pub fn skb_read<T>(ctx: &aya_ebpf::programs::TcContext, off: usize) -> Option<T> {
    match ptr_at::<T>(ctx.data(), ctx.data_end(), off) {
        // SAFETY: bounds checked by ptr_at; the header types are plain bytes (align 1).
        Some(p) => Some(unsafe { core::ptr::read_unaligned(p) }),
        None => ctx.load::<T>(off).ok(),
    }
}
