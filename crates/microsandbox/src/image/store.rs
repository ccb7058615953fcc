//! The on-disk image store.
//!
//! ```text
//! <home>/images/
//!   blobs/sha256/<hex>     content-addressed manifests, indexes, configs, layers (shared by all images)
//!   refs/<key>.json        one per reference pulled: reference → manifest digest (+ index digest)
//!   roots/<hex>.v2.ext4    prepared read-only root disk of manifest sha256:<hex> (mode 0444);
//!                          `.v2`: shrunk to its content, grown per sandbox in the guest.
//!                          Older `<hex>.ext4` roots (1 GiB free space built in) are no
//!                          longer used for new sandboxes; prune deletes them once no
//!                          overlay is backed by them.
//!   used/<key>             when a sandbox was last created from a reference (see `usage.rs`)
//!   tmp/                   partial downloads and builds (same filesystem, so rename is atomic)
//!   trash/                 finished build directories, deleted by a background thread
//!   locks/                 flock files
//! ```
//!
//! Invariants:
//! - a file under `blobs/` or `roots/` is complete: everything is written under `tmp/` and
//!   renamed into place, and a blob is renamed only after its SHA-256 matched its name;
//! - every digest that becomes a path went through [`parse_digest`] (64 hex digits), so a
//!   registry cannot steer writes with a crafted digest;
//! - concurrent processes coordinate with `flock`: `gc.lock` is held shared by every pull and
//!   exclusive by prune; `blob-<hex>.lock` / `root-<hex>.lock` serialise the download of one
//!   blob / the build of one root, so each is stored once.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::reference::parse_digest;
use crate::error::{Error, IoContext, Result};
use crate::paths::Home;

/// The image store below `<home>/images`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    home: PathBuf,
}

/// What `refs/<key>.json` records about one pulled reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRecord {
    /// Canonical reference (`registry/repo:tag` or `…@sha256:…`).
    pub reference: String,
    /// Digest of the platform image manifest.
    pub manifest_digest: String,
    /// Digest of the index the manifest was chosen from, if any.
    #[serde(default)]
    pub index_digest: Option<String>,
    pub config_digest: String,
    /// `os/arch[/variant]` of the manifest.
    #[serde(default)]
    pub platform: String,
    pub pulled_at: u64,
    /// When the reference first entered the store (ms since the epoch): kept by later
    /// pulls of it. Absent in records written before it existed (then `pulled_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at_ms: Option<u64>,
}

/// A held inter-process lock; released on drop.
pub struct StoreLock(#[allow(dead_code)] Flock<File>);

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// File name under `roots/` of the root disk of manifest `<hex>`. The `v2` marks the
/// format (shrunk base, grown in the guest); bump it when roots must be rebuilt.
pub fn root_file_name(hex: &str) -> String {
    format!("{hex}.v2.ext4")
}

/// `sha256:<hex>` → `<hex>`, validated.
pub fn digest_hex(digest: &str) -> Result<String> {
    let d = parse_digest(digest).map_err(Error::Registry)?;
    Ok(d["sha256:".len()..].to_string())
}

impl Store {
    /// Opens (creating the directories of) the store of `home`.
    pub fn open(home: &Home) -> Result<Store> {
        let root = home.root().join("images");
        for d in ["blobs/sha256", "refs", "used", "roots", "tmp", "trash", "locks"] {
            let p = root.join(d);
            fs::create_dir_all(&p).context(|| format!("creating {}", p.display()))?;
        }
        Ok(Store { root, home: home.root().to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn home_root(&self) -> &Path {
        &self.home
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh, unique path under `tmp/`.
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        self.tmp_dir().join(format!("{what}-{}-{n}-{nanos}", std::process::id()))
    }

    /// Deletes the directory `path` (under `tmp/`) without making the caller wait: it is
    /// renamed into `trash/` and removed by a background thread, which also sweeps what an
    /// earlier process left there (everything in `trash/` is garbage). Unpacked images have
    /// thousands of files; deleting them took as long as building the disk.
    pub fn discard_later(&self, path: &Path) {
        let trash = self.root.join("trash");
        let dest = trash.join(path.file_name().unwrap_or_default());
        if fs::rename(path, &dest).is_err() {
            let _ = fs::remove_dir_all(path);
            return;
        }
        let spawned = std::thread::Builder::new().name("msb-image-trash".into()).spawn(move || {
            for e in fs::read_dir(&trash).into_iter().flatten().flatten() {
                let _ = fs::remove_dir_all(e.path());
            }
        });
        if spawned.is_err() {
            let _ = fs::remove_dir_all(&dest);
        }
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    pub fn remove_blob(&self, digest: &str) {
        if let Ok(p) = self.blob_path(digest) {
            let _ = fs::remove_file(p);
        }
    }

    /// Reads a (small) blob and checks its digest; a corrupt blob is deleted and `None` returned.
    pub fn read_blob_verified(&self, digest: &str) -> Result<Option<Vec<u8>>> {
        let p = self.blob_path(digest)?;
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Io { context: format!("reading {}", p.display()), source: e }),
        };
        if sha256_digest(&bytes) != parse_digest(digest).map_err(Error::Registry)? {
            let _ = fs::remove_file(&p);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Stores `bytes` as blob `digest` after checking the digest.
    pub fn write_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let mut w = self.blob_writer(digest, Some(bytes.len() as u64))?;
        w.write_chunk(bytes)?;
        Ok(w.finish()?)
    }

    /// A writer that streams into `tmp/` and renames to `blobs/` only if the digest matches.
    pub fn blob_writer(&self, digest: &str, expected_size: Option<u64>) -> Result<BlobWriter> {
        let dest = self.blob_path(digest)?;
        let tmp = self.tmp_path("blob");
        let file = File::create(&tmp).context(|| format!("creating {}", tmp.display()))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            dest,
            expected: parse_digest(digest).map_err(Error::Registry)?,
            expected_size,
            hasher: Sha256::new(),
            written: 0,
        })
    }

    pub fn root_path(&self, manifest_digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("roots").join(root_file_name(&digest_hex(manifest_digest)?)))
    }

    /// Takes an inter-process lock (blocking; call from a blocking context or via [`Store::lock_async`]).
    pub fn lock(&self, name: &str, exclusive: bool) -> Result<StoreLock> {
        let p = self.root.join("locks").join(format!("{name}.lock"));
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .context(|| format!("opening lock {}", p.display()))?;
        let arg = if exclusive { FlockArg::LockExclusive } else { FlockArg::LockShared };
        Flock::lock(f, arg).map(StoreLock).map_err(|(_, errno)| Error::Io {
            context: format!("locking {}", p.display()),
            source: io::Error::from(errno),
        })
    }

    /// [`Store::lock`] without blocking the async runtime.
    pub async fn lock_async(&self, name: String, exclusive: bool) -> Result<StoreLock> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.lock(&name, exclusive))
            .await
            .map_err(|e| Error::Runtime(format!("lock task failed: {e}")))?
    }

    /// File-name key of a reference: a hash, so no reference ever becomes a path.
    pub fn ref_key(reference: &str) -> String {
        hex::encode(&Sha256::digest(reference.as_bytes())[..16])
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root.join("refs").join(format!("{}.json", Self::ref_key(reference)))
    }

    /// `used/<key>` of a reference (see [`super::usage`]).
    pub fn used_path(&self, reference: &str) -> PathBuf {
        self.root.join("used").join(Self::ref_key(reference))
    }

    pub fn read_ref(&self, reference: &str) -> Option<RefRecord> {
        let bytes = fs::read(self.ref_path(reference)).ok()?;
        let rec: RefRecord = serde_json::from_slice(&bytes).ok()?;
        (rec.reference == reference).then_some(rec)
    }

    pub fn write_ref(&self, rec: &RefRecord) -> Result<()> {
        let tmp = self.tmp_path("ref");
        fs::write(&tmp, serde_json::to_vec_pretty(rec).unwrap()).context(|| format!("writing {}", tmp.display()))?;
        let dest = self.ref_path(&rec.reference);
        fs::rename(&tmp, &dest).context(|| format!("renaming to {}", dest.display()))
    }

    /// Returns whether a record existed.
    pub fn remove_ref(&self, reference: &str) -> Result<bool> {
        let _ = fs::remove_file(self.used_path(reference));
        match fs::remove_file(self.ref_path(reference)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::Io { context: format!("removing the record of {reference}"), source: e }),
        }
    }

    pub fn list_refs(&self) -> Vec<RefRecord> {
        let mut out: Vec<RefRecord> = fs::read_dir(self.root.join("refs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        out
    }

    /// Root disks currently used as a qcow2 backing file by a sandbox below `<home>/sandboxes`
    /// (directly, or through the disk layer of the template it was restored from), with
    /// the sandbox names using them.
    pub fn roots_in_use(&self) -> std::collections::HashMap<PathBuf, Vec<String>> {
        let mut out: std::collections::HashMap<PathBuf, Vec<String>> = Default::default();
        let Ok(rd) = fs::read_dir(self.home.join("sandboxes")) else { return out };
        for sb in rd.flatten() {
            let Ok(files) = fs::read_dir(sb.path()) else { continue };
            for f in files.flatten() {
                if f.path().extension().is_some_and(|e| e == "qcow2") {
                    if let Some(b) = qcow2_backing_file(&f.path()) {
                        let name = crate::paths::sandbox_name_of(&sb.path())
                            .unwrap_or_else(|| sb.file_name().to_string_lossy().into_owned());
                        // A sandbox restored from a template: its overlay is backed by the
                        // template's disk layer, which is backed by the image root.
                        if let Some(root) = qcow2_backing_file(&b) {
                            out.entry(root).or_default().push(name.clone());
                        }
                        out.entry(b).or_default().push(name);
                    }
                }
            }
        }
        out
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Reads the backing-file name from a qcow2 header (offset 8: u64 BE offset, 16: u32 BE size).
pub fn qcow2_backing_file(path: &Path) -> Option<PathBuf> {
    let mut f = File::open(path).ok()?;
    let mut hdr = [0u8; 20];
    f.read_exact(&mut hdr).ok()?;
    if &hdr[..4] != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(hdr[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(hdr[16..20].try_into().ok()?) as usize;
    if off == 0 || len == 0 || len > 4096 {
        return None;
    }
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(off)).ok()?;
    let mut name = vec![0u8; len];
    f.read_exact(&mut name).ok()?;
    use std::os::unix::ffi::OsStringExt;
    Some(PathBuf::from(std::ffi::OsString::from_vec(name)))
}

/// Why a streamed blob was not stored.
#[derive(Debug)]
pub enum BlobError {
    /// The bytes did not hash to the expected digest (or exceeded / fell short of the size).
    Mismatch { expected: String, actual: String },
    Other(Error),
}

impl From<BlobError> for Error {
    fn from(e: BlobError) -> Error {
        match e {
            BlobError::Mismatch { expected, actual } => {
                Error::Registry(format!("content does not match its digest (expected {expected}, got {actual})"))
            }
            BlobError::Other(e) => e,
        }
    }
}

/// Streams a blob to `tmp/` while hashing it; see [`Store::blob_writer`]. The temp file is
/// deleted unless [`BlobWriter::finish`] succeeds.
pub struct BlobWriter {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    expected: String,
    expected_size: Option<u64>,
    hasher: Sha256,
    written: u64,
}

impl BlobWriter {
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends a chunk. Fails with `Mismatch` as soon as the blob grows past its declared size.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> std::result::Result<(), BlobError> {
        self.written += chunk.len() as u64;
        if let Some(max) = self.expected_size {
            if self.written > max {
                return Err(BlobError::Mismatch {
                    expected: self.expected.clone(),
                    actual: format!("more than the declared {max} bytes"),
                });
            }
        }
        self.hasher.update(chunk);
        let f = self.file.as_mut().expect("write after finish");
        f.write_all(chunk).map_err(|e| BlobError::Other(Error::Io { context: format!("writing {}", self.tmp.display()), source: e }))
    }

    /// Verifies size and digest, then renames into `blobs/`.
    pub fn finish(mut self) -> std::result::Result<(), BlobError> {
        let actual = format!("sha256:{}", hex::encode(std::mem::take(&mut self.hasher).finalize()));
        if let Some(size) = self.expected_size {
            if size != self.written {
                return Err(BlobError::Mismatch {
                    expected: self.expected.clone(),
                    actual: format!("{} bytes instead of the declared {size}", self.written),
                });
            }
        }
        if actual != self.expected {
            return Err(BlobError::Mismatch { expected: self.expected.clone(), actual });
        }
        let f = self.file.take().unwrap();
        f.sync_data().map_err(|e| BlobError::Other(Error::Io { context: format!("syncing {}", self.tmp.display()), source: e }))?;
        drop(f);
        fs::rename(&self.tmp, &self.dest).map_err(|e| {
            BlobError::Other(Error::Io { context: format!("storing {}", self.dest.display()), source: e })
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful rename the temp path no longer exists; this only cleans failures.
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&Home::at(t.path())).unwrap();
        (t, s)
    }

    #[test]
    fn blobs_are_stored_only_when_the_digest_matches() {
        let (_t, s) = store();
        let data = b"hello layer";
        let d = sha256_digest(data);
        s.write_blob(&d, data).unwrap();
        assert_eq!(s.read_blob_verified(&d).unwrap().unwrap(), data);

        let wrong = sha256_digest(b"something else");
        assert!(matches!(s.write_blob(&wrong, data), Err(Error::Registry(_))));
        assert!(!s.has_blob(&wrong));
        // Truncated (short) and overlong streams are mismatches too.
        let mut w = s.blob_writer(&d, Some(data.len() as u64)).unwrap();
        w.write_chunk(&data[..4]).unwrap();
        assert!(matches!(w.finish(), Err(BlobError::Mismatch { .. })));
        let mut w = s.blob_writer(&d, Some(3)).unwrap();
        assert!(matches!(w.write_chunk(data), Err(BlobError::Mismatch { .. })));
        drop(w);
        // Nothing left behind in tmp/.
        assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn corrupt_blobs_on_disk_are_discarded_on_read() {
        let (_t, s) = store();
        let data = b"{\"a\":1}";
        let d = sha256_digest(data);
        s.write_blob(&d, data).unwrap();
        fs::write(s.blob_path(&d).unwrap(), b"{\"a\":2}").unwrap();
        assert!(s.read_blob_verified(&d).unwrap().is_none());
        assert!(!s.has_blob(&d));
    }

    #[test]
    fn crafted_digests_never_become_paths() {
        let (_t, s) = store();
        for d in ["sha256:../../etc/passwd", "sha512:00", "sha256:", "../x"] {
            assert!(s.blob_path(d).is_err(), "{d}");
        }
    }

    #[test]
    fn discarded_build_dirs_leave_tmp_at_once_and_are_deleted() {
        let (_t, s) = store();
        let build = s.tmp_path("build");
        fs::create_dir_all(build.join("rootfs/usr/bin")).unwrap();
        fs::write(build.join("rootfs/usr/bin/x"), b"x").unwrap();
        s.discard_later(&build);
        assert!(!build.exists());
        assert_eq!(fs::read_dir(s.tmp_dir()).unwrap().count(), 0);
        let trash = s.root().join("trash");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while fs::read_dir(&trash).unwrap().count() > 0 {
            assert!(std::time::Instant::now() < deadline, "trash not emptied");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn refs_round_trip() {
        let (_t, s) = store();
        let rec = RefRecord {
            reference: "docker.io/library/alpine:latest".into(),
            manifest_digest: sha256_digest(b"m"),
            index_digest: None,
            config_digest: sha256_digest(b"c"),
            platform: "linux/amd64".into(),
            pulled_at: 1,
            created_at_ms: Some(1_000),
        };
        s.write_ref(&rec).unwrap();
        assert_eq!(s.read_ref(&rec.reference).unwrap(), rec);
        assert_eq!(s.list_refs(), vec![rec.clone()]);
        assert!(s.remove_ref(&rec.reference).unwrap());
        assert!(s.read_ref(&rec.reference).is_none());
    }
}
