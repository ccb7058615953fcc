//! A hostile guest's frames through the whole data path: stream framing, the guard,
//! smoltcp, the TCP/UDP/DNS handling of a real stack (loopback only), with the stack's
//! bounds checked after every step. See `microsandbox_network::hostile::frame_path`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    microsandbox_network::hostile::frame_path(data);
});
