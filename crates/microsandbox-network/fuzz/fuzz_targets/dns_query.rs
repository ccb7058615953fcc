#![no_main]
//! See `microsandbox_network::fuzzing::dns_query` for the input format and the invariants.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| microsandbox_network::fuzzing::dns_query(data));
