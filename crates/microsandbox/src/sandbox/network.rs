//! `network:` of `Sandbox.create` → the NIC the sandbox gets (or none).
//!
//! The value is the policy's wire form (Ruby's `NetworkPolicy#to_h`, or a preset name),
//! parsed by the policy engine (`NetworkPolicy::from_wire`). Until the stack enforces
//! policies (the engine's `decide` at every connection and the DNS filter), only an
//! explicit `allow_all` gives a sandbox a NIC: main never ships a network that ignores
//! its policy. The default (`public_only`), the other presets and custom policies boot
//! without a NIC for now.

use microsandbox_network::policy::NetworkPolicy;
use microsandbox_network::NetworkConfig;
use serde_json::Value;

use crate::error::{Error, Result};

/// The typed policy of a `network:` value (`None`: the default).
pub fn policy(network: Option<&Value>) -> Result<NetworkPolicy> {
    NetworkPolicy::from_wire(network.unwrap_or(&Value::Null)).map_err(|e| Error::NetworkPolicy(e.to_string()))
}

/// Checks `network:` (at create, before anything starts).
pub fn validate(network: Option<&Value>) -> Result<()> {
    policy(network).map(|_| ())
}

/// The NIC of a sandbox with this `network:` value, `None` for no NIC.
pub fn nic(network: Option<&Value>) -> Result<Option<NetworkConfig>> {
    let policy = policy(network)?;
    Ok((policy == NetworkPolicy::allow_all()).then(NetworkConfig::with_defaults))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_allow_all_gets_a_nic_for_now() {
        for v in [json!("allow_all"), json!("all"), json!("allow-all"), json!({"preset": "allow_all"})] {
            assert!(nic(Some(&v)).unwrap().is_some(), "{v}");
        }
        for v in ["none", "airgapped", "public_only", "default", "non-local"] {
            assert!(nic(Some(&json!(v))).unwrap().is_none(), "{v}");
        }
        assert!(nic(None).unwrap().is_none(), "the default has no NIC until policies are enforced");
        let e = validate(Some(&json!("everything-secret"))).unwrap_err();
        assert_eq!(e.code(), "network-policy-error");
        assert!(!e.to_string().contains("everything-secret"), "{e}");
    }
}
