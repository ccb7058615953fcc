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
//!   addresses (`ipv4_pool:`), MACs, MTU, limits, published ports).
//! - [`published`] (pure): `ports:`/`ports_udp:` entries — parsing, validation, the
//!   default loopback bind address.
//! - [`frame`] (pure): QEMU's `-netdev stream` framing, a bounded incremental decoder.
//! - [`frag`] (pure): IPv4 and IPv6 fragment reassembly in front of the guard, bounded (16
//!   datagrams, 64 KiB, 128 pieces, 10 s; any overlap drops the datagram).
//! - [`guard`] (pure): the first look at each guest frame — spoofed senders and unknown
//!   protocols are dropped, TCP SYNs are singled out for the host-side connect.
//! - [`icmp`]: ICMP echo — the gateway answers its own pings, others go through the
//!   host's unprivileged ping sockets (one log line where the host forbids them).
//! - [`device`]: the smoltcp device, two bounded frame queues (the back-pressure point).
//! - [`stack`]: the event loop on its own thread — link, smoltcp, TCP relay to host
//!   sockets, UDP relay, DNS transport; enforces the policy's verdicts (SYN, first
//!   datagram, every DNS query) and logs refusals.
//! - [`dns_tcp`]: DNS over TCP on port 53 — length-prefixed queries through the same
//!   filter as UDP, forwarded to the resolvers over TCP, bounded per connection.
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
//! - `hostile` (hidden): a misbehaving guest without a VM — frame builders, a real
//!   [`stack::Stack`] driven over a socketpair one iteration at a time, the bounds checked
//!   after each; the stack's hostile-guest tests and the `frame_path` fuzz target use it.
//! - `fuzzing` (hidden): the entry points of the `cargo fuzz` targets in `fuzz/`, also
//!   replayed over the checked-in corpus by `tests/fuzz_corpus.rs` on stable.
//!
//! Invariant: nothing read from the guest is trusted; every parser here is bounded and
//! every decision defaults to deny when its input is malformed.

pub mod config;
pub mod device;
pub mod dns;
pub mod dns_tcp;
pub mod dns_transport;
pub mod flow;
pub mod frag;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod intercept;
pub mod icmp;
#[doc(hidden)]
pub mod hostile;
pub mod policy;
pub mod published;
pub mod secrets;
pub mod stack;
pub mod tls;
pub mod wire;

pub use config::NetworkConfig;
