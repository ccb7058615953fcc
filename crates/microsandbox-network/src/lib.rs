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
//! - [`config`]: what the engine hands the supervisor for a NIC ([`config::NetworkConfig`]:
//!   addresses, MACs, MTU, limits).
//! - [`frame`] (pure): QEMU's `-netdev stream` framing, a bounded incremental decoder.
//! - [`guard`] (pure): the first look at each guest frame — spoofed senders and unknown
//!   protocols are dropped, TCP SYNs are singled out for the host-side connect.
//! - [`device`]: the smoltcp device, two bounded frame queues (the back-pressure point).
//! - [`stack`]: the event loop on its own thread — link, smoltcp, TCP relay to host
//!   sockets, UDP relay, DNS transport; enforces the policy's verdicts (SYN, first
//!   datagram, every DNS query) and logs refusals.
//! - [`dns_transport`] (pure): the message surgery of the DNS transport (TC=1 truncation,
//!   SERVFAIL, answer/query matching).
//! - [`wire`] (pure): frames the stack builds itself (UDP to the guest).
//! - [`secrets`]: the placeholder substitution engine ([`secrets::Substituter`]) over one
//!   decrypted guest→upstream HTTP/1.x stream, the validated secret set and the streaming
//!   placeholder scanner (every encoding a guest can hide one in).
//! - [`tls`]: TLS interception — the per-sandbox CA, leaf certificates by SNI (bounded
//!   cache, the rustls resolver), the guest-facing and upstream rustls configurations.
//! - [`intercept`]: TLS interception on the TCP relay — which connections are
//!   intercepted ([`intercept::Interception`]) and the sans-I/O state of one intercepted
//!   connection ([`intercept::TlsRelay`]: ClientHello, verified upstream handshake, the
//!   secrets engine between the two TLS sessions).
//! - `fuzzing` (hidden): the entry points of the `cargo fuzz` targets in `fuzz/`, also
//!   replayed over the checked-in corpus by `tests/fuzz_corpus.rs` on stable.
//!
//! Invariant: nothing read from the guest is trusted; every parser here is bounded and
//! every decision defaults to deny when its input is malformed.

pub mod config;
pub mod device;
pub mod dns;
pub mod dns_transport;
pub mod flow;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod intercept;
pub mod policy;
pub mod secrets;
pub mod stack;
pub mod tls;
pub mod wire;

pub use config::NetworkConfig;
