//! The vocabulary shared by the policy engine and the data path.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Which way a connection goes, seen from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The guest opens it (outbound).
    Egress,
    /// A host-side peer opens it toward the guest (published ports).
    Ingress,
}

/// Transport protocol of a flow, as policy rules name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmpv4,
    Icmpv6,
}

/// One connection attempt (a TCP SYN, the first datagram of a UDP session, an echo
/// request, or an accepted connection on a published port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub direction: Direction,
    pub protocol: Protocol,
    /// The far end: destination for egress, peer for ingress. IPv4-mapped IPv6 addresses
    /// are *not* normalised here; the policy engine does that.
    pub remote: IpAddr,
    /// Destination port for egress, the guest port for ingress; 0 for ICMP.
    pub port: u16,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
}

/// What the policy decided for a [`Flow`], and why (for the `system` log entry that
/// tells a user why a request failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    /// Index of the rule that matched, `None` when the direction's default applied.
    pub rule: Option<usize>,
    /// Human-readable reason, e.g. `rule 2 (deny group loopback)` or `default egress deny`.
    pub reason: String,
}
