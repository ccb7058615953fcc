//! Table-driven tests of the decision, the presets and the wire parser
//! (NETWORK.md sections 9.6 and 9.12).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::json;

use super::*;
use crate::flow::{Action::*, Direction, Flow, Protocol};

const GW: &str = "172.16.0.1";

fn host() -> HostContext {
    HostContext {
        gateway: vec![GW.parse().unwrap(), "fd42:6d73:62::1".parse().unwrap()],
        host_addrs: vec!["192.168.1.20".parse().unwrap(), "198.51.100.200".parse().unwrap()],
    }
}

fn flow(direction: Direction, protocol: Protocol, remote: &str, port: u16) -> Flow {
    Flow { direction, protocol, remote: remote.parse().unwrap(), port }
}

fn tcp(remote: &str, port: u16) -> Flow {
    flow(Direction::Egress, Protocol::Tcp, remote, port)
}

fn d(s: &str) -> DomainName {
    DomainName::new(s).unwrap()
}

fn wire(v: serde_json::Value) -> NetworkPolicy {
    NetworkPolicy::from_wire(&v).unwrap_or_else(|e| panic!("{v}: {e}"))
}

fn check(policy: &NetworkPolicy, cases: &[(Flow, Action)]) {
    let (h, pins, now) = (host(), PinSet::new(), Instant::now());
    for (f, want) in cases {
        let v = policy.decide(f, &h, &pins, now);
        assert_eq!(v.action, *want, "{f:?}: {}", v.reason);
    }
}

/// NETWORK.md 9.6: every destination listed there is refused under `public_only`, and
/// the documentation ranges ("the internet" of the test suites) are reached.
#[test]
fn public_only_refuses_every_special_destination() {
    let p = NetworkPolicy::public_only();
    let denied = [
        "127.0.0.1", "127.0.0.2", "0.0.0.0", "0.1.2.3", "255.255.255.255", "240.0.0.1", "198.18.0.5",
        "169.254.169.254", "168.63.129.16", "100.100.100.200", "::1", "::ffff:127.0.0.1",
        "::ffff:169.254.169.254", "::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::1", "fd00:ec2::254",
        "fe80::1", "10.0.0.1", "172.20.1.1", "192.168.0.1", "100.64.0.1", "224.0.0.251", "ff02::1",
        "fc00::1", "::", "::ffff:10.0.0.1",
        // the host's own interface addresses, also a public one
        "192.168.1.20", "198.51.100.200", "::ffff:198.51.100.200",
    ];
    let mut cases: Vec<(Flow, Action)> = denied.iter().map(|a| (tcp(a, 80), Deny)).collect();
    cases.extend([
        // the gateway: DNS only
        (tcp(GW, 53), Allow),
        (flow(Direction::Egress, Protocol::Udp, GW, 53), Allow),
        (tcp(GW, 80), Deny),
        (tcp(GW, 22), Deny),
        (flow(Direction::Egress, Protocol::Udp, GW, 5353), Deny),
        (flow(Direction::Egress, Protocol::Icmpv4, GW, 0), Deny),
        // the internet
        (tcp("203.0.113.10", 80), Allow),
        (tcp("198.51.100.1", 443), Allow),
        (tcp("192.0.2.1", 443), Allow),
        (tcp("2001:db8::10", 443), Allow),
        (tcp("::ffff:203.0.113.10", 80), Allow),
        (flow(Direction::Egress, Protocol::Udp, "203.0.113.10", 7), Allow),
        (flow(Direction::Egress, Protocol::Icmpv4, "203.0.113.10", 0), Allow),
        // ingress (published ports) is allowed by default
        (flow(Direction::Ingress, Protocol::Tcp, "127.0.0.1", 80), Allow),
    ]);
    check(&p, &cases);
}

#[test]
fn presets() {
    let non_local = NetworkPolicy::non_local();
    check(
        &non_local,
        &[
            (tcp("10.0.0.1", 80), Allow),
            (tcp("192.168.0.1", 80), Allow),
            (tcp("100.64.0.1", 80), Allow),
            (tcp("203.0.113.10", 80), Allow),
            (tcp("127.0.0.1", 80), Deny),
            (tcp("169.254.169.254", 80), Deny),
            (tcp("100.100.100.200", 80), Deny),
            (tcp("169.254.1.1", 80), Deny),
            (tcp(GW, 80), Deny),
            (tcp("192.168.1.20", 22), Deny), // a host address on the LAN stays "host"
        ],
    );
    check(
        &NetworkPolicy::allow_all(),
        &[
            (tcp("127.0.0.1", 80), Allow),
            (tcp(GW, 80), Allow),
            (flow(Direction::Ingress, Protocol::Udp, "10.0.0.1", 53), Allow),
        ],
    );
    assert!(NetworkPolicy::none().is_none());
    assert!(!NetworkPolicy::public_only().is_none());
    check(&NetworkPolicy::none(), &[(tcp("203.0.113.10", 80), Deny), (flow(Direction::Ingress, Protocol::Tcp, "127.0.0.1", 80), Deny)]);
    assert_eq!(NetworkPolicy::default(), NetworkPolicy::public_only());
}

#[test]
fn first_match_wins_and_reports_the_rule() {
    let p = wire(json!({
        "default_egress": "deny",
        "rules": [
            {"action": "deny", "destination": "203.0.113.66"},
            {"action": "allow", "destination": "203.0.113.0/24", "protocols": ["tcp"], "ports": ["80", "8000-9000"]},
            {"action": "allow", "destination_kind": "cidr", "destination": "198.51.100.0/24", "protocol": "udp", "port": 7},
            {"action": "deny", "destination": "*"},
            {"action": "allow", "destination": "public"},
        ]
    }));
    let (h, pins, now) = (host(), PinSet::new(), Instant::now());
    let v = p.decide(&tcp("203.0.113.66", 80), &h, &pins, now);
    assert_eq!((v.action, v.rule), (Deny, Some(0)));
    assert_eq!(v.reason, "rule 0 (deny egress ip 203.0.113.66)");
    let v = p.decide(&tcp("203.0.113.10", 8500), &h, &pins, now);
    assert_eq!((v.action, v.rule), (Allow, Some(1)));
    assert_eq!(v.reason, "rule 1 (allow egress cidr 203.0.113.0/24 tcp port 80,8000-9000)");
    check(
        &p,
        &[
            (tcp("203.0.113.10", 80), Allow),
            (tcp("203.0.113.10", 81), Deny),
            (tcp("203.0.113.10", 9001), Deny),
            (flow(Direction::Egress, Protocol::Udp, "203.0.113.10", 80), Deny),
            (flow(Direction::Egress, Protocol::Udp, "198.51.100.5", 7), Allow),
            (flow(Direction::Egress, Protocol::Udp, "198.51.100.5", 8), Deny),
            (tcp("198.51.100.5", 7), Deny),
            // the mapped form matches the IPv4 CIDR
            (tcp("::ffff:203.0.113.10", 80), Allow),
            (tcp("::ffff:203.0.113.66", 80), Deny),
            // the later "allow public" is never reached: "deny *" came first
            (tcp("192.0.2.1", 443), Deny),
        ],
    );
    let v = p.decide(&tcp("192.0.2.1", 443), &h, &pins, now);
    assert_eq!(v.rule, Some(3));
    let v = NetworkPolicy::public_only().decide(&tcp("10.0.0.1", 1), &h, &pins, now);
    assert_eq!((v.rule, v.reason.as_str()), (None, "default egress deny"));
}

#[test]
fn ports_never_match_icmp_and_protocols_filter() {
    let p = wire(json!({"rules": [
        {"action": "allow", "destination": "*", "ports": ["1-65535"]},
        {"action": "allow", "destination": "*", "protocols": ["icmpv6"]},
    ]}));
    check(
        &p,
        &[
            (tcp("203.0.113.10", 1), Allow),
            (flow(Direction::Egress, Protocol::Udp, "203.0.113.10", 65535), Allow),
            (flow(Direction::Egress, Protocol::Icmpv4, "203.0.113.10", 0), Deny),
            (flow(Direction::Egress, Protocol::Icmpv6, "2001:db8::1", 0), Allow),
        ],
    );
}

#[test]
fn directions() {
    let p = wire(json!({"default_ingress": "deny", "rules": [
        {"action": "allow", "direction": "ingress", "destination": "loopback", "ports": ["8080"]},
        {"action": "deny", "direction": "any", "destination": "10.0.0.0/8"},
        {"action": "allow", "direction": "egress", "destination": "private"},
    ]}));
    check(
        &p,
        &[
            (flow(Direction::Ingress, Protocol::Tcp, "127.0.0.1", 8080), Allow),
            (flow(Direction::Ingress, Protocol::Tcp, "127.0.0.1", 8081), Deny),
            (flow(Direction::Ingress, Protocol::Tcp, "10.1.1.1", 8080), Deny),
            (flow(Direction::Ingress, Protocol::Tcp, "192.168.5.5", 8080), Deny),
            (tcp("10.1.1.1", 80), Deny),
            (tcp("192.168.5.5", 80), Allow),
            (tcp("127.0.0.1", 8080), Deny),
        ],
    );
}

/// Ingress from IPv6 peers of published ports (`"[::1]:8080"`): v6 CIDRs and groups
/// match them, and an IPv4-mapped peer is judged as its IPv4 address.
#[test]
fn ingress_from_ipv6_peers() {
    let p = wire(json!({"default_ingress": "deny", "rules": [
        {"action": "deny", "direction": "ingress", "destination": "::1/128", "ports": ["8001"]},
        {"action": "allow", "direction": "ingress", "destination": "loopback", "protocols": ["tcp"]},
        {"action": "allow", "direction": "ingress", "destination": "2001:db8:6d73::/64", "protocols": ["udp"]},
        {"action": "deny", "direction": "ingress", "destination": "127.0.0.3"},
        {"action": "allow", "direction": "ingress", "destination": "private"},
    ]}));
    check(
        &p,
        &[
            (flow(Direction::Ingress, Protocol::Tcp, "::1", 8000), Allow),
            (flow(Direction::Ingress, Protocol::Tcp, "::1", 8001), Deny),
            (flow(Direction::Ingress, Protocol::Udp, "::1", 8000), Deny),
            (flow(Direction::Ingress, Protocol::Udp, "2001:db8:6d73::10", 53), Allow),
            (flow(Direction::Ingress, Protocol::Tcp, "2001:db8:6d73::10", 80), Deny),
            (flow(Direction::Ingress, Protocol::Tcp, "::ffff:127.0.0.3", 8000), Allow), // loopback (rule 1) first
            (flow(Direction::Ingress, Protocol::Udp, "::ffff:127.0.0.3", 8000), Deny),
            (flow(Direction::Ingress, Protocol::Udp, "fd00::5", 8000), Allow),
            (flow(Direction::Ingress, Protocol::Udp, "::ffff:10.1.1.1", 8000), Allow),
            (flow(Direction::Ingress, Protocol::Udp, "2001:4860::1", 8000), Deny),
        ],
    );
    let h = host();
    let v = p.decide(&flow(Direction::Ingress, Protocol::Tcp, "::1", 8001), &h, &PinSet::new(), Instant::now());
    assert!(v.reason.starts_with("rule 0"), "{}", v.reason);
}

/// Domain rules match only addresses this sandbox resolved for the name, while the pin
/// lives (NETWORK.md 9.8: a hard-coded address never resolved is a pin miss).
#[test]
fn domain_rules_need_a_live_pin() {
    let p = wire(json!({"rules": [
        {"action": "allow", "destination": "inet.test", "protocols": ["tcp"], "ports": ["80"]},
        {"action": "allow", "destination": ".example.com"},
        {"action": "allow", "direction": "ingress", "destination": "inet.test"},
    ], "default_ingress": "deny"}));
    let h = host();
    let t0 = Instant::now();
    let mut pins = PinSet::new();
    let inet: IpAddr = "203.0.113.10".parse().unwrap();
    let other: IpAddr = "203.0.113.11".parse().unwrap();
    pins.insert(d("inet.test"), inet, Duration::from_secs(30), t0);
    pins.insert(d("api.example.com"), "198.51.100.7".parse().unwrap(), Duration::from_secs(30), t0);
    pins.insert(d("evil-example.com"), "198.51.100.8".parse().unwrap(), Duration::from_secs(30), t0);
    pins.insert(d("example.com.evil.com"), "198.51.100.9".parse().unwrap(), Duration::from_secs(30), t0);
    let at = |f: &Flow, t: Instant| p.decide(f, &h, &pins, t).action;
    assert_eq!(at(&tcp("203.0.113.10", 80), t0), Allow);
    assert_eq!(at(&tcp("::ffff:203.0.113.10", 80), t0), Allow);
    assert_eq!(at(&tcp("203.0.113.10", 443), t0), Deny); // port filter
    assert_eq!(at(&tcp(&other.to_string(), 80), t0), Deny); // pin miss: never resolved
    assert_eq!(at(&tcp("203.0.113.10", 80), t0 + Duration::from_secs(31)), Deny); // expired
    assert_eq!(at(&tcp("198.51.100.7", 443), t0), Allow); // suffix
    assert_eq!(at(&tcp("198.51.100.8", 443), t0), Deny); // evil-example.com
    assert_eq!(at(&tcp("198.51.100.9", 443), t0), Deny); // example.com.evil.com
    // a peer connecting in has no name we resolved
    assert_eq!(at(&flow(Direction::Ingress, Protocol::Tcp, "203.0.113.10", 80), t0), Deny);
}

#[test]
fn deny_lists_come_before_every_rule() {
    let p = wire(json!({"preset": "public_only", "deny_domains": ["Blocked.Test."], "deny_domain_suffixes": [".ads.test", "*.track.test"]}));
    assert_eq!(p.rules().len(), 5);
    assert_eq!(p.rules()[0].destination, Destination::Domain(d("blocked.test")));
    assert_eq!(p.rules()[1].destination, Destination::DomainSuffix(d("ads.test")));
    assert_eq!(p.rules()[2].destination, Destination::DomainSuffix(d("track.test")));
    let h = host();
    let t0 = Instant::now();
    let mut pins = PinSet::new();
    pins.insert(d("blocked.test"), "203.0.113.20".parse().unwrap(), Duration::from_secs(30), t0);
    assert_eq!(p.decide(&tcp("203.0.113.20", 80), &h, &pins, t0).action, Deny);
    assert_eq!(p.decide(&tcp("203.0.113.21", 80), &h, &pins, t0).action, Allow);

    // The log names a rule as the user wrote it: its place in `rules:` (the deny-list
    // entries before it are not counted), or the deny list it came from.
    let custom = wire(json!({
        "default_egress": "allow",
        "rules": [{"action": "allow", "destination_kind": "domain", "destination": "inet.test"},
                  {"action": "deny", "destination_kind": "ip", "destination": "203.0.113.66"}],
        "deny_domains": ["blocked.test"], "deny_domain_suffixes": [".ads.test"]
    }));
    let v = custom.decide(&tcp("203.0.113.66", 80), &h, &pins, t0);
    assert_eq!((v.action, v.reason.as_str()), (Deny, "rule 1 (deny egress ip 203.0.113.66)"));
    let v = custom.decide_query(&d("blocked.test"), Protocol::Udp);
    assert_eq!((v.action, v.reason.as_str()), (Deny, "deny_domains (deny egress domain blocked.test)"));
    let v = custom.decide_query(&d("x.ads.test"), Protocol::Udp);
    assert!(v.action == Deny && v.reason.starts_with("deny_domain_suffixes ("), "{}", v.reason);
    let v = custom.decide(&tcp("203.0.113.20", 80), &h, &pins, t0);
    assert_eq!((v.action, v.reason.as_str()), (Deny, "deny_domains (deny egress domain blocked.test)"));
    let back: NetworkPolicy = serde_json::from_str(&serde_json::to_string(&custom).unwrap()).unwrap();
    assert_eq!(back.decide(&tcp("203.0.113.66", 80), &h, &pins, t0).reason, "rule 1 (deny egress ip 203.0.113.66)");

    // deny lists alone: everything else allowed
    let only = wire(json!({"deny_domains": ["blocked.test"]}));
    assert_eq!((only.default_egress(), only.default_ingress(), only.rules().len()), (Allow, Allow, 1));
    assert_eq!(only.decide(&tcp("127.0.0.1", 80), &h, &pins, t0).action, Allow);
}

#[test]
fn dns_queries() {
    let q = |p: &NetworkPolicy, name: &str| p.decide_query(&d(name), Protocol::Udp).action;
    let public = wire(json!({"preset": "public", "deny_domains": ["blocked.test"], "deny_domain_suffixes": [".ads.test"]}));
    assert_eq!(q(&public, "inet.test"), Allow);
    assert_eq!(q(&public, "blocked.test"), Deny);
    assert_eq!(q(&public, "BLOCKED.TEST."), Deny);
    assert_eq!(q(&public, "x.ads.test"), Deny);
    assert_eq!(q(&public, "ads.test"), Deny);
    assert_eq!(q(&public, "bads.test"), Allow);
    assert!(public.denies_name(&d("x.ads.test")));
    assert!(!public.denies_name(&d("inet.test")));

    // custom without DNS: only names with an allow rule resolve
    let custom = wire(json!({"rules": [
        {"action": "deny", "destination": "smtp.test", "protocols": ["tcp"], "ports": ["25"]},
        {"action": "allow", "destination": "api.test", "protocols": ["tcp"], "ports": ["443"]},
        {"action": "allow", "destination": "10.0.0.0/8"},
    ]}));
    assert_eq!(q(&custom, "api.test"), Allow);
    assert_eq!(q(&custom, "smtp.test"), Deny); // by default, not by the port-limited deny
    assert!(!custom.denies_name(&d("smtp.test")));
    assert_eq!(q(&custom, "other.test"), Deny);

    // an "allow any port 53" rule lets every name resolve; a tcp-only one not over udp
    let tcp_dns = wire(json!({"rules": [{"action": "allow", "destination": "host", "protocols": ["tcp"], "ports": ["53"]}]}));
    assert_eq!(tcp_dns.decide_query(&d("a.test"), Protocol::Tcp).action, Allow);
    assert_eq!(tcp_dns.decide_query(&d("a.test"), Protocol::Udp).action, Deny);
    assert_eq!(q(&NetworkPolicy::allow_all(), "anything.test"), Allow);
}

#[test]
fn rebind_view_of_addresses() {
    let h = HostContext::default();
    let reach = |p: &NetworkPolicy, a: &str| p.may_reach_address(a.parse().unwrap(), &h);
    let public = NetworkPolicy::public_only();
    assert!(reach(&public, "203.0.113.10"));
    assert!(!reach(&public, "10.0.0.1"));
    assert!(!reach(&public, "127.0.0.1"));
    assert!(!reach(&public, "::ffff:192.168.0.1"));
    let non_local = NetworkPolicy::non_local();
    assert!(reach(&non_local, "10.0.0.1"));
    assert!(!reach(&non_local, "127.0.0.1"));
    assert!(reach(&NetworkPolicy::allow_all(), "127.0.0.1"));
    let explicit = wire(json!({"rules": [
        {"action": "deny", "destination": "10.0.0.5", "ports": ["22"]},
        {"action": "allow", "destination": "10.0.0.0/24", "ports": ["5432"]},
        {"action": "deny", "destination": "10.0.1.0/24"},
        {"action": "allow", "destination": "private"},
        {"action": "allow", "destination": "evil.test"},
    ]}));
    assert!(reach(&explicit, "10.0.0.5")); // filtered rules skipped, "allow private" decides
    // the gateway's DNS rule does not make the host reachable
    let gw = HostContext { gateway: vec![GW.parse().unwrap()], host_addrs: vec![] };
    assert!(!public.may_reach_address(GW.parse().unwrap(), &gw));
    assert!(!reach(&explicit, "10.0.1.5"));
    assert!(reach(&explicit, "10.0.2.5"));
    assert!(!reach(&explicit, "127.0.0.1")); // the domain rule does not count
}

#[test]
fn wire_shapes() {
    for (v, want) in [
        (json!("public_only"), NetworkPolicy::public_only()),
        (json!("PUBLIC"), NetworkPolicy::public_only()),
        (json!("default"), NetworkPolicy::public_only()),
        (json!("airgapped"), NetworkPolicy::none()),
        (json!("disable"), NetworkPolicy::none()),
        (json!("allow-all"), NetworkPolicy::allow_all()),
        (json!("nonlocal"), NetworkPolicy::non_local()),
        (json!({"preset": "none"}), NetworkPolicy::none()),
        (json!({}), NetworkPolicy::public_only()),
        (serde_json::Value::Null, NetworkPolicy::public_only()),
    ] {
        assert_eq!(wire(v.clone()), want, "{v}");
    }
    let custom = wire(json!({"rules": []}));
    assert_eq!((custom.preset(), custom.default_egress(), custom.default_ingress()), (None, Deny, Allow));
    let p = wire(json!({"default_egress": "ALLOW", "rules": [
        {"action": "deny", "destination_kind": "group", "destination": "link_local"},
        {"action": "deny", "destination_kind": "domain_suffix", "destination": ".internal"},
        {"action": "deny", "destination_kind": "ip", "destination": "fd00::1"},
        {"action": "deny", "destination_kind": "cidr", "destination": "10.1.2.3/8"},
        {"action": "deny", "destination_kind": "any"},
        {"action": "deny", "destination": "metadata", "protocols": ["TCP", "udp", "tcp"], "ports": [443, "1-2"]},
        {"action": "deny", "destination": "*.corp.test"},
        {"action": "deny"},
    ]}));
    assert_eq!(p.default_egress(), Allow);
    let dests: Vec<String> = p.rules().iter().map(|r| r.destination.to_string()).collect();
    assert_eq!(
        dests,
        [
            "group link-local", "domain suffix .internal", "ip fd00::1", "cidr 10.0.0.0/8", "any", "group metadata",
            "domain suffix .corp.test", "any"
        ]
    );
    assert_eq!(p.rules()[5].protocols, vec![Protocol::Tcp, Protocol::Udp]);
    assert_eq!(p.rules()[5].ports, vec![PortRange::single(443).unwrap(), PortRange::new(1, 2).unwrap()]);
    // the typed form survives the supervisor spec (serde)
    let back: NetworkPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
}

/// NETWORK.md 9.12 (the policy part): each bad input is a PolicyError naming the key,
/// and the message never contains the bad value.
#[test]
fn malformed_policies_name_the_key_never_the_value() {
    let rule = |r: serde_json::Value| json!({"rules": [{"action": "allow", "destination": "*"}, r]});
    let cases: Vec<(serde_json::Value, &str, &str)> = vec![
        (json!("sekrit-preset"), "network", "sekrit-preset"),
        (json!({"preset": "sekrit-preset"}), "network.preset", "sekrit-preset"),
        (json!(42), "network", "42"),
        (json!({"preset": "none", "rules": []}), "network.preset", "none"),
        (json!({"sekrit_key": 1}), "network.sekrit_key", "\u{0}"),
        (json!({"rules": {}}), "network.rules", "\u{0}"),
        (json!({"default_egress": "maybe"}), "network.default_egress", "maybe"),
        (json!({"deny_domains": ["bad domain.test"]}), "network.deny_domains[0]", "bad domain"),
        (json!({"deny_domains": [""]}), "network.deny_domains[0]", "\u{0}"),
        (json!({"deny_domain_suffixes": [7]}), "network.deny_domain_suffixes[0]", "7"),
        (rule(json!({"destination": "*"})), "network.rules[1].action", "\u{0}"),
        (rule(json!({"action": "permit"})), "network.rules[1].action", "permit"),
        (rule(json!({"action": "allow", "direction": "sideways"})), "network.rules[1].direction", "sideways"),
        (rule(json!({"action": "allow", "destination": "10.0.0.0/33"})), "network.rules[1].destination", "10.0.0.0/33"),
        (rule(json!({"action": "allow", "destination": "10.0.0.300"})), "network.rules[1].destination", "10.0.0.300"),
        (rule(json!({"action": "allow", "destination": "fd00::zz"})), "network.rules[1].destination", "fd00::zz"),
        (rule(json!({"action": "allow", "destination": "has space.test"})), "network.rules[1].destination", "has space"),
        (rule(json!({"action": "allow", "destination": ""})), "network.rules[1].destination", "\u{0}"),
        (rule(json!({"action": "allow", "destination_kind": "group", "destination": "lan"})), "network.rules[1].destination", "lan"),
        (rule(json!({"action": "allow", "destination_kind": "galaxy", "destination": "x"})), "network.rules[1].destination_kind", "galaxy"),
        (rule(json!({"action": "allow", "destination_kind": "ip"})), "network.rules[1].destination", "\u{0}"),
        (rule(json!({"action": "allow", "destination_kind": "ip", "destination": "10.0.0.0/8"})), "network.rules[1].destination", "10.0.0.0/8"),
        (rule(json!({"action": "allow", "destination_kind": "any", "destination": "10.0.0.1"})), "network.rules[1].destination", "10.0.0.1"),
        (rule(json!({"action": "allow", "protocols": ["sctp"]})), "network.rules[1].protocols[0]", "sctp"),
        (rule(json!({"action": "allow", "protocol": 6})), "network.rules[1].protocol[0]", "6"),
        (rule(json!({"action": "allow", "ports": ["0"]})), "network.rules[1].ports[0]", "\u{0}"),
        (rule(json!({"action": "allow", "ports": ["70000"]})), "network.rules[1].ports[0]", "70000"),
        (rule(json!({"action": "allow", "ports": ["10-5"]})), "network.rules[1].ports[0]", "10-5"),
        (rule(json!({"action": "allow", "ports": ["1-2-3"]})), "network.rules[1].ports[0]", "1-2-3"),
        (rule(json!({"action": "allow", "ports": ["\t443"]})), "network.rules[1].ports[0]", "\t443"),
        (rule(json!({"action": "allow", "ports": [-1]})), "network.rules[1].ports[0]", "-1"),
        (rule(json!({"action": "allow", "port": 65536})), "network.rules[1].port[0]", "65536"),
        (rule(json!({"action": "allow", "protocols": ["icmpv4"], "ports": ["80"]})), "network.rules[1].ports", "\u{0}"),
        (rule(json!({"action": "allow", "colour": "red"})), "network.rules[1].colour", "red"),
        (rule(json!("allow all")), "network.rules[1]", "allow all"),
    ];
    for (v, key, secret) in cases {
        let err = NetworkPolicy::from_wire(&v).expect_err(&v.to_string());
        assert_eq!(err.key, key, "{v}: {err}");
        let shown = err.to_string();
        assert!(shown.starts_with(&format!("{key}: ")), "{shown}");
        assert!(!shown.contains(secret), "{v}: message echoes the value: {shown}");
    }
    assert_eq!(PolicyError::CODE, "network-policy-error");
}

#[test]
fn size_bounds() {
    let rules: Vec<_> = (0..wire::MAX_RULES + 1).map(|_| json!({"action": "deny"})).collect();
    let err = NetworkPolicy::from_wire(&json!({ "rules": rules })).unwrap_err();
    assert_eq!(err.key, "network.rules");
    let ports: Vec<_> = (0..wire::MAX_LIST + 1).map(|_| json!(80)).collect();
    let err = NetworkPolicy::from_wire(&json!({"rules": [{"action": "deny", "ports": ports}]})).unwrap_err();
    assert_eq!(err.key, "network.rules[0].ports");
}
