//! A misbehaving guest, without a VM: builds frames the way a guest kernel (or an attacker
//! inside it) would, drives a real [`Stack`] over a socketpair one loop iteration at a
//! time, and checks after every iteration that nothing the guest controls grew past its
//! bound. Used by the stack's hostile-guest tests and by the `frame_path` fuzz target
//! ([`frame_path`]), whose input is a little program of frames.
//!
//! Network rule: the stacks built here only ever reach host loopback (the gateway address
//! maps to 127.0.0.1), and only where the policy allows it; every other destination is
//! denied before any host socket is opened.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet,
    Icmpv4Repr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscRepr,
    RawHardwareAddress, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
};

use crate::config::NetworkConfig;
use crate::device::{RX_FRAMES, TX_FRAMES};
use crate::frame::{self, Decoded, Decoder, MIN_FRAME};
use crate::stack::{Counters, Stack};
use crate::wire;

/// Frames one read of the link can carry at most (64 KiB of the smallest frames): the
/// stack checks its queue bounds before each read, so a queue may exceed its bound by
/// this much, never more.
pub const FRAMES_PER_READ: usize = 64 * 1024 / (MIN_FRAME + 4) + 1;

/// A guest on one end of a socketpair, the stack on the other.
pub struct Guest {
    pub cfg: NetworkConfig,
    pub stack: Stack,
    pub counters: Arc<Counters>,
    /// The stack's `system` log lines.
    pub logs: Arc<Mutex<Vec<String>>>,
    link: UnixStream,
    decoder: Decoder,
    /// Frames received from the stack and not yet taken by the test.
    pub inbox: Vec<Vec<u8>>,
    /// The guest stopped reading its NIC (a guest that never reads).
    pub deaf: bool,
}

impl Guest {
    pub fn new(cfg: NetworkConfig) -> Guest {
        Guest::with_listeners(cfg, None)
    }

    /// A guest whose stack also serves published ports (`listeners`, from
    /// [`crate::stack::ports::bind`]).
    pub fn with_listeners(cfg: NetworkConfig, listeners: Option<crate::stack::ports::Listeners>) -> Guest {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        let counters = Arc::new(Counters::default());
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let log = Box::new(move |line: &str| {
            let mut l = sink.lock().unwrap();
            if l.len() < 10_000 {
                l.push(line.to_string());
            }
        });
        let mut stack = Stack::new(theirs, cfg.clone(), counters.clone(), log).expect("stack");
        if let Some(l) = listeners {
            stack = stack.with_listeners(l);
        }
        let mut g = Guest { decoder: Decoder::new(cfg.max_frame()), cfg, stack, counters, logs, link: ours, inbox: Vec::new(), deaf: false };
        // What a guest kernel does first: ask for the gateway's MAC (which also tells
        // the stack the guest's, so its replies need no ARP round of their own).
        let ask = g.arp(ArpOperation::Request, g.cfg.guest_mac, g.cfg.guest_ip, g.cfg.gateway_ip);
        g.send(&ask).expect("link");
        g.step().expect("link");
        g.inbox.clear();
        g
    }

    /// Sends one frame (length-prefixed); while the link is full the stack runs.
    pub fn send(&mut self, f: &[u8]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(f.len() + 4);
        frame::encode(f, &mut buf);
        self.send_raw(&buf)
    }

    /// Sends raw stream bytes (framing included, or deliberately broken).
    pub fn send_raw(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let mut stalls = 0;
        while !bytes.is_empty() {
            match self.link.write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.step()? {
                        return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the stack closed the link"));
                    }
                    stalls += 1;
                    if stalls > 100_000 {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "the stack stopped reading the link"));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// One iteration of the stack, then its bounds are checked and (unless deaf) what it
    /// sent is read. `false` once the stack closed the link.
    pub fn step(&mut self) -> io::Result<bool> {
        let alive = self.stack.step()?;
        check_bounds(&self.stack);
        if !self.deaf {
            self.drain();
        }
        Ok(alive)
    }

    fn drain(&mut self) {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match self.link.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let max = self.cfg.max_frame();
                    let gw = self.cfg.gateway_mac;
                    let inbox = &mut self.inbox;
                    self.decoder
                        .push(&buf[..n], |d| match d {
                            Decoded::Frame(f) => {
                                assert_eq!(&f[6..12], &gw, "every frame to the guest comes from the gateway's MAC");
                                inbox.push(f);
                            }
                            Decoded::Dropped(len) => panic!("the stack sent a {len}-byte frame, over the link's {max}"),
                        })
                        .expect("the stack's framing is well-formed");
                    if inbox.len() > 100_000 {
                        inbox.drain(..50_000);
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Runs the stack for about `d` (short sleeps between iterations, so host sockets and
    /// timers move).
    pub fn run_for(&mut self, d: Duration) -> io::Result<bool> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if !self.step()? {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(true)
    }

    /// Runs until `done` holds for the inbox (or `limit` passes); returns whether it held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&[Vec<u8>]) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if done(&self.inbox) {
                return true;
            }
            if !self.step().unwrap_or(false) {
                return done(&self.inbox);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        done(&self.inbox)
    }

    /// The guest end of the link (raw, non-blocking writes).
    pub fn link_mut(&mut self) -> &mut UnixStream {
        &mut self.link
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    fn eth(&self, ethertype: EthernetProtocol, payload_len: usize) -> (EthernetRepr, Vec<u8>) {
        let eth = EthernetRepr {
            src_addr: EthernetAddress(self.cfg.guest_mac),
            dst_addr: EthernetAddress(self.cfg.gateway_mac),
            ethertype,
        };
        let buf = vec![0u8; eth.buffer_len() + payload_len];
        (eth, buf)
    }

    /// An IPv6 frame from the guest's MAC carrying `payload_len` bytes of `next_header`
    /// from `src` to `dst`; `fill` writes the payload (given the addresses).
    fn ip6(&self, src: Ipv6Addr, dst: Ipv6Addr, next_header: IpProtocol, payload_len: usize, hop_limit: u8, fill: impl FnOnce(&mut [u8])) -> Vec<u8> {
        let ip = Ipv6Repr { src_addr: src, dst_addr: dst, next_header, payload_len, hop_limit };
        let (eth, mut buf) = self.eth(EthernetProtocol::Ipv6, ip.buffer_len() + payload_len);
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        let mut p = Ipv6Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p);
        fill(p.payload_mut());
        buf
    }

    /// An ICMPv6 message from `src` to `dst` (valid checksum; neighbour discovery uses
    /// hop limit 255).
    pub fn icmp6(&self, src: Ipv6Addr, dst: Ipv6Addr, icmp: &Icmpv6Repr<'_>) -> Vec<u8> {
        let hop = if matches!(icmp, Icmpv6Repr::Ndisc(_)) { 255 } else { 64 };
        self.ip6(src, dst, IpProtocol::Icmpv6, icmp.buffer_len(), hop, |b| {
            icmp.emit(&src, &dst, &mut Icmpv6Packet::new_unchecked(b), &ChecksumCapabilities::default())
        })
    }

    /// A router advertisement from the guest's own link-local address to all nodes (a
    /// guest posing as a router; the guard must drop it).
    pub fn router_advert(&self) -> Vec<u8> {
        let src = crate::guard::eui64_link_local(self.cfg.guest_mac);
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        self.icmp6(
            src,
            all_nodes,
            &Icmpv6Repr::Ndisc(NdiscRepr::RouterAdvert {
                hop_limit: 64,
                flags: smoltcp::wire::NdiscRouterFlags::empty(),
                router_lifetime: smoltcp::time::Duration::from_secs(1800),
                reachable_time: smoltcp::time::Duration::from_millis(0),
                retrans_time: smoltcp::time::Duration::from_millis(0),
                lladdr: Some(RawHardwareAddress::from_bytes(&self.cfg.guest_mac)),
                mtu: None,
                prefix_info: None,
            }),
        )
    }

    /// A neighbour solicitation from `src` for `target` (to its solicited-node group),
    /// claiming `lladdr` as the sender's MAC.
    pub fn neighbor_solicit(&self, src: Ipv6Addr, target: Ipv6Addr, lladdr: Option<[u8; 6]>) -> Vec<u8> {
        let t = target.octets();
        let group = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(t[13]), u16::from_be_bytes([t[14], t[15]]));
        let lladdr = lladdr.map(|m| RawHardwareAddress::from_bytes(&m));
        self.icmp6(src, group, &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { target_addr: target, lladdr }))
    }

    /// A TCP segment from the guest (its own MAC and address of `dst`'s family) to
    /// `dst:dst_port`.
    pub fn tcp(&self, src_port: u16, dst: impl Into<IpAddr>, dst_port: u16, control: TcpControl, seq: u32, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port,
            dst_port,
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 64000,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload,
        };
        let dst = match dst.into() {
            IpAddr::V4(d) => d,
            IpAddr::V6(d) => {
                let src = self.cfg.guest_ip6;
                return self.ip6(src, d, IpProtocol::Tcp, tcp.buffer_len(), 64, |b| {
                    tcp.emit(&mut TcpPacket::new_unchecked(b), &IpAddress::Ipv6(src), &IpAddress::Ipv6(d), &ChecksumCapabilities::default())
                });
            }
        };
        let src = self.cfg.guest_ip;
        let ip = Ipv4Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::Tcp, payload_len: tcp.buffer_len(), hop_limit: 64 };
        let (eth, mut buf) = self.eth(EthernetProtocol::Ipv4, ip.buffer_len() + tcp.buffer_len());
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        let caps = ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        let mut t = TcpPacket::new_unchecked(p.payload_mut());
        tcp.emit(&mut t, &IpAddress::Ipv4(src), &IpAddress::Ipv4(dst), &caps);
        buf
    }

    /// A TCP SYN from `src_port`.
    pub fn syn(&self, src_port: u16, dst: impl Into<IpAddr>, dst_port: u16) -> Vec<u8> {
        self.tcp(src_port, dst, dst_port, TcpControl::Syn, 1000, None, &[])
    }

    /// A UDP datagram from the guest.
    pub fn udp(&self, src_port: u16, dst: impl Into<IpAddr>, dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let dst = dst.into();
        let src: IpAddr = if dst.is_ipv4() { self.cfg.guest_ip.into() } else { self.cfg.guest_ip6.into() };
        let mut f = wire::udp_frame(
            self.cfg.guest_mac,
            self.cfg.gateway_mac,
            SocketAddr::new(src, src_port),
            dst,
            dst_port,
            payload,
            usize::MAX,
        )
        .expect("datagram fits");
        // udp_frame builds gateway→guest frames; the roles are swapped, so are the MACs.
        f[0..6].copy_from_slice(&self.cfg.gateway_mac);
        f[6..12].copy_from_slice(&self.cfg.guest_mac);
        f
    }

    /// An ARP packet with the given sender (a well-behaved guest uses its own).
    pub fn arp(&self, op: ArpOperation, sender_mac: [u8; 6], sender_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
        let arp = ArpRepr::EthernetIpv4 {
            operation: op,
            source_hardware_addr: EthernetAddress(sender_mac),
            source_protocol_addr: sender_ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: target_ip,
        };
        let (mut eth, mut buf) = self.eth(EthernetProtocol::Arp, arp.buffer_len());
        eth.dst_addr = EthernetAddress::BROADCAST;
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        arp.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
        buf
    }

    /// An ICMP echo request from the guest.
    pub fn ping(&self, dst: impl Into<IpAddr>, ident: u16, seq_no: u16, data: &[u8]) -> Vec<u8> {
        let dst = match dst.into() {
            IpAddr::V4(d) => d,
            IpAddr::V6(d) => return self.icmp6(self.cfg.guest_ip6, d, &Icmpv6Repr::EchoRequest { ident, seq_no, data }),
        };
        let icmp = Icmpv4Repr::EchoRequest { ident, seq_no, data };
        let src = self.cfg.guest_ip;
        let ip = Ipv4Repr { src_addr: src, dst_addr: dst, next_header: IpProtocol::Icmp, payload_len: icmp.buffer_len(), hop_limit: 64 };
        let (eth, mut buf) = self.eth(EthernetProtocol::Ipv4, ip.buffer_len() + icmp.buffer_len());
        let mut f = EthernetFrame::new_unchecked(&mut buf);
        eth.emit(&mut f);
        let caps = ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
        ip.emit(&mut p, &caps);
        icmp.emit(&mut Icmpv4Packet::new_unchecked(p.payload_mut()), &caps);
        buf
    }
}

/// A TCP segment the stack sent to the guest, reduced to what tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// The TCP segment in a frame to the guest, if it is one.
pub fn segment(f: &[u8]) -> Option<Segment> {
    let (src, proto, payload) = ip_payload(f)?;
    if proto != IpProtocol::Tcp {
        return None;
    }
    let t = TcpPacket::new_checked(payload).ok()?;
    Some(Segment {
        src,
        src_port: t.src_port(),
        dst_port: t.dst_port(),
        syn: t.syn(),
        ack: t.ack(),
        rst: t.rst(),
        fin: t.fin(),
        seq: t.seq_number().0 as u32,
        payload: t.payload().to_vec(),
    })
}

/// The source, protocol and payload of the IPv4 or IPv6 packet in a frame.
fn ip_payload(f: &[u8]) -> Option<(IpAddr, IpProtocol, &[u8])> {
    let eth = EthernetFrame::new_checked(f).ok()?;
    let start = f.len() - eth.payload().len();
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(&f[start..]).ok()?;
            let off = start + usize::from(ip.header_len());
            Some((ip.src_addr().into(), ip.next_header(), f.get(off..off + ip.payload().len())?))
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(&f[start..]).ok()?;
            let off = start + 40;
            Some((ip.src_addr().into(), ip.next_header(), f.get(off..off + ip.payload().len())?))
        }
        _ => None,
    }
}

/// A guest-side TCP client over [`Guest`]: handshake, send, receive (acknowledging what
/// arrived), as a guest kernel would — only the happy path, for tests.
pub struct TcpClient {
    pub port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    seq: u32,
    ack: u32,
    /// Bytes received from the stack so far.
    pub received: Vec<u8>,
    pub reset: bool,
    pub fin: bool,
    seen: usize,
}

impl TcpClient {
    /// Connects; `None` if the stack answered with a RST or nothing within `limit`.
    pub fn connect(g: &mut Guest, port: u16, dst: impl Into<IpAddr>, dst_port: u16, limit: Duration) -> Option<TcpClient> {
        let dst = dst.into();
        let start = g.inbox.len();
        let f = g.syn(port, dst, dst_port);
        g.send(&f).ok()?;
        let mut reply = None;
        g.run_until(limit, |inbox| {
            reply = inbox[start.min(inbox.len())..]
                .iter()
                .filter_map(|f| segment(f))
                .find(|s| s.dst_port == port && s.src_port == dst_port && (s.rst || (s.syn && s.ack)));
            reply.is_some()
        });
        let r = reply?;
        if r.rst {
            return None;
        }
        let mut c = TcpClient { port, dst, dst_port, seq: 1001, ack: r.seq.wrapping_add(1), received: Vec::new(), reset: false, fin: false, seen: g.inbox.len() };
        let f = g.tcp(port, dst, dst_port, TcpControl::None, c.seq, Some(c.ack), &[]);
        g.send(&f).ok()?;
        c.pump(g);
        Some(c)
    }

    pub fn send(&mut self, g: &mut Guest, data: &[u8]) {
        for chunk in data.chunks(1000) {
            let f = g.tcp(self.port, self.dst, self.dst_port, TcpControl::Psh, self.seq, Some(self.ack), chunk);
            g.send(&f).expect("link");
            self.seq = self.seq.wrapping_add(chunk.len() as u32);
        }
    }

    /// Resets the connection (as a guest process killed mid-transfer).
    pub fn reset(&mut self, g: &mut Guest) {
        let f = g.tcp(self.port, self.dst, self.dst_port, TcpControl::Rst, self.seq, None, &[]);
        let _ = g.send(&f);
        self.reset = true;
    }

    /// Takes in-order segments for this connection from the inbox and acknowledges them.
    pub fn pump(&mut self, g: &mut Guest) {
        let mut acked = false;
        while self.seen < g.inbox.len() {
            let f = g.inbox[self.seen].clone();
            self.seen += 1;
            let Some(s) = segment(&f) else { continue };
            if s.dst_port != self.port || s.src_port != self.dst_port || s.src != self.dst {
                continue;
            }
            if s.rst {
                self.reset = true;
            }
            if s.seq == self.ack && !s.payload.is_empty() {
                self.received.extend_from_slice(&s.payload);
                self.ack = self.ack.wrapping_add(s.payload.len() as u32);
                acked = true;
            }
            if s.fin && s.seq.wrapping_add(s.payload.len() as u32) == self.ack {
                self.ack = self.ack.wrapping_add(1);
                self.fin = true;
                acked = true;
            }
        }
        if acked {
            let f = g.tcp(self.port, self.dst, self.dst_port, TcpControl::None, self.seq, Some(self.ack), &[]);
            let _ = g.send(&f);
        }
    }

    /// Runs the stack until `done(received)` or `limit`.
    pub fn run_until(&mut self, g: &mut Guest, limit: Duration, mut done: impl FnMut(&TcpClient) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            self.pump(g);
            if done(self) {
                return true;
            }
            if Instant::now() >= end || !g.step().unwrap_or(false) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The UDP datagram in a frame to the guest: (source, destination port, payload).
pub fn datagram(f: &[u8]) -> Option<(SocketAddr, u16, Vec<u8>)> {
    let (src, proto, payload) = ip_payload(f)?;
    if proto != IpProtocol::Udp {
        return None;
    }
    let u = UdpPacket::new_checked(payload).ok()?;
    Some((SocketAddr::new(src, u.src_port()), u.dst_port(), u.payload().to_vec()))
}

/// An ICMPv6 message in a frame to the guest (its checksum is asserted valid): source,
/// destination, type, code and the whole message.
pub fn icmp6_message(f: &[u8]) -> Option<(Ipv6Addr, Ipv6Addr, u8, u8, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(f).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return None;
    }
    let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Icmpv6 {
        return None;
    }
    let p = Icmpv6Packet::new_checked(ip.payload()).ok()?;
    assert!(p.verify_checksum(&ip.src_addr(), &ip.dst_addr()), "the stack's ICMPv6 checksums are valid");
    Some((ip.src_addr(), ip.dst_addr(), p.msg_type().into(), p.msg_code(), ip.payload().to_vec()))
}

/// An ARP reply in a frame to the guest: (sender MAC, sender IP).
pub fn arp_reply(f: &[u8]) -> Option<([u8; 6], Ipv4Addr)> {
    let eth = EthernetFrame::new_checked(f).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    match ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()? {
        ArpRepr::EthernetIpv4 { operation: ArpOperation::Reply, source_hardware_addr, source_protocol_addr, .. } => {
            Some((source_hardware_addr.0, source_protocol_addr))
        }
        _ => None,
    }
}

/// An ICMP echo reply in a frame to the guest: (source, ident, seq, data).
pub fn echo_reply(f: &[u8]) -> Option<(IpAddr, u16, u16, Vec<u8>)> {
    let eth = EthernetFrame::new_checked(f).ok()?;
    if eth.ethertype() == EthernetProtocol::Ipv6 {
        let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
        let p = Icmpv6Packet::new_checked(ip.payload()).ok()?;
        return match Icmpv6Repr::parse(&ip.src_addr(), &ip.dst_addr(), &p, &ChecksumCapabilities::default()).ok()? {
            Icmpv6Repr::EchoReply { ident, seq_no, data } => Some((ip.src_addr().into(), ident, seq_no, data.to_vec())),
            _ => None,
        };
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Icmp {
        return None;
    }
    let p = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    match Icmpv4Repr::parse(&p, &ChecksumCapabilities::default()).ok()? {
        Icmpv4Repr::EchoReply { ident, seq_no, data } => Some((ip.src_addr().into(), ident, seq_no, data.to_vec())),
        _ => None,
    }
}

/// Panics when anything the guest can make the stack hold is over its bound.
pub fn check_bounds(stack: &Stack) {
    let o = stack.occupancy();
    assert!(o.rx_frames <= RX_FRAMES + FRAMES_PER_READ, "rx queue {} frames", o.rx_frames);
    assert!(o.tx_frames <= TX_FRAMES + FRAMES_PER_READ, "tx queue {} frames", o.tx_frames);
    // Up to LINK_OUT_LIMIT unsent bytes plus as much already written (compacted lazily).
    assert!(o.link_out_bytes <= 2 * crate::stack::LINK_OUT_LIMIT + frame::MAX_STREAM_FRAME + 4, "link out {} bytes", o.link_out_bytes);
    assert!(o.tcp <= o.max_connections, "{} TCP connections over max_connections {}", o.tcp, o.max_connections);
    assert!(o.udp_sessions <= crate::stack::MAX_UDP_SESSIONS, "{} UDP sessions", o.udp_sessions);
    assert!(o.dns_queries <= crate::dns_transport::MAX_IN_FLIGHT, "{} DNS queries in flight", o.dns_queries);
    assert!(o.dns_tcp <= crate::dns_tcp::MAX_CONNS, "{} DNS-over-TCP connections", o.dns_tcp);
    assert!(o.ping_sessions <= crate::icmp::MAX_SESSIONS, "{} ping sessions", o.ping_sessions);
    assert!(o.reassemblies <= crate::frag::MAX_DATAGRAMS, "{} reassemblies", o.reassemblies);
    assert!(o.fragments_held <= crate::frag::MAX_DATAGRAMS * crate::frag::MAX_DATAGRAM, "{} fragment bytes", o.fragments_held);
    assert!(o.smoltcp_sockets <= o.max_connections + crate::dns_tcp::MAX_CONNS, "{} smoltcp sockets", o.smoltcp_sockets);
    let send_bound = o.relayed * o.tcp_buffer + crate::stack::send_buffer::EXTRA_BUDGET;
    assert!(o.send_buffers <= send_bound, "send buffers {} bytes over {send_bound}", o.send_buffers);
}

/// The loopback sockets the fuzzed stack may reach (bound once per process): a TCP
/// listener that never accepts (connects complete in its backlog) and a UDP socket that
/// never reads.
fn fuzz_sinks() -> (u16, u16) {
    use std::sync::OnceLock;
    static SINKS: OnceLock<(std::net::TcpListener, std::net::UdpSocket)> = OnceLock::new();
    let (t, u) = SINKS.get_or_init(|| {
        (std::net::TcpListener::bind("127.0.0.1:0").expect("tcp sink"), std::net::UdpSocket::bind("127.0.0.1:0").expect("udp sink"))
    });
    (t.local_addr().unwrap().port(), u.local_addr().unwrap().port())
}

/// The fuzzed stack's configuration: MTU 1500, at most 16 connections, DNS to a closed
/// loopback port, and a policy that denies everything but the two sink ports on the
/// gateway — so whatever the fuzzer sends, no socket reaches beyond host loopback.
pub fn fuzz_config() -> NetworkConfig {
    use crate::dns::Nameserver;
    use crate::flow::Action;
    use crate::policy::{Destination, NetworkPolicy, PortRange, Rule, RuleDirection};
    let (tcp, udp) = fuzz_sinks();
    let mut c = NetworkConfig::with_defaults();
    c.mtu = 1500;
    c.max_connections = 16;
    c.dns.nameservers = vec![Nameserver::parse("127.0.0.1:9").expect("nameserver")];
    c.dns.query_timeout_ms = 50;
    // The gateway's IPv4 and IPv6 addresses (host 127.0.0.1 and ::1), sink ports only.
    let allow = |gw: IpAddr| Rule {
        action: Action::Allow,
        direction: RuleDirection::Egress,
        destination: Destination::Ip(gw),
        protocols: Vec::new(),
        ports: vec![PortRange::single(tcp).expect("port"), PortRange::single(udp).expect("port")],
    };
    c.policy = NetworkPolicy::custom(Action::Deny, Action::Deny, vec![allow(c.gateway_ip.into()), allow(c.gateway_ip6.into())]);
    c
}

/// Gives a fuzzed frame the guest's identity (MAC, and the IPv4 source for IPv4 and ARP,
/// the IPv6 source for IPv6 — kept when it is `::` or the guest's link-local address) so
/// it gets past the guard, and with `fix` valid IPv4/TCP/UDP/ICMP/ICMPv6 checksums, so it
/// gets into smoltcp and the relays.
fn impersonate(f: &mut [u8], cfg: &NetworkConfig, fix: bool) {
    if f.len() >= 14 {
        f[6..12].copy_from_slice(&cfg.guest_mac);
    }
    let ip = cfg.guest_ip.octets();
    match f.get(12..14) {
        Some([0x08, 0x06]) if f.len() >= 14 + 28 => {
            f[22..28].copy_from_slice(&cfg.guest_mac);
            f[28..32].copy_from_slice(&ip);
        }
        Some([0x08, 0x00]) if f.len() >= 34 => {
            f[26..30].copy_from_slice(&ip);
            if !fix {
                return;
            }
            let Ok(mut p) = Ipv4Packet::new_checked(&mut f[14..]) else { return };
            p.fill_checksum();
            let (src, dst) = (IpAddress::Ipv4(p.src_addr()), IpAddress::Ipv4(p.dst_addr()));
            if p.more_frags() || p.frag_offset() != 0 {
                return;
            }
            match p.next_header() {
                IpProtocol::Tcp => {
                    if let Ok(mut t) = TcpPacket::new_checked(p.payload_mut()) {
                        t.fill_checksum(&src, &dst);
                    }
                }
                IpProtocol::Udp => {
                    if let Ok(mut u) = UdpPacket::new_checked(p.payload_mut()) {
                        u.fill_checksum(&src, &dst);
                    }
                }
                IpProtocol::Icmp => {
                    if let Ok(mut i) = Icmpv4Packet::new_checked(p.payload_mut()) {
                        i.fill_checksum();
                    }
                }
                _ => {}
            }
        }
        Some([0x86, 0xdd]) if f.len() >= 54 => {
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&f[22..38]).expect("16 bytes"));
            if !src.is_unspecified() && src != crate::guard::eui64_link_local(cfg.guest_mac) {
                f[22..38].copy_from_slice(&cfg.guest_ip6.octets());
            }
            if !fix {
                return;
            }
            let Ok(mut p) = Ipv6Packet::new_checked(&mut f[14..]) else { return };
            let (src, dst) = (p.src_addr(), p.dst_addr());
            match p.next_header() {
                IpProtocol::Tcp => {
                    if let Ok(mut t) = TcpPacket::new_checked(p.payload_mut()) {
                        t.fill_checksum(&src.into(), &dst.into());
                    }
                }
                IpProtocol::Udp => {
                    if let Ok(mut u) = UdpPacket::new_checked(p.payload_mut()) {
                        u.fill_checksum(&src.into(), &dst.into());
                    }
                }
                IpProtocol::Icmpv6 => {
                    if let Ok(mut i) = Icmpv6Packet::new_checked(p.payload_mut()) {
                        i.fill_checksum(&src, &dst);
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// The `frame_path` fuzz target (and its corpus replay): `data` is a program for a
/// hostile guest, one op byte then its operands, run against a real [`Stack`]
/// ([`fuzz_config`]), with every bound checked after each step ([`check_bounds`]) and
/// every frame to the guest checked for size and sender ([`Guest::step`]):
///
/// - `0..=3`: a frame — `u16` length (≤ 2,000), then its bytes; op bit 0 leaves the
///   frame as given (else it is made the guest's own), bit 1 fixes its checksums;
/// - `4`: one stack iteration; `5`: `u8` length, raw stream bytes (framing and all: an
///   impossible length ends the link, which ends the program);
/// - `6`: a SYN or (odd source port) a UDP datagram to a sink port on the gateway, `u16`
///   source port, then a data segment on that flow, `u8` length of payload;
/// - `7`: the guest stops / starts reading its NIC.
pub fn frame_path(data: &[u8]) {
    let cfg = fuzz_config();
    let (tcp_sink, udp_sink) = fuzz_sinks();
    let mut g = Guest::new(cfg.clone());
    let mut d = data;
    let take = |n: usize, d: &mut &[u8]| -> Option<Vec<u8>> {
        let n = n.min(d.len());
        let (a, b) = d.split_at(n);
        *d = b;
        Some(a.to_vec())
    };
    let mut ops = 0;
    while let Some((&op, rest)) = d.split_first() {
        d = rest;
        ops += 1;
        if ops > 512 {
            break;
        }
        let alive = match op % 8 {
            0..=3 => {
                let Some(len) = take(2, &mut d).filter(|l| l.len() == 2) else { break };
                let len = usize::from(u16::from_be_bytes([len[0], len[1]])).min(2000);
                let Some(mut f) = take(len, &mut d) else { break };
                if f.is_empty() {
                    continue;
                }
                if op & 1 == 0 {
                    impersonate(&mut f, &cfg, op & 2 != 0);
                }
                g.send(&f).is_ok()
            }
            4 => g.step().unwrap_or(false),
            5 => {
                let Some(n) = take(1, &mut d).and_then(|l| l.first().copied()) else { break };
                let Some(raw) = take(usize::from(n), &mut d) else { break };
                g.send_raw(&raw).is_ok() && g.step().unwrap_or(false)
            }
            6 => {
                let (Some(p), Some(n)) = (take(2, &mut d).filter(|p| p.len() == 2), take(1, &mut d).and_then(|n| n.first().copied())) else {
                    break;
                };
                let Some(payload) = take(usize::from(n), &mut d) else { break };
                let port = u16::from_be_bytes([p[0], p[1]]);
                let gw = cfg.gateway_ip;
                if port % 2 == 1 {
                    let f = g.udp(port, gw, udp_sink, &payload);
                    g.send(&f).is_ok()
                } else {
                    let syn = g.syn(port, gw, tcp_sink);
                    let seg = g.tcp(port, gw, tcp_sink, TcpControl::Psh, 1001, Some(1), &payload);
                    g.send(&syn).is_ok() && g.step().unwrap_or(false) && g.send(&seg).is_ok()
                }
            }
            _ => {
                g.deaf = !g.deaf;
                true
            }
        };
        if !alive {
            return;
        }
    }
    g.deaf = false;
    for _ in 0..4 {
        if !g.step().unwrap_or(false) {
            return;
        }
    }
}

/// Hand-written programs for [`frame_path`] (the fuzzer's seeds, and a test).
pub fn seed_programs() -> Vec<Vec<u8>> {
    let cfg = fuzz_config();
    let g = Guest::new(cfg.clone());
    let gw = cfg.gateway_ip;
    let frame_op = |op: u8, f: &[u8]| {
        let mut v = vec![op];
        v.extend_from_slice(&(f.len() as u16).to_be_bytes());
        v.extend_from_slice(f);
        v
    };
    let mut out = Vec::new();
    // SYNs allowed and denied, data, steps.
    let mut p = Vec::new();
    p.extend(frame_op(2, &g.syn(40000, gw, 22)));
    p.extend(frame_op(2, &g.syn(40001, Ipv4Addr::new(10, 0, 0, 1), 80)));
    p.extend([6, 0x9c, 0x42, 5, b'h', b'e', b'l', b'l', b'o', 4, 4]);
    out.push(p);
    // UDP, DNS, ICMP, ARP.
    let q: &[u8] = &[0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1];
    let mut p = Vec::new();
    p.extend(frame_op(2, &g.udp(5353, gw, 53, q)));
    p.extend(frame_op(2, &g.udp(5353, Ipv4Addr::new(203, 0, 113, 53), 53, q)));
    p.extend([6, 0x13, 0x89, 3, 1, 2, 3]);
    p.extend(frame_op(2, &g.ping(gw, 7, 1, b"ping")));
    p.extend(frame_op(2, &g.arp(ArpOperation::Request, cfg.guest_mac, cfg.guest_ip, gw)));
    p.extend([4, 4]);
    out.push(p);
    // A deaf guest, raw stream bytes, spoofed and truncated frames.
    let mut p = vec![7];
    for i in 0..20u16 {
        p.extend(frame_op(2, &g.udp(6000 + i, gw, 53, q)));
    }
    p.extend([4, 7, 4]);
    let syn = g.syn(40002, gw, 80);
    p.extend(frame_op(1, &syn));
    p.extend(frame_op(0, &syn[..30]));
    p.extend([5, 4, 0, 0, 0, 14]);
    out.push(p);
    // IPv6: neighbour discovery (for the gateway, for others, spoofed), SYNs and data
    // allowed and denied, UDP, DNS, echo, router advertisements and DHCPv6 from the guest.
    let (gw6, me6) = (cfg.gateway_ip6, cfg.guest_ip6);
    let ll = crate::guard::eui64_link_local(cfg.guest_mac);
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let lladdr = Some(RawHardwareAddress::from_bytes(&cfg.guest_mac));
    let mut p = Vec::new();
    p.extend(frame_op(2, &g.neighbor_solicit(me6, gw6, Some(cfg.guest_mac))));
    p.extend(frame_op(2, &g.neighbor_solicit(ll, crate::config::GATEWAY_LINK_LOCAL, Some(cfg.guest_mac))));
    p.extend(frame_op(2, &g.neighbor_solicit(Ipv6Addr::UNSPECIFIED, me6, None)));
    p.extend(frame_op(3, &g.neighbor_solicit("fd42:6d73:62::9".parse().unwrap(), gw6, Some([2, 0, 0, 0, 0, 9]))));
    p.extend(frame_op(2, &g.syn(40010, gw6, 22)));
    p.extend(frame_op(2, &g.syn(40011, "::1".parse::<Ipv6Addr>().unwrap(), 80)));
    p.extend(frame_op(2, &g.syn(40012, "fd00:ec2::254".parse::<Ipv6Addr>().unwrap(), 80)));
    p.extend(frame_op(2, &g.tcp(40010, gw6, 22, TcpControl::Psh, 1001, Some(1), b"data")));
    p.extend(frame_op(2, &g.udp(5353, gw6, 53, q)));
    p.extend(frame_op(2, &g.udp(5354, gw6, 9, b"dgram")));
    p.extend(frame_op(2, &g.ping(gw6, 7, 1, b"ping6")));
    p.extend(frame_op(2, &g.ping("::1".parse::<Ipv6Addr>().unwrap(), 7, 2, b"ping6")));
    p.extend([4, 4]);
    p.extend(frame_op(
        2,
        &g.icmp6(me6, all_nodes, &Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert { flags: smoltcp::wire::NdiscNeighborFlags::OVERRIDE, target_addr: gw6, lladdr })),
    ));
    p.extend(frame_op(2, &g.router_advert()));
    p.extend(frame_op(2, &g.udp(546, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2), 547, b"solicit")));
    let mut frag = g.udp(6000, gw6, 9, b"xxxxxxxx");
    frag[14 + 6] = 44;
    p.extend(frame_op(2, &frag));
    p.extend([4, 4]);
    out.push(p);
    // IPv6 fragments: a datagram and a SYN in pieces (out of order), an atomic fragment,
    // an overlap, a duplicate, a fragment of a fragment, and a spoofed source.
    let mut p = Vec::new();
    let dgram = g.udp(5355, gw6, 9, &[0x5a; 200]);
    let mut pieces = fragments6(&dgram, 64, 1);
    pieces.reverse();
    for f in &pieces {
        p.extend(frame_op(2, f));
    }
    p.extend(frame_op(2, &pieces[1]));
    for f in fragments6(&g.syn(40013, gw6, 22), 8, 2) {
        p.extend(frame_op(2, &f));
    }
    p.extend(frame_op(2, &fragments6(&g.udp(5356, gw6, 9, b"atomic"), 1000, 3)[0]));
    p.extend([4]);
    let overlap = fragments6(&dgram, 64, 4);
    let mut shifted = overlap[1].clone();
    shifted[14 + 42..14 + 44].copy_from_slice(&((56u16 / 8) << 3 | 1).to_be_bytes());
    p.extend(frame_op(2, &overlap[0]));
    p.extend(frame_op(2, &shifted));
    let mut nested = overlap[0].clone();
    nested[14 + 40] = 44;
    p.extend(frame_op(2, &nested));
    let mut spoofed = overlap[2].clone();
    spoofed[14 + 8 + 15] ^= 0x40; // another source address, sent as is (op 3)
    p.extend(frame_op(3, &spoofed));
    p.extend([4, 4]);
    out.push(p);
    out
}

/// Splits the IPv4 packet in `frame` into fragments of at most `size` payload bytes
/// (a multiple of 8), as a guest kernel would for a datagram larger than its MTU.
pub fn fragments(frame: &[u8], size: usize) -> Vec<Vec<u8>> {
    let ip = Ipv4Packet::new_checked(&frame[14..]).expect("an IPv4 frame");
    let hl = usize::from(ip.header_len());
    let payload = ip.payload();
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + size).min(payload.len());
        let mut f = frame[..14 + hl].to_vec();
        f.extend_from_slice(&payload[off..end]);
        let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
        p.set_total_len((hl + end - off) as u16);
        p.set_frag_offset(off as u16);
        p.set_more_frags(end < payload.len());
        p.set_ident(0x4242);
        p.fill_checksum();
        out.push(f);
        off = end;
    }
    out
}

/// Splits the IPv6 packet in `frame` (no extension headers) into fragments of at most
/// `size` payload bytes (a multiple of 8), each with a Fragment header right after the
/// fixed header, as a guest kernel does for a datagram larger than its MTU.
pub fn fragments6(frame: &[u8], size: usize, id: u32) -> Vec<Vec<u8>> {
    let ip = smoltcp::wire::Ipv6Packet::new_checked(&frame[14..]).expect("an IPv6 frame");
    let next = u8::from(ip.next_header());
    let payload = ip.payload();
    let mut out = Vec::new();
    let mut off = 0;
    while off < payload.len() {
        let end = (off + size).min(payload.len());
        let mut f = frame[..14 + 40].to_vec();
        f[14 + 6] = 44;
        f[14 + 4..14 + 6].copy_from_slice(&((8 + end - off) as u16).to_be_bytes());
        f.push(next);
        f.push(0);
        f.extend_from_slice(&(((off / 8) as u16) << 3 | u16::from(end < payload.len())).to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(&payload[off..end]);
        out.push(f);
        off = end;
    }
    out
}
