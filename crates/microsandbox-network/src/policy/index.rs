//! A lookup index over a policy's rules, so `decide` costs about the same with 1,000
//! rules as with 2: instead of testing every rule, it collects the few rules whose
//! destination can match the flow (hash lookups per prefix length, per group, per pinned
//! name) and tests only those, in rule order.
//!
//! Equivalence with the plain first-match scan is what the `policy_decide` fuzz target
//! checks against an independent oracle.

use std::collections::HashMap;
use std::net::IpAddr;

use super::{classify, Destination, DomainName, Group, Rule};

/// Rule indices by destination shape.
#[derive(Debug, Default)]
pub(crate) struct Index {
    any: Vec<u32>,
    groups: HashMap<Group, Vec<u32>>,
    /// IPv4 networks by prefix length (descending), then masked network → rules.
    v4: Vec<(u8, HashMap<u32, Vec<u32>>)>,
    v6: Vec<(u8, HashMap<u128, Vec<u32>>)>,
    domains: HashMap<DomainName, Vec<u32>>,
    suffixes: HashMap<DomainName, Vec<u32>>,
}

fn mask4(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) }
}

fn mask6(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) }
}

fn push_v4(v4: &mut Vec<(u8, HashMap<u32, Vec<u32>>)>, len: u8, net: u32, i: u32) {
    let slot = match v4.iter().position(|(l, _)| *l == len) {
        Some(p) => p,
        None => {
            v4.push((len, HashMap::new()));
            v4.len() - 1
        }
    };
    v4[slot].1.entry(net & mask4(len)).or_default().push(i);
}

fn push_v6(v6: &mut Vec<(u8, HashMap<u128, Vec<u32>>)>, len: u8, net: u128, i: u32) {
    let slot = match v6.iter().position(|(l, _)| *l == len) {
        Some(p) => p,
        None => {
            v6.push((len, HashMap::new()));
            v6.len() - 1
        }
    };
    v6[slot].1.entry(net & mask6(len)).or_default().push(i);
}

impl Index {
    pub(crate) fn build(rules: &[Rule]) -> Index {
        let mut ix = Index::default();
        for (i, rule) in rules.iter().enumerate() {
            let i = i as u32; // bounded by wire::MAX_RULES
            match &rule.destination {
                Destination::Any => ix.any.push(i),
                Destination::Group(g) => ix.groups.entry(*g).or_default().push(i),
                Destination::Ip(IpAddr::V4(a)) => push_v4(&mut ix.v4, 32, u32::from(*a), i),
                Destination::Ip(IpAddr::V6(a)) => push_v6(&mut ix.v6, 128, u128::from(*a), i),
                Destination::Cidr(ipnet::IpNet::V4(n)) => push_v4(&mut ix.v4, n.prefix_len(), u32::from(n.network()), i),
                Destination::Cidr(ipnet::IpNet::V6(n)) => push_v6(&mut ix.v6, n.prefix_len(), u128::from(n.network()), i),
                Destination::Domain(d) => ix.domains.entry(d.clone()).or_default().push(i),
                Destination::DomainSuffix(d) => ix.suffixes.entry(d.clone()).or_default().push(i),
            }
        }
        ix
    }

    /// Indices of the rules whose destination matches (`addr`, its unwrapped IPv4
    /// form, its group, the names it is pinned for), unsorted, possibly repeated.
    pub(crate) fn candidates<'n>(
        &self,
        addr: IpAddr,
        group: impl FnOnce() -> Group,
        names: impl FnOnce() -> Vec<&'n DomainName>,
        out: &mut Vec<u32>,
    ) {
        out.extend_from_slice(&self.any);
        if !self.groups.is_empty() {
            if let Some(v) = self.groups.get(&group()) {
                out.extend_from_slice(v);
            }
        }
        let mut v4s = [None, None];
        match addr {
            IpAddr::V4(a) => v4s[0] = Some(u32::from(a)),
            IpAddr::V6(a) => {
                let raw = u128::from(a);
                for (len, nets) in &self.v6 {
                    if let Some(v) = nets.get(&(raw & mask6(*len))) {
                        out.extend_from_slice(v);
                    }
                }
                v4s[1] = classify::embedded_ipv4(addr).map(u32::from);
            }
        }
        for a in v4s.into_iter().flatten() {
            for (len, nets) in &self.v4 {
                if let Some(v) = nets.get(&(a & mask4(*len))) {
                    out.extend_from_slice(v);
                }
            }
        }
        if self.domains.is_empty() && self.suffixes.is_empty() {
            return;
        }
        for name in names() {
            if let Some(v) = self.domains.get(name) {
                out.extend_from_slice(v);
            }
            if self.suffixes.is_empty() {
                continue;
            }
            // The name itself and each parent on a label boundary.
            let s = name.as_str();
            let mut at = 0;
            loop {
                if let Some(v) = self.suffixes.get(&s[at..]) {
                    out.extend_from_slice(v);
                }
                match s[at..].find('.') {
                    Some(dot) => at += dot + 1,
                    None => break,
                }
            }
        }
    }
}
