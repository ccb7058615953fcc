//! Published ports: host listeners whose connections and datagrams the stack forwards to
//! the guest (`ports:`, `ports_udp:`). A child module of `stack`, driven by its loop.
//!
//! The listeners are bound by the supervisor before QEMU starts ([`bind`]), so a port
//! already in use is a typed error at create and nothing is left behind; they are owned
//! by the stack's thread and close with it (the VM ended) or with the supervisor process.
//! No listener outlives its sandbox.
//!
//! TCP: an accepted host connection is first checked against the policy's ingress rules
//! (the peer's address, the guest port); a refusal resets it at once (`SO_LINGER` 0) and
//! leaves a `system` log entry. Otherwise a smoltcp socket connects from the gateway
//! address to the guest port; a guest that does not listen answers with a RST, and the
//! host client gets a RST too, at once. Established connections are relayed exactly like
//! outbound ones (`relay_one`: per-connection back-pressure, FINs passed on both ways)
//! and count toward `max_connections`.
//!
//! UDP: each host peer of a published UDP port gets its own source port on the gateway,
//! so the guest's replies (to the gateway, from the guest port) find their way back to
//! that peer. The first datagram of a peer is checked against the ingress rules; peers
//! are forgotten after [`UDP_PEER_IDLE`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant as StdInstant};

use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpEndpoint};

use super::{relay_one, Conn, Stack};
use crate::flow::{Action, Direction, Flow, Protocol};
use crate::guard::Udp;
use crate::published::{PortProtocol, PublishedPort};

/// Connections accepted per listener per loop iteration at most (fairness with the rest).
const ACCEPT_BUDGET: usize = 64;
/// Datagrams read per UDP listener per iteration at most.
const UDP_BUDGET: usize = 64;
/// Host peers of published UDP ports tracked at once (all ports together).
pub const MAX_UDP_PEERS: usize = 256;
/// A UDP peer without traffic either way for this long is forgotten.
pub const UDP_PEER_IDLE: Duration = Duration::from_secs(60);
/// Gateway source ports for inbound connections and UDP peers (the IANA dynamic range).
const LOCAL_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// The bound host sockets of a sandbox's published ports.
#[derive(Default)]
pub struct Listeners {
    tcp: Vec<(TcpListener, PublishedPort)>,
    udp: Vec<(UdpSocket, PublishedPort)>,
}

/// A published port that could not be bound.
#[derive(Debug)]
pub struct BindError {
    pub port: PublishedPort,
    pub error: io::Error,
}

impl BindError {
    /// True when another socket holds the address (the `port-in-use` case).
    pub fn in_use(&self) -> bool {
        self.error.kind() == io::ErrorKind::AddrInUse
    }
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (opt, host, guest) = (self.port.protocol.option(), self.port.host, self.port.guest_port);
        let hint = match self.error.kind() {
            io::ErrorKind::AddrInUse => "another program (or sandbox) already uses it; choose another host port or stop that program",
            io::ErrorKind::PermissionDenied => "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose a port of 1024 or above",
            io::ErrorKind::AddrNotAvailable => {
                "that address is not one of this host's; use 127.0.0.1, [::1], 0.0.0.0, [::] or an address of a host interface"
            }
            _ => "check the address and port",
        };
        write!(f, "{opt}: cannot publish host {host} (guest port {guest}): {}; {hint}", self.error)
    }
}

impl std::error::Error for BindError {}

/// Binds every published port (nonblocking, close-on-exec so QEMU does not inherit
/// them). On the first failure everything bound so far is closed again.
///
/// IPv6 listeners are IPv6-only (`IPV6_V6ONLY`), whatever `net.ipv6.bindv6only` says:
/// `[::]` means every IPv6 address and nothing else, so it never collides with an IPv4
/// port of the same number, and an IPv4 peer never reaches the guest as `::ffff:a.b.c.d`
/// through it (the policy would classify that form correctly, but one port, one family
/// is simpler to reason about). Connections are forwarded to the guest over its IPv4
/// address whatever the peer's family: every guest server that listens on `0.0.0.0`
/// (or dual-stack `::`) gets them, and the guest sees the gateway as the peer either way.
pub fn bind(ports: &[PublishedPort]) -> Result<Listeners, BindError> {
    use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
    let mut out = Listeners::default();
    for p in ports {
        let err = |error| BindError { port: *p, error };
        let (ty, proto) = match p.protocol {
            PortProtocol::Tcp => (Type::STREAM, SockProtocol::TCP),
            PortProtocol::Udp => (Type::DGRAM, SockProtocol::UDP),
        };
        let socket = Socket::new(Domain::for_address(p.host), ty.cloexec(), Some(proto)).map_err(err)?;
        if p.host.is_ipv6() {
            socket.set_only_v6(true).map_err(err)?;
        }
        if p.protocol == PortProtocol::Tcp {
            // As std's TcpListener::bind: a port in TIME_WAIT from a sandbox that just
            // ended is not "in use" (a listening socket still is).
            socket.set_reuse_address(true).map_err(err)?;
        }
        socket.bind(&p.host.into()).map_err(err)?;
        if p.protocol == PortProtocol::Tcp {
            socket.listen(128).map_err(err)?;
        }
        socket.set_nonblocking(true).map_err(err)?;
        match p.protocol {
            PortProtocol::Tcp => out.tcp.push((socket.into(), *p)),
            PortProtocol::Udp => out.udp.push((socket.into(), *p)),
        }
    }
    Ok(out)
}

impl Listeners {
    /// The bound addresses (the real ports, for tests and logs).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.tcp.iter().filter_map(|(l, _)| l.local_addr().ok()).chain(self.udp.iter().filter_map(|(s, _)| s.local_addr().ok())).collect()
    }
}

/// An inbound TCP connection being relayed.
pub(super) struct InConn {
    conn: Conn,
    /// The guest accepted it once (else a close is the guest refusing: reset the client).
    established: bool,
    local_port: u16,
}

/// A host peer of a published UDP port.
struct UdpPeer {
    listener: usize,
    peer: SocketAddr,
    guest_port: u16,
    last: StdInstant,
}

/// The published-port state of a stack.
#[derive(Default)]
pub(super) struct Inbound {
    listeners: Listeners,
    conns: Vec<InConn>,
    /// Gateway port → UDP peer.
    peers: HashMap<u16, UdpPeer>,
    /// (listener, peer) → gateway port.
    peer_ports: HashMap<(usize, SocketAddr), u16>,
    next_port: u16,
}

impl Inbound {
    /// The smoltcp sockets of the inbound connections.
    pub(super) fn handles(&self) -> impl Iterator<Item = smoltcp::iface::SocketHandle> + '_ {
        self.conns.iter().map(|c| c.conn.handle)
    }

    /// Inbound TCP connections (they count toward `max_connections`).
    pub(super) fn tcp_count(&self) -> usize {
        self.conns.len()
    }

    /// A gateway port no inbound connection or UDP peer uses.
    fn local_port(&mut self) -> Option<u16> {
        let span = (LOCAL_PORTS.end() - LOCAL_PORTS.start()) as usize + 1;
        for _ in 0..span {
            if !LOCAL_PORTS.contains(&self.next_port) {
                self.next_port = *LOCAL_PORTS.start();
            }
            let p = self.next_port;
            self.next_port = self.next_port.wrapping_add(1);
            if !self.peers.contains_key(&p) && !self.conns.iter().any(|c| c.local_port == p) {
                return Some(p);
            }
        }
        None
    }
}

/// Resets a host TCP connection (RST instead of FIN) as it is dropped.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

impl Stack {
    /// Gives the stack its published ports' listeners (bound by [`bind`]).
    pub fn with_listeners(mut self, listeners: Listeners) -> Stack {
        self.inbound.listeners = listeners;
        self
    }

    fn ingress_verdict(&self, protocol: Protocol, peer: IpAddr, guest_port: u16) -> crate::flow::Verdict {
        let flow = Flow { direction: Direction::Ingress, protocol, remote: peer, port: guest_port };
        self.cfg.policy.decide(&flow, &self.host, &self.pins, StdInstant::now())
    }

    /// Accepts new host connections on the published TCP ports.
    pub(super) fn accept_inbound(&mut self) {
        for i in 0..self.inbound.listeners.tcp.len() {
            for _ in 0..ACCEPT_BUDGET {
                let (stream, peer) = match self.inbound.listeners.tcp[i].0.accept() {
                    Ok(v) => v,
                    Err(_) => break, // WouldBlock, or a client that gave up meanwhile
                };
                let port = self.inbound.listeners.tcp[i].1;
                self.open_inbound(stream, peer, port);
            }
        }
    }

    fn open_inbound(&mut self, stream: TcpStream, peer: SocketAddr, port: PublishedPort) {
        let what = || format!("inbound TCP from {peer} to published port {} (guest port {})", port.host, port.guest_port);
        let verdict = self.ingress_verdict(Protocol::Tcp, peer.ip(), port.guest_port);
        if verdict.action == Action::Deny {
            self.logger.log(&format!("network: refused {} ({})", what(), verdict.reason));
            return reset(&stream);
        }
        if self.conns.len() + self.pending.len() + self.inbound.conns.len() >= self.cfg.max_connections as usize {
            self.logger.log(&format!("network: refused {}: max_connections ({}) reached", what(), self.cfg.max_connections));
            return reset(&stream);
        }
        let Some(local_port) = self.inbound.local_port() else {
            self.logger.log(&format!("network: refused {}: no free gateway port", what()));
            return reset(&stream);
        };
        if stream.set_nonblocking(true).and_then(|_| stream.set_nodelay(true)).is_err() {
            return reset(&stream);
        }
        let (mut socket, tx_extra) = self.relay_socket();
        let remote = IpEndpoint::new(IpAddress::Ipv4(self.cfg.guest_ip), port.guest_port);
        let local = IpEndpoint::new(IpAddress::Ipv4(self.cfg.gateway_ip), local_port);
        if socket.connect(self.iface.context(), remote, local).is_err() {
            self.send_budget.release(tx_extra);
            return reset(&stream);
        }
        let handle = self.sockets.add(socket);
        // Inbound connections are never intercepted: TLS interception is for the guest's
        // own outbound requests (secrets), not for clients of its servers.
        let conn = Conn { handle, host: stream, host_eof: false, host_write_shut: false, reap: false, tls: None, tx_extra };
        self.inbound.conns.push(InConn { conn, established: false, local_port });
    }

    /// Relays the inbound connections; a guest that refused (RST before it ever
    /// accepted) gets the host client reset too.
    pub(super) fn relay_inbound(&mut self) {
        for c in &mut self.inbound.conns {
            let socket = self.sockets.get_mut::<tcp::Socket>(c.conn.handle);
            if socket.state() == tcp::State::Established {
                c.established = true;
            }
            if !c.established {
                if socket.state() == tcp::State::Closed && !c.conn.host_eof {
                    reset(&c.conn.host);
                    c.conn.host_eof = true;
                    c.conn.host_write_shut = true;
                }
                continue;
            }
            relay_one(&mut c.conn, socket);
        }
    }

    /// Frees inbound connections one iteration after their guest socket closed.
    pub(super) fn reap_inbound(&mut self) {
        let sockets = &mut self.sockets;
        let budget = &mut self.send_budget;
        self.inbound.conns.retain_mut(|c| {
            let state = sockets.get::<tcp::Socket>(c.conn.handle).state();
            if !matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                return true;
            }
            if !c.conn.reap {
                c.conn.reap = true;
                return true;
            }
            if !c.established {
                reset(&c.conn.host);
            }
            sockets.remove(c.conn.handle);
            budget.release(c.conn.tx_extra);
            false
        });
    }

    /// Datagrams from host peers of published UDP ports, to the guest.
    pub(super) fn service_inbound_udp(&mut self) {
        let mut buf = vec![0u8; 65536];
        for i in 0..self.inbound.listeners.udp.len() {
            for _ in 0..UDP_BUDGET {
                if self.device.tx_full() {
                    break;
                }
                let (n, peer) = match self.inbound.listeners.udp[i].0.recv_from(&mut buf) {
                    Ok(v) => v,
                    Err(_) => break,
                };
                let port = self.inbound.listeners.udp[i].1;
                let local = match self.inbound.peer_ports.get(&(i, peer)) {
                    Some(&p) => p,
                    None => match self.new_udp_peer(i, peer, port) {
                        Some(p) => p,
                        None => continue,
                    },
                };
                if let Some(p) = self.inbound.peers.get_mut(&local) {
                    p.last = StdInstant::now();
                }
                let payload = buf[..n].to_vec();
                self.to_guest_udp(SocketAddr::new(self.cfg.gateway_ip.into(), local), port.guest_port, &payload);
            }
        }
        let idle: Vec<u16> = self.inbound.peers.iter().filter(|(_, p)| p.last.elapsed() >= UDP_PEER_IDLE).map(|(k, _)| *k).collect();
        for k in idle {
            if let Some(p) = self.inbound.peers.remove(&k) {
                self.inbound.peer_ports.remove(&(p.listener, p.peer));
            }
        }
    }

    fn new_udp_peer(&mut self, listener: usize, peer: SocketAddr, port: PublishedPort) -> Option<u16> {
        let what = || format!("inbound UDP from {peer} to published port {} (guest port {})", port.host, port.guest_port);
        let verdict = self.ingress_verdict(Protocol::Udp, peer.ip(), port.guest_port);
        if verdict.action == Action::Deny {
            self.logger.log(&format!("network: refused {} ({})", what(), verdict.reason));
            return None;
        }
        if self.inbound.peers.len() >= MAX_UDP_PEERS {
            self.logger.log(&format!("network: dropped {}: {MAX_UDP_PEERS} UDP peers of published ports tracked", what()));
            return None;
        }
        let local = self.inbound.local_port()?;
        self.inbound.peers.insert(local, UdpPeer { listener, peer, guest_port: port.guest_port, last: StdInstant::now() });
        self.inbound.peer_ports.insert((listener, peer), local);
        Some(local)
    }

    /// Ages every published-port UDP peer by `by` (the tests' fake clock, as
    /// [`Stack::age_udp_sessions`]).
    pub(super) fn age_inbound_peers(&mut self, by: Duration) {
        for p in self.inbound.peers.values_mut() {
            p.last = p.last.checked_sub(by).unwrap_or(p.last);
        }
    }

    /// Published-port UDP peers tracked now.
    pub(super) fn inbound_peer_count(&self) -> usize {
        self.inbound.peers.len()
    }

    /// A guest datagram to the gateway that answers a host peer of a published UDP port
    /// (sent from that port, to the peer's gateway port): sent to the peer. False when
    /// it is not such a reply (the caller treats it as outbound).
    pub(super) fn inbound_udp_reply(&mut self, udp: &Udp, payload: &[u8]) -> bool {
        if udp.dst != IpAddr::V4(self.cfg.gateway_ip) {
            return false;
        }
        let Some(p) = self.inbound.peers.get_mut(&udp.dst_port) else { return false };
        if p.guest_port != udp.src_port {
            return false;
        }
        p.last = StdInstant::now();
        let (listener, peer) = (p.listener, p.peer);
        // UDP: a full socket buffer drops, as a network would.
        let _ = self.inbound.listeners.udp[listener].0.send_to(payload, peer);
        true
    }

    /// The published ports' descriptors for `poll(2)`.
    pub(super) fn inbound_pollfds(&self, fds: &mut Vec<libc::pollfd>) {
        for (l, _) in &self.inbound.listeners.tcp {
            fds.push(libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let udp_events = if self.device.tx_full() { 0 } else { libc::POLLIN };
        for (s, _) in &self.inbound.listeners.udp {
            fds.push(libc::pollfd { fd: if udp_events == 0 { -1 } else { s.as_raw_fd() }, events: udp_events, revents: 0 });
        }
        for c in &self.inbound.conns {
            let socket = self.sockets.get::<tcp::Socket>(c.conn.handle);
            let mut events = 0;
            if c.established && !c.conn.host_eof && socket.can_send() {
                events |= libc::POLLIN;
            }
            if c.established && !c.conn.host_write_shut && socket.can_recv() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd { fd: if events == 0 { -1 } else { c.conn.host.as_raw_fd() }, events, revents: 0 });
        }
    }

    /// True while UDP peers wait to be expired (the loop then wakes now and then).
    pub(super) fn inbound_has_peers(&self) -> bool {
        !self.inbound.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(protocol: PortProtocol, host: &str) -> PublishedPort {
        PublishedPort { protocol, host: host.parse().unwrap(), guest_port: 80 }
    }

    /// IPv6 listeners bind IPv6 only; a port taken over IPv6 is `port-in-use` as over IPv4,
    /// and an address that is not the host's says so.
    #[test]
    fn ipv6_listeners_are_ipv6_only_and_fail_with_the_right_kind() {
        let l = bind(&[port(PortProtocol::Tcp, "[::1]:0"), port(PortProtocol::Udp, "[::1]:0")]).unwrap();
        assert!(socket2::SockRef::from(&l.tcp[0].0).only_v6().unwrap());
        assert!(socket2::SockRef::from(&l.udp[0].0).only_v6().unwrap());
        let [tcp, udp] = l.local_addrs()[..] else { panic!("two listeners") };
        assert!(tcp.is_ipv6() && udp.is_ipv6());
        for p in [port(PortProtocol::Tcp, &tcp.to_string()), port(PortProtocol::Udp, &udp.to_string())] {
            let e = bind(&[p]).err().expect("taken");
            assert!(e.in_use(), "{e}");
            assert!(e.to_string().contains(&format!("cannot publish host {}", p.host)), "{e}");
        }
        // 2001:db8:dead::/48 is documentation space no interface of this host has.
        let e = bind(&[port(PortProtocol::Tcp, "[2001:db8:dead::1]:8080")]).err().expect("not the host's");
        assert!(!e.in_use());
        assert_eq!(e.error.kind(), io::ErrorKind::AddrNotAvailable);
        assert!(e.to_string().contains("not one of this host's; use 127.0.0.1, [::1]"), "{e}");
        // A failure closes what was bound before it.
        let first = port(PortProtocol::Tcp, "[::1]:0");
        assert!(bind(&[first, port(PortProtocol::Udp, "[2001:db8:dead::1]:8080")]).is_err());
    }
}
