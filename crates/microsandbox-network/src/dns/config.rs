//! `dns:` options: which resolvers the gateway forwards to, how long it waits, and
//! whether rebind protection filters answers.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::policy::{DomainName, PolicyError};

/// Default wait for one upstream answer.
pub const DEFAULT_QUERY_TIMEOUT_MS: u64 = 5_000;
/// Longest accepted `query_timeout_ms`.
pub const MAX_QUERY_TIMEOUT_MS: u64 = 60_000;
/// Most nameservers one sandbox may list.
pub const MAX_NAMESERVERS: usize = 8;

/// One upstream resolver: an address (port 53 unless given) or a host name with a port
/// (resolved on the host by the transport).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Nameserver {
    Addr(SocketAddr),
    Name { host: DomainName, port: u16 },
}

impl Nameserver {
    /// Parses `ip`, `ip:port`, `[v6]:port` or `name:port` (`name` alone means port 53).
    /// The error says what is expected, never repeating the input.
    pub fn parse(s: &str) -> Result<Nameserver, &'static str> {
        const WANT: &str = "must be an address (1.1.1.1, ::1), address:port (127.0.0.1:5353, [::1]:5353) or name:port (dns.example:53)";
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Nameserver::Addr(SocketAddr::new(ip, 53)));
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return if sa.port() == 0 { Err("port must be 1-65535") } else { Ok(Nameserver::Addr(sa)) };
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => {
                if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(WANT);
                }
                match p.parse::<u32>() {
                    Ok(n) if (1..=65535).contains(&n) => (h, n as u16),
                    _ => return Err("port must be 1-65535"),
                }
            }
            None => (s, 53),
        };
        if host.contains(':') || host.parse::<IpAddr>().is_ok() {
            return Err(WANT);
        }
        DomainName::new(host).map(|host| Nameserver::Name { host, port }).map_err(|_| WANT)
    }
}

impl std::fmt::Display for Nameserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Nameserver::Addr(sa) => write!(f, "{sa}"),
            Nameserver::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl TryFrom<String> for Nameserver {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Nameserver::parse(&s).map_err(|e| format!("nameserver {e}"))
    }
}

impl From<Nameserver> for String {
    fn from(n: Nameserver) -> String {
        n.to_string()
    }
}

/// The sandbox's DNS options. Serde defaults are the documented defaults, so `{}` is a
/// valid config (host resolvers, 5 s, rebind protection on).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    /// Upstream resolvers, tried in order; empty = the host's (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<Nameserver>,
    /// How long to wait for one upstream answer, 1..=60,000 ms.
    #[serde(default = "default_timeout")]
    pub query_timeout_ms: u64,
    /// Drop answers pointing at addresses the policy would not let the sandbox reach by
    /// address (private, loopback, link-local, metadata, host…).
    #[serde(default = "default_true")]
    pub rebind_protection: bool,
}

fn default_timeout() -> u64 {
    DEFAULT_QUERY_TIMEOUT_MS
}

fn default_true() -> bool {
    true
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig { nameservers: Vec::new(), query_timeout_ms: DEFAULT_QUERY_TIMEOUT_MS, rebind_protection: true }
    }
}

impl DnsConfig {
    /// Parses the `dns:` wire Hash (`{"nameservers": [..], "query_timeout_ms": n,
    /// "rebind_protection": bool}`, every key optional; null = defaults). Errors name the
    /// key (`dns.nameservers[1]`) and never echo the value.
    pub fn from_wire(value: &Value) -> Result<DnsConfig, PolicyError> {
        let err = |key: String, msg: &str| PolicyError { key, message: msg.to_string() };
        let map = match value {
            Value::Null => return Ok(DnsConfig::default()),
            Value::Object(map) => map,
            _ => return Err(err("dns".into(), "must be a Hash")),
        };
        let mut cfg = DnsConfig::default();
        for (k, v) in map {
            match (k.as_str(), v) {
                (_, Value::Null) => {}
                ("nameservers", Value::Array(items)) => {
                    if items.len() > MAX_NAMESERVERS {
                        return Err(err("dns.nameservers".into(), "lists more than 8 nameservers"));
                    }
                    for (i, item) in items.iter().enumerate() {
                        let key = format!("dns.nameservers[{i}]");
                        let Value::String(s) = item else { return Err(err(key, "must be a String")) };
                        cfg.nameservers.push(Nameserver::parse(s).map_err(|m| err(key, m))?);
                    }
                }
                ("nameservers", _) => return Err(err("dns.nameservers".into(), "must be an Array of Strings")),
                ("query_timeout_ms", Value::Number(n)) => match n.as_u64() {
                    Some(ms) if (1..=MAX_QUERY_TIMEOUT_MS).contains(&ms) => cfg.query_timeout_ms = ms,
                    _ => return Err(err("dns.query_timeout_ms".into(), "must be an Integer from 1 to 60000")),
                },
                ("query_timeout_ms", _) => return Err(err("dns.query_timeout_ms".into(), "must be an Integer from 1 to 60000")),
                ("rebind_protection", Value::Bool(b)) => cfg.rebind_protection = *b,
                ("rebind_protection", _) => return Err(err("dns.rebind_protection".into(), "must be true or false")),
                (other, _) => {
                    let shown = if other.len() <= 40 && other.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') { other } else { "<unprintable key>" };
                    return Err(err(
                        format!("dns.{shown}"),
                        "unknown key; expected nameservers, query_timeout_ms or rebind_protection",
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nameserver_forms() {
        let ok: &[(&str, &str)] = &[
            ("1.1.1.1", "1.1.1.1:53"),
            ("127.0.0.1:5353", "127.0.0.1:5353"),
            ("::1", "[::1]:53"),
            ("[::1]:5353", "[::1]:5353"),
            ("dns.google:53", "dns.google:53"),
            ("DNS.Example.", "dns.example:53"),
            ("resolver.test:5300", "resolver.test:5300"),
        ];
        for (s, want) in ok {
            assert_eq!(Nameserver::parse(s).unwrap().to_string(), *want, "{s}");
        }
        for bad in ["", "not an ip:99999", "1.1.1.1:0", "1.1.1.1:70000", "dns.google:", "dns.google:x", "::1:53:", "a b:53", "1.2.3:53", "[::1]:0"] {
            assert!(Nameserver::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_from_wire() {
        assert_eq!(DnsConfig::from_wire(&Value::Null).unwrap(), DnsConfig::default());
        assert_eq!(DnsConfig::from_wire(&json!({})).unwrap(), DnsConfig::default());
        let cfg = DnsConfig::from_wire(&json!({"nameservers": ["127.0.0.1:5353", "dns.google:53"], "query_timeout_ms": 2000, "rebind_protection": false})).unwrap();
        assert_eq!(cfg.nameservers.len(), 2);
        assert_eq!((cfg.query_timeout_ms, cfg.rebind_protection), (2000, false));
        let back: DnsConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        let defaulted: DnsConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(defaulted, DnsConfig::default());
    }

    /// NETWORK.md 9.12 (the DNS part).
    #[test]
    fn bad_config_names_the_key() {
        let cases = [
            (json!({"nameservers": ["1.1.1.1", "not an ip:99999"]}), "dns.nameservers[1]", "99999"),
            (json!({"nameservers": "1.1.1.1"}), "dns.nameservers", "1.1.1.1"),
            (json!({"nameservers": [5]}), "dns.nameservers[0]", "5"),
            (json!({"query_timeout_ms": 0}), "dns.query_timeout_ms", "\0"),
            (json!({"query_timeout_ms": 60001}), "dns.query_timeout_ms", "60001"),
            (json!({"query_timeout_ms": -1}), "dns.query_timeout_ms", "\0"),
            (json!({"query_timeout_ms": "5"}), "dns.query_timeout_ms", "\0"),
            (json!({"rebind_protection": "no"}), "dns.rebind_protection", "no"),
            (json!({"sekrit": 1}), "dns.sekrit", "\0"),
            (json!([]), "dns", "\0"),
        ];
        for (v, key, secret) in cases {
            let e = DnsConfig::from_wire(&v).unwrap_err();
            assert_eq!(e.key, key, "{v}");
            assert!(!e.message.contains(secret), "{e}");
        }
        let many: Vec<_> = (0..9).map(|i| format!("127.0.0.{i}")).collect();
        assert_eq!(DnsConfig::from_wire(&json!({ "nameservers": many })).unwrap_err().key, "dns.nameservers");
    }
}
