//! `network:`, `dns:`, `ports:`, `ports_udp:`, `ipv4_pool:`, `ipv6_pool:` and `max_connections:` of
//! `Sandbox.create` → the NIC the sandbox gets (or none).
//!
//! The values are the wire forms (Ruby's `NetworkPolicy#to_h` or a preset name; the
//! `dns:` Hash; port lists normalised by Ruby), parsed by the network crate
//! (`NetworkPolicy::from_wire`, `DnsConfig::from_wire`, `published::parse`). Every policy
//! but `none` gets a NIC; the stack enforces the policy at each connection and DNS query.

use microsandbox_network::config::MAX_CONNECTIONS;
use microsandbox_network::dns::DnsConfig;
use microsandbox_network::policy::NetworkPolicy;
use microsandbox_network::published::{self, PortProtocol, PublishedPort};
use microsandbox_network::NetworkConfig;
use serde_json::Value;

use super::config::SandboxConfig;
use crate::error::{Error, Result};

/// The typed policy of a `network:` value (`None`: the default).
pub fn policy(network: Option<&Value>) -> Result<NetworkPolicy> {
    NetworkPolicy::from_wire(network.unwrap_or(&Value::Null)).map_err(|e| Error::NetworkPolicy(e.to_string()))
}

/// The typed `dns:` options (`None`: the defaults).
pub fn dns(dns: Option<&Value>) -> Result<DnsConfig> {
    match dns {
        None | Some(Value::Null) => Ok(DnsConfig::default()),
        Some(v) => DnsConfig::from_wire(v).map_err(|e| Error::NetworkPolicy(e.to_string())),
    }
}

/// The published ports of `ports:` and `ports_udp:` (checked; `InvalidConfig` naming the
/// option and entry).
pub fn ports(cfg: &SandboxConfig) -> Result<Vec<PublishedPort>> {
    let mut all = published::parse(PortProtocol::Tcp, &cfg.ports).map_err(Error::InvalidConfig)?;
    all.extend(published::parse(PortProtocol::Udp, &cfg.ports_udp).map_err(Error::InvalidConfig)?);
    published::check_set(&all).map_err(Error::InvalidConfig)?;
    Ok(all)
}

/// Checks the network options (at create, before anything starts).
pub fn validate(cfg: &SandboxConfig) -> Result<()> {
    nic(cfg).map(|_| ())
}

/// The NIC of a sandbox with these options, `None` for no NIC (`network: "none"`).
pub fn nic(cfg: &SandboxConfig) -> Result<Option<NetworkConfig>> {
    let policy = policy(cfg.network.as_ref())?;
    let dns = dns(cfg.dns.as_ref())?;
    let ports = ports(cfg)?;
    let mut nic = NetworkConfig { policy, dns, ports, ..NetworkConfig::with_defaults() };
    if let Some(pool) = &cfg.ipv4_pool {
        nic.apply_ipv4_pool(pool).map_err(Error::InvalidConfig)?;
    }
    if let Some(pool) = &cfg.ipv6_pool {
        nic.apply_ipv6_pool(pool).map_err(Error::InvalidConfig)?;
    }
    if let Some(n) = cfg.max_connections {
        if !(1..=i64::from(MAX_CONNECTIONS)).contains(&n) {
            return Err(Error::InvalidConfig(format!("max_connections must be between 1 and {MAX_CONNECTIONS}")));
        }
        nic.max_connections = n as u32;
    }
    if nic.policy.is_none() {
        if !nic.ports.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "{}: a published port needs a network; network \"none\" gives the sandbox no NIC",
                nic.ports[0].protocol.option()
            )));
        }
        return Ok(None);
    }
    Ok(Some(nic))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: serde_json::Value) -> SandboxConfig {
        let mut base = json!({"name": "n", "image": "/x"});
        base.as_object_mut().unwrap().extend(v.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn every_policy_but_none_gets_a_nic() {
        for v in [json!("allow_all"), json!("public_only"), json!("non-local"), json!({"preset": "allow_all"})] {
            let nic = nic(&cfg(json!({"network": v.clone()}))).unwrap().expect("a NIC");
            assert_eq!(nic.policy, policy(Some(&v)).unwrap());
        }
        assert_eq!(nic(&cfg(json!({}))).unwrap().unwrap().policy, NetworkPolicy::public_only(), "the default");
        for v in ["none", "airgapped", "disabled"] {
            assert!(nic(&cfg(json!({"network": v}))).unwrap().is_none(), "{v}");
        }
        let e = validate(&cfg(json!({"network": "everything-secret"}))).unwrap_err();
        assert_eq!(e.code(), "network-policy-error");
        assert!(!e.to_string().contains("everything-secret"), "{e}");
        let with_dns = nic(&cfg(json!({"dns": {"nameservers": ["127.0.0.1:5353"], "query_timeout_ms": 700}}))).unwrap().unwrap();
        assert_eq!(with_dns.dns.query_timeout_ms, 700);
        assert_eq!(validate(&cfg(json!({"dns": {"query_timeout_ms": 0}}))).unwrap_err().code(), "network-policy-error");
    }

    #[test]
    fn ports_pool_and_connection_cap() {
        let n = nic(&cfg(json!({
            "ports": [{"host_port": 8080, "guest_port": 80}, {"bind": "0.0.0.0", "host_port": 8443, "guest_port": 443}],
            "ports_udp": [{"host_port": 5353, "guest_port": 53}],
            "ipv4_pool": "10.20.0.0/16", "ipv6_pool": "fd00:20::/64", "max_connections": 32
        })))
        .unwrap()
        .unwrap();
        assert_eq!(n.ports.len(), 3);
        assert_eq!(n.ports[0].host.to_string(), "127.0.0.1:8080");
        assert_eq!(n.ports[2].protocol, PortProtocol::Udp);
        assert_eq!(n.kernel_param(), "msb.net=10.20.0.2/30,10.20.0.1,65520 msb.net6=fd00:20::2/126,fd00:20::1");
        assert_eq!(n.max_connections, 32);
        for (bad, msg) in [
            (json!({"ports": [{"host_port": 0, "guest_port": 80}]}), "ports[0]: host_port"),
            (json!({"ports_udp": [{"host_port": 1, "guest_port": 70000}]}), "ports_udp[0]: guest_port"),
            (json!({"ports": [{"host_port": 80, "guest_port": 80}, {"host_port": 80, "guest_port": 81}]}), "published twice"),
            (json!({"ipv4_pool": "10.0.0.0/31"}), "ipv4_pool: "),
            (json!({"ipv6_pool": "fd00::/127"}), "ipv6_pool: the prefix must be /126 or shorter"),
            (json!({"ipv6_pool": "10.0.0.0/8"}), "ipv6_pool: must be an IPv6 CIDR"),
            (json!({"ipv6_pool": "fe80::/64"}), "ipv6_pool: must not be in"),
            (json!({"max_connections": 0}), "max_connections must be between 1 and 4096"),
            (json!({"max_connections": 4097}), "max_connections must be between 1 and 4096"),
            (json!({"network": "none", "ports": [{"host_port": 80, "guest_port": 80}]}), "network \"none\" gives the sandbox no NIC"),
        ] {
            let e = validate(&cfg(bad.clone())).unwrap_err();
            assert_eq!(e.code(), "invalid-config", "{bad}");
            assert!(e.to_string().contains(msg), "{bad}: {e}");
        }
    }
}
