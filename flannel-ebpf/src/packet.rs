//! Bounds-checked access to packet bytes, shared by the TC and XDP programs.

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const UDP_LEN: usize = 8;
pub const VXLAN_LEN: usize = 8;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const IPPROTO_UDP: u8 = 17;
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
