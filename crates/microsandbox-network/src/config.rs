//! What the engine puts into the supervisor spec for a sandbox with a NIC
//! (`SupervisorSpec.network`; `None` there means no NIC at all).

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::dns::DnsConfig;
use crate::policy::NetworkPolicy;
use crate::published::PublishedPort;

/// Default MTU of the guest NIC. Under `-netdev stream` QEMU turns off checksum and
/// segmentation offloads, so the emulated guest segments at the MTU itself: large frames
/// mean far fewer guest (and stack) packets per byte. 65520 is what passt uses; it stays
/// below QEMU's `NET_BUFSIZE` frame limit with the Ethernet header.
pub const DEFAULT_MTU: u32 = 65520;
/// Default cap on concurrent guest connections (TCP, plus pending connects).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Upper bound of `max_connections`.
pub const MAX_CONNECTIONS: u32 = 4096;
/// The default `ipv6_pool:` (a ULA /64 — "msb" in its global ID): gateway `::1`, guest `::2`.
pub const DEFAULT_IPV6_POOL: &str = "fd42:6d73:62::/64";
/// The gateway's IPv6 link-local address (it answers neighbour solicitations for it too).
pub const GATEWAY_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Prefix length of the guest's IPv6 address: only the gateway and the guest are on the
/// link (the IPv6 counterpart of the IPv4 /30; a /64 would make the guest solicit
/// neighbours nobody answers — a hang instead of a refusal).
pub const IPV6_LINK_PREFIX: u8 = 126;
/// Default size of each TCP connection's receive and send buffer in the stack, bytes.
/// It is the TCP window the guest sees: under TCG the guest↔stack round trip is
/// milliseconds, so 64 KiB would cap a connection near 64 KiB per round trip.
pub const DEFAULT_TCP_BUFFER: usize = 256 * 1024;

/// Configuration of one sandbox NIC: the data path's addressing and limits, and the
/// policy and DNS options the stack enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// The guest's address on its link.
    pub guest_ip: Ipv4Addr,
    /// The gateway (the stack): answers ARP and DNS; connections to it reach the host.
    pub gateway_ip: Ipv4Addr,
    /// Prefix length of the link (the guest's netmask).
    pub prefix: u8,
    pub guest_mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    pub mtu: u32,
    /// The guest's IPv6 address (`ipv6_pool:`; on-link prefix [`IPV6_LINK_PREFIX`]).
    #[serde(default = "default_guest_ip6")]
    pub guest_ip6: Ipv6Addr,
    /// The gateway's IPv6 address, the guest's default IPv6 route.
    #[serde(default = "default_gateway_ip6")]
    pub gateway_ip6: Ipv6Addr,
    pub max_connections: u32,
    #[serde(default = "default_tcp_buffer")]
    pub tcp_buffer: usize,
    /// The sandbox's network policy (typed; `NetworkPolicy::from_wire` of `network:`).
    /// Absent in a spec = `public_only`.
    #[serde(default)]
    pub policy: NetworkPolicy,
    /// The `dns:` options (`DnsConfig::from_wire`). Absent = defaults.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Published ports (`ports:`, `ports_udp:`); the supervisor binds them before QEMU
    /// starts. Absent = none.
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
}

fn default_tcp_buffer() -> usize {
    DEFAULT_TCP_BUFFER
}

fn default_ipv6_link() -> (Ipv6Addr, Ipv6Addr) {
    let base: ipnet::Ipv6Net = DEFAULT_IPV6_POOL.parse().expect("the default pool parses");
    let n = u128::from(base.network());
    (Ipv6Addr::from(n + 1), Ipv6Addr::from(n + 2))
}

fn default_gateway_ip6() -> Ipv6Addr {
    default_ipv6_link().0
}

fn default_guest_ip6() -> Ipv6Addr {
    default_ipv6_link().1
}

impl NetworkConfig {
    /// The default addressing: a /30 with the gateway at .1 and the guest at .2. Every
    /// sandbox has its own stack, so they can all use the same addresses.
    pub fn with_defaults() -> Self {
        NetworkConfig {
            guest_ip: Ipv4Addr::new(172, 16, 0, 2),
            gateway_ip: Ipv4Addr::new(172, 16, 0, 1),
            prefix: 30,
            guest_mac: [0x02, 0x6d, 0x73, 0x62, 0x00, 0x02],
            gateway_mac: [0x02, 0x6d, 0x73, 0x62, 0x00, 0x01],
            mtu: DEFAULT_MTU,
            guest_ip6: default_guest_ip6(),
            gateway_ip6: default_gateway_ip6(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tcp_buffer: DEFAULT_TCP_BUFFER,
            policy: NetworkPolicy::default(),
            dns: DnsConfig::default(),
            ports: Vec::new(),
        }
    }

    /// Takes the link's addresses from `ipv4_pool:` (a CIDR): the first /30 of the pool,
    /// gateway at its first address, guest at its second. Only a /30 is on the guest's
    /// link, so every other address — in the pool or not — goes through the gateway and
    /// the policy (a wider on-link prefix would make the guest ARP for its neighbours,
    /// which nobody answers: a hang instead of a refusal). Every sandbox has its own
    /// stack, so sandboxes may share a pool. The error names the option, never the value.
    pub fn apply_ipv4_pool(&mut self, pool: &str) -> Result<(), String> {
        let net: ipnet::Ipv4Net = pool
            .trim()
            .parse()
            .map_err(|_| "ipv4_pool: must be an IPv4 CIDR such as \"10.0.0.0/24\"".to_string())?;
        if net.prefix_len() > 30 {
            return Err("ipv4_pool: the prefix must be /30 or shorter (the link needs a gateway and a guest address)".into());
        }
        let base = u32::from(net.network());
        let (gateway, guest) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        // Ranges whose addresses mean something else to the guest's or the host's kernel.
        let reserved = |ip: Ipv4Addr| {
            ip.is_loopback() || ip.is_link_local() || ip.is_multicast() || ip.is_broadcast() || ip.octets()[0] == 0 || ip.octets()[0] >= 240
        };
        if reserved(gateway) || reserved(guest) {
            return Err("ipv4_pool: must not be in 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4 or 240.0.0.0/4".into());
        }
        self.gateway_ip = gateway;
        self.guest_ip = guest;
        self.prefix = 30;
        Ok(())
    }

    /// Takes the link's IPv6 addresses from `ipv6_pool:` (a CIDR): gateway at the pool's
    /// `::1`, guest at `::2`, on-link prefix /126 (as for IPv4, only the two ends are on
    /// the link; everything else goes through the gateway and the policy). Pools in
    /// `::/8` (unspecified, loopback, IPv4-mapped/compatible forms), `fe80::/10` or
    /// `ff00::/8` are refused. The error names the option, never the value.
    pub fn apply_ipv6_pool(&mut self, pool: &str) -> Result<(), String> {
        let net: ipnet::Ipv6Net = pool
            .trim()
            .parse()
            .map_err(|_| "ipv6_pool: must be an IPv6 CIDR such as \"fd00:1::/64\"".to_string())?;
        if net.prefix_len() > IPV6_LINK_PREFIX {
            return Err("ipv6_pool: the prefix must be /126 or shorter (the link needs a gateway and a guest address)".into());
        }
        let base = u128::from(net.network());
        let (gateway, guest) = (Ipv6Addr::from(base + 1), Ipv6Addr::from(base + 2));
        let reserved = |ip: Ipv6Addr| {
            let s = ip.segments();
            s[0] >> 8 == 0 || s[0] & 0xffc0 == 0xfe80 || s[0] >> 8 == 0xff
        };
        if reserved(gateway) || reserved(guest) {
            return Err("ipv6_pool: must not be in ::/8, fe80::/10 or ff00::/8".into());
        }
        self.gateway_ip6 = gateway;
        self.guest_ip6 = guest;
        Ok(())
    }

    /// The gateway's IPv6 addresses (its pool address and its link-local one).
    pub fn gateway_ip6s(&self) -> [Ipv6Addr; 2] {
        [self.gateway_ip6, GATEWAY_LINK_LOCAL]
    }

    /// The largest Ethernet frame on this link.
    pub fn max_frame(&self) -> usize {
        self.mtu as usize + 14
    }

    /// `aa:bb:…` for QEMU's `mac=`.
    pub fn guest_mac_string(&self) -> String {
        self.guest_mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }

    /// The guest's kernel command line parameters (`msb.net=ip/prefix,gateway,mtu` and
    /// `msb.net6=ip/prefix,gateway`).
    pub fn kernel_param(&self) -> String {
        format!(
            "msb.net={}/{},{},{} msb.net6={}/{},{}",
            self.guest_ip, self.prefix, self.gateway_ip, self.mtu, self.guest_ip6, IPV6_LINK_PREFIX, self.gateway_ip6
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_render() {
        let c = NetworkConfig::with_defaults();
        assert_eq!(c.kernel_param(), "msb.net=172.16.0.2/30,172.16.0.1,65520 msb.net6=fd42:6d73:62::2/126,fd42:6d73:62::1");
        assert_eq!(c.guest_mac_string(), "02:6d:73:62:00:02");
        assert!(c.max_frame() <= crate::frame::MAX_STREAM_FRAME);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<NetworkConfig>(&json).unwrap(), c);
    }

    #[test]
    fn ipv4_pool_takes_the_first_slash_30() {
        let mut c = NetworkConfig::with_defaults();
        c.apply_ipv4_pool("10.9.0.0/24").unwrap();
        assert!(c.kernel_param().starts_with("msb.net=10.9.0.2/30,10.9.0.1,65520 "));
        c.apply_ipv4_pool("192.168.77.8/30").unwrap();
        assert_eq!((c.gateway_ip, c.guest_ip), (Ipv4Addr::new(192, 168, 77, 9), Ipv4Addr::new(192, 168, 77, 10)));
        // host bits are ignored: the pool is the network it names
        c.apply_ipv4_pool("10.1.2.3/16").unwrap();
        assert_eq!(c.gateway_ip, Ipv4Addr::new(10, 1, 0, 1));
        for bad in ["10.0.0.0/31", "10.0.0.0/32", "fd00::/64", "10.0.0.0", "nonsense/8", "10.0.0.0/33", "127.0.0.0/8", "169.254.0.0/16", "0.0.0.0/0", "224.0.0.0/4", "240.0.0.0/4"] {
            let e = c.apply_ipv4_pool(bad).unwrap_err();
            assert!(e.starts_with("ipv4_pool: "), "{bad}: {e}");
            assert!(!e.contains("nonsense") && !e.contains("fd00"), "the value is never echoed: {e}");
        }
        assert_eq!(c.gateway_ip, Ipv4Addr::new(10, 1, 0, 1), "a rejected pool changes nothing");
    }

    #[test]
    fn ipv6_pool_takes_the_first_slash_126() {
        let mut c = NetworkConfig::with_defaults();
        c.apply_ipv6_pool("fd00:1:2::/64").unwrap();
        assert_eq!((c.gateway_ip6.to_string(), c.guest_ip6.to_string()), ("fd00:1:2::1".into(), "fd00:1:2::2".into()));
        assert!(c.kernel_param().ends_with(" msb.net6=fd00:1:2::2/126,fd00:1:2::1"));
        c.apply_ipv6_pool("2001:db8:77::40/126").unwrap();
        assert_eq!(c.guest_ip6.to_string(), "2001:db8:77::42");
        c.apply_ipv6_pool(" fd99::1234/48 ").unwrap();
        assert_eq!(c.gateway_ip6.to_string(), "fd99::1", "host bits are ignored");
        for bad in ["fd00::/127", "fd00::/128", "10.0.0.0/8", "fd00::", "nonsense/64", "fd00::/129", "::/0", "::1/128", "::ffff:0:0/96", "fe80::/64", "ff02::/16"] {
            let e = c.apply_ipv6_pool(bad).unwrap_err();
            assert!(e.starts_with("ipv6_pool: "), "{bad}: {e}");
            assert!(!e.contains("nonsense") && !e.contains("10.0"), "the value is never echoed: {e}");
        }
        assert_eq!(c.gateway_ip6.to_string(), "fd99::1", "a rejected pool changes nothing");
    }

    #[test]
    fn specs_without_ipv6_fields_get_the_default_pool() {
        let c = NetworkConfig::with_defaults();
        let mut v = serde_json::to_value(&c).unwrap();
        v.as_object_mut().unwrap().retain(|k, _| k != "guest_ip6" && k != "gateway_ip6");
        let old: NetworkConfig = serde_json::from_value(v).unwrap();
        assert_eq!(old, c);
    }

    #[test]
    fn policy_and_dns_travel_in_the_spec_and_default_when_absent() {
        let mut c = NetworkConfig::with_defaults();
        c.policy = NetworkPolicy::from_wire(&serde_json::json!({"rules": [{"action": "allow", "destination": ".inet.test"}]})).unwrap();
        c.dns = DnsConfig::from_wire(&serde_json::json!({"nameservers": ["203.0.113.53"]})).unwrap();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<NetworkConfig>(&json).unwrap(), c);
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_object_mut().unwrap().retain(|k, _| k != "policy" && k != "dns");
        let old: NetworkConfig = serde_json::from_value(v).unwrap();
        assert_eq!((old.policy, old.dns), (NetworkPolicy::public_only(), DnsConfig::default()));
    }
}
