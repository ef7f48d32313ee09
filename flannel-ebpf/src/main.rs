//! flannel-ebpf kernel programs: Flannel's VXLAN data path in TC (encap) and
//! XDP or TC ingress (decap), and the direct path between cni0 and the
//! underlay.
#![no_std]
#![no_main]

mod csum;
mod decap;
mod decap_tc;
mod deliver;
mod direct6;
mod encap;
mod encap6;
mod flows;
mod maps;
mod next_hop;
mod packet;
mod pod_egress;
mod rx;
mod rx6;
mod tunnel;
mod tunnel6;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
