//! Entry points shared by the `cargo fuzz` targets (`fuzz/fuzz_targets/`) and the
//! corpus replay test that runs in CI on stable (`tests/fuzz_corpus.rs`): each takes
//! arbitrary bytes, drives one parser or decision, and panics only when an invariant
//! breaks (so the fuzzer reports it).
//!
//! Invariants checked:
//! - DNS query: a reply keeps the query's ID and sets QR; TCP and UDP agree on the kind
//!   of answer for malformed input.
//! - DNS response: the output is at least a header and carries the query's ID; the pin
//!   set never exceeds its capacity; nothing is pinned when the filter answered an error.
//! - Policy wire: a parsed policy survives the serde round trip the supervisor spec
//!   makes; error messages start with the key.
//! - Policy decide: the verdict's rule really matches and no earlier rule does (checked
//!   with an independent matcher written on integer masks); classification is the same
//!   for an IPv4 address and its mapped / NAT64 / 6to4 forms.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::dns::{DnsConfig, DnsFilter, PinSet, QueryDecision};
use crate::flow::{Action, Direction, Flow, Protocol};
use crate::policy::classify::{classify, classify_without_host, embedded_ipv4};
use crate::policy::{Destination, DomainName, Group, HostContext, NetworkPolicy, PortRange, Rule, RuleDirection};

fn test_policy() -> NetworkPolicy {
    NetworkPolicy::from_wire(&serde_json::json!({
        "preset": "public_only",
        "deny_domains": ["blocked.test"],
        "deny_domain_suffixes": [".ads.test"],
    }))
    .expect("fixed policy parses")
}

/// A guest query.
pub fn dns_query(data: &[u8]) {
    let f = DnsFilter::new(&test_policy(), &DnsConfig::default());
    let udp = f.inspect_query(data, Protocol::Udp);
    let tcp = f.inspect_query(data, Protocol::Tcp);
    for out in [&udp, &tcp] {
        if let QueryDecision::Reply(r) = &out.decision {
            assert!(r.len() >= 12 && data.len() >= 12);
            assert_eq!(&r[..2], &data[..2], "reply keeps the ID");
            assert!(r[2] & 0x80 != 0, "reply has QR set");
            assert!(out.log.is_some(), "every refusal is logged");
        }
    }
    assert_eq!(
        std::mem::discriminant(&udp.decision),
        std::mem::discriminant(&tcp.decision),
        "the public_only policy treats DNS over UDP and TCP alike"
    );
}

/// An upstream answer: `data[0]` even ⇒ the answer to a fixed query for
/// `www.inet.test A`; odd ⇒ `data[1..3]` is the query length, then query, then answer.
pub fn dns_response(data: &[u8]) {
    let f = DnsFilter::new(&test_policy(), &DnsConfig::default());
    let fixed: &[u8] = &[
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'w', b'w', 4, b'i', b'n', b'e', b't', 4, b't', b'e',
        b's', b't', 0, 0, 1, 0, 1,
    ];
    let (query, response) = match data.first() {
        None => return,
        Some(b) if b % 2 == 0 => (fixed, &data[1..]),
        Some(_) if data.len() >= 3 => {
            let n = usize::from(u16::from_be_bytes([data[1], data[2]])).min(data.len() - 3);
            (&data[3..3 + n], &data[3 + n..])
        }
        Some(_) => return,
    };
    let mut pins = PinSet::with_capacity(16);
    let now = Instant::now();
    let out = f.filter_response(query, response, &mut pins, now);
    assert!(pins.len() <= 16);
    if query.len() >= 12 {
        assert!(out.packet.len() >= 12);
        assert_eq!(&out.packet[..2], &query[..2], "answer keeps the query's ID");
        let rcode = out.packet[3] & 0x0f;
        if rcode == 2 {
            assert!(pins.is_empty(), "SERVFAIL pins nothing");
        }
    }
    // Pins are never for a non-public address under public_only with rebind protection.
    for b in 0..=255u8 {
        for addr in [IpAddr::V4(Ipv4Addr::new(10, 0, 0, b)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, b))] {
            assert!(pins.names_for(addr, now).next().is_none(), "a private answer was pinned");
        }
    }
}

/// A policy in wire form (JSON text).
pub fn policy_wire(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else { return };
    match NetworkPolicy::from_wire(&value) {
        Ok(p) => {
            let json = serde_json::to_string(&p).expect("typed policy serialises");
            let back: NetworkPolicy = serde_json::from_str(&json).expect("typed policy deserialises");
            assert_eq!(back, p);
            let flow = Flow { direction: Direction::Egress, protocol: Protocol::Tcp, remote: Ipv4Addr::new(203, 0, 113, 10).into(), port: 80 };
            let _ = p.decide(&flow, &HostContext::default(), &PinSet::new(), Instant::now());
        }
        Err(e) => assert!(e.to_string().starts_with(&e.key)),
    }
    let _ = DnsConfig::from_wire(&value);
}

/// Reads bytes as a little program: rules, a host context, pins and flows.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    /// Addresses drawn mostly from interesting neighbourhoods.
    fn addr(&mut self) -> Option<IpAddr> {
        let sel = self.u8()?;
        let v4 = Ipv4Addr::new(
            [0, 10, 100, 127, 169, 172, 192, 198, 203, 224, 240, 255, 1, 8, 64, 168][usize::from(sel & 15)],
            self.u8()?,
            self.u8()?,
            self.u8()?,
        );
        Some(match sel >> 4 {
            0..=7 => IpAddr::V4(v4),
            8 => IpAddr::V6(v4.to_ipv6_mapped()),
            9 => IpAddr::V6(Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(u32::from(v4)))),
            10 => IpAddr::V6(Ipv6Addr::from((0x2002_u128 << 112) | (u128::from(u32::from(v4)) << 80))),
            11 => IpAddr::V6(Ipv6Addr::from(u128::from(u32::from(v4)))),
            _ => {
                let hi = [0xfe80u16, 0xfc00, 0xfd00, 0xff02, 0x2001, 0x2606, 0, 0x0064][usize::from(self.u8()? & 7)];
                IpAddr::V6(Ipv6Addr::new(hi, self.u16()?, 0, 0, 0, 0, self.u16()?, self.u16()?))
            }
        })
    }
    fn name(&mut self) -> Option<DomainName> {
        let names = ["a.test", "b.a.test", "evil-a.test", "a.test.evil", "c.test"];
        DomainName::new(names[usize::from(self.u8()?) % names.len()]).ok()
    }
}

fn in_prefix(addr: IpAddr, net: &ipnet::IpNet) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), ipnet::IpNet::V4(n)) => {
            let len = u32::from(n.prefix_len());
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(a) & mask == u32::from(n.network()) & mask
        }
        (IpAddr::V6(a), ipnet::IpNet::V6(n)) => {
            let len = u32::from(n.prefix_len());
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            u128::from(a) & mask == u128::from(n.network()) & mask
        }
        _ => false,
    }
}

/// The oracle: does `rule` match `flow`? Written independently of `policy::decide`.
fn oracle_matches(rule: &Rule, flow: &Flow, host: &HostContext, pins: &PinSet, now: Instant) -> bool {
    let dir_ok = match rule.direction {
        RuleDirection::Any => true,
        RuleDirection::Egress => flow.direction == Direction::Egress,
        RuleDirection::Ingress => flow.direction == Direction::Ingress,
    };
    let proto_ok = rule.protocols.is_empty() || rule.protocols.contains(&flow.protocol);
    let port_ok = rule.ports.is_empty()
        || (matches!(flow.protocol, Protocol::Tcp | Protocol::Udp) && rule.ports.iter().any(|p| p.start() <= flow.port && flow.port <= p.end()));
    let candidates: Vec<IpAddr> = std::iter::once(flow.remote).chain(embedded_ipv4(flow.remote).map(IpAddr::V4)).collect();
    let dest_ok = match &rule.destination {
        Destination::Any => true,
        Destination::Ip(ip) => candidates.contains(ip),
        Destination::Cidr(net) => candidates.iter().any(|a| in_prefix(*a, net)),
        Destination::Group(g) => classify(flow.remote, host) == *g,
        Destination::Domain(d) => flow.direction == Direction::Egress && pins.names_for(flow.remote, now).any(|n| n == d),
        Destination::DomainSuffix(s) => {
            flow.direction == Direction::Egress
                && pins.names_for(flow.remote, now).any(|n| n.as_str() == s.as_str() || n.as_str().ends_with(&format!(".{s}")))
        }
    };
    dir_ok && proto_ok && port_ok && dest_ok
}

/// Random rules, host context, pins and flows; checks `decide` against the oracle.
pub fn policy_decide(data: &[u8]) {
    let mut b = Bytes(data);
    let Some(n_rules) = b.u8() else { return };
    let mut rules = Vec::new();
    for _ in 0..(n_rules % 24) {
        let (Some(op), Some(filters)) = (b.u8(), b.u8()) else { break };
        let destination = match op % 6 {
            0 => Destination::Any,
            1 => match b.addr() {
                Some(a) => Destination::Ip(a),
                None => break,
            },
            2 => {
                let (Some(a), Some(len)) = (b.addr(), b.u8()) else { break };
                let max = if a.is_ipv4() { 32 } else { 128 };
                match ipnet::IpNet::new(a, len % (max + 1)) {
                    Ok(n) => Destination::Cidr(n.trunc()),
                    Err(_) => break,
                }
            }
            3 => Destination::Group(Group::ALL[usize::from(op / 6) % 7]),
            4 => match b.name() {
                Some(n) => Destination::Domain(n),
                None => break,
            },
            _ => match b.name() {
                Some(n) => Destination::DomainSuffix(n),
                None => break,
            },
        };
        let protocols = match filters & 7 {
            0..=3 => vec![],
            4 => vec![Protocol::Tcp],
            5 => vec![Protocol::Udp, Protocol::Tcp],
            6 => vec![Protocol::Icmpv4],
            _ => vec![Protocol::Icmpv6, Protocol::Udp],
        };
        let ports = if filters & 8 != 0 {
            let (Some(s), Some(len)) = (b.u16(), b.u8()) else { break };
            let s = s.max(1);
            vec![PortRange::new(s, s.saturating_add(u16::from(len))).expect("valid range")]
        } else {
            vec![]
        };
        let direction = [RuleDirection::Egress, RuleDirection::Ingress, RuleDirection::Any][usize::from(filters >> 4) % 3];
        let action = if filters & 0x80 != 0 { Action::Allow } else { Action::Deny };
        rules.push(Rule { action, direction, destination, protocols, ports });
    }
    let defaults = b.u8().unwrap_or(0);
    let action = |bit: u8| if defaults & bit != 0 { Action::Allow } else { Action::Deny };
    let policy = NetworkPolicy::custom(action(1), action(2), rules);
    let host = HostContext {
        gateway: b.addr().into_iter().collect(),
        host_addrs: b.addr().into_iter().collect(),
    };
    let now = Instant::now();
    let mut pins = PinSet::with_capacity(8);
    for _ in 0..4 {
        let (Some(n), Some(a), Some(t)) = (b.name(), b.addr(), b.u8()) else { break };
        pins.insert(n, a, Duration::from_secs(u64::from(t % 4)), now);
    }
    while let (Some(sel), Some(remote), Some(port)) = (b.u8(), b.addr(), b.u16()) {
        let protocol = [Protocol::Tcp, Protocol::Udp, Protocol::Icmpv4, Protocol::Icmpv6][usize::from(sel & 3)];
        let direction = if sel & 4 == 0 { Direction::Egress } else { Direction::Ingress };
        let flow = Flow { direction, protocol, remote, port };
        let at = now + Duration::from_millis(u64::from(sel >> 3) * 100);
        let v = policy.decide(&flow, &host, &pins, at);
        let first = policy.rules().iter().position(|r| oracle_matches(r, &flow, &host, &pins, at));
        assert_eq!(v.rule, first, "decide and the oracle disagree on the first matching rule");
        let want = match first {
            Some(i) => policy.rules()[i].action,
            None if direction == Direction::Egress => policy.default_egress(),
            None => policy.default_ingress(),
        };
        assert_eq!(v.action, want);

        // Classification invariants.
        if let Some(v4) = embedded_ipv4(remote) {
            assert_eq!(classify_without_host(remote), classify_without_host(IpAddr::V4(v4)));
        }
        if let IpAddr::V4(v4) = remote {
            let forms = [
                IpAddr::V6(v4.to_ipv6_mapped()),
                IpAddr::V6(Ipv6Addr::from((0x0064_ff9b_u128 << 96) | u128::from(u32::from(v4)))),
                IpAddr::V6(Ipv6Addr::from((0x2002_u128 << 112) | (u128::from(u32::from(v4)) << 80))),
            ];
            for f in forms {
                assert_eq!(classify(f, &host), classify(remote, &host), "{f} vs {remote}");
            }
        }
        let in_host = host.gateway.iter().chain(&host.host_addrs).any(|h| {
            embedded_ipv4(*h).map_or(*h, IpAddr::V4) == embedded_ipv4(remote).map_or(remote, IpAddr::V4)
        });
        assert_eq!(classify(remote, &host) == Group::Host, in_host);
    }
}
