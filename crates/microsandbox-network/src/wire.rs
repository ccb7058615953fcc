//! Frames the stack writes to the guest itself (outside smoltcp): UDP datagrams from
//! relayed sessions and DNS answers. Pure code.

use std::net::{Ipv4Addr, SocketAddrV4};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    UdpPacket, UdpRepr,
};

/// Ethernet + IPv4 + UDP header bytes.
pub const UDP_OVERHEAD: usize = 14 + 20 + 8;

/// An Ethernet frame carrying `payload` from `from` to the guest's `to_port`; `None` when
/// it would not fit in `max_frame` (the stack does not fragment).
pub fn udp_frame(
    gateway_mac: [u8; 6],
    guest_mac: [u8; 6],
    from: SocketAddrV4,
    guest: Ipv4Addr,
    to_port: u16,
    payload: &[u8],
    max_frame: usize,
) -> Option<Vec<u8>> {
    if payload.len() + UDP_OVERHEAD > max_frame || payload.len() > 65507 {
        return None;
    }
    let udp = UdpRepr { src_port: from.port(), dst_port: to_port };
    let ip = Ipv4Repr {
        src_addr: *from.ip(),
        dst_addr: guest,
        next_header: IpProtocol::Udp,
        payload_len: 8 + payload.len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(gateway_mac),
        dst_addr: EthernetAddress(guest_mac),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; UDP_OVERHEAD + payload.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut f);
    let caps = ChecksumCapabilities::default();
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &caps);
    let mut u = UdpPacket::new_unchecked(p.payload_mut());
    udp.emit(
        &mut u,
        &IpAddress::Ipv4(*from.ip()),
        &IpAddress::Ipv4(guest),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::{self, Identity, Ingress};

    #[test]
    fn udp_frames_parse_back() {
        let guest = Ipv4Addr::new(172, 16, 0, 2);
        let from = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 7);
        let f = udp_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], from, guest, 40000, b"hello", 1514).unwrap();
        // Seen from the other side (as if the guest had sent it), it is a valid datagram.
        let me = Identity { guest_mac: [2, 0, 0, 0, 0, 1], guest_ip: *from.ip() };
        assert_eq!(
            guard::inspect(&f, &me),
            Ingress::Udp(guard::Udp { src_port: 7, dst: guest, dst_port: 40000 })
        );
        assert_eq!(guard::udp_payload(&f), Some(&b"hello"[..]));
        assert!(udp_frame([0; 6], [0; 6], from, guest, 1, &[0; 1500], 1514).is_none());
    }
}
