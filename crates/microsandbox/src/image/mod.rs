//! OCI / Docker registry images: pull, verify, unpack into a shared read-only ext4 root
//! disk per manifest, and hand sandboxes a copy-on-write overlay of it.
//!
//! - [`reference`]: Docker reference parsing and normalisation.
//! - [`store`]: the content-addressed store under `<home>/images` and its locks.
//! - [`pull`]: registry access (auth, platform selection, verified streaming downloads).
//! - [`layers`]: applying layer tars (whiteouts, hardlinks, safe paths, xattrs) without root.
//! - [`decode`]: decompression of a layer blob on its own thread, with its `diff_id`.
//! - [`targuard`]: bounds the tar extension headers a layer can make the host buffer.
//! - [`disk`]: ext4 build (`mke2fs -d` + `debugfs` for owners/modes/devices) and qcow2 overlays.
//! - [`config`]: manifest/index/config JSON and the [`ImageConfig`] a sandbox applies.
//! - [`usage`]: when an image entered the store and when a sandbox last booted from it.
//!
//! Entry point: [`ensure_image`]. Store management: [`list`], [`inspect`], [`remove`], [`prune`].

pub mod config;
pub mod decode;
pub mod disk;
pub mod layers;
pub mod pull;
pub mod reference;
pub mod store;
pub mod targuard;
pub mod usage;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use config::{Descriptor, ImageConfig, Platform};
pub use disk::create_overlay;
pub use reference::ImageRef;

use config::{ConfigFile, Manifest, ManifestDoc};
use layers::{ApplyError, LayerInput, Tree};
use pull::Remote;
use store::{digest_hex, now_unix, RefRecord, Store};

use crate::error::{Error, IoContext, Result};
use crate::paths::Home;

/// When to contact the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Always resolve the reference again (layers already stored are not re-downloaded).
    Always,
    /// Use the stored image if the reference was pulled before; pull otherwise.
    #[default]
    IfMissing,
    /// Never contact the registry; a reference not in the store is `ImageNotFound`.
    Never,
}

/// Explicit registry credentials (`registry_auth: {username:, password:}`).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    pub policy: PullPolicy,
    /// Explicit credentials; otherwise `~/.docker/config.json` (or `docker_config`), else anonymous.
    pub auth: Option<RegistryCredentials>,
    /// Talk plain HTTP to the registry (`registry_insecure: true`).
    pub insecure: bool,
    /// Extra trusted root certificates, PEM-encoded (`registry_ca_certs:`).
    pub ca_certs: Vec<Vec<u8>>,
    /// Path of a docker `config.json` to read credentials from (default: `$DOCKER_CONFIG` / `~/.docker`).
    pub docker_config: Option<PathBuf>,
    /// Platform to select from an index (default: the host's, e.g. `linux/amd64`).
    pub platform: Option<Platform>,
}

/// Download progress of one blob. `total` is 0 when the registry did not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    pub digest: String,
    pub done: u64,
    pub total: u64,
}

/// An image ready to boot.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Canonical reference, e.g. `docker.io/library/alpine:latest`.
    pub reference: String,
    pub manifest_digest: String,
    /// The shared read-only raw ext4 root; give each sandbox an overlay ([`create_overlay`]).
    pub root_disk: PathBuf,
    pub config: ImageConfig,
}

/// Resolves `reference`, pulling and building what is missing, and returns the prepared root.
///
/// Two callers (threads or processes) preparing the same image both succeed; blobs are
/// downloaded once and the root disk is built once.
pub async fn ensure_image(
    home: &Home,
    reference: &str,
    opts: &PullOptions,
    progress: &mut (dyn FnMut(LayerProgress) + Send),
) -> Result<PreparedImage> {
    let image = ImageRef::parse(reference)?;
    let canonical = image.to_string();
    let store = Store::open(home)?;
    let _gc = store.lock_async("gc".into(), false).await?;
    let platform = opts.platform.clone().unwrap_or_else(pull::host_platform);

    if opts.policy != PullPolicy::Always {
        if let Some(rec) = store.read_ref(&canonical) {
            if let Some(img) = prepare_local(&store, &canonical, &rec.manifest_digest, progress).await? {
                return Ok(img);
            }
        }
        if opts.policy == PullPolicy::Never {
            return Err(Error::ImageNotFound(format!(
                "image {canonical} is not in the local store and pull_policy is never; pull it first or use pull_policy :if_missing"
            )));
        }
    }

    let remote = Remote::new(&image, opts)?;
    let resolved = remote.resolve(&store, &platform).await?;
    let cmt = resolved.manifest.config.media_type.as_str();
    if !(cmt.is_empty() || cmt == config::MT_OCI_CONFIG || cmt == config::MT_DOCKER_CONFIG) {
        return Err(Error::InvalidConfig(format!(
            "{canonical} is not a container image (its config media type is {cmt}); only OCI/Docker images can boot"
        )));
    }
    let config_bytes = remote.fetch_json_blob(&store, &resolved.manifest.config).await?;
    let config_file: ConfigFile = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::Registry(format!("the image config of {canonical} is not valid JSON: {e}")))?;
    for layer in &resolved.manifest.layers {
        remote.fetch_blob(&store, layer, progress).await?;
    }
    let root_disk = match build_root(&store, &resolved.manifest_digest, &resolved.manifest, &config_file).await? {
        Ok(p) => p,
        Err(bad_digest) => {
            // A stored layer failed verification while unpacking: it was discarded; fetch it again.
            let desc = resolved.manifest.layers.iter().find(|l| l.digest == bad_digest).cloned();
            if let Some(desc) = desc {
                remote.fetch_blob(&store, &desc, progress).await?;
            }
            build_root(&store, &resolved.manifest_digest, &resolved.manifest, &config_file).await?.map_err(|d| {
                Error::Registry(format!("layer {d} of {canonical} is corrupt even after downloading it again"))
            })?
        }
    };
    let previous = store.read_ref(&canonical);
    store.write_ref(&RefRecord {
        created_at_ms: Some(usage::created_at_ms(previous.as_ref())),
        reference: canonical.clone(),
        manifest_digest: resolved.manifest_digest.clone(),
        index_digest: resolved.index_digest.clone(),
        config_digest: resolved.manifest.config.digest.clone(),
        platform: resolved.platform.to_string(),
        pulled_at: now_unix(),
    })?;
    Ok(PreparedImage {
        reference: canonical,
        manifest_digest: resolved.manifest_digest,
        root_disk,
        config: ImageConfig::from_file(&config_file),
    })
}

fn read_manifest(store: &Store, digest: &str) -> Result<Option<Manifest>> {
    let Some(bytes) = store.read_blob_verified(digest)? else { return Ok(None) };
    match ManifestDoc::parse(&bytes, None)? {
        ManifestDoc::Image(m) => Ok(Some(m)),
        ManifestDoc::Index(_) => Ok(None),
    }
}

/// Uses what the store has for `manifest_digest`; `None` when something must be fetched.
async fn prepare_local(
    store: &Store,
    canonical: &str,
    manifest_digest: &str,
    progress: &mut (dyn FnMut(LayerProgress) + Send),
) -> Result<Option<PreparedImage>> {
    let Some(manifest) = read_manifest(store, manifest_digest)? else { return Ok(None) };
    let Some(config_bytes) = store.read_blob_verified(&manifest.config.digest)? else { return Ok(None) };
    let Ok(config_file) = serde_json::from_slice::<ConfigFile>(&config_bytes) else { return Ok(None) };
    let root = store.root_path(manifest_digest)?;
    if !root.is_file() {
        if !manifest.layers.iter().all(|l| store.has_blob(&l.digest)) {
            return Ok(None);
        }
        if build_root(store, manifest_digest, &manifest, &config_file).await?.is_err() {
            return Ok(None); // a corrupt layer was discarded; the caller re-fetches it
        }
    }
    for l in &manifest.layers {
        progress(LayerProgress { digest: l.digest.clone(), done: l.size, total: l.size });
    }
    Ok(Some(PreparedImage {
        reference: canonical.to_string(),
        manifest_digest: manifest_digest.to_string(),
        root_disk: root,
        config: ImageConfig::from_file(&config_file),
    }))
}

/// Builds (once, under the `root-<hex>` lock) the root disk of a manifest whose blobs are
/// stored. `Ok(Err(digest))`: that layer blob was corrupt and has been deleted.
async fn build_root(
    store: &Store,
    manifest_digest: &str,
    manifest: &Manifest,
    config: &ConfigFile,
) -> Result<std::result::Result<PathBuf, String>> {
    let hex = digest_hex(manifest_digest)?;
    let root = store.root_path(manifest_digest)?;
    if root.is_file() {
        return Ok(Ok(root));
    }
    let _lock = store.lock_async(format!("root-{hex}"), true).await?;
    if root.is_file() {
        return Ok(Ok(root));
    }
    let diff_ids = config.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
    let use_diff_ids = diff_ids.len() == manifest.layers.len();
    let mut inputs = Vec::new();
    for (i, l) in manifest.layers.iter().enumerate() {
        inputs.push(LayerInput {
            path: store.blob_path(&l.digest)?,
            digest: l.digest.clone(),
            size: l.size,
            media_type: l.media_type.clone(),
            diff_id: use_diff_ids.then(|| diff_ids[i].clone()),
        });
    }
    let s = store.clone();
    let dest = root.clone();
    let res = tokio::task::spawn_blocking(move || build_root_blocking(&s, &inputs, &dest))
        .await
        .map_err(|e| Error::Runtime(format!("root disk build task failed: {e}")))?;
    match res {
        Ok(()) => Ok(Ok(root)),
        Err(ApplyError::Corrupt { digest, .. }) => {
            store.remove_blob(&digest);
            Ok(Err(digest))
        }
        Err(ApplyError::Other(e)) => Err(e),
    }
}

/// A build directory, discarded (in the background) on drop.
struct TmpDir(PathBuf, Store);
impl Drop for TmpDir {
    fn drop(&mut self) {
        self.1.discard_later(&self.0);
    }
}

fn build_root_blocking(store: &Store, layers: &[LayerInput], dest: &Path) -> std::result::Result<(), ApplyError> {
    let work = TmpDir(store.tmp_path("build"), store.clone());
    std::fs::create_dir_all(&work.0).context(|| format!("creating {}", work.0.display()))?;
    let mut tree = Tree::new(&work.0.join("rootfs"))?;
    for l in layers {
        tree.apply_layer(l)?;
    }
    let disk = work.0.join("root.ext4");
    disk::build_ext4(&tree, &disk, &work.0)?;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444))
        .context(|| format!("making {} read-only", disk.display()))?;
    std::fs::rename(&disk, dest).context(|| format!("storing {}", dest.display()))?;
    Ok(())
}

/// One stored reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageSummary {
    pub reference: String,
    pub manifest_digest: String,
    pub platform: String,
    pub pulled_at: u64,
    /// The prepared root disk, if built.
    pub root_disk: Option<PathBuf>,
    /// Bytes the root disk occupies on the host (it is sparse).
    pub root_disk_bytes: u64,
    /// Compressed size of config + layers.
    pub content_bytes: u64,
    /// Sandboxes whose overlay is backed by this root.
    pub in_use_by: Vec<String>,
    /// `content_bytes` as the reference gem's `size_bytes`; None when the manifest is
    /// not in the store.
    pub size_bytes: Option<u64>,
    /// From the image config (else the platform the manifest was chosen for).
    pub architecture: Option<String>,
    pub os: Option<String>,
    /// Layers in the manifest (0 when the manifest is not in the store).
    pub layer_count: usize,
    /// When the reference first entered the store, ms since the epoch.
    pub created_at_ms: u64,
    /// When a sandbox was last created from it, ms since the epoch.
    pub last_used_at_ms: Option<u64>,
}

/// Details of one stored reference.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageDetails {
    pub summary: ImageSummary,
    pub index_digest: Option<String>,
    pub config_digest: String,
    pub config: ImageConfig,
    pub layers: Vec<Descriptor>,
}

fn allocated(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn in_use_by(store: &Store, root: &Path) -> Vec<String> {
    let canon = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    store
        .roots_in_use()
        .into_iter()
        .filter(|(p, _)| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()) == canon)
        .flat_map(|(_, v)| v)
        .collect()
}

fn summarize(store: &Store, rec: &RefRecord) -> ImageSummary {
    let root = store.root_path(&rec.manifest_digest).ok().filter(|p| p.is_file());
    let manifest = read_manifest(store, &rec.manifest_digest).ok().flatten();
    let content_bytes = manifest.as_ref().map(|m| m.config.size + m.layers.iter().map(|l| l.size).sum::<u64>()).unwrap_or(0);
    // The config names the platform the image was built for; the record's platform
    // (what the index offered) covers a config that is missing or leaves it out.
    let built_for = manifest
        .as_ref()
        .and_then(|m| store.read_blob_verified(&m.config.digest).ok().flatten())
        .and_then(|b| serde_json::from_slice::<ConfigFile>(&b).ok());
    let mut recorded = rec.platform.split('/');
    let (rec_os, rec_arch) = (recorded.next().filter(|s| !s.is_empty()), recorded.next().filter(|s| !s.is_empty()));
    let pick = |from_config: Option<&str>, from_record: Option<&str>| {
        from_config.filter(|s| !s.is_empty()).or(from_record).map(str::to_string)
    };
    ImageSummary {
        size_bytes: manifest.as_ref().map(|_| content_bytes),
        architecture: pick(built_for.as_ref().map(|c| c.architecture.as_str()), rec_arch),
        os: pick(built_for.as_ref().map(|c| c.os.as_str()), rec_os),
        layer_count: manifest.as_ref().map(|m| m.layers.len()).unwrap_or(0),
        created_at_ms: usage::created_ms_of(rec),
        last_used_at_ms: usage::last_used_ms(store, &rec.reference),
        reference: rec.reference.clone(),
        manifest_digest: rec.manifest_digest.clone(),
        platform: rec.platform.clone(),
        pulled_at: rec.pulled_at,
        root_disk_bytes: root.as_deref().map(allocated).unwrap_or(0),
        in_use_by: root.as_deref().map(|r| in_use_by(store, r)).unwrap_or_default(),
        root_disk: root,
        content_bytes,
    }
}

/// Every stored reference, sorted by name.
pub fn list(home: &Home) -> Result<Vec<ImageSummary>> {
    let store = Store::open(home)?;
    Ok(store.list_refs().iter().map(|r| summarize(&store, r)).collect())
}

/// Details of a stored reference; `ImageNotFound` if it was never pulled.
pub fn inspect(home: &Home, reference: &str) -> Result<ImageDetails> {
    let canonical = ImageRef::parse(reference)?.to_string();
    let store = Store::open(home)?;
    let rec = store
        .read_ref(&canonical)
        .ok_or_else(|| Error::ImageNotFound(format!("image {canonical} is not in the local store")))?;
    let manifest = read_manifest(&store, &rec.manifest_digest)?;
    let config = manifest
        .as_ref()
        .and_then(|m| store.read_blob_verified(&m.config.digest).ok().flatten())
        .map(|b| ImageConfig::from_json(&b))
        .transpose()?
        .unwrap_or_default();
    Ok(ImageDetails {
        summary: summarize(&store, &rec),
        index_digest: rec.index_digest.clone(),
        config_digest: rec.config_digest.clone(),
        config,
        layers: manifest.map(|m| m.layers).unwrap_or_default(),
    })
}

/// Forgets a reference and deletes its root disk when no other reference uses it. Blobs
/// stay until [`prune`]. A root backing a sandbox's overlay is refused unless `force`
/// (a running VM keeps its open copy; new sandboxes cannot use it).
pub async fn remove(home: &Home, reference: &str, force: bool) -> Result<()> {
    let canonical = ImageRef::parse(reference)?.to_string();
    let store = Store::open(home)?;
    let _gc = store.lock_async("gc".into(), true).await?;
    let rec = store
        .read_ref(&canonical)
        .ok_or_else(|| Error::ImageNotFound(format!("image {canonical} is not in the local store")))?;
    let shared = store.list_refs().iter().any(|r| r.reference != canonical && r.manifest_digest == rec.manifest_digest);
    let root = store.root_path(&rec.manifest_digest)?;
    if !shared && root.is_file() {
        let users = in_use_by(&store, &root);
        if !users.is_empty() && !force {
            return Err(Error::ImageInUse(format!(
                "image {canonical} is used by sandbox(es) {}; stop them first or pass force: true",
                users.join(", ")
            )));
        }
    }
    store.remove_ref(&canonical)?;
    if !shared {
        // Templates layered on this root go with it (those a sandbox still uses stay).
        crate::template::remove_for_root(home, &root);
        let _ = std::fs::remove_file(&root);
    }
    Ok(())
}

/// What [`prune`] deleted (the Ruby `ImagePruneReport`; the counter names are the
/// reference gem's).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// Reference records that could boot nothing: unreadable, or naming a manifest the
    /// store no longer has.
    pub image_refs_removed: u64,
    /// Unreferenced metadata blobs: manifests, indexes and image configs.
    pub manifests_removed: u64,
    /// Unreferenced layer blobs.
    pub layers_removed: u64,
    /// Root disks (the filesystem built from an image's layers) no stored reference and
    /// no sandbox needs.
    pub fsmeta_removed: u64,
    /// Always 0: this store builds no VMDK descriptors (an image's disk is its root disk,
    /// counted in `fsmeta_removed`).
    pub vmdk_removed: u64,
    /// Host bytes freed by all of the above, unused templates and leftovers in `tmp/`.
    pub bytes_reclaimed: u64,
}

/// Deletes reference records that can boot nothing, the blobs and root disks no stored
/// reference needs (roots backing a sandbox overlay are kept; unused templates on a
/// deleted root go with it), templates of a runtime that is no longer installed, and
/// leftovers in `tmp/`.
pub async fn prune(home: &Home) -> Result<PruneReport> {
    let store = Store::open(home)?;
    let _gc = store.lock_async("gc".into(), true).await?;
    let mut report = PruneReport::default();
    report.image_refs_removed = prune_dead_refs(&store);
    usage::sweep(&store);
    let mut live_blobs = std::collections::HashSet::new();
    let mut live_roots = std::collections::HashSet::new();
    for rec in store.list_refs() {
        for d in [Some(&rec.manifest_digest), rec.index_digest.as_ref(), Some(&rec.config_digest)].into_iter().flatten() {
            if let Ok(h) = digest_hex(d) {
                live_blobs.insert(h);
            }
        }
        if let Ok(h) = digest_hex(&rec.manifest_digest) {
            live_roots.insert(store::root_file_name(&h));
        }
        if let Ok(Some(m)) = read_manifest(&store, &rec.manifest_digest) {
            for l in m.layers.iter().chain(std::iter::once(&m.config)) {
                if let Ok(h) = digest_hex(&l.digest) {
                    live_blobs.insert(h);
                }
            }
        }
    }
    let in_use: Vec<PathBuf> =
        store.roots_in_use().into_keys().map(|p| std::fs::canonicalize(&p).unwrap_or(p)).collect();
    let mut freed = 0;
    let mut delete = |p: &Path| {
        let n = allocated(p);
        let r = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
        if r.is_ok() {
            freed += n;
        }
        r.is_ok()
    };
    for e in std::fs::read_dir(store.root().join("blobs/sha256")).into_iter().flatten().flatten() {
        if !live_blobs.contains(&*e.file_name().to_string_lossy()) {
            let metadata = is_json_document(&e.path());
            if delete(&e.path()) {
                *(if metadata { &mut report.manifests_removed } else { &mut report.layers_removed }) += 1;
            }
        }
    }
    for e in std::fs::read_dir(store.root().join("roots")).into_iter().flatten().flatten() {
        let canon = std::fs::canonicalize(e.path()).unwrap_or_else(|_| e.path());
        if !live_roots.contains(&*e.file_name().to_string_lossy()) && !in_use.contains(&canon) {
            crate::template::remove_for_root(home, &e.path());
            if delete(&e.path()) {
                report.fsmeta_removed += 1;
            }
        }
    }
    // Templates of another runtime (or QEMU) can never be restored again.
    if let (Some(rt), Ok(qemu)) = (crate::runtime::load(home), crate::vmm::qemu::binary()) {
        freed += crate::template::prune(home, Some(&crate::template::runtime_fingerprint(&rt, &qemu)));
    }
    for e in std::fs::read_dir(store.tmp_dir()).into_iter().flatten().flatten() {
        let p = e.path();
        let n = dir_allocated(&p);
        if (if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) }).is_ok() {
            freed += n;
        }
    }
    report.bytes_reclaimed = freed;
    Ok(report)
}

/// Deletes the records under `refs/` that can boot nothing: unreadable ones, ones stored
/// under another reference's key, and ones whose manifest is not in the store (a pull
/// fetches it again). Runs under the exclusive `gc` lock, so no pull is writing one.
fn prune_dead_refs(store: &Store) -> u64 {
    let mut removed = 0;
    for e in std::fs::read_dir(store.root().join("refs")).into_iter().flatten().flatten() {
        let path = e.path();
        let rec = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<RefRecord>(&b).ok());
        let dead = match rec {
            None => true,
            Some(rec) => {
                e.file_name().to_string_lossy() != format!("{}.json", Store::ref_key(&rec.reference))
                    || matches!(read_manifest(store, &rec.manifest_digest), Ok(None))
            }
        };
        if dead && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// True for a blob that is a JSON object (a manifest, an index or an image config), as
/// opposed to a layer (a tar stream, compressed or not). Reads at most
/// [`pull::MAX_JSON_BLOB`] bytes: a larger blob is a layer.
fn is_json_document(p: &Path) -> bool {
    use std::io::Read;
    let mut buf = Vec::new();
    let Ok(f) = std::fs::File::open(p) else { return false };
    if f.take(pull::MAX_JSON_BLOB + 1).read_to_end(&mut buf).is_err() || buf.len() as u64 > pull::MAX_JSON_BLOB {
        return false;
    }
    serde_json::from_slice::<serde_json::Value>(&buf).is_ok_and(|v| v.is_object())
}

fn dir_allocated(p: &Path) -> u64 {
    let Ok(md) = std::fs::symlink_metadata(p) else { return 0 };
    if !md.is_dir() {
        return md.blocks() * 512;
    }
    std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| dir_allocated(&e.path())).sum::<u64>() + md.blocks() * 512
}

#[cfg(test)]
mod tests {
    use super::*;
    use store::sha256_digest;

    #[tokio::test]
    async fn prune_counts_dead_records_and_sorts_blobs_into_metadata_and_layers() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let store = Store::open(&home).unwrap();
        // A record whose manifest is not stored, an unreadable record, and a record filed
        // under another reference's key: all three can boot nothing.
        let rec = RefRecord {
            reference: "docker.io/library/gone:1".into(),
            manifest_digest: sha256_digest(b"missing manifest"),
            index_digest: None,
            config_digest: sha256_digest(b"c"),
            platform: "linux/amd64".into(),
            pulled_at: 1,
            created_at_ms: None,
        };
        store.write_ref(&rec).unwrap();
        std::fs::write(store.root().join("refs/garbage.json"), b"{not json").unwrap();
        let misfiled = RefRecord { reference: "docker.io/library/other:1".into(), ..rec.clone() };
        std::fs::write(store.root().join("refs/0123.json"), serde_json::to_vec(&misfiled).unwrap()).unwrap();
        // Unreferenced blobs: two JSON documents and a (gzip) layer.
        let manifest = br#"{"schemaVersion":2,"layers":[]}"#.to_vec();
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let layer = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
        for b in [&manifest, &config, &layer] {
            store.write_blob(&sha256_digest(b), b).unwrap();
        }
        let report = prune(&home).await.unwrap();
        assert_eq!(report.image_refs_removed, 3, "{report:?}");
        assert_eq!((report.manifests_removed, report.layers_removed), (2, 1), "{report:?}");
        assert_eq!((report.fsmeta_removed, report.vmdk_removed), (0, 0));
        assert!(store.list_refs().is_empty());
        assert_eq!(std::fs::read_dir(store.root().join("refs")).unwrap().count(), 0);
        // Nothing left: a second prune removes nothing.
        let again = prune(&home).await.unwrap();
        assert_eq!(again, PruneReport::default());
    }
}
