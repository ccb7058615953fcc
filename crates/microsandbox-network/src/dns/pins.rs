//! The per-sandbox pin set: which addresses this sandbox resolved for which names.
//!
//! A domain rule (`Destination.domain("api.example.com")`) matches a connection only when
//! its destination address was returned *to this sandbox* in an answer for that name and
//! the answer's TTL (at least [`MIN_PIN_TTL`]) has not run out. A hard-coded address
//! that was never resolved, or one resolved for another name, is a pin miss.
//!
//! Bounded: at most `capacity` (name, address) pins. When full, expired pins go first,
//! then the pin closest to expiry — a guest that floods queries only evicts its own
//! pins, and memory never grows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::policy::classify::effective;
use crate::policy::domain::DomainName;

/// Shortest pin lifetime: a TTL 0 answer still lets the connection that asked for it
/// through.
pub const MIN_PIN_TTL: Duration = Duration::from_secs(1);
/// Longest pin lifetime, whatever TTL the upstream resolver sent.
pub const MAX_PIN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default number of (name, address) pins one sandbox keeps.
pub const DEFAULT_PIN_CAPACITY: usize = 4096;

#[derive(Debug, Clone)]
struct Pin {
    name: DomainName,
    expires: Instant,
}

/// Name → address pins of one sandbox, keyed by the address a connection reaches
/// (IPv4-mapped answers pin their IPv4 address).
#[derive(Debug, Clone)]
pub struct PinSet {
    by_addr: HashMap<IpAddr, Vec<Pin>>,
    len: usize,
    capacity: usize,
}

impl Default for PinSet {
    fn default() -> Self {
        PinSet::with_capacity(DEFAULT_PIN_CAPACITY)
    }
}

impl PinSet {
    pub fn new() -> PinSet {
        PinSet::default()
    }

    /// A pin set holding at most `capacity` pins (at least 1).
    pub fn with_capacity(capacity: usize) -> PinSet {
        PinSet { by_addr: HashMap::new(), len: 0, capacity: capacity.max(1) }
    }

    /// Number of pins held (expired ones included until they are purged).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records that `name` resolved to `addr` with `ttl` (clamped to
    /// [`MIN_PIN_TTL`]..=[`MAX_PIN_TTL`]). A pin that exists is extended, never shortened.
    pub fn insert(&mut self, name: DomainName, addr: IpAddr, ttl: Duration, now: Instant) {
        let expires = now + ttl.clamp(MIN_PIN_TTL, MAX_PIN_TTL);
        let key = effective(addr);
        if let Some(pin) = self.by_addr.get_mut(&key).and_then(|v| v.iter_mut().find(|p| p.name == name)) {
            pin.expires = pin.expires.max(expires);
            return;
        }
        if self.len >= self.capacity {
            self.purge_expired(now);
        }
        if self.len >= self.capacity {
            self.evict_soonest();
        }
        self.by_addr.entry(key).or_default().push(Pin { name, expires });
        self.len += 1;
    }

    /// The names `addr` is pinned for at `now`.
    pub fn names_for(&self, addr: IpAddr, now: Instant) -> impl Iterator<Item = &DomainName> {
        self.by_addr
            .get(&effective(addr))
            .into_iter()
            .flatten()
            .filter(move |p| p.expires > now)
            .map(|p| &p.name)
    }

    /// True when `addr` is pinned for exactly `name` at `now`.
    pub fn contains(&self, name: &DomainName, addr: IpAddr, now: Instant) -> bool {
        self.names_for(addr, now).any(|n| n == name)
    }

    /// Drops every expired pin.
    pub fn purge_expired(&mut self, now: Instant) {
        let mut removed = 0;
        self.by_addr.retain(|_, pins| {
            let before = pins.len();
            pins.retain(|p| p.expires > now);
            removed += before - pins.len();
            !pins.is_empty()
        });
        self.len -= removed;
    }

    fn evict_soonest(&mut self) {
        let soonest = self
            .by_addr
            .iter()
            .flat_map(|(a, pins)| pins.iter().enumerate().map(move |(i, p)| (p.expires, *a, i)))
            .min_by_key(|(e, _, _)| *e);
        if let Some((_, addr, i)) = soonest {
            let pins = self.by_addr.get_mut(&addr).expect("key just seen");
            pins.swap_remove(i);
            if pins.is_empty() {
                self.by_addr.remove(&addr);
            }
            self.len -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> DomainName {
        DomainName::new(s).unwrap()
    }

    #[test]
    fn pins_expire_after_their_ttl_with_a_one_second_floor() {
        let mut pins = PinSet::new();
        let t0 = Instant::now();
        let ip: IpAddr = "203.0.113.10".parse().unwrap();
        pins.insert(d("inet.test"), ip, Duration::ZERO, t0);
        assert!(pins.contains(&d("inet.test"), ip, t0));
        assert!(pins.contains(&d("inet.test"), ip, t0 + Duration::from_millis(999)));
        assert!(!pins.contains(&d("inet.test"), ip, t0 + Duration::from_secs(1)));
        assert!(!pins.contains(&d("other.test"), ip, t0));
    }

    #[test]
    fn mapped_answers_pin_their_ipv4_address() {
        let mut pins = PinSet::new();
        let t0 = Instant::now();
        pins.insert(d("a.test"), "::ffff:203.0.113.10".parse().unwrap(), Duration::from_secs(60), t0);
        assert!(pins.contains(&d("a.test"), "203.0.113.10".parse().unwrap(), t0));
    }

    #[test]
    fn a_pin_is_extended_never_shortened() {
        let mut pins = PinSet::new();
        let t0 = Instant::now();
        let ip: IpAddr = "203.0.113.10".parse().unwrap();
        pins.insert(d("a.test"), ip, Duration::from_secs(60), t0);
        pins.insert(d("a.test"), ip, Duration::from_secs(1), t0);
        assert_eq!(pins.len(), 1);
        assert!(pins.contains(&d("a.test"), ip, t0 + Duration::from_secs(30)));
    }

    #[test]
    fn capacity_is_a_hard_bound() {
        let mut pins = PinSet::with_capacity(8);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let ip = IpAddr::from(u32::to_be_bytes(0xCB00_7100 + (i % 256)));
            pins.insert(d(&format!("n{i}.test")), ip, Duration::from_secs(10 + u64::from(i)), t0);
            assert!(pins.len() <= 8);
        }
        // The longest-lived pins survive.
        assert!(pins.contains(&d("n999.test"), IpAddr::from(u32::to_be_bytes(0xCB00_7100 + 999 % 256)), t0));
        pins.purge_expired(t0 + Duration::from_secs(100_000));
        assert!(pins.is_empty());
    }
}
