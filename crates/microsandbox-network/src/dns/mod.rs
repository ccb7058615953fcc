//! DNS decisions for the sandbox's gateway resolver (pure; the transport — sockets,
//! UDP/TCP framing, timeouts, retries over nameservers, TC=1 truncation — is the data
//! path's).
//!
//! - [`config`]: the `dns:` options ([`DnsConfig`], [`Nameserver`]).
//! - [`filter`]: what to do with a guest's query ([`DnsFilter::on_query`]) and how an
//!   upstream answer is filtered and pinned ([`DnsFilter::on_response`]).
//! - [`pins`]: the per-sandbox pin set (name → addresses this sandbox resolved).

pub mod config;
pub mod filter;
pub mod pins;

pub use config::{DnsConfig, Nameserver};
pub use filter::{DnsFilter, QueryDecision, QueryOutcome, ResponseOutcome};
pub use pins::PinSet;

#[cfg(test)]
mod tests;
