//! Replays the checked-in corpus of the `secrets_stream` fuzz target
//! (`fuzz/corpus/secrets_stream/`) on stable Rust, so CI needs no nightly toolchain and
//! every input a fuzz run kept stays a test. Bounded: ≤ 5,000 files of ≤ 64 KiB.

use std::fs;
use std::path::Path;

#[test]
fn secrets_stream_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/secrets_stream");
    let mut files: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty() && files.len() <= 5_000, "corpus size {}", files.len());
    for path in files {
        let data = fs::read(&path).unwrap();
        assert!(data.len() <= 64 * 1024, "{} over 64 KiB", path.display());
        let r = std::panic::catch_unwind(|| microsandbox_network::secrets::fuzzing::secrets_stream(&data));
        assert!(r.is_ok(), "{} broke an invariant", path.display());
    }
}
