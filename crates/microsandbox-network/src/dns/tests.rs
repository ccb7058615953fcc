//! DNS filter tests: well-formed and malformed queries (NETWORK.md 9.7), answer filtering
//! (rebind protection, SVCB/HTTPS hints, mapped IPv6, CNAME chains) and pins.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use serde_json::json;
use simple_dns::rdata::{RData, A, AAAA, CNAME, HTTPS, SVCB};
use simple_dns::{Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, QCLASS, QTYPE, RCODE, TYPE};

use super::*;
use crate::policy::{DomainName, HostContext, NetworkPolicy};

fn policy(v: serde_json::Value) -> NetworkPolicy {
    NetworkPolicy::from_wire(&v).unwrap()
}

fn filter(p: &NetworkPolicy) -> DnsFilter {
    DnsFilter::new(p, &DnsConfig::default())
}

fn query(id: u16, name: &str, qtype: TYPE) -> Vec<u8> {
    let mut p = Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    p.questions.push(Question::new(Name::new_unchecked(name), qtype.into(), CLASS::IN.into(), false));
    p.build_bytes_vec().unwrap()
}

fn a(name: &str, ip: &str, ttl: u32) -> ResourceRecord<'static> {
    let ip: Ipv4Addr = ip.parse().unwrap();
    ResourceRecord::new(Name::new_unchecked(name).into_owned(), CLASS::IN, ttl, RData::A(A { address: ip.into() }))
}

fn aaaa(name: &str, ip: &str, ttl: u32) -> ResourceRecord<'static> {
    let ip: Ipv6Addr = ip.parse().unwrap();
    ResourceRecord::new(Name::new_unchecked(name).into_owned(), CLASS::IN, ttl, RData::AAAA(AAAA { address: ip.into() }))
}

fn cname(name: &str, target: &str) -> ResourceRecord<'static> {
    ResourceRecord::new(
        Name::new_unchecked(name).into_owned(),
        CLASS::IN,
        300,
        RData::CNAME(CNAME(Name::new_unchecked(target).into_owned())),
    )
}

fn https(name: &str, v4: &[&str]) -> ResourceRecord<'static> {
    let mut s = SVCB::new(1, Name::new_unchecked(".").into_owned());
    let ips: Vec<u32> = v4.iter().map(|ip| ip.parse::<Ipv4Addr>().unwrap().into()).collect();
    s.set_ipv4hint(&ips);
    ResourceRecord::new(Name::new_unchecked(name).into_owned(), CLASS::IN, 300, RData::HTTPS(HTTPS(s)))
}

fn response(q: &[u8], answers: Vec<ResourceRecord<'static>>) -> Vec<u8> {
    let qp = Packet::parse(q).unwrap();
    let mut r = Packet::new_reply(qp.id());
    r.set_flags(PacketFlag::RECURSION_DESIRED | PacketFlag::RECURSION_AVAILABLE);
    r.questions = qp.questions.clone();
    r.answers = answers;
    r.build_bytes_vec_compressed().unwrap()
}

fn rcode(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[2], packet[3]]) & 0x000f
}

fn answers(packet: &[u8]) -> Vec<String> {
    let p = Packet::parse(packet).unwrap();
    p.answers
        .iter()
        .map(|rr| match &rr.rdata {
            RData::A(a) => format!("{} A {}", rr.name, Ipv4Addr::from(a.address)),
            RData::AAAA(a) => format!("{} AAAA {}", rr.name, Ipv6Addr::from(a.address)),
            RData::CNAME(c) => format!("{} CNAME {}", rr.name, c.0),
            RData::HTTPS(_) => format!("{} HTTPS", rr.name),
            _ => format!("{} other", rr.name),
        })
        .collect()
}

fn d(s: &str) -> DomainName {
    DomainName::new(s).unwrap()
}

fn reply_of(decision: QueryDecision) -> Vec<u8> {
    match decision {
        QueryDecision::Reply(p) => p,
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn allowed_names_are_forwarded_denied_ones_get_nxdomain() {
    let p = policy(json!({"preset": "public_only", "deny_domains": ["blocked.test"], "deny_domain_suffixes": [".ads.test"]}));
    let f = filter(&p);
    assert_eq!(f.on_query(&query(1, "inet.test", TYPE::A)), QueryDecision::Forward);
    assert_eq!(f.on_query(&query(1, "LOCALHOST.", TYPE::A)), QueryDecision::Forward);
    for name in ["blocked.test", "BLOCKED.test", "x.y.ads.test", "ads.test"] {
        let q = query(0x4242, name, TYPE::AAAA);
        let out = f.inspect_query(&q, crate::flow::Protocol::Udp);
        let r = reply_of(out.decision);
        assert_eq!(rcode(&r), RCODE::NameError as u16, "{name}");
        let rp = Packet::parse(&r).unwrap();
        assert_eq!(rp.id(), 0x4242);
        assert!(rp.has_flags(PacketFlag::RESPONSE | PacketFlag::RECURSION_DESIRED));
        assert_eq!(rp.questions.len(), 1);
        assert!(out.log.unwrap().contains("NXDOMAIN"));
    }
    assert_eq!(f.on_query(&query(1, "bads.test", TYPE::A)), QueryDecision::Forward);

    // a custom policy without DNS: only names with an allow rule resolve
    let custom = policy(json!({"rules": [{"action": "allow", "destination": "api.test", "protocols": ["tcp"], "ports": ["443"]}]}));
    let f = filter(&custom);
    assert_eq!(f.on_query(&query(1, "api.test", TYPE::A)), QueryDecision::Forward);
    assert_eq!(rcode(&reply_of(f.on_query(&query(1, "other.test", TYPE::A)))), RCODE::NameError as u16);
}

/// NETWORK.md 9.7: malformed queries never panic and get the right refusal.
#[test]
fn malformed_queries() {
    let f = filter(&NetworkPolicy::public_only());
    let good = query(7, "inet.test", TYPE::A);
    let with = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut q = good.clone();
        edit(&mut q);
        q
    };
    let mut header_only = vec![0u8; 12];
    header_only[5] = 1; // QDCOUNT 1, no question
    let long_name = {
        // 5 labels of 63 = 320 octets > 255
        let mut q = good[..12].to_vec();
        for _ in 0..5 {
            q.push(63);
            q.extend(std::iter::repeat_n(b'a', 63));
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    };
    let long_label = {
        let mut q = good[..12].to_vec();
        q.push(64);
        q.extend(std::iter::repeat_n(b'a', 64));
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q
    };
    let label_with = |bytes: &[u8]| {
        let mut q = good[..12].to_vec();
        q.push(bytes.len() as u8);
        q.extend_from_slice(bytes);
        q.extend_from_slice(&[4, b't', b'e', b's', b't', 0, 0, 1, 0, 1]);
        q
    };
    let loop_ = {
        let mut q = good[..12].to_vec();
        q.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]); // name = pointer to itself
        q
    };
    let mutual_loop = {
        let mut q = good[..12].to_vec();
        q.extend_from_slice(&[1, b'a', 0xc0, 16, 1, b'b', 0xc0, 12, 0, 1, 0, 1]);
        q
    };
    let forward_pointer = {
        let mut q = good[..12].to_vec();
        q.extend_from_slice(&[0xc0, 200, 0, 1, 0, 1]);
        q
    };
    #[derive(Debug, PartialEq)]
    enum Want {
        Drop,
        Rcode(RCODE),
    }
    use Want::*;
    let cases: Vec<(&str, Vec<u8>, Want)> = vec![
        ("empty", vec![], Drop),
        ("11 bytes", vec![0; 11], Drop),
        ("a response", with(&|q| q[2] |= 0x80), Drop),
        ("64 KiB + 1", vec![0; 65_536], Drop),
        ("opcode STATUS", with(&|q| q[2] |= 0x10), Rcode(RCODE::NotImplemented)),
        ("QDCOUNT 0", with(&|q| q[5] = 0), Rcode(RCODE::FormatError)),
        ("QDCOUNT 2", with(&|q| q[5] = 2), Rcode(RCODE::FormatError)),
        ("QDCOUNT 65535", with(&|q| {
            q[4] = 0xff;
            q[5] = 0xff;
        }), Rcode(RCODE::FormatError)),
        ("ANCOUNT lies", with(&|q| q[7] = 1), Rcode(RCODE::FormatError)),
        ("ARCOUNT 2", with(&|q| q[11] = 2), Rcode(RCODE::FormatError)),
        ("ARCOUNT 1, no record", with(&|q| q[11] = 1), Rcode(RCODE::FormatError)),
        ("no question bytes", header_only, Rcode(RCODE::FormatError)),
        ("truncated question", good[..good.len() - 3].to_vec(), Rcode(RCODE::FormatError)),
        ("label length past the end", with(&|q| q[12] = 60), Rcode(RCODE::FormatError)),
        ("compression loop", loop_, Rcode(RCODE::FormatError)),
        ("mutual compression loop", mutual_loop, Rcode(RCODE::FormatError)),
        ("pointer past the end", forward_pointer, Rcode(RCODE::FormatError)),
        (">255-octet name", long_name, Rcode(RCODE::FormatError)),
        (">63-octet label", long_label, Rcode(RCODE::FormatError)),
        ("NUL in a label", label_with(b"a\0b"), Rcode(RCODE::Refused)),
        ("dot in a label", label_with(b"127.0.0.1"), Rcode(RCODE::Refused)),
        ("space in a label", label_with(b"a b"), Rcode(RCODE::Refused)),
        ("non-ASCII label", label_with("bücher".as_bytes()), Rcode(RCODE::Refused)),
        ("root name", {
            let mut q = good[..12].to_vec();
            q.extend_from_slice(&[0, 0, 2, 0, 1]);
            q
        }, Rcode(RCODE::Refused)),
        ("class CH", with(&|q| {
            let n = q.len();
            q[n - 1] = 3;
        }), Rcode(RCODE::Refused)),
        ("AXFR", with(&|q| {
            let n = q.len();
            q[n - 3] = 252;
        }), Rcode(RCODE::Refused)),
    ];
    for (what, q, want) in cases {
        let got = match f.on_query(&q) {
            QueryDecision::Drop => Drop,
            QueryDecision::Reply(r) => {
                assert!(r.len() >= 12, "{what}");
                assert_eq!(&r[..2], &q[..2], "{what}: reply keeps the ID");
                assert!(r[2] & 0x80 != 0, "{what}: QR set");
                Rcode(RCODE::from(rcode(&r)))
            }
            QueryDecision::Forward => panic!("{what}: forwarded"),
        };
        assert_eq!(got, want, "{what}");
    }
    // escaped-looking but legal characters are fine
    assert_eq!(f.on_query(&query(1, "_dmarc.inet.test", TYPE::TXT)), QueryDecision::Forward);
}

#[test]
fn public_answers_pass_and_are_pinned() {
    let f = filter(&NetworkPolicy::public_only());
    let q = query(9, "inet.test", TYPE::A);
    let r = response(&q, vec![a("inet.test", "203.0.113.10", 60), a("inet.test", "203.0.113.11", 0)]);
    let mut pins = PinSet::new();
    let t0 = Instant::now();
    let out = f.filter_response(&q, &r, &mut pins, t0);
    assert!(out.log.is_empty(), "{:?}", out.log);
    assert_eq!(rcode(&out.packet), 0);
    assert_eq!(answers(&out.packet), ["inet.test A 203.0.113.10", "inet.test A 203.0.113.11"]);
    assert!(pins.contains(&d("inet.test"), "203.0.113.10".parse().unwrap(), t0 + Duration::from_secs(59)));
    assert!(!pins.contains(&d("inet.test"), "203.0.113.10".parse().unwrap(), t0 + Duration::from_secs(60)));
    // TTL 0 still pins for the one-second floor
    assert!(pins.contains(&d("inet.test"), "203.0.113.11".parse().unwrap(), t0 + Duration::from_millis(900)));
}

/// NETWORK.md 9.7: rebinding, mixed sets, mapped AAAA, SVCB/HTTPS hints.
#[test]
fn rebind_protection_removes_what_the_policy_would_refuse() {
    let f = filter(&NetworkPolicy::public_only());
    let t0 = Instant::now();
    let run = |name: &str, qtype: TYPE, recs: Vec<ResourceRecord<'static>>| {
        let q = query(3, name, qtype);
        let r = response(&q, recs);
        let mut pins = PinSet::new();
        let out = f.filter_response(&q, &r, &mut pins, t0);
        (out, pins)
    };
    // all private / loopback → NXDOMAIN, nothing pinned
    for ip in ["10.0.0.1", "127.0.0.1", "169.254.169.254", "0.0.0.0", "100.100.100.200", "192.168.1.1"] {
        let (out, pins) = run("rebind.test", TYPE::A, vec![a("rebind.test", ip, 0)]);
        assert_eq!(rcode(&out.packet), RCODE::NameError as u16, "{ip}");
        assert!(pins.is_empty());
        assert!(out.log.iter().any(|l| l.contains("rebind protection") && l.contains(ip)), "{:?}", out.log);
    }
    // mixed set: the public address stays, the private one goes
    let (out, pins) = run("mixed.test", TYPE::A, vec![a("mixed.test", "203.0.113.10", 30), a("mixed.test", "10.1.1.1", 30)]);
    assert_eq!(answers(&out.packet), ["mixed.test A 203.0.113.10"]);
    assert!(!pins.contains(&d("mixed.test"), "10.1.1.1".parse().unwrap(), t0));
    assert!(pins.contains(&d("mixed.test"), "203.0.113.10".parse().unwrap(), t0));
    // AAAA carrying a mapped loopback / a NAT64 private address
    for ip in ["::ffff:127.0.0.1", "64:ff9b::a00:1", "::1", "fd00:ec2::254", "fe80::1"] {
        let (out, _) = run("v6.test", TYPE::AAAA, vec![aaaa("v6.test", ip, 30)]);
        assert_eq!(rcode(&out.packet), RCODE::NameError as u16, "{ip}");
    }
    let (out, _) = run("v6.test", TYPE::AAAA, vec![aaaa("v6.test", "2001:db8::10", 30)]);
    assert_eq!(answers(&out.packet), ["v6.test AAAA 2001:db8::10"]);
    // HTTPS hints
    let (out, _) = run("svc.test", TYPE::HTTPS, vec![https("svc.test", &["10.0.0.1", "203.0.113.10"])]);
    assert_eq!(rcode(&out.packet), RCODE::NameError as u16);
    let (out, pins) = run("svc.test", TYPE::HTTPS, vec![https("svc.test", &["203.0.113.10"])]);
    assert_eq!(answers(&out.packet), ["svc.test HTTPS"]);
    assert!(pins.contains(&d("svc.test"), "203.0.113.10".parse().unwrap(), t0));
}

#[test]
fn rebind_protection_follows_the_policy_and_can_be_switched_off() {
    let t0 = Instant::now();
    let q = query(3, "db.test", TYPE::A);
    let r = response(&q, vec![a("db.test", "10.0.0.5", 30)]);
    let kept = |f: &DnsFilter| {
        let mut pins = PinSet::new();
        rcode(&f.on_response(&q, &r, &mut pins, t0)) == 0
    };
    assert!(!kept(&filter(&NetworkPolicy::public_only())));
    assert!(kept(&filter(&NetworkPolicy::non_local())));
    assert!(kept(&filter(&NetworkPolicy::allow_all())));
    assert!(kept(&filter(&policy(json!({"rules": [{"action": "allow", "destination": "10.0.0.0/24"}]})))));
    // a port-limited allow does not make the address reachable on every port
    assert!(!kept(&filter(&policy(json!({"rules": [{"action": "allow", "destination": "10.0.0.0/24", "ports": ["5432"]}]})))));
    // a domain rule for the name does not open a private address
    assert!(!kept(&filter(&policy(json!({"rules": [{"action": "allow", "destination": "db.test"}]})))));
    let off = DnsFilter::new(&NetworkPolicy::public_only(), &DnsConfig { rebind_protection: false, ..DnsConfig::default() });
    assert!(kept(&off));
    // the host's own address is "host", refused even though it is a public address
    let q = query(3, "me.test", TYPE::A);
    let r = response(&q, vec![a("me.test", "198.51.100.200", 30)]);
    let host = HostContext { gateway: vec![], host_addrs: vec!["198.51.100.200".parse().unwrap()] };
    let f = filter(&NetworkPolicy::public_only()).with_host_context(host);
    assert_eq!(rcode(&f.on_response(&q, &r, &mut PinSet::new(), t0)), RCODE::NameError as u16);
}

#[test]
fn cname_chains_pin_every_name_on_the_chain_and_nothing_else() {
    let p = policy(json!({"preset": "public_only", "deny_domains": ["tracker.test"]}));
    let f = filter(&p);
    let t0 = Instant::now();
    let q = query(5, "www.inet.test", TYPE::A);
    let r = response(
        &q,
        vec![
            cname("www.inet.test", "edge.cdn.test"),
            cname("edge.cdn.test", "lb.cdn.test"),
            a("lb.cdn.test", "203.0.113.10", 60),
            a("bank.test", "203.0.113.66", 60), // not on the chain: passed on, never pinned
        ],
    );
    let mut pins = PinSet::new();
    let out = f.filter_response(&q, &r, &mut pins, t0);
    assert_eq!(answers(&out.packet).len(), 4);
    let ip: IpAddr = "203.0.113.10".parse().unwrap();
    for n in ["www.inet.test", "lb.cdn.test"] {
        assert!(pins.contains(&d(n), ip, t0), "{n}");
    }
    assert!(!pins.contains(&d("bank.test"), "203.0.113.66".parse().unwrap(), t0));
    assert!(pins.names_for("203.0.113.66".parse().unwrap(), t0).next().is_none());

    // an alias to a denied name is NXDOMAIN
    let q = query(6, "innocent.test", TYPE::A);
    let r = response(&q, vec![cname("innocent.test", "tracker.test"), a("tracker.test", "203.0.113.5", 60)]);
    let mut pins = PinSet::new();
    assert_eq!(rcode(&f.on_response(&q, &r, &mut pins, t0)), RCODE::NameError as u16);
    assert!(pins.is_empty());

    // a CNAME loop terminates
    let q = query(7, "a.test", TYPE::A);
    let r = response(&q, vec![cname("a.test", "b.test"), cname("b.test", "a.test")]);
    assert_eq!(rcode(&f.on_response(&q, &r, &mut PinSet::new(), t0)), 0);
}

#[test]
fn answers_that_do_not_answer_this_query_are_servfail() {
    let f = filter(&NetworkPolicy::public_only());
    let t0 = Instant::now();
    let q = query(11, "inet.test", TYPE::A);
    let good = response(&q, vec![a("inet.test", "203.0.113.10", 60)]);
    let other_id = response(&query(12, "inet.test", TYPE::A), vec![a("inet.test", "203.0.113.10", 60)]);
    let other_name = {
        let mut r = response(&query(11, "evil.test", TYPE::A), vec![a("inet.test", "203.0.113.10", 60)]);
        r[2] |= 0x80;
        r
    };
    let other_type = response(&query(11, "inet.test", TYPE::AAAA), vec![]);
    let not_response = {
        let mut r = good.clone();
        r[2] &= 0x7f;
        r
    };
    let truncated = good[..good.len() - 2].to_vec();
    let lying_count = {
        let mut r = good.clone();
        r[7] = 0xff;
        r
    };
    for (what, r) in [
        ("other id", other_id),
        ("other name", other_name),
        ("other type", other_type),
        ("not a response", not_response),
        ("truncated", truncated),
        ("lying ANCOUNT", lying_count),
        ("empty", vec![]),
    ] {
        let mut pins = PinSet::new();
        let out = f.filter_response(&q, &r, &mut pins, t0);
        assert_eq!(rcode(&out.packet), RCODE::ServerFailure as u16, "{what}");
        assert_eq!(&out.packet[..2], &q[..2], "{what}");
        assert!(pins.is_empty(), "{what}");
    }
    // upper-case echo of the question is the same question (0x20 randomisation)
    let mixed = response(&query(11, "INET.test", TYPE::A), vec![a("inet.test", "203.0.113.10", 60)]);
    assert_eq!(rcode(&f.on_response(&q, &mixed, &mut PinSet::new(), t0)), 0);
    // an upstream NXDOMAIN passes unchanged
    let empty = response(&q, vec![]);
    let mut nx = Packet::parse(&empty).unwrap();
    *nx.rcode_mut() = RCODE::NameError;
    let nx = nx.build_bytes_vec().unwrap();
    assert_eq!(rcode(&f.on_response(&q, &nx, &mut PinSet::new(), t0)), RCODE::NameError as u16);
    let _ = QTYPE::ANY;
    let _ = QCLASS::ANY;
}

/// Deterministic pseudo-random garbage and bit flips of valid messages: never a panic,
/// replies always carry the query's ID, pins stay bounded.
#[test]
fn random_and_mutated_packets_never_panic() {
    let f = filter(&policy(json!({"preset": "public_only", "deny_domain_suffixes": [".ads.test"]})));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let q = query(1, "www.inet.test", TYPE::A);
    let r = response(&q, vec![cname("www.inet.test", "inet.test"), a("inet.test", "203.0.113.10", 60), a("inet.test", "10.0.0.1", 60)]);
    let mut pins = PinSet::with_capacity(64);
    let t0 = Instant::now();
    for i in 0..20_000 {
        let base = if i % 2 == 0 { &q } else { &r };
        let mut m = base.clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % m.len();
            m[at] ^= 1 << (next() % 8);
        }
        if next() % 8 == 0 {
            let cut = (next() as usize) % (m.len() + 1);
            m.truncate(cut);
        }
        if let QueryDecision::Reply(reply) = f.on_query(&m) {
            assert_eq!(&reply[..2], &m[..2]);
        }
        let out = f.on_response(&q, &m, &mut pins, t0);
        assert!(out.len() >= 12);
        let junk: Vec<u8> = (0..(next() % 300)).map(|_| next() as u8).collect();
        let _ = f.on_query(&junk);
        let _ = f.on_response(&junk, &junk, &mut pins, t0);
        assert!(pins.len() <= 64);
    }
}

#[test]
fn truncation_and_edns_survive_filtering() {
    let f = filter(&NetworkPolicy::public_only());
    let q = query(21, "inet.test", TYPE::A);
    let plain = response(&q, vec![a("inet.test", "203.0.113.10", 60), a("inet.test", "10.0.0.9", 60)]);
    let mut r = Packet::parse(&plain).unwrap();
    r.set_flags(PacketFlag::TRUNCATION);
    *r.opt_mut() = Some(simple_dns::rdata::OPT { opt_codes: vec![], udp_packet_size: 1232, version: 0 });
    let bytes = r.build_bytes_vec().unwrap();
    let out = f.on_response(&q, &bytes, &mut PinSet::new(), Instant::now());
    let p = Packet::parse(&out).unwrap();
    assert!(p.has_flags(PacketFlag::TRUNCATION), "TC=1 tells the guest to retry over TCP");
    assert_eq!(p.opt().map(|o| o.udp_packet_size), Some(1232));
    assert_eq!(answers(&out), ["inet.test A 203.0.113.10"]);
}
