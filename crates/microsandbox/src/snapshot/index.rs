//! The home's snapshot index: which artifacts `Snapshot.list` and `Snapshot.get(digest)`
//! know, wherever they live (`<home>/snapshots/<name>` or any `path:` given to `create` or
//! `import`).
//!
//! ```text
//! <home>/snapshots/.index.json   [{"digest": "sha256:…", "name": "…"|null, "path": "/abs/dir"}, …]
//! <home>/snapshots/.index.lock   flock: one writer at a time, across processes
//! ```
//!
//! Invariants:
//! - The artifacts are the truth; the index only says where to look. Every read opens the
//!   artifact again (its manifest checked), so a stale entry never yields wrong data: a
//!   vanished or damaged artifact is skipped by `list` and dropped by [`reindex`].
//! - `create` and `import` add their artifact, `remove` drops it. Artifacts copied in by
//!   hand are unknown until [`reindex`] scans their directory.
//! - A home without an index (made before it existed) gets one built from
//!   `<home>/snapshots/` on first use, so nothing it had disappears from `list`.
//! - Written whole (temporary file + rename) under the lock; read bounded.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{list_dir, open_dir, snapshots_dir, SnapshotInfo};
use crate::error::{Error, IoContext, Result};
use crate::paths::Home;

const INDEX_FILE: &str = ".index.json";
const LOCK_FILE: &str = ".index.lock";
/// Largest index read back (about 20 000 entries).
const MAX_INDEX_BYTES: u64 = 8 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub digest: String,
    pub name: Option<String>,
    pub path: PathBuf,
}

impl Entry {
    fn of(info: &SnapshotInfo) -> Entry {
        Entry { digest: info.digest.clone(), name: info.body.name.clone(), path: info.path.clone() }
    }
}

/// Holds the index lock (released on drop).
struct Locked {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

fn lock(home: &Home) -> Result<Locked> {
    let dir = snapshots_dir(home);
    std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    Ok(Locked { _lock: crate::lockfile::lock_exclusive(&path)? })
}

/// The entries, or None when the home has no index yet.
fn read(home: &Home) -> Result<Option<Vec<Entry>>> {
    let path = snapshots_dir(home).join(INDEX_FILE);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Io { context: format!("reading {}", path.display()), source: e }),
    };
    let mut buf = Vec::new();
    f.take(MAX_INDEX_BYTES + 1).read_to_end(&mut buf).context(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > MAX_INDEX_BYTES {
        return Err(Error::Filesystem(format!(
            "{} is larger than {MAX_INDEX_BYTES} bytes; delete it and call Snapshot.reindex",
            path.display()
        )));
    }
    // An unreadable index is rebuilt rather than failing every call: it holds nothing
    // that the artifacts do not.
    Ok(serde_json::from_slice(&buf).ok())
}

fn write(home: &Home, entries: &[Entry]) -> Result<()> {
    let dir = snapshots_dir(home);
    let tmp = dir.join(format!(".index.json.tmp-{}", std::process::id()));
    let json = serde_json::to_vec_pretty(entries).expect("index serializes");
    std::fs::write(&tmp, json).context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(INDEX_FILE)).context(|| format!("writing {}", dir.join(INDEX_FILE).display()))
}

/// The home's artifacts as the index should first hold them.
fn scan(dir: &Path) -> Result<Vec<Entry>> {
    Ok(list_dir(dir)?.iter().map(Entry::of).collect())
}

/// Runs `f` on the entries under the lock and writes the result.
fn update<T>(home: &Home, f: impl FnOnce(&mut Vec<Entry>) -> T) -> Result<T> {
    let _l = lock(home)?;
    let mut entries = match read(home)? {
        Some(e) => e,
        None => scan(&snapshots_dir(home))?,
    };
    let out = f(&mut entries);
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries.dedup_by(|a, b| a.path == b.path);
    write(home, &entries)?;
    Ok(out)
}

/// The indexed entries (building the index on first use).
pub fn entries(home: &Home) -> Result<Vec<Entry>> {
    if let Some(e) = read(home)? {
        return Ok(e);
    }
    update(home, |e| e.clone())
}

/// Records a new artifact (replacing any entry at its path).
pub fn add(home: &Home, info: &SnapshotInfo) -> Result<()> {
    update(home, |e| {
        e.retain(|x| x.path != info.path);
        e.push(Entry::of(info));
    })
}

/// Forgets the artifact at `path`.
pub fn forget(home: &Home, path: &Path) -> Result<()> {
    update(home, |e| e.retain(|x| x.path != path))
}

/// The indexed artifacts that still open, sorted by path.
pub fn list(home: &Home) -> Result<Vec<SnapshotInfo>> {
    Ok(entries(home)?.iter().filter_map(|e| open_dir(&e.path).ok()).collect())
}

/// Rebuilds the index from `dir` (default `<home>/snapshots`): every artifact found there
/// is added (out-of-band copies and imports included), every entry whose artifact no
/// longer opens — in `dir` or elsewhere — is dropped. Returns how many snapshots the index
/// holds afterwards (what `list` then returns).
pub fn reindex(home: &Home, dir: Option<&Path>) -> Result<usize> {
    let dir = match dir {
        Some(d) => std::fs::canonicalize(d).context(|| format!("resolving {}", d.display()))?,
        None => {
            let d = snapshots_dir(home);
            std::fs::create_dir_all(&d).context(|| format!("creating {}", d.display()))?;
            std::fs::canonicalize(&d).context(|| format!("resolving {}", d.display()))?
        }
    };
    if !dir.is_dir() {
        return Err(Error::InvalidConfig(format!("{} is not a directory", dir.display())));
    }
    let found = scan(&dir)?;
    let _l = lock(home)?;
    let mut entries = read(home)?.unwrap_or_default();
    entries.retain(|e| !e.path.starts_with(&dir) && open_dir(&e.path).is_ok());
    // Entries elsewhere are refreshed from their manifests (a replaced artifact keeps its
    // path but not its digest).
    for e in entries.iter_mut() {
        if let Ok(i) = open_dir(&e.path) {
            *e = Entry::of(&i);
        }
    }
    entries.extend(found);
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    entries.dedup_by(|a, b| a.path == b.path);
    write(home, &entries)?;
    Ok(entries.len())
}
