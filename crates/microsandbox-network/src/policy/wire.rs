//! The wire form of a policy — what Ruby's `NetworkPolicy#to_h` produces — parsed into
//! a typed [`NetworkPolicy`].
//!
//! Accepted shapes (JSON):
//! - `"public_only"` (any alias in [`Preset::ALIASES`]);
//! - `{"preset": name, "deny_domains"?: [..], "deny_domain_suffixes"?: [..]}`;
//! - `{"default_egress"?: "allow"|"deny", "default_ingress"?: .., "rules"?: [rule..],
//!   "deny_domains"?, "deny_domain_suffixes"?}` — a custom policy (defaults deny egress,
//!   allow ingress); with only deny lists, both defaults are allow ("everything except
//!   these names"); `{}` is the default policy (`public_only`);
//! - rule: `{"action": "allow"|"deny", "direction"?: "egress"|"ingress"|"any",
//!   "destination_kind"?: "any"|"ip"|"cidr"|"domain"|"domain_suffix"|"group",
//!   "destination"?: string, "protocols"?|"protocol"?: names, "ports"?|"port"?: ports}`;
//!   without a kind the destination string is read as shorthand: `*`/`any`, a group
//!   name, an address, a CIDR, `.suffix` / `*.suffix`, else a domain.
//!
//! Errors name the key path (`network.rules[2].ports[0]`) and what is expected; they
//! never contain the offending value (a policy may be built from data a user would not
//! want in a log).

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::{Destination, DomainName, Group, NetworkPolicy, PortRange, Preset, Rule, RuleDirection};
use crate::flow::{Action, Protocol};

/// Upper bound on rules (including deny-list entries): a policy is configuration, not
/// data; the bound keeps a runaway generator from building a huge matcher.
pub const MAX_RULES: usize = 10_000;
/// Upper bound on ports or protocols listed in one rule.
pub const MAX_LIST: usize = 1024;

/// A malformed policy. `Display` is `"<key>: <what is wrong>"`; the engine reports it
/// with code [`PolicyError::CODE`] (`Microsandbox::NetworkPolicyError` in Ruby).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct PolicyError {
    /// Path of the offending key, e.g. `network.rules[2].destination`.
    pub key: String,
    /// What is wrong and what is expected (never the value itself).
    pub message: String,
}

impl PolicyError {
    /// Stable error code shared with the Ruby error class.
    pub const CODE: &'static str = "network-policy-error";

    fn new(key: impl Into<String>, message: impl Into<String>) -> PolicyError {
        PolicyError { key: key.into(), message: message.into() }
    }
}

type Result<T> = std::result::Result<T, PolicyError>;

const PRESET_HINT: &str =
    "expected a preset name: none (or disabled, disable, airgapped), public_only (or public, public-only, default), allow_all (or all, allow-all), non_local (or non-local, nonlocal)";

impl NetworkPolicy {
    /// Parses the wire form (see the module docs).
    pub fn from_wire(value: &Value) -> Result<NetworkPolicy> {
        match value {
            Value::Null => Ok(NetworkPolicy::public_only()),
            Value::String(s) => preset("network", s).map(NetworkPolicy::from_preset),
            Value::Object(map) => from_object(map),
            _ => Err(PolicyError::new("network", "must be a preset name or a policy Hash")),
        }
    }
}

fn preset(key: &str, name: &str) -> Result<Preset> {
    Preset::from_alias(name).ok_or_else(|| PolicyError::new(key, format!("unknown preset; {PRESET_HINT}")))
}

/// A key name is echoed only when it looks like an identifier (it is a key, but it came
/// from the user: keep anything odd out of messages).
fn key_name(k: &str) -> String {
    if !k.is_empty() && k.len() <= 40 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        k.to_string()
    } else {
        "<unprintable key>".to_string()
    }
}

fn check_keys(key: &str, map: &Map<String, Value>, allowed: &[&str]) -> Result<()> {
    for k in map.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(PolicyError::new(
                format!("{key}.{}", key_name(k)),
                format!("unknown key; expected one of {}", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

fn from_object(map: &Map<String, Value>) -> Result<NetworkPolicy> {
    check_keys(
        "network",
        map,
        &["preset", "default_egress", "default_ingress", "rules", "deny_domains", "deny_domain_suffixes"],
    )?;
    let deny = deny_rules(map)?;
    let custom = ["rules", "default_egress", "default_ingress"].iter().any(|k| map.contains_key(*k));
    let mut policy = if let Some(p) = map.get("preset") {
        if custom {
            return Err(PolicyError::new(
                "network.preset",
                "cannot be combined with rules, default_egress or default_ingress (only deny_domains and deny_domain_suffixes may be added to a preset)",
            ));
        }
        let Value::String(name) = p else {
            return Err(PolicyError::new("network.preset", "must be a String"));
        };
        NetworkPolicy::from_preset(preset("network.preset", name)?)
    } else if custom {
        let rules = match map.get("rules") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                if items.len() > MAX_RULES {
                    return Err(PolicyError::new("network.rules", format!("has more than {MAX_RULES} rules")));
                }
                items.iter().enumerate().map(|(i, r)| rule(&format!("network.rules[{i}]"), r)).collect::<Result<_>>()?
            }
            Some(_) => return Err(PolicyError::new("network.rules", "must be an Array of rules")),
        };
        NetworkPolicy::custom(
            action_or("network.default_egress", map.get("default_egress"), Action::Deny)?,
            action_or("network.default_ingress", map.get("default_ingress"), Action::Allow)?,
            rules,
        )
    } else if deny.is_empty() {
        NetworkPolicy::public_only()
    } else {
        NetworkPolicy::custom(Action::Allow, Action::Allow, Vec::new())
    };
    if policy.rules().len() + deny.len() > MAX_RULES {
        return Err(PolicyError::new("network", format!("has more than {MAX_RULES} rules and deny-list entries")));
    }
    if !deny.is_empty() {
        policy = policy.prepend(deny);
    }
    Ok(policy)
}

fn deny_rules(map: &Map<String, Value>) -> Result<Vec<Rule>> {
    let mut out = Vec::new();
    for (key, suffix) in [("deny_domains", false), ("deny_domain_suffixes", true)] {
        let items = match map.get(key) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(items)) => items,
            Some(_) => return Err(PolicyError::new(format!("network.{key}"), "must be an Array of Strings")),
        };
        if items.len() > MAX_RULES {
            return Err(PolicyError::new(format!("network.{key}"), format!("has more than {MAX_RULES} entries")));
        }
        for (i, item) in items.iter().enumerate() {
            let k = format!("network.{key}[{i}]");
            let Value::String(s) = item else { return Err(PolicyError::new(k, "must be a String")) };
            let destination = if suffix {
                Destination::DomainSuffix(suffix_name(&k, s)?)
            } else {
                Destination::Domain(domain(&k, s)?)
            };
            out.push(Rule { action: Action::Deny, direction: RuleDirection::Egress, destination, protocols: Vec::new(), ports: Vec::new() });
        }
    }
    Ok(out)
}

fn action_or(key: &str, v: Option<&Value>, default: Action) -> Result<Action> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "allow" => Ok(Action::Allow),
            "deny" => Ok(Action::Deny),
            _ => Err(PolicyError::new(key, "must be allow or deny")),
        },
        Some(_) => Err(PolicyError::new(key, "must be allow or deny")),
    }
}

fn rule(key: &str, v: &Value) -> Result<Rule> {
    let Value::Object(map) = v else { return Err(PolicyError::new(key, "must be a rule Hash (see Microsandbox::Rule.allow/deny)")) };
    check_keys(key, map, &["action", "direction", "destination_kind", "destination", "protocols", "protocol", "ports", "port"])?;
    let action = match map.get("action") {
        None | Some(Value::Null) => return Err(PolicyError::new(format!("{key}.action"), "is missing; expected allow or deny")),
        v => action_or(&format!("{key}.action"), v, Action::Deny)?,
    };
    let direction = match map.get("direction") {
        None | Some(Value::Null) => RuleDirection::Egress,
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "egress" | "outbound" => RuleDirection::Egress,
            "ingress" | "inbound" => RuleDirection::Ingress,
            "any" | "both" => RuleDirection::Any,
            _ => return Err(PolicyError::new(format!("{key}.direction"), "must be egress, ingress or any")),
        },
        Some(_) => return Err(PolicyError::new(format!("{key}.direction"), "must be egress, ingress or any")),
    };
    let destination = destination(key, map.get("destination_kind"), map.get("destination"))?;
    let mut protocols = Vec::new();
    for k in ["protocols", "protocol"] {
        for (i, p) in list(key, k, map.get(k))?.into_iter().enumerate() {
            let pk = format!("{key}.{k}[{i}]");
            let Value::String(s) = p else { return Err(PolicyError::new(pk, "must be a String")) };
            let proto = match s.to_ascii_lowercase().as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "icmpv4" | "icmp" => Protocol::Icmpv4,
                "icmpv6" => Protocol::Icmpv6,
                _ => return Err(PolicyError::new(pk, "unknown protocol; expected tcp, udp, icmpv4 or icmpv6")),
            };
            if !protocols.contains(&proto) {
                protocols.push(proto);
            }
        }
    }
    let mut ports = Vec::new();
    for k in ["ports", "port"] {
        for (i, p) in list(key, k, map.get(k))?.into_iter().enumerate() {
            ports.push(port_range(&format!("{key}.{k}[{i}]"), p)?);
        }
    }
    if !ports.is_empty() && !protocols.is_empty() && !protocols.iter().any(|p| matches!(p, Protocol::Tcp | Protocol::Udp)) {
        return Err(PolicyError::new(format!("{key}.ports"), "only apply to tcp and udp, but the rule lists only ICMP protocols"));
    }
    Ok(Rule { action, direction, destination, protocols, ports })
}

/// A value that may be one item or an Array of them.
fn list<'a>(key: &str, k: &str, v: Option<&'a Value>) -> Result<Vec<&'a Value>> {
    let items: Vec<&Value> = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(other) => vec![other],
    };
    if items.len() > MAX_LIST {
        return Err(PolicyError::new(format!("{key}.{k}"), format!("lists more than {MAX_LIST} entries")));
    }
    Ok(items)
}

fn port_number(key: &str, s: &str) -> Result<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PolicyError::new(key, "must be a port 1-65535 or a range like 8000-9000"));
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(PolicyError::new(key, "port out of range; ports are 1-65535")),
    }
}

fn port_range(key: &str, v: &Value) -> Result<PortRange> {
    let (start, end) = match v {
        Value::Number(n) => {
            let p = n.as_u64().filter(|p| (1..=65535).contains(p)).ok_or_else(|| PolicyError::new(key, "port out of range; ports are 1-65535"))?;
            (p as u16, p as u16)
        }
        Value::String(s) => match s.split_once('-') {
            Some((a, b)) => (port_number(key, a)?, port_number(key, b)?),
            None => {
                let p = port_number(key, s)?;
                (p, p)
            }
        },
        _ => return Err(PolicyError::new(key, "must be a port 1-65535 or a range like 8000-9000")),
    };
    PortRange::new(start, end).ok_or_else(|| PolicyError::new(key, "range start is greater than its end"))
}

fn domain(key: &str, s: &str) -> Result<DomainName> {
    DomainName::new(s).map_err(|e| PolicyError::new(key, format!("not a valid domain name: it {e}")))
}

/// A suffix may be written `example.com`, `.example.com` or `*.example.com`.
fn suffix_name(key: &str, s: &str) -> Result<DomainName> {
    let bare = s.strip_prefix("*.").or_else(|| s.strip_prefix('.')).unwrap_or(s);
    domain(key, bare)
}

fn ip(key: &str, s: &str) -> Result<IpAddr> {
    s.parse().map_err(|_| PolicyError::new(key, "not a valid IP address"))
}

fn cidr(key: &str, s: &str) -> Result<IpNet> {
    // Host bits are cleared ("10.1.2.3/8" is 10.0.0.0/8); a bare address is a /32 or /128.
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(PolicyError::new(key, "not a valid CIDR (expected address/prefix, e.g. 10.0.0.0/8 or fd00::/8, prefix at most 32 or 128)"))
}

fn destination<'a>(key: &str, kind: Option<&Value>, value: Option<&'a Value>) -> Result<Destination> {
    let dkey = format!("{key}.destination");
    let value = match value {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(PolicyError::new(dkey, "must be a String")),
    };
    let kind = match kind {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.to_ascii_lowercase()),
        Some(_) => return Err(PolicyError::new(format!("{key}.destination_kind"), "must be a String")),
    };
    let Some(kind) = kind else {
        return match value {
            None => Ok(Destination::Any),
            Some(s) => shorthand(&dkey, s),
        };
    };
    let missing = || PolicyError::new(dkey.clone(), format!("is missing (destination_kind {kind} needs a value)"));
    let need = |v: Option<&'a str>| v.ok_or_else(missing);
    match kind.as_str() {
        "any" => match value {
            None | Some("*") | Some("any") => Ok(Destination::Any),
            Some(_) => Err(PolicyError::new(dkey, "must be empty or * for destination_kind any")),
        },
        "ip" => Ok(Destination::Ip(ip(&dkey, need(value)?)?)),
        "cidr" => Ok(Destination::Cidr(cidr(&dkey, need(value)?)?)),
        "domain" => Ok(Destination::Domain(domain(&dkey, need(value)?)?)),
        "domain_suffix" | "domain-suffix" => Ok(Destination::DomainSuffix(suffix_name(&dkey, need(value)?)?)),
        "group" => Group::from_wire_name(need(value)?).map(Destination::Group).ok_or_else(|| {
            PolicyError::new(dkey, "unknown group; expected public, loopback, private, link-local, metadata, multicast or host")
        }),
        _ => Err(PolicyError::new(
            format!("{key}.destination_kind"),
            "unknown kind; expected any, ip, cidr, domain, domain_suffix or group",
        )),
    }
}

/// Shorthand: `*`/`any`, a group name, an address, a CIDR, `.suffix`/`*.suffix`, a domain.
fn shorthand(key: &str, s: &str) -> Result<Destination> {
    if s == "*" || s.eq_ignore_ascii_case("any") {
        return Ok(Destination::Any);
    }
    if let Some(g) = Group::from_wire_name(s) {
        return Ok(Destination::Group(g));
    }
    if s.contains('/') {
        return cidr(key, s).map(Destination::Cidr);
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Ok(Destination::Ip(addr));
    }
    if s.contains(':') {
        return Err(PolicyError::new(key, "not a valid IP address"));
    }
    if s.starts_with('.') || s.starts_with("*.") {
        return suffix_name(key, s).map(Destination::DomainSuffix);
    }
    domain(key, s).map(Destination::Domain)
}
