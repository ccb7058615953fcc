//! What the engine puts into the supervisor spec for a sandbox with a NIC
//! (`SupervisorSpec.network`; `None` there means no NIC at all).

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::dns::DnsConfig;
use crate::policy::NetworkPolicy;

/// Default MTU of the guest NIC. Under `-netdev stream` QEMU turns off checksum and
/// segmentation offloads, so the emulated guest segments at the MTU itself: large frames
/// mean far fewer guest (and stack) packets per byte. 65520 is what passt uses; it stays
/// below QEMU's `NET_BUFSIZE` frame limit with the Ethernet header.
pub const DEFAULT_MTU: u32 = 65520;
/// Default cap on concurrent guest connections (TCP, plus pending connects).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Upper bound of `max_connections`.
pub const MAX_CONNECTIONS: u32 = 4096;
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
}

fn default_tcp_buffer() -> usize {
    DEFAULT_TCP_BUFFER
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
            max_connections: DEFAULT_MAX_CONNECTIONS,
            tcp_buffer: DEFAULT_TCP_BUFFER,
            policy: NetworkPolicy::default(),
            dns: DnsConfig::default(),
        }
    }

    /// The largest Ethernet frame on this link.
    pub fn max_frame(&self) -> usize {
        self.mtu as usize + 14
    }

    /// `aa:bb:…` for QEMU's `mac=`.
    pub fn guest_mac_string(&self) -> String {
        self.guest_mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
    }

    /// The guest's kernel command line parameter (`msb.net=ip/prefix,gateway,mtu`).
    pub fn kernel_param(&self) -> String {
        format!("msb.net={}/{},{},{}", self.guest_ip, self.prefix, self.gateway_ip, self.mtu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_render() {
        let c = NetworkConfig::with_defaults();
        assert_eq!(c.kernel_param(), "msb.net=172.16.0.2/30,172.16.0.1,65520");
        assert_eq!(c.guest_mac_string(), "02:6d:73:62:00:02");
        assert!(c.max_frame() <= crate::frame::MAX_STREAM_FRAME);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<NetworkConfig>(&json).unwrap(), c);
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
