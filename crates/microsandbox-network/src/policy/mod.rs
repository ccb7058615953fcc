//! The network policy: typed rules, presets, and the decision for one [`Flow`].
//!
//! - [`classify`]: which group an address is in (the table is in its module docs).
//! - [`domain`]: validated domain names.
//! - [`wire`]: parsing the wire Hash the Ruby API produces (`NetworkPolicy#to_h`) into
//!   a [`NetworkPolicy`], with [`PolicyError`]s that name the bad key and never echo a
//!   value.
//!
//! Semantics (see DESIGN.md "Network policy"):
//! - Rules are tried in order; the first rule whose direction, protocol, port and
//!   destination all match decides. No match ⇒ the direction's default.
//! - An IP/CIDR destination matches the address as given and, for IPv6 forms that carry
//!   an IPv4 address (mapped, NAT64, 6to4…), that IPv4 address.
//! - A group destination matches the address's [`Group`] (one group per address).
//! - A domain / suffix destination matches an egress flow only when the destination
//!   address is pinned for a matching name in the sandbox's [`PinSet`] (this sandbox
//!   resolved it). It never matches ingress (a peer has no name we resolved).
//! - A rule with ports matches only TCP/UDP flows (ICMP has no port).
//! - `deny_domains` / `deny_domain_suffixes` become deny rules placed before all others.

pub mod classify;
pub mod domain;
mod index;
pub mod wire;

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use classify::{classify, Group, HostContext};
pub use domain::DomainName;
pub use wire::PolicyError;

use crate::dns::PinSet;
use crate::flow::{Action, Direction, Flow, Protocol, Verdict};

/// The named presets. `None` removes the NIC altogether.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    None,
    PublicOnly,
    AllowAll,
    NonLocal,
}

impl Preset {
    /// Canonical wire name.
    pub fn name(self) -> &'static str {
        match self {
            Preset::None => "none",
            Preset::PublicOnly => "public_only",
            Preset::AllowAll => "allow_all",
            Preset::NonLocal => "non_local",
        }
    }

    /// Every accepted spelling (case-insensitive) → preset, as the Ruby
    /// `NetworkPolicy::PRESET_ALIASES` lists them.
    pub const ALIASES: [(&'static str, Preset); 14] = [
        ("none", Preset::None),
        ("disabled", Preset::None),
        ("disable", Preset::None),
        ("airgapped", Preset::None),
        ("public", Preset::PublicOnly),
        ("public_only", Preset::PublicOnly),
        ("public-only", Preset::PublicOnly),
        ("default", Preset::PublicOnly),
        ("all", Preset::AllowAll),
        ("allow_all", Preset::AllowAll),
        ("allow-all", Preset::AllowAll),
        ("non_local", Preset::NonLocal),
        ("non-local", Preset::NonLocal),
        ("nonlocal", Preset::NonLocal),
    ];

    /// Looks a spelling up in [`Preset::ALIASES`].
    pub fn from_alias(name: &str) -> Option<Preset> {
        let lower = name.to_ascii_lowercase();
        Preset::ALIASES.iter().find(|(a, _)| *a == lower).map(|(_, p)| *p)
    }
}

/// Which directions a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleDirection {
    Egress,
    Ingress,
    Any,
}

impl RuleDirection {
    fn covers(self, d: Direction) -> bool {
        matches!(
            (self, d),
            (RuleDirection::Any, _) | (RuleDirection::Egress, Direction::Egress) | (RuleDirection::Ingress, Direction::Ingress)
        )
    }
}

/// What a rule matches the far end against.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Destination {
    Any,
    Ip(IpAddr),
    Cidr(IpNet),
    Domain(DomainName),
    DomainSuffix(DomainName),
    Group(Group),
}

/// An inclusive port range, `start <= end`, both in 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "(u16, u16)", into = "(u16, u16)")]
pub struct PortRange {
    start: u16,
    end: u16,
}

impl PortRange {
    /// `None` when `start` is 0 or greater than `end`.
    pub fn new(start: u16, end: u16) -> Option<PortRange> {
        (start >= 1 && start <= end).then_some(PortRange { start, end })
    }
    pub fn single(port: u16) -> Option<PortRange> {
        PortRange::new(port, port)
    }
    pub fn start(self) -> u16 {
        self.start
    }
    pub fn end(self) -> u16 {
        self.end
    }
    pub fn contains(self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }
}

impl TryFrom<(u16, u16)> for PortRange {
    type Error = String;
    fn try_from((s, e): (u16, u16)) -> Result<Self, String> {
        PortRange::new(s, e).ok_or_else(|| "port range must be 1-65535 with start <= end".to_string())
    }
}

impl From<PortRange> for (u16, u16) {
    fn from(p: PortRange) -> (u16, u16) {
        (p.start, p.end)
    }
}

/// One rule. Empty `protocols` / `ports` mean "any".
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub action: Action,
    pub direction: RuleDirection,
    pub destination: Destination,
    #[serde(default)]
    pub protocols: Vec<Protocol>,
    #[serde(default)]
    pub ports: Vec<PortRange>,
}

impl Rule {
    /// DNS to the sandbox's gateway: egress, group host, UDP and TCP, port 53.
    pub fn allow_dns() -> Rule {
        Rule {
            action: Action::Allow,
            direction: RuleDirection::Egress,
            destination: Destination::Group(Group::Host),
            protocols: vec![Protocol::Udp, Protocol::Tcp],
            ports: vec![PortRange::single(53).expect("53 is a port")],
        }
    }

    fn allow_group(g: Group) -> Rule {
        Rule {
            action: Action::Allow,
            direction: RuleDirection::Egress,
            destination: Destination::Group(g),
            protocols: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// True when the rule's protocol and port filters admit (`protocol`, `port`).
    fn admits(&self, protocol: Protocol, port: u16) -> bool {
        if !self.protocols.is_empty() && !self.protocols.contains(&protocol) {
            return false;
        }
        if self.ports.is_empty() {
            return true;
        }
        matches!(protocol, Protocol::Tcp | Protocol::Udp) && self.ports.iter().any(|p| p.contains(port))
    }

    /// True when the destination is a name (matched through pins, or by the DNS filter).
    pub fn is_domain_rule(&self) -> bool {
        matches!(self.destination, Destination::Domain(_) | Destination::DomainSuffix(_))
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmpv4 => "icmpv4",
            Protocol::Icmpv6 => "icmpv6",
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Any => f.write_str("any"),
            Destination::Ip(ip) => write!(f, "ip {ip}"),
            Destination::Cidr(net) => write!(f, "cidr {net}"),
            Destination::Domain(d) => write!(f, "domain {d}"),
            Destination::DomainSuffix(d) => write!(f, "domain suffix .{d}"),
            Destination::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// `deny egress group loopback udp,tcp port 53,8000-9000`
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = match self.direction {
            RuleDirection::Egress => "egress",
            RuleDirection::Ingress => "ingress",
            RuleDirection::Any => "any direction",
        };
        write!(f, "{} {dir} {}", self.action, self.destination)?;
        if !self.protocols.is_empty() {
            let p: Vec<String> = self.protocols.iter().map(ToString::to_string).collect();
            write!(f, " {}", p.join(","))?;
        }
        if !self.ports.is_empty() {
            let p: Vec<String> = self
                .ports
                .iter()
                .map(|r| if r.start == r.end { r.start.to_string() } else { format!("{}-{}", r.start, r.end) })
                .collect();
            write!(f, " port {}", p.join(","))?;
        }
        Ok(())
    }
}

/// A sandbox's network policy in typed form. Travels in the supervisor spec as JSON
/// (serde); built from the user's wire Hash by [`NetworkPolicy::from_wire`].
///
/// Immutable once built (fields are private): [`decide`](Self::decide) builds a lookup
/// index on first use and keeps it, which is only sound because the rules never change.
#[derive(Clone, Serialize, Deserialize)]
pub struct NetworkPolicy {
    /// The preset this policy was built from, `None` for a custom policy. Only
    /// `Preset::None` changes behaviour (no NIC); the others are informative.
    #[serde(default)]
    preset: Option<Preset>,
    default_egress: Action,
    default_ingress: Action,
    /// Ordered; first match wins. Deny-list entries come first.
    #[serde(default)]
    rules: Vec<Rule>,
    /// How many of `rules` come from `deny_domains`/`deny_domain_suffixes` (the first
    /// ones): logs number the others from 0, as the user wrote them in `rules:`.
    #[serde(default)]
    deny_listed: usize,
    #[serde(skip)]
    index: OnceLock<Arc<index::Index>>,
}

impl PartialEq for NetworkPolicy {
    fn eq(&self, other: &Self) -> bool {
        (self.preset, self.default_egress, self.default_ingress, &self.rules, self.deny_listed)
            == (other.preset, other.default_egress, other.default_ingress, &other.rules, other.deny_listed)
    }
}

impl Eq for NetworkPolicy {}

impl fmt::Debug for NetworkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkPolicy")
            .field("preset", &self.preset)
            .field("default_egress", &self.default_egress)
            .field("default_ingress", &self.default_ingress)
            .field("rules", &self.rules)
            .finish()
    }
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        NetworkPolicy::public_only()
    }
}

impl NetworkPolicy {
    /// A custom policy (no preset).
    pub fn custom(default_egress: Action, default_ingress: Action, rules: Vec<Rule>) -> NetworkPolicy {
        NetworkPolicy { preset: None, default_egress, default_ingress, rules, deny_listed: 0, index: OnceLock::new() }
    }

    fn with_preset(preset: Preset, default_egress: Action, default_ingress: Action, rules: Vec<Rule>) -> NetworkPolicy {
        NetworkPolicy { preset: Some(preset), ..NetworkPolicy::custom(default_egress, default_ingress, rules) }
    }

    /// The preset this policy was built from (`None` for a custom policy).
    pub fn preset(&self) -> Option<Preset> {
        self.preset
    }

    pub fn default_egress(&self) -> Action {
        self.default_egress
    }

    pub fn default_ingress(&self) -> Action {
        self.default_ingress
    }

    /// The rules in match order (deny-list entries first).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The same policy with `rules` placed before its own (deny lists on a preset).
    pub(crate) fn prepend(self, mut rules: Vec<Rule>) -> NetworkPolicy {
        let deny_listed = self.deny_listed + rules.len();
        rules.extend(self.rules);
        NetworkPolicy { rules, deny_listed, index: OnceLock::new(), ..self }
    }

    /// How a verdict (and so the `system` log) names rule `i`: a deny-list entry by its
    /// list, any other rule by its position in the `rules:` the user wrote — not by `i`,
    /// which counts the deny-list entries placed before them.
    fn rule_label(&self, i: usize) -> String {
        let rule = &self.rules[i];
        if i < self.deny_listed {
            let list = match rule.destination {
                Destination::DomainSuffix(_) => "deny_domain_suffixes",
                _ => "deny_domains",
            };
            format!("{list} ({rule})")
        } else {
            format!("rule {} ({rule})", i - self.deny_listed)
        }
    }

    /// No network at all: the sandbox gets no NIC (see [`NetworkPolicy::is_none`]).
    pub fn none() -> NetworkPolicy {
        NetworkPolicy::with_preset(Preset::None, Action::Deny, Action::Deny, Vec::new())
    }

    /// Everything allowed, both ways.
    pub fn allow_all() -> NetworkPolicy {
        NetworkPolicy::with_preset(Preset::AllowAll, Action::Allow, Action::Allow, Vec::new())
    }

    /// The default: DNS through the gateway and the public internet; loopback, private,
    /// link-local, metadata, multicast and the host denied. Ingress (published ports)
    /// allowed.
    pub fn public_only() -> NetworkPolicy {
        NetworkPolicy::with_preset(
            Preset::PublicOnly,
            Action::Deny,
            Action::Allow,
            vec![Rule::allow_dns(), Rule::allow_group(Group::Public)],
        )
    }

    /// [`public_only`](Self::public_only) plus the private ranges (LAN).
    pub fn non_local() -> NetworkPolicy {
        NetworkPolicy::with_preset(
            Preset::NonLocal,
            Action::Deny,
            Action::Allow,
            vec![Rule::allow_dns(), Rule::allow_group(Group::Public), Rule::allow_group(Group::Private)],
        )
    }

    pub fn from_preset(preset: Preset) -> NetworkPolicy {
        match preset {
            Preset::None => NetworkPolicy::none(),
            Preset::PublicOnly => NetworkPolicy::public_only(),
            Preset::AllowAll => NetworkPolicy::allow_all(),
            Preset::NonLocal => NetworkPolicy::non_local(),
        }
    }

    /// True for the `none` preset: the sandbox must get no NIC at all.
    pub fn is_none(&self) -> bool {
        self.preset == Some(Preset::None)
    }

    /// The verdict on one connection attempt. Pure. Looks up the rules whose destination
    /// can match (an index built on first use: hash lookups per prefix length, group and
    /// pinned name) and tests only those, in rule order — so 1,000 CIDR rules cost about
    /// what 2 do (DESIGN.md has the benchmark).
    pub fn decide(&self, flow: &Flow, host: &HostContext, pins: &PinSet, now: Instant) -> Verdict {
        let index = self.index.get_or_init(|| Arc::new(index::Index::build(&self.rules)));
        let raw = flow.remote;
        let mut candidates = Vec::with_capacity(8);
        index.candidates(
            raw,
            || classify(raw, host),
            || match flow.direction {
                // A peer connecting in has no name this sandbox resolved.
                Direction::Ingress => Vec::new(),
                Direction::Egress => pins.names_for(raw, now).collect(),
            },
            &mut candidates,
        );
        candidates.sort_unstable();
        candidates.dedup();
        for i in candidates {
            let (i, rule) = (i as usize, &self.rules[i as usize]);
            if rule.direction.covers(flow.direction) && rule.admits(flow.protocol, flow.port) {
                return Verdict { action: rule.action, rule: Some(i), reason: self.rule_label(i) };
            }
        }
        let (action, dir) = match flow.direction {
            Direction::Egress => (self.default_egress, "egress"),
            Direction::Ingress => (self.default_ingress, "ingress"),
        };
        Verdict { action, rule: None, reason: format!("default {dir} {action}") }
    }

    /// The verdict on a DNS query for `name` sent over `protocol` to the gateway.
    ///
    /// First match over the egress rules, where:
    /// - a domain/suffix **allow** rule matching the name applies whatever its ports
    ///   (resolving the name is what makes the rule usable);
    /// - a domain/suffix **deny** rule matching the name applies only when it has no
    ///   protocol/port filter (it denies the name outright; a port-limited deny is
    ///   enforced on connections instead);
    /// - `any` and `group host` rules apply when they admit (`protocol`, 53);
    /// - address, CIDR and other group rules never apply to a query.
    ///
    /// No match ⇒ the default egress action.
    pub fn decide_query(&self, name: &DomainName, protocol: Protocol) -> Verdict {
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.direction == RuleDirection::Ingress {
                continue;
            }
            let name_hit = match &rule.destination {
                Destination::Domain(d) => Some(name == d),
                Destination::DomainSuffix(s) => Some(name.is_under(s)),
                _ => None,
            };
            let hit = match name_hit {
                Some(false) => false,
                Some(true) => match rule.action {
                    Action::Allow => true,
                    Action::Deny => rule.protocols.is_empty() && rule.ports.is_empty(),
                },
                None => {
                    matches!(rule.destination, Destination::Any | Destination::Group(Group::Host))
                        && rule.admits(protocol, 53)
                }
            };
            if hit {
                return Verdict { action: rule.action, rule: Some(i), reason: self.rule_label(i) };
            }
        }
        Verdict { action: self.default_egress, rule: None, reason: format!("default egress {}", self.default_egress) }
    }

    /// Whether the policy allows `addr` by its address alone, on every port (domain rules
    /// ignored). DNS rebind protection keeps a non-public answer only then, so a domain
    /// rule can never open the way to an address the policy otherwise refuses.
    ///
    /// Rules are scanned in order and only rules without protocol/port filters decide: a
    /// matching unfiltered allow ⇒ yes, a matching unfiltered deny ⇒ no; filtered rules
    /// are skipped — counting them would let the gateway's DNS rule (`host`, port 53)
    /// make every host address "reachable", after which a domain rule for a name
    /// answering with the host's address would open all of the host's ports. No match
    /// ⇒ the default egress action.
    pub fn may_reach_address(&self, addr: IpAddr, host: &HostContext) -> bool {
        let inner = classify::embedded_ipv4(addr).map(IpAddr::V4);
        let group = classify(addr, host);
        for rule in &self.rules {
            if rule.direction == RuleDirection::Ingress || rule.is_domain_rule() {
                continue;
            }
            let hit = match &rule.destination {
                Destination::Any => true,
                Destination::Ip(ip) => *ip == addr || Some(*ip) == inner,
                Destination::Cidr(net) => net.contains(&addr) || inner.is_some_and(|v4| net.contains(&v4)),
                Destination::Group(g) => *g == group,
                Destination::Domain(_) | Destination::DomainSuffix(_) => false,
            };
            if !hit {
                continue;
            }
            if rule.protocols.is_empty() && rule.ports.is_empty() {
                return rule.action == Action::Allow;
            }
        }
        self.default_egress == Action::Allow
    }

    /// Names denied outright (for NXDOMAIN without asking upstream): true when
    /// [`decide_query`](Self::decide_query) denies `name` by a domain rule.
    pub fn denies_name(&self, name: &DomainName) -> bool {
        let v = self.decide_query(name, Protocol::Udp);
        v.action == Action::Deny && v.rule.is_some_and(|i| self.rules[i].is_domain_rule())
    }
}

#[cfg(test)]
mod tests;
