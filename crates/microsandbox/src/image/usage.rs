//! When a stored image entered the store and when a sandbox was last created from it
//! (Ruby `ImageInfo#created_at` and `#last_used_at`).
//!
//! - *Created*: `created_at_ms` of the reference's record, set by its first pull and
//!   carried over by every later pull of the same reference. Records written before the
//!   field existed report their `pulled_at`.
//! - *Last used*: `images/used/<key>` holds the time in milliseconds as decimal text,
//!   replaced (temp file + rename) each time `Sandbox.create` boots from the reference.
//!   It is a file of its own rather than a field of the record because a create that
//!   rewrote the record could undo the new manifest digest of a concurrent pull.
//!
//! Only host processes of this user write these files; they are still read with a size
//! bound and parsed strictly, like anything on disk.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use super::reference::ImageRef;
use super::store::{RefRecord, Store};
use crate::error::{IoContext, Result};
use crate::paths::Home;

/// Longest `used/<key>` file read: 20 digits of a u64 and a little slack.
const MAX_USED_BYTES: u64 = 32;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// `created_at_ms` for a record being (re)written: the previous record's, else now.
pub(super) fn created_at_ms(previous: Option<&RefRecord>) -> u64 {
    previous.map(created_ms_of).unwrap_or_else(now_ms)
}

/// When a stored reference entered the store (ms since the epoch).
pub(super) fn created_ms_of(rec: &RefRecord) -> u64 {
    rec.created_at_ms.unwrap_or(rec.pulled_at.saturating_mul(1000))
}

/// Records that a sandbox is being created from `reference` now. Does nothing when the
/// reference is not stored (a concurrent `Image.remove` won). Holds the store's shared
/// `gc` lock, so a remove or prune cannot interleave.
pub async fn mark_used(home: &Home, reference: &str) -> Result<()> {
    let canonical = ImageRef::parse(reference)?.to_string();
    let store = Store::open(home)?;
    let _gc = store.lock_async("gc".into(), false).await?;
    if store.read_ref(&canonical).is_none() {
        return Ok(());
    }
    let dest = store.used_path(&canonical);
    let tmp = store.tmp_path("used");
    std::fs::write(&tmp, now_ms().to_string()).context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).context(|| format!("renaming to {}", dest.display()))
}

/// When a sandbox was last created from `reference` (ms since the epoch); None when
/// never (or the mark is unreadable).
pub fn last_used_ms(store: &Store, reference: &str) -> Option<u64> {
    let mut buf = Vec::new();
    std::fs::File::open(store.used_path(reference)).ok()?.take(MAX_USED_BYTES + 1).read_to_end(&mut buf).ok()?;
    parse_ms(&buf)
}

fn parse_ms(buf: &[u8]) -> Option<u64> {
    if buf.is_empty() || buf.len() as u64 > MAX_USED_BYTES || !buf.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(buf).ok()?.parse().ok()
}

/// Deletes the marks of references no longer stored (prune, under the exclusive lock).
pub(super) fn sweep(store: &Store) {
    let live: std::collections::HashSet<String> =
        store.list_refs().iter().map(|r| Store::ref_key(&r.reference)).collect();
    for e in std::fs::read_dir(store.root().join("used")).into_iter().flatten().flatten() {
        if !live.contains(&*e.file_name().to_string_lossy()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::store::sha256_digest;

    fn record(reference: &str) -> RefRecord {
        RefRecord {
            reference: reference.into(),
            manifest_digest: sha256_digest(b"m"),
            index_digest: None,
            config_digest: sha256_digest(b"c"),
            platform: "linux/amd64".into(),
            pulled_at: 7,
            created_at_ms: None,
        }
    }

    #[test]
    fn marks_are_parsed_strictly() {
        assert_eq!(parse_ms(b"1700000000123"), Some(1_700_000_000_123));
        for bad in [&b""[..], b"-1", b"12a", b" 12", b"123456789012345678901234567890123", b"99999999999999999999"] {
            assert_eq!(parse_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn created_survives_repulls_and_old_records_use_pulled_at() {
        let mut rec = record("docker.io/library/alpine:latest");
        assert_eq!(created_ms_of(&rec), 7_000);
        rec.created_at_ms = Some(5);
        assert_eq!(created_at_ms(Some(&rec)), 5);
        let before = now_ms();
        assert!(created_at_ms(None) >= before);
    }

    #[tokio::test]
    async fn mark_used_only_for_stored_references_and_prune_sweeps_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let store = Store::open(&home).unwrap();
        let alpine = "docker.io/library/alpine:latest";
        // Not stored: no mark.
        mark_used(&home, "alpine").await.unwrap();
        assert_eq!(last_used_ms(&store, alpine), None);

        store.write_ref(&record(alpine)).unwrap();
        let before = now_ms();
        mark_used(&home, "alpine").await.unwrap();
        let used = last_used_ms(&store, alpine).expect("marked");
        assert!(used >= before && used <= now_ms());

        // A mark whose reference is gone is swept; a live one stays.
        std::fs::write(store.used_path("docker.io/library/gone:1"), b"5").unwrap();
        sweep(&store);
        assert_eq!(last_used_ms(&store, "docker.io/library/gone:1"), None);
        assert_eq!(last_used_ms(&store, alpine), Some(used));
        // Removing the reference removes its mark.
        store.remove_ref(alpine).unwrap();
        assert_eq!(last_used_ms(&store, alpine), None);
    }
}
