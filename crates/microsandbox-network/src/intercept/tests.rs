//! A guest rustls client ↔ [`TlsRelay`] ↔ an upstream rustls server, all in memory: the
//! bytes are shuttled by hand in small pieces, as the stack's buffers would hand them.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

use super::*;
use crate::secrets::{Refusal, SecretSet};

const VALUE: &str = "sk-real-VALUE-123";

fn set() -> SecretSet {
    let wire = format!(r#"{{"secrets":[{{"env":"API_KEY","value":"{VALUE}","hosts":["api.test"]}}]}}"#);
    SecretSet::from_wire(wire.as_bytes()).unwrap()
}

/// The "internet" server: a certificate for any name from its own CA.
struct Upstream {
    ca_pem: String,
    config: Arc<rustls::ServerConfig>,
}

fn upstream() -> Upstream {
    let ca = InterceptCa::generate("upstream").unwrap();
    let ca_pem = ca.cert_pem().to_string();
    let leaves = Arc::new(LeafCache::new(Arc::new(ca), 8));
    Upstream { config: tls::server_config(leaves).unwrap(), ca_pem }
}

fn interception(up: &Upstream, tls_cfg: TlsConfig) -> Arc<Interception> {
    let cfg = TlsConfig { upstream_ca_certs: vec![up.ca_pem.clone()], ..tls_cfg };
    Arc::new(Interception::new(set(), cfg, InterceptCa::generate("sandbox").unwrap(), false).unwrap())
}

fn guest(i: &Interception, sni: &str) -> ClientConnection {
    let client = tls::upstream_config(true, &[i.ca().cert_pem().to_string()], false).unwrap();
    ClientConnection::new(client, ServerName::try_from(sni.to_string()).unwrap()).unwrap()
}

/// Moves bytes until nothing moves; pieces of at most `piece` bytes.
struct Wire {
    guest: ClientConnection,
    relay: TlsRelay,
    server: Option<ServerConnection>,
    /// Raw bytes the relay sent upstream (before a server existed, or for bypass).
    upstream_raw: Vec<u8>,
    /// Plaintext the upstream server received.
    received: Vec<u8>,
    guest_got: Vec<u8>,
    piece: usize,
}

impl Wire {
    fn new(i: &Arc<Interception>, up: &Upstream, sni: &str, pinned: &[&str], piece: usize) -> Wire {
        Wire {
            guest: guest(i, sni),
            relay: i.relay(pinned.iter().map(|s| s.to_string()).collect()),
            server: Some(ServerConnection::new(Arc::clone(&up.config)).unwrap()),
            upstream_raw: Vec::new(),
            received: Vec::new(),
            guest_got: Vec::new(),
            piece,
        }
    }

    /// One round of every transfer; `Ok(true)` when something moved.
    fn round(&mut self) -> Result<bool, Cut> {
        let mut moved = false;
        // guest → relay
        let mut out = Vec::new();
        while self.guest.wants_write() {
            self.guest.write_tls(&mut out).unwrap();
        }
        let mut data = &out[..];
        while !data.is_empty() {
            let take = data.len().min(self.piece);
            assert!(self.relay.wants_guest_read() || self.relay.is_bypass(), "relay stalled with guest bytes");
            if self.relay.is_bypass() {
                break;
            }
            let n = self.relay.read_guest(&data[..take])?;
            moved |= n > 0;
            data = &data[n..];
            self.relay.process()?;
        }
        assert!(data.is_empty() || self.relay.is_bypass());
        self.relay.process()?;
        if self.relay.is_bypass() {
            self.upstream_raw.extend(self.relay.take_bypass());
            return Ok(false);
        }
        // relay → upstream
        let mut up = Vec::new();
        while self.relay.wants_upstream_write() {
            self.relay.write_upstream(&mut up).unwrap();
        }
        if let Some(server) = self.server.as_mut() {
            let mut r = &up[..];
            while !r.is_empty() {
                moved = true;
                server.read_tls(&mut r).unwrap();
                if server.process_new_packets().is_err() {
                    break;
                }
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = server.reader().read(&mut buf) {
                if n == 0 {
                    break;
                }
                self.received.extend_from_slice(&buf[..n]);
            }
            // upstream → relay
            let mut back = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut back).unwrap();
            }
            let mut r = &back[..];
            while !r.is_empty() {
                let take = r.len().min(self.piece);
                let mut chunk = &r[..take];
                let n = self.relay.read_upstream(&mut chunk).unwrap_or(0);
                r = &r[n..];
                moved |= n > 0;
                self.relay.process()?;
                if n == 0 && !self.relay.wants_upstream_read() {
                    break;
                }
            }
        }
        // relay → guest
        let mut buf = vec![0u8; self.piece.max(1)];
        while self.relay.wants_guest_write() {
            let n = self.relay.write_guest(&mut buf);
            if n == 0 {
                break;
            }
            moved = true;
            let mut r = &buf[..n];
            while !r.is_empty() {
                self.guest.read_tls(&mut r).unwrap();
            }
            self.guest.process_new_packets().map_err(|e| Cut::Guest(format!("guest: {e}")))?;
        }
        let mut pbuf = [0u8; 4096];
        while let Ok(n) = self.guest.reader().read(&mut pbuf) {
            if n == 0 {
                break;
            }
            self.guest_got.extend_from_slice(&pbuf[..n]);
        }
        Ok(moved)
    }

    fn run(&mut self) -> Result<(), Cut> {
        for _ in 0..200 {
            if !self.round()? {
                return Ok(());
            }
        }
        panic!("the exchange did not settle");
    }

    fn respond(&mut self, body: &[u8]) {
        self.server.as_mut().unwrap().writer().write_all(body).unwrap();
    }
}

fn request(host: &str, auth: &str) -> Vec<u8> {
    format!("GET /v1/x HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\r\n").into_bytes()
}

#[test]
fn the_allowed_host_gets_the_value_and_the_guest_the_answer_unchanged() {
    let up = upstream();
    let i = interception(&up, TlsConfig::default());
    for piece in [1, 7, 100, 16 * 1024] {
        let mut w = Wire::new(&i, &up, "api.test", &["api.test"], piece);
        w.guest.writer().write_all(&request("api.test", "Bearer $MSB_API_KEY")).unwrap();
        w.run().unwrap();
        assert_eq!(w.relay.sni(), Some("api.test"));
        let got = String::from_utf8(w.received.clone()).unwrap();
        assert!(got.contains(&format!("Authorization: Bearer {VALUE}\r\n")), "piece {piece}: {got}");
        assert!(!got.contains("$MSB_API_KEY"));
        w.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        w.run().unwrap();
        assert_eq!(w.guest_got, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert!(!w.relay.handshaking());
    }
    assert_eq!(i.leaves().len(), 1, "one leaf per name, cached");
}

#[test]
fn a_placeholder_toward_another_host_cuts_with_a_violation_naming_the_env() {
    let up = upstream();
    let i = interception(&up, TlsConfig { intercept_all: true, ..TlsConfig::default() });
    let mut w = Wire::new(&i, &up, "other.test", &["other.test"], 512);
    w.guest.writer().write_all(&request("other.test", "Bearer $MSB_API_KEY")).unwrap();
    match w.run() {
        Err(Cut::Refused(Refusal::Violation(v))) => {
            assert_eq!(v.env, "API_KEY");
            assert_eq!(v.destination, "other.test");
        }
        other => panic!("expected a violation, got {other:?}"),
    }
    assert!(w.received.is_empty(), "nothing reached the upstream");
    let text = format!("{:?}", Cut::Refused(Refusal::Malformed("x")));
    assert!(!text.contains(VALUE));
}

#[test]
fn host_sni_and_pin_must_agree_before_the_value_is_sent() {
    let up = upstream();
    let i = interception(&up, TlsConfig::default());
    // SNI is the allowed name but the destination was resolved for another one.
    let mut w = Wire::new(&i, &up, "api.test", &["evil.test"], 4096);
    w.guest.writer().write_all(&request("api.test", "Bearer $MSB_API_KEY")).unwrap();
    assert!(matches!(w.run(), Err(Cut::Refused(Refusal::Violation(_)))));
    assert!(!String::from_utf8_lossy(&w.received).contains(VALUE));
    // Host differs from SNI (domain fronting).
    let mut w = Wire::new(&i, &up, "api.test", &["api.test"], 4096);
    w.guest.writer().write_all(&request("evil.test", "Bearer $MSB_API_KEY")).unwrap();
    assert!(w.run().is_err());
    assert!(!String::from_utf8_lossy(&w.received).contains(VALUE));
}

#[test]
fn basic_auth_is_substituted_inside_the_base64() {
    use base64::Engine as _;
    let up = upstream();
    let i = interception(&up, TlsConfig::default());
    let mut w = Wire::new(&i, &up, "api.test", &["api.test"], 333);
    let creds = base64::engine::general_purpose::STANDARD.encode("user:$MSB_API_KEY");
    w.guest.writer().write_all(&request("api.test", &format!("Basic {creds}"))).unwrap();
    w.run().unwrap();
    let want = base64::engine::general_purpose::STANDARD.encode(format!("user:{VALUE}"));
    assert!(String::from_utf8_lossy(&w.received).contains(&want));
}

#[test]
fn an_untrusted_upstream_is_refused_before_the_guest_gets_a_certificate() {
    let up = upstream();
    let stranger = upstream(); // a server whose CA nobody trusts
    let i = interception(&up, TlsConfig::default());
    let mut w = Wire::new(&i, &stranger, "api.test", &["api.test"], 4096);
    match w.run() {
        Err(Cut::Upstream(msg)) => assert!(msg.contains("UnknownIssuer") || msg.contains("certificate"), "{msg}"),
        other => panic!("expected an upstream refusal, got {other:?}"),
    }
    assert!(w.guest.is_handshaking(), "the guest never saw a ServerHello");
    assert_eq!(i.leaves().len(), 0, "no leaf was issued");
}

#[test]
fn a_bypassed_sni_passes_the_client_hello_through_untouched() {
    let up = upstream();
    let i = interception(&up, TlsConfig { intercept_all: true, bypass: vec!["*.bypass.test".into()], ..TlsConfig::default() });
    let mut w = Wire::new(&i, &up, "x.bypass.test", &[], 100);
    let mut hello = Vec::new();
    let mut g = guest(&i, "x.bypass.test");
    while g.wants_write() {
        g.write_tls(&mut hello).unwrap();
    }
    w.guest = g;
    // The guest's first flight goes in; the relay hands it back for the upstream as is.
    let mut data = &hello[..];
    while !data.is_empty() && !w.relay.is_bypass() {
        let n = w.relay.read_guest(&data[..data.len().min(100)]).unwrap();
        data = &data[n..];
        w.relay.process().unwrap();
    }
    assert!(w.relay.is_bypass());
    let mut passed = w.relay.take_bypass();
    passed.extend_from_slice(data);
    assert_eq!(passed, hello);
}

#[test]
fn no_sni_or_not_tls_is_cut() {
    let up = upstream();
    let i = interception(&up, TlsConfig { intercept_all: true, ..TlsConfig::default() });
    let mut relay = i.relay(vec![]);
    relay.read_guest(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(matches!(relay.process(), Err(Cut::Guest(_))));
    // An IP-literal server name: rustls sends no SNI.
    let client = tls::upstream_config(true, &[i.ca().cert_pem().to_string()], false).unwrap();
    let mut g = ClientConnection::new(client, ServerName::try_from("203.0.113.7").unwrap()).unwrap();
    let mut hello = Vec::new();
    g.write_tls(&mut hello).unwrap();
    let mut relay = i.relay(vec![]);
    relay.read_guest(&hello).unwrap();
    match relay.process() {
        Err(Cut::Guest(m)) => assert!(m.contains("SNI"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn which_connections_are_intercepted() {
    let up = upstream();
    let i = interception(&up, TlsConfig { bypass: vec!["skip.api.test".into()], ..TlsConfig::default() });
    assert!(i.intercepts(443, ["api.test"]));
    assert!(i.intercepts(443, ["API.test."]));
    assert!(!i.intercepts(8443, ["api.test"]), "port not intercepted");
    assert!(!i.intercepts(443, ["other.test"]), "carries no secret");
    assert!(!i.intercepts(443, std::iter::empty()), "never resolved");
    let all = interception(&up, TlsConfig { intercept_all: true, bypass: vec!["*.gov".into()], ..TlsConfig::default() });
    assert!(all.intercepts(443, ["other.test"]));
    assert!(all.intercepts(443, std::iter::empty()));
    assert!(!all.intercepts(443, ["www.x.gov"]), "bypass wins");
    assert!(all.intercepts(443, ["www.x.gov", "shared.test"]), "the SNI decides for a shared address");
    assert!(all.blocks_udp(443, ["other.test"]));
    let no_quic_block = interception(&up, TlsConfig { intercept_all: true, block_quic: false, ..TlsConfig::default() });
    assert!(!no_quic_block.blocks_udp(443, ["other.test"]));
}

#[test]
fn the_guest_closing_ends_the_upstream_side_after_the_last_bytes() {
    let up = upstream();
    let i = interception(&up, TlsConfig::default());
    let mut w = Wire::new(&i, &up, "api.test", &["api.test"], 4096);
    w.guest.writer().write_all(&request("api.test", "Bearer $MSB_API_KEY")).unwrap();
    w.run().unwrap();
    assert!(!w.relay.upstream_finished());
    w.guest.send_close_notify();
    w.run().unwrap();
    assert!(String::from_utf8_lossy(&w.received).contains(VALUE));
    assert!(w.relay.upstream_finished(), "close_notify passed on upstream");
    // A TCP FIN in the middle of a request is a refusal (nothing half-sent is completed).
    let mut w = Wire::new(&i, &up, "api.test", &["api.test"], 4096);
    w.guest.writer().write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n").unwrap();
    w.run().unwrap();
    w.relay.guest_eof().unwrap();
    assert!(matches!(w.relay.process(), Err(Cut::Refused(_))));
}
