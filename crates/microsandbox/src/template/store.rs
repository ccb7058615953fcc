//! Templates on disk: lookup, one build per key (flock), users, pruning.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::{Key, DISK_FILE, META_FILE, RAM_FILE, STATE_FILE};
use crate::error::{Error, IoContext, Result};
use crate::paths::Home;

/// After a failed build, creates of that key boot cold for this long before one tries
/// to build it again (a build costs a boot; a key that cannot be saved — e.g. a device
/// QEMU refuses to migrate — must not cost every create a failed build).
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(600);
/// Largest `template.json` read back.
const MAX_META: u64 = 64 * 1024;

/// What `template.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    /// [`super::runtime_fingerprint`] of the runtime that built it.
    pub runtime: String,
    pub image_root: PathBuf,
    pub disk_bytes: u64,
    /// Size of `vm.state` when saved: a shorter (truncated) or longer file is refused.
    pub state_bytes: u64,
    /// Size of the RAM file (the guest memory): any other size is refused.
    #[serde(default)]
    pub ram_bytes: u64,
    pub created_at_ms: u64,
    /// Boot to ready + save, as measured by the build.
    pub build_ms: u64,
}

/// A stored template, checked to be complete.
#[derive(Debug, Clone)]
pub struct Template {
    pub id: String,
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Template {
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    pub fn disk_path(&self) -> PathBuf {
        self.dir.join(DISK_FILE)
    }
    pub fn ram_path(&self) -> PathBuf {
        self.dir.join(RAM_FILE)
    }
}

/// A template and the sandboxes whose disks are layered on it (for listings).
#[derive(Debug, Clone, Serialize)]
pub struct TemplateInfo {
    pub id: String,
    pub image_root: PathBuf,
    pub state_bytes: u64,
    pub created_at_ms: u64,
    pub used_by: Vec<String>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn read_meta(dir: &Path) -> Option<Meta> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(dir.join(META_FILE)).ok()?.take(MAX_META).read_to_string(&mut s).ok()?;
    serde_json::from_str(&s).ok()
}

/// The complete template `id`, if stored: its record parses and names it, the disk
/// exists and the state and RAM files have the recorded sizes. (Content is checked by QEMU when it
/// loads the stream; a stream that does not load falls back to a cold boot.)
pub fn find(home: &Home, id: &str) -> Option<Template> {
    let dir = super::root(home).join(id);
    let meta = read_meta(&dir).filter(|m| m.id == id)?;
    let state = std::fs::metadata(dir.join(STATE_FILE)).ok()?;
    if state.len() != meta.state_bytes || !dir.join(DISK_FILE).is_file() {
        return None;
    }
    let ram = std::fs::metadata(dir.join(RAM_FILE)).ok()?;
    if meta.ram_bytes == 0 || ram.len() != meta.ram_bytes {
        return None;
    }
    Some(Template { id: id.into(), dir, meta })
}

fn private_dir(p: &Path) -> Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p).context(|| format!("creating {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700)).context(|| format!("securing {}", p.display()))
}

/// Takes the build lock of a key: an exclusive `flock` on `<id>.lock`. [`prune`] unlinks
/// lock files it holds; a process that opened the file before that unlink would then hold
/// a lock on a file no longer at the path, next to a new one, so the lock counts only once
/// the path still names the locked file (else open the new one and lock again).
fn lock(path: PathBuf) -> Result<Flock<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let held = crate::lockfile::lock_exclusive(&path)?;
        let locked = held.metadata().context(|| format!("lock {}", path.display()))?;
        match std::fs::metadata(&path) {
            Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => return Ok(held),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::Io { context: format!("lock {}", path.display()), source: e }),
        }
    }
}

/// Removes `<id>.lock` and `<id>.failed` files that outlived their use: a lock file whose
/// template and build directory are gone and that nobody holds (unlinked while this
/// holds it; see [`lock`]), a failure marker older than [`RETRY_FAILED_AFTER`]. Without
/// this every configuration ever tried left a file behind.
fn prune_markers(root: &Path) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_suffix(".lock") {
            if root.join(id).exists() || root.join(format!("{id}.build")).exists() {
                continue;
            }
            let Ok(f) = std::fs::OpenOptions::new().write(true).open(&p) else { continue };
            if let Ok(_held) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                let _ = std::fs::remove_file(&p);
            }
        } else if name.ends_with(".failed") {
            let age = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a >= RETRY_FAILED_AFTER) {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// The template for `key`: found, or built now by `build` (given an empty private
/// directory to fill with `vm.state` and `disk.qcow2`; it returns the build time in ms)
/// and then stored. One build per key across threads and processes; a failed build is
/// remembered for [`RETRY_FAILED_AFTER`], during which this returns the error at once.
pub async fn ensure<F, Fut>(home: &Home, key: &Key, build: F) -> Result<Template>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: Future<Output = Result<u64>>,
{
    let id = key.id();
    if let Some(t) = find(home, &id) {
        return Ok(t);
    }
    let root = super::root(home);
    private_dir(&root)?;
    let lock_path = root.join(format!("{id}.lock"));
    let _lock = tokio::task::spawn_blocking(move || lock(lock_path))
        .await
        .map_err(|e| Error::Runtime(format!("template lock task failed: {e}")))??;
    if let Some(t) = find(home, &id) {
        return Ok(t); // another process built it while this one waited
    }
    let failed = root.join(format!("{id}.failed"));
    if let Ok(m) = std::fs::metadata(&failed) {
        let age = m.modified().ok().and_then(|t| t.elapsed().ok()).unwrap_or_default();
        if age < RETRY_FAILED_AFTER {
            let why = std::fs::read_to_string(&failed).unwrap_or_default();
            return Err(Error::Runtime(format!("template {id} could not be built recently: {}", why.chars().take(500).collect::<String>())));
        }
    }
    let dir = root.join(&id);
    if dir.exists() {
        // Stored but not usable: a truncated or missing state file, a lost record, or a
        // state QEMU refused to load (see [`discard_state`]). Its disk layer may back
        // sandboxes made from it, so it is only replaced once none does; meanwhile, and
        // for this create, sandboxes of this configuration boot cold.
        let why = damage(&dir, &id);
        if let Some(u) = users(home).get(&id) {
            return Err(Error::Runtime(format!(
                "template {id} is damaged ({why}) and its disk layer is still used by sandbox(es) {}; creates boot cold until they are removed",
                u.join(", ")
            )));
        }
        let _ = std::fs::remove_dir_all(&dir);
        return Err(Error::Runtime(format!("template {id} was damaged ({why}); removed it, the next create rebuilds it")));
    }
    let building = root.join(format!("{id}.build"));
    let _ = std::fs::remove_dir_all(&building);
    private_dir(&building)?;
    let built = build(building.clone()).await;
    let build_ms = match built {
        Ok(ms) => ms,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            let _ = std::fs::write(&failed, e.to_string());
            return Err(e);
        }
    };
    let state = building.join(STATE_FILE);
    let disk = building.join(DISK_FILE);
    let state_bytes = std::fs::metadata(&state).context(|| format!("template state {}", state.display()))?.len();
    let ram = building.join(RAM_FILE);
    let ram_bytes = std::fs::metadata(&ram).context(|| format!("template RAM {}", ram.display()))?.len();
    // Owner-only like the rest, but writable: QEMU 7.2 opens a private `mem-path`
    // read-write (it never writes it: the mapping is MAP_PRIVATE).
    std::fs::set_permissions(&ram, std::fs::Permissions::from_mode(0o600)).context(|| format!("securing {}", ram.display()))?;
    // Frozen: the state file is read by each restore, the disk is every overlay's backing.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o400)).context(|| format!("securing {}", state.display()))?;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o400)).context(|| format!("freezing {}", disk.display()))?;
    let meta = Meta {
        id: id.clone(),
        runtime: key.runtime.clone(),
        image_root: key.image_root.clone(),
        disk_bytes: key.disk_bytes,
        state_bytes,
        ram_bytes,
        created_at_ms: now_ms(),
        build_ms,
    };
    let meta_path = building.join(META_FILE);
    std::fs::write(&meta_path, serde_json::to_vec_pretty(&meta).unwrap()).context(|| format!("writing {}", meta_path.display()))?;
    std::fs::set_permissions(&meta_path, std::fs::Permissions::from_mode(0o600)).context(|| format!("securing {}", meta_path.display()))?;
    // Only a complete template gets its final name.
    std::fs::rename(&building, &dir).context(|| format!("storing template {}", dir.display()))?;
    let _ = std::fs::remove_file(&failed);
    find(home, &id).ok_or_else(|| Error::Runtime(format!("template {id} vanished right after it was stored")))
}

/// Why the stored template in `dir` is not usable (for the log).
fn damage(dir: &Path, id: &str) -> String {
    let Some(meta) = read_meta(dir).filter(|m| m.id == id) else { return "its record is missing or unreadable".into() };
    match std::fs::metadata(dir.join(STATE_FILE)) {
        Err(_) => "its state file is missing".into(),
        Ok(m) if m.len() != meta.state_bytes => format!("its state file has {} bytes, {} were saved", m.len(), meta.state_bytes),
        Ok(_) if !dir.join(DISK_FILE).is_file() => "its disk layer is missing".into(),
        Ok(_) => match std::fs::metadata(dir.join(RAM_FILE)) {
            Err(_) => "its RAM file is missing".into(),
            Ok(m) => format!("its RAM file has {} bytes, {} were saved", m.len(), meta.ram_bytes),
        },
    }
}

/// Makes `t` unusable after QEMU refused its state (a corrupt file): later creates then
/// boot cold instead of failing the same restore again, and [`ensure`] replaces it once
/// no sandbox uses its disk layer.
pub fn discard_state(t: &Template) {
    let _ = std::fs::remove_file(t.dir.join(META_FILE));
}

/// Template id → the sandboxes whose overlay is backed by its disk.
pub fn users(home: &Home) -> HashMap<String, Vec<String>> {
    let root = super::root(home);
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let Ok(rd) = std::fs::read_dir(home.sandboxes_dir()) else { return out };
    for sb in rd.flatten() {
        let Ok(files) = std::fs::read_dir(sb.path()) else { continue };
        for f in files.flatten() {
            if f.path().extension().is_some_and(|e| e == "qcow2") {
                if let Some(b) = crate::image::store::qcow2_backing_file(&f.path()) {
                    if let Ok(rest) = b.strip_prefix(&root) {
                        if let Some(id) = rest.iter().next() {
                            let name = crate::paths::sandbox_name_of(&sb.path())
                                .unwrap_or_else(|| sb.file_name().to_string_lossy().into_owned());
                            out.entry(id.to_string_lossy().into_owned()).or_default().push(name);
                        }
                    }
                }
            }
        }
    }
    out
}

/// Every stored template with its users.
pub fn list(home: &Home) -> Vec<TemplateInfo> {
    let users = users(home);
    let mut out: Vec<TemplateInfo> = std::fs::read_dir(super::root(home))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = read_meta(&e.path())?;
            Some(TemplateInfo {
                used_by: users.get(&m.id).cloned().unwrap_or_default(),
                id: m.id,
                image_root: m.image_root,
                state_bytes: m.state_bytes,
                created_at_ms: m.created_at_ms,
            })
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// Deletes template `dir` (files are read-only, the directory is not). Returns bytes freed.
fn delete(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let bytes: u64 = std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum();
    if std::fs::remove_dir_all(dir).is_ok() {
        bytes
    } else {
        0
    }
}

/// Deletes every template without a user whose runtime is not `current_runtime` (`None`:
/// every unused template), plus leftovers of interrupted builds. Returns bytes freed.
pub fn prune(home: &Home, current_runtime: Option<&str>) -> u64 {
    let users = users(home);
    let mut freed = 0;
    for e in std::fs::read_dir(super::root(home)).into_iter().flatten().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if !p.is_dir() {
            continue;
        }
        if name.ends_with(".build") {
            // Only a build holding its key's lock is alive.
            let id = name.trim_end_matches(".build");
            let lock_path = super::root(home).join(format!("{id}.lock"));
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&lock_path) {
                if let Ok(_held) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                    freed += delete(&p);
                }
            }
            continue;
        }
        if users.contains_key(&name) {
            continue;
        }
        let stale = match (read_meta(&p), current_runtime) {
            (Some(m), Some(rt)) => m.runtime != rt,
            _ => true,
        };
        if stale {
            freed += delete(&p);
        }
    }
    prune_markers(&super::root(home));
    freed
}

/// Deletes the unused templates layered on the image root `root` (before the root goes).
/// Returns the sandboxes that still use one of them (then nothing of theirs is deleted).
pub fn remove_for_root(home: &Home, root: &Path) -> Vec<String> {
    let canon = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let users = users(home);
    let mut in_use = Vec::new();
    for e in std::fs::read_dir(super::root(home)).into_iter().flatten().flatten() {
        let Some(m) = read_meta(&e.path()) else { continue };
        if std::fs::canonicalize(&m.image_root).unwrap_or(m.image_root.clone()) != canon {
            continue;
        }
        match users.get(&m.id) {
            Some(u) => in_use.extend(u.iter().cloned()),
            None => {
                delete(&e.path());
            }
        }
    }
    prune_markers(&super::root(home));
    in_use
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_removes_lock_files_of_gone_templates_but_not_held_or_used_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::at(tmp.path());
        let root = crate::template::root(&home);
        std::fs::create_dir_all(root.join("kept")).unwrap();
        std::fs::write(root.join("kept.lock"), "").unwrap();
        std::fs::write(root.join("gone.lock"), "").unwrap();
        let held = lock(root.join("busy.lock")).unwrap();
        std::fs::write(root.join("old.failed"), "e").unwrap();
        let old = std::time::SystemTime::now() - RETRY_FAILED_AFTER - Duration::from_secs(1);
        std::fs::File::options().write(true).open(root.join("old.failed")).unwrap().set_modified(old).unwrap();
        std::fs::write(root.join("new.failed"), "e").unwrap();
        prune_markers(&root);
        assert!(!root.join("gone.lock").exists());
        assert!(root.join("kept.lock").exists(), "its template is there");
        assert!(root.join("busy.lock").exists(), "a build holds it");
        assert!(!root.join("old.failed").exists());
        assert!(root.join("new.failed").exists(), "still remembered");
        drop(held);
        prune_markers(&root);
        assert!(!root.join("busy.lock").exists());
    }

    #[test]
    fn a_lock_taken_on_a_file_unlinked_meanwhile_is_taken_again_on_the_new_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("k.lock");
        let first = lock(path.clone()).unwrap();
        let p2 = path.clone();
        let waiter = std::thread::spawn(move || lock(p2).unwrap());
        std::thread::sleep(Duration::from_millis(100)); // the waiter has opened the old file
        std::fs::remove_file(&path).unwrap(); // as prune does, while holding it
        drop(first);
        let second = waiter.join().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(second.metadata().unwrap().ino(), std::fs::metadata(&path).unwrap().ino());
        // A third process now blocks on the same file, so the two are mutually exclusive.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err());
        drop(second);
    }
}
