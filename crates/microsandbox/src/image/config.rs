//! The parts of an OCI image config a sandbox applies, and the manifest/index JSON shapes
//! the puller reads.
//!
//! Only fields we use are modelled; unknown fields are ignored, so newer images parse.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// A content descriptor (manifest config, layer, or index entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

/// `os/architecture[/variant]` of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image manifest (OCI or Docker schema 2).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// A parsed manifest document.
#[derive(Debug, Clone)]
pub enum ManifestDoc {
    Image(Manifest),
    Index(Index),
}

impl ManifestDoc {
    /// Parses a manifest or index; `content_type` is the HTTP header, if any.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ManifestDoc> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            #[serde(default)]
            media_type: Option<String>,
            #[serde(default)]
            manifests: Option<serde_json::Value>,
            #[serde(default)]
            schema_version: Option<u32>,
        }
        let bad = |e: String| Error::Registry(format!("the registry sent a manifest that is not valid: {e}"));
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if probe.schema_version != Some(2) {
            return Err(bad(format!(
                "schemaVersion {:?} (only schema 2 / OCI manifests are supported)",
                probe.schema_version
            )));
        }
        let mt = probe.media_type.as_deref().or(content_type).unwrap_or("");
        let is_index = mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST || (mt.is_empty() && probe.manifests.is_some());
        if is_index {
            Ok(ManifestDoc::Index(serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?))
        } else {
            let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
            Ok(ManifestDoc::Image(m))
        }
    }
}

/// The image config blob (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// What a sandbox applies from the image: environment, command, working directory, user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` pairs split at the first `=`, in image order.
    pub env: Vec<(String, String)>,
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    /// Absolute path, or None when the image does not set one.
    pub working_dir: Option<String>,
    /// `user[:group]` as written in the image (names or numbers), None when unset.
    pub user: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub architecture: String,
    pub os: String,
}

impl ImageConfig {
    /// Parses a config blob.
    pub fn from_json(bytes: &[u8]) -> Result<ImageConfig> {
        let f: ConfigFile = serde_json::from_slice(bytes)
            .map_err(|e| Error::Registry(format!("the image config is not valid JSON: {e}")))?;
        Ok(ImageConfig::from_file(&f))
    }

    pub fn from_file(f: &ConfigFile) -> ImageConfig {
        let rc = f.config.clone().unwrap_or_default();
        let env = rc
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv, String::new()),
            })
            .collect();
        ImageConfig {
            env,
            entrypoint: rc.entrypoint.filter(|v| !v.is_empty()),
            cmd: rc.cmd.filter(|v| !v.is_empty()),
            working_dir: rc.working_dir.filter(|w| !w.is_empty()),
            user: rc.user.filter(|u| !u.is_empty()),
            labels: rc.labels.unwrap_or_default(),
            architecture: f.architecture.clone(),
            os: f.os.clone(),
        }
    }

    /// The argv the image runs by default: Entrypoint followed by Cmd (Docker semantics).
    pub fn default_command(&self) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        argv.extend(self.cmd.clone().unwrap_or_default());
        argv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields_are_extracted() {
        let json = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin:/bin","EMPTY=","A=b=c"],
            "Entrypoint":["/bin/tini","--"],"Cmd":["sh"],"WorkingDir":"/srv","User":"1000:1000","Labels":{"x":"y"}},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let c = ImageConfig::from_json(json).unwrap();
        assert_eq!(c.env[0], ("PATH".into(), "/usr/bin:/bin".into()));
        assert_eq!(c.env[1], ("EMPTY".into(), "".into()));
        assert_eq!(c.env[2], ("A".into(), "b=c".into()));
        assert_eq!(c.default_command(), ["/bin/tini", "--", "sh"]);
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        let bare = ImageConfig::from_json(br#"{"config":{"WorkingDir":"","User":""}}"#).unwrap();
        assert_eq!((bare.working_dir, bare.user), (None, None));
    }

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:a","size":1},"layers":[]}"#;
        assert!(matches!(ManifestDoc::parse(m, Some(MT_OCI_MANIFEST)).unwrap(), ManifestDoc::Image(_)));
        let i = br#"{"schemaVersion":2,"manifests":[{"digest":"sha256:a","size":1,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#;
        match ManifestDoc::parse(i, None).unwrap() {
            ManifestDoc::Index(ix) => assert_eq!(ix.manifests[0].platform.as_ref().unwrap().to_string(), "linux/arm64/v8"),
            _ => panic!("expected an index"),
        }
        assert!(ManifestDoc::parse(br#"{"schemaVersion":1}"#, None).is_err());
    }
}
