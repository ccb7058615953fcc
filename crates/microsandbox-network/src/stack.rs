//! The stack's event loop: one OS thread per sandbox NIC, `poll(2)` over the NIC link and
//! every host socket, smoltcp in the middle.
//!
//! Why a thread of its own: the supervisor is a current-thread tokio process serving the
//! agent channel and control clients; a busy NIC must not delay those, and smoltcp's
//! single-owner API fits a plain loop better than many tokio tasks sharing it. The loop
//! owns everything (interface, sockets, host connections), so there are no locks.
//!
//! TCP (NAT): a guest SYN is held back while the stack connects to the destination on
//! the host side (the gateway address means host loopback). Only when that connect
//! succeeds does smoltcp see the SYN, with a socket listening on exactly that
//! destination, so the guest's `connect` succeeds only if the far end accepted; a refused
//! or failed connect lets smoltcp answer the SYN with a RST (`ECONNREFUSED` at once, not a
//! hang). Bytes then move between the smoltcp socket and the host socket without a copy
//! in between: a side that does not take bytes leaves them in the other side's buffer,
//! which closes that TCP window (back-pressure per connection, bounded memory).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};

use crate::config::NetworkConfig;
use crate::device::QueueDevice;
use crate::dns::{DnsFilter, Nameserver, PinSet, QueryDecision};
use crate::dns_tcp;
use crate::dns_transport;
use crate::flow::{Action, Direction, Flow, Protocol};
use crate::frag;
use crate::frame::{self, Decoded, Decoder};
use crate::guard::{self, Identity, Ingress, Syn, Udp};
use crate::intercept::{Cut, Interception, TlsRelay};
use crate::icmp;
use crate::policy::HostContext;
use crate::wire;

pub mod ports;
pub mod send_buffer;

/// How long a host-side connect may take before the guest gets a RST.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose peer stops acknowledging for this long is aborted (smoltcp timer).
pub(crate) const TCP_TIMEOUT: SmolDuration = SmolDuration::from_secs(60);
/// Bytes read from the link per loop iteration at most (fairness with host sockets).
const LINK_READ_BUDGET: usize = 1 << 20;
/// Encoded frames waiting for the link; beyond this the stack stops producing frames.
pub(crate) const LINK_OUT_LIMIT: usize = 1 << 20;
/// Longest sleep of the loop (smoltcp timers usually ask for less).
const MAX_SLEEP: Duration = Duration::from_millis(500);
/// Concurrent UDP sessions (guest port, destination) per sandbox.
pub const MAX_UDP_SESSIONS: usize = 256;
/// A UDP session without traffic for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(60);

/// The bounds of the guest's outbound UDP sessions ([`MAX_UDP_SESSIONS`], [`UDP_IDLE`]).
/// Not a user option: a field so tests can check the cap and the expiry exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpLimits {
    pub max_sessions: usize,
    pub idle: Duration,
}

impl Default for UdpLimits {
    fn default() -> Self {
        UdpLimits { max_sessions: MAX_UDP_SESSIONS, idle: UDP_IDLE }
    }
}
/// Datagrams read per UDP socket per iteration (fairness).
const UDP_READ_BUDGET: usize = 64;
/// `system` log entries about refusals per second at most; the rest are counted.
const LOG_PER_SEC: u32 = 20;

/// Where the stack's `system` log entries go (refusals, degraded features).
pub type LogFn = Box<dyn Fn(&str) + Send>;
/// Asks the supervisor to stop the sandbox (a `block_and_terminate` secret violation);
/// the argument says why (env name and destination, never a value).
pub type TerminateFn = Box<dyn Fn(&str) + Send>;
/// How long an intercepted connection may take for both TLS handshakes.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds the `system` entries a guest can cause: at most [`LOG_PER_SEC`] per second;
/// the next entry after a burst says how many were left out.
struct Logger {
    out: LogFn,
    window: StdInstant,
    in_window: u32,
    suppressed: u64,
}

impl Logger {
    fn log(&mut self, line: &str) {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = StdInstant::now();
            self.in_window = 0;
        }
        if self.in_window >= LOG_PER_SEC {
            self.suppressed += 1;
            return;
        }
        self.in_window += 1;
        if self.suppressed > 0 {
            (self.out)(&format!("network: {} more refusals were not logged (over {LOG_PER_SEC}/s)", self.suppressed));
            self.suppressed = 0;
        }
        (self.out)(line);
    }
}

/// One relayed UDP session: the guest's port and destination, and the host socket.
struct UdpSession {
    socket: UdpSocket,
    last: StdInstant,
}

/// A DNS query forwarded upstream, waiting for its answer.
struct DnsQuery {
    /// Where the guest sent it (the answer comes from there) and from which port.
    key: Udp,
    query: Vec<u8>,
    socket: UdpSocket,
    /// Index of the nameserver being asked.
    server: usize,
    deadline: StdInstant,
}

/// Byte counters of the NIC (whole Ethernet frames), shared with the supervisor.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Bytes the guest sent.
    pub tx_bytes: AtomicU64,
    /// Frames from the guest that were dropped (malformed, spoofed, unsupported, oversized).
    pub dropped_frames: AtomicU64,
}

/// A guest SYN waiting for its host-side connect.
struct Pending {
    syn: Syn,
    frame: Vec<u8>,
    socket: socket2::Socket,
    started: StdInstant,
    /// Intercepted (TLS, see [`crate::intercept`]): the names the destination was pinned
    /// for when the SYN came.
    intercept: Option<Vec<String>>,
}

/// The TLS side of an intercepted connection.
struct Intercepted {
    relay: TlsRelay,
    since: StdInstant,
    /// A bypassed ClientHello still to be written to the host socket.
    bypass_out: Vec<u8>,
}

/// One relayed TCP connection.
pub(crate) struct Conn {
    handle: SocketHandle,
    host: TcpStream,
    /// The host side sent FIN (or failed): nothing more to read from it.
    host_eof: bool,
    /// The guest's FIN was passed on to the host.
    host_write_shut: bool,
    /// Seen closed once: removed on the next iteration, after smoltcp sent any RST.
    reap: bool,
    /// Intercepted connections: the TLS relay between the two sockets.
    tls: Option<Box<Intercepted>>,
    /// Send-buffer bytes beyond `tcp_buffer` taken from the stack's [`send_buffer::SendBudget`]
    /// (given back when the connection is freed).
    tx_extra: usize,
}

/// The user-space network stack of one sandbox.
pub struct Stack {
    cfg: NetworkConfig,
    me: Identity,
    iface: Interface,
    device: QueueDevice,
    sockets: SocketSet<'static>,
    link: UnixStream,
    decoder: Decoder,
    link_out: Vec<u8>,
    link_out_pos: usize,
    pending: HashMap<Syn, Pending>,
    conns: HashMap<Syn, Conn>,
    /// Guest DNS-over-TCP connections (port 53, terminated here: `dns_tcp`).
    dns_tcp: HashMap<Syn, dns_tcp::Conn>,
    /// Guest pings beyond the gateway (host ping sockets).
    pinger: icmp::Pinger,
    /// IPv4 and IPv6 fragments from the guest being put back together.
    frags: frag::Reassembler,
    udp: HashMap<Udp, UdpSession>,
    udp_limits: UdpLimits,
    dns_queries: Vec<DnsQuery>,
    nameservers: Vec<SocketAddr>,
    dns_filter: DnsFilter,
    pins: PinSet,
    host: HostContext,
    logger: Logger,
    counters: Arc<Counters>,
    epoch: StdInstant,
    /// TLS interception and secrets ([`Stack::with_interception`]).
    intercept: Option<Arc<Interception>>,
    on_terminate: Option<TerminateFn>,
    /// Published ports (`ports`): listeners and inbound connections.
    inbound: ports::Inbound,
    /// Room for large send buffers (host → guest), shared by the relayed connections.
    send_budget: send_buffer::SendBudget,
}

/// The host's own interface addresses (the `host` group besides the gateway).
pub fn host_addrs() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below; we only read sockaddrs by family.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            if !sa.is_null() {
                match (*sa).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(sa as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(sa as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// Upstream resolvers: `dns.nameservers` (names resolved once, here), else the host's
/// `/etc/resolv.conf`.
fn resolve_nameservers(configured: &[Nameserver]) -> Vec<SocketAddr> {
    use std::net::ToSocketAddrs;
    if !configured.is_empty() {
        return configured
            .iter()
            .flat_map(|n| match n {
                Nameserver::Addr(sa) => vec![*sa],
                Nameserver::Name { host, port } => (host.to_string(), *port).to_socket_addrs().map(|a| a.collect()).unwrap_or_default(),
            })
            .collect();
    }
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(crate::dns::config::MAX_NAMESERVERS)
        .collect()
}

impl Stack {
    /// A stack for the NIC whose frames arrive on `link` (QEMU's end of the stream
    /// socketpair is the other one).
    pub fn new(link: UnixStream, cfg: NetworkConfig, counters: Arc<Counters>, log: LogFn) -> io::Result<Stack> {
        link.set_nonblocking(true)?;
        let mut device = QueueDevice::new(cfg.max_frame());
        let epoch = StdInstant::now();
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.gateway_mac))),
            &mut device,
            Instant::from_millis(0),
        );
        let mut added = true;
        iface.update_ip_addrs(|addrs| {
            added &= addrs.push(IpCidr::new(IpAddress::Ipv4(cfg.gateway_ip), cfg.prefix)).is_ok();
            // The gateway's IPv6 addresses: the pool's `::1` (the guest's default route)
            // and `fe80::1`. smoltcp answers neighbour solicitations for them (the guard
            // lets no other solicitation through).
            added &= addrs.push(IpCidr::new(IpAddress::Ipv6(cfg.gateway_ip6), crate::config::IPV6_LINK_PREFIX)).is_ok();
            added &= addrs.push(IpCidr::new(IpAddress::Ipv6(crate::config::GATEWAY_LINK_LOCAL), 64)).is_ok();
        });
        if !added {
            return Err(io::Error::other("smoltcp interface address table full"));
        }
        // any_ip + a default route through our own address: smoltcp accepts segments for
        // every destination, so a socket can stand in for any far end.
        iface.set_any_ip(true);
        iface
            .routes_mut()
            .add_default_ipv4_route(cfg.gateway_ip)
            .map_err(|_| io::Error::other("smoltcp route table full"))?;
        iface
            .routes_mut()
            .add_default_ipv6_route(cfg.gateway_ip6)
            .map_err(|_| io::Error::other("smoltcp route table full"))?;
        let mut gateway = vec![IpAddr::V4(cfg.gateway_ip)];
        gateway.extend(cfg.gateway_ip6s().map(IpAddr::V6));
        let host = HostContext { gateway, host_addrs: host_addrs() };
        let nameservers = resolve_nameservers(&cfg.dns.nameservers);
        let mut logger = Logger { out: log, window: StdInstant::now(), in_window: 0, suppressed: 0 };
        if nameservers.is_empty() {
            logger.log("network: no upstream DNS resolver (dns.nameservers is empty and the host's /etc/resolv.conf names none): DNS queries get SERVFAIL");
        }
        Ok(Stack {
            me: Identity { guest_mac: cfg.guest_mac, guest_ip: cfg.guest_ip, guest_ip6: cfg.guest_ip6, gateway_ip6: cfg.gateway_ip6 },
            dns_filter: DnsFilter::new(&cfg.policy, &cfg.dns).with_host_context(host.clone()),
            host,
            nameservers,
            logger,
            pins: PinSet::new(),
            udp: HashMap::new(),
            udp_limits: UdpLimits::default(),
            dns_queries: Vec::new(),
            decoder: Decoder::new(cfg.max_frame()),
            cfg,
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            link,
            link_out: Vec::new(),
            link_out_pos: 0,
            pending: HashMap::new(),
            conns: HashMap::new(),
            dns_tcp: HashMap::new(),
            pinger: icmp::Pinger::new(),
            frags: frag::Reassembler::new(),
            counters,
            epoch,
            intercept: None,
            on_terminate: None,
            inbound: ports::Inbound::default(),
            send_budget: send_buffer::SendBudget::default(),
        })
    }

    /// Intercepts TLS toward the hosts of `intercept`'s secrets (or every host, with
    /// `intercept_all`); `on_terminate` stops the sandbox on a `block_and_terminate`
    /// violation.
    pub fn with_interception(mut self, intercept: Arc<Interception>, on_terminate: TerminateFn) -> Stack {
        self.intercept = Some(intercept);
        self.on_terminate = Some(on_terminate);
        self
    }

    /// The pinned names of `dst` when a TCP connection to it on `port` is intercepted.
    fn intercepted_names(&self, dst: IpAddr, port: u16) -> Option<Vec<String>> {
        let i = self.intercept.as_ref()?;
        let names: Vec<String> =
            self.pins.names_for(dst, StdInstant::now()).map(|n| n.as_str().to_string()).collect();
        i.intercepts(port, names.iter().map(String::as_str)).then_some(names)
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs until the link closes (QEMU exited) or fails.
    pub fn run(mut self) -> io::Result<()> {
        while self.turn()? {
            self.wait()?;
        }
        Ok(())
    }

    /// One iteration of the loop without the sleep: everything that is ready moves on.
    /// `false` when the link closed. (Tests and the frame fuzzer drive the stack with it.)
    fn turn(&mut self) -> io::Result<bool> {
        if !self.read_link()? {
            return Ok(false);
        }
        self.finish_connects();
        self.service_udp();
        self.service_icmp();
        if !self.frags.is_empty() {
            self.frags.expire(StdInstant::now());
        }
        self.service_dns();
        self.accept_inbound();
        self.service_inbound_udp();
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.relay();
        self.service_dns_tcp();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        self.write_link()?;
        self.reap();
        Ok(true)
    }

    /// Reads what the link has (bounded per iteration and by both queues). `false` at EOF.
    ///
    /// The tx bound matters as much as rx: some guest frames are answered without smoltcp
    /// (DNS refusals, relayed datagrams), so a guest that sends while never reading its
    /// NIC would otherwise grow the tx queue without end. With tx full the stack stops
    /// reading, and QEMU stops the guest's NIC.
    fn read_link(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 64 * 1024];
        let mut budget = LINK_READ_BUDGET;
        while budget > 0 && !self.device.rx_full() && !self.device.tx_full() {
            let n = match self.link.read(&mut buf) {
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            budget = budget.saturating_sub(n);
            let mut frames = Vec::new();
            self.decoder
                .push(&buf[..n], |d| frames.push(d))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            for d in frames {
                match d {
                    Decoded::Frame(f) => self.ingress(f),
                    Decoded::Dropped(len) => self.drop_frame(len),
                }
            }
        }
        Ok(true)
    }

    fn drop_frame(&mut self, len: usize) {
        self.counters.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
        self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// One frame from the guest.
    fn ingress(&mut self, frame: Vec<u8>) {
        self.counters.tx_bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
        if frag::is_fragment(&frame) {
            // Only the guest's own fragments are kept; the whole packet then takes the
            // same path as an unfragmented one.
            if !guard::from_guest(&frame, &self.me) {
                self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match self.frags.push(&frame, StdInstant::now()) {
                frag::Outcome::Complete(whole) => self.inspect(whole),
                frag::Outcome::Pending => {}
                frag::Outcome::Dropped(_) => {
                    self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
                }
            }
            return;
        }
        self.inspect(frame);
    }

    /// One whole frame from the guest (reassembled if it came in fragments).
    fn inspect(&mut self, frame: Vec<u8>) {
        match guard::inspect(&frame, &self.me) {
            Ingress::Stack => self.device.rx.push_back(frame),
            Ingress::Syn(syn) => self.on_syn(syn, frame),
            Ingress::Udp(udp) => {
                let payload = guard::udp_payload(&frame).unwrap_or_default();
                if self.inbound_udp_reply(&udp, payload) {
                    return; // the answer to a host peer of a published UDP port
                }
                if udp.dst_port == 53 {
                    self.on_dns_query(udp, payload);
                } else {
                    self.on_udp(udp, payload);
                }
            }
            Ingress::Echo => {
                if let Some(echo) = icmp::parse_echo(&frame) {
                    self.on_echo(echo, &frame);
                }
            }
            Ingress::Echo6 => {
                if let Some(echo) = icmp::parse_echo6(&frame) {
                    self.on_echo(echo, &frame);
                }
            }
            Ingress::Drop(_) => {
                self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn icmp_link(&self) -> icmp::Link {
        icmp::Link {
            gateway_mac: self.cfg.gateway_mac,
            guest_mac: self.cfg.guest_mac,
            guest_ip: self.cfg.guest_ip,
            guest_ip6: self.cfg.guest_ip6,
            max_frame: self.cfg.max_frame(),
        }
    }

    /// A guest ping: the gateway answers its own; others, if the policy allows them, go
    /// out through a host ping socket; a refused one gets "administratively prohibited".
    fn on_echo(&mut self, echo: icmp::Echo, frame: &[u8]) {
        let link = self.icmp_link();
        if self.is_gateway(echo.dst) {
            if let Some(f) = icmp::reply_frame_any(&link, echo.dst, echo.ident, echo.seq_no, &echo.data) {
                self.device.tx.push_back(f);
            }
            return;
        }
        let protocol = if echo.dst.is_ipv4() { Protocol::Icmpv4 } else { Protocol::Icmpv6 };
        let flow = Flow { direction: Direction::Egress, protocol, remote: echo.dst, port: 0 };
        let verdict = self.cfg.policy.decide(&flow, &self.host, &self.pins, StdInstant::now());
        if verdict.action == Action::Deny {
            self.logger.log(&format!("network: refused ICMP echo to {} ({})", echo.dst, verdict.reason));
            let refusal = match echo.dst {
                IpAddr::V4(_) => icmp::prohibited_frame(&link, self.cfg.gateway_ip, frame),
                IpAddr::V6(_) => icmp::prohibited_frame6(&link, self.cfg.gateway_ip6, frame),
            };
            if let Some(f) = refusal {
                self.device.tx.push_back(f);
            }
            return;
        }
        let target = self.host_addr(echo.dst, 0).ip();
        let logger = &mut self.logger;
        self.pinger.send(&echo, target, &mut |line| logger.log(line));
    }

    /// Echo replies from the host's ping sockets back to the guest.
    fn service_icmp(&mut self) {
        if self.pinger.is_empty() {
            return;
        }
        let link = self.icmp_link();
        let tx = &mut self.device.tx;
        self.pinger.receive(&link, |f| {
            tx.push_back(f);
            tx.len() < crate::device::TX_FRAMES
        });
    }

    /// A new connection attempt: start the host-side connect, hold the SYN.
    fn on_syn(&mut self, syn: Syn, frame: Vec<u8>) {
        if self.conns.contains_key(&syn) || self.dns_tcp.contains_key(&syn) {
            // A retransmitted SYN of a known connection: smoltcp's socket answers it.
            self.device.rx.push_back(frame);
            return;
        }
        if self.pending.contains_key(&syn) {
            return; // a retransmission while the host connect is under way
        }
        if syn.dst_port == 53 {
            // DNS over TCP, whatever the address (as for UDP): answered here, never relayed.
            self.accept_dns_tcp(syn, frame);
            return;
        }
        let flow = Flow { direction: Direction::Egress, protocol: Protocol::Tcp, remote: syn.dst, port: syn.dst_port };
        let verdict = self.cfg.policy.decide(&flow, &self.host, &self.pins, StdInstant::now());
        if verdict.action == Action::Deny {
            self.logger.log(&format!("network: refused TCP connection to {} ({})", SocketAddr::new(syn.dst, syn.dst_port), verdict.reason));
            // No socket will take the SYN: smoltcp answers with a RST (ECONNREFUSED).
            self.device.rx.push_back(frame);
            return;
        }
        if self.conns.len() + self.pending.len() + self.inbound.tcp_count() >= self.cfg.max_connections as usize {
            self.logger.log(&format!(
                "network: refused TCP connection to {}: max_connections ({}) reached",
                SocketAddr::new(syn.dst, syn.dst_port), self.cfg.max_connections
            ));
            // No socket will take it: smoltcp answers with a RST.
            self.device.rx.push_back(frame);
            return;
        }
        let intercept = self.intercepted_names(syn.dst, syn.dst_port);
        match self.connect(&syn) {
            Ok(socket) => {
                self.pending.insert(syn, Pending { syn, frame, socket, started: StdInstant::now(), intercept });
            }
            Err(_) => self.device.rx.push_back(frame),
        }
    }

    /// True for the gateway's own addresses (IPv4, its IPv6 pool address, `fe80::1`).
    fn is_gateway(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => v4 == self.cfg.gateway_ip,
            IpAddr::V6(v6) => self.cfg.gateway_ip6s().contains(&v6),
        }
    }

    /// Where a guest destination is on the host side: the gateway is host loopback
    /// (127.0.0.1 for its IPv4 address, `::1` for its IPv6 ones).
    fn host_addr(&self, dst: IpAddr, port: u16) -> SocketAddr {
        let ip = match dst {
            IpAddr::V4(_) if self.is_gateway(dst) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) if self.is_gateway(dst) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            _ => dst,
        };
        SocketAddr::new(ip, port)
    }

    /// Queues a datagram from `from` to the guest's `port` (dropped, counted, if it does
    /// not fit the link MTU: the stack does not fragment). The guest address is the one
    /// of `from`'s family.
    fn to_guest_udp(&mut self, from: SocketAddr, port: u16, payload: &[u8]) {
        let guest = if from.is_ipv4() { IpAddr::V4(self.cfg.guest_ip) } else { IpAddr::V6(self.cfg.guest_ip6) };
        match wire::udp_frame(self.cfg.gateway_mac, self.cfg.guest_mac, from, guest, port, payload, self.cfg.max_frame()) {
            Some(f) => self.device.tx.push_back(f),
            None => {
                self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A guest datagram (not DNS): through its session, or a new one if the policy allows.
    fn on_udp(&mut self, key: Udp, payload: &[u8]) {
        if let Some(s) = self.udp.get_mut(&key) {
            s.last = StdInstant::now();
            let _ = s.socket.send(payload); // UDP: a full socket buffer drops, as a network would
            return;
        }
        let shown = SocketAddr::new(key.dst, key.dst_port);
        let flow = Flow { direction: Direction::Egress, protocol: Protocol::Udp, remote: key.dst, port: key.dst_port };
        let verdict = self.cfg.policy.decide(&flow, &self.host, &self.pins, StdInstant::now());
        if verdict.action == Action::Deny {
            self.logger.log(&format!("network: refused UDP to {shown} ({})", verdict.reason));
            return;
        }
        if let Some(i) = &self.intercept {
            let names: Vec<String> =
                self.pins.names_for(key.dst, StdInstant::now()).map(|n| n.as_str().to_string()).collect();
            if i.blocks_udp(key.dst_port, names.iter().map(String::as_str)) {
                self.logger.log(&format!(
                    "network: dropped UDP to {shown}: the host is intercepted and tls.block_quic is on (clients fall back to TCP)"
                ));
                return;
            }
        }
        if self.udp.len() >= self.udp_limits.max_sessions {
            self.logger.log(&format!("network: dropped UDP to {shown}: {} UDP sessions open", self.udp_limits.max_sessions));
            return;
        }
        let dest = self.host_addr(key.dst, key.dst_port);
        let any: SocketAddr = if dest.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
        let socket = UdpSocket::bind(any)
            .and_then(|s| s.set_nonblocking(true).map(|_| s))
            .and_then(|s| s.connect(dest).map(|_| s));
        match socket {
            Ok(socket) => {
                let _ = socket.send(payload);
                self.udp.insert(key, UdpSession { socket, last: StdInstant::now() });
            }
            Err(e) => self.logger.log(&format!("network: UDP to {shown} failed: {e}")),
        }
    }

    /// Datagrams from the host side back to the guest; idle sessions closed.
    fn service_udp(&mut self) {
        let mut buf = vec![0u8; 65536];
        let mut idle = Vec::new();
        let keys: Vec<Udp> = self.udp.keys().copied().collect();
        for key in keys {
            for _ in 0..UDP_READ_BUDGET {
                if self.device.tx_full() {
                    break;
                }
                let Some(s) = self.udp.get_mut(&key) else { break };
                match s.socket.recv(&mut buf) {
                    Ok(n) => {
                        s.last = StdInstant::now();
                        let from = SocketAddr::new(key.dst, key.dst_port);
                        let payload = buf[..n].to_vec();
                        self.to_guest_udp(from, key.src_port, &payload);
                    }
                    Err(_) => break, // WouldBlock, or an ICMP error for an earlier send
                }
            }
            if self.udp.get(&key).is_some_and(|s| s.last.elapsed() >= self.udp_limits.idle) {
                idle.push(key);
            }
        }
        for key in idle {
            self.udp.remove(&key);
        }
    }

    /// A guest DNS query (UDP port 53, whatever address it was sent to): the policy's
    /// DNS filter decides, allowed queries go to the upstream resolvers.
    fn on_dns_query(&mut self, key: Udp, payload: &[u8]) {
        if self.placeholder_in_query(key, payload) {
            return;
        }
        let outcome = self.dns_filter.inspect_query(payload, Protocol::Udp);
        if let Some(line) = &outcome.log {
            self.logger.log(&format!("network: DNS {line}"));
        }
        let from = SocketAddr::new(key.dst, 53);
        match outcome.decision {
            QueryDecision::Drop => {}
            QueryDecision::Reply(answer) => self.to_guest_udp(from, key.src_port, &answer),
            QueryDecision::Forward => {
                if self.dns_queries.len() >= dns_transport::MAX_IN_FLIGHT || self.nameservers.is_empty() {
                    if let Some(a) = dns_transport::empty_answer(payload, 2, false) {
                        self.to_guest_udp(from, key.src_port, &a);
                    }
                    return;
                }
                self.dns_queries.retain(|q| !(q.key == key && q.query.get(..2) == payload.get(..2)));
                match self.ask(0, payload) {
                    Some((server, socket)) => self.dns_queries.push(DnsQuery {
                        key,
                        query: payload.to_vec(),
                        socket,
                        server,
                        deadline: StdInstant::now() + self.dns_timeout(),
                    }),
                    None => {
                        if let Some(a) = dns_transport::empty_answer(payload, 2, false) {
                            self.to_guest_udp(from, key.src_port, &a);
                        }
                    }
                }
            }
        }
    }

    fn dns_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.dns.query_timeout_ms.max(1))
    }

    /// Sends `query` to the first nameserver from index `from` that takes it.
    fn ask(&self, from: usize, query: &[u8]) -> Option<(usize, UdpSocket)> {
        for (i, server) in self.nameservers.iter().enumerate().skip(from) {
            let bind: SocketAddr = if server.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
            let sent = UdpSocket::bind(bind)
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .and_then(|s| s.connect(server).map(|_| s))
                .and_then(|s| s.send(query).map(|_| s));
            if let Ok(s) = sent {
                return Some((i, s));
            }
        }
        None
    }

    /// Answers from upstream (filtered, then to the guest); timeouts move on to the next
    /// nameserver, and after the last one the guest gets SERVFAIL.
    fn service_dns(&mut self) {
        let mut buf = vec![0u8; 65536];
        let mut i = 0;
        while i < self.dns_queries.len() {
            let q = &self.dns_queries[i];
            let mut answer = None;
            while let Ok(n) = q.socket.recv(&mut buf) {
                if dns_transport::matches(&q.query, &buf[..n]) {
                    answer = Some(buf[..n].to_vec());
                    break;
                }
            }
            let from = SocketAddr::new(q.key.dst, 53);
            if let Some(answer) = answer {
                let q = self.dns_queries.swap_remove(i);
                let outcome = self.dns_filter.filter_response(&q.query, &answer, &mut self.pins, StdInstant::now());
                for line in &outcome.log {
                    self.logger.log(&format!("network: DNS {line}"));
                }
                if let Some(a) = dns_transport::fit_udp(&q.query, outcome.packet) {
                    self.to_guest_udp(from, q.key.src_port, &a);
                }
                continue;
            }
            if StdInstant::now() >= q.deadline {
                let next = q.server + 1;
                let query = q.query.clone();
                match self.ask(next, &query) {
                    Some((server, socket)) => {
                        let deadline = StdInstant::now() + self.dns_timeout();
                        let q = &mut self.dns_queries[i];
                        q.server = server;
                        q.socket = socket;
                        q.deadline = deadline;
                    }
                    None => {
                        let q = self.dns_queries.swap_remove(i);
                        self.logger.log("network: DNS query unanswered by every upstream resolver: SERVFAIL");
                        if let Some(a) = dns_transport::empty_answer(&q.query, 2, false) {
                            self.to_guest_udp(from, q.key.src_port, &a);
                        }
                        continue;
                    }
                }
            }
            i += 1;
        }
    }

    /// A guest SYN to port 53: a smoltcp socket of the stack's own takes it (bounded by
    /// `dns_tcp::MAX_CONNS`; beyond that, or when it cannot listen, a RST).
    fn accept_dns_tcp(&mut self, syn: Syn, frame: Vec<u8>) {
        if self.dns_tcp.len() >= dns_tcp::MAX_CONNS {
            self.logger.log(&format!(
                "network: refused DNS over TCP to {}: {} such connections open",
                SocketAddr::new(syn.dst, 53),
                dns_tcp::MAX_CONNS
            ));
            self.device.rx.push_back(frame);
            return;
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; dns_tcp::RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0; dns_tcp::TX_BUFFER]),
        );
        socket.set_timeout(Some(TCP_TIMEOUT));
        socket.set_nagle_enabled(false);
        if socket.listen(IpListenEndpoint { addr: Some(IpAddress::from(syn.dst)), port: 53 }).is_err() {
            self.device.rx.push_back(frame);
            return;
        }
        let handle = self.sockets.add(socket);
        // Alone, now, as in `accept`: the listening socket takes exactly this SYN.
        self.device.rx.push_front(frame);
        let now = self.now();
        self.iface.poll_ingress_single(now, &mut self.device, &mut self.sockets);
        if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            self.sockets.remove(handle);
            return;
        }
        self.dns_tcp.insert(syn, dns_tcp::Conn::new(handle));
    }

    /// Moves every DNS-over-TCP connection on (queries in, answers out, resolvers).
    fn service_dns_tcp(&mut self) {
        let timeout = self.dns_timeout();
        let logger = &mut self.logger;
        let mut log = |line: &str| logger.log(line);
        let (intercept, on_terminate) = (self.intercept.as_deref(), self.on_terminate.as_ref());
        let screen = |query: &[u8]| placeholder_screen(intercept, on_terminate, query);
        let mut ctx = dns_tcp::Ctx {
            screen: &screen,
            filter: &self.dns_filter,
            pins: &mut self.pins,
            nameservers: &self.nameservers,
            timeout,
            log: &mut log,
        };
        for conn in self.dns_tcp.values_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            conn.service(socket, &mut ctx);
        }
    }

    fn connect(&self, syn: &Syn) -> io::Result<socket2::Socket> {
        let dest = self.host_addr(syn.dst, syn.dst_port);
        let socket = socket2::Socket::new(socket2::Domain::for_address(dest), socket2::Type::STREAM.cloexec(), Some(socket2::Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        // Without an IPv6 route on the host this fails at once (ENETUNREACH): the guest
        // gets its RST right away, never a hang.
        match socket.connect(&dest.into()) {
            Ok(()) => Ok(socket),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
            Err(e) => Err(e),
        }
    }

    /// Moves finished host connects on: a socket for the guest, then its SYN.
    fn finish_connects(&mut self) {
        let mut done = Vec::new();
        for (key, p) in &self.pending {
            let failed = matches!(p.socket.take_error(), Ok(Some(_)) | Err(_));
            let connected = !failed && p.socket.peer_addr().is_ok();
            if failed || connected || p.started.elapsed() >= CONNECT_TIMEOUT {
                done.push((*key, connected));
            }
        }
        for (key, connected) in done {
            let Some(p) = self.pending.remove(&key) else { continue };
            if connected {
                self.accept(p);
            } else {
                // No socket listens: smoltcp refuses the SYN with a RST.
                self.device.rx.push_back(p.frame);
            }
        }
    }

    /// A smoltcp socket for a relayed connection (outbound or a published port's): the
    /// receive buffer is `tcp_buffer`, the send buffer as large as the stack's
    /// [`send_buffer::SendBudget`] allows; the second value is what it took from the budget.
    fn relay_socket(&mut self) -> (tcp::Socket<'static>, usize) {
        let n = self.cfg.tcp_buffer;
        let (tx, extra) = self.send_budget.grant(n);
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; n]), tcp::SocketBuffer::new(vec![0; tx]));
        socket.set_timeout(Some(TCP_TIMEOUT));
        socket.set_nagle_enabled(false);
        (socket, extra)
    }

    /// Creates the guest-side socket for a connected host socket and lets it take the SYN.
    fn accept(&mut self, p: Pending) {
        let (mut socket, tx_extra) = self.relay_socket();
        let endpoint = IpListenEndpoint { addr: Some(IpAddress::from(p.syn.dst)), port: p.syn.dst_port };
        if socket.listen(endpoint).is_err() {
            self.send_budget.release(tx_extra);
            self.device.rx.push_back(p.frame);
            return;
        }
        let handle = self.sockets.add(socket);
        // The SYN goes in alone, now: a listening socket must never catch another flow's
        // SYN to the same destination, so it stops listening before anything else runs.
        self.device.rx.push_front(p.frame);
        let now = self.now();
        self.iface.poll_ingress_single(now, &mut self.device, &mut self.sockets);
        if self.sockets.get::<tcp::Socket>(handle).state() == tcp::State::Listen {
            self.sockets.remove(handle);
            self.send_budget.release(tx_extra);
            return;
        }
        let host: TcpStream = p.socket.into();
        let tls = match (&self.intercept, p.intercept) {
            (Some(i), Some(pinned)) => {
                Some(Box::new(Intercepted { relay: i.relay(pinned), since: StdInstant::now(), bypass_out: Vec::new() }))
            }
            _ => None,
        };
        self.conns.insert(p.syn, Conn { handle, host, host_eof: false, host_write_shut: false, reap: false, tls, tx_extra });
    }

    /// Moves bytes both ways for every connection, as far as both sides take them.
    fn relay(&mut self) {
        let mut cuts = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            if conn.tls.is_some() {
                if let Some(cut) = relay_tls(conn, socket) {
                    let sni = conn.tls.as_ref().and_then(|t| t.relay.sni().map(str::to_string));
                    conn.tls = None;
                    cuts.push((*key, sni, cut));
                }
            } else {
                relay_one(conn, socket);
            }
        }
        for (key, sni, cut) in cuts {
            self.on_cut(&key, sni, cut);
        }
        self.relay_inbound();
    }

    /// Logs why an intercepted connection was cut (secrets by env name, never a value)
    /// and stops the sandbox for a `block_and_terminate` violation.
    fn on_cut(&mut self, syn: &Syn, sni: Option<String>, cut: Cut) {
        let dst = SocketAddr::new(syn.dst, syn.dst_port).to_string();
        let name = sni.unwrap_or_else(|| dst.clone());
        match cut {
            Cut::Refused(crate::secrets::Refusal::Violation(v)) => {
                let line = format!(
                    "network: secret {} placeholder headed to {} ({dst}) in the {}: connection cut",
                    v.env,
                    v.destination,
                    v.part.name()
                );
                if v.action.terminates() {
                    self.logger.log(&format!("{line}; stopping the sandbox (block_and_terminate)"));
                    if let Some(stop) = &self.on_terminate {
                        stop(&format!("secret {} placeholder headed to {}", v.env, v.destination));
                    }
                } else if v.action.logs() {
                    self.logger.log(&line);
                }
            }
            Cut::Refused(r) => self.logger.log(&format!("network: intercepted connection to {name} ({dst}) cut: {r}")),
            Cut::Upstream(m) => self.logger.log(&format!("network: TLS to {name} ({dst}) failed: {m}; the guest's connection was cut")),
            Cut::Guest(m) => self.logger.log(&format!("network: TLS from the guest to {name} ({dst}) failed: {m}")),
            Cut::Closed => {}
        }
    }

    /// A guest DNS query whose name carries a secret's placeholder: the name would leave
    /// the host in the clear. `true` when it was answered here (NXDOMAIN).
    fn placeholder_in_query(&mut self, key: Udp, payload: &[u8]) -> bool {
        let Some(line) = placeholder_screen(self.intercept.as_deref(), self.on_terminate.as_ref(), payload) else { return false };
        if let Some(line) = line {
            self.logger.log(&line);
        }
        if let Some(a) = dns_transport::empty_answer(payload, 3, false) {
            self.to_guest_udp(SocketAddr::new(key.dst, 53), key.src_port, &a);
        }
        true
    }

    /// Drops connections whose guest socket is closed (one iteration after it closed, so
    /// smoltcp could send its RST) and frees their host socket.
    fn reap(&mut self) {
        let mut gone = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            let state = self.sockets.get::<tcp::Socket>(conn.handle).state();
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                if conn.reap {
                    gone.push(*key);
                } else {
                    conn.reap = true;
                }
            }
        }
        for key in gone {
            if let Some(conn) = self.conns.remove(&key) {
                self.sockets.remove(conn.handle);
                self.send_budget.release(conn.tx_extra);
            }
        }
        let mut gone = Vec::new();
        for (key, conn) in self.dns_tcp.iter_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            if conn.idle() && socket.is_open() {
                socket.abort(); // an idle resolver connection: closed, as RFC 7766 allows
            }
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                if conn.reap {
                    gone.push(*key);
                } else {
                    conn.reap = true;
                }
            }
        }
        for key in gone {
            if let Some(conn) = self.dns_tcp.remove(&key) {
                self.sockets.remove(conn.handle);
            }
        }
        self.reap_inbound();
    }

    /// Encodes frames from smoltcp for the link and writes what the link takes.
    fn write_link(&mut self) -> io::Result<()> {
        loop {
            while self.link_out.len() - self.link_out_pos < LINK_OUT_LIMIT {
                let Some(f) = self.device.tx.pop_front() else { break };
                self.counters.rx_bytes.fetch_add(f.len() as u64, Ordering::Relaxed);
                frame::encode(&f, &mut self.link_out);
            }
            if self.link_out_pos == self.link_out.len() {
                self.link_out.clear();
                self.link_out_pos = 0;
                return Ok(());
            }
            match self.link.write(&self.link_out[self.link_out_pos..]) {
                Ok(n) => self.link_out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.link_out_pos > LINK_OUT_LIMIT {
            self.link_out.drain(..self.link_out_pos);
            self.link_out_pos = 0;
        }
        Ok(())
    }

    /// Sleeps in `poll(2)` until the link, a host socket or a smoltcp timer needs us.
    fn wait(&mut self) -> io::Result<()> {
        let mut fds = Vec::with_capacity(1 + self.pending.len() + self.conns.len());
        let mut link_events = 0;
        if !self.device.rx_full() && !self.device.tx_full() {
            link_events |= libc::POLLIN;
        }
        if self.link_out_pos < self.link_out.len() {
            link_events |= libc::POLLOUT;
        }
        // An fd with no events is left out (-1): poll reports hang-ups regardless of
        // `events`, which would spin the loop until the connection is reaped.
        let fd_for = |fd: i32, events: i16| if events == 0 { -1 } else { fd };
        fds.push(libc::pollfd { fd: fd_for(self.link.as_raw_fd(), link_events), events: link_events, revents: 0 });
        for p in self.pending.values() {
            fds.push(libc::pollfd { fd: p.socket.as_raw_fd(), events: libc::POLLOUT, revents: 0 });
        }
        for s in self.udp.values() {
            let events = if self.device.tx_full() { 0 } else { libc::POLLIN };
            fds.push(libc::pollfd { fd: fd_for(s.socket.as_raw_fd(), events), events, revents: 0 });
        }
        for q in &self.dns_queries {
            fds.push(libc::pollfd { fd: q.socket.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        for fd in self.pinger.fds() {
            let events = if self.device.tx_full() { 0 } else { libc::POLLIN };
            fds.push(libc::pollfd { fd: fd_for(fd, events), events, revents: 0 });
        }
        for conn in self.dns_tcp.values() {
            if let Some(up) = &conn.upstream {
                fds.push(libc::pollfd { fd: up.socket.as_raw_fd(), events: up.events(), revents: 0 });
            }
        }
        let mut handshakes = false;
        for conn in self.conns.values() {
            let socket = self.sockets.get::<tcp::Socket>(conn.handle);
            let mut events = 0;
            if let Some(t) = &conn.tls {
                handshakes |= t.relay.handshaking();
                if !conn.host_eof && t.relay.wants_upstream_read() {
                    events |= libc::POLLIN;
                }
                if !conn.host_write_shut && (t.relay.wants_upstream_write() || !t.bypass_out.is_empty()) {
                    events |= libc::POLLOUT;
                }
            } else {
                if !conn.host_eof && socket.can_send() {
                    events |= libc::POLLIN;
                }
                if !conn.host_write_shut && socket.can_recv() {
                    events |= libc::POLLOUT;
                }
            }
            fds.push(libc::pollfd { fd: fd_for(conn.host.as_raw_fd(), events), events, revents: 0 });
        }
        self.inbound_pollfds(&mut fds);
        let now = self.now();
        let mut sleep = match self.iface.poll_delay(now, &self.sockets) {
            Some(d) => Duration::from_micros(d.total_micros()).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        if !self.pending.is_empty() || !self.dns_queries.is_empty() || self.dns_tcp.values().any(|c| c.waiting()) {
            sleep = sleep.min(Duration::from_millis(100)); // connect and DNS timeouts
        }
        if !self.udp.is_empty() || self.inbound_has_peers() {
            sleep = sleep.min(Duration::from_secs(5)); // idle sessions
        }
        if handshakes {
            sleep = sleep.min(Duration::from_secs(1)); // TLS handshake deadlines
        }
        if !self.dns_tcp.is_empty() || !self.pinger.is_empty() {
            sleep = sleep.min(Duration::from_secs(1)); // idle DNS-over-TCP and ping sessions
        }
        if !self.device.rx.is_empty() && !self.device.tx_full() {
            sleep = Duration::ZERO; // smoltcp can take more frames now
        }
        let timeout = sleep.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// A secret's placeholder in a DNS query's name (over UDP or TCP): the name would leave
/// the host in the clear. `None` when the query may go on; `Some(log line)` when it is to
/// be answered NXDOMAIN (the line is `None` when the action does not log; a
/// `block_and_terminate` action has already asked for the sandbox to stop).
fn placeholder_screen(intercept: Option<&Interception>, on_terminate: Option<&TerminateFn>, payload: &[u8]) -> Option<Option<String>> {
    let i = intercept?;
    let name = simple_dns::Packet::parse(payload)
        .ok()
        .and_then(|p| p.questions.first().map(|q| q.qname.to_string().into_bytes()))
        .unwrap_or_else(|| payload.to_vec());
    let env = i.secrets().placeholder_in_name(&name)?;
    let secret = i.secrets().secrets.iter().find(|s| s.env == env)?;
    let action = i.secrets().action_for(secret);
    let shown: String = String::from_utf8_lossy(&name).chars().take(255).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect();
    if action.passes(&shown) {
        return None;
    }
    let line = format!("network: secret {env} placeholder in the DNS query name {shown}: answered NXDOMAIN");
    if action.terminates() {
        if let Some(stop) = on_terminate {
            stop(&format!("secret {env} placeholder in a DNS query"));
        }
        return Some(Some(format!("{line}; stopping the sandbox (block_and_terminate)")));
    }
    Some(action.logs().then_some(line))
}

/// Relays one connection as far as both sides take bytes right now.
pub(crate) fn relay_one(conn: &mut Conn, socket: &mut tcp::Socket) {
    // Guest → host: hand the host what smoltcp received; what the host does not take
    // stays in smoltcp's receive buffer and closes the guest's window.
    while !conn.host_write_shut && socket.can_recv() {
        let r = socket.recv(|buf| match conn.host.write(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(n)) if n > 0 => continue,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Ok(_)) => break,
            Ok(Err(_)) => {
                // The host side is gone: reset the guest's connection.
                socket.abort();
                conn.host_eof = true;
                conn.host_write_shut = true;
                return;
            }
            Err(_) => break,
        }
    }
    // The guest sent FIN and everything before it was delivered: pass the FIN on.
    let guest_fin = matches!(
        socket.state(),
        tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
    );
    if guest_fin && socket.recv_queue() == 0 && !conn.host_write_shut {
        let _ = conn.host.shutdown(Shutdown::Write);
        conn.host_write_shut = true;
    }
    // Host → guest: read straight into smoltcp's send buffer, only as much as fits.
    while !conn.host_eof && socket.can_send() {
        let r = socket.send(|buf| match conn.host.read(buf) {
            Ok(n) => (n, Ok(n)),
            Err(e) => (0, Err(e)),
        });
        match r {
            Ok(Ok(0)) => {
                conn.host_eof = true;
                socket.close(); // FIN after the queued bytes
            }
            Ok(Ok(_)) => continue,
            Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(_)) => {
                socket.abort();
                conn.host_eof = true;
                conn.host_write_shut = true;
            }
            Err(_) => break,
        }
    }
    // The guest reset or the socket died: nothing more will come from the host side.
    if socket.state() == tcp::State::Closed && !conn.host_eof {
        let _ = conn.host.shutdown(Shutdown::Both);
        conn.host_eof = true;
        conn.host_write_shut = true;
    }
}

/// Relays one intercepted connection as far as both sides and both TLS sessions take
/// bytes right now. Returns why it was cut (both sockets are then reset/shut).
fn relay_tls(conn: &mut Conn, socket: &mut tcp::Socket) -> Option<Cut> {
    let cut = match relay_tls_inner(conn, socket) {
        Ok(()) => return None,
        Err(c) => c,
    };
    socket.abort();
    let _ = conn.host.shutdown(Shutdown::Both);
    conn.host_eof = true;
    conn.host_write_shut = true;
    Some(cut)
}

fn relay_tls_inner(conn: &mut Conn, socket: &mut tcp::Socket) -> Result<(), Cut> {
    let Some(t) = conn.tls.as_mut() else { return Ok(()) };
    if t.relay.handshaking() && t.since.elapsed() >= TLS_HANDSHAKE_TIMEOUT {
        return Err(Cut::Guest(format!("the TLS handshakes did not finish within {} s", TLS_HANDSHAKE_TIMEOUT.as_secs())));
    }
    if socket.state() == tcp::State::Closed {
        return Err(Cut::Closed);
    }
    // A few rounds: a handshake step on one side often unblocks the other at once.
    for _ in 0..4 {
        let mut moved = false;
        // Guest ciphertext into the relay (what it does not take stays in smoltcp).
        while t.relay.wants_guest_read() && socket.can_recv() {
            let mut cut = None;
            let n = socket
                .recv(|buf| match t.relay.read_guest(buf) {
                    Ok(n) => (n, n),
                    Err(c) => {
                        cut = Some(c);
                        (0, 0)
                    }
                })
                .unwrap_or(0);
            if let Some(c) = cut {
                return Err(c);
            }
            t.relay.process()?;
            if n == 0 {
                break;
            }
            moved = true;
        }
        let guest_fin = matches!(
            socket.state(),
            tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
        );
        if guest_fin && socket.recv_queue() == 0 {
            t.relay.guest_eof()?;
        }
        t.relay.process()?;
        // A bypassed name: the ClientHello goes upstream as it came, then the plain relay.
        if t.relay.is_bypass() {
            t.bypass_out = t.relay.take_bypass();
        }
        if !t.bypass_out.is_empty() {
            match conn.host.write(&t.bypass_out) {
                Ok(n) => {
                    t.bypass_out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Cut::Upstream(e.to_string())),
            }
            if t.bypass_out.is_empty() {
                conn.tls = None;
                relay_one(conn, socket);
            }
            return Ok(());
        }
        // Relay → upstream socket.
        while t.relay.wants_upstream_write() {
            match t.relay.write_upstream(&mut conn.host) {
                Ok(0) => break,
                Ok(_) => moved = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Cut::Upstream(e.to_string())),
            }
        }
        if t.relay.upstream_finished() && !conn.host_write_shut {
            let _ = conn.host.shutdown(Shutdown::Write);
            conn.host_write_shut = true;
        }
        // Upstream socket → relay.
        while !conn.host_eof && t.relay.wants_upstream_read() {
            match t.relay.read_upstream(&mut conn.host) {
                Ok(0) => {
                    conn.host_eof = true;
                    t.relay.upstream_eof()?;
                }
                Ok(_) => moved = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Cut::Upstream(e.to_string())),
            }
            t.relay.process()?;
        }
        t.relay.process()?;
        // Relay → guest (as much as smoltcp's send buffer takes).
        while t.relay.wants_guest_write() && socket.can_send() {
            let n = socket.send(|buf| {
                let n = t.relay.write_guest(buf);
                (n, n)
            });
            match n {
                Ok(n) if n > 0 => moved = true,
                _ => break,
            }
        }
        if t.relay.guest_finished() && socket.may_send() {
            socket.close(); // FIN after the queued bytes
        }
        if !moved {
            break;
        }
    }
    Ok(())
}

/// How much the stack holds of what the guest controls (see [`crate::hostile`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Occupancy {
    pub rx_frames: usize,
    pub tx_frames: usize,
    pub link_out_bytes: usize,
    /// TCP connections, established or connecting on the host side.
    pub tcp: usize,
    pub max_connections: usize,
    pub dns_tcp: usize,
    pub ping_sessions: usize,
    pub fragments_held: usize,
    pub reassemblies: usize,
    pub udp_sessions: usize,
    pub dns_queries: usize,
    pub smoltcp_sockets: usize,
    /// Relayed TCP connections with a smoltcp socket (outbound and published ports).
    pub relayed: usize,
    /// Their send buffers' capacity, in all, and the base size of one (`tcp_buffer`).
    pub send_buffers: usize,
    pub tcp_buffer: usize,
    /// Bytes queued in those send buffers now (read from the host, not yet acknowledged
    /// by the guest).
    pub send_queued: usize,
    /// The send-buffer budget not granted now.
    pub send_budget_left: usize,
}

#[doc(hidden)]
impl Stack {
    /// One loop iteration without sleeping (tests, the frame fuzzer).
    pub fn step(&mut self) -> io::Result<bool> {
        self.turn()
    }

    /// Ages every outbound UDP session by `by`, as if that much time had passed without
    /// traffic (a fake clock for the idle-expiry tests: no test waits 60 s).
    pub fn age_udp_sessions(&mut self, by: Duration) {
        for s in self.udp.values_mut() {
            s.last = s.last.checked_sub(by).unwrap_or(s.last);
        }
        self.age_inbound_peers(by);
    }

    /// Host peers of published UDP ports tracked now.
    pub fn udp_peers(&self) -> usize {
        self.inbound_peer_count()
    }

    pub fn occupancy(&self) -> Occupancy {
        let relayed: Vec<&tcp::Socket> = self
            .conns
            .values()
            .map(|c| c.handle)
            .chain(self.inbound.handles())
            .map(|h| self.sockets.get::<tcp::Socket>(h))
            .collect();
        Occupancy {
            relayed: relayed.len(),
            send_buffers: relayed.iter().map(|s| s.send_capacity()).sum(),
            tcp_buffer: self.cfg.tcp_buffer,
            send_queued: relayed.iter().map(|s| s.send_queue()).sum(),
            send_budget_left: self.send_budget.left(),
            rx_frames: self.device.rx.len(),
            tx_frames: self.device.tx.len(),
            link_out_bytes: self.link_out.len(),
            tcp: self.pending.len() + self.conns.len(),
            dns_tcp: self.dns_tcp.len(),
            ping_sessions: self.pinger.len(),
            fragments_held: self.frags.held(),
            reassemblies: self.frags.len(),
            max_connections: self.cfg.max_connections as usize,
            udp_sessions: self.udp.len(),
            dns_queries: self.dns_queries.len(),
            smoltcp_sockets: self.sockets.iter().count(),
        }
    }
}

#[cfg(test)]
#[path = "stack_hostile_tests.rs"]
mod hostile_tests;

#[cfg(test)]
#[path = "stack_ipv6_tests.rs"]
mod ipv6_tests;
