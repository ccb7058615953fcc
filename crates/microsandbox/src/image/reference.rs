//! Image references, parsed with Docker's rules.
//!
//! Invariants of a parsed [`ImageRef`]:
//! - `registry` is a host (optionally `:port`), never empty; Docker Hub is spelled `docker.io`
//!   (`index.docker.io` and `registry-1.docker.io` are folded into it);
//! - `repository` is lower-case path components; single-component Docker Hub names get
//!   the `library/` prefix;
//! - at least one of `tag` / `digest` is set (`latest` when neither was given);
//! - `digest`, when set, is `sha256:` + 64 lower-case hex digits.

use std::fmt;

use crate::error::{Error, Result};

/// The registry name Docker Hub references use.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `[registry/]repo[:tag][@sha256:hex]`.
    pub fn parse(input: &str) -> Result<ImageRef> {
        let bad = |why: &str| Error::InvalidConfig(format!("invalid image reference {input:?}: {why}"));
        let s = input.trim();
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.len() > 4096 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains whitespace or control characters"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(parse_digest(d).map_err(|w| bad(&w))?)),
            None => (s, None),
        };
        // A tag is what follows the last ':' if no '/' comes after it.
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if !name_tag[i + 1..].contains('/') => (&name_tag[..i], Some(&name_tag[i + 1..])),
            _ => (name_tag, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return Err(bad("the tag must be 1-128 characters of [A-Za-z0-9_.-] not starting with '.' or '-'"));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry.is_empty()
            || !registry.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(bad("the registry host is not valid"));
        }
        let registry = match registry.as_str() {
            "index.docker.io" | DOCKER_HUB_API => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if path.is_empty() {
            return Err(bad("the repository name is missing"));
        }
        for comp in path.split('/') {
            if !valid_component(comp) {
                return Err(bad(
                    "repository components must be lower-case letters and digits separated by '.', '_', '__' or '-'",
                ));
            }
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') { format!("library/{path}") } else { path };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(ImageRef { registry, repository, tag, digest })
    }

    /// The host to talk to for the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The same repository pinned to `digest`.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef { digest: Some(digest.to_string()), ..self.clone() }
    }

    /// What to ask the registry for: the digest when known, else the tag.
    pub fn manifest_target(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or("latest")
    }

    /// The oci-client form (it maps `docker.io` to the API host itself).
    pub fn to_oci(&self) -> oci_client::Reference {
        match (&self.tag, &self.digest) {
            (_, Some(d)) => oci_client::Reference::with_digest(self.registry.clone(), self.repository.clone(), d.clone()),
            (Some(t), None) => oci_client::Reference::with_tag(self.registry.clone(), self.repository.clone(), t.clone()),
            (None, None) => {
                oci_client::Reference::with_tag(self.registry.clone(), self.repository.clone(), "latest".into())
            }
        }
    }
}

impl fmt::Display for ImageRef {
    /// Canonical form: `registry/repository[:tag][@digest]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// `[a-z0-9]+` runs separated by `.`, `_`, `__` or `-`+ (Docker's path-component rule).
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or one or more '-'.
        let start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok || start == i {
            return false;
        }
    }
    true
}

/// Validates `sha256:<64 hex>` and returns it lower-cased.
pub fn parse_digest(d: &str) -> std::result::Result<String, String> {
    let Some(hex) = d.strip_prefix("sha256:") else {
        return Err(format!("digest {d:?} is not a sha256 digest (sha256:<64 hex digits>)"));
    };
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("digest {d:?} must be sha256: followed by 64 hex digits"));
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn p(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn short_names_go_to_docker_hub_library() {
        let r = p("alpine");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(p("alpine:3.19").to_string(), "docker.io/library/alpine:3.19");
        assert_eq!(p("bitnami/redis").to_string(), "docker.io/bitnami/redis:latest");
        assert_eq!(p("docker.io/alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(p("index.docker.io/library/alpine").to_string(), "docker.io/library/alpine:latest");
    }

    #[test]
    fn registries_ports_and_digests() {
        let r = p("registry.example.com/team/app:tag");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), ("registry.example.com", "team/app", Some("tag")));
        let r = p("localhost:5000/app");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()), ("localhost:5000", "app", Some("latest")));
        let r = p(&format!("127.0.0.1:5000/a/b@{D}"));
        assert_eq!((r.tag.as_deref(), r.digest.as_deref()), (None, Some(D)));
        assert_eq!(r.manifest_target(), D);
        let r = p(&format!("quay.io/x/y:v1@{}", D.to_uppercase().replace("SHA256", "sha256")));
        assert_eq!((r.tag.as_deref(), r.digest.as_deref()), (Some("v1"), Some(D)));
        assert_eq!(r.manifest_target(), D);
        // "localhost" alone is a repository name, not a registry.
        assert_eq!(p("localhost").to_string(), "docker.io/library/localhost:latest");
        assert_eq!(p("my_org/my-app__x.y").repository, "my_org/my-app__x.y");
    }

    #[test]
    fn invalid_references_are_rejected() {
        for bad in [
            "", "Alpine", "alpine:", "alpine:-x", "alpine@sha256:abc", "alpine@md5:0123", "a b", "/alpine",
            "alpine/", "a//b", "reg.io/", "_a", "a..b", "a___b",
        ] {
            assert!(matches!(ImageRef::parse(bad), Err(Error::InvalidConfig(_))), "{bad:?} should be rejected");
        }
    }
}
