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
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream};
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
use crate::frame::{self, Decoded, Decoder};
use crate::guard::{self, Identity, Ingress, Syn};

/// How long a host-side connect may take before the guest gets a RST.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose peer stops acknowledging for this long is aborted (smoltcp timer).
const TCP_TIMEOUT: SmolDuration = SmolDuration::from_secs(60);
/// Bytes read from the link per loop iteration at most (fairness with host sockets).
const LINK_READ_BUDGET: usize = 1 << 20;
/// Encoded frames waiting for the link; beyond this the stack stops producing frames.
const LINK_OUT_LIMIT: usize = 1 << 20;
/// Longest sleep of the loop (smoltcp timers usually ask for less).
const MAX_SLEEP: Duration = Duration::from_millis(500);

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
}

/// One relayed TCP connection.
struct Conn {
    handle: SocketHandle,
    host: TcpStream,
    /// The host side sent FIN (or failed): nothing more to read from it.
    host_eof: bool,
    /// The guest's FIN was passed on to the host.
    host_write_shut: bool,
    /// Seen closed once: removed on the next iteration, after smoltcp sent any RST.
    reap: bool,
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
    counters: Arc<Counters>,
    epoch: StdInstant,
}

impl Stack {
    /// A stack for the NIC whose frames arrive on `link` (QEMU's end of the stream
    /// socketpair is the other one).
    pub fn new(link: UnixStream, cfg: NetworkConfig, counters: Arc<Counters>) -> io::Result<Stack> {
        link.set_nonblocking(true)?;
        let mut device = QueueDevice::new(cfg.max_frame());
        let epoch = StdInstant::now();
        let mut iface = Interface::new(
            Config::new(HardwareAddress::Ethernet(EthernetAddress(cfg.gateway_mac))),
            &mut device,
            Instant::from_millis(0),
        );
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(cfg.gateway_ip), cfg.prefix));
        });
        // any_ip + a default route through our own address: smoltcp accepts segments for
        // every destination, so a socket can stand in for any far end.
        iface.set_any_ip(true);
        iface
            .routes_mut()
            .add_default_ipv4_route(cfg.gateway_ip)
            .map_err(|_| io::Error::other("smoltcp route table full"))?;
        Ok(Stack {
            me: Identity { guest_mac: cfg.guest_mac, guest_ip: cfg.guest_ip },
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
            counters,
            epoch,
        })
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs until the link closes (QEMU exited) or fails.
    pub fn run(mut self) -> io::Result<()> {
        loop {
            if !self.read_link()? {
                return Ok(());
            }
            self.finish_connects();
            let now = self.now();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            self.relay();
            self.iface.poll(now, &mut self.device, &mut self.sockets);
            self.write_link()?;
            self.reap();
            self.wait()?;
        }
    }

    /// Reads what the link has (bounded per iteration and by the rx queue). `false` at EOF.
    fn read_link(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 64 * 1024];
        let mut budget = LINK_READ_BUDGET;
        while budget > 0 && !self.device.rx_full() {
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
        match guard::inspect(&frame, &self.me) {
            Ingress::Stack => self.device.rx.push_back(frame),
            Ingress::Syn(syn) => self.on_syn(syn, frame),
            Ingress::Drop(_) => {
                self.counters.dropped_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A new connection attempt: start the host-side connect, hold the SYN.
    fn on_syn(&mut self, syn: Syn, frame: Vec<u8>) {
        if self.conns.contains_key(&syn) {
            // A retransmitted SYN of a known connection: smoltcp's socket answers it.
            self.device.rx.push_back(frame);
            return;
        }
        if self.pending.contains_key(&syn) {
            return; // a retransmission while the host connect is under way
        }
        if self.conns.len() + self.pending.len() >= self.cfg.max_connections as usize {
            // No socket will take it: smoltcp answers with a RST.
            self.device.rx.push_back(frame);
            return;
        }
        match self.connect(&syn) {
            Ok(socket) => {
                self.pending.insert(syn, Pending { syn, frame, socket, started: StdInstant::now() });
            }
            Err(_) => self.device.rx.push_back(frame),
        }
    }

    /// Where a guest destination is on the host side: the gateway is host loopback.
    fn host_addr(&self, syn: &Syn) -> SocketAddrV4 {
        let ip = if syn.dst == self.cfg.gateway_ip { Ipv4Addr::LOCALHOST } else { syn.dst };
        SocketAddrV4::new(ip, syn.dst_port)
    }

    fn connect(&self, syn: &Syn) -> io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM.cloexec(), Some(socket2::Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&self.host_addr(syn).into()) {
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

    /// Creates the guest-side socket for a connected host socket and lets it take the SYN.
    fn accept(&mut self, p: Pending) {
        let n = self.cfg.tcp_buffer;
        let mut socket = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; n]), tcp::SocketBuffer::new(vec![0; n]));
        socket.set_timeout(Some(TCP_TIMEOUT));
        socket.set_nagle_enabled(false);
        let endpoint = IpListenEndpoint { addr: Some(IpAddress::Ipv4(p.syn.dst)), port: p.syn.dst_port };
        if socket.listen(endpoint).is_err() {
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
            return;
        }
        let host: TcpStream = p.socket.into();
        self.conns.insert(p.syn, Conn { handle, host, host_eof: false, host_write_shut: false, reap: false });
    }

    /// Moves bytes both ways for every connection, as far as both sides take them.
    fn relay(&mut self) {
        for conn in self.conns.values_mut() {
            let socket = self.sockets.get_mut::<tcp::Socket>(conn.handle);
            relay_one(conn, socket);
        }
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
            }
        }
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
        if !self.device.rx_full() {
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
        for conn in self.conns.values() {
            let socket = self.sockets.get::<tcp::Socket>(conn.handle);
            let mut events = 0;
            if !conn.host_eof && socket.can_send() {
                events |= libc::POLLIN;
            }
            if !conn.host_write_shut && socket.can_recv() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd { fd: fd_for(conn.host.as_raw_fd(), events), events, revents: 0 });
        }
        let now = self.now();
        let mut sleep = match self.iface.poll_delay(now, &self.sockets) {
            Some(d) => Duration::from_micros(d.total_micros()).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        if !self.pending.is_empty() {
            sleep = sleep.min(Duration::from_millis(100)); // connect timeouts
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

/// Relays one connection as far as both sides take bytes right now.
fn relay_one(conn: &mut Conn, socket: &mut tcp::Socket) {
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
