//! Entry point of the `secrets_stream` fuzz target (`fuzz/fuzz_targets/`) and of the
//! corpus replay test (`tests/secrets_fuzz_corpus.rs`, stable Rust, run by `cargo test`).
//!
//! Input: byte 0 = write size (1..=256), byte 1 = flags (bit 0 TLS, bit 1 connection to
//! the allowed host, bit 2 query substitution, bit 3 body substitution), then the guest's
//! byte stream. Panics only when an invariant breaks:
//! - no panic and bounded output (input + one value per placeholder byte at most);
//! - toward a host no secret allows, the value never appears in the output (unless the
//!   guest sent it itself);
//! - the verdict (pass / refusal kind) does not depend on how the stream was split, and
//!   without body substitution neither do the bytes.

use std::sync::Arc;

use super::config::SecretSet;
use super::stream::{ConnIdentity, Refusal, Substituter};

const VALUE: &[u8] = b"fz-VALUE";

fn run(set: &Arc<SecretSet>, id: &ConnIdentity, data: &[u8], step: usize) -> Result<Vec<u8>, Refusal> {
    let mut s = Substituter::new(Arc::clone(set), id.clone())?;
    let mut out = Vec::new();
    for piece in data.chunks(step) {
        s.feed(piece, &mut out)?;
    }
    s.finish(&mut out)?;
    Ok(out)
}

fn kind(r: &Result<Vec<u8>, Refusal>) -> u8 {
    match r {
        Ok(_) => 0,
        Err(Refusal::Violation(_)) => 1,
        Err(Refusal::Malformed(_)) => 2,
        Err(Refusal::Unsupported(_)) => 3,
        Err(Refusal::TooLarge(_)) => 4,
    }
}

/// One fuzz iteration (see the module docs for the input format).
pub fn secrets_stream(input: &[u8]) {
    if input.len() < 2 {
        return;
    }
    let step = input[0] as usize + 1;
    let flags = input[1];
    let data = &input[2..];
    let json = format!(
        r#"{{"secrets":[{{"env":"K","value":"fz-VALUE","hosts":["a.test"],"require_tls":{},
            "inject":{{"query":{},"body":{}}}}},{{"env":"L","value":"fz-other","placeholder":"%P","hosts":["*.b.test"]}}]}}"#,
        flags & 1 != 0,
        flags & 4 != 0,
        flags & 8 != 0
    );
    let set = Arc::new(SecretSet::from_wire(json.as_bytes()).expect("fuzz secret set"));
    let host = if flags & 2 != 0 { "a.test" } else { "evil.test" };
    let id = ConnIdentity {
        tls: flags & 1 != 0,
        sni: (flags & 1 != 0).then(|| host.to_string()),
        pinned_name: Some(host.to_string()),
    };
    let whole = run(&set, &id, data, data.len().max(1));
    let split = run(&set, &id, data, step);
    assert_eq!(kind(&whole), kind(&split), "verdict depends on the split");
    if let (Ok(a), Ok(b)) = (&whole, &split) {
        let bound = data.len() * (1 + VALUE.len()) + 64;
        assert!(a.len() <= bound && b.len() <= bound, "output unbounded");
        if flags & 8 == 0 {
            assert_eq!(a, b, "bytes depend on the split");
        }
        let sent_itself = data.windows(VALUE.len()).any(|w| w == VALUE);
        if flags & 2 == 0 && !sent_itself {
            assert!(!a.windows(VALUE.len()).any(|w| w == VALUE), "value sent to a host it is not allowed for");
        }
    }
}
