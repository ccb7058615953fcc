//! Pulls from a real registry: Debian's `docker-registry` (distribution 2.8) started on
//! 127.0.0.1 by each test, with images built and pushed here over the registry HTTP API.
//! The built ext4 roots are checked with debugfs.
//!
//! Needs: `apt-get install docker-registry e2fsprogs qemu-utils`. A missing registry binary
//! fails the tests (it does not skip them).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microsandbox::image::{self, disk, LayerProgress, PullOptions, PullPolicy};
use microsandbox::paths::Home;
use microsandbox::Error;
use oci_client::client::{ClientConfig, ClientProtocol};
use sha2::{Digest, Sha256};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

// ---------------------------------------------------------------------------------------
// The registry

struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        Registry::start_with(|_| (String::new(), String::new()), false)
    }

    /// `extra(dir)` returns extra YAML: (top-level keys, children of `http:` indented by two
    /// spaces). `tls` only changes the readiness probe.
    fn start_with(extra: impl FnOnce(&Path) -> (String, String), tls: bool) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).is_file(),
            "{REGISTRY_BIN} is missing: these tests need a real registry; run `apt-get install docker-registry`"
        );
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = dir.path().join("config.yml");
        let (top, http) = extra(dir.path());
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n{top}http:\n  addr: 127.0.0.1:{port}\n{http}",
                storage.display(),
            ),
        )
        .unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let reg = Registry { child, port, storage, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                if tls {
                    std::thread::sleep(Duration::from_millis(200));
                    return reg;
                }
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200") || buf.contains(" 401 ") {
                    return reg;
                }
            }
            assert!(Instant::now() < deadline, "docker-registry did not come up on port {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps a blob's bytes (filesystem driver layout).
    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage.join(format!("docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Building and pushing images

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Tar entries with raw names (so hostile names can be written too).
struct Tar(tar::Builder<Vec<u8>>);

impl Default for Tar {
    fn default() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }
}

impl Tar {
    fn entry(mut self, name: &str, t: tar::EntryType, mode: u32, uid: u64, gid: u64, link: &str, data: &[u8], dev: (u32, u32)) -> Self {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_entry_type(t);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        if matches!(t, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(dev.0).unwrap();
            h.set_device_minor(dev.1).unwrap();
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn file(self, name: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> Self {
        self.entry(name, tar::EntryType::Regular, mode, uid, gid, "", data, (0, 0))
    }
    fn dir(self, name: &str, mode: u32, uid: u64, gid: u64) -> Self {
        self.entry(name, tar::EntryType::Directory, mode, uid, gid, "", b"", (0, 0))
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name, tar::EntryType::Symlink, 0o777, 0, 0, target, b"", (0, 0))
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.entry(name, tar::EntryType::Link, 0o644, 0, 0, target, b"", (0, 0))
    }
    fn chardev(self, name: &str, mode: u32, major: u32, minor: u32) -> Self {
        self.entry(name, tar::EntryType::Char, mode, 0, 0, "", b"", (major, minor))
    }
    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

enum Comp {
    Gzip,
    Zstd,
    Plain,
}

struct Layer {
    blob: Vec<u8>,
    media_type: &'static str,
    diff_id: String,
}

fn layer(tar: Vec<u8>, c: Comp) -> Layer {
    let diff_id = sha(&tar);
    match c {
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&tar).unwrap();
            Layer { blob: e.finish().unwrap(), media_type: "application/vnd.oci.image.layer.v1.tar+gzip", diff_id }
        }
        Comp::Zstd => Layer {
            blob: zstd::encode_all(&tar[..], 3).unwrap(),
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
            diff_id,
        },
        Comp::Plain => Layer { blob: tar, media_type: "application/vnd.oci.image.layer.v1.tar", diff_id },
    }
}

fn client() -> oci_client::Client {
    oci_client::Client::new(ClientConfig { protocol: ClientProtocol::Http, ..Default::default() })
}

/// Pushes blobs, config and an OCI manifest; returns the manifest digest.
async fn push_image(reg: &Registry, repo: &str, tag: &str, layers: &[Layer], config: serde_json::Value) -> String {
    push_image_with(&client(), reg, repo, tag, layers, config).await
}

async fn push_image_with(
    c: &oci_client::Client,
    reg: &Registry,
    repo: &str,
    tag: &str,
    layers: &[Layer],
    config: serde_json::Value,
) -> String {
    let r = oci_client::Reference::with_tag(reg.host(), repo.into(), tag.into());
    let mut cfg = config;
    cfg["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()});
    cfg["architecture"] = "amd64".into();
    cfg["os"] = "linux".into();
    let cfg_bytes = serde_json::to_vec(&cfg).unwrap();
    c.push_blob(&r, cfg_bytes.clone(), &sha(&cfg_bytes)).await.expect("push config");
    for l in layers {
        c.push_blob(&r, l.blob.clone(), &sha(&l.blob)).await.expect("push layer");
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&cfg_bytes), "size": cfg_bytes.len()},
        "layers": layers.iter().map(|l| serde_json::json!({"mediaType": l.media_type, "digest": sha(&l.blob), "size": l.blob.len()})).collect::<Vec<_>>(),
    });
    let body = serde_json::to_vec(&manifest).unwrap();
    c.push_manifest_raw(&r, body.clone(), http::HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"))
        .await
        .expect("push manifest");
    sha(&body)
}

async fn push_index(reg: &Registry, repo: &str, tag: &str, entries: &[(&str, &str, usize)]) {
    let manifests: Vec<_> = entries
        .iter()
        .map(|(arch, digest, size)| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
                "platform": {"os": "linux", "architecture": arch}})
        })
        .collect();
    let idx = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    let r = oci_client::Reference::with_tag(reg.host(), repo.into(), tag.into());
    client()
        .push_manifest_raw(&r, serde_json::to_vec(&idx).unwrap(), http::HeaderValue::from_static("application/vnd.oci.image.index.v1+json"))
        .await
        .expect("push index");
}

fn insecure() -> PullOptions {
    PullOptions { insecure: true, ..Default::default() }
}

/// The three-layer test image: gzip, zstd and plain layers exercising ownership, setuid,
/// hardlinks, symlinks, devices, whiteouts and opaque directories.
fn test_layers() -> Vec<Layer> {
    let l1 = Tar::default()
        .dir("bin/", 0o755, 0, 0)
        .file("bin/su", 0o4755, 0, 0, b"#!/bin/sh\necho su\n")
        .hardlink("bin/su-hard", "bin/su")
        .symlink("bin/sh-link", "/bin/su")
        .dir("home/", 0o755, 0, 0)
        .dir("home/user/", 0o750, 1000, 1000)
        .file("home/user/hello.txt", 0o640, 1000, 1000, b"hello from layer 1\n")
        .dir("dev/", 0o755, 0, 0)
        .chardev("dev/null", 0o666, 1, 3)
        .dir("etc/", 0o755, 0, 0)
        .file("etc/removed", 0o644, 0, 0, b"whiteout me\n")
        .file("etc/we\"ird name's", 0o600, 7, 8, b"quoted\n")
        .dir("opq/", 0o755, 0, 0)
        .file("opq/lower1", 0o644, 0, 0, b"lower\n")
        .dir("opq/lowerdir/", 0o755, 0, 0)
        .file("opq/lowerdir/x", 0o644, 0, 0, b"lower\n")
        .finish();
    let l2 = Tar::default()
        .file("etc/.wh.removed", 0o644, 0, 0, b"")
        .file("opq/.wh..wh..opq", 0o644, 0, 0, b"")
        .file("opq/upper", 0o644, 0, 0, b"upper\n")
        .file("usr/bin/tool", 0o2711, 0, 50, b"tool\n")
        .finish();
    let l3 = Tar::default()
        .dir("srv/", 0o1777, 0, 0)
        .file("srv/from-layer3", 0o644, 1234, 5678, b"plain tar layer\n")
        .finish();
    vec![layer(l1, Comp::Gzip), layer(l2, Comp::Zstd), layer(l3, Comp::Plain)]
}

fn test_config() -> serde_json::Value {
    serde_json::json!({"config": {
        "Env": ["PATH=/usr/bin:/bin", "GREETING=hello world"],
        "Entrypoint": ["/bin/su"], "Cmd": ["-c", "id"],
        "WorkingDir": "/home/user", "User": "1000:1000"}})
}

fn stat(disk: &Path, p: &str) -> String {
    let s = disk::debugfs_stat(disk, p).unwrap();
    if s.is_empty() {
        let out = Command::new("debugfs").arg("-R").arg(format!("stat \"{p}\"")).arg(disk).output().unwrap();
        panic!("debugfs stat {p} on {}: {}", disk.display(), String::from_utf8_lossy(&out.stderr));
    }
    s
}

fn ls(disk: &Path, dir: &str) -> Vec<String> {
    let out = Command::new("debugfs").arg("-R").arg(format!("ls -p \"{dir}\"")).arg(disk).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(String::from))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

fn cat(disk: &Path, p: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(format!("cat \"{p}\"")).arg(disk).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn blob_count(home: &Path) -> usize {
    std::fs::read_dir(home.join("images/blobs/sha256")).unwrap().count()
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread")]
async fn pulls_and_builds_root_with_exact_metadata() {
    let reg = Registry::start();
    let layers = test_layers();
    let manifest_digest = push_image(&reg, "team/app", "v1", &layers, test_config()).await;
    let home_dir = tempfile::tempdir().unwrap();
    let home = Home::at(home_dir.path());
    let reference = format!("{}/team/app:v1", reg.host());

    let events: Arc<Mutex<Vec<LayerProgress>>> = Default::default();
    let ev = events.clone();
    let mut progress = move |p: LayerProgress| ev.lock().unwrap().push(p);
    let t0 = Instant::now();
    let img = image::ensure_image(&home, &reference, &insecure(), &mut progress).await.expect("pull");
    eprintln!("pull + build of a 3-layer image: {:?}", t0.elapsed());
    assert_eq!(img.manifest_digest, manifest_digest);
    assert_eq!(img.reference, reference);

    // Progress: every layer reported, ending at done == total == its size.
    let events = events.lock().unwrap().clone();
    for l in &layers {
        let d = sha(&l.blob);
        let last = events.iter().rev().find(|e| e.digest == d).expect("progress for each layer");
        assert_eq!((last.done, last.total), (l.blob.len() as u64, l.blob.len() as u64));
    }

    // Config.
    let c = &img.config;
    assert_eq!(c.env, vec![("PATH".into(), "/usr/bin:/bin".into()), ("GREETING".into(), "hello world".into())]);
    assert_eq!(c.default_command(), ["/bin/su", "-c", "id"]);
    assert_eq!((c.working_dir.as_deref(), c.user.as_deref()), (Some("/home/user"), Some("1000:1000")));

    // The root disk: read-only, shared, with exact metadata.
    let disk = &img.root_disk;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(disk).unwrap().permissions().mode() & 0o777, 0o444);
    let s = stat(disk, "/home/user");
    assert!(s.contains("Type: directory") && s.contains("Mode:  0750") && s.contains("User:  1000   Group:  1000"), "{s}");
    let s = stat(disk, "/home/user/hello.txt");
    assert!(s.contains("Mode:  0640") && s.contains("User:  1000   Group:  1000"), "{s}");
    assert_eq!(cat(disk, "/home/user/hello.txt"), "hello from layer 1\n");
    let s = stat(disk, "/bin/su");
    assert!(s.contains("Mode:  04755") && s.contains("User:     0   Group:     0") && s.contains("Links: 2"), "{s}");
    let ino = |s: &str| s.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(ino(&stat(disk, "/bin/su")), ino(&stat(disk, "/bin/su-hard")), "hardlink shares the inode");
    let s = stat(disk, "/bin/sh-link");
    assert!(s.contains("Type: symlink") && s.contains("Fast link dest: \"/bin/su\""), "{s}");
    let s = stat(disk, "/dev/null");
    assert!(s.contains("Type: character special") && s.contains("Mode:  0666") && s.contains("Device major/minor number: 01:03"), "{s}");
    let s = stat(disk, "/usr/bin/tool");
    assert!(s.contains("Mode:  02711") && s.contains("Group:    50"), "{s}");
    let s = stat(disk, "/srv");
    assert!(s.contains("Mode:  01777"), "{s}");
    let s = stat(disk, "/srv/from-layer3");
    assert!(s.contains("User:  1234   Group:  5678"), "{s}");
    let s = stat(disk, "/etc/we\"ird name's");
    assert!(s.contains("Mode:  0600") && s.contains("User:     7   Group:     8"), "{s}");
    // Whiteout and opaque directory.
    let etc = ls(disk, "/etc");
    assert!(!etc.contains(&"removed".to_string()), "{etc:?}");
    assert!(!etc.iter().any(|n| n.starts_with(".wh.")), "{etc:?}");
    assert_eq!(ls(disk, "/opq"), vec!["upper".to_string()]);

    // Stored once: manifest + config + 3 layers.
    assert_eq!(blob_count(home_dir.path()), 5);
    assert_eq!(std::fs::read_dir(home_dir.path().join("images/tmp")).unwrap().count(), 0);

    // Per-sandbox copy-on-write overlay over the shared base.
    let sb = home_dir.path().join("sandboxes/s1");
    std::fs::create_dir_all(&sb).unwrap();
    disk::create_overlay(disk, &sb.join("root.qcow2"), None).unwrap();
    let info = Command::new("qemu-img").args(["info", "--output=json"]).arg(sb.join("root.qcow2")).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["backing-filename"].as_str().unwrap(), std::fs::canonicalize(disk).unwrap().to_str().unwrap());
    assert_eq!(info["backing-filename-format"], "raw");

    // list / inspect see it, with the sandbox using it.
    let list = image::list(&home).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].in_use_by, vec!["s1".to_string()]);
    assert!(list[0].root_disk_bytes > 0);
    // The reference gem's fields: from the manifest, the config and the store's records.
    assert_eq!(list[0].layer_count, 3);
    assert_eq!(list[0].size_bytes, Some(list[0].content_bytes));
    assert_eq!((list[0].os.as_deref(), list[0].architecture.as_deref()), (Some("linux"), Some("amd64")));
    assert!(list[0].created_at_ms / 1000 >= list[0].pulled_at.saturating_sub(1));
    assert_eq!(list[0].last_used_at_ms, None);
    image::usage::mark_used(&home, &reference).await.unwrap();
    assert!(image::list(&home).unwrap()[0].last_used_at_ms.is_some());
    let details = image::inspect(&home, &reference).unwrap();
    assert_eq!(details.layers.len(), 3);
    assert_eq!(details.config, img.config);

    // IfMissing and Never work offline once pulled.
    drop(reg);
    let again = image::ensure_image(&home, &reference, &insecure(), &mut |_| {}).await.expect("offline if_missing");
    assert_eq!(again.root_disk, img.root_disk);
    let never = PullOptions { policy: PullPolicy::Never, ..insecure() };
    image::ensure_image(&home, &reference, &never, &mut |_| {}).await.expect("offline never");
    let always = PullOptions { policy: PullPolicy::Always, ..insecure() };
    assert!(matches!(image::ensure_image(&home, &reference, &always, &mut |_| {}).await, Err(Error::Registry(_))));

    // remove refuses while a sandbox overlay uses the root; prune keeps what is referenced.
    assert!(matches!(image::remove(&home, &reference, false).await, Err(Error::ImageInUse(_))));
    assert_eq!(image::prune(&home).await.unwrap(), image::PruneReport::default());
    std::fs::remove_dir_all(&sb).unwrap();
    image::remove(&home, &reference, false).await.unwrap();
    assert!(!img.root_disk.exists());
    let blobs = blob_count(home_dir.path()) as u64;
    let report = image::prune(&home).await.unwrap();
    assert!(report.bytes_reclaimed > 0);
    assert_eq!(report.layers_removed, 3);
    assert_eq!(report.manifests_removed + report.layers_removed, blobs, "{report:?}");
    assert_eq!((report.image_refs_removed, report.fsmeta_removed, report.vmdk_removed), (0, 0, 0));
    assert_eq!(blob_count(home_dir.path()), 0);
    assert!(matches!(image::ensure_image(&home, &reference, &never, &mut |_| {}).await, Err(Error::ImageNotFound(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_tag_is_image_not_found() {
    let reg = Registry::start();
    push_image(&reg, "team/app", "v1", &test_layers(), test_config()).await;
    let home_dir = tempfile::tempdir().unwrap();
    let home = Home::at(home_dir.path());
    for r in [format!("{}/team/app:nope", reg.host()), format!("{}/team/nothing:v1", reg.host())] {
        let e = image::ensure_image(&home, &r, &insecure(), &mut |_| {}).await.unwrap_err();
        assert!(matches!(e, Error::ImageNotFound(_)), "{r}: {e:?}");
        assert_eq!(e.code(), "image-not-found");
    }
    // And a registry that is not there is a registry error naming the host.
    let e = image::ensure_image(&home, "127.0.0.1:1/x/y:z", &insecure(), &mut |_| {}).await.unwrap_err();
    assert!(matches!(e, Error::Registry(ref m) if m.contains("127.0.0.1:1")), "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_blob_in_registry_is_detected_and_not_stored() {
    let reg = Registry::start();
    let layers = test_layers();
    push_image(&reg, "team/app", "v1", &layers, test_config()).await;
    let victim = sha(&layers[1].blob);
    let data = reg.blob_data(&victim);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a; // same size, different content
    std::fs::write(&data, &bytes).unwrap();

    let home_dir = tempfile::tempdir().unwrap();
    let home = Home::at(home_dir.path());
    let e = image::ensure_image(&home, &format!("{}/team/app:v1", reg.host()), &insecure(), &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Registry(ref m) if m.contains(&victim) && m.contains("verification")), "{e:?}");
    let stored = home_dir.path().join("images/blobs/sha256").join(victim.strip_prefix("sha256:").unwrap());
    assert!(!stored.exists(), "a corrupt blob must not be stored");
    assert_eq!(std::fs::read_dir(home_dir.path().join("images/tmp")).unwrap().count(), 0, "no partial files left");
    assert_eq!(std::fs::read_dir(home_dir.path().join("images/roots")).unwrap().count(), 0);

    // A truncated blob (shorter than the manifest says) is caught the same way.
    std::fs::write(&data, &bytes[..mid]).unwrap();
    let e = image::ensure_image(&home, &format!("{}/team/app:v1", reg.host()), &insecure(), &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Registry(_)), "{e:?}");
    assert!(!stored.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_local_blob_is_discarded_and_refetched() {
    let reg = Registry::start();
    let layers = test_layers();
    push_image(&reg, "team/app", "v1", &layers, test_config()).await;
    let home_dir = tempfile::tempdir().unwrap();
    let home = Home::at(home_dir.path());
    let reference = format!("{}/team/app:v1", reg.host());
    let img = image::ensure_image(&home, &reference, &insecure(), &mut |_| {}).await.unwrap();

    // Lose the root and damage a stored layer (same length, one byte flipped).
    std::fs::remove_file(&img.root_disk).unwrap();
    let stored = home_dir.path().join("images/blobs/sha256").join(sha(&layers[0].blob).strip_prefix("sha256:").unwrap());
    let mut b = std::fs::read(&stored).unwrap();
    let n = b.len();
    b[n - 3] ^= 0xff;
    std::fs::write(&stored, &b).unwrap();

    // Offline (never): the damage is detected, the blob discarded, and the image reported missing.
    let never = PullOptions { policy: PullPolicy::Never, ..insecure() };
    let e = image::ensure_image(&home, &reference, &never, &mut |_| {}).await.unwrap_err();
    assert!(matches!(e, Error::ImageNotFound(_)), "{e:?}");
    assert!(!stored.exists());

    // if_missing re-fetches just that blob and rebuilds.
    let fetched: Arc<Mutex<Vec<String>>> = Default::default();
    let f = fetched.clone();
    let img2 = image::ensure_image(&home, &reference, &insecure(), &mut move |p: LayerProgress| {
        if p.done == 0 {
            f.lock().unwrap().push(p.digest)
        }
    })
    .await
    .unwrap();
    assert_eq!(*fetched.lock().unwrap(), vec![sha(&layers[0].blob)]);
    assert!(img2.root_disk.is_file());
    assert_eq!(std::fs::read(&stored).unwrap(), layers[0].blob);
}

#[tokio::test(flavor = "multi_thread")]
async fn index_selects_the_host_platform_or_names_the_offered_ones() {
    let reg = Registry::start();
    let md = push_image(&reg, "multi/app", "amd64-only", &test_layers(), test_config()).await;
    let size = {
        // Size of the pushed manifest: fetch it back raw.
        let r = oci_client::Reference::with_digest(reg.host(), "multi/app".into(), md.clone());
        let (bytes, _) = client()
            .pull_manifest_raw(&r, &oci_client::secrets::RegistryAuth::Anonymous, &["application/vnd.oci.image.manifest.v1+json"])
            .await
            .unwrap();
        bytes.len()
    };
    push_index(&reg, "multi/app", "all", &[("arm64", &md, size), ("amd64", &md, size)]).await;
    push_index(&reg, "multi/app", "foreign", &[("arm64", &md, size), ("s390x", &md, size)]).await;
    let home_dir = tempfile::tempdir().unwrap();
    let home = Home::at(home_dir.path());

    let img = image::ensure_image(&home, &format!("{}/multi/app:all", reg.host()), &insecure(), &mut |_| {}).await.unwrap();
    assert_eq!(img.manifest_digest, md);
    let rec = image::inspect(&home, &format!("{}/multi/app:all", reg.host())).unwrap();
    assert!(rec.index_digest.is_some());

    let e = image::ensure_image(&home, &format!("{}/multi/app:foreign", reg.host()), &insecure(), &mut |_| {})
        .await
        .unwrap_err();
    match &e {
        Error::PlatformNotFound(m) => assert!(m.contains("linux/arm64") && m.contains("linux/s390x") && m.contains("linux/amd64"), "{m}"),
        e => panic!("expected PlatformNotFound, got {e:?}"),
    }
    assert_eq!(e.code(), "platform-not-found");

    // Pull by digest.
    let img = image::ensure_image(&home, &format!("{}/multi/app@{md}", reg.host()), &insecure(), &mut |_| {}).await.unwrap();
    assert_eq!(img.manifest_digest, md);
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_layers_write_nothing_outside_the_store() {
    let reg = Registry::start();
    let nonce = format!("msb-evil-{}", std::process::id());
    let home_dir = tempfile::tempdir().unwrap();
    let home = Home::at(home_dir.path());
    let outside = tempfile::tempdir().unwrap();

    // `../` climbing out of the staging directory: refused.
    let dotdot = Tar::default().file(&format!("../{nonce}"), 0o644, 0, 0, b"x").file(&format!("../../{nonce}"), 0o644, 0, 0, b"x").finish();
    push_image(&reg, "evil/dotdot", "v1", &[layer(dotdot, Comp::Gzip)], serde_json::json!({})).await;
    let e = image::ensure_image(&home, &format!("{}/evil/dotdot:v1", reg.host()), &insecure(), &mut |_| {}).await.unwrap_err();
    assert!(matches!(e, Error::Filesystem(ref m) if m.contains("..")), "{e:?}");

    // Absolute entry names: refused.
    let abs = Tar::default().file(&format!("/tmp/{nonce}"), 0o644, 0, 0, b"x").finish();
    push_image(&reg, "evil/abs", "v1", &[layer(abs, Comp::Plain)], serde_json::json!({})).await;
    let e = image::ensure_image(&home, &format!("{}/evil/abs:v1", reg.host()), &insecure(), &mut |_| {}).await.unwrap_err();
    assert!(matches!(e, Error::Filesystem(_)), "{e:?}");

    // Symlinks to /etc and to a host directory, then writes through them (and a hardlink
    // through one, and a relative climb): they resolve inside the image root.
    let out = outside.path().to_str().unwrap().to_string();
    let through = Tar::default()
        .symlink("sneaky", "/etc")
        .file(&format!("sneaky/{nonce}"), 0o644, 0, 0, b"pwned")
        .symlink("host", &out)
        .file(&format!("host/{nonce}"), 0o644, 0, 0, b"pwned")
        .symlink("up", "../../../../../../../../..")
        .file(&format!("up/tmp/{nonce}"), 0o644, 0, 0, b"pwned")
        .hardlink(&format!("host/{nonce}-hl"), &format!("sneaky/{nonce}"))
        .finish();
    push_image(&reg, "evil/links", "v1", &[layer(through, Comp::Zstd)], serde_json::json!({})).await;
    let img = image::ensure_image(&home, &format!("{}/evil/links:v1", reg.host()), &insecure(), &mut |_| {}).await.unwrap();

    for p in [
        PathBuf::from("/etc").join(&nonce),
        PathBuf::from("/tmp").join(&nonce),
        outside.path().join(&nonce),
        outside.path().join(format!("{nonce}-hl")),
        home_dir.path().join(&nonce),
        home_dir.path().join("images").join(&nonce),
        home_dir.path().join("images/tmp").join(&nonce),
    ] {
        assert!(!p.exists(), "{} was written outside the image root", p.display());
    }
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    // Inside the image, the writes landed where the guest would see them.
    assert_eq!(cat(&img.root_disk, &format!("/etc/{nonce}")), "pwned");
    assert_eq!(cat(&img.root_disk, &format!("/tmp/{nonce}")), "pwned");
    assert_eq!(cat(&img.root_disk, &format!("{out}/{nonce}")), "pwned");
    assert!(stat(&img.root_disk, "/sneaky").contains("Type: symlink"));
    assert!(stat(&img.root_disk, "/etc").contains("Type: directory"));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pulls_both_succeed_and_store_once() {
    let reg = Registry::start();
    push_image(&reg, "team/app", "v1", &test_layers(), test_config()).await;
    let home_dir = tempfile::tempdir().unwrap();
    let reference = format!("{}/team/app:v1", reg.host());
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let home = Home::at(home_dir.path());
        let r = reference.clone();
        tasks.push(tokio::spawn(async move { image::ensure_image(&home, &r, &insecure(), &mut |_| {}).await }));
    }
    let mut roots = Vec::new();
    for t in tasks {
        roots.push(t.await.unwrap().expect("concurrent pull").root_disk);
    }
    assert!(roots.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(blob_count(home_dir.path()), 5);
    assert_eq!(std::fs::read_dir(home_dir.path().join("images/roots")).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(home_dir.path().join("images/tmp")).unwrap().count(), 0);
}

/// bcrypt of "s3cret" (cost 4), for the registry's htpasswd file.
const ALICE_HTPASSWD: &str = "alice:$2b$04$dA3IkrkhDQdS9OaV4jaoEOjlAlY7qIRZQ0ure1fkteJ1pFVJjsh2S";

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_extra_ca_and_basic_auth() {
    // A test CA and a server certificate for 127.0.0.1 signed by it.
    let certs = tempfile::tempdir().unwrap();
    let c = |f: &str| certs.path().join(f);
    std::fs::write(c("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
    let openssl = |args: Vec<std::ffi::OsString>| {
        let out = Command::new("openssl").args(args).output().expect("openssl is needed to make test certificates");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let os = |v: &[&dyn AsRef<std::ffi::OsStr>]| v.iter().map(|a| a.as_ref().to_os_string()).collect::<Vec<_>>();
    openssl(os(&[&"req", &"-x509", &"-newkey", &"rsa:2048", &"-nodes", &"-days", &"2", &"-subj", &"/CN=msb-test-ca", &"-keyout", &c("ca.key"), &"-out", &c("ca.pem")]));
    openssl(os(&[&"req", &"-newkey", &"rsa:2048", &"-nodes", &"-subj", &"/CN=127.0.0.1", &"-keyout", &c("key.pem"), &"-out", &c("leaf.csr")]));
    openssl(os(&[&"x509", &"-req", &"-days", &"2", &"-in", &c("leaf.csr"), &"-CA", &c("ca.pem"), &"-CAkey", &c("ca.key"), &"-CAcreateserial", &"-extfile", &c("ext.cnf"), &"-out", &c("cert.pem")]));
    let (c2, k2) = (c("cert.pem"), c("key.pem"));
    let reg = Registry::start_with(
        move |dir| {
            let htpasswd = dir.join("htpasswd");
            std::fs::write(&htpasswd, format!("{ALICE_HTPASSWD}\n")).unwrap();
            (
                format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", htpasswd.display()),
                format!("  tls:\n    certificate: {}\n    key: {}\n", c2.display(), k2.display()),
            )
        },
        true,
    );
    let pem = std::fs::read(c("ca.pem")).unwrap();
    let pusher = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Https,
        extra_root_certificates: vec![oci_client::client::Certificate {
            encoding: oci_client::client::CertificateEncoding::Pem,
            data: pem.clone(),
        }],
        ..Default::default()
    });
    let r = oci_client::Reference::with_tag(reg.host(), "private/app".into(), "v1".into());
    pusher
        .auth(&r, &oci_client::secrets::RegistryAuth::Basic("alice".into(), "s3cret".into()), oci_client::RegistryOperation::Push)
        .await
        .unwrap();
    let md = push_image_with(&pusher, &reg, "private/app", "v1", &test_layers(), test_config()).await;
    let reference = format!("{}/private/app:v1", reg.host());
    let home_dir = tempfile::tempdir().unwrap();
    let home = Home::at(home_dir.path());
    let no_docker_config = Some(home_dir.path().join("no-such-config.json"));

    // Untrusted certificate.
    let plain = PullOptions { docker_config: no_docker_config.clone(), ..Default::default() };
    let e = image::ensure_image(&home, &reference, &plain, &mut |_| {}).await.unwrap_err();
    assert!(matches!(e, Error::Registry(_)), "{e:?}");

    // Trusted, but anonymous / wrong password.
    let trusted = PullOptions { ca_certs: vec![pem.clone()], docker_config: no_docker_config.clone(), ..Default::default() };
    let e = image::ensure_image(&home, &reference, &trusted, &mut |_| {}).await.unwrap_err();
    assert!(matches!(e, Error::Auth(_)), "{e:?}");
    assert_eq!(e.code(), "registry-auth-failed");
    let wrong = PullOptions {
        auth: Some(image::RegistryCredentials { username: "alice".into(), password: "nope".into() }),
        ..trusted.clone()
    };
    assert!(matches!(image::ensure_image(&home, &reference, &wrong, &mut |_| {}).await, Err(Error::Auth(_))));

    // registry_auth.
    let good = PullOptions {
        auth: Some(image::RegistryCredentials { username: "alice".into(), password: "s3cret".into() }),
        ..trusted.clone()
    };
    let img = image::ensure_image(&home, &reference, &good, &mut |_| {}).await.expect("pull with registry_auth");
    assert_eq!(img.manifest_digest, md);

    // ~/.docker/config.json credentials (a fresh home, so it really pulls).
    use base64::Engine;
    let cfg = home_dir.path().join("docker-config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(&cfg, format!(r#"{{"auths":{{"https://{}":{{"auth":"{auth}"}}}}}}"#, reg.host())).unwrap();
    let home2_dir = tempfile::tempdir().unwrap();
    let via_config = PullOptions { docker_config: Some(cfg), ..trusted.clone() };
    let img = image::ensure_image(&Home::at(home2_dir.path()), &reference, &via_config, &mut |_| {})
        .await
        .expect("pull with docker config.json credentials");
    assert_eq!(img.manifest_digest, md);
}
