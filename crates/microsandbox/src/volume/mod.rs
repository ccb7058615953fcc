//! Named volumes: host storage that outlives sandboxes.
//!
//! ```text
//! <home>/volumes/<name>/volume.json   what Volume.create was given (+ created_at)
//! <home>/volumes/<name>/lock          flock: shared while a sandbox mounts it
//! <home>/volumes/<name>/data/         a "dir" volume's files (shared with guests via virtio-fs)
//! <home>/volumes/<name>/disk.raw      a "disk" volume, or a "dir" volume with quota_mib:
//!                                     a sparse raw ext4 image (virtio-blk)
//! ```
//!
//! `quota_mib` on a dir volume is enforced by the filesystem itself: such a volume is an
//! ext4 image of exactly that size, attached as a block device, so the guest gets
//! `ENOSPC` ("No space left on device") at the limit, like on any full disk. The price:
//! it is one sandbox's at a time (like a disk volume) and has no host-side `VolumeFs`.
//!
//! Invariants:
//! - A volume directory appears whole or not at all: it is built under a temporary name
//!   and renamed into place; `rename(2)` onto an existing volume fails, which is how a
//!   name clash is detected across processes.
//! - A supervisor holds a shared `flock` on `lock` while its VM may write the volume;
//!   [`remove`] takes it exclusively without waiting, so a mounted volume is never
//!   deleted (the lock dies with the process, so a crash never wedges it).
//! - Names are plain (`paths::is_plain_name`): they are used as a directory name as is.

pub mod fs;
pub mod mount;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::paths::Home;

pub use fs::VolumeFs;

/// Where the gem keeps its `virtiofsd` (set once by the Ruby layer at load).
static VIRTIOFSD_DEFAULT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Records the `virtiofsd` built with the gem (`lib/microsandbox/libexec/virtiofsd`).
pub fn set_default_virtiofsd(path: PathBuf) {
    let _ = VIRTIOFSD_DEFAULT.set(path);
}

/// The `virtiofsd` binary: `$MICROSANDBOX_VIRTIOFSD`, else the gem's own (built from
/// crates.io by `rake compile`).
pub fn virtiofsd_binary() -> Result<PathBuf> {
    let p = std::env::var_os("MICROSANDBOX_VIRTIOFSD")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| VIRTIOFSD_DEFAULT.get().cloned());
    match p {
        Some(p) if p.is_file() => Ok(p),
        Some(p) => Err(Error::Runtime(format!(
            "virtiofsd {} does not exist; build it with `bundle exec rake compile` (it installs the virtiofsd crate) or set MICROSANDBOX_VIRTIOFSD",
            p.display()
        ))),
        None => Err(Error::Runtime(
            "no virtiofsd: build it with `bundle exec rake compile` or set MICROSANDBOX_VIRTIOFSD".into(),
        )),
    }
}

/// Largest size of a disk volume or quota of a dir volume, MiB (1 TiB).
pub const MAX_SIZE_MIB: u64 = 1 << 20;
/// Smallest disk volume, MiB (ext4 with a journal needs a few MiB to be useful).
pub const MIN_DISK_MIB: u64 = 8;
/// Most labels on one volume, and the longest key/value (bytes).
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_BYTES: usize = 1024;
/// Largest `volume.json` read back (it is written by this engine, but read bounded).
const MAX_META_BYTES: u64 = 256 * 1024;

pub const META_FILE: &str = "volume.json";
pub const LOCK_FILE: &str = "lock";
pub const DATA_DIR: &str = "data";
pub const DISK_FILE: &str = "disk.raw";

/// `dir` (a host directory) or `disk` (an ext4 image attached as a block device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    Disk,
}

impl Kind {
    pub fn parse(s: &str) -> Result<Kind> {
        match s {
            "dir" => Ok(Kind::Dir),
            "disk" => Ok(Kind::Disk),
            other => Err(Error::InvalidConfig(format!("unknown volume kind {other:?}; use \"dir\" or \"disk\""))),
        }
    }
}

/// Options of `Volume.create` as Ruby sends them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOptions {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub size_mib: Option<u64>,
    #[serde(default)]
    pub quota_mib: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// What `volume.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Meta {
    pub name: String,
    pub kind: Kind,
    /// Size of a disk volume, MiB.
    #[serde(default)]
    pub size_mib: Option<u64>,
    /// Limit of a dir volume, MiB (see `mount` for how it is enforced).
    #[serde(default)]
    pub quota_mib: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Image format and filesystem of a disk volume.
    #[serde(default)]
    pub disk_format: Option<String>,
    #[serde(default)]
    pub disk_fstype: Option<String>,
}

/// A volume as `Volume.get`/`list` report it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    #[serde(flatten)]
    pub meta: Meta,
    /// The host path of the volume's content: the data directory or the disk image.
    pub path: PathBuf,
    /// Bytes the volume takes on the host (allocated blocks).
    pub used_bytes: u64,
    /// Most the guest can store: a disk's size, a dir volume's quota (None: unlimited).
    pub capacity_bytes: Option<u64>,
}

pub fn volumes_dir(home: &Home) -> PathBuf {
    home.root().join("volumes")
}

/// Directory of volume `name` (checked with [`validate_name`] first).
pub fn volume_dir(home: &Home, name: &str) -> PathBuf {
    volumes_dir(home).join(name)
}

/// A volume name: 1-63 of `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<()> {
    if !crate::paths::is_plain_name(name) {
        return Err(Error::InvalidConfig(format!(
            "invalid volume name {name:?}: use 1-63 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidConfig(format!("a volume takes at most {MAX_LABELS} labels, got {}", labels.len())));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES || k.contains('\0') || v.contains('\0') {
            return Err(Error::InvalidConfig(format!(
                "invalid volume label {k:?}: keys must be 1-{MAX_LABEL_BYTES} bytes, values at most {MAX_LABEL_BYTES}, without NUL"
            )));
        }
    }
    Ok(())
}

impl CreateOptions {
    /// The checked kind, size and quota.
    pub fn validate(&self) -> Result<(Kind, Option<u64>, Option<u64>)> {
        let kind = Kind::parse(self.kind.as_deref().unwrap_or("dir"))?;
        validate_labels(&self.labels)?;
        match kind {
            Kind::Disk => {
                let size = self.size_mib.ok_or_else(|| {
                    Error::InvalidConfig("a disk volume needs size_mib: (its size in MiB)".into())
                })?;
                if !(MIN_DISK_MIB..=MAX_SIZE_MIB).contains(&size) {
                    return Err(Error::InvalidConfig(format!(
                        "size_mib of a disk volume must be between {MIN_DISK_MIB} and {MAX_SIZE_MIB}, got {size}"
                    )));
                }
                if self.quota_mib.is_some() {
                    return Err(Error::InvalidConfig(
                        "quota_mib applies to dir volumes; a disk volume's size_mib is its limit".into(),
                    ));
                }
                Ok((kind, Some(size), None))
            }
            Kind::Dir => {
                if self.size_mib.is_some() {
                    return Err(Error::InvalidConfig(
                        "size_mib applies to disk volumes; limit a dir volume with quota_mib".into(),
                    ));
                }
                if let Some(q) = self.quota_mib {
                    if !(1..=MAX_SIZE_MIB).contains(&q) {
                        return Err(Error::InvalidConfig(format!(
                            "quota_mib must be between 1 and {MAX_SIZE_MIB}, got {q}"
                        )));
                    }
                }
                Ok((kind, None, self.quota_mib))
            }
        }
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Creates volume `name`. A disk volume is formatted (ext4) before it appears.
pub fn create(home: &Home, name: &str, opts: &CreateOptions) -> Result<VolumeInfo> {
    validate_name(name)?;
    let (kind, size_mib, quota_mib) = opts.validate()?;
    let root = volumes_dir(home);
    std::fs::create_dir_all(&root).context(|| format!("creating {}", root.display()))?;
    let dest = root.join(name);
    if dest.exists() {
        return Err(already_exists(name));
    }
    // Built under a name no volume can have ('.' first), then renamed into place.
    let tmp = root.join(format!(".new-{name}-{}-{}", std::process::id(), now_nanos()));
    let built = build(&tmp, name, kind, size_mib, quota_mib, &opts.labels);
    let renamed = built.and_then(|meta| {
        // rename(2) of a directory onto a non-empty directory fails: another creator won.
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => Ok(meta),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => Err(already_exists(name)),
            Err(e) => Err(Error::Io { context: format!("creating volume {}", dest.display()), source: e }),
        }
    });
    if renamed.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    renamed?;
    get(home, name)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn already_exists(name: &str) -> Error {
    Error::VolumeAlreadyExists(format!("a volume named {name:?} already exists; pick another name or remove it first"))
}

fn build(
    dir: &Path,
    name: &str,
    kind: Kind,
    size_mib: Option<u64>,
    quota_mib: Option<u64>,
    labels: &BTreeMap<String, String>,
) -> Result<Meta> {
    std::fs::create_dir(dir).context(|| format!("creating {}", dir.display()))?;
    std::fs::File::create(dir.join(LOCK_FILE)).context(|| format!("creating {}", dir.join(LOCK_FILE).display()))?;
    let mut meta = Meta {
        name: name.into(),
        kind,
        size_mib,
        quota_mib,
        labels: labels.clone(),
        created_at: now_secs(),
        disk_format: None,
        disk_fstype: None,
    };
    match kind {
        Kind::Dir if quota_mib.is_some() => {
            format_ext4(&dir.join(DISK_FILE), quota_mib.unwrap_or(1) << 20)?;
        }
        Kind::Dir => {
            let data = dir.join(DATA_DIR);
            std::fs::create_dir(&data).context(|| format!("creating {}", data.display()))?;
            // World-writable like /tmp would surprise; 0755 like a fresh ext4 root, owned
            // by the host user (virtio-fs shows the guest the host's ownership).
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755))
                .context(|| format!("chmod {}", data.display()))?;
        }
        Kind::Disk => {
            format_ext4(&dir.join(DISK_FILE), size_mib.unwrap_or(MIN_DISK_MIB) << 20)?;
            meta.disk_format = Some("raw".into());
            meta.disk_fstype = Some("ext4".into());
        }
    }
    let json = serde_json::to_vec_pretty(&meta).expect("volume meta serializes");
    std::fs::write(dir.join(META_FILE), json).context(|| format!("writing {}", dir.join(META_FILE).display()))?;
    Ok(meta)
}

/// A sparse raw file of `bytes` with an empty ext4 filesystem whose root is owned by
/// root (the guest's usual user), no reserved blocks.
pub fn format_ext4(path: &Path, bytes: u64) -> Result<()> {
    let f = std::fs::File::create(path).context(|| format!("creating {}", path.display()))?;
    f.set_len(bytes).context(|| format!("sizing {}", path.display()))?;
    drop(f);
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-m", "0", "-E", "root_owner=0:0,lazy_itable_init=1", "-L", "msb-volume"])
        .arg(path)
        .output()
        .map_err(crate::rootfs::mke2fs_spawn_error)?;
    if !out.status.success() {
        return Err(Error::Filesystem(format!(
            "mke2fs failed to format {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Reads `volume.json` of `name` (bounded, strictly parsed).
pub fn read_meta(home: &Home, name: &str) -> Result<Meta> {
    validate_name(name)?;
    let path = volume_dir(home, name).join(META_FILE);
    let mut buf = Vec::new();
    use std::io::Read;
    match std::fs::File::open(&path) {
        Ok(f) => {
            f.take(MAX_META_BYTES).read_to_end(&mut buf).context(|| format!("reading {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::VolumeNotFound(format!(
                "no volume named {name:?}; create it with Volume.create (Volume.list shows those that exist)"
            )))
        }
        Err(e) => return Err(Error::Io { context: format!("reading {}", path.display()), source: e }),
    }
    let meta: Meta = serde_json::from_slice(&buf)
        .map_err(|e| Error::Filesystem(format!("{} is unreadable ({e}); remove the volume and create it again", path.display())))?;
    if meta.name != name {
        return Err(Error::Filesystem(format!("{} names another volume ({:?})", path.display(), meta.name)));
    }
    Ok(meta)
}

/// True when the volume is an ext4 image attached as a block device: a disk volume, or
/// a dir volume with a quota.
pub fn is_block(meta: &Meta) -> bool {
    meta.kind == Kind::Disk || meta.quota_mib.is_some()
}

/// Host path of a volume's content (its data directory or disk image).
pub fn content_path(home: &Home, meta: &Meta) -> PathBuf {
    let dir = volume_dir(home, &meta.name);
    if is_block(meta) {
        dir.join(DISK_FILE)
    } else {
        dir.join(DATA_DIR)
    }
}

/// The image of a block-backed volume.
pub fn block_path(home: &Home, meta: &Meta) -> PathBuf {
    volume_dir(home, &meta.name).join(DISK_FILE)
}

pub fn get(home: &Home, name: &str) -> Result<VolumeInfo> {
    let meta = read_meta(home, name)?;
    let path = content_path(home, &meta);
    let used_bytes = if is_block(&meta) {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&path).map(|m| m.blocks() * 512).unwrap_or(0)
    } else {
        tree_bytes(&path)
    };
    let capacity_bytes = match meta.kind {
        Kind::Dir => meta.quota_mib.map(|q| q << 20),
        Kind::Disk => meta.size_mib.map(|s| s << 20),
    };
    Ok(VolumeInfo { meta, path, used_bytes, capacity_bytes })
}

/// Allocated bytes below `dir` (not following symlinks, not crossing file systems).
pub fn tree_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(dir) else { return 0 };
    let dev = top.dev();
    let mut total = top.blocks() * 512;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// Every volume, sorted by name (directories that are not whole volumes are skipped).
pub fn list(home: &Home) -> Result<Vec<VolumeInfo>> {
    let root = volumes_dir(home);
    let rd = match std::fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::Io { context: format!("reading {}", root.display()), source: e }),
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| crate::paths::is_plain_name(n))
        .collect();
    names.sort();
    Ok(names.iter().filter_map(|n| get(home, n).ok()).collect())
}

/// An open, locked lock file: shared by a mounting sandbox, exclusive by [`remove`].
pub struct VolumeLock(#[allow(dead_code)] std::fs::File);

/// Takes the lock of `name` shared (without waiting: an exclusive holder is removing it).
pub fn lock_shared(home: &Home, name: &str) -> Result<VolumeLock> {
    lock(home, name, libc::LOCK_SH | libc::LOCK_NB).map_err(|e| match e {
        Error::VolumeInUse(_) => Error::VolumeNotFound(format!("volume {name:?} is being removed")),
        e => e,
    })
}

fn lock(home: &Home, name: &str, how: i32) -> Result<VolumeLock> {
    let path = volume_dir(home, name).join(LOCK_FILE);
    let f = match std::fs::OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::VolumeNotFound(format!("no volume named {name:?}")))
        }
        Err(e) => return Err(Error::Io { context: format!("opening {}", path.display()), source: e }),
    };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), how) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::VolumeInUse(format!("volume {name:?} is in use")));
        }
        return Err(Error::Io { context: format!("locking {}", path.display()), source: e });
    }
    Ok(VolumeLock(f))
}

/// Names of running (or starting) sandboxes whose options mount volume `name`.
pub fn users(home: &Home, name: &str) -> Vec<String> {
    let Ok(db) = crate::state::StateDb::open(home) else { return Vec::new() };
    let Ok(recs) = db.list() else { return Vec::new() };
    recs.into_iter()
        .filter(|r| r.status != crate::state::Status::Stopped)
        .filter(|r| {
            // `volumes:` entries as stored with the sandbox's options.
            serde_json::from_str::<serde_json::Value>(&r.config)
                .ok()
                .and_then(|c| c.get("volumes").and_then(|v| v.as_array()).cloned())
                .is_some_and(|mounts| mounts.iter().any(|m| m.get("named").and_then(|n| n.as_str()) == Some(name)))
        })
        .map(|r| r.name)
        .collect()
}

/// The exclusive lock, retried for at most ~100 ms. A lock this process released can
/// still be held for a moment by a child that another thread is spawning: the fork
/// shares the open file description until the child's exec closes it (O_CLOEXEC).
/// A real user (a supervisor) holds it for its whole life, so it stays refused.
fn lock_exclusive_briefly(home: &Home, name: &str) -> Result<VolumeLock> {
    for _ in 0..10 {
        match lock(home, name, libc::LOCK_EX | libc::LOCK_NB) {
            Err(Error::VolumeInUse(_)) => std::thread::sleep(std::time::Duration::from_millis(10)),
            r => return r,
        }
    }
    lock(home, name, libc::LOCK_EX | libc::LOCK_NB)
}

/// Deletes volume `name` and its data. Refused while a sandbox mounts it.
pub fn remove(home: &Home, name: &str) -> Result<()> {
    read_meta(home, name)?;
    let guard = lock_exclusive_briefly(home, name).map_err(|e| match e {
        Error::VolumeInUse(_) => {
            let who = users(home, name);
            let who = if who.is_empty() { "a running sandbox".to_string() } else { format!("sandbox {}", who.join(", ")) };
            Error::VolumeInUse(format!("volume {name:?} is mounted by {who}; stop it before removing the volume"))
        }
        e => e,
    })?;
    let dir = volume_dir(home, name);
    // Out of the name space first (atomic), so a create of the same name can follow at once.
    let doomed = volumes_dir(home).join(format!(".removing-{name}-{}-{}", std::process::id(), now_nanos()));
    std::fs::rename(&dir, &doomed).context(|| format!("removing {}", dir.display()))?;
    drop(guard);
    std::fs::remove_dir_all(&doomed).context(|| format!("removing {}", doomed.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn home() -> (tempfile::TempDir, Home) {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(t.path());
        (t, h)
    }

    fn opts(kind: &str) -> CreateOptions {
        CreateOptions { kind: Some(kind.into()), ..Default::default() }
    }

    #[test]
    fn create_get_list_remove() {
        let (_t, h) = home();
        let labels: BTreeMap<_, _> = [("team".to_string(), "a".to_string())].into();
        let info = create(&h, "cache", &CreateOptions { labels: labels.clone(), quota_mib: Some(5), ..opts("dir") }).unwrap();
        assert_eq!(info.meta.kind, Kind::Dir);
        assert_eq!(info.meta.labels, labels);
        assert_eq!(info.capacity_bytes, Some(5 << 20));
        assert!(info.path.is_file(), "a quota'd dir volume is an ext4 image");
        assert_eq!(std::fs::metadata(&info.path).unwrap().len(), 5 << 20);
        assert!(create(&h, "plain", &opts("dir")).unwrap().path.is_dir());
        remove(&h, "plain").unwrap();
        assert!(matches!(create(&h, "cache", &opts("dir")), Err(Error::VolumeAlreadyExists(_))));
        let names: Vec<_> = list(&h).unwrap().into_iter().map(|v| v.meta.name).collect();
        assert_eq!(names, ["cache"]);
        remove(&h, "cache").unwrap();
        assert!(matches!(get(&h, "cache"), Err(Error::VolumeNotFound(_))));
        assert!(matches!(remove(&h, "cache"), Err(Error::VolumeNotFound(_))));
        assert!(list(&h).unwrap().is_empty());
        // Nothing left behind, not even temporaries.
        assert_eq!(std::fs::read_dir(volumes_dir(&h)).unwrap().count(), 0);
    }

    #[test]
    fn disk_volumes_are_formatted_sparse_images() {
        let (_t, h) = home();
        let info = create(&h, "d", &CreateOptions { size_mib: Some(16), ..opts("disk") }).unwrap();
        assert_eq!(info.meta.disk_fstype.as_deref(), Some("ext4"));
        assert_eq!(std::fs::metadata(&info.path).unwrap().len(), 16 << 20);
        assert!(info.used_bytes < 16 << 20, "sparse: {}", info.used_bytes);
        let sb = std::fs::read(&info.path).unwrap();
        assert_eq!(&sb[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef], "ext4 superblock magic");
    }

    #[test]
    fn bad_options_are_refused_before_anything_is_made() {
        let (_t, h) = home();
        for (name, o) in [
            ("../x", opts("dir")),
            ("", opts("dir")),
            ("ok", opts("tape")),
            ("ok", opts("disk")),
            ("ok", CreateOptions { size_mib: Some(1), ..opts("disk") }),
            ("ok", CreateOptions { size_mib: Some(10), ..opts("dir") }),
            ("ok", CreateOptions { quota_mib: Some(0), ..opts("dir") }),
            ("ok", CreateOptions { size_mib: Some(10), quota_mib: Some(5), ..opts("disk") }),
            ("ok", CreateOptions { labels: [(String::new(), "v".into())].into(), ..opts("dir") }),
        ] {
            assert!(matches!(create(&h, name, &o), Err(Error::InvalidConfig(_))), "{name:?} {o:?}");
        }
        assert!(!volumes_dir(&h).exists() || std::fs::read_dir(volumes_dir(&h)).unwrap().count() == 0);
    }

    #[test]
    fn a_locked_volume_is_not_removed() {
        let (_t, h) = home();
        create(&h, "v", &opts("dir")).unwrap();
        let held = lock_shared(&h, "v").unwrap();
        assert!(matches!(remove(&h, "v"), Err(Error::VolumeInUse(_))));
        assert!(get(&h, "v").is_ok());
        drop(held);
        remove(&h, "v").unwrap();
    }
}
