//! Frames the stack writes to the guest itself (outside smoltcp): UDP datagrams from
//! relayed sessions and DNS answers, over IPv4 or IPv6. Pure code.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, UdpPacket, UdpRepr,
};

/// Ethernet + IPv4 + UDP header bytes.
pub const UDP_OVERHEAD: usize = 14 + 20 + 8;
/// Ethernet + IPv6 + UDP header bytes.
pub const UDP6_OVERHEAD: usize = 14 + 40 + 8;

/// An Ethernet frame carrying `payload` from `from` to the guest's `to_port`; `None` when
/// it would not fit in `max_frame` (the stack does not fragment) or when `from` and
/// `guest` are not of the same family.
pub fn udp_frame(
    gateway_mac: [u8; 6],
    guest_mac: [u8; 6],
    from: SocketAddr,
    guest: IpAddr,
    to_port: u16,
    payload: &[u8],
    max_frame: usize,
) -> Option<Vec<u8>> {
    let overhead = if guest.is_ipv4() { UDP_OVERHEAD } else { UDP6_OVERHEAD };
    if payload.len() + overhead > max_frame || payload.len() > 65507 {
        return None;
    }
    let udp = UdpRepr { src_port: from.port(), dst_port: to_port };
    let ethertype = if guest.is_ipv4() { EthernetProtocol::Ipv4 } else { EthernetProtocol::Ipv6 };
    let eth = EthernetRepr { src_addr: EthernetAddress(gateway_mac), dst_addr: EthernetAddress(guest_mac), ethertype };
    let mut buf = vec![0u8; overhead + payload.len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut f);
    let caps = ChecksumCapabilities::default();
    let (src, dst): (IpAddress, IpAddress) = (from.ip().into(), guest.into());
    let udp_bytes = match (from.ip(), guest) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4Repr { src_addr: s, dst_addr: d, next_header: IpProtocol::Udp, payload_len: 8 + payload.len(), hop_limit: 64 };
            let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
            ip.emit(&mut p, &caps);
            &mut f.payload_mut()[20..]
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6Repr { src_addr: s, dst_addr: d, next_header: IpProtocol::Udp, payload_len: 8 + payload.len(), hop_limit: 64 };
            let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
            ip.emit(&mut p);
            &mut f.payload_mut()[40..]
        }
        _ => return None,
    };
    let mut u = UdpPacket::new_unchecked(udp_bytes);
    udp.emit(&mut u, &src, &dst, payload.len(), |b| b.copy_from_slice(payload), &caps);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::{self, Identity, Ingress};
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn udp_frames_parse_back() {
        let guest = Ipv4Addr::new(172, 16, 0, 2);
        let from = SocketAddr::new(Ipv4Addr::new(203, 0, 113, 10).into(), 7);
        let f = udp_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], from, guest.into(), 40000, b"hello", 1514).unwrap();
        // Seen from the other side (as if the guest had sent it), it is a valid datagram.
        let me = Identity {
            guest_mac: [2, 0, 0, 0, 0, 1],
            guest_ip: Ipv4Addr::new(203, 0, 113, 10),
            guest_ip6: Ipv6Addr::LOCALHOST,
            gateway_ip6: Ipv6Addr::LOCALHOST,
        };
        assert_eq!(guard::inspect(&f, &me), Ingress::Udp(guard::Udp { src_port: 7, dst: guest.into(), dst_port: 40000 }));
        assert_eq!(guard::udp_payload(&f), Some(&b"hello"[..]));
        assert!(udp_frame([0; 6], [0; 6], from, guest.into(), 1, &[0; 1500], 1514).is_none());
    }

    #[test]
    fn udp6_frames_parse_back() {
        let guest: Ipv6Addr = "fd42:6d73:62::2".parse().unwrap();
        let server: Ipv6Addr = "2001:db8:6d73::10".parse().unwrap();
        let from = SocketAddr::new(server.into(), 7);
        let f = udp_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], from, guest.into(), 40000, b"hello", 1514).unwrap();
        let me = Identity { guest_mac: [2, 0, 0, 0, 0, 1], guest_ip: Ipv4Addr::LOCALHOST, guest_ip6: server, gateway_ip6: guest };
        assert_eq!(guard::inspect(&f, &me), Ingress::Udp(guard::Udp { src_port: 7, dst: guest.into(), dst_port: 40000 }));
        assert_eq!(guard::udp_payload(&f), Some(&b"hello"[..]));
        assert_eq!(f.len(), UDP6_OVERHEAD + 5);
        assert!(udp_frame([0; 6], [0; 6], from, guest.into(), 1, &[0; 1500 - 48 + 1], 1514).is_none(), "over the MTU");
        assert!(udp_frame([0; 6], [0; 6], from, Ipv4Addr::LOCALHOST.into(), 1, b"x", 1514).is_none(), "mixed families");
    }
}
