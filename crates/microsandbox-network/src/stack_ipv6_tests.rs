//! IPv6 on the guest link and the UDP session bounds, against a real [`Stack`] driven by
//! [`crate::hostile::Guest`] (bounds checked after every iteration). Traffic reaches
//! host loopback only (`::1` / 127.0.0.1 behind the gateway), and only where the test's
//! policy allows it.

use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::time::Duration;

use smoltcp::wire::{Icmpv6Repr, NdiscNeighborFlags, NdiscRepr, RawHardwareAddress};

use super::*;
use crate::config::GATEWAY_LINK_LOCAL;
use crate::dns::Nameserver;
use crate::guard::eui64_link_local;
use crate::hostile::{self, Guest, TcpClient};
use crate::policy::{Destination, NetworkPolicy, Rule, RuleDirection};

fn config(policy: NetworkPolicy) -> NetworkConfig {
    let mut c = NetworkConfig::with_defaults();
    c.mtu = 1500;
    c.policy = policy;
    c.dns.nameservers = vec![Nameserver::parse("127.0.0.1:9").unwrap()];
    c.dns.query_timeout_ms = 200;
    c
}

/// Egress allowed to the gateway's addresses only (host loopback, both families).
fn gateway_only(c: &NetworkConfig) -> NetworkPolicy {
    let allow = |ip: IpAddr| Rule {
        action: Action::Allow,
        direction: RuleDirection::Egress,
        destination: Destination::Ip(ip),
        protocols: Vec::new(),
        ports: Vec::new(),
    };
    NetworkPolicy::custom(Action::Deny, Action::Deny, vec![allow(c.gateway_ip.into()), allow(c.gateway_ip6.into())])
}

/// A guest with IPv6: it has asked for the gateway's MAC (so the stack knows its own).
fn guest(policy: impl FnOnce(&NetworkConfig) -> NetworkPolicy) -> Guest {
    let mut c = config(NetworkPolicy::public_only());
    c.policy = policy(&c);
    let mut g = Guest::new(c);
    let ns = g.neighbor_solicit(g.cfg.guest_ip6, g.cfg.gateway_ip6, Some(g.cfg.guest_mac));
    g.send(&ns).unwrap();
    assert!(g.run_until(Duration::from_secs(2), |inbox| !advertisements(inbox).is_empty()), "the gateway answers");
    g.inbox.clear();
    g
}

/// Neighbour advertisements to the guest: (target, MAC in the option).
fn advertisements(inbox: &[Vec<u8>]) -> Vec<(Ipv6Addr, Option<[u8; 6]>)> {
    inbox
        .iter()
        .filter_map(|f| {
            let (_, _, ty, _, msg) = hostile::icmp6_message(f)?;
            if ty != 136 {
                return None;
            }
            let p = smoltcp::wire::Icmpv6Packet::new_checked(&msg[..]).ok()?;
            match NdiscRepr::parse(&p).ok()? {
                NdiscRepr::NeighborAdvert { target_addr, lladdr, .. } => {
                    Some((target_addr, lladdr.map(|l| l.as_bytes().try_into().unwrap())))
                }
                _ => None,
            }
        })
        .collect()
}

fn rsts_to(inbox: &[Vec<u8>], port: u16) -> usize {
    inbox.iter().filter_map(|f| hostile::segment(f)).filter(|s| s.dst_port == port && s.rst).count()
}

#[test]
fn the_gateway_answers_neighbour_solicitations_for_its_two_addresses_only() {
    let mut g = Guest::new(config(NetworkPolicy::public_only()));
    let (me6, ll, gw6, mac) = (g.cfg.guest_ip6, eui64_link_local(g.cfg.guest_mac), g.cfg.gateway_ip6, g.cfg.guest_mac);
    for (src, target) in [(me6, gw6), (ll, GATEWAY_LINK_LOCAL)] {
        g.inbox.clear();
        let f = g.neighbor_solicit(src, target, Some(mac));
        let d0 = g.counters.dropped_frames.load(Ordering::Relaxed);
        g.send(&f).unwrap();
        let ok = g.run_until(Duration::from_secs(2), |inbox| !advertisements(inbox).is_empty());
        assert!(ok, "an answer for {target} (dropped {}; inbox {:?})", g.counters.dropped_frames.load(Ordering::Relaxed) - d0, g.inbox);
        assert_eq!(advertisements(&g.inbox), vec![(target, Some(g.cfg.gateway_mac))]);
    }
    // Anything else gets no answer (smoltcp's any_ip would otherwise answer for every
    // address whose low 24 bits match the gateway's): other addresses on the link, the
    // internet, the guest's own addresses (duplicate address detection from `::`).
    g.inbox.clear();
    let dropped = g.counters.dropped_frames.load(Ordering::Relaxed);
    let others = [
        (me6, "fd42:6d73:62::3".parse().unwrap()),
        (me6, "2001:db8:6d73::10".parse().unwrap()),
        (me6, "fd00::1".parse().unwrap()),
        (Ipv6Addr::UNSPECIFIED, me6),
        (Ipv6Addr::UNSPECIFIED, gw6),
        // spoofed: another source, or another MAC in the option
        ("fd42:6d73:62::9".parse().unwrap(), gw6),
        (me6, gw6),
    ];
    for (i, (src, target)) in others.iter().enumerate() {
        let lladdr = if i == others.len() - 1 { Some([2, 0, 0, 0, 0, 0x99]) } else { (!src.is_unspecified()).then_some(mac) };
        let f = g.neighbor_solicit(*src, *target, lladdr);
        g.send(&f).unwrap();
    }
    g.run_for(Duration::from_millis(30)).unwrap();
    assert!(advertisements(&g.inbox).is_empty(), "{:?}", advertisements(&g.inbox));
    assert_eq!(g.counters.dropped_frames.load(Ordering::Relaxed) - dropped, others.len() as u64);
}

#[test]
fn router_advertisements_redirects_spoofed_adverts_and_dhcpv6_from_the_guest_are_dropped() {
    let mut g = guest(|c| gateway_only(c));
    let (me6, gw6, mac) = (g.cfg.guest_ip6, g.cfg.gateway_ip6, g.cfg.guest_mac);
    let ll = eui64_link_local(mac);
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let lladdr = Some(RawHardwareAddress::from_bytes(&mac));
    let hostile = vec![
        // "I am a router" (a guest that wants to steer the host side).
        g.router_advert(),
        // "The gateway's address is at my MAC."
        g.icmp6(me6, all_nodes, &Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert { flags: NdiscNeighborFlags::OVERRIDE, target_addr: gw6, lladdr })),
        g.icmp6(me6, all_nodes, &Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert { flags: NdiscNeighborFlags::OVERRIDE, target_addr: GATEWAY_LINK_LOCAL, lladdr })),
        // A router solicitation (no advertisements here: the address is static).
        g.icmp6(ll, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), &Icmpv6Repr::Ndisc(NdiscRepr::RouterSolicit { lladdr })),
        // DHCPv6, as a client and as a server.
        g.udp(546, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2), 547, b"solicit"),
        g.udp(547, me6, 546, b"advertise"),
        // TCP and UDP from an address the guest was not given.
        {
            let mut f = g.syn(40000, gw6, 80);
            f[22 + 15] ^= 0x0f; // source address, last byte (checksum now wrong too)
            f
        },
    ];
    let dropped = g.counters.dropped_frames.load(Ordering::Relaxed);
    for f in &hostile {
        g.send(f).unwrap();
    }
    g.run_for(Duration::from_millis(30)).unwrap();
    assert_eq!(g.counters.dropped_frames.load(Ordering::Relaxed) - dropped, hostile.len() as u64);
    assert_eq!(g.stack.occupancy().udp_sessions, 0);
    assert_eq!(g.stack.occupancy().tcp, 0);
    // The gateway still answers for itself with its own MAC.
    let f = g.neighbor_solicit(me6, gw6, Some(mac));
    g.send(&f).unwrap();
    assert!(g.run_until(Duration::from_secs(2), |inbox| !advertisements(inbox).is_empty()));
    assert_eq!(advertisements(&g.inbox), vec![(gw6, Some(g.cfg.gateway_mac))]);
}

#[test]
fn tcp_over_ipv6_to_the_gateway_is_relayed_to_host_loopback() {
    let Ok(listener) = TcpListener::bind("[::1]:0") else {
        panic!("this host has no ::1 (IPv6 disabled?): the IPv6 relay cannot be tested");
    };
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut c, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        c.write_all(format!("got {} from {}", String::from_utf8_lossy(&buf), peer.ip()).as_bytes()).unwrap();
    });
    let mut g = guest(|c| gateway_only(c));
    let gw6 = g.cfg.gateway_ip6;
    let mut c = TcpClient::connect(&mut g, 41000, gw6, port, Duration::from_secs(5)).expect("connected");
    c.send(&mut g, b"hello");
    let want = b"got hello from ::1".to_vec();
    assert!(c.run_until(&mut g, Duration::from_secs(5), |c| c.received == want && c.fin), "{:?}", String::from_utf8_lossy(&c.received));
    server.join().unwrap();
}

#[test]
fn ipv6_destinations_the_policy_forbids_are_refused_at_the_syn() {
    let mut g = guest(|_| NetworkPolicy::public_only());
    let gw6 = g.cfg.gateway_ip6;
    let targets: Vec<(Ipv6Addr, u16)> = vec![
        ("::1".parse().unwrap(), 22),
        ("::ffff:127.0.0.1".parse().unwrap(), 22),
        ("::ffff:169.254.169.254".parse().unwrap(), 80),
        ("fe80::1234".parse().unwrap(), 80),
        ("fd00:ec2::254".parse().unwrap(), 80),
        ("fd12:3456::1".parse().unwrap(), 80),
        ("64:ff9b::7f00:1".parse().unwrap(), 80),
        ("2002:7f00:1::1".parse().unwrap(), 80),
        (gw6, 22),
        (GATEWAY_LINK_LOCAL, 22),
    ];
    for (i, (dst, port)) in targets.iter().enumerate() {
        let f = g.syn(30000 + i as u16, *dst, *port);
        g.send(&f).unwrap();
        g.step().unwrap();
        assert!(g.stack.pending.is_empty(), "no host-side connect to [{dst}]:{port}");
    }
    g.run_for(Duration::from_millis(50)).unwrap();
    for (i, (dst, port)) in targets.iter().enumerate() {
        assert_eq!(rsts_to(&g.inbox, 30000 + i as u16), 1, "RST for [{dst}]:{port}");
        assert!(g.log_text().contains(&format!("refused TCP connection to [{dst}]:{port}")), "{}", g.log_text());
    }
    // Multicast and unspecified destinations: smoltcp answers nothing (as for IPv4
    // broadcast), and no host socket is opened.
    for dst in ["ff02::1", "::"] {
        let f = g.syn(31000, dst.parse::<Ipv6Addr>().unwrap(), 80);
        g.send(&f).unwrap();
    }
    g.run_for(Duration::from_millis(20)).unwrap();
    assert_eq!(g.stack.occupancy().tcp, 0);
}

#[test]
fn udp_and_dns_over_ipv6() {
    let echo = UdpSocket::bind("[::1]:0").unwrap();
    echo.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = echo.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, from) = echo.recv_from(&mut buf).unwrap();
        echo.send_to(&buf[..n], from).unwrap();
    });
    let mut g = guest(|c| gateway_only(c));
    let gw6 = g.cfg.gateway_ip6;
    let f = g.udp(5555, gw6, port, b"v6 datagram");
    g.send(&f).unwrap();
    let want = (SocketAddr::new(gw6.into(), port), 5555, b"v6 datagram".to_vec());
    assert!(g.run_until(Duration::from_secs(5), |inbox| inbox.iter().filter_map(|f| hostile::datagram(f)).any(|d| d == want)));
    server.join().unwrap();
    // DNS to the gateway's IPv6 address: filtered like IPv4 (this policy has no DNS
    // rule: NXDOMAIN, answered locally from the address the guest asked).
    let q: &[u8] = &[0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 4, b't', b'e', b's', b't', 0, 0, 28, 0, 1];
    let f = g.udp(5353, gw6, 53, q);
    g.send(&f).unwrap();
    let ok = g.run_until(Duration::from_secs(3), |inbox| {
        inbox.iter().filter_map(|f| hostile::datagram(f)).any(|(from, to, a)| {
            from == SocketAddr::new(gw6.into(), 53) && to == 5353 && a.len() >= 4 && a[..2] == [0xab, 0xcd] && a[3] & 0x0f == 3
        })
    });
    assert!(ok, "NXDOMAIN from [gateway]:53");
}

#[test]
fn icmpv6_echo_the_gateway_answers_refusals_are_prohibited() {
    let mut g = guest(|_| NetworkPolicy::public_only());
    let gw6 = g.cfg.gateway_ip6;
    for dst in [gw6, GATEWAY_LINK_LOCAL] {
        let f = g.ping(dst, 9, 1, b"abc");
        g.send(&f).unwrap();
    }
    g.run_for(Duration::from_millis(30)).unwrap();
    let replies: Vec<_> = g.inbox.iter().filter_map(|f| hostile::echo_reply(f)).collect();
    assert_eq!(replies, vec![(gw6.into(), 9, 1, b"abc".to_vec()), (GATEWAY_LINK_LOCAL.into(), 9, 1, b"abc".to_vec())]);
    g.inbox.clear();
    for dst in ["::1", "fd00:ec2::254", "fe80::9"] {
        let f = g.ping(dst.parse::<Ipv6Addr>().unwrap(), 10, 1, b"x");
        g.send(&f).unwrap();
    }
    g.run_for(Duration::from_millis(30)).unwrap();
    let prohibited = g.inbox.iter().filter_map(|f| hostile::icmp6_message(f)).filter(|m| (m.2, m.3) == (1, 1)).count();
    assert_eq!(prohibited, 3);
    assert!(g.log_text().contains("refused ICMP echo to ::1"), "{}", g.log_text());
    assert_eq!(g.stack.occupancy().ping_sessions, 0);
}

#[test]
fn allowed_icmpv6_echo_goes_through_a_host_ping_socket_or_says_why_not() {
    // Host loopback only: a policy that allows ::1 and nothing else.
    let mut g = guest(|_| {
        NetworkPolicy::custom(
            Action::Deny,
            Action::Deny,
            vec![Rule {
                action: Action::Allow,
                direction: RuleDirection::Egress,
                destination: Destination::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                protocols: Vec::new(),
                ports: Vec::new(),
            }],
        )
    });
    for seq in 1..=3 {
        let f = g.ping(Ipv6Addr::LOCALHOST, 4343, seq, b"payload6");
        g.send(&f).unwrap();
    }
    let replies = |g: &Guest| g.inbox.iter().filter_map(|f| hostile::echo_reply(f)).collect::<Vec<_>>();
    if icmp::available6() {
        assert!(g.run_until(Duration::from_secs(5), |inbox| inbox.iter().filter_map(|f| hostile::echo_reply(f)).count() >= 3));
        for (i, r) in replies(&g).into_iter().enumerate() {
            assert_eq!(r, (Ipv6Addr::LOCALHOST.into(), 4343, i as u16 + 1, b"payload6".to_vec()));
        }
        assert_eq!(g.stack.occupancy().ping_sessions, 1);
    } else {
        g.run_for(Duration::from_millis(50)).unwrap();
        assert!(replies(&g).is_empty());
        let text = g.log_text();
        assert_eq!(text.matches("ICMP echo (ping) is unavailable").count(), 1, "said once: {text}");
    }
}

#[test]
fn ipv6_extension_headers_other_than_fragments_are_dropped() {
    let mut g = guest(|c| gateway_only(c));
    let gw6 = g.cfg.gateway_ip6;
    let dropped = g.counters.dropped_frames.load(Ordering::Relaxed);
    for next_header in [0u8, 43, 60, 59] {
        let mut f = g.udp(6000, gw6, 9, b"xxxxxxxx");
        f[14 + 6] = next_header; // hop-by-hop, routing, destination options, none
        g.send(&f).unwrap();
    }
    g.run_for(Duration::from_millis(20)).unwrap();
    assert_eq!(g.counters.dropped_frames.load(Ordering::Relaxed) - dropped, 4);
    assert_eq!(g.stack.occupancy().udp_sessions, 0);
}

/// IPv6 fragments (a Fragment header right after the fixed header) are reassembled
/// before the guard, as IPv4 ones are: a datagram larger than the link MTU, a SYN, a DNS
/// query in pieces all take the ordinary path once whole.
#[test]
fn ipv6_fragments_are_reassembled_before_anything_looks_at_them() {
    let sink = UdpSocket::bind("[::1]:0").unwrap();
    sink.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let port = sink.local_addr().unwrap().port();
    let mut g = guest(|c| gateway_only(c));
    let gw6 = g.cfg.gateway_ip6;
    // 4,000 bytes through a 1,500-byte link: three pieces, sent out of order.
    let data: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 253) as u8).collect();
    let whole = g.udp(5555, gw6, port, &data);
    let mut pieces = hostile::fragments6(&whole, 1448, 0x1234_5678);
    assert_eq!(pieces.len(), 3);
    pieces.swap(0, 2);
    for f in &pieces {
        g.send(f).unwrap();
    }
    g.run_for(Duration::from_millis(20)).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = sink.recv_from(&mut buf).expect("the reassembled datagram arrived");
    assert_eq!(&buf[..n], &data[..]);
    // An atomic fragment (a Fragment header on a whole packet) is that packet.
    let small = g.udp(5556, gw6, port, b"atomic");
    g.send(&hostile::fragments6(&small, 1448, 7)[0]).unwrap();
    g.run_for(Duration::from_millis(20)).unwrap();
    let (n, _) = sink.recv_from(&mut buf).expect("the atomic fragment's datagram arrived");
    assert_eq!(&buf[..n], b"atomic");
    // A fragmented SYN is a SYN: the stack connects and answers SYN-ACK.
    let listener = TcpListener::bind("[::1]:0").unwrap();
    let syn = g.syn(6000, gw6, listener.local_addr().unwrap().port());
    let pieces = hostile::fragments6(&syn, 8, 99);
    assert!(pieces.len() >= 2);
    for f in &pieces {
        g.send(f).unwrap();
    }
    assert!(g.run_until(Duration::from_secs(5), |inbox| {
        inbox.iter().filter_map(|f| hostile::segment(f)).any(|s| s.dst_port == 6000 && s.syn && s.ack)
    }));
    // A fragmented DNS query goes through the filter like a whole one (no DNS rule here:
    // NXDOMAIN from the gateway).
    let q: &[u8] = &[0xab, 0xce, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 4, b't', b'e', b's', b't', 0, 0, 28, 0, 1];
    for f in hostile::fragments6(&g.udp(5353, gw6, 53, q), 16, 100) {
        g.send(&f).unwrap();
    }
    assert!(g.run_until(Duration::from_secs(3), |inbox| {
        inbox.iter().filter_map(|f| hostile::datagram(f)).any(|(_, to, a)| to == 5353 && a.len() >= 4 && a[..2] == [0xab, 0xce] && a[3] & 0x0f == 3)
    }));
}

#[test]
fn ipv6_fragment_games_are_dropped_and_bounded() {
    let sink = UdpSocket::bind("[::1]:0").unwrap();
    sink.set_nonblocking(true).unwrap();
    let port = sink.local_addr().unwrap().port();
    let mut g = guest(|c| gateway_only(c));
    let gw6 = g.cfg.gateway_ip6;
    let whole = g.udp(5557, gw6, port, &[9u8; 3000]);
    let pieces = hostile::fragments6(&whole, 1448, 1);
    // Overlap: the second piece moved back by 8 bytes, then the real pieces.
    let mut shifted = pieces[1].clone();
    shifted[14 + 42..14 + 44].copy_from_slice(&((1440u16 / 8) << 3 | 1).to_be_bytes());
    for f in [&pieces[0], &shifted, &pieces[1], &pieces[2]] {
        g.send(f).unwrap();
    }
    // Fragments from other sources (the link-local address, a neighbour, the gateway):
    // never kept.
    for src in [eui64_link_local(g.cfg.guest_mac), "fd42:6d73:62::3".parse().unwrap(), gw6] {
        for f in hostile::fragments6(&whole, 1448, 2) {
            let mut f = f;
            f[22..38].copy_from_slice(&Ipv6Addr::octets(&src));
            g.send(&f).unwrap();
        }
    }
    g.run_for(Duration::from_millis(20)).unwrap();
    // Only the guest's own pieces after the overlap are held (they lack their start).
    assert_eq!(g.stack.occupancy().reassemblies, 1);
    // Never-completed packets by the thousand: bounded.
    for id in 0..2000u32 {
        let f = &hostile::fragments6(&whole, 1448, id + 10)[0];
        g.send(f).unwrap();
        if id % 64 == 0 {
            g.step().unwrap();
        }
    }
    g.run_for(Duration::from_millis(20)).unwrap();
    let mut buf = [0u8; 4096];
    assert!(sink.recv_from(&mut buf).is_err(), "nothing reached the host");
    let o = g.stack.occupancy();
    assert!(o.reassemblies <= frag::MAX_DATAGRAMS && o.fragments_held <= frag::MAX_DATAGRAMS * frag::MAX_DATAGRAM6);
}

/// The UDP session bounds with a fake clock ([`Stack::age_udp_sessions`]): the cap, the
/// idle expiry, and traffic that keeps a session alive.
#[test]
fn udp_sessions_are_capped_and_expire_after_the_idle_time() {
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let mut g = guest(|c| gateway_only(c));
    let gw = g.cfg.gateway_ip;
    for i in 0..(MAX_UDP_SESSIONS as u16 + 10) {
        let f = g.udp(10000 + i, gw, port, b"x");
        g.send(&f).unwrap();
        g.step().unwrap();
    }
    assert_eq!(g.stack.occupancy().udp_sessions, MAX_UDP_SESSIONS);
    assert!(g.log_text().contains(&format!("dropped UDP to 172.16.0.1:{port}: 256 UDP sessions open")), "{}", g.log_text());
    // Just short of the idle time nothing closes; one session sees traffic.
    g.stack.age_udp_sessions(UDP_IDLE - Duration::from_secs(1));
    g.step().unwrap();
    assert_eq!(g.stack.occupancy().udp_sessions, MAX_UDP_SESSIONS);
    let f = g.udp(10000, gw, port, b"still here");
    g.send(&f).unwrap();
    g.step().unwrap();
    // Past it, every session closes but the one that just spoke.
    g.stack.age_udp_sessions(Duration::from_secs(2));
    g.step().unwrap();
    assert_eq!(g.stack.occupancy().udp_sessions, 1);
    // The freed slots take new sessions again.
    let f = g.udp(20000, gw, port, b"new");
    g.send(&f).unwrap();
    g.step().unwrap();
    assert_eq!(g.stack.occupancy().udp_sessions, 2);
}

/// The idle expiry of published-port UDP peers, with the same fake clock.
#[test]
fn published_udp_peers_are_forgotten_after_the_idle_time() {
    use crate::published::{PortProtocol, PublishedPort};
    let port = PublishedPort { protocol: PortProtocol::Udp, host: "127.0.0.1:0".parse().unwrap(), guest_port: 5000 };
    let listeners = ports::bind(&[port]).unwrap();
    let addr = listeners.local_addrs()[0];
    let mut g = Guest::with_listeners(config(NetworkPolicy::public_only()), Some(listeners));
    let peers: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    for p in &peers {
        p.send_to(b"hi", addr).unwrap();
    }
    let to_guest = |inbox: &[Vec<u8>]| inbox.iter().filter_map(|f| hostile::datagram(f)).filter(|d| d.1 == 5000).count();
    assert!(g.run_until(Duration::from_secs(5), |inbox| to_guest(inbox) == 3), "three peers reach the guest");
    assert_eq!(g.stack.udp_peers(), 3);
    g.stack.age_udp_sessions(ports::UDP_PEER_IDLE - Duration::from_secs(1));
    g.step().unwrap();
    assert_eq!(g.stack.udp_peers(), 3);
    peers[0].send_to(b"again", addr).unwrap();
    assert!(g.run_until(Duration::from_secs(5), |inbox| to_guest(inbox) == 4));
    g.stack.age_udp_sessions(Duration::from_secs(2));
    g.step().unwrap();
    assert_eq!(g.stack.udp_peers(), 1, "only the peer that just spoke is still tracked");
}
