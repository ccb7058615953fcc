//! `network:` and `dns:` of `Sandbox.create` → the NIC the sandbox gets (or none).
//!
//! The values are the wire forms (Ruby's `NetworkPolicy#to_h` or a preset name; the
//! `dns:` Hash), parsed by the policy engine (`NetworkPolicy::from_wire`,
//! `DnsConfig::from_wire`). Every policy but `none` gets a NIC; the stack enforces the
//! policy at each connection and DNS query.

use microsandbox_network::dns::DnsConfig;
use microsandbox_network::policy::NetworkPolicy;
use microsandbox_network::NetworkConfig;
use serde_json::Value;

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

/// Checks `network:` and `dns:` (at create, before anything starts).
pub fn validate(network: Option<&Value>, dns_opts: Option<&Value>) -> Result<()> {
    policy(network)?;
    dns(dns_opts).map(|_| ())
}

/// The NIC of a sandbox with these `network:`/`dns:` values, `None` for no NIC (`none`).
pub fn nic(network: Option<&Value>, dns_opts: Option<&Value>) -> Result<Option<NetworkConfig>> {
    let policy = policy(network)?;
    if policy.is_none() {
        return Ok(None);
    }
    Ok(Some(NetworkConfig { policy, dns: dns(dns_opts)?, ..NetworkConfig::with_defaults() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_policy_but_none_gets_a_nic() {
        for v in [json!("allow_all"), json!("public_only"), json!("non-local"), json!({"preset": "allow_all"})] {
            let nic = nic(Some(&v), None).unwrap().expect("a NIC");
            assert_eq!(nic.policy, policy(Some(&v)).unwrap());
        }
        assert_eq!(nic(None, None).unwrap().unwrap().policy, NetworkPolicy::public_only(), "the default");
        for v in ["none", "airgapped", "disabled"] {
            assert!(nic(Some(&json!(v)), None).unwrap().is_none(), "{v}");
        }
        let e = validate(Some(&json!("everything-secret")), None).unwrap_err();
        assert_eq!(e.code(), "network-policy-error");
        assert!(!e.to_string().contains("everything-secret"), "{e}");
        let with_dns = nic(None, Some(&json!({"nameservers": ["127.0.0.1:5353"], "query_timeout_ms": 700}))).unwrap().unwrap();
        assert_eq!(with_dns.dns.query_timeout_ms, 700);
        assert_eq!(validate(None, Some(&json!({"query_timeout_ms": 0}))).unwrap_err().code(), "network-policy-error");
    }
}
