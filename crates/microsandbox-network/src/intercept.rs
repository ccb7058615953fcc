//! TLS interception on the stack's TCP relay: the sans-I/O state of one intercepted
//! connection ([`TlsRelay`]) and the per-sandbox settings that decide which connections
//! are intercepted ([`Interception`]).
//!
//! The stack (see [`crate::stack`]) owns the sockets and calls in with bytes; nothing
//! here blocks, spawns or keeps a socket, so an intercepted connection costs no thread
//! and follows the relay's poll-driven model. Per connection:
//!
//! 1. *Hello*: the guest's ClientHello is read with rustls' [`Acceptor`] (the raw bytes
//!    are kept, bounded, so a name in `tls.bypass` can still be passed through
//!    untouched). No SNI, or an SNI that is no DNS name, cuts the connection.
//! 2. *Upstream*: a verified rustls client connection to the original destination
//!    address, with the SNI as server name (`verify_upstream`, `upstream_ca_cert`, host
//!    roots). Only when that handshake succeeds does the guest get a leaf certificate
//!    for its SNI — an untrusted upstream never looks trusted to the guest.
//! 3. *Relay*: guest plaintext goes through the secrets engine
//!    ([`Substituter`]: substitution where SNI = pinned DNS name = `Host` allow it, a
//!    violation anywhere else) to the upstream; upstream plaintext goes back unchanged.
//!
//! Bounds: every buffer here is capped ([`PLAIN_LIMIT`] per direction, rustls' own
//! buffer limits, the ClientHello record [`MAX_HELLO`]); a side that does not take bytes
//! stops the other side's reads, so back-pressure reaches the guest's TCP window or the
//! upstream socket. The only exception is a fixed-length body the engine buffers for
//! substitution (≤ 16 MiB, [`crate::secrets::stream::MAX_SUBST_BODY`]).

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::server::{Accepted, Acceptor};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use crate::secrets::config::normalize_host;
use crate::secrets::{ConnIdentity, HostPattern, Refusal, SecretSet, Substituter};
use crate::tls::{self, InterceptCa, LeafCache, TlsConfig, TlsError};

/// Plaintext held per direction before the reading side is paused.
pub const PLAIN_LIMIT: usize = 64 * 1024;
/// Most bytes of the guest's first TLS flight kept before a ClientHello is complete.
pub const MAX_HELLO: usize = 64 * 1024;
/// rustls' outgoing buffer limit per connection (plaintext waiting + TLS records).
const RUSTLS_LIMIT: usize = 64 * 1024;

/// The sandbox's interception settings and TLS material (all in memory).
pub struct Interception {
    secrets: Arc<SecretSet>,
    tls: TlsConfig,
    bypass: Vec<HostPattern>,
    ca: Arc<InterceptCa>,
    leaves: Arc<LeafCache>,
    server: Arc<ServerConfig>,
    upstream: Arc<ClientConfig>,
}

impl std::fmt::Debug for Interception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let envs: Vec<&str> = self.secrets.secrets.iter().map(|s| s.env.as_str()).collect();
        f.debug_struct("Interception").field("secrets", &envs).field("tls", &self.tls).finish_non_exhaustive()
    }
}

impl Interception {
    /// Builds the rustls configurations; `host_roots` adds the host's trust store to the
    /// upstream verifier (besides `tls.upstream_ca_certs`).
    pub fn new(secrets: SecretSet, tls: TlsConfig, ca: InterceptCa, host_roots: bool) -> Result<Interception, TlsError> {
        let bypass = tls
            .bypass
            .iter()
            .enumerate()
            .map(|(i, b)| HostPattern::parse(b).map_err(|p| TlsError::new(format!("tls.bypass[{i}] {p}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let ca = Arc::new(ca);
        let leaves = Arc::new(LeafCache::new(Arc::clone(&ca), tls::leaf::DEFAULT_CAPACITY));
        let server = tls::server_config(Arc::clone(&leaves))?;
        let upstream = tls::upstream_config(tls.verify_upstream, &tls.upstream_ca_certs, host_roots)?;
        Ok(Interception { secrets: Arc::new(secrets), tls, bypass, ca, leaves, server, upstream })
    }

    pub fn secrets(&self) -> &SecretSet {
        &self.secrets
    }

    pub fn config(&self) -> &TlsConfig {
        &self.tls
    }

    pub fn ca(&self) -> &InterceptCa {
        &self.ca
    }

    pub fn leaves(&self) -> &LeafCache {
        &self.leaves
    }

    fn bypassed(&self, name: &str) -> bool {
        let name = normalize_host(name);
        self.bypass.iter().any(|b| b.matches(&name))
    }

    /// Whether a TCP connection to `port`, whose destination address this sandbox
    /// resolved for `names`, is intercepted: the port is intercepted, not every name is
    /// in `tls.bypass`, and a name carries a secret (any destination with
    /// `intercept_all`). Several names can share an address, so the final word on
    /// `bypass` is the SNI's (see [`TlsRelay`]).
    pub fn intercepts<'a>(&self, port: u16, names: impl IntoIterator<Item = &'a str>) -> bool {
        if !self.tls.intercepted_ports.contains(&port) {
            return false;
        }
        let names: Vec<&str> = names.into_iter().collect();
        if !names.is_empty() && names.iter().all(|n| self.bypassed(n)) {
            return false;
        }
        self.tls.intercept_all || names.iter().any(|n| self.secrets.carries(&normalize_host(n)))
    }

    /// Whether a UDP datagram to `port` of such a destination is dropped (QUIC would
    /// carry the request past the interception).
    pub fn blocks_udp<'a>(&self, port: u16, names: impl IntoIterator<Item = &'a str>) -> bool {
        self.tls.block_quic && self.intercepts(port, names)
    }

    /// The state of a new intercepted connection to a destination pinned for `pinned`.
    pub fn relay(self: &Arc<Self>, pinned: Vec<String>) -> TlsRelay {
        TlsRelay {
            shared: Arc::clone(self),
            pinned,
            phase: Phase::Hello { acceptor: Box::default(), seen: Vec::new() },
            sni: None,
        }
    }
}

/// Why an intercepted connection is cut. Messages never carry a secret value.
#[derive(Debug)]
pub enum Cut {
    /// The secrets engine refused the stream (a violation, or a request it cannot read).
    Refused(Refusal),
    /// The TLS exchange with the upstream failed (verification, handshake, alert).
    Upstream(String),
    /// The guest's side of TLS failed or was not TLS (a message for the log).
    Guest(String),
    /// The guest closed or reset before anything could be relayed.
    Closed,
}

enum Phase {
    /// Reading the ClientHello; `seen` holds the raw bytes read so far.
    Hello { acceptor: Box<Acceptor>, seen: Vec<u8> },
    /// The upstream handshake runs; the guest waits for its ServerHello.
    Upstream { accepted: Box<Accepted>, client: Box<ClientConnection>, sub: Box<Substituter> },
    /// Both sides are up.
    Relay(Box<Both>),
    /// The SNI is in `tls.bypass`: the ClientHello bytes go upstream as they were and the
    /// stack relays the rest untouched.
    Bypass { hello: Vec<u8> },
    Dead,
}

struct Both {
    server: ServerConnection,
    client: ClientConnection,
    sub: Substituter,
    /// Substituted plaintext not yet taken by the upstream connection.
    g2u: Vec<u8>,
    /// Upstream plaintext not yet taken by the guest connection.
    u2g: Vec<u8>,
    /// The guest's TCP FIN arrived (after all its bytes).
    guest_fin: bool,
    /// The guest's plaintext ended (close_notify or TCP FIN).
    guest_done: bool,
    /// The upstream's plaintext ended.
    upstream_done: bool,
    close_sent_up: bool,
    close_sent_guest: bool,
}

/// One intercepted connection (see the module documentation).
pub struct TlsRelay {
    shared: Arc<Interception>,
    /// Names the destination address was pinned for (at SYN time).
    pinned: Vec<String>,
    phase: Phase,
    sni: Option<String>,
}

impl std::fmt::Debug for TlsRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsRelay").field("sni", &self.sni).finish_non_exhaustive()
    }
}

fn is_eof(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::UnexpectedEof
}

impl TlsRelay {
    /// The guest's SNI, once its ClientHello was read.
    pub fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// Still in the handshake (the stack bounds this phase in time).
    pub fn handshaking(&self) -> bool {
        matches!(self.phase, Phase::Hello { .. } | Phase::Upstream { .. })
    }

    /// The SNI matched `tls.bypass`: take [`TlsRelay::take_bypass`] and relay plainly.
    pub fn is_bypass(&self) -> bool {
        matches!(self.phase, Phase::Bypass { .. })
    }

    /// The ClientHello bytes to send upstream as they were (bypass only, once).
    pub fn take_bypass(&mut self) -> Vec<u8> {
        match std::mem::replace(&mut self.phase, Phase::Dead) {
            Phase::Bypass { hello } => hello,
            other => {
                self.phase = other;
                Vec::new()
            }
        }
    }

    /// Whether ciphertext from the guest is wanted now.
    pub fn wants_guest_read(&self) -> bool {
        match &self.phase {
            Phase::Hello { seen, .. } => seen.len() < MAX_HELLO,
            Phase::Relay(b) => !b.guest_done && b.g2u.len() < PLAIN_LIMIT && b.server.wants_read(),
            _ => false,
        }
    }

    /// Reads guest ciphertext from `data`; returns how many bytes were taken.
    pub fn read_guest(&mut self, data: &[u8]) -> Result<usize, Cut> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut r = data;
        let n = match &mut self.phase {
            Phase::Hello { acceptor, seen } => {
                let room = MAX_HELLO - seen.len();
                let mut limited = &data[..data.len().min(room)];
                let n = acceptor.read_tls(&mut limited).map_err(|e| Cut::Guest(format!("reading the ClientHello: {e}")))?;
                seen.extend_from_slice(&data[..n]);
                n
            }
            Phase::Relay(b) => match b.server.read_tls(&mut r) {
                Ok(n) => n,
                // rustls' plaintext buffer is full: nothing taken, the caller retries later.
                Err(e) if e.kind() == io::ErrorKind::Other => 0,
                Err(e) => return Err(Cut::Guest(e.to_string())),
            },
            _ => 0,
        };
        Ok(n)
    }

    /// The guest closed its sending side (TCP FIN).
    pub fn guest_eof(&mut self) -> Result<(), Cut> {
        match &mut self.phase {
            // rustls never saw the EOF (it reads from the stack's buffer): the plaintext
            // it still holds is read first, then the engine is told the stream ended.
            Phase::Relay(b) => {
                b.guest_fin = true;
                Ok(())
            }
            Phase::Bypass { .. } | Phase::Dead => Ok(()),
            _ => Err(Cut::Closed),
        }
    }

    /// Whether ciphertext for the guest is waiting.
    pub fn wants_guest_write(&self) -> bool {
        match &self.phase {
            Phase::Relay(b) => b.server.wants_write(),
            _ => false,
        }
    }

    /// Writes ciphertext for the guest into `buf`; returns how many bytes.
    pub fn write_guest(&mut self, buf: &mut [u8]) -> usize {
        match &mut self.phase {
            Phase::Relay(b) => {
                let mut w: &mut [u8] = buf;
                b.server.write_tls(&mut w).unwrap_or(0)
            }
            _ => 0,
        }
    }

    /// All plaintext toward the guest was sent and the upstream's side ended: the guest
    /// connection can be closed (FIN).
    pub fn guest_finished(&self) -> bool {
        match &self.phase {
            Phase::Relay(b) => b.close_sent_guest && !b.server.wants_write(),
            _ => false,
        }
    }

    /// Whether ciphertext from the upstream is wanted now.
    pub fn wants_upstream_read(&self) -> bool {
        match &self.phase {
            Phase::Upstream { client, .. } => client.wants_read(),
            Phase::Relay(b) => !b.upstream_done && b.u2g.len() < PLAIN_LIMIT && b.client.wants_read(),
            _ => false,
        }
    }

    /// Reads upstream ciphertext from `r` (a non-blocking socket). `Ok(0)` is EOF.
    pub fn read_upstream(&mut self, r: &mut dyn Read) -> io::Result<usize> {
        let client = match &mut self.phase {
            Phase::Upstream { client, .. } => &mut **client,
            Phase::Relay(b) => &mut b.client,
            _ => return Err(io::ErrorKind::WouldBlock.into()),
        };
        match client.read_tls(r) {
            Err(e) if e.kind() == io::ErrorKind::Other => Err(io::ErrorKind::WouldBlock.into()),
            other => other,
        }
    }

    /// The upstream closed its side (TCP EOF, after [`TlsRelay::read_upstream`] returned
    /// 0: rustls saw it too and reports the end once its plaintext is read).
    pub fn upstream_eof(&mut self) -> Result<(), Cut> {
        match &mut self.phase {
            Phase::Upstream { .. } => Err(Cut::Upstream("the server closed the connection during the TLS handshake".into())),
            _ => Ok(()),
        }
    }

    /// Whether ciphertext for the upstream is waiting.
    pub fn wants_upstream_write(&self) -> bool {
        match &self.phase {
            Phase::Upstream { client, .. } => client.wants_write(),
            Phase::Relay(b) => b.client.wants_write(),
            _ => false,
        }
    }

    /// Writes upstream ciphertext to `w` (a non-blocking socket).
    pub fn write_upstream(&mut self, w: &mut dyn Write) -> io::Result<usize> {
        match &mut self.phase {
            Phase::Upstream { client, .. } => client.write_tls(w),
            Phase::Relay(b) => b.client.write_tls(w),
            _ => Ok(0),
        }
    }

    /// Everything for the upstream was sent after the guest's side ended: the host
    /// socket's write side can be shut.
    pub fn upstream_finished(&self) -> bool {
        match &self.phase {
            Phase::Relay(b) => b.close_sent_up && !b.client.wants_write(),
            _ => false,
        }
    }

    /// Moves the connection on after reads: completes handshakes, runs the secrets
    /// engine, shifts plaintext between the two TLS connections as far as they take it.
    pub fn process(&mut self) -> Result<(), Cut> {
        let r = self.step();
        if r.is_err() {
            self.phase = Phase::Dead;
        }
        r
    }

    fn step(&mut self) -> Result<(), Cut> {
        if let Phase::Hello { acceptor, seen } = &mut self.phase {
            let accepted = match acceptor.accept() {
                Ok(None) if seen.len() >= MAX_HELLO => return Err(Cut::Guest("ClientHello over 64 KiB".into())),
                Ok(None) => return Ok(()),
                Ok(Some(a)) => a,
                Err((e, _)) => return Err(Cut::Guest(format!("not a TLS ClientHello ({e})"))),
            };
            let Some(sni) = accepted.client_hello().server_name().map(str::to_string) else {
                return Err(Cut::Guest("the ClientHello names no server (SNI); intercepted connections need one".into()));
            };
            let sni = normalize_host(&sni);
            self.sni = Some(sni.clone());
            if self.shared.bypassed(&sni) {
                let hello = std::mem::take(seen);
                self.phase = Phase::Bypass { hello };
                return Ok(());
            }
            // Refuses a placeholder in the SNI itself (it leaves in the clear).
            let pinned = self.pinned.iter().any(|p| normalize_host(p) == sni).then(|| sni.clone());
            let id = ConnIdentity { tls: true, sni: Some(sni.clone()), pinned_name: pinned };
            let sub = Substituter::new(Arc::clone(&self.shared.secrets), id).map_err(Cut::Refused)?;
            if !tls::leaf::valid_sni(&sni) {
                return Err(Cut::Guest(format!("SNI {sni:?} is not a DNS name a certificate can be issued for")));
            }
            let name = ServerName::try_from(sni.clone()).map_err(|_| Cut::Guest(format!("SNI {sni:?} is not a server name")))?;
            let mut client = ClientConnection::new(Arc::clone(&self.shared.upstream), name)
                .map_err(|e| Cut::Upstream(format!("TLS client setup: {e}")))?;
            client.set_buffer_limit(Some(RUSTLS_LIMIT));
            self.phase = Phase::Upstream { accepted: Box::new(accepted), client: Box::new(client), sub: Box::new(sub) };
        }
        if let Phase::Upstream { client, .. } = &mut self.phase {
            client.process_new_packets().map_err(|e| Cut::Upstream(e.to_string()))?;
            if client.is_handshaking() {
                return Ok(());
            }
            let Phase::Upstream { accepted, client, sub } = std::mem::replace(&mut self.phase, Phase::Dead) else {
                unreachable!()
            };
            let mut server = accepted
                .into_connection(Arc::clone(&self.shared.server))
                .map_err(|(e, _)| Cut::Guest(format!("TLS toward the guest: {e}")))?;
            server.set_buffer_limit(Some(RUSTLS_LIMIT));
            self.phase = Phase::Relay(Box::new(Both {
                server,
                client: *client,
                sub: *sub,
                g2u: Vec::new(),
                u2g: Vec::new(),
                guest_fin: false,
                guest_done: false,
                upstream_done: false,
                close_sent_up: false,
                close_sent_guest: false,
            }));
        }
        if let Phase::Relay(b) = &mut self.phase {
            b.pump()?;
        }
        Ok(())
    }
}

impl Both {
    fn pump(&mut self) -> Result<(), Cut> {
        let mut buf = [0u8; 16 * 1024];
        // Guest → upstream, through the secrets engine.
        self.server.process_new_packets().map_err(|e| Cut::Guest(e.to_string()))?;
        while !self.guest_done && self.g2u.len() < PLAIN_LIMIT {
            match self.server.reader().read(&mut buf) {
                Ok(0) => {
                    self.guest_done = true;
                    self.sub.finish(&mut self.g2u).map_err(Cut::Refused)?;
                }
                Ok(n) => self.sub.feed(&buf[..n], &mut self.g2u).map_err(Cut::Refused)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.guest_fin {
                        self.guest_done = true;
                        self.sub.finish(&mut self.g2u).map_err(Cut::Refused)?;
                    }
                    break;
                }
                Err(e) if is_eof(&e) => {
                    self.guest_done = true;
                    self.sub.finish(&mut self.g2u).map_err(Cut::Refused)?;
                }
                Err(e) => return Err(Cut::Guest(e.to_string())),
            }
        }
        while !self.g2u.is_empty() {
            let n = self.client.writer().write(&self.g2u).map_err(|e| Cut::Upstream(e.to_string()))?;
            if n == 0 {
                break;
            }
            self.g2u.drain(..n);
        }
        if self.guest_done && self.g2u.is_empty() && !self.close_sent_up {
            self.client.send_close_notify();
            self.close_sent_up = true;
        }
        // Upstream → guest, unchanged.
        self.client.process_new_packets().map_err(|e| Cut::Upstream(e.to_string()))?;
        while !self.upstream_done && self.u2g.len() < PLAIN_LIMIT {
            match self.client.reader().read(&mut buf) {
                Ok(0) => self.upstream_done = true,
                Ok(n) => self.u2g.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if is_eof(&e) => self.upstream_done = true,
                Err(e) => return Err(Cut::Upstream(e.to_string())),
            }
        }
        while !self.u2g.is_empty() {
            let n = self.server.writer().write(&self.u2g).map_err(|e| Cut::Guest(e.to_string()))?;
            if n == 0 {
                break;
            }
            self.u2g.drain(..n);
        }
        if self.upstream_done && self.u2g.is_empty() && !self.close_sent_guest {
            self.server.send_close_notify();
            self.close_sent_guest = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
