//! Network policy validation for the Ruby API: the same parser the engine runs at
//! create (`microsandbox_network::policy::NetworkPolicy::from_wire`), so a malformed
//! policy fails where it is built, with the same message.

use magnus::{Error, Ruby};
use microsandbox_network::dns::DnsConfig;
use microsandbox_network::policy::{NetworkPolicy, PolicyError};

/// `Microsandbox::Native.check_network_policy(json)`: nil, or raises
/// `Microsandbox::NetworkPolicyError` naming the bad key.
pub fn check_network_policy(ruby: &Ruby, json: String) -> Result<(), Error> {
    let value: serde_json::Value = serde_json::from_str(&json)
        .map_err(|_| crate::errors::build(ruby, PolicyError::CODE, "network: the policy is not a JSON document".to_string()))?;
    NetworkPolicy::from_wire(&value)
        .map(|_| ())
        .map_err(|e| crate::errors::build(ruby, PolicyError::CODE, e.to_string()))
}

/// `Microsandbox::Native.check_dns_config(json)`: nil, or raises
/// `Microsandbox::NetworkPolicyError` naming the bad key of a `dns:` Hash.
pub fn check_dns_config(ruby: &Ruby, json: String) -> Result<(), Error> {
    let value: serde_json::Value = serde_json::from_str(&json)
        .map_err(|_| crate::errors::build(ruby, PolicyError::CODE, "dns: the options are not a JSON document".to_string()))?;
    DnsConfig::from_wire(&value)
        .map(|_| ())
        .map_err(|e| crate::errors::build(ruby, PolicyError::CODE, e.to_string()))
}
