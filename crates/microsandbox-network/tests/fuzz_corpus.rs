//! Replays the checked-in fuzz corpus (`fuzz/corpus/<target>/`) through the same entry
//! points the `cargo fuzz` targets use, on stable Rust: CI needs no nightly toolchain,
//! and every input a fuzz run found interesting (or that once crashed) stays a test.
//! Bounded: at most 5,000 files per target, each at most 64 KiB.

use std::fs;
use std::path::Path;

use microsandbox_network::fuzzing;

const MAX_FILES: usize = 5_000;
const MAX_SIZE: u64 = 64 * 1024;

fn replay(target: &str, entry: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    assert!(files.len() <= MAX_FILES, "{}: corpus larger than {MAX_FILES} files; minimise it (cargo fuzz cmin)", dir.display());
    for path in files {
        assert!(fs::metadata(&path).unwrap().len() <= MAX_SIZE, "{}: larger than 64 KiB", path.display());
        let data = fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| entry(&data));
        assert!(result.is_ok(), "{target}: {} broke an invariant", path.display());
    }
}

#[test]
fn dns_query_corpus() {
    replay("dns_query", fuzzing::dns_query);
}

#[test]
fn dns_response_corpus() {
    replay("dns_response", fuzzing::dns_response);
}

#[test]
fn policy_wire_corpus() {
    replay("policy_wire", fuzzing::policy_wire);
}

#[test]
fn policy_decide_corpus() {
    replay("policy_decide", fuzzing::policy_decide);
}

/// A bounded pseudo-random run of the decide oracle on stable (the fuzzer goes further).
#[test]
fn policy_decide_random_programs() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..3_000 {
        let len = 16 + (seed % 600) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        fuzzing::policy_decide(&data);
    }
}

#[test]
fn frame_path_corpus() {
    replay("frame_path", microsandbox_network::hostile::frame_path);
}

/// The hand-written seed programs, and every prefix of them (a program cut anywhere).
#[test]
fn frame_path_seed_programs() {
    for p in microsandbox_network::hostile::seed_programs() {
        for n in (0..=p.len()).step_by(7) {
            microsandbox_network::hostile::frame_path(&p[..n]);
        }
        microsandbox_network::hostile::frame_path(&p);
    }
}
