//! Published ports (`ports:`, `ports_udp:`): which host socket forwards to which guest
//! port. Pure parsing and validation; the listeners live in the stack (`stack::ports`).
//!
//! Wire form (what the Ruby API sends, after normalising the spellings
//! `{8080 => 80}`, `{"8080" => 80}`, `{"0.0.0.0:8080" => 80}`, `{"[::1]:8080" => 80}`):
//! a list of `{"bind"?: "ip", "host_port": n, "guest_port": n}`. `bind` defaults to
//! 127.0.0.1, as in the reference gem (whose ports always bind loopback): a port is
//! reachable from other machines only when a wider address is asked for explicitly.
//!
//! IPv6: `"[::1]:8080"` binds IPv6 loopback, `"[::]:8080"` every IPv6 address of the host
//! and only those (the listener is IPv6-only, so `"0.0.0.0:8080"` and `"[::]:8080"` are
//! two independent ports). An IPv4-mapped address (`::ffff:a.b.c.d`) is refused: it would
//! be an IPv4 port spelt as IPv6, which an IPv6-only socket cannot bind.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Host address a published port binds when none is given.
pub const DEFAULT_BIND: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Published ports per sandbox at most (TCP and UDP together).
pub const MAX_PORTS: usize = 64;

/// Transport of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortProtocol {
    Tcp,
    Udp,
}

impl PortProtocol {
    /// The create option that publishes this protocol.
    pub fn option(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "ports",
            PortProtocol::Udp => "ports_udp",
        }
    }
}

/// One published port: connections (TCP) or datagrams (UDP) to `host` are forwarded to
/// the guest's `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublishedPort {
    pub protocol: PortProtocol,
    pub host: SocketAddr,
    pub guest_port: u16,
}

/// One entry as the engine's config carries it (numbers unchecked until [`parse`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// Host address to bind (default [`DEFAULT_BIND`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    pub host_port: i64,
    pub guest_port: i64,
}

/// Checks `specs` of one protocol. Errors name the option and the entry, e.g.
/// `ports[1]: host_port must be between 1 and 65535`.
pub fn parse(protocol: PortProtocol, specs: &[PortSpec]) -> Result<Vec<PublishedPort>, String> {
    let key = protocol.option();
    let mut out = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let port = |what: &str, v: i64| {
            u16::try_from(v)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{key}[{i}]: {what} must be between 1 and 65535"))
        };
        let host_port = port("host_port", s.host_port)?;
        let guest_port = port("guest_port", s.guest_port)?;
        let ip = match &s.bind {
            None => DEFAULT_BIND,
            Some(b) => b
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| format!("{key}[{i}]: the host address must be an IPv4 or IPv6 address (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"))?,
        };
        if ip.is_multicast() {
            return Err(format!("{key}[{i}]: the host address must not be a multicast address"));
        }
        if let IpAddr::V6(v6) = ip {
            if v6.to_ipv4_mapped().is_some() {
                return Err(format!("{key}[{i}]: the host address must not be an IPv4-mapped IPv6 address; write the IPv4 address (e.g. \"127.0.0.1:8080\")"));
            }
        }
        out.push(PublishedPort { protocol, host: SocketAddr::new(ip, host_port), guest_port });
    }
    Ok(out)
}

/// Checks the whole set (TCP and UDP): bounded, and no host port published twice for
/// one protocol (a wildcard address overlaps every address of its family).
pub fn check_set(ports: &[PublishedPort]) -> Result<(), String> {
    if ports.len() > MAX_PORTS {
        return Err(format!("ports, ports_udp: at most {MAX_PORTS} published ports per sandbox"));
    }
    for (i, a) in ports.iter().enumerate() {
        for b in &ports[..i] {
            let same_family = a.host.is_ipv4() == b.host.is_ipv4();
            let overlap = a.host.ip() == b.host.ip() || (same_family && (a.host.ip().is_unspecified() || b.host.ip().is_unspecified()));
            if a.protocol == b.protocol && a.host.port() == b.host.port() && overlap {
                return Err(format!(
                    "{}: host port {} is published twice",
                    a.protocol.option(),
                    a.host.port()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(bind: Option<&str>, h: i64, g: i64) -> PortSpec {
        PortSpec { bind: bind.map(String::from), host_port: h, guest_port: g }
    }

    #[test]
    fn defaults_to_loopback_and_parses_addresses() {
        let p = parse(PortProtocol::Tcp, &[spec(None, 8080, 80), spec(Some("0.0.0.0"), 8081, 81), spec(Some("[::1]"), 8082, 82)]).unwrap();
        assert_eq!(p[0].host, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(p[1].host, "0.0.0.0:8081".parse().unwrap());
        assert_eq!(p[2].host, "[::1]:8082".parse().unwrap());
        assert_eq!(p[2].guest_port, 82);
    }

    #[test]
    fn rejects_bad_entries_naming_the_key_not_the_value() {
        for (s, want) in [
            (spec(None, 0, 80), "ports[0]: host_port must be between 1 and 65535"),
            (spec(None, 70000, 80), "ports[0]: host_port must be between 1 and 65535"),
            (spec(None, 80, -1), "ports[0]: guest_port must be between 1 and 65535"),
            (spec(Some("secret-host"), 80, 80), "ports[0]: the host address must be an IPv4 or IPv6 address"),
            (spec(Some("224.0.0.1"), 80, 80), "ports[0]: the host address must not be a multicast address"),
            (spec(Some("[ff02::1]"), 80, 80), "ports[0]: the host address must not be a multicast address"),
            (spec(Some("[::ffff:127.0.0.1]"), 80, 80), "ports[0]: the host address must not be an IPv4-mapped IPv6 address"),
            (spec(Some("[::1%eth0]"), 80, 80), "ports[0]: the host address must be an IPv4 or IPv6 address"),
        ] {
            let e = parse(PortProtocol::Tcp, &[s]).unwrap_err();
            assert!(e.starts_with(want), "{e}");
            assert!(!e.contains("secret-host"), "{e}");
        }
        let e = parse(PortProtocol::Udp, &[spec(None, 53, 53), spec(None, 0, 1)]).unwrap_err();
        assert!(e.starts_with("ports_udp[1]:"), "{e}");
    }

    #[test]
    fn a_host_port_is_published_once_per_protocol() {
        let tcp = parse(PortProtocol::Tcp, &[spec(None, 8080, 80)]).unwrap();
        let udp = parse(PortProtocol::Udp, &[spec(None, 8080, 80)]).unwrap();
        let other_addr = parse(PortProtocol::Tcp, &[spec(Some("127.0.0.2"), 8080, 81)]).unwrap();
        let wildcard = parse(PortProtocol::Tcp, &[spec(Some("0.0.0.0"), 8080, 81)]).unwrap();
        let v6 = parse(PortProtocol::Tcp, &[spec(Some("[::1]"), 8080, 82), spec(Some("[::]"), 8080, 83)]).unwrap();
        assert!(check_set(&[tcp[0], udp[0], other_addr[0]]).is_ok());
        // IPv6 listeners are IPv6-only: they never overlap an IPv4 one.
        assert!(check_set(&[tcp[0], wildcard[0], v6[0]]).is_err(), "0.0.0.0 covers 127.0.0.1");
        assert!(check_set(&[wildcard[0], v6[0]]).is_ok());
        assert!(check_set(&[wildcard[0], v6[1]]).is_ok());
        assert_eq!(check_set(&[v6[0], v6[1]]).unwrap_err(), "ports: host port 8080 is published twice", ":: covers ::1");
        assert_eq!(check_set(&[tcp[0], tcp[0]]).unwrap_err(), "ports: host port 8080 is published twice");
        assert!(check_set(&[tcp[0], wildcard[0]]).is_err());
        let many: Vec<_> = (1..=65).map(|p| PublishedPort { protocol: PortProtocol::Tcp, host: SocketAddr::new(DEFAULT_BIND, p), guest_port: 80 }).collect();
        assert!(check_set(&many).unwrap_err().contains("at most 64"));
    }
}
