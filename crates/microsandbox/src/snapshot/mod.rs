//! Snapshots: the root disk of a stopped sandbox, saved as a self-contained artifact that
//! new sandboxes boot from (`from_snapshot:`).
//!
//! ```text
//! <dir>/manifest.json   what it is: digest (identity), content digest, source, image, labels…
//! <dir>/disk.raw        the sandbox's root disk, flattened and sparse, mode 0444
//! ```
//!
//! (Format 1 artifacts, from before the one-pass copy, hold `disk.qcow2` instead and
//! hash its file bytes; they are still opened, verified, booted and exported.)
//!
//! `<dir>` is `<home>/snapshots/<name>/`, or any directory given as `path:`.
//!
//! Invariants:
//! - The disk is flattened ([`flatten`]: one pass that copies only allocated data and
//!   hashes it on the way): the artifact does not depend on the image root or a parent
//!   snapshot, so it survives `Image.remove` and can be exported and imported into
//!   another home.
//! - `content_digest` is the BLAKE3 of the disk's canonical content stream (see
//!   [`flatten`]; holes and written zeros hash alike); the snapshot's `digest`
//!   (its identity) is the SHA-256 of the manifest body, which includes the content
//!   digest. Opening checks the manifest digest (cheap); booting from a snapshot and
//!   `verify` hash the whole disk, so a truncated or tampered artifact never boots
//!   (`SnapshotIntegrity`).
//! - An artifact appears whole or not at all: built in a temporary directory beside its
//!   destination and renamed into place.
//! - A sandbox booted from a snapshot has an overlay whose backing file is the snapshot's
//!   disk: `remove` refuses while such a sandbox exists (unless `force`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::paths::Home;

pub const MANIFEST_FILE: &str = "manifest.json";
pub mod flatten;
pub mod index;

/// The disk of a format-2 artifact (sparse raw).
pub const DISK_FILE: &str = "disk.raw";
/// The disk of a format-1 artifact (a flattened qcow2, hashed as a file).
pub const DISK_FILE_V1: &str = "disk.qcow2";
/// Largest manifest read back (bounded: an imported artifact is untrusted).
const MAX_MANIFEST_BYTES: u64 = 256 * 1024;
/// Written by `create`; 1 is still read.
pub const FORMAT_VERSION: u32 = 2;

/// Options of `Snapshot.create`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOptions {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub force: bool,
    #[serde(default)]
    pub record_integrity: bool,
}

/// What a sandbox booted from the snapshot inherits from its source (the resolved image
/// configuration and the create options that shape the guest).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Inherited {
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub shell: Option<String>,
}

/// The manifest body; its SHA-256 (canonical JSON, this field order) is the digest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub format_version: u32,
    pub name: Option<String>,
    pub parent_digest: Option<String>,
    pub image_ref: Option<String>,
    pub image_manifest_digest: Option<String>,
    pub fstype: String,
    pub source_sandbox: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Format 2: bytes of data stored (the disk's non-zero 64 KiB blocks). Format 1:
    /// bytes of `disk.qcow2`.
    pub size_bytes: u64,
    /// The disk's virtual size (what the guest sees).
    pub virtual_size: u64,
    pub format: String,
    pub created_at: i64,
    /// Format 2: `blake3:<hex>` (or `sha256:<hex>` from the first format-2 version) of
    /// the disk's canonical content stream ([`flatten`]); format 1: `sha256:<hex>` of
    /// `disk.qcow2`'s bytes.
    pub content_digest: String,
    /// Whether the caller asked for integrity recording (`verify` reports `verified` then,
    /// `not_recorded` otherwise; the content digest is checked before every boot anyway).
    pub record_integrity: bool,
    pub inherited: Inherited,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub digest: String,
    pub body: Body,
}

/// A snapshot found on disk.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    pub digest: String,
    pub path: PathBuf,
    #[serde(flatten)]
    pub body: Body,
}

/// `verify`'s answer.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub digest: String,
    pub path: PathBuf,
    /// `verified` or `not_recorded`.
    pub status: &'static str,
    pub algorithm: Option<&'static str>,
    pub content_digest: Option<String>,
}

pub fn snapshots_dir(home: &Home) -> PathBuf {
    home.root().join("snapshots")
}

fn body_digest(body: &Body) -> String {
    let json = serde_json::to_vec(body).expect("manifest serializes");
    format!("sha256:{}", hex::encode(Sha256::digest(json)))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// A snapshot name: as a volume name (1-63 of `[A-Za-z0-9_.-]`, alphanumeric first).
pub fn validate_name(name: &str) -> Result<()> {
    if !crate::paths::is_plain_name(name) {
        return Err(Error::InvalidConfig(format!(
            "invalid snapshot name {name:?}: use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

/// True when `s` names an artifact directory rather than a snapshot name or digest.
pub fn is_path(s: &str) -> bool {
    s.starts_with('/') || s.starts_with("./") || s.starts_with("../") || s == "." || s == ".." || s.starts_with('~')
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn qemu_img(args: &[&std::ffi::OsStr], what: &str) -> Result<Vec<u8>> {
    let out = Command::new("qemu-img").args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Runtime("qemu-img is not installed; install Debian's qemu-utils package".into())
        } else {
            Error::Io { context: "running qemu-img".into(), source: e }
        }
    })?;
    if !out.status.success() {
        return Err(Error::Filesystem(format!("qemu-img could not {what}: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(out.stdout)
}

/// Reads and checks the manifest of the artifact in `dir` (not the disk's content).
pub fn open_dir(dir: &Path) -> Result<SnapshotInfo> {
    let path = dir.join(MANIFEST_FILE);
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::SnapshotNotFound(format!("no snapshot at {} (no {MANIFEST_FILE})", dir.display())))
        }
        Err(e) => return Err(Error::Io { context: format!("reading {}", path.display()), source: e }),
    };
    let mut buf = Vec::new();
    f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut buf).context(|| format!("reading {}", path.display()))?;
    if buf.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(Error::SnapshotIntegrity(format!("{} is larger than {MAX_MANIFEST_BYTES} bytes", path.display())));
    }
    let m: Manifest = serde_json::from_slice(&buf)
        .map_err(|e| Error::SnapshotIntegrity(format!("{} is not a snapshot manifest: {e}", path.display())))?;
    if !(1..=FORMAT_VERSION).contains(&m.body.format_version) {
        return Err(Error::SnapshotIntegrity(format!("{}: unknown format version {}", path.display(), m.body.format_version)));
    }
    if body_digest(&m.body) != m.digest {
        return Err(Error::SnapshotIntegrity(format!("{}: the manifest does not match its digest (it was modified)", path.display())));
    }
    let dir = std::fs::canonicalize(dir).context(|| format!("resolving {}", dir.display()))?;
    Ok(SnapshotInfo { digest: m.digest, path: dir, body: m.body })
}

/// The disk file of an artifact (by its manifest's format).
pub fn disk_path(info: &SnapshotInfo) -> PathBuf {
    info.path.join(disk_name(&info.body))
}

fn disk_name(body: &Body) -> &'static str {
    if body.format_version == 1 {
        DISK_FILE_V1
    } else {
        DISK_FILE
    }
}

/// Hashes the disk and compares it with the manifest: the check before every boot.
pub fn check_content(info: &SnapshotInfo) -> Result<()> {
    let disk = disk_path(info);
    let md = std::fs::metadata(&disk).map_err(|e| Error::SnapshotIntegrity(format!("{}: {e}", disk.display())))?;
    let want_len = if info.body.format_version == 1 { info.body.size_bytes } else { info.body.virtual_size };
    if md.len() != want_len {
        return Err(Error::SnapshotIntegrity(format!(
            "{} is {} bytes, the manifest says {want_len} (truncated or replaced)",
            disk.display(),
            md.len(),
        )));
    }
    let got = if info.body.format_version == 1 {
        sha256_file(&disk)?
    } else {
        let alg = flatten::Algorithm::of_digest(&info.body.content_digest).ok_or_else(|| {
            Error::SnapshotIntegrity(format!("{}: unknown content digest algorithm", info.path.display()))
        })?;
        flatten::digest_raw(&disk, alg)?.content_digest
    };
    if got != info.body.content_digest {
        return Err(Error::SnapshotIntegrity(format!(
            "{}: content digest {got} does not match the manifest's {} (the disk was modified)",
            disk.display(),
            info.body.content_digest
        )));
    }
    Ok(())
}

/// `open`: a name (`<home>/snapshots/<name>`) or an artifact path.
pub fn open(home: &Home, name_or_path: &str) -> Result<SnapshotInfo> {
    if is_path(name_or_path) {
        return open_dir(Path::new(name_or_path));
    }
    validate_name(name_or_path)?;
    let dir = snapshots_dir(home).join(name_or_path);
    if !dir.is_dir() {
        return Err(Error::SnapshotNotFound(format!("no snapshot named {name_or_path:?} (Snapshot.list shows those that exist)")));
    }
    open_dir(&dir)
}

/// `get`: a name, a digest (`sha256:…`, in the home's snapshots) or a path.
pub fn get(home: &Home, key: &str) -> Result<SnapshotInfo> {
    if key.starts_with("sha256:") {
        return index::list(home)?
            .into_iter()
            .find(|s| s.digest == key)
            .ok_or_else(|| Error::SnapshotNotFound(format!("no snapshot with digest {key}")));
    }
    open(home, key)
}

/// The artifacts directly inside `dir` (unreadable ones skipped), sorted by path.
pub fn list_dir(dir: &Path) -> Result<Vec<SnapshotInfo>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { context: format!("reading {}", dir.display()), source: e }),
    };
    let mut out: Vec<SnapshotInfo> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter(|e| e.path().join(MANIFEST_FILE).is_file())
        .filter_map(|e| open_dir(&e.path()).ok())
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// The indexed snapshots (see [`index`]): those made or imported by this home, wherever
/// they live, and those a `reindex` found.
pub fn list(home: &Home) -> Result<Vec<SnapshotInfo>> {
    index::list(home)
}

/// Sandboxes of `home` whose overlay is backed by the snapshot's disk.
pub fn users(home: &Home, info: &SnapshotInfo) -> Vec<String> {
    let disk = disk_path(info);
    let Ok(rd) = std::fs::read_dir(home.sandboxes_dir()) else { return Vec::new() };
    rd.flatten()
        .filter(|e| {
            crate::image::store::qcow2_backing_file(&e.path().join(crate::sandbox::OVERLAY_DISK_NAME))
                .is_some_and(|b| b == disk)
        })
        .filter_map(|e| crate::paths::sandbox_name_of(&e.path()))
        .collect()
}

/// Deletes an artifact. Refused while sandboxes are built on it, unless `force` (they
/// then cannot start again).
pub fn remove(home: &Home, name_or_path: &str, force: bool) -> Result<()> {
    let info = open(home, name_or_path).or_else(|e| match e {
        // A damaged artifact can still be removed by name or path.
        Error::SnapshotIntegrity(_) => Ok(SnapshotInfo {
            digest: String::new(),
            path: if is_path(name_or_path) { PathBuf::from(name_or_path) } else { snapshots_dir(home).join(name_or_path) },
            body: Body::empty(),
        }),
        e => Err(e),
    })?;
    let used = users(home, &info);
    if !used.is_empty() && !force {
        return Err(Error::InvalidConfig(format!(
            "snapshot {} is the base of sandbox {}; remove those first or pass force: true (they could not start again)",
            info.path.display(),
            used.join(", ")
        )));
    }
    let canonical = std::fs::canonicalize(&info.path).unwrap_or_else(|_| info.path.clone());
    let parent = info.path.parent().map(Path::to_path_buf).unwrap_or_default();
    let doomed = parent.join(format!(".removing-{}-{}", std::process::id(), now_nanos()));
    std::fs::rename(&info.path, &doomed).context(|| format!("removing {}", info.path.display()))?;
    make_writable(&doomed);
    std::fs::remove_dir_all(&doomed).context(|| format!("removing {}", doomed.display()))?;
    index::forget(home, &canonical)
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for name in [DISK_FILE, DISK_FILE_V1] {
        let _ = std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644));
    }
}

impl Body {
    fn empty() -> Body {
        Body {
            format_version: FORMAT_VERSION,
            name: None,
            parent_digest: None,
            image_ref: None,
            image_manifest_digest: None,
            fstype: String::new(),
            source_sandbox: None,
            labels: BTreeMap::new(),
            size_bytes: 0,
            virtual_size: 0,
            format: String::new(),
            created_at: 0,
            content_digest: String::new(),
            record_integrity: false,
            inherited: Inherited::default(),
        }
    }
}

/// The name of the hash behind `content_digest` ("blake3", or "sha256" for older artifacts).
fn algorithm_of(body: &Body) -> &'static str {
    if body.format_version == 1 {
        return "sha256";
    }
    flatten::Algorithm::of_digest(&body.content_digest).map(flatten::Algorithm::name).unwrap_or("sha256")
}

/// `verify`: hashes the disk; a mismatch raises `SnapshotIntegrity`.
pub fn verify(home: &Home, name_or_path: &str) -> Result<VerifyReport> {
    let info = open(home, name_or_path)?;
    check_content(&info)?;
    Ok(VerifyReport {
        digest: info.digest.clone(),
        path: info.path.clone(),
        status: if info.body.record_integrity { "verified" } else { "not_recorded" },
        algorithm: info.body.record_integrity.then(|| algorithm_of(&info.body)),
        content_digest: info.body.record_integrity.then(|| info.body.content_digest.clone()),
    })
}

/// What `create` needs to know about the source sandbox.
pub struct Source<'a> {
    pub name: &'a str,
    pub disk: &'a Path,
    pub disk_format: &'a str,
    pub image_ref: Option<String>,
    /// The OCI manifest digest of the image the sandbox was created from (`sha256:…`).
    pub image_manifest_digest: Option<String>,
    pub parent_digest: Option<String>,
    pub inherited: Inherited,
}

/// Writes an artifact for `src` at the destination `opts` names.
pub fn create(home: &Home, src: &Source<'_>, opts: &CreateOptions) -> Result<SnapshotInfo> {
    if let Some(n) = &opts.name {
        validate_name(n)?;
    }
    for (k, v) in &opts.labels {
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return Err(Error::InvalidConfig(format!("invalid snapshot label {k:?}")));
        }
    }
    let dest = match (&opts.path, &opts.name) {
        (Some(p), _) => {
            if !p.is_absolute() {
                return Err(Error::InvalidConfig(format!("snapshot path {} must be absolute", p.display())));
            }
            p.clone()
        }
        (None, Some(n)) => snapshots_dir(home).join(n),
        (None, None) => {
            validate_name(src.name).map_err(|_| {
                Error::InvalidConfig(format!("sandbox {:?} is not a valid snapshot name; pass name:", src.name))
            })?;
            snapshots_dir(home).join(src.name)
        }
    };
    let name = opts.name.clone().or_else(|| opts.path.is_none().then(|| src.name.to_string()));
    if dest.exists() && !opts.force {
        return Err(Error::SnapshotAlreadyExists(format!(
            "a snapshot already exists at {}; pick another name or pass force: true to replace it",
            dest.display()
        )));
    }
    let parent = dest.parent().ok_or_else(|| Error::InvalidConfig("snapshot path has no parent".into()))?;
    std::fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".new-snapshot-{}-{}", std::process::id(), now_nanos()));
    std::fs::create_dir(&tmp).context(|| format!("creating {}", tmp.display()))?;
    let built = (|| -> Result<Manifest> {
        let disk = tmp.join(DISK_FILE);
        let flat = flatten::flatten(src.disk, src.disk_format, &disk)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444)).context(|| format!("chmod {}", disk.display()))?;
        let body = Body {
            format_version: FORMAT_VERSION,
            name: name.clone(),
            parent_digest: src.parent_digest.clone(),
            image_ref: src.image_ref.clone(),
            image_manifest_digest: src.image_manifest_digest.clone(),
            fstype: "ext4".into(),
            source_sandbox: Some(src.name.to_string()),
            labels: opts.labels.clone(),
            size_bytes: flat.stored_bytes,
            virtual_size: flat.virtual_size,
            format: "raw".into(),
            created_at: now_secs(),
            content_digest: flat.content_digest,
            record_integrity: opts.record_integrity,
            inherited: src.inherited.clone(),
        };
        let m = Manifest { digest: body_digest(&body), body };
        let json = serde_json::to_vec_pretty(&m).expect("manifest serializes");
        std::fs::write(tmp.join(MANIFEST_FILE), json).context(|| format!("writing {}", tmp.join(MANIFEST_FILE).display()))?;
        Ok(m)
    })();
    if let Err(e) = built {
        make_writable(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dest.exists() {
        // force: the old artifact goes only once the new one is complete.
        remove(home, &dest.to_string_lossy(), true)?;
    }
    if let Err(e) = std::fs::rename(&tmp, &dest) {
        make_writable(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) {
            Error::SnapshotAlreadyExists(format!("a snapshot already exists at {}", dest.display()))
        } else {
            Error::Io { context: format!("renaming into {}", dest.display()), source: e }
        });
    }
    let info = open_dir(&dest)?;
    index::add(home, &info)?;
    Ok(info)
}

/// A new sandbox's overlay on the snapshot's disk (same virtual size).
pub fn overlay_on(info: &SnapshotInfo, overlay: &Path) -> Result<()> {
    let disk = disk_path(info);
    let fmt = if info.body.format_version == 1 { "qcow2" } else { "raw" };
    qemu_img(
        &["create".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), "-F".as_ref(), fmt.as_ref(), "-b".as_ref(), disk.as_os_str(), overlay.as_os_str()],
        &format!("create an overlay on {}", disk.display()),
    )?;
    Ok(())
}

/// `export`: one plain tar file with the manifest and the disk (the disk is checked first).
pub fn export(home: &Home, name_or_path: &str, out: &Path) -> Result<()> {
    let info = open(home, name_or_path)?;
    check_content(&info)?;
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let write = (|| -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        b.mode(tar::HeaderMode::Deterministic);
        for name in [MANIFEST_FILE, disk_name(&info.body)] {
            let mut file = std::fs::File::open(info.path.join(name))?;
            b.append_file(name, &mut file)?;
        }
        b.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    if let Err(e) = write {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io { context: format!("writing {}", out.display()), source: e });
    }
    std::fs::rename(&tmp, out).context(|| format!("renaming into {}", out.display()))
}

/// Copies `r` to `w`, leaving all-zero 64 KiB blocks as holes (the disk stays sparse).
fn copy_sparse(r: &mut impl Read, w: &mut std::fs::File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = r.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            w.seek(SeekFrom::Current(n as i64))?;
        } else {
            w.write_all(&buf[..n])?;
        }
        total += n as u64;
    }
    w.set_len(total)?;
    w.flush()?;
    Ok(total)
}

/// `import`: unpacks an exported tar into `dest` (default `<home>/snapshots/<its name>`),
/// accepting exactly the two files of an artifact, and checks it whole before it appears.
pub fn import(home: &Home, archive: &Path, dest: Option<&Path>) -> Result<SnapshotInfo> {
    let root = snapshots_dir(home);
    let stage_parent = dest.and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| root.clone());
    std::fs::create_dir_all(&stage_parent).context(|| format!("creating {}", stage_parent.display()))?;
    let tmp = stage_parent.join(format!(".import-{}-{}", std::process::id(), now_nanos()));
    std::fs::create_dir(&tmp).context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<SnapshotInfo> {
        let f = std::fs::File::open(archive).context(|| format!("reading {}", archive.display()))?;
        let mut ar = tar::Archive::new(std::io::BufReader::new(f));
        let mut seen = Vec::new();
        for entry in ar.entries().context(|| format!("reading {}", archive.display()))? {
            let mut entry = entry.map_err(|e| Error::SnapshotIntegrity(format!("{}: not a snapshot archive: {e}", archive.display())))?;
            let path = entry.path().map_err(|e| Error::SnapshotIntegrity(format!("{}: bad entry name: {e}", archive.display())))?.into_owned();
            let name = path.to_string_lossy().into_owned();
            // The disk may be a GNU sparse entry (the tar crate writes holes that way); its
            // reader yields the full content either way.
            let kind = entry.header().entry_type();
            let is_disk = name == DISK_FILE || name == DISK_FILE_V1;
            let file_like = kind == tar::EntryType::Regular || (is_disk && kind == tar::EntryType::GNUSparse);
            let second_disk = is_disk && seen.iter().any(|n| n != MANIFEST_FILE);
            if !(name == MANIFEST_FILE || is_disk) || seen.contains(&name) || second_disk || !file_like {
                return Err(Error::SnapshotIntegrity(format!(
                    "{}: unexpected entry {name:?} (a snapshot archive holds {MANIFEST_FILE} and one disk, {DISK_FILE} or {DISK_FILE_V1}, only)",
                    archive.display()
                )));
            }
            if name == MANIFEST_FILE && entry.size() > MAX_MANIFEST_BYTES {
                return Err(Error::SnapshotIntegrity(format!("{}: the manifest is too large", archive.display())));
            }
            let target = tmp.join(&name);
            let mut out = std::fs::File::create(&target).context(|| format!("writing {}", target.display()))?;
            copy_sparse(&mut entry, &mut out).context(|| format!("writing {}", target.display()))?;
            seen.push(name);
        }
        if seen.len() != 2 {
            return Err(Error::SnapshotIntegrity(format!("{}: incomplete snapshot archive", archive.display())));
        }
        let staged = open_dir(&tmp)?;
        check_content(&staged)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(disk_path(&staged), std::fs::Permissions::from_mode(0o444)).context(|| "chmod".to_string())?;
        let dest = match dest {
            Some(d) => d.to_path_buf(),
            None => {
                let n = staged.body.name.clone().ok_or_else(|| {
                    Error::InvalidConfig("the archive's snapshot has no name; pass dest:".into())
                })?;
                validate_name(&n)?;
                root.join(n)
            }
        };
        if dest.exists() {
            return Err(Error::SnapshotAlreadyExists(format!("a snapshot already exists at {}", dest.display())));
        }
        std::fs::rename(&tmp, &dest).map_err(|e| {
            if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) {
                Error::SnapshotAlreadyExists(format!("a snapshot already exists at {}", dest.display()))
            } else {
                Error::Io { context: format!("renaming into {}", dest.display()), source: e }
            }
        })?;
        let info = open_dir(&dest)?;
        index::add(home, &info)?;
        Ok(info)
    })();
    if result.is_err() {
        make_writable(&tmp);
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake source disk: a small qcow2 made by qemu-img.
    fn source(dir: &Path) -> PathBuf {
        let disk = dir.join("src.qcow2");
        let out = Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg("4M").output().unwrap();
        assert!(out.status.success());
        disk
    }

    #[test]
    fn create_open_verify_export_import_remove() {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(&t.path().join("home"));
        let disk = source(t.path());
        let src = Source { name: "sb", disk: &disk, disk_format: "qcow2", image_ref: Some("alpine".into()), image_manifest_digest: None, parent_digest: None, inherited: Inherited::default() };
        let opts = CreateOptions { name: Some("s1".into()), record_integrity: true, ..Default::default() };
        let info = create(&h, &src, &opts).unwrap();
        assert!(info.digest.starts_with("sha256:"));
        assert_eq!(get(&h, "s1").unwrap().digest, info.digest);
        assert_eq!(get(&h, &info.digest).unwrap().path, info.path);
        assert!(matches!(create(&h, &src, &opts), Err(Error::SnapshotAlreadyExists(_))));
        assert_eq!(verify(&h, "s1").unwrap().status, "verified");
        assert_eq!(list(&h).unwrap().len(), 1);
        // export, remove, import: the same digest comes back.
        let tarball = t.path().join("s1.tar");
        export(&h, "s1", &tarball).unwrap();
        remove(&h, "s1", false).unwrap();
        assert!(matches!(get(&h, "s1"), Err(Error::SnapshotNotFound(_))));
        let back = import(&h, &tarball, None).unwrap();
        assert_eq!(back.digest, info.digest);
        assert!(matches!(import(&h, &tarball, None), Err(Error::SnapshotAlreadyExists(_))));
        // A path destination, and listing a directory.
        let other = t.path().join("elsewhere/s2");
        let at = create(&h, &src, &CreateOptions { path: Some(other.clone()), ..Default::default() }).unwrap();
        assert_eq!(verify(&h, other.to_str().unwrap()).unwrap().status, "not_recorded");
        assert_eq!(list_dir(&t.path().join("elsewhere")).unwrap()[0].digest, at.digest);
    }

    #[test]
    fn tampering_is_detected() {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(&t.path().join("home"));
        let disk = source(t.path());
        let src = Source { name: "sb", disk: &disk, disk_format: "qcow2", image_ref: None, image_manifest_digest: None, parent_digest: None, inherited: Inherited::default() };
        let info = create(&h, &src, &CreateOptions { name: Some("s".into()), ..Default::default() }).unwrap();
        let d = info.path.join(DISK_FILE);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o644)).unwrap();
        // One flipped byte.
        let mut bytes = std::fs::read(&d).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&d, &bytes).unwrap();
        assert!(matches!(verify(&h, "s"), Err(Error::SnapshotIntegrity(_))));
        // Truncated.
        std::fs::write(&d, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(verify(&h, "s"), Err(Error::SnapshotIntegrity(ref m)) if m.contains("truncated")));
        // An edited manifest.
        let mp = info.path.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&mp).unwrap().replace("\"sb\"", "\"evil\"");
        std::fs::write(&mp, text).unwrap();
        assert!(matches!(open(&h, "s"), Err(Error::SnapshotIntegrity(_))));
        // A damaged artifact can still be removed.
        remove(&h, "s", false).unwrap();
        assert!(list(&h).unwrap().is_empty());
    }

    #[test]
    fn archives_with_extra_entries_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(&t.path().join("home"));
        let evil = t.path().join("evil.tar");
        let mut b = tar::Builder::new(std::fs::File::create(&evil).unwrap());
        let mut hdr = tar::Header::new_old();
        hdr.set_size(1);
        hdr.set_mode(0o644);
        // Written into the raw header: the tar crate refuses to set such a name.
        let name = b"../../escape";
        hdr.as_old_mut().name[..name.len()].copy_from_slice(name);
        hdr.set_cksum();
        b.append(&hdr, &b"x"[..]).unwrap();
        b.finish().unwrap();
        drop(b);
        assert!(import(&h, &evil, None).is_err());
        assert!(!t.path().join("escape").exists());
        assert!(list(&h).unwrap().is_empty());
    }
}
