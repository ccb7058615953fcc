//! ICMP echo (ping) for the guest, without privileges: the stack answers echo requests to
//! the gateway itself, and sends the others through the host's unprivileged ping sockets
//! (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`), which the kernel allows only when the
//! supervisor's group is inside `net.ipv4.ping_group_range`. Where it is not, the first
//! ping leaves one `system` log line saying so, and pings get no answer — nothing fails.
//!
//! IPv6 the same way: echo requests to the gateway's IPv6 addresses are answered here,
//! others go through `socket(AF_INET6, SOCK_DGRAM, IPPROTO_ICMPV6)` (same sysctl), a
//! refusal is ICMPv6 "destination unreachable, administratively prohibited".
//!
//! Policy: each echo request is a flow (egress, ICMPv4/ICMPv6, the destination, port 0) decided
//! by the stack before anything is sent; a refused one gets an ICMP "communication
//! administratively prohibited" back at once, so `ping` reports it instead of hanging.
//!
//! Bounds: one ping socket per (destination, guest identifier), at most
//! [`MAX_SESSIONS`], closed after [`IDLE`]; at most [`READ_BUDGET`] replies read per
//! socket per loop iteration; an echo's data is at most what fits the link.

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr,
    Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};

/// Ping sockets open at once per sandbox.
pub const MAX_SESSIONS: usize = 32;
/// A ping session without traffic for this long is closed.
pub const IDLE: Duration = Duration::from_secs(10);
/// Replies read per socket per iteration (fairness).
pub const READ_BUDGET: usize = 16;

/// An echo request from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    pub dst: IpAddr,
    pub ident: u16,
    pub seq_no: u16,
    pub data: Vec<u8>,
}

/// The echo request in a guest frame (valid IPv4 and ICMP checksums, unfragmented), if
/// it is one.
pub fn parse_echo(frame: &[u8]) -> Option<Echo> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Icmp || ip.more_frags() || ip.frag_offset() != 0 || !ip.verify_checksum() {
        return None;
    }
    let p = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    match Icmpv4Repr::parse(&p, &ChecksumCapabilities::default()).ok()? {
        Icmpv4Repr::EchoRequest { ident, seq_no, data } => Some(Echo { dst: ip.dst_addr().into(), ident, seq_no, data: data.to_vec() }),
        _ => None,
    }
}

/// The ICMPv6 echo request in a guest frame (valid checksum, no extension headers), if
/// it is one.
pub fn parse_echo6(frame: &[u8]) -> Option<Echo> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Icmpv6 {
        return None;
    }
    let p = Icmpv6Packet::new_checked(ip.payload()).ok()?;
    match Icmpv6Repr::parse(&ip.src_addr(), &ip.dst_addr(), &p, &ChecksumCapabilities::default()).ok()? {
        Icmpv6Repr::EchoRequest { ident, seq_no, data } => Some(Echo { dst: ip.dst_addr().into(), ident, seq_no, data: data.to_vec() }),
        _ => None,
    }
}

/// The link's two ends, for frames the stack builds to the guest.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub gateway_mac: [u8; 6],
    pub guest_mac: [u8; 6],
    pub guest_ip: Ipv4Addr,
    pub guest_ip6: Ipv6Addr,
    pub max_frame: usize,
}

fn icmp6_frame(link: &Link, from: Ipv6Addr, icmp: &Icmpv6Repr<'_>) -> Option<Vec<u8>> {
    let ip = Ipv6Repr { src_addr: from, dst_addr: link.guest_ip6, next_header: IpProtocol::Icmpv6, payload_len: icmp.buffer_len(), hop_limit: 64 };
    let eth = EthernetRepr { src_addr: EthernetAddress(link.gateway_mac), dst_addr: EthernetAddress(link.guest_mac), ethertype: EthernetProtocol::Ipv6 };
    let len = eth.buffer_len() + ip.buffer_len() + icmp.buffer_len();
    if len > link.max_frame {
        return None;
    }
    let mut buf = vec![0u8; len];
    let mut f = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut f);
    let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p);
    icmp.emit(&from, &link.guest_ip6, &mut Icmpv6Packet::new_unchecked(p.payload_mut()), &ChecksumCapabilities::default());
    Some(buf)
}

/// An echo reply from `from` to the guest, ICMPv4 or ICMPv6 by the address family.
pub fn reply_frame_any(link: &Link, from: IpAddr, ident: u16, seq_no: u16, data: &[u8]) -> Option<Vec<u8>> {
    match from {
        IpAddr::V4(from) => reply_frame(link, from, ident, seq_no, data),
        IpAddr::V6(from) => icmp6_frame(link, from, &Icmpv6Repr::EchoReply { ident, seq_no, data }),
    }
}

/// ICMPv6 "destination unreachable, communication administratively prohibited" (type 1,
/// code 1) about the guest's `request` frame, from the gateway.
pub fn prohibited_frame6(link: &Link, gateway: Ipv6Addr, request: &[u8]) -> Option<Vec<u8>> {
    let eth = EthernetFrame::new_checked(request).ok()?;
    let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
    let mut header = Ipv6Repr::parse(&ip).ok()?;
    // As much of the offending packet as fits the IPv6 minimum MTU (RFC 4443 2.4 (c)).
    let data = &ip.payload()[..ip.payload().len().min(1280 - 40 - 8 - 40)];
    header.payload_len = data.len();
    icmp6_frame(link, gateway, &Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::AdminProhibit, header, data })
}

fn icmp_frame(link: &Link, from: Ipv4Addr, icmp: &Icmpv4Repr<'_>) -> Option<Vec<u8>> {
    let ip = Ipv4Repr { src_addr: from, dst_addr: link.guest_ip, next_header: IpProtocol::Icmp, payload_len: icmp.buffer_len(), hop_limit: 64 };
    let eth = EthernetRepr { src_addr: EthernetAddress(link.gateway_mac), dst_addr: EthernetAddress(link.guest_mac), ethertype: EthernetProtocol::Ipv4 };
    let len = eth.buffer_len() + ip.buffer_len() + icmp.buffer_len();
    if len > link.max_frame {
        return None;
    }
    let mut buf = vec![0u8; len];
    let mut f = EthernetFrame::new_unchecked(&mut buf);
    eth.emit(&mut f);
    let caps = ChecksumCapabilities::default();
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    ip.emit(&mut p, &caps);
    icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
    Some(buf)
}

/// An echo reply from `from` to the guest (`None` if it would not fit the link).
pub fn reply_frame(link: &Link, from: Ipv4Addr, ident: u16, seq_no: u16, data: &[u8]) -> Option<Vec<u8>> {
    icmp_frame(link, from, &Icmpv4Repr::EchoReply { ident, seq_no, data })
}

/// "Communication administratively prohibited" (type 3, code 13) about the guest's
/// `request` frame, from the gateway: what a filtering router sends.
pub fn prohibited_frame(link: &Link, gateway: Ipv4Addr, request: &[u8]) -> Option<Vec<u8>> {
    let eth = EthernetFrame::new_checked(request).ok()?;
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let mut header = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()).ok()?;
    // The original header and as much of its payload as fits a 576-byte datagram
    // (RFC 1812; at least the 8 bytes RFC 792 asks for). The quoted header's length
    // matches what is quoted, so the message parses as a whole.
    let data = &ip.payload()[..ip.payload().len().min(576 - 20 - 8 - 20)];
    header.payload_len = data.len();
    icmp_frame(link, gateway, &Icmpv4Repr::DstUnreachable { reason: Icmpv4DstUnreachable::CommProhibited, header, data })
}

/// One ping socket: the guest's (destination, identifier) and where it goes on the host.
struct Session {
    socket: socket2::Socket,
    /// The address the socket sends to (the gateway's maps to host loopback).
    target: IpAddr,
    last: Instant,
}

/// The ping sockets of one sandbox.
#[derive(Default)]
pub struct Pinger {
    sessions: HashMap<(IpAddr, u16), Session>,
    /// The host refused a ping socket and the log said so (once per stack: the next
    /// session tries again, so a sysctl change takes effect without a restart).
    told: bool,
}

/// `net.ipv4.ping_group_range` as the kernel shows it (for the log line).
fn ping_group_range() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range")
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

impl Pinger {
    pub fn new() -> Pinger {
        Pinger::default()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Sends the guest's echo request to `target` (its destination on the host side).
    /// Errors are for the log; a lost ping is what a network does.
    pub fn send(&mut self, echo: &Echo, target: IpAddr, log: &mut dyn FnMut(&str)) {
        let key = (echo.dst, echo.ident);
        if !self.sessions.contains_key(&key) {
            if self.sessions.len() >= MAX_SESSIONS {
                log(&format!("network: dropped ICMP echo to {}: {MAX_SESSIONS} ping sessions open", echo.dst));
                return;
            }
            match open(target.is_ipv6()) {
                Ok(socket) => {
                    self.sessions.insert(key, Session { socket, target, last: Instant::now() });
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => {
                    if !self.told {
                        self.told = true;
                        // SAFETY: getegid has no preconditions.
                        let gid = unsafe { libc::getegid() };
                        log(&format!(
                            "network: ICMP echo (ping) is unavailable: the host does not allow unprivileged ping sockets for group {gid} \
                             (net.ipv4.ping_group_range is \"{}\"); the guest's pings get no answer. To enable: sysctl -w net.ipv4.ping_group_range=\"0 2147483647\"",
                            ping_group_range()
                        ));
                    }
                    return;
                }
                Err(e) => {
                    log(&format!("network: ICMP echo to {} failed: {e}", echo.dst));
                    return;
                }
            }
        }
        let Some(s) = self.sessions.get_mut(&key) else { return };
        s.last = Instant::now();
        // An echo request header; the kernel sets the identifier and the checksum.
        let mut msg = Vec::with_capacity(8 + echo.data.len());
        msg.extend_from_slice(&[if s.target.is_ipv6() { 128 } else { 8 }, 0, 0, 0, 0, 0]);
        msg.extend_from_slice(&echo.seq_no.to_be_bytes());
        msg.extend_from_slice(&echo.data);
        let _ = s.socket.send_to(&msg, &SocketAddr::new(s.target, 0).into());
    }

    /// Replies that arrived, as frames for the guest (from the address it pinged, with
    /// its own identifier); idle sessions are closed.
    pub fn receive(&mut self, link: &Link, mut out: impl FnMut(Vec<u8>) -> bool) {
        let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
        self.sessions.retain(|&(dst, ident), s| {
            for _ in 0..READ_BUDGET {
                let (n, from) = match s.socket.recv_from(&mut buf) {
                    Ok(r) => r,
                    Err(_) => break,
                };
                // SAFETY: recv_from initialised the first `n` bytes.
                let msg: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, n) };
                let reply_type = if s.target.is_ipv6() { 129 } else { 0 };
                if from.as_socket().map(|a| a.ip()) != Some(s.target) || n < 8 || msg[0] != reply_type {
                    continue; // only echo replies from the pinged address
                }
                s.last = Instant::now();
                let seq_no = u16::from_be_bytes([msg[6], msg[7]]);
                if let Some(f) = reply_frame_any(link, dst, ident, seq_no, &msg[8..]) {
                    if !out(f) {
                        break;
                    }
                }
            }
            s.last.elapsed() < IDLE
        });
    }

    /// File descriptors to poll for replies.
    pub fn fds(&self) -> impl Iterator<Item = i32> + '_ {
        use std::os::fd::AsRawFd;
        self.sessions.values().map(|s| s.socket.as_raw_fd())
    }
}

fn open(v6: bool) -> io::Result<socket2::Socket> {
    let s = if v6 {
        socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM.cloexec(), Some(socket2::Protocol::ICMPV6))?
    } else {
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM.cloexec(), Some(socket2::Protocol::ICMPV4))?
    };
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Whether this host lets the supervisor open ping sockets (tests use it to say which
/// behaviour they expect).
pub fn available() -> bool {
    open(false).is_ok()
}

/// The same for IPv6 ping sockets.
pub fn available6() -> bool {
    open(true).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link {
            gateway_mac: [2, 0, 0, 0, 0, 1],
            guest_mac: [2, 0, 0, 0, 0, 2],
            guest_ip: Ipv4Addr::new(172, 16, 0, 2),
            guest_ip6: "fd42:6d73:62::2".parse().unwrap(),
            max_frame: 1514,
        }
    }

    #[test]
    fn frames_parse_back() {
        let l = link();
        let f = reply_frame(&l, Ipv4Addr::new(203, 0, 113, 10), 7, 9, b"abc").unwrap();
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let p = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            Icmpv4Repr::parse(&p, &ChecksumCapabilities::default()).unwrap(),
            Icmpv4Repr::EchoReply { ident: 7, seq_no: 9, data: b"abc" }
        );
        assert!(reply_frame(&l, Ipv4Addr::LOCALHOST, 1, 1, &[0; 1500]).is_none(), "over the link MTU");
        // An echo request built the same way (roles swapped) parses as one.
        let req = icmp_frame(&l, Ipv4Addr::new(172, 16, 0, 2), &Icmpv4Repr::EchoRequest { ident: 3, seq_no: 4, data: b"hi" }).unwrap();
        assert_eq!(parse_echo(&req), Some(Echo { dst: l.guest_ip.into(), ident: 3, seq_no: 4, data: b"hi".to_vec() }));
        let no = prohibited_frame(&l, Ipv4Addr::new(172, 16, 0, 1), &req).unwrap();
        let eth = EthernetFrame::new_checked(&no[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let p = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(matches!(
            Icmpv4Repr::parse(&p, &ChecksumCapabilities::default()).unwrap(),
            Icmpv4Repr::DstUnreachable { reason: Icmpv4DstUnreachable::CommProhibited, .. }
        ));
        // Every truncation of a request is handled.
        for n in 0..req.len() {
            let _ = parse_echo(&req[..n]);
        }
        let mut bad = req.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(parse_echo(&bad), None, "bad ICMP checksum");
    }

    #[test]
    fn icmpv6_frames_parse_back() {
        let l = link();
        let server: Ipv6Addr = "2001:db8:6d73::10".parse().unwrap();
        let f = reply_frame_any(&l, server.into(), 7, 9, b"abc").unwrap();
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let p = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(
            Icmpv6Repr::parse(&ip.src_addr(), &ip.dst_addr(), &p, &ChecksumCapabilities::default()).unwrap(),
            Icmpv6Repr::EchoReply { ident: 7, seq_no: 9, data: b"abc" }
        );
        // An echo request built the same way (guest as the destination) parses as one.
        let req = icmp6_frame(&l, server, &Icmpv6Repr::EchoRequest { ident: 3, seq_no: 4, data: b"hi" }).unwrap();
        assert_eq!(parse_echo6(&req), Some(Echo { dst: l.guest_ip6.into(), ident: 3, seq_no: 4, data: b"hi".to_vec() }));
        assert_eq!(parse_echo(&req), None, "not ICMPv4");
        let no = prohibited_frame6(&l, "fd42:6d73:62::1".parse().unwrap(), &req).unwrap();
        let eth = EthernetFrame::new_checked(&no[..]).unwrap();
        let ip = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let p = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(matches!(
            Icmpv6Repr::parse(&ip.src_addr(), &ip.dst_addr(), &p, &ChecksumCapabilities::default()).unwrap(),
            Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::AdminProhibit, .. }
        ));
        for n in 0..req.len() {
            let _ = parse_echo6(&req[..n]);
            let _ = prohibited_frame6(&l, server, &req[..n]);
        }
        let mut bad = req.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(parse_echo6(&bad), None, "bad ICMPv6 checksum");
        assert!(reply_frame_any(&l, server.into(), 1, 1, &[0; 1500]).is_none(), "over the link MTU");
    }
}
