//! Talking to registries (through oci-client): authentication, manifest resolution with
//! platform selection, and verified blob downloads into the [`Store`].
//!
//! Invariants:
//! - every manifest is hashed here and must match the digest asked for (when pulling by
//!   digest) — it is stored under the digest of its exact bytes;
//! - blobs stream to `tmp/` in chunks (never whole in memory), are hashed and size-checked
//!   on the way, and only a matching blob is renamed into the store; a mismatch (or a
//!   broken stream) is retried once, then reported as [`Error::Registry`];
//! - only one process downloads a given blob at a time (`blob-<hex>` lock); others wait and
//!   then find it stored.

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::Client;

use super::config::{Descriptor, ManifestDoc, Manifest, Platform, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST};
use super::reference::ImageRef;
use super::store::{digest_hex, sha256_digest, BlobError, Store};
use super::{LayerProgress, PullOptions};
use crate::error::{Error, Result};

/// Chunks between progress callbacks are coalesced to at least this many bytes.
const PROGRESS_STEP: u64 = 256 << 10;
/// Largest manifest / index / config accepted (they are held in memory).
pub(crate) const MAX_JSON_BLOB: u64 = 8 << 20;

/// The platform this host runs (`linux/amd64` on x86_64).
pub fn host_platform() -> Platform {
    let (arch, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "x86" => ("386", None),
        "arm" => ("arm", Some("v7")),
        "powerpc64" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        other => (other, None),
    };
    Platform { architecture: arch.into(), os: "linux".into(), variant: variant.map(Into::into) }
}

/// Picks the index entry for `want` (a missing variant matches, as `arm64` ≈ `arm64/v8`).
pub fn select_platform<'a>(entries: &'a [Descriptor], want: &Platform) -> Option<&'a Descriptor> {
    let matches = |p: &Platform| p.os == want.os && p.architecture == want.architecture;
    let exact = entries.iter().find(|d| d.platform.as_ref().is_some_and(|p| matches(p) && p.variant == want.variant));
    exact.or_else(|| {
        entries.iter().find(|d| {
            d.platform.as_ref().is_some_and(|p| matches(p) && (p.variant.is_none() || want.variant.is_none()))
        })
    })
}

/// Offered platforms, for the error message (attestation entries `unknown/unknown` left out).
fn offered(entries: &[Descriptor]) -> String {
    let v: Vec<String> = entries
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .filter(|p| p.os != "unknown")
        .map(|p| p.to_string())
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Credentials from `~/.docker/config.json` (or `$DOCKER_CONFIG/config.json`, or `path`):
/// `auths.<registry>.auth` (base64 `user:pass`) / `username`+`password`, or a
/// `credHelpers` / `credsStore` helper (`docker-credential-<name> get`).
pub fn docker_config_credentials(registry: &str, path: Option<&Path>) -> Option<(String, String)> {
    let path: PathBuf = match path {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
            Some(d) => Path::new(&d).join("config.json"),
            None => Path::new(&std::env::var_os("HOME")?).join(".docker/config.json"),
        },
    };
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let hub = registry == super::reference::DOCKER_HUB;
    let norm = |k: &str| -> String {
        let k = k.trim_start_matches("https://").trim_start_matches("http://");
        let host = k.split('/').next().unwrap_or(k);
        match host {
            "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
            h => h.to_string(),
        }
    };
    if let Some(auths) = cfg.get("auths").and_then(|a| a.as_object()) {
        for (k, v) in auths {
            if norm(k) != registry {
                continue;
            }
            if let Some(a) = v.get("auth").and_then(|a| a.as_str()).filter(|a| !a.is_empty()) {
                use base64::Engine;
                let raw = base64::engine::general_purpose::STANDARD.decode(a.trim()).ok()?;
                let s = String::from_utf8(raw).ok()?;
                let (u, p) = s.split_once(':')?;
                return Some((u.to_string(), p.to_string()));
            }
            if let (Some(u), Some(p)) = (v.get("username").and_then(|x| x.as_str()), v.get("password").and_then(|x| x.as_str())) {
                return Some((u.to_string(), p.to_string()));
            }
        }
    }
    let helper = cfg
        .get("credHelpers")
        .and_then(|h| h.as_object())
        .and_then(|h| h.iter().find(|(k, _)| norm(k) == registry).and_then(|(_, v)| v.as_str().map(String::from)))
        .or_else(|| cfg.get("credsStore").and_then(|s| s.as_str()).map(String::from))?;
    let server = if hub { "https://index.docker.io/v1/".to_string() } else { registry.to_string() };
    credential_helper(&helper, &server)
}

fn credential_helper(helper: &str, server: &str) -> Option<(String, String)> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    if !helper.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return None;
    }
    let mut child = Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(server.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let user = v.get("Username")?.as_str()?.to_string();
    let secret = v.get("Secret")?.as_str()?.to_string();
    // "<token>" means an identity (refresh) token, which oci-client cannot exchange.
    (user != "<token>").then_some((user, secret))
}

/// Maps oci-client errors onto engine errors, naming the image.
fn map_err(image: &ImageRef, what: &str, e: OciDistributionError) -> Error {
    use OciDistributionError as E;
    let img = image.to_string();
    match e {
        E::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let text = envelope.errors.iter().map(|e| format!("{:?}: {}", e.code, e.message)).collect::<Vec<_>>().join("; ");
            if codes.iter().any(|c| matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound | OciErrorCode::BlobUnknown)) {
                Error::ImageNotFound(format!("image {img} was not found in its registry ({what}: {text})"))
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                Error::Auth(format!(
                    "the registry denied access to {img} ({text}); the repository may not exist, or it needs registry_auth / docker login credentials"
                ))
            } else {
                Error::Registry(format!("the registry refused {what} for {img}: {text}"))
            }
        }
        E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => Error::Auth(format!(
            "the registry denied access to {img} ({what}): {e}; the repository may not exist, or it needs registry_auth / docker login credentials"
        )),
        E::ServerError { code: 404, .. } | E::ImageManifestNotFoundError(_) => {
            Error::ImageNotFound(format!("image {img} was not found in its registry ({what}): {e}"))
        }
        E::ServerError { code: 401 | 403, .. } => Error::Auth(format!("the registry denied access to {img} ({what}): {e}")),
        E::RequestError(re) => Error::Registry(format!(
            "cannot reach the registry {} for {img} ({what}): {re}{}",
            image.api_host(),
            if re.is_connect() { "; check the host name, the network, and registry_insecure for plain-HTTP registries" } else { "" }
        )),
        e => Error::Registry(format!("{what} for {img} failed: {e}")),
    }
}

/// A resolved platform manifest.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub manifest_digest: String,
    pub manifest: Manifest,
    pub index_digest: Option<String>,
    pub platform: Platform,
}

/// A connection to the registry of one image.
pub struct Remote {
    client: Client,
    auth: RegistryAuth,
    image: ImageRef,
}

impl Remote {
    pub fn new(image: &ImageRef, opts: &PullOptions) -> Result<Remote> {
        let mut cfg = ClientConfig {
            protocol: if opts.insecure { ClientProtocol::Http } else { ClientProtocol::Https },
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(30)),
            read_timeout: Some(std::time::Duration::from_secs(120)),
            ..Default::default()
        };
        for pem in &opts.ca_certs {
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(Error::InvalidConfig("registry_ca_certs entries must be PEM certificates".into()));
            }
            cfg.extra_root_certificates.push(Certificate { encoding: CertificateEncoding::Pem, data: pem.clone() });
        }
        let auth = match &opts.auth {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => match docker_config_credentials(&image.registry, opts.docker_config.as_deref()) {
                Some((u, p)) => RegistryAuth::Basic(u, p),
                None => RegistryAuth::Anonymous,
            },
        };
        Ok(Remote { client: Client::new(cfg), auth, image: image.clone() })
    }

    const ACCEPT: [&'static str; 4] = [MT_OCI_INDEX, MT_DOCKER_LIST, MT_OCI_MANIFEST, MT_DOCKER_MANIFEST];

    /// Fetches a manifest or index, verifies it against a pinned digest, stores it as a blob.
    async fn fetch_manifest(&self, store: &Store, target: &ImageRef) -> Result<(ManifestDoc, String)> {
        let (bytes, _header_digest) = self
            .client
            .pull_manifest_raw(&target.to_oci(), &self.auth, &Self::ACCEPT)
            .await
            .map_err(|e| map_err(target, "fetching the manifest", e))?;
        if bytes.len() as u64 > MAX_JSON_BLOB {
            return Err(Error::Registry(format!("the manifest of {target} is larger than {MAX_JSON_BLOB} bytes")));
        }
        let digest = sha256_digest(&bytes);
        if let Some(want) = &target.digest {
            if &digest != want {
                return Err(Error::Registry(format!("the registry sent a manifest for {target} that hashes to {digest}")));
            }
        }
        let doc = ManifestDoc::parse(&bytes, None)?;
        store.write_blob(&digest, &bytes)?;
        Ok((doc, digest))
    }

    /// Resolves the image reference to the manifest for `platform`.
    pub async fn resolve(&self, store: &Store, platform: &Platform) -> Result<Resolved> {
        let (mut doc, mut digest) = self.fetch_manifest(store, &self.image).await?;
        let mut index_digest = None;
        let mut chosen = None;
        for _ in 0..2 {
            match doc {
                ManifestDoc::Image(manifest) => {
                    return Ok(Resolved {
                        manifest_digest: digest,
                        manifest,
                        index_digest,
                        platform: chosen.unwrap_or_else(|| platform.clone()),
                    })
                }
                ManifestDoc::Index(index) => {
                    let entry = select_platform(&index.manifests, platform).ok_or_else(|| {
                        Error::PlatformNotFound(format!(
                            "image {} has no {platform} variant; it offers: {}",
                            self.image,
                            offered(&index.manifests)
                        ))
                    })?;
                    digest_hex(&entry.digest)?;
                    chosen = entry.platform.clone();
                    index_digest.get_or_insert(digest);
                    let (d2, dg2) = self.fetch_manifest(store, &self.image.with_digest(&entry.digest)).await?;
                    doc = d2;
                    digest = dg2;
                }
            }
        }
        Err(Error::Registry(format!("image {}: image indexes nest too deeply", self.image)))
    }

    /// Downloads blob `desc` into the store unless present, reporting progress. Retries once
    /// on a digest/size mismatch or a broken stream.
    pub async fn fetch_blob(
        &self,
        store: &Store,
        desc: &Descriptor,
        progress: &mut (dyn FnMut(LayerProgress) + Send),
    ) -> Result<()> {
        let hex = digest_hex(&desc.digest)?;
        if store.has_blob(&desc.digest) {
            progress(LayerProgress { digest: desc.digest.clone(), done: desc.size, total: desc.size });
            return Ok(());
        }
        let _lock = store.lock_async(format!("blob-{hex}"), true).await?;
        if store.has_blob(&desc.digest) {
            progress(LayerProgress { digest: desc.digest.clone(), done: desc.size, total: desc.size });
            return Ok(());
        }
        let mut last_err = String::new();
        for _attempt in 0..2 {
            match self.fetch_blob_once(store, desc, progress).await {
                Ok(()) => return Ok(()),
                Err(BlobError::Mismatch { expected, actual }) => {
                    last_err = format!("expected {expected}, got {actual}");
                }
                Err(BlobError::Other(e @ (Error::ImageNotFound(_) | Error::Auth(_) | Error::Io { .. }))) => return Err(e),
                Err(BlobError::Other(e)) => last_err = e.to_string(),
            }
        }
        Err(Error::Registry(format!(
            "blob {} of {} failed verification twice and was discarded ({last_err}); the registry's copy is corrupt or the connection is unreliable",
            desc.digest, self.image
        )))
    }

    async fn fetch_blob_once(
        &self,
        store: &Store,
        desc: &Descriptor,
        progress: &mut (dyn FnMut(LayerProgress) + Send),
    ) -> std::result::Result<(), BlobError> {
        let size = (desc.size > 0).then_some(desc.size);
        let mut w = store.blob_writer(&desc.digest, size).map_err(BlobError::Other)?;
        let mut stream = self
            .client
            .pull_blob_stream(&self.image.to_oci(), desc.digest.as_str())
            .await
            .map_err(|e| BlobError::Other(map_err(&self.image, &format!("fetching blob {}", desc.digest), e)))?;
        let total = if desc.size > 0 { desc.size } else { stream.content_length.unwrap_or(0) };
        let mut reported = 0u64;
        progress(LayerProgress { digest: desc.digest.clone(), done: 0, total });
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    w.write_chunk(&bytes)?;
                    if w.written() - reported >= PROGRESS_STEP {
                        reported = w.written();
                        progress(LayerProgress { digest: desc.digest.clone(), done: reported, total });
                    }
                }
                // oci-client's own verifying stream reports a mismatch at the end; our hash
                // below says the same, more precisely. Other stream errors: a broken transfer.
                Err(e) => {
                    if w.written() < desc.size || desc.size == 0 {
                        return Err(BlobError::Other(Error::Registry(format!("download of {} broke: {e}", desc.digest))));
                    }
                    break;
                }
            }
        }
        let done = w.written();
        w.finish()?;
        progress(LayerProgress { digest: desc.digest.clone(), done, total: total.max(done) });
        Ok(())
    }

    /// Fetches a small JSON blob (the config) and returns its bytes.
    pub async fn fetch_json_blob(&self, store: &Store, desc: &Descriptor) -> Result<Vec<u8>> {
        if desc.size > MAX_JSON_BLOB {
            return Err(Error::Registry(format!("the image config of {} is larger than {MAX_JSON_BLOB} bytes", self.image)));
        }
        let mut quiet = |_: LayerProgress| {};
        self.fetch_blob(store, desc, &mut quiet).await?;
        store
            .read_blob_verified(&desc.digest)?
            .ok_or_else(|| Error::Registry(format!("blob {} vanished from the store", desc.digest)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(os: &str, arch: &str, variant: Option<&str>, d: &str) -> Descriptor {
        Descriptor {
            media_type: MT_OCI_MANIFEST.into(),
            digest: d.into(),
            size: 1,
            platform: Some(Platform { os: os.into(), architecture: arch.into(), variant: variant.map(Into::into) }),
        }
    }

    #[test]
    fn platform_selection() {
        let idx = vec![
            entry("linux", "arm", Some("v7"), "a"),
            entry("linux", "arm64", None, "b"),
            entry("linux", "amd64", None, "c"),
            entry("unknown", "unknown", None, "att"),
        ];
        let amd = Platform { os: "linux".into(), architecture: "amd64".into(), variant: None };
        assert_eq!(select_platform(&idx, &amd).unwrap().digest, "c");
        let arm = Platform { os: "linux".into(), architecture: "arm64".into(), variant: Some("v8".into()) };
        assert_eq!(select_platform(&idx, &arm).unwrap().digest, "b");
        let s390 = Platform { os: "linux".into(), architecture: "s390x".into(), variant: None };
        assert!(select_platform(&idx, &s390).is_none());
        assert_eq!(offered(&idx), "linux/arm/v7, linux/arm64, linux/amd64");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(host_platform().to_string(), "linux/amd64");
        }
    }

    #[test]
    fn docker_config_json_credentials() {
        use base64::Engine;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("config.json");
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &p,
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{b64}"}},"reg.example:5000":{{"username":"bob","password":"pw"}}}}}}"#),
        )
        .unwrap();
        assert_eq!(docker_config_credentials("docker.io", Some(&p)), Some(("alice".into(), "s3cr:et".into())));
        assert_eq!(docker_config_credentials("reg.example:5000", Some(&p)), Some(("bob".into(), "pw".into())));
        assert_eq!(docker_config_credentials("other.example", Some(&p)), None);
    }
}
