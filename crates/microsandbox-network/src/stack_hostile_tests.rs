//! The stack against a hostile guest (NETWORK.md section 9), without a VM: a real
//! [`Stack`] on a socketpair, driven one iteration at a time by [`crate::hostile::Guest`],
//! which checks after every iteration that the queues, connections, sessions and
//! in-flight queries are within their bounds. Traffic reaches host loopback only (the
//! gateway address), and only where the test's policy allows it.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::time::Duration;

use smoltcp::wire::{ArpOperation, Ipv4Packet, TcpControl};

use super::*;
use crate::dns::Nameserver;
use crate::hostile::{self, Guest};
use crate::policy::{Destination, NetworkPolicy, Rule, RuleDirection};

const GW: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 1);

/// A link of MTU 1500 whose DNS goes to a closed loopback port (never a real resolver).
fn config(policy: NetworkPolicy) -> NetworkConfig {
    let mut c = NetworkConfig::with_defaults();
    c.mtu = 1500;
    c.policy = policy;
    c.dns.nameservers = vec![Nameserver::parse("127.0.0.1:9").unwrap()];
    c.dns.query_timeout_ms = 200;
    c
}

/// Egress denied except to the gateway (host loopback): nothing can leave the machine.
fn gateway_only() -> NetworkPolicy {
    NetworkPolicy::custom(
        Action::Deny,
        Action::Deny,
        vec![Rule {
            action: Action::Allow,
            direction: RuleDirection::Egress,
            destination: Destination::Ip(IpAddr::V4(GW)),
            protocols: Vec::new(),
            ports: Vec::new(),
        }],
    )
}

fn rsts_to(inbox: &[Vec<u8>], port: u16) -> usize {
    inbox.iter().filter_map(|f| hostile::segment(f)).filter(|s| s.dst_port == port && s.rst).count()
}

#[test]
fn syn_flood_beyond_max_connections_is_refused_and_bounded() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cfg = config(gateway_only());
    cfg.max_connections = 8;
    let mut g = Guest::new(cfg);
    for i in 0..300u16 {
        let f = g.syn(20000 + i, GW, port);
        g.send(&f).unwrap();
        g.step().unwrap();
    }
    // Retransmitted SYNs of the same flows change nothing.
    for i in 0..8u16 {
        let f = g.syn(20000 + i, GW, port);
        g.send(&f).unwrap();
    }
    let ok = g.run_until(Duration::from_secs(10), |inbox| {
        let synacks = inbox.iter().filter_map(|f| hostile::segment(f)).filter(|s| s.syn && s.ack).count();
        synacks >= 8
    });
    assert!(ok, "the first 8 connections were accepted");
    let refused: usize = (8..300u16).map(|i| rsts_to(&g.inbox, 20000 + i).min(1)).sum();
    assert_eq!(refused, 292, "every SYN past max_connections got a RST");
    assert_eq!(g.stack.occupancy().tcp, 8);
    assert!(g.log_text().contains("max_connections (8) reached"));
    drop(listener);
}

#[test]
fn tcp_the_policy_forbids_is_refused_at_the_syn_without_a_host_connect() {
    let mut g = Guest::new(config(NetworkPolicy::public_only()));
    let own = host_addrs()
        .into_iter()
        .find_map(|a| match a {
            IpAddr::V4(v4) if !v4.is_loopback() => Some(v4),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::new(127, 0, 0, 1));
    let targets = [
        (Ipv4Addr::new(10, 0, 0, 1), 80),
        (Ipv4Addr::new(169, 254, 169, 254), 80),
        (Ipv4Addr::new(127, 0, 0, 1), 22),
        (Ipv4Addr::new(100, 100, 100, 200), 80),
        (Ipv4Addr::new(0, 1, 2, 3), 80),
        (Ipv4Addr::new(255, 255, 255, 255), 80),
        (GW, 22),
        (own, 22),
    ];
    for (i, (dst, port)) in targets.iter().enumerate() {
        let f = g.syn(30000 + i as u16, *dst, *port);
        g.send(&f).unwrap();
        g.step().unwrap();
        assert!(g.stack.pending.is_empty(), "no host-side connect to {dst}:{port}");
    }
    g.run_for(Duration::from_millis(50)).unwrap();
    for (i, (dst, port)) in targets.iter().enumerate() {
        if dst.is_broadcast() {
            continue; // smoltcp answers nothing to a broadcast destination: nothing to refuse
        }
        assert_eq!(rsts_to(&g.inbox, 30000 + i as u16), 1, "RST for {dst}:{port}");
        assert!(g.log_text().contains(&format!("refused TCP connection to {dst}:{port}")), "{}", g.log_text());
    }
    assert_eq!(g.stack.occupancy().tcp, 0);
}

#[test]
fn udp_floods_are_bounded_per_sandbox_and_per_session() {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let mut g = Guest::new(config(gateway_only()));
    // Session exhaustion: 1,000 source ports.
    for i in 0..1000u16 {
        let f = g.udp(10000 + i, GW, port, b"x");
        g.send(&f).unwrap();
        if i % 16 == 0 {
            g.step().unwrap();
        }
    }
    g.run_for(Duration::from_millis(20)).unwrap();
    assert_eq!(g.stack.occupancy().udp_sessions, MAX_UDP_SESSIONS);
    assert!(g.log_text().contains("UDP sessions open"));
    // One session flooded with 20,000 datagrams the host side never reads: the kernel
    // socket buffer drops what does not fit, the stack holds nothing.
    let f = g.udp(10000, GW, port, &[7u8; 1400]);
    for _ in 0..20_000 {
        g.send(&f).unwrap();
    }
    g.run_for(Duration::from_millis(20)).unwrap();
    let o = g.stack.occupancy();
    assert_eq!(o.udp_sessions, MAX_UDP_SESSIONS);
    assert!(o.rx_frames == 0 && o.tx_frames == 0, "{o:?}");
    // UDP the policy forbids opens nothing.
    let mut g = Guest::new(config(NetworkPolicy::public_only()));
    for (i, dst) in [Ipv4Addr::new(10, 1, 1, 1), Ipv4Addr::new(127, 0, 0, 1), GW, Ipv4Addr::new(224, 0, 0, 251)].iter().enumerate() {
        let f = g.udp(5000 + i as u16, *dst, 5353, b"q");
        g.send(&f).unwrap();
        g.step().unwrap();
    }
    assert_eq!(g.stack.occupancy().udp_sessions, 0);
    assert!(g.log_text().contains("refused UDP to 10.1.1.1:5353"));
}

#[test]
fn oversized_frames_are_skipped_and_impossible_lengths_end_the_link() {
    let mut g = Guest::new(config(gateway_only()));
    // Over the MTU but within QEMU's limit: skipped, counted, the link stays in sync.
    let mut big = g.syn(1, GW, 80);
    big.resize(9000, 0);
    g.send(&big).unwrap();
    g.send(&[0u8; 5]).unwrap(); // shorter than an Ethernet header
    let ask = g.arp(ArpOperation::Request, g.cfg.guest_mac, g.cfg.guest_ip, GW);
    g.send(&ask).unwrap();
    let gw_mac = g.cfg.gateway_mac;
    assert!(g.run_until(Duration::from_secs(2), |inbox| inbox.iter().any(|f| hostile::arp_reply(f) == Some((gw_mac, GW)))));
    assert_eq!(g.counters.dropped_frames.load(Ordering::Relaxed), 2);
    // Bogus IP header and total lengths, every truncation of a SYN, trailing junk.
    let syn = g.syn(2, GW, 80);
    for n in 14..syn.len() {
        g.send(&syn[..n]).unwrap();
    }
    for (at, byte) in [(14, 0x4f), (14, 0x41), (16, 0xff), (17, 0xff), (16, 0x00), (17, 0x00)] {
        let mut f = syn.clone();
        f[at] = byte;
        g.send(&f).unwrap();
    }
    let mut padded = syn.clone();
    padded.extend_from_slice(&[0xaa; 500]);
    g.send(&padded).unwrap();
    g.run_for(Duration::from_millis(20)).unwrap();
    // A length of 0 or past NET_BUFSIZE cannot be resynchronised: the stack ends the link.
    g.send_raw(&(frame::MAX_STREAM_FRAME as u32 + 1).to_be_bytes()).unwrap();
    assert!(g.stack.step().is_err());
}

#[test]
fn arp_spoofing_the_gateway_is_dropped_and_the_gateway_keeps_its_mac() {
    let mut g = Guest::new(config(gateway_only()));
    let me = g.cfg.guest_mac;
    let claims = [
        g.arp(ArpOperation::Reply, me, GW, g.cfg.guest_ip), // "the gateway is at my MAC"
        g.arp(ArpOperation::Request, me, GW, GW),           // gratuitous ARP for the gateway
        g.arp(ArpOperation::Request, [2, 0, 0, 0, 0, 0x66], g.cfg.guest_ip, GW), // another MAC inside
    ];
    for f in &claims {
        g.send(f).unwrap();
    }
    g.run_for(Duration::from_millis(20)).unwrap();
    assert_eq!(g.counters.dropped_frames.load(Ordering::Relaxed), 3);
    assert!(g.inbox.is_empty(), "nothing answers a spoofed sender");
    let ask = g.arp(ArpOperation::Request, me, g.cfg.guest_ip, GW);
    g.send(&ask).unwrap();
    let gw_mac = g.cfg.gateway_mac;
    assert!(g.run_until(Duration::from_secs(2), |inbox| inbox.iter().any(|f| hostile::arp_reply(f) == Some((gw_mac, GW)))));
}

#[test]
fn a_guest_that_floods_dns_and_never_reads_cannot_grow_the_stack() {
    // Denied names are answered locally (NXDOMAIN) without any upstream: a guest that
    // sends them as fast as it can while never reading its NIC fills the link, then the
    // queues — and then the stack must stop reading, not buffer without end.
    let policy = NetworkPolicy::from_wire(&serde_json::json!({"preset": "public_only", "deny_domains": ["blocked.test"]})).unwrap();
    let mut g = Guest::new(config(policy));
    g.deaf = true;
    let query: &[u8] = &[
        0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'b', b'l', b'o', b'c', b'k', b'e', b'd', 4, b't', b'e', b's',
        b't', 0, 0, 1, 0, 1,
    ];
    let f = g.udp(5353, GW, 53, query);
    let mut wire = Vec::new();
    for _ in 0..2000 {
        frame::encode(&f, &mut wire);
    }
    let (mut sent, mut pos) = (0usize, 0usize);
    for _ in 0..200 {
        // Non-blocking writes: what the stack does not take stays unsent (and is sent
        // next time, so the framing stays intact).
        match std::io::Write::write(&mut g_link(&mut g), &wire[pos..]) {
            Ok(n) => {
                sent += n;
                pos = (pos + n) % wire.len();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        g.step().unwrap();
    }
    let o = g.stack.occupancy();
    assert!(o.tx_frames <= crate::device::TX_FRAMES + hostile::FRAMES_PER_READ, "{o:?}");
    assert!(sent > 0);
    // The guest starts reading again: the answers flow, the stack is fine.
    g.deaf = false;
    g.run_for(Duration::from_millis(50)).unwrap();
    assert!(g.inbox.iter().filter_map(|f| hostile::datagram(f)).any(|(from, port, _)| from.port() == 53 && port == 5353));
}

/// The guest end of the link, for raw non-blocking writes.
fn g_link(g: &mut Guest) -> &mut UnixStream {
    g.link_mut()
}

mod dns_over_tcp {
    use super::*;
    use crate::dns_tcp;
    use crate::hostile::TcpClient;
    use simple_dns::rdata::{RData, A};
    use simple_dns::{Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, TYPE};
    use std::io::{Read, Write};

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut p = Packet::new_query(id);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(Name::new_unchecked(name), TYPE::A.into(), CLASS::IN.into(), false));
        p.build_bytes_vec().unwrap()
    }

    /// A resolver over TCP on host loopback: `many.test` gets 80 A records (an answer
    /// too large for classic UDP), `rebind.test` a private address, others one public
    /// address. Serves for `life`, then exits; counts the queries it answered.
    fn resolver(life: Duration) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let count = served.clone();
        std::thread::spawn(move || {
            let end = StdInstant::now() + life;
            while StdInstant::now() < end {
                let Ok((mut c, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut len = [0u8; 2];
                while c.read_exact(&mut len).is_ok() {
                    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if c.read_exact(&mut q).is_err() {
                        break;
                    }
                    let qp = Packet::parse(&q).unwrap();
                    let name = qp.questions[0].qname.to_string();
                    let mut r = Packet::new_reply(qp.id());
                    r.set_flags(PacketFlag::RECURSION_DESIRED | PacketFlag::RECURSION_AVAILABLE);
                    r.questions = qp.questions.clone();
                    let rec = |ip: Ipv4Addr| {
                        ResourceRecord::new(Name::new_unchecked(&name).into_owned(), CLASS::IN, 60, RData::A(A { address: ip.into() }))
                    };
                    r.answers = match name.as_str() {
                        "many.test" => (1..=80).map(|i| rec(Ipv4Addr::new(203, 0, 113, i))).collect(),
                        "rebind.test" => vec![rec(Ipv4Addr::new(10, 0, 0, 1))],
                        _ => vec![rec(Ipv4Addr::new(203, 0, 113, 10))],
                    };
                    let a = r.build_bytes_vec_compressed().unwrap();
                    let _ = c.write_all(&dns_tcp::prefixed(&a).unwrap());
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        (addr, served)
    }

    fn answers(msg: &[u8]) -> (u16, u16, Vec<Ipv4Addr>) {
        let p = Packet::parse(msg).unwrap();
        let ips = p
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect();
        (p.id(), u16::from_be_bytes([msg[2], msg[3]]) & 0xf, ips)
    }

    /// Splits `bytes` into length-prefixed messages (all complete ones).
    fn messages(bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 2 {
            let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
            if rest.len() < 2 + n {
                break;
            }
            out.push(rest[2..2 + n].to_vec());
            rest = &rest[2 + n..];
        }
        out
    }

    fn config_with(resolver: SocketAddr) -> NetworkConfig {
        let policy = NetworkPolicy::from_wire(&serde_json::json!({"preset": "public_only", "deny_domains": ["blocked.test"]})).unwrap();
        let mut c = config(policy);
        c.dns.nameservers = vec![Nameserver::Addr(resolver)];
        c.dns.query_timeout_ms = 2000;
        c
    }

    #[test]
    fn pipelined_queries_are_filtered_forwarded_and_answered_in_order() {
        let (addr, served) = resolver(Duration::from_secs(10));
        let mut g = Guest::new(config_with(addr));
        let mut c = TcpClient::connect(&mut g, 40053, GW, 53, Duration::from_secs(2)).expect("the gateway takes DNS over TCP");
        let mut wire = Vec::new();
        for (id, name) in [(1, "inet.test"), (2, "blocked.test"), (3, "many.test"), (4, "rebind.test")] {
            wire.extend(dns_tcp::prefixed(&query(id, name)).unwrap());
        }
        c.send(&mut g, &wire);
        assert!(c.run_until(&mut g, Duration::from_secs(10), |c| messages(&c.received).len() == 4), "4 answers");
        let got: Vec<_> = messages(&c.received).iter().map(|m| answers(m)).collect();
        assert_eq!(got[0], (1, 0, vec![Ipv4Addr::new(203, 0, 113, 10)]));
        assert_eq!((got[1].0, got[1].1, got[1].2.len()), (2, 3, 0), "denied name: NXDOMAIN, never forwarded");
        assert_eq!((got[2].0, got[2].1, got[2].2.len()), (3, 0, 80), "a large answer arrives whole over TCP");
        assert!(messages(&c.received)[2].len() > 512);
        assert!(got[3].0 == 4 && got[3].2.is_empty(), "rebind protection drops the private answer: {:?}", got[3]);
        assert_eq!(served.load(Ordering::Relaxed), 3);
        assert!(g.log_text().contains("blocked.test"), "{}", g.log_text());
        // Also to an address other than the gateway: the same filter, never relayed.
        let mut c = TcpClient::connect(&mut g, 40054, Ipv4Addr::new(203, 0, 113, 53), 53, Duration::from_secs(2)).unwrap();
        c.send(&mut g, &dns_tcp::prefixed(&query(9, "blocked.test")).unwrap());
        assert!(c.run_until(&mut g, Duration::from_secs(5), |c| messages(&c.received).len() == 1));
        assert_eq!(answers(&messages(&c.received)[0]).1, 3);
        assert_eq!(g.stack.occupancy().tcp, 0, "no relayed connection was opened");
    }

    #[test]
    fn no_resolver_means_servfail() {
        let mut g = Guest::new(config_with("127.0.0.1:9".parse().unwrap()));
        let mut c = TcpClient::connect(&mut g, 40055, GW, 53, Duration::from_secs(2)).unwrap();
        c.send(&mut g, &dns_tcp::prefixed(&query(5, "inet.test")).unwrap());
        assert!(c.run_until(&mut g, Duration::from_secs(5), |c| messages(&c.received).len() == 1));
        assert_eq!(answers(&messages(&c.received)[0]).1, 2);
    }

    #[test]
    fn hostile_streams_are_bounded() {
        let (addr, _) = resolver(Duration::from_secs(10));
        let mut g = Guest::new(config_with(addr));
        // A zero length ends the connection.
        let mut c = TcpClient::connect(&mut g, 41000, GW, 53, Duration::from_secs(2)).unwrap();
        c.send(&mut g, &[0, 0, 1, 2, 3]);
        assert!(c.run_until(&mut g, Duration::from_secs(2), |c| c.reset), "RST after a zero length");
        // A lying length: 65,535 announced, 10 sent — the stack waits, holding 12 bytes.
        let mut liar = TcpClient::connect(&mut g, 41001, GW, 53, Duration::from_secs(2)).unwrap();
        liar.send(&mut g, &[0xff, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        g.run_for(Duration::from_millis(20)).unwrap();
        assert!(liar.received.is_empty() && !liar.reset);
        // Garbage that is framed correctly: the filter refuses it (FORMERR) or drops it.
        let mut junk = TcpClient::connect(&mut g, 41002, GW, 53, Duration::from_secs(2)).unwrap();
        junk.send(&mut g, &dns_tcp::prefixed(&[0xde, 0xad, 0xbe, 0xef, 0, 9, 0, 9, 0, 9, 0, 9, 0xc0, 12]).unwrap());
        junk.send(&mut g, &dns_tcp::prefixed(&query(6, "inet.test")).unwrap());
        junk.run_until(&mut g, Duration::from_secs(5), |c| messages(&c.received).iter().any(|m| answers(m).0 == 6));
        assert!(messages(&junk.received).iter().any(|m| answers(m).0 == 6), "the connection still serves");
        // At most MAX_CONNS connections: the next SYN gets a RST.
        let open = g.stack.occupancy().dns_tcp;
        for i in 0..(dns_tcp::MAX_CONNS - open) as u16 {
            assert!(TcpClient::connect(&mut g, 42000 + i, GW, 53, Duration::from_secs(2)).is_some());
        }
        assert_eq!(g.stack.occupancy().dns_tcp, dns_tcp::MAX_CONNS);
        assert!(TcpClient::connect(&mut g, 43000, GW, 53, Duration::from_secs(2)).is_none());
        assert!(g.log_text().contains("refused DNS over TCP"));
    }
}

mod icmp_echo {
    use super::*;

    fn replies(g: &Guest) -> Vec<(IpAddr, u16, u16, Vec<u8>)> {
        g.inbox.iter().filter_map(|f| hostile::echo_reply(f)).collect()
    }

    #[test]
    fn the_gateway_answers_its_own_pings_and_refusals_are_prohibited_at_once() {
        let mut g = Guest::new(config(NetworkPolicy::public_only()));
        let f = g.ping(GW, 77, 1, b"abcdef");
        g.send(&f).unwrap();
        assert!(g.run_until(Duration::from_secs(2), |inbox| inbox.iter().any(|f| hostile::echo_reply(f).is_some())));
        assert_eq!(replies(&g), vec![(GW.into(), 77, 1, b"abcdef".to_vec())]);
        // The policy refuses private and loopback: "administratively prohibited", logged.
        for dst in [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(169, 254, 169, 254)] {
            let f = g.ping(dst, 78, 1, b"x");
            g.send(&f).unwrap();
        }
        g.run_for(Duration::from_millis(30)).unwrap();
        let prohibited = g
            .inbox
            .iter()
            .filter(|f| {
                let eth = smoltcp::wire::EthernetFrame::new_checked(&f[..]).unwrap();
                let ip = smoltcp::wire::Ipv4Packet::new_checked(eth.payload()).unwrap();
                ip.next_header() == smoltcp::wire::IpProtocol::Icmp && ip.payload()[0] == 3 && ip.payload()[1] == 13
            })
            .count();
        assert_eq!(prohibited, 3);
        assert!(g.log_text().contains("refused ICMP echo to 10.0.0.1"), "{}", g.log_text());
        assert_eq!(g.stack.occupancy().ping_sessions, 0, "nothing was sent for a refused ping");
    }

    #[test]
    fn allowed_pings_go_through_a_host_ping_socket_or_say_why_not() {
        // Loopback only: a policy that allows 127.0.0.1 and nothing else.
        let policy = NetworkPolicy::custom(
            Action::Deny,
            Action::Deny,
            vec![Rule {
                action: Action::Allow,
                direction: RuleDirection::Egress,
                destination: Destination::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                protocols: Vec::new(),
                ports: Vec::new(),
            }],
        );
        let mut g = Guest::new(config(policy));
        for seq in 1..=3 {
            let f = g.ping(Ipv4Addr::LOCALHOST, 4242, seq, b"payload-0123456789");
            g.send(&f).unwrap();
        }
        if icmp::available() {
            let ok = g.run_until(Duration::from_secs(5), |inbox| inbox.iter().filter_map(|f| hostile::echo_reply(f)).count() >= 3);
            assert!(ok, "three echo replies from host loopback");
            for (i, (from, ident, seq, data)) in replies(&g).into_iter().enumerate() {
                assert_eq!((from, ident, seq, data), (Ipv4Addr::LOCALHOST.into(), 4242, i as u16 + 1, b"payload-0123456789".to_vec()));
            }
            assert_eq!(g.stack.occupancy().ping_sessions, 1);
        } else {
            g.run_for(Duration::from_millis(50)).unwrap();
            assert!(replies(&g).is_empty());
            let text = g.log_text();
            assert_eq!(text.matches("ICMP echo (ping) is unavailable").count(), 1, "said once: {text}");
            assert!(text.contains("net.ipv4.ping_group_range"));
        }
    }

    #[test]
    fn a_ping_flood_from_a_guest_that_never_reads_is_bounded() {
        let mut g = Guest::new(config(NetworkPolicy::public_only()));
        g.deaf = true;
        let f = g.ping(GW, 1, 1, &[0x55; 1000]);
        let mut wire = Vec::new();
        for _ in 0..500 {
            frame::encode(&f, &mut wire);
        }
        let mut pos = 0;
        for _ in 0..300 {
            match std::io::Write::write(g.link_mut(), &wire[pos..]) {
                Ok(n) => pos = (pos + n) % wire.len(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            g.step().unwrap(); // checks the bounds
        }
        g.deaf = false;
        g.run_for(Duration::from_millis(50)).unwrap();
        assert!(!replies(&g).is_empty(), "the gateway answers again once the guest reads");
    }
}

mod fragments {
    use super::*;

    #[test]
    fn fragmented_udp_and_syns_are_reassembled_before_anything_looks_at_them() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let port = sink.local_addr().unwrap().port();
        let mut g = Guest::new(config(gateway_only()));
        let data: Vec<u8> = (0..4000u32).map(|i| (i * 13 % 256) as u8).collect();
        let whole = g.udp(5555, GW, port, &data);
        let mut pieces = hostile::fragments(&whole, 1480);
        assert_eq!(pieces.len(), 3);
        pieces.reverse(); // out of order
        for f in &pieces {
            g.send(f).unwrap();
        }
        g.run_for(Duration::from_millis(20)).unwrap();
        let mut buf = vec![0u8; 65536];
        let (n, _) = sink.recv_from(&mut buf).expect("the reassembled datagram arrived");
        assert_eq!(&buf[..n], &data[..]);
        // A fragmented SYN is a SYN.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let syn = g.tcp(6000, GW, listener.local_addr().unwrap().port(), TcpControl::Syn, 1, None, &[0u8; 0]);
        // Pad the SYN with a few TCP option bytes' worth so it splits: 24-byte TCP header.
        let pieces = hostile::fragments(&syn, 8);
        assert!(pieces.len() >= 2);
        for f in &pieces {
            g.send(f).unwrap();
        }
        let ok = g.run_until(Duration::from_secs(5), |inbox| {
            inbox.iter().filter_map(|f| hostile::segment(f)).any(|s| s.dst_port == 6000 && s.syn && s.ack)
        });
        assert!(ok, "SYN-ACK for the fragmented SYN");
        // A fragmented DNS query for a denied name is refused like a whole one.
        let policy = NetworkPolicy::from_wire(&serde_json::json!({"preset": "public_only", "deny_domains": ["blocked.test"]})).unwrap();
        let mut g = Guest::new(config(policy));
        let query: &[u8] = &[
            0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'b', b'l', b'o', b'c', b'k', b'e', b'd', 4, b't', b'e', b's',
            b't', 0, 0, 1, 0, 1,
        ];
        let q = g.udp(5353, GW, 53, query);
        for f in hostile::fragments(&q, 16) {
            g.send(&f).unwrap();
        }
        assert!(g.run_until(Duration::from_secs(2), |inbox| inbox
            .iter()
            .filter_map(|f| hostile::datagram(f))
            .any(|(_, p, d)| p == 5353 && d.len() >= 4 && d[3] & 0xf == 3)));
    }

    #[test]
    fn fragment_games_are_dropped_and_bounded() {
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_nonblocking(true).unwrap();
        let port = sink.local_addr().unwrap().port();
        let mut g = Guest::new(config(gateway_only()));
        let data = vec![9u8; 3000];
        let whole = g.udp(5556, GW, port, &data);
        let pieces = hostile::fragments(&whole, 1480);
        // Overlap: the second piece shifted back by 8 bytes.
        let mut shifted = pieces[1].clone();
        {
            let mut p = Ipv4Packet::new_unchecked(&mut shifted[14..]);
            p.set_frag_offset(1472);
            p.fill_checksum();
        }
        for f in [&pieces[0], &shifted, &pieces[1], &pieces[2]] {
            g.send(f).unwrap();
        }
        // Never-completed datagrams by the thousand, and spoofed fragments.
        for id in 0..2000u16 {
            let mut f = pieces[0].clone();
            let mut p = Ipv4Packet::new_unchecked(&mut f[14..]);
            p.set_ident(id);
            p.fill_checksum();
            g.send(&f).unwrap();
            if id % 64 == 0 {
                g.step().unwrap();
            }
        }
        let mut spoofed = pieces[0].clone();
        spoofed[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x66]);
        g.send(&spoofed).unwrap();
        g.run_for(Duration::from_millis(20)).unwrap();
        let mut buf = [0u8; 4096];
        assert!(sink.recv_from(&mut buf).is_err(), "nothing reached the host");
        assert!(g.stack.occupancy().reassemblies <= frag::MAX_DATAGRAMS);
    }
}

mod send_buffers {
    use super::*;
    use crate::hostile::TcpClient;
    use crate::stack::send_buffer::{EXTRA_BUDGET, MAX_SEND_BUFFER};
    use std::io::Write;

    /// A host source on loopback that writes up to `bytes` to each of up to `conns`
    /// clients (each write gives up after 20 s: everything ends by itself).
    fn source(conns: usize, bytes: usize) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for _ in 0..conns {
                let Ok((mut c, _)) = listener.accept() else { return };
                std::thread::spawn(move || {
                    let _ = c.set_write_timeout(Some(Duration::from_secs(20)));
                    let chunk = vec![0x5au8; 64 * 1024];
                    let mut sent = 0;
                    while sent < bytes && c.write_all(&chunk).is_ok() {
                        sent += chunk.len();
                    }
                });
            }
        });
        port
    }

    fn step_until(g: &mut Guest, limit: Duration, mut done: impl FnMut(&Occupancy) -> bool) -> bool {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if done(&g.stack.occupancy()) {
                return true;
            }
            g.step().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        done(&g.stack.occupancy())
    }

    #[test]
    fn a_guest_that_never_acknowledges_holds_at_most_the_base_buffers_plus_the_budget() {
        let clients = 12;
        let port = source(clients + 1, 8 << 20);
        let mut cfg = config(gateway_only());
        cfg.max_connections = 16;
        let base = cfg.tcp_buffer;
        let mut g = Guest::new(cfg);
        let mut conns: Vec<TcpClient> = (0..clients as u16)
            .map(|i| TcpClient::connect(&mut g, 42000 + i, GW, port, Duration::from_secs(5)).expect("connected"))
            .collect();
        // The guest acknowledges nothing: every send buffer fills from its host socket.
        let bound = clients * base + EXTRA_BUDGET;
        let full = step_until(&mut g, Duration::from_secs(20), |o| o.relayed == clients && o.send_queued == o.send_buffers);
        let o = g.stack.occupancy();
        assert!(full, "the send buffers filled ({} of {} bytes)", o.send_queued, o.send_buffers);
        assert_eq!(o.send_buffers, bound, "the first connections got large buffers until the budget ran out");
        assert_eq!(o.send_budget_left, 0);
        // Closed connections give their share back: the next one gets the largest buffer.
        for c in &mut conns {
            c.reset(&mut g);
        }
        assert!(step_until(&mut g, Duration::from_secs(10), |o| o.relayed == 0), "the reset connections were freed");
        assert_eq!(g.stack.occupancy().send_budget_left, EXTRA_BUDGET);
        let _late = TcpClient::connect(&mut g, 43000, GW, port, Duration::from_secs(5)).expect("connected");
        assert!(step_until(&mut g, Duration::from_secs(5), |o| o.relayed == 1));
        assert_eq!(g.stack.occupancy().send_buffers, MAX_SEND_BUFFER);
    }
}
