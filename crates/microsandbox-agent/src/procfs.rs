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
    fn uptime() {
        assert_eq!(uptime_ms("12.34 5.67\n"), Some(12_340));
        assert_eq!(uptime_ms("0.05 0.00"), Some(50));
        assert_eq!(uptime_ms("7 1"), Some(7_000));
        assert_eq!(uptime_ms("1.2345 0"), Some(1_234));
        assert_eq!(uptime_ms(""), None);
        assert_eq!(uptime_ms("x.1 0"), None);
    }
}
