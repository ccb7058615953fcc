//! Guest networking for microsandbox: the main host/guest trust boundary.
//!
//! Every byte the guest puts on its NIC ends up in this crate. The layout keeps the
//! *decisions* (pure code, no sockets: testable and fuzzable) apart from the *data path*
//! (the smoltcp stack the supervisor drives):
//!
//! - [`flow`]: the shared vocabulary — a connection attempt ([`flow::Flow`]) and the
//!   verdict on it ([`flow::Verdict`]). The policy engine produces verdicts; the stack
//!   asks for them and enforces them.
//! - [`policy`]: the network policy — destination classification into groups
//!   ([`policy::classify`]), rules, presets, the wire-format parser
//!   ([`policy::NetworkPolicy::from_wire`]) and the decision
//!   ([`policy::NetworkPolicy::decide`]).
//! - [`dns`]: DNS decisions — the query/answer filter ([`dns::DnsFilter`]: NXDOMAIN for
//!   denied names, refusal of malformed messages, rebind protection), the `dns:` options
//!   ([`dns::DnsConfig`]) and the pin set ([`dns::PinSet`]) that ties domain rules to the
//!   addresses this sandbox resolved.
//!
//! - `fuzzing` (hidden): the entry points of the `cargo fuzz` targets in `fuzz/`, also
//!   replayed over the checked-in corpus by `tests/fuzz_corpus.rs` on stable.
//!
//! Invariant: nothing read from the guest is trusted; every parser here is bounded and
//! every decision defaults to deny when its input is malformed.

pub mod dns;
pub mod flow;
#[doc(hidden)]
pub mod fuzzing;
pub mod policy;
