//! The DNS filter: what the gateway resolver does with a guest's query, and how an
//! upstream answer is filtered before the guest sees it.
//!
//! Queries ([`DnsFilter::on_query`]):
//! - shorter than a header, or a response (QR=1): dropped (nothing sensible to answer);
//! - not a standard QUERY: NOTIMP; QDCOUNT ≠ 1, answer/authority records, more than one
//!   additional record, counts the length cannot hold, or anything the parser refuses
//!   (compression loops, lying lengths, labels > 63, names > 255 octets): FORMERR;
//! - class other than IN, zone transfers (AXFR/IXFR), names that are not plain host names
//!   (NUL, dots or spaces inside a label, non-ASCII bytes): REFUSED;
//! - a name the policy denies ([`NetworkPolicy::decide_query`]): NXDOMAIN, answered
//!   locally; everything else is forwarded.
//!
//! Answers ([`DnsFilter::on_response`]):
//! - the answer must be a response to exactly this query (ID, question), else SERVFAIL;
//! - a name on the CNAME chain that the policy denies: NXDOMAIN;
//! - rebind protection: A/AAAA records (every section) and SVCB/HTTPS records whose
//!   `ipv4hint`/`ipv6hint` hold an address the policy would not let the sandbox reach by
//!   address ([`NetworkPolicy::may_reach_address`] — private, loopback, link-local,
//!   metadata, host… under `public_only`) are removed; when that leaves the question
//!   without any address answer, the guest gets NXDOMAIN;
//! - the addresses of the kept answers for the query name and its CNAME chain are pinned
//!   ([`PinSet`]) with their TTL, so domain rules can match connections to them. Records
//!   for other names in the answer are passed on but never pinned.
//!
//! Everything here is bounded by the packet: the parser is `simple-dns` (bounds-checked,
//! rejects compression loops), and section counts are checked against the length before
//! it allocates for them.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use simple_dns::rdata::{RData, SVCParam};
use simple_dns::{Name, Packet, PacketFlag, Question, QCLASS, QTYPE, RCODE};

use super::{DnsConfig, PinSet};
use crate::flow::{Action, Protocol};
use crate::policy::{classify, DomainName, HostContext, NetworkPolicy};

/// Largest DNS message handled (the TCP length prefix limit).
pub const MAX_MESSAGE: usize = 65_535;
const HEADER_LEN: usize = 12;
/// Smallest wire size of a question (root name + type + class) and of a record.
const MIN_QUESTION: usize = 5;
const MIN_RECORD: usize = 11;

/// What to do with a guest's query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryDecision {
    /// Send it to the upstream resolver(s) unchanged.
    Forward,
    /// Answer the guest with this message (NXDOMAIN, FORMERR, REFUSED, NOTIMP).
    Reply(Vec<u8>),
    /// Answer nothing (not a query at all).
    Drop,
}

/// A query decision and, when it refused something, the `system` log line saying what
/// and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryOutcome {
    pub decision: QueryDecision,
    pub log: Option<String>,
}

/// A filtered answer and one log line per thing it refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseOutcome {
    pub packet: Vec<u8>,
    pub log: Vec<String>,
}

/// Per-sandbox DNS decisions (pure; the data path owns sockets and timeouts).
#[derive(Debug, Clone)]
pub struct DnsFilter {
    policy: NetworkPolicy,
    rebind_protection: bool,
    host: HostContext,
}

struct Header {
    id: u16,
    flags: u16,
    qd: u16,
    an: u16,
    ns: u16,
    ar: u16,
}

fn header(packet: &[u8]) -> Option<Header> {
    if packet.len() < HEADER_LEN || packet.len() > MAX_MESSAGE {
        return None;
    }
    let w = |i: usize| u16::from_be_bytes([packet[i], packet[i + 1]]);
    Some(Header { id: w(0), flags: w(2), qd: w(4), an: w(6), ns: w(8), ar: w(10) })
}

/// True when the section counts could fit in the packet (so the parser never allocates
/// for records that are not there).
fn counts_fit(h: &Header, len: usize) -> bool {
    let need = HEADER_LEN + usize::from(h.qd) * MIN_QUESTION
        + (usize::from(h.an) + usize::from(h.ns) + usize::from(h.ar)) * MIN_RECORD;
    need <= len
}

/// A bare error reply (no question section): for messages whose question cannot be read.
fn bare_reply(h: &Header, rcode: u16) -> Vec<u8> {
    let opcode = h.flags & 0x7800;
    let rd = h.flags & 0x0100;
    let flags = 0x8000 | opcode | rd | 0x0080 | rcode;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&h.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// A reply to `query` with `rcode`, its question echoed, no records.
fn reply_to(query: &Packet<'_>, rcode: RCODE) -> Vec<u8> {
    let mut reply = Packet::new_reply(query.id());
    reply.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if query.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    *reply.rcode_mut() = rcode;
    reply.questions = query.questions.clone();
    reply.build_bytes_vec().unwrap_or_else(|_| {
        // Cannot happen for a question we parsed; fall back to a bare header.
        let h = Header { id: query.id(), flags: 0x0100, qd: 0, an: 0, ns: 0, ar: 0 };
        bare_reply(&h, rcode as u16)
    })
}

/// The question's name as a policy name, if it is a plain host name.
fn host_name(name: &Name<'_>) -> Option<DomainName> {
    let mut s = String::new();
    for label in name.as_bytes() {
        if !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_') {
            return None;
        }
        if !s.is_empty() {
            s.push('.');
        }
        s.push_str(std::str::from_utf8(label).ok()?);
    }
    DomainName::new(&s).ok()
}

fn qtype_code(q: &Question<'_>) -> u16 {
    q.qtype.into()
}

fn qclass_code(q: &Question<'_>) -> u16 {
    q.qclass.into()
}

fn same_question(a: &Question<'_>, b: &Question<'_>) -> bool {
    qtype_code(a) == qtype_code(b)
        && qclass_code(a) == qclass_code(b)
        && a.qname.as_bytes().count() == b.qname.as_bytes().count()
        && a.qname.as_bytes().zip(b.qname.as_bytes()).all(|(x, y)| x.eq_ignore_ascii_case(y))
}

/// The addresses a record points the guest at (A, AAAA, SVCB/HTTPS hints).
fn record_addrs(rdata: &RData<'_>) -> Vec<IpAddr> {
    match rdata {
        RData::A(a) => vec![IpAddr::V4(Ipv4Addr::from(a.address))],
        RData::AAAA(a) => vec![IpAddr::V6(Ipv6Addr::from(a.address))],
        RData::SVCB(s) | RData::HTTPS(simple_dns::rdata::HTTPS(s)) => s
            .iter_params()
            .flat_map(|p| match p {
                SVCParam::Ipv4Hint(ips) => ips.iter().map(|ip| IpAddr::V4(Ipv4Addr::from(*ip))).collect::<Vec<_>>(),
                SVCParam::Ipv6Hint(ips) => ips.iter().map(|ip| IpAddr::V6(Ipv6Addr::from(*ip))).collect(),
                _ => Vec::new(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

impl DnsFilter {
    /// A filter for one sandbox.
    pub fn new(policy: &NetworkPolicy, config: &DnsConfig) -> DnsFilter {
        DnsFilter { policy: policy.clone(), rebind_protection: config.rebind_protection, host: HostContext::default() }
    }

    /// Adds the host addresses, so an answer pointing at the gateway or at the host's own
    /// addresses counts as `host` (refused under `public_only`), not as private/public.
    pub fn with_host_context(mut self, host: HostContext) -> DnsFilter {
        self.host = host;
        self
    }

    /// [`inspect_query`](Self::inspect_query) over UDP, decision only.
    pub fn on_query(&self, packet: &[u8]) -> QueryDecision {
        self.inspect_query(packet, Protocol::Udp).decision
    }

    /// The decision on a guest's query received over `protocol` (UDP or TCP: a rule may
    /// allow DNS over only one of them).
    pub fn inspect_query(&self, packet: &[u8], protocol: Protocol) -> QueryOutcome {
        let drop = |why: &str| QueryOutcome { decision: QueryDecision::Drop, log: Some(format!("dns: dropped a {why}")) };
        let Some(h) = header(packet) else { return drop("message shorter than a DNS header or longer than 65535 bytes") };
        if h.flags & 0x8000 != 0 {
            return drop("response sent as a query");
        }
        let refuse = |rcode: u16, why: &str| QueryOutcome {
            decision: QueryDecision::Reply(bare_reply(&h, rcode)),
            log: Some(format!("dns: refused a query: {why}")),
        };
        if h.flags & 0x7800 != 0 {
            return refuse(RCODE::NotImplemented as u16, "not a standard query (opcode)");
        }
        if h.qd != 1 || h.an != 0 || h.ns != 0 || h.ar > 1 || !counts_fit(&h, packet.len()) {
            return refuse(RCODE::FormatError as u16, "a query must hold exactly one question");
        }
        let Ok(query) = Packet::parse(packet) else { return refuse(RCODE::FormatError as u16, "malformed message") };
        let Some(q) = query.questions.first() else { return refuse(RCODE::FormatError as u16, "no question") };
        let reply = |rcode: RCODE, log: String| QueryOutcome { decision: QueryDecision::Reply(reply_to(&query, rcode)), log: Some(log) };
        if q.qclass != QCLASS::CLASS(simple_dns::CLASS::IN) {
            return reply(RCODE::Refused, "dns: refused a query of a class other than IN".into());
        }
        if matches!(q.qtype, QTYPE::AXFR | QTYPE::IXFR) {
            return reply(RCODE::Refused, "dns: refused a zone transfer".into());
        }
        let Some(name) = host_name(&q.qname) else {
            return reply(RCODE::Refused, "dns: refused a query for a name that is not a plain host name".into());
        };
        let verdict = self.policy.decide_query(&name, protocol);
        match verdict.action {
            Action::Allow => QueryOutcome { decision: QueryDecision::Forward, log: None },
            Action::Deny => reply(RCODE::NameError, format!("dns: answered NXDOMAIN for {name}: {}", verdict.reason)),
        }
    }

    /// [`filter_response`](Self::filter_response), packet only.
    pub fn on_response(&self, query: &[u8], response: &[u8], pins: &mut PinSet, now: Instant) -> Vec<u8> {
        self.filter_response(query, response, pins, now).packet
    }

    /// Filters an upstream `response` to the guest's `query` (which this filter said to
    /// forward) and records pins for what is passed on. The packet is what to send the
    /// guest: the filtered answer, or SERVFAIL/NXDOMAIN built for the query (the TC flag
    /// and EDNS OPT of an answer are kept). It is empty only when `query` is not even a
    /// DNS header (then there is nobody to answer).
    pub fn filter_response(&self, query: &[u8], response: &[u8], pins: &mut PinSet, now: Instant) -> ResponseOutcome {
        let Some(qh) = header(query) else {
            // The data path only forwards queries we accepted; nothing to answer to.
            return ResponseOutcome { packet: Vec::new(), log: vec!["dns: no query to answer".into()] };
        };
        let servfail = |why: &str| ResponseOutcome {
            packet: Packet::parse(query).map(|q| reply_to(&q, RCODE::ServerFailure)).unwrap_or_else(|_| bare_reply(&qh, 2)),
            log: vec![format!("dns: answered SERVFAIL: {why}")],
        };
        let Ok(q) = Packet::parse(query) else { return servfail("the query is malformed") };
        let Some(question) = q.questions.first() else { return servfail("the query has no question") };
        let Some(rh) = header(response) else { return servfail("the upstream answer is shorter than a DNS header") };
        if rh.flags & 0x8000 == 0 || rh.id != qh.id || rh.qd != 1 || !counts_fit(&rh, response.len()) {
            return servfail("the upstream answer does not answer this query");
        }
        let Ok(mut resp) = Packet::parse(response) else { return servfail("the upstream answer is malformed") };
        if !resp.questions.first().is_some_and(|rq| same_question(rq, question)) {
            return servfail("the upstream answer is for another question");
        }
        let Some(qname) = host_name(&question.qname) else { return servfail("the query name is not a plain host name") };
        let mut log = Vec::new();

        // The CNAME chain from the query name (bounded by the record count).
        let mut chain: Vec<DomainName> = vec![qname.clone()];
        let mut in_chain: HashSet<DomainName> = chain.iter().cloned().collect();
        loop {
            let before = chain.len();
            for rr in &resp.answers {
                if let RData::CNAME(target) = &rr.rdata {
                    let (Some(owner), Some(target)) = (host_name(&rr.name), host_name(&target.0)) else { continue };
                    if in_chain.contains(&owner) && in_chain.insert(target.clone()) {
                        chain.push(target);
                    }
                }
            }
            if chain.len() == before {
                break;
            }
        }
        if let Some(denied) = chain.iter().skip(1).find(|n| self.policy.denies_name(n)) {
            log.push(format!("dns: answered NXDOMAIN for {qname}: its alias {denied} is denied"));
            return ResponseOutcome { packet: reply_to(&q, RCODE::NameError), log };
        }

        // Rebind protection over every section.
        let mut removed_answer = false;
        if self.rebind_protection {
            let policy = &self.policy;
            let host = &self.host;
            let keep = |rr: &simple_dns::ResourceRecord<'_>, log: &mut Vec<String>| -> bool {
                for addr in record_addrs(&rr.rdata) {
                    let group = classify::classify(addr, host);
                    if group != crate::policy::Group::Public && !policy.may_reach_address(addr, host) {
                        let owner = host_name(&rr.name).map_or_else(|| "an unprintable name".to_string(), |n| n.to_string());
                        log.push(format!("dns: removed the answer {owner} -> {addr} (group {group}): rebind protection"));
                        return false;
                    }
                }
                true
            };
            let before = resp.answers.len();
            resp.answers.retain(|rr| keep(rr, &mut log));
            removed_answer = resp.answers.len() != before;
            resp.name_servers.retain(|rr| keep(rr, &mut log));
            resp.additional_records.retain(|rr| keep(rr, &mut log));
        }
        let has_address_answer = resp.answers.iter().any(|rr| !record_addrs(&rr.rdata).is_empty());
        if removed_answer && !has_address_answer {
            log.push(format!("dns: answered NXDOMAIN for {qname}: every address in the answer was removed"));
            return ResponseOutcome { packet: reply_to(&q, RCODE::NameError), log };
        }

        // Pins: kept address answers owned by a name on the chain, for that name and for
        // the query name.
        for rr in &resp.answers {
            let Some(owner) = host_name(&rr.name) else { continue };
            if !in_chain.contains(&owner) {
                continue;
            }
            let ttl = Duration::from_secs(u64::from(rr.ttl));
            for addr in record_addrs(&rr.rdata) {
                pins.insert(qname.clone(), addr, ttl, now);
                if owner != qname {
                    pins.insert(owner.clone(), addr, ttl, now);
                }
            }
        }
        match resp.build_bytes_vec_compressed() {
            Ok(packet) if packet.len() <= MAX_MESSAGE => ResponseOutcome { packet, log },
            _ => {
                let mut out = servfail("the filtered answer could not be encoded");
                log.append(&mut out.log);
                out.log = log;
                out
            }
        }
    }
}
