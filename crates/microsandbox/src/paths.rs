//! Where the engine keeps its files: `~/.microsandbox` unless `MICROSANDBOX_HOME` says otherwise.
//!
//! ```text
//! <home>/runtime/     guest kernel, initramfs (agent + modules), manifest.json
//! <home>/bin/msb      the supervisor binary copied from the gem
//! <home>/cache/       downloaded kernel packages
//! <home>/sandboxes/<name>/  one directory per live sandbox (root disk, logs, config)
//! <home>/run/         unix sockets, named by a short hash so paths stay under 108 bytes
//! ```

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The resolved engine home directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `explicit`, else `$MICROSANDBOX_HOME`, else `$HOME/.microsandbox`.
    pub fn resolve(explicit: Option<&Path>) -> Result<Home> {
        if let Some(p) = explicit {
            return Ok(Home::at(p));
        }
        if let Some(p) = std::env::var_os("MICROSANDBOX_HOME").filter(|v| !v.is_empty()) {
            return Ok(Home::at(Path::new(&p)));
        }
        let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).ok_or_else(|| {
            Error::Runtime("neither MICROSANDBOX_HOME nor HOME is set; set MICROSANDBOX_HOME to a writable directory".into())
        })?;
        Ok(Home::at(&Path::new(&home).join(".microsandbox")))
    }

    /// A home at exactly `root` (made absolute against the current directory).
    pub fn at(root: &Path) -> Home {
        let root = if root.is_absolute() {
            root.to_path_buf()
        } else {
            std::env::current_dir().map(|d| d.join(root)).unwrap_or_else(|_| root.to_path_buf())
        };
        Home { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn runtime_dir(&self) -> PathBuf {
        self.root.join("runtime")
    }
    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.root.join("sandboxes")
    }
    /// Directory of sandbox `name`. A name made of `[A-Za-z0-9_.-]` (at most 63, starting
    /// alphanumeric) is used as is; any other valid name (spaces, non-ASCII, up to 128
    /// bytes: see `config::validate_name`) becomes `_<sha256 hex>`, which such a plain name
    /// can never be, so a name never reaches the file system as a path.
    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        if is_plain_name(name) {
            self.sandboxes_dir().join(name)
        } else {
            self.sandboxes_dir().join(format!("_{}", hex::encode(Sha256::digest(name.as_bytes()))))
        }
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    /// Installed supervisor binary.
    pub fn supervisor_path(&self) -> PathBuf {
        self.bin_dir().join("msb")
    }

    /// Socket path for `name`'s `suffix` socket (`agent` or `ctl`); errors when the home is
    /// so deep that the path would not fit a unix socket address.
    pub fn socket_path(&self, name: &str, suffix: &str) -> Result<PathBuf> {
        let digest = Sha256::digest(name.as_bytes());
        let short = hex::encode(&digest[..8]);
        let path = self.run_dir().join(format!("{short}.{suffix}"));
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::InvalidConfig(format!(
                "the microsandbox home {} is too deep for unix sockets ({} bytes, max {MAX_SOCKET_PATH}); set MICROSANDBOX_HOME to a shorter path",
                self.root.display(),
                path.as_os_str().len()
            )));
        }
        Ok(path)
    }
}

/// File in a sandbox directory holding the sandbox's name (the directory's own name is a
/// hash for names that are not plain).
pub const SANDBOX_NAME_FILE: &str = "name";

/// The sandbox name behind a directory of `<home>/sandboxes`: the directory name for a
/// plain name, else the name recorded in it (None when that is missing or invalid).
pub fn sandbox_name_of(dir: &Path) -> Option<String> {
    let leaf = dir.file_name()?.to_str()?;
    if is_plain_name(leaf) {
        return Some(leaf.to_string());
    }
    let mut buf = Vec::new();
    use std::io::Read;
    std::fs::File::open(dir.join(SANDBOX_NAME_FILE)).ok()?.take(512).read_to_end(&mut buf).ok()?;
    let name = String::from_utf8(buf).ok()?;
    (crate::sandbox::config::validate_name(&name).is_ok()
        && Home::at(dir.parent()?.parent()?).sandbox_dir(&name) == dir)
        .then_some(name)
}

/// A name that is safe as a single path component on every file system: 1-63 of
/// `[A-Za-z0-9_.-]`, starting alphanumeric (so never ".", ".." or hidden).
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_dirs_keep_plain_names_and_hash_the_rest() {
        let h = Home::at(Path::new("/h"));
        assert_eq!(h.sandbox_dir("web-1.a_b"), Path::new("/h/sandboxes/web-1.a_b"));
        for odd in ["my box", "../../etc", "é", ".hidden", "a/b", &"n".repeat(64)] {
            let d = h.sandbox_dir(odd);
            assert_eq!(d.parent(), Some(Path::new("/h/sandboxes")), "{odd}");
            let leaf = d.file_name().unwrap().to_str().unwrap();
            assert!(leaf.starts_with('_') && leaf.len() == 65, "{odd} -> {leaf}");
        }
        assert_ne!(h.sandbox_dir("a b"), h.sandbox_dir("a  b"));
    }

    #[test]
    fn socket_paths_are_short_and_distinct() {
        let h = Home::at(Path::new("/h"));
        let a = h.socket_path("a", "ctl").unwrap();
        let b = h.socket_path("b", "ctl").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("/h/run"));
    }

    #[test]
    fn too_deep_home_is_rejected() {
        let deep = format!("/{}", "x".repeat(120));
        let h = Home::at(Path::new(&deep));
        assert!(matches!(h.socket_path("a", "ctl"), Err(Error::InvalidConfig(_))));
    }
}
