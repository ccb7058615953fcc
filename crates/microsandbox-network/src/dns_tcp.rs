//! DNS over TCP on port 53 (RFC 7766): what a guest's resolver falls back to when a UDP
//! answer came back truncated (TC=1), and what `dig +tcp` uses. A guest TCP connection
//! to port 53 — whatever the address, exactly as for UDP — is terminated in the stack,
//! never relayed: each length-prefixed query goes through the same [`DnsFilter`] as a
//! UDP one (NXDOMAIN for denied names, refusal of malformed messages), allowed queries go
//! to the upstream resolvers over TCP (each asked in turn after `query_timeout_ms`, then
//! SERVFAIL), and answers go back through the filter (rebind protection, pins).
//!
//! Bounds (the guest controls the bytes): one query at a time per connection — pipelined
//! queries wait in smoltcp's receive buffer, whose window closes — a message of at most
//! [`MAX_MESSAGE`] bytes each way, [`MAX_CONNS`] connections per sandbox, and an idle
//! connection is closed after [`IDLE`]. A zero length or an answer that does not match
//! its query ends the connection (guest side) or moves on to the next resolver.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

use crate::dns::{DnsFilter, PinSet, QueryDecision};
use crate::dns_transport;
use crate::flow::Protocol;

/// Largest DNS message (the TCP length prefix's limit).
pub const MAX_MESSAGE: usize = 65_535;
/// DNS-over-TCP connections per sandbox; a SYN beyond them is refused (RST).
pub const MAX_CONNS: usize = 16;
/// A connection with no query in progress for this long is closed (RFC 7766 suggests
/// seconds, not minutes).
pub const IDLE: Duration = Duration::from_secs(10);
/// smoltcp buffer sizes of one connection: queries are small; answers are handed over
/// as the window allows.
pub const RX_BUFFER: usize = 4 * 1024;
pub const TX_BUFFER: usize = 16 * 1024;

/// Accumulates one length-prefixed message from a byte stream (pure, bounded).
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
}

/// What [`Framer::want`] says about the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed {
    /// This many more bytes are needed.
    Need(usize),
    /// A complete message (the framer is empty again).
    Message(Vec<u8>),
    /// A zero length: not a message; the connection ends.
    Invalid,
}

impl Framer {
    /// How many bytes to take next, or the completed message.
    pub fn want(&mut self) -> Framed {
        if self.buf.len() < 2 {
            return Framed::Need(2 - self.buf.len());
        }
        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
        if len == 0 {
            return Framed::Invalid;
        }
        if self.buf.len() < 2 + len {
            return Framed::Need(2 + len - self.buf.len());
        }
        let msg = self.buf[2..2 + len].to_vec();
        self.buf.clear();
        Framed::Message(msg)
    }

    /// Adds bytes; never more than [`Framer::want`] asked for.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        debug_assert!(self.buf.len() <= 2 + MAX_MESSAGE);
    }

    /// Bytes of a partial message held.
    pub fn held(&self) -> usize {
        self.buf.len()
    }
}

/// `msg` with its 2-byte length prefix (`None` beyond [`MAX_MESSAGE`]).
pub fn prefixed(msg: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(msg.len()).ok()?;
    let mut out = Vec::with_capacity(2 + msg.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    Some(out)
}

/// One query on its way through an upstream resolver over TCP.
pub struct Upstream {
    pub socket: TcpStream,
    /// Index of the resolver asked.
    pub server: usize,
    request: Vec<u8>,
    written: usize,
    answer: Framer,
    pub deadline: Instant,
}

impl Upstream {
    /// Starts a non-blocking connect to `server` and queues `query` for it.
    fn start(server: usize, addr: SocketAddr, query: &[u8], timeout: Duration) -> io::Result<Upstream> {
        let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
        let s = socket2::Socket::new(domain, socket2::Type::STREAM.cloexec(), Some(socket2::Protocol::TCP))?;
        s.set_nonblocking(true)?;
        match s.connect(&addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let request = prefixed(query).ok_or_else(|| io::Error::other("query too long"))?;
        Ok(Upstream { socket: s.into(), server, request, written: 0, answer: Framer::default(), deadline: Instant::now() + timeout })
    }

    /// Moves the exchange on. `Ok(Some(answer))` when complete, `Ok(None)` while under
    /// way, `Err` when this resolver failed (refused, reset, closed early, zero length).
    fn advance(&mut self) -> io::Result<Option<Vec<u8>>> {
        if let Some(e) = self.socket.take_error()? {
            return Err(e);
        }
        while self.written < self.request.len() {
            match self.socket.write(&self.request[self.written..]) {
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::NotConnected => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut buf = [0u8; 4096];
        loop {
            let want = match self.answer.want() {
                Framed::Message(m) => return Ok(Some(m)),
                Framed::Invalid => return Err(io::Error::new(io::ErrorKind::InvalidData, "zero-length DNS message")),
                Framed::Need(n) => n.min(buf.len()),
            };
            match self.socket.read(&mut buf[..want]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "resolver closed the connection")),
                Ok(n) => self.answer.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// What to poll for.
    pub fn events(&self) -> i16 {
        if self.written < self.request.len() {
            libc::POLLOUT
        } else {
            libc::POLLIN
        }
    }
}

/// The environment a connection works in (borrowed from the stack for one call).
pub struct Ctx<'a> {
    /// Secrets screening of the query's name (as for UDP): `Some(log line)` ⇒ NXDOMAIN.
    pub screen: &'a dyn Fn(&[u8]) -> Option<Option<String>>,
    pub filter: &'a DnsFilter,
    pub pins: &'a mut PinSet,
    pub nameservers: &'a [SocketAddr],
    pub timeout: Duration,
    pub log: &'a mut dyn FnMut(&str),
}

/// One guest DNS-over-TCP connection.
pub struct Conn {
    pub handle: SocketHandle,
    query: Framer,
    /// The query being answered (kept for matching and filtering the answer).
    current: Option<Vec<u8>>,
    pub upstream: Option<Upstream>,
    /// Prefixed answer bytes not yet in smoltcp's send buffer.
    out: Vec<u8>,
    out_pos: usize,
    last: Instant,
    /// Seen closed once: removed on the next iteration, after smoltcp sent any RST/FIN.
    pub reap: bool,
}

impl Conn {
    pub fn new(handle: SocketHandle) -> Conn {
        Conn { handle, query: Framer::default(), current: None, upstream: None, out: Vec::new(), out_pos: 0, last: Instant::now(), reap: false }
    }

    /// Moves this connection on as far as it can go now.
    pub fn service(&mut self, socket: &mut tcp::Socket, ctx: &mut Ctx<'_>) {
        loop {
            // Answer bytes first: the next query is read only once the last answer is out.
            while self.out_pos < self.out.len() && socket.can_send() {
                match socket.send_slice(&self.out[self.out_pos..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => self.out_pos += n,
                }
            }
            if self.out_pos < self.out.len() {
                return;
            }
            self.out.clear();
            self.out_pos = 0;
            if let Some(up) = &mut self.upstream {
                match up.advance() {
                    Ok(None) if Instant::now() < up.deadline => return,
                    Ok(Some(answer)) if self.current.as_deref().is_some_and(|q| dns_transport::matches(q, &answer)) => {
                        self.upstream = None;
                        let query = self.current.take().unwrap_or_default();
                        let outcome = ctx.filter.filter_response(&query, &answer, ctx.pins, Instant::now());
                        for line in &outcome.log {
                            (ctx.log)(&format!("network: DNS {line}"));
                        }
                        self.answer(&outcome.packet);
                        continue;
                    }
                    // Timed out, failed, or answered something else: the next resolver.
                    _ => {
                        let next = up.server + 1;
                        self.upstream = None;
                        self.ask(next, ctx);
                        continue;
                    }
                }
            }
            if self.current.is_some() {
                return; // cannot happen: a current query always has an upstream or an answer
            }
            // The next query from the guest.
            let msg = loop {
                match self.query.want() {
                    Framed::Message(m) => break Some(m),
                    Framed::Invalid => {
                        socket.abort();
                        return;
                    }
                    Framed::Need(n) => {
                        if !socket.can_recv() {
                            break None;
                        }
                        let mut chunk = [0u8; 1024];
                        let take = n.min(chunk.len());
                        match socket.recv_slice(&mut chunk[..take]) {
                            Ok(0) | Err(_) => break None,
                            Ok(got) => {
                                self.query.push(&chunk[..got]);
                                self.last = Instant::now();
                            }
                        }
                    }
                }
            };
            let Some(msg) = msg else {
                // The guest is done (FIN) and nothing is pending: close our side too.
                if !socket.may_recv() && self.query.held() == 0 && socket.state() == tcp::State::CloseWait {
                    socket.close();
                }
                return;
            };
            self.on_query(msg, ctx);
        }
    }

    fn on_query(&mut self, msg: Vec<u8>, ctx: &mut Ctx<'_>) {
        if let Some(line) = (ctx.screen)(&msg) {
            if let Some(line) = line {
                (ctx.log)(&line);
            }
            if let Some(a) = dns_transport::empty_answer(&msg, 3, false) {
                self.answer(&a);
            }
            return;
        }
        let outcome = ctx.filter.inspect_query(&msg, Protocol::Tcp);
        if let Some(line) = &outcome.log {
            (ctx.log)(&format!("network: DNS over TCP {line}"));
        }
        match outcome.decision {
            QueryDecision::Drop => {}
            QueryDecision::Reply(answer) => self.answer(&answer),
            QueryDecision::Forward => {
                self.current = Some(msg);
                self.ask(0, ctx);
            }
        }
    }

    /// Sends the current query to the first resolver from index `from` that takes a
    /// connect; none left ⇒ SERVFAIL.
    fn ask(&mut self, from: usize, ctx: &mut Ctx<'_>) {
        let Some(query) = self.current.clone() else { return };
        for (i, addr) in ctx.nameservers.iter().enumerate().skip(from) {
            if let Ok(up) = Upstream::start(i, *addr, &query, ctx.timeout) {
                self.upstream = Some(up);
                return;
            }
        }
        self.current = None;
        if ctx.nameservers.is_empty() || from > 0 {
            (ctx.log)("network: DNS query over TCP unanswered by every upstream resolver: SERVFAIL");
        }
        if let Some(a) = dns_transport::empty_answer(&query, 2, false) {
            self.answer(&a);
        }
    }

    fn answer(&mut self, msg: &[u8]) {
        if let Some(p) = prefixed(msg) {
            self.out = p;
            self.out_pos = 0;
        }
        self.last = Instant::now();
    }

    /// True when nothing is in progress and the guest has been silent for [`IDLE`].
    pub fn idle(&self) -> bool {
        self.upstream.is_none() && self.out.is_empty() && self.last.elapsed() >= IDLE
    }

    /// Whether a timer (resolver timeout) is running.
    pub fn waiting(&self) -> bool {
        self.upstream.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framer_takes_messages_split_anywhere() {
        let a = prefixed(b"hello").unwrap();
        let b = prefixed(&[7u8; 300]).unwrap();
        let wire = [a.clone(), b.clone()].concat();
        for split in 0..wire.len() {
            let mut f = Framer::default();
            let mut got = Vec::new();
            let mut rest: &[u8] = &wire;
            let mut first = true;
            loop {
                match f.want() {
                    Framed::Message(m) => got.push(m),
                    Framed::Invalid => panic!("invalid"),
                    Framed::Need(n) => {
                        let limit = if first { split.max(1) } else { usize::MAX };
                        let take = n.min(rest.len()).min(limit);
                        if take == 0 {
                            break;
                        }
                        f.push(&rest[..take]);
                        rest = &rest[take..];
                        first = false;
                    }
                }
            }
            assert_eq!(got, vec![b"hello".to_vec(), vec![7u8; 300]], "split {split}");
        }
    }

    #[test]
    fn zero_length_is_invalid_and_lengths_are_bounded() {
        let mut f = Framer::default();
        f.push(&[0, 0]);
        assert_eq!(f.want(), Framed::Invalid);
        let mut f = Framer::default();
        f.push(&[0xff, 0xff]);
        assert_eq!(f.want(), Framed::Need(MAX_MESSAGE));
        assert!(prefixed(&vec![0u8; MAX_MESSAGE + 1]).is_none());
        assert_eq!(prefixed(&[1, 2]).unwrap(), vec![0, 2, 1, 2]);
    }
}
