//! Parsing of the few `/proc` text files the agent reads. Pure functions, unit-tested.

/// Hostname used when the kernel command line names none.
pub const DEFAULT_HOSTNAME: &str = "sandbox";

/// `msb.hostname=NAME` from a kernel command line; the last occurrence wins, as the
/// kernel does for its own parameters. An empty value counts as absent.
pub fn hostname(cmdline: &str) -> &str {
    cmdline
        .split_whitespace()
        .rev()
        .find_map(|w| w.strip_prefix("msb.hostname="))
        .filter(|h| !h.is_empty())
        .unwrap_or(DEFAULT_HOSTNAME)
}

/// `msb.net=<ip>/<prefix>,<gateway>,<mtu>` from a kernel command line (last one wins);
/// `None` when absent or malformed (then the guest keeps only `lo`). The MTU is clamped to
/// what virtio-net and the host's stream framing carry (68..=65520).
pub fn net(cmdline: &str) -> Option<crate::net::NetConfig> {
    let value = cmdline.split_whitespace().rev().find_map(|w| w.strip_prefix("msb.net="))?;
    let mut parts = value.split(',');
    let (addr, prefix) = parts.next()?.split_once('/')?;
    let gateway = parts.next()?.parse().ok()?;
    let mtu: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    let prefix: u8 = prefix.parse().ok().filter(|p| (1..=30).contains(p))?;
    Some(crate::net::NetConfig { addr: addr.parse().ok()?, prefix, gateway, mtu: mtu.clamp(68, 65520) })
}

/// `msb.net6=<ip>/<prefix>,<gateway>` from a kernel command line (last one wins); `None`
/// when absent or malformed (then the guest has IPv4 only). The prefix is 64..=126.
pub fn net6(cmdline: &str) -> Option<crate::net::Net6Config> {
    let value = cmdline.split_whitespace().rev().find_map(|w| w.strip_prefix("msb.net6="))?;
    let (addr, gateway) = value.split_once(',')?;
    let (addr, prefix) = addr.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| (64..=126).contains(p))?;
    Some(crate::net::Net6Config { addr: addr.parse().ok()?, prefix, gateway: gateway.parse().ok()? })
}

/// Milliseconds of uptime from `/proc/uptime` ("12.34 5.67"). Parsed as decimal text, not
/// a float, so the value is exact.
pub fn uptime_ms(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let (secs, frac) = first.split_once('.').unwrap_or((first, ""));
    let secs: u64 = secs.parse().ok()?;
    let mut ms = 0u64;
    for (i, c) in frac.chars().take(3).enumerate() {
        ms += c.to_digit(10)? as u64 * 10u64.pow(2 - i as u32);
    }
    Some(secs * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_from_cmdline() {
        assert_eq!(
            hostname("console=ttyS0 quiet msb.hostname=t1 panic=-1\n"),
            "t1"
        );
        assert_eq!(hostname("msb.hostname=a msb.hostname=b"), "b");
        assert_eq!(hostname("console=ttyS0"), DEFAULT_HOSTNAME);
        assert_eq!(hostname("msb.hostname="), DEFAULT_HOSTNAME);
        assert_eq!(hostname("xmsb.hostname=no"), DEFAULT_HOSTNAME);
    }

    #[test]
    fn net_from_cmdline() {
        let c = net("quiet msb.net=100.96.0.2/30,100.96.0.1,65520 x").unwrap();
        assert_eq!(c.addr.to_string(), "100.96.0.2");
        assert_eq!((c.prefix, c.gateway.to_string(), c.mtu), (30, "100.96.0.1".to_string(), 65520));
        assert_eq!(net("msb.net=10.0.0.2/24,10.0.0.1,9000000").unwrap().mtu, 65520);
        assert!(net("console=ttyS0").is_none());
        assert!(net("msb.net=10.0.0.2,10.0.0.1,1500").is_none());
        assert!(net("msb.net=10.0.0.2/31,10.0.0.1,1500").is_none());
        assert!(net("msb.net=10.0.0.2/24,10.0.0.1,1500,x").is_none());
        assert!(net("msb.net=10.0.0.2/24,nope,1500").is_none());
    }

    #[test]
    fn net6_from_cmdline() {
        let c = net6("msb.net=172.16.0.2/30,172.16.0.1,65520 msb.net6=fd42:6d73:62::2/126,fd42:6d73:62::1 quiet").unwrap();
        assert_eq!((c.addr.to_string(), c.prefix, c.gateway.to_string()), ("fd42:6d73:62::2".into(), 126, "fd42:6d73:62::1".into()));
        assert!(net6("msb.net=172.16.0.2/30,172.16.0.1,65520").is_none());
        assert!(net6("msb.net6=fd00::2/127,fd00::1").is_none());
        assert!(net6("msb.net6=fd00::2/126").is_none());
        assert!(net6("msb.net6=fd00::2/126,10.0.0.1").is_none());
        assert!(net6("msb.net6=nope/126,fd00::1").is_none());
    }

    #[test]
    fn uptime() {
        assert_eq!(uptime_ms("12.34 5.67\n"), Some(12_340));
        assert_eq!(uptime_ms("0.05 0.00"), Some(50));
        assert_eq!(uptime_ms("7 1"), Some(7_000));
        assert_eq!(uptime_ms("1.2345 0"), Some(1_234));
        assert_eq!(uptime_ms(""), None);
        assert_eq!(uptime_ms("x.1 0"), None);
    }
}
