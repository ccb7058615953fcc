//! Destination classification: which [`Group`] an address belongs to.
//!
//! Groups are disjoint and every address is in exactly one. The order of the tests is
//! the order of precedence (first hit wins):
//!
//! 1. **host** — one of the [`HostContext`] addresses (the sandbox's gateway and the
//!    host's own interface addresses), compared both as given and after unwrapping an
//!    embedded IPv4 address (step 0).
//! 2. **metadata** — cloud instance-metadata / credential endpoints.
//! 3. **loopback** — `127/8`, `0/8` (Linux connects `0.0.0.0` to the local host),
//!    `::1`, `::`.
//! 4. **multicast** — `224/4`, the limited broadcast `255.255.255.255`, `ff00::/8`.
//! 5. **link_local** — `169.254/16`, `fe80::/10`.
//! 6. **private** — every range that is not globally routable unicast: RFC 1918,
//!    CGNAT `100.64/10`, IETF protocol assignments `192.0.0/24`, benchmarking
//!    `198.18/15`, reserved `240/4`, ULA `fc00::/7`, deprecated site-local `fec0::/10`,
//!    discard-only `100::/64`, IPv6 benchmarking/ORCHID, local-use NAT64
//!    `64:ff9b:1::/48` and Teredo `2001::/32` (a tunnel, never a plain destination).
//! 7. **public** — everything else, including the documentation ranges
//!    (`192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`), which the test
//!    suites use as their "internet".
//!
//! Step 0: an IPv6 address that carries an IPv4 address which the host kernel or a
//! translator would actually reach — IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated
//! `::ffff:0:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` and 6to4
//! `2002::/16` — is classified by that IPv4 address. So `::ffff:127.0.0.1`,
//! `64:ff9b::7f00:1` and `2002:7f00:1::1` are loopback, never public.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// A destination group, as rules name it (`Destination.group(:link_local)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Public,
    Loopback,
    Private,
    LinkLocal,
    Metadata,
    Multicast,
    Host,
}

impl Group {
    /// Every group, in the order the wire names are listed in error messages.
    pub const ALL: [Group; 7] = [
        Group::Public,
        Group::Loopback,
        Group::Private,
        Group::LinkLocal,
        Group::Metadata,
        Group::Multicast,
        Group::Host,
    ];

    /// The wire name (`link-local` uses a hyphen on the wire; `_` is accepted too).
    pub fn wire_name(self) -> &'static str {
        match self {
            Group::Public => "public",
            Group::Loopback => "loopback",
            Group::Private => "private",
            Group::LinkLocal => "link-local",
            Group::Metadata => "metadata",
            Group::Multicast => "multicast",
            Group::Host => "host",
        }
    }

    /// Parses a wire name, case-insensitively, `_` and `-` alike.
    pub fn from_wire_name(name: &str) -> Option<Group> {
        let norm = name.to_ascii_lowercase().replace('_', "-");
        Group::ALL.into_iter().find(|g| g.wire_name() == norm)
    }
}

impl std::fmt::Display for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.wire_name())
    }
}

/// The addresses that make up the `host` group for one sandbox: the gateway address(es)
/// the guest sees, and the host's own interface addresses (so the host's LAN or public
/// address is not "public" — reaching it reaches host services).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostContext {
    pub gateway: Vec<IpAddr>,
    pub host_addrs: Vec<IpAddr>,
}

impl HostContext {
    /// True when `ip` (as given, or its embedded IPv4 address) is a host address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = effective(ip);
        self.gateway.iter().chain(self.host_addrs.iter()).any(|h| effective(*h) == ip)
    }
}

/// The address a connection to `ip` actually reaches: its embedded IPv4 address when it
/// has one (see [`embedded_ipv4`]), else `ip` itself.
pub fn effective(ip: IpAddr) -> IpAddr {
    embedded_ipv4(ip).map_or(ip, IpAddr::V4)
}

/// Classifies `ip` (see the module docs for the table and its order).
pub fn classify(ip: IpAddr, host: &HostContext) -> Group {
    if host.contains(ip) {
        return Group::Host;
    }
    classify_without_host(ip)
}

/// Classifies `ip` without a host context (the `host` group is never returned). Used
/// where the host addresses do not matter, e.g. DNS rebind protection.
pub fn classify_without_host(ip: IpAddr) -> Group {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_ipv4(IpAddr::V6(v6)) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

/// The IPv4 address an IPv6 address stands for, when it is one of the forms that reach
/// an IPv4 host (mapped, translated, compatible, NAT64 well-known prefix, 6to4).
/// `::` and `::1` are not IPv4-compatible addresses.
pub fn embedded_ipv4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        // ::ffff:a.b.c.d (mapped)
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        // ::ffff:0:a.b.c.d (SIIT translated)
        [0, 0, 0, 0, 0xffff, 0, _, _] => Some(tail),
        // ::a.b.c.d (deprecated compatible), excluding :: and ::1
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some(tail),
        // 64:ff9b::a.b.c.d (NAT64 well-known prefix)
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        // 2002:AABB:CCDD::/48 (6to4)
        [0x2002, hi, lo, ..] => {
            Some(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8))
        }
        _ => None,
    }
}

const METADATA_V4: [Ipv4Addr; 4] = [
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack, DigitalOcean…
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task credentials
    Ipv4Addr::new(168, 63, 129, 16),   // Azure WireServer (a public range)
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud (inside CGNAT)
];
const METADATA_V6: [Ipv6Addr; 1] = [
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), // AWS IPv6 IMDS (inside ULA)
];

fn v4_in(ip: Ipv4Addr, net: [u8; 4], len: u32) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn v6_in(ip: Ipv6Addr, net: Ipv6Addr, len: u32) -> bool {
    let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

fn classify_v4(ip: Ipv4Addr) -> Group {
    if METADATA_V4.contains(&ip) {
        return Group::Metadata;
    }
    if v4_in(ip, [127, 0, 0, 0], 8) || v4_in(ip, [0, 0, 0, 0], 8) {
        return Group::Loopback;
    }
    if ip == Ipv4Addr::BROADCAST || v4_in(ip, [224, 0, 0, 0], 4) {
        return Group::Multicast;
    }
    if v4_in(ip, [169, 254, 0, 0], 16) {
        return Group::LinkLocal;
    }
    const PRIVATE: [([u8; 4], u32); 8] = [
        ([10, 0, 0, 0], 8),
        ([172, 16, 0, 0], 12),
        ([192, 168, 0, 0], 16),
        ([100, 64, 0, 0], 10),  // CGNAT / shared address space
        ([192, 0, 0, 0], 24),   // IETF protocol assignments (DS-Lite, PCP anycast…)
        ([198, 18, 0, 0], 15),  // benchmarking
        ([240, 0, 0, 0], 4),    // reserved ("class E")
        ([192, 88, 99, 0], 24), // deprecated 6to4 relay anycast
    ];
    if PRIVATE.iter().any(|(net, len)| v4_in(ip, *net, *len)) {
        return Group::Private;
    }
    Group::Public
}

fn classify_v6(ip: Ipv6Addr) -> Group {
    if METADATA_V6.contains(&ip) {
        return Group::Metadata;
    }
    if ip == Ipv6Addr::LOCALHOST || ip == Ipv6Addr::UNSPECIFIED {
        return Group::Loopback;
    }
    let seg0 = ip.segments()[0];
    if seg0 & 0xff00 == 0xff00 {
        return Group::Multicast;
    }
    if seg0 & 0xffc0 == 0xfe80 {
        return Group::LinkLocal;
    }
    let private: [(Ipv6Addr, u32); 7] = [
        (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),       // unique local
        (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),      // site-local (deprecated)
        (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),       // discard-only
        (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48),   // local-use NAT64
        (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 32),      // Teredo
        (Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 0), 48),    // benchmarking
        (Ipv6Addr::new(0x2001, 0x10, 0, 0, 0, 0, 0, 0), 28),   // ORCHID
    ];
    if private.iter().any(|(net, len)| v6_in(ip, *net, *len)) {
        return Group::Private;
    }
    // The remaining ::/96 (IPv4-compatible) and mapped forms were handled by the caller;
    // anything else in ::/8 is reserved.
    if seg0 & 0xff00 == 0 {
        return Group::Private;
    }
    Group::Public
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostContext {
        HostContext {
            gateway: vec!["172.16.0.1".parse().unwrap(), "fd42:6d73:62::1".parse().unwrap()],
            host_addrs: vec!["192.0.2.77".parse().unwrap(), "10.1.2.3".parse().unwrap()],
        }
    }

    /// NETWORK.md 9.6 plus every range named in the module docs.
    #[test]
    fn classification_table() {
        use Group::*;
        let table: &[(&str, Group)] = &[
            // 9.6 destinations under public_only
            ("127.0.0.2", Loopback),
            ("0.0.0.0", Loopback),
            ("0.1.2.3", Loopback),
            ("255.255.255.255", Multicast),
            ("240.0.0.1", Private),
            ("198.18.0.5", Private),
            ("169.254.169.254", Metadata),
            ("168.63.129.16", Metadata),
            ("100.100.100.200", Metadata),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", Metadata),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::7f00:1", Loopback),
            ("2002:7f00:1::1", Loopback),
            ("fd00:ec2::254", Metadata),
            ("fe80::1", LinkLocal),
            // gateway and the host's own addresses
            ("172.16.0.1", Host),
            ("fd42:6d73:62::1", Host),
            ("192.0.2.77", Host),
            ("10.1.2.3", Host),
            ("::ffff:10.1.2.3", Host),
            ("::ffff:172.16.0.1", Host),
            // loopback / unspecified
            ("127.255.255.254", Loopback),
            ("::", Loopback),
            ("::ffff:0.0.0.0", Loopback),
            // private
            ("10.0.0.1", Private),
            ("172.16.0.2", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("100.64.0.1", Private),
            ("100.127.255.255", Private),
            ("192.0.0.8", Private),
            ("198.19.255.255", Private),
            ("250.1.1.1", Private),
            ("255.255.255.254", Private),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("100::1", Private),
            ("64:ff9b:1::1", Private),
            ("2001:0:4136:e378::1", Private),
            ("2001:2::1", Private),
            ("2001:10::1", Private),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:0:10.0.0.1", Private),
            ("64:ff9b::a00:1", Private),
            ("2002:a00:1::1", Private),
            ("::2", Loopback), // IPv4-compatible 0.0.0.2
            ("1::", Private),
            // link-local
            ("169.254.1.1", LinkLocal),
            ("::ffff:169.254.1.1", LinkLocal),
            ("febf::1", LinkLocal),
            // metadata
            ("169.254.170.2", Metadata),
            ("::ffff:100.100.100.200", Metadata),
            ("64:ff9b::a9fe:a9fe", Metadata),
            // multicast
            ("224.0.0.251", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::fb", Multicast),
            ("::ffff:224.0.0.1", Multicast),
            // public, incl. the documentation ranges
            ("1.1.1.1", Public),
            ("8.8.8.8", Public),
            ("203.0.113.10", Public),
            ("198.51.100.1", Public),
            ("192.0.2.1", Public),
            ("2001:db8::1", Public),
            ("2606:4700::1111", Public),
            ("::ffff:1.1.1.1", Public),
            ("64:ff9b::101:101", Public),
            ("2002:101:101::1", Public),
            ("100.63.255.255", Public),
            ("100.128.0.0", Public),
            ("172.15.255.255", Public),
            ("172.32.0.0", Public),
            ("198.17.255.255", Public),
            ("198.20.0.0", Public),
            ("223.255.255.255", Public),
            ("169.253.255.255", Public),
            ("168.63.129.17", Public),
        ];
        let h = host();
        for (addr, want) in table {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(classify(ip, &h), *want, "{addr}");
        }
    }

    #[test]
    fn without_host_context_host_addresses_fall_back_to_their_range() {
        assert_eq!(classify_without_host("172.16.0.1".parse().unwrap()), Group::Private);
        assert_eq!(classify_without_host("192.0.2.77".parse().unwrap()), Group::Public);
    }

    #[test]
    fn group_wire_names_round_trip() {
        for g in Group::ALL {
            assert_eq!(Group::from_wire_name(g.wire_name()), Some(g));
        }
        assert_eq!(Group::from_wire_name("link_local"), Some(Group::LinkLocal));
        assert_eq!(Group::from_wire_name("PUBLIC"), Some(Group::Public));
        assert_eq!(Group::from_wire_name("lan"), None);
    }
}
