//! The first look at every frame the guest sends: who may speak, and what needs the
//! stack's attention before smoltcp sees it. Pure code (bytes in, verdict out), so it is
//! unit-tested and fuzzed without sockets.
//!
//! Invariants: a frame passes only if it carries the guest's own MAC and (for IPv4 and
//! ARP) the guest's own IPv4 address as the sender — a guest cannot spoof another host on
//! the link or claim the gateway. IPv6 likewise: the source is the guest's assigned
//! address (its EUI-64 link-local address too for neighbour discovery and ICMPv6 errors;
//! `::` only for duplicate address detection);
//! neighbour discovery passes only for what the guest owns (advertisements of its own
//! addresses) or what the gateway answers (solicitations for the gateway's two
//! addresses); router advertisements, redirects, DHCPv6 and any other neighbour traffic
//! are dropped. IPv6 packets with extension headers are dropped: the guard must see the
//! whole TCP/UDP header to judge a packet (fragments are reassembled before the guard
//! looks, by `frag`, for both families; a fragment that reaches it anyway is dropped). Everything not
//! understood (VLAN tags, other ethertypes) is dropped, never forwarded.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::wire::{
    ArpPacket, EthernetFrame, EthernetProtocol, Icmpv6Message, Icmpv6Packet, IpProtocol, Ipv4Packet, Ipv6Packet,
    NdiscRepr, RawHardwareAddress, TcpPacket, UdpPacket,
};

use crate::config::GATEWAY_LINK_LOCAL;

/// A new TCP connection attempt: the stack connects to the host side first and only then
/// lets smoltcp answer the SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Syn {
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

/// One UDP datagram from the guest (handled outside smoltcp: relayed, or DNS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Udp {
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
}

/// The payload of a UDP datagram inside an Ethernet frame (`None` if it is not one).
pub fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip_payload = match eth.ethertype() {
        EthernetProtocol::Ipv4 => Ipv4Packet::new_checked(eth.payload()).ok()?.payload(),
        EthernetProtocol::Ipv6 => Ipv6Packet::new_checked(eth.payload()).ok()?.payload(),
        _ => return None,
    };
    let udp = UdpPacket::new_checked(ip_payload).ok()?;
    let p = udp.payload();
    let start = p.as_ptr() as usize - frame.as_ptr() as usize;
    frame.get(start..start + p.len())
}

/// What to do with one frame from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// Hand it to smoltcp.
    Stack,
    /// A TCP SYN (without ACK) from the guest.
    Syn(Syn),
    /// A complete (unfragmented) UDP datagram with a valid checksum.
    Udp(Udp),
    /// An ICMP echo request (valid checksums, unfragmented): answered by the stack or
    /// through a host ping socket (`icmp`), never by smoltcp.
    Echo,
    /// An ICMPv6 echo request from the guest's own address (valid checksum).
    Echo6,
    /// Drop it; the reason is for counters and logs.
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Malformed,
    SpoofedMac,
    SpoofedIp,
    UnsupportedProtocol,
}

/// The guest's identity on the link.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    pub guest_mac: [u8; 6],
    pub guest_ip: Ipv4Addr,
    /// Its assigned IPv6 address (`ipv6_pool:`).
    pub guest_ip6: Ipv6Addr,
    /// The gateway's IPv6 address (the one besides its link-local address that it
    /// answers neighbour solicitations for).
    pub gateway_ip6: Ipv6Addr,
}

impl Identity {
    /// The link-local address the guest's kernel derives from its MAC (modified EUI-64,
    /// Linux's default `addr_gen_mode`).
    pub fn link_local(&self) -> Ipv6Addr {
        eui64_link_local(self.guest_mac)
    }

    /// True for the guest's own IPv6 addresses.
    pub fn owns6(&self, ip: Ipv6Addr) -> bool {
        ip == self.guest_ip6 || ip == self.link_local()
    }
}

/// `fe80::/64` + the modified EUI-64 interface identifier of `mac` (RFC 4291 appendix A).
pub fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o[0] = 0xfe;
    o[1] = 0x80;
    o[8..11].copy_from_slice(&[mac[0] ^ 0x02, mac[1], mac[2]]);
    o[11] = 0xff;
    o[12] = 0xfe;
    o[13..16].copy_from_slice(&mac[3..6]);
    Ipv6Addr::from(o)
}

/// True when the frame's sender is the guest itself: its MAC, and its IPv4 address or
/// its assigned IPv6 address (not the link-local one: that is for neighbour discovery,
/// which is never fragmented). What the reassembler asks before it keeps a fragment.
pub fn from_guest(frame: &[u8], me: &Identity) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(frame) else { return false };
    if eth.src_addr().0 != me.guest_mac {
        return false;
    }
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => Ipv4Packet::new_checked(eth.payload()).is_ok_and(|ip| ip.src_addr() == me.guest_ip),
        EthernetProtocol::Ipv6 => Ipv6Packet::new_checked(eth.payload()).is_ok_and(|ip| ip.src_addr() == me.guest_ip6),
        _ => false,
    }
}

/// Classifies one Ethernet frame from the guest.
pub fn inspect(frame: &[u8], me: &Identity) -> Ingress {
    let Ok(eth) = EthernetFrame::new_checked(frame) else { return Ingress::Drop(DropReason::Malformed) };
    if eth.src_addr().0 != me.guest_mac {
        return Ingress::Drop(DropReason::SpoofedMac);
    }
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let Ok(arp) = ArpPacket::new_checked(eth.payload()) else { return Ingress::Drop(DropReason::Malformed) };
            // The sender must be the guest (0.0.0.0 is an address probe, RFC 5227).
            let spa = arp.source_protocol_addr();
            if arp.source_hardware_addr() != me.guest_mac
                || (spa != me.guest_ip.octets() && spa != [0, 0, 0, 0])
            {
                return Ingress::Drop(DropReason::SpoofedIp);
            }
            Ingress::Stack
        }
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else { return Ingress::Drop(DropReason::Malformed) };
            if ip.src_addr() != me.guest_ip {
                return Ingress::Drop(DropReason::SpoofedIp);
            }
            // The stack reassembles fragments before asking (`frag`): a fragment here is
            // not a packet to act on.
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Ingress::Drop(DropReason::UnsupportedProtocol);
            }
            if ip.next_header() == IpProtocol::Udp {
                // UDP never goes to smoltcp.
                let Ok(udp) = UdpPacket::new_checked(ip.payload()) else { return Ingress::Drop(DropReason::Malformed) };
                let (src, dst) = (ip.src_addr().into(), ip.dst_addr().into());
                if !udp.verify_checksum(&src, &dst) {
                    return Ingress::Drop(DropReason::Malformed);
                }
                return Ingress::Udp(Udp { src_port: udp.src_port(), dst: ip.dst_addr().into(), dst_port: udp.dst_port() });
            }
            if ip.next_header() == IpProtocol::Icmp && crate::icmp::parse_echo(frame).is_some() {
                return Ingress::Echo;
            }
            if ip.next_header() != IpProtocol::Tcp {
                return Ingress::Stack;
            }
            let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else { return Ingress::Drop(DropReason::Malformed) };
            if tcp.syn() && !tcp.ack() && !tcp.rst() && !tcp.fin() {
                return Ingress::Syn(Syn { src_port: tcp.src_port(), dst: ip.dst_addr().into(), dst_port: tcp.dst_port() });
            }
            Ingress::Stack
        }
        EthernetProtocol::Ipv6 => inspect6(eth.payload(), me),
        _ => Ingress::Drop(DropReason::UnsupportedProtocol),
    }
}

/// An IPv6 packet from the guest's MAC.
fn inspect6(packet: &[u8], me: &Identity) -> Ingress {
    let Ok(ip) = Ipv6Packet::new_checked(packet) else { return Ingress::Drop(DropReason::Malformed) };
    if ip.version() != 6 {
        return Ingress::Drop(DropReason::Malformed);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    if ip.next_header() == IpProtocol::Icmpv6 {
        return inspect_icmp6(&ip, me);
    }
    // Traffic the stack answers itself (UDP replies, echo replies) goes to the assigned
    // address, and smoltcp's sockets are keyed without it: the link-local address is for
    // neighbour discovery only.
    if src != me.guest_ip6 {
        return Ingress::Drop(DropReason::SpoofedIp);
    }
    match ip.next_header() {
        IpProtocol::Udp => {
            let Ok(udp) = UdpPacket::new_checked(ip.payload()) else { return Ingress::Drop(DropReason::Malformed) };
            // The UDP checksum is mandatory over IPv6 (0 is invalid, RFC 8200 8.1).
            if udp.checksum() == 0 || !udp.verify_checksum(&src.into(), &dst.into()) {
                return Ingress::Drop(DropReason::Malformed);
            }
            // DHCPv6 (client 546, server/relay 547): the guest is configured statically
            // and is nobody's server.
            if [546, 547].contains(&udp.src_port()) || [546, 547].contains(&udp.dst_port()) {
                return Ingress::Drop(DropReason::UnsupportedProtocol);
            }
            Ingress::Udp(Udp { src_port: udp.src_port(), dst: dst.into(), dst_port: udp.dst_port() })
        }
        IpProtocol::Tcp => {
            let Ok(tcp) = TcpPacket::new_checked(ip.payload()) else { return Ingress::Drop(DropReason::Malformed) };
            if tcp.syn() && !tcp.ack() && !tcp.rst() && !tcp.fin() {
                return Ingress::Syn(Syn { src_port: tcp.src_port(), dst: dst.into(), dst_port: tcp.dst_port() });
            }
            Ingress::Stack
        }
        // Extension headers (hop-by-hop, routing, a fragment that was not reassembled, …)
        // and other protocols.
        _ => Ingress::Drop(DropReason::UnsupportedProtocol),
    }
}

/// ICMPv6 from the guest: echo requests, neighbour discovery for the link's real owners,
/// and error messages about its own traffic; the rest is dropped.
fn inspect_icmp6(ip: &Ipv6Packet<&[u8]>, me: &Identity) -> Ingress {
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let Ok(icmp) = Icmpv6Packet::new_checked(ip.payload()) else { return Ingress::Drop(DropReason::Malformed) };
    if !icmp.verify_checksum(&src, &dst) {
        return Ingress::Drop(DropReason::Malformed);
    }
    let own_src = me.owns6(src);
    let my_mac = |ll: Option<RawHardwareAddress>| ll.is_none_or(|a| a.as_bytes() == me.guest_mac);
    match icmp.msg_type() {
        Icmpv6Message::EchoRequest if src == me.guest_ip6 => Ingress::Echo6,
        Icmpv6Message::NeighborSolicit | Icmpv6Message::NeighborAdvert => {
            // RFC 4861 7.1.1: neighbour discovery comes with hop limit 255 (never routed).
            if ip.hop_limit() != 255 {
                return Ingress::Drop(DropReason::Malformed);
            }
            let Ok(ndisc) = NdiscRepr::parse(&icmp) else { return Ingress::Drop(DropReason::Malformed) };
            match ndisc {
                // A question the gateway answers: who has one of its addresses.
                NdiscRepr::NeighborSolicit { target_addr, lladdr }
                    if own_src && my_mac(lladdr) && (target_addr == me.gateway_ip6 || target_addr == GATEWAY_LINK_LOCAL) =>
                {
                    Ingress::Stack
                }
                // The guest's duplicate address detection for its own addresses (from
                // `::`): nobody else is on the link, so there is nothing to answer.
                NdiscRepr::NeighborSolicit { target_addr, lladdr: None } if src.is_unspecified() && me.owns6(target_addr) => {
                    Ingress::Drop(DropReason::UnsupportedProtocol)
                }
                // The guest telling the gateway where its own addresses are.
                NdiscRepr::NeighborAdvert { target_addr, lladdr, .. } if own_src && me.owns6(target_addr) && my_mac(lladdr) => {
                    Ingress::Stack
                }
                // Solicitations for other addresses, claims on addresses it does not own.
                _ => Ingress::Drop(DropReason::SpoofedIp),
            }
        }
        // Error messages about the guest's own traffic (smoltcp reads them for its sockets).
        Icmpv6Message::DstUnreachable | Icmpv6Message::PktTooBig | Icmpv6Message::TimeExceeded | Icmpv6Message::ParamProblem
            if own_src =>
        {
            Ingress::Stack
        }
        // Router advertisements and redirects: the guest is nobody's router.
        Icmpv6Message::RouterAdvert | Icmpv6Message::Redirect => Ingress::Drop(DropReason::SpoofedIp),
        _ if !own_src && !src.is_unspecified() => Ingress::Drop(DropReason::SpoofedIp),
        // Router solicitations (the address is static: no advertisements), multicast
        // listener reports, echo replies and the rest.
        _ => Ingress::Drop(DropReason::UnsupportedProtocol),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        ArpOperation, ArpRepr, EthernetAddress, EthernetRepr, IpAddress, Ipv4Repr, TcpControl, TcpRepr, TcpSeqNumber,
    };

    pub const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);

    pub const GUEST_IP6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 2);
    pub const GATEWAY_IP6: Ipv6Addr = Ipv6Addr::new(0xfd42, 0x6d73, 0x62, 0, 0, 0, 0, 1);

    pub fn me() -> Identity {
        Identity { guest_mac: GUEST_MAC, guest_ip: GUEST_IP, guest_ip6: GUEST_IP6, gateway_ip6: GATEWAY_IP6 }
    }

    /// An Ethernet frame from `mac`/`src` carrying a TCP segment with `control`.
    pub fn tcp_frame(mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, control: TcpControl, ack: bool) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: 40000,
            dst_port: 80,
            control,
            seq_number: TcpSeqNumber(1),
            ack_number: ack.then_some(TcpSeqNumber(1)),
            window_len: 1000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &[],
        };
        let ip = Ipv4Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::Tcp, payload_len: tcp.buffer_len(), hop_limit: 64 };
        let eth = EthernetRepr { src_addr: EthernetAddress(mac), dst_addr: EthernetAddress([2, 0, 0, 0, 0, 1]), ethertype: EthernetProtocol::Ipv4 };
        let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut p, &caps);
        let mut t = TcpPacket::new_unchecked(p.payload_mut());
        tcp.emit(&mut t, &IpAddress::Ipv4(src), &IpAddress::Ipv4(dst), &caps);
        buf
    }

    fn arp_frame(mac: [u8; 6], spa: Ipv4Addr) -> Vec<u8> {
        let arp = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: EthernetAddress(mac),
            source_protocol_addr: spa,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: Ipv4Addr::new(172, 16, 0, 1),
        };
        let eth = EthernetRepr { src_addr: EthernetAddress(mac), dst_addr: EthernetAddress::BROADCAST, ethertype: EthernetProtocol::Arp };
        let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        buf
    }

    #[test]
    fn syn_is_singled_out() {
        let dst = Ipv4Addr::new(203, 0, 113, 10);
        let f = tcp_frame(GUEST_MAC, GUEST_IP, dst, TcpControl::Syn, false);
        assert_eq!(inspect(&f, &me()), Ingress::Syn(Syn { src_port: 40000, dst: dst.into(), dst_port: 80 }));
        // SYN-ACK, plain ACK, FIN: ordinary segments for smoltcp.
        assert_eq!(inspect(&tcp_frame(GUEST_MAC, GUEST_IP, dst, TcpControl::Syn, true), &me()), Ingress::Stack);
        assert_eq!(inspect(&tcp_frame(GUEST_MAC, GUEST_IP, dst, TcpControl::None, true), &me()), Ingress::Stack);
        assert_eq!(inspect(&tcp_frame(GUEST_MAC, GUEST_IP, dst, TcpControl::Fin, true), &me()), Ingress::Stack);
    }

    #[test]
    fn spoofed_senders_are_dropped() {
        let dst = Ipv4Addr::new(203, 0, 113, 10);
        let other_mac = [2, 0, 0, 0, 0, 9];
        assert_eq!(inspect(&tcp_frame(other_mac, GUEST_IP, dst, TcpControl::Syn, false), &me()), Ingress::Drop(DropReason::SpoofedMac));
        let gw = Ipv4Addr::new(172, 16, 0, 1);
        assert_eq!(inspect(&tcp_frame(GUEST_MAC, gw, dst, TcpControl::Syn, false), &me()), Ingress::Drop(DropReason::SpoofedIp));
        assert_eq!(inspect(&arp_frame(GUEST_MAC, GUEST_IP), &me()), Ingress::Stack);
        assert_eq!(inspect(&arp_frame(GUEST_MAC, Ipv4Addr::UNSPECIFIED), &me()), Ingress::Stack);
        assert_eq!(inspect(&arp_frame(GUEST_MAC, gw), &me()), Ingress::Drop(DropReason::SpoofedIp), "ARP claiming the gateway");
    }

    /// An IPv6 frame from `src` to `dst` carrying a TCP SYN to port 80.
    fn syn6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let v4 = tcp_frame(GUEST_MAC, GUEST_IP, Ipv4Addr::new(1, 2, 3, 4), TcpControl::Syn, false);
        let tcp = &v4[34..];
        let mut out = v4[..14].to_vec();
        out[12..14].copy_from_slice(&[0x86, 0xdd]);
        let repr = smoltcp::wire::Ipv6Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::Tcp, payload_len: tcp.len(), hop_limit: 64 };
        let mut ip = vec![0u8; 40 + tcp.len()];
        repr.emit(&mut Ipv6Packet::new_unchecked(&mut ip[..]));
        ip[40..].copy_from_slice(tcp);
        TcpPacket::new_unchecked(&mut ip[40..]).fill_checksum(&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst));
        out.extend_from_slice(&ip);
        out
    }

    #[test]
    fn ipv6_sources_other_than_the_assigned_address_are_dropped() {
        let dst: Ipv6Addr = "2001:db8:6d73::10".parse().unwrap();
        assert_eq!(inspect(&syn6(GUEST_IP6, dst), &me()), Ingress::Syn(Syn { src_port: 40000, dst: dst.into(), dst_port: 80 }));
        for src in [me().link_local(), GATEWAY_IP6, Ipv6Addr::UNSPECIFIED, "fd42:6d73:62::3".parse().unwrap(), "::1".parse().unwrap()] {
            assert_eq!(inspect(&syn6(src, dst), &me()), Ingress::Drop(DropReason::SpoofedIp), "{src}");
        }
        let f = syn6(GUEST_IP6, dst);
        for n in 0..f.len() {
            let _ = inspect(&f[..n], &me());
        }
    }

    #[test]
    fn eui64_link_local_of_the_guest_mac() {
        assert_eq!(eui64_link_local([0x02, 0x6d, 0x73, 0x62, 0x00, 0x02]).to_string(), "fe80::6d:73ff:fe62:2");
    }

    #[test]
    fn junk_is_dropped() {
        assert_eq!(inspect(&[], &me()), Ingress::Drop(DropReason::Malformed));
        assert_eq!(inspect(&[0u8; 13], &me()), Ingress::Drop(DropReason::Malformed));
        let mut f = tcp_frame(GUEST_MAC, GUEST_IP, Ipv4Addr::new(1, 2, 3, 4), TcpControl::Syn, false);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(inspect(&f, &me()), Ingress::Drop(DropReason::Malformed), "an IPv4 packet labelled IPv6");
        f[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(inspect(&f, &me()), Ingress::Drop(DropReason::UnsupportedProtocol), "VLAN tags");
        let mut f = tcp_frame(GUEST_MAC, GUEST_IP, Ipv4Addr::new(1, 2, 3, 4), TcpControl::Syn, false);
        f[14] = 0x4f; // IHL 15: header longer than the packet
        assert_eq!(inspect(&f, &me()), Ingress::Drop(DropReason::Malformed));
        // Every truncation of a valid frame is handled without panicking.
        let f = tcp_frame(GUEST_MAC, GUEST_IP, Ipv4Addr::new(1, 2, 3, 4), TcpControl::Syn, false);
        for n in 0..f.len() {
            let _ = inspect(&f[..n], &me());
        }
    }
}
