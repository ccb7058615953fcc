#![no_main]
//! See `microsandbox_network::secrets::fuzzing::secrets_stream` for the input format and
//! the invariants.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| microsandbox_network::secrets::fuzzing::secrets_stream(data));
