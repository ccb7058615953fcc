//! Root filesystem patches and scripts: changes made to a new sandbox's root before
//! `create` returns and before its main process starts.
//!
//! The engine validates them (guest paths, modes, host sources, sizes) and turns scripts
//! and patches into one ordered list of [`PatchStep`]s; the supervisor applies that list
//! through the agent's filesystem operations right after the guest is ready. They are
//! applied once, at create: the copy-on-write root keeps them, so `start` does not re-apply.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::config::{validate_guest_path, MAX_GUEST_PATH};
use crate::error::{Error, Result};

/// Guest directory holding the `scripts:` (appended to PATH).
pub const SCRIPTS_DIR: &str = "/.msb/scripts";
/// Longest script name (a file name: NAME_MAX).
pub const MAX_SCRIPT_NAME: usize = 255;
/// Total inline bytes (script sources, text and append contents) one create may carry.
pub const MAX_INLINE_BYTES: usize = 64 << 20;
/// Name of the file (in the sandbox directory) that hands the steps to the supervisor,
/// which deletes it once read.
pub const PATCHES_FILE: &str = "patches.json";

/// Bytes carried as base64 in JSON (Ruby strings are binary-safe; JSON strings are not).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use base64::Engine;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use base64::Engine;
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(Bytes)
            .map_err(|e| serde::de::Error::custom(format!("content is not valid base64: {e}")))
    }
}

/// One change to the root filesystem. Guest paths are absolute; new files and
/// directories belong to root. Without `replace`, the patches that write a path (text,
/// copy_file, symlink, and each file or symlink of copy_dir) fail with EEXIST when that
/// path already exists; directories are merged into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Patch {
    /// Create or replace a file with `content` (mode default 0644); missing parent
    /// directories are created.
    Text {
        path: String,
        content: Bytes,
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        replace: bool,
    },
    /// Create a directory and its missing parents (mode default 0755); an existing
    /// directory gets the mode.
    Mkdir {
        path: String,
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Append `content` to an existing file.
    Append { path: String, content: Bytes },
    /// Copy a host file into the guest (mode default: the host file's permission bits).
    CopyFile {
        src: PathBuf,
        dst: String,
        #[serde(default)]
        mode: Option<u32>,
        #[serde(default)]
        replace: bool,
    },
    /// Copy a host directory tree into the guest directory `dst` (created, or merged into):
    /// directories, regular files and symlinks with their permission bits.
    CopyDir {
        src: PathBuf,
        dst: String,
        #[serde(default)]
        replace: bool,
    },
    /// Create the symlink `link` → `target` (with `replace`, replacing a file or symlink at
    /// `link`; never a directory).
    Symlink {
        target: String,
        link: String,
        #[serde(default)]
        replace: bool,
    },
    /// Remove a path, recursively; a missing path is fine.
    Remove { path: String },
}

impl Patch {
    /// `kind path`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Patch::Text { path, .. } => format!("text {path}"),
            Patch::Mkdir { path, .. } => format!("mkdir {path}"),
            Patch::Append { path, .. } => format!("append {path}"),
            Patch::CopyFile { src, dst, .. } => format!("copy_file {} -> {dst}", src.display()),
            Patch::CopyDir { src, dst, .. } => format!("copy_dir {} -> {dst}", src.display()),
            Patch::Symlink { target, link, .. } => format!("symlink {link} -> {target}"),
            Patch::Remove { path } => format!("remove {path}"),
        }
    }

    /// Inline bytes carried by this patch.
    fn inline_len(&self) -> usize {
        match self {
            Patch::Text { content, .. } | Patch::Append { content, .. } => content.0.len(),
            _ => 0,
        }
    }

    /// Checks paths, modes and host sources; errors name the patch.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Error::InvalidConfig(format!("patch {}: {why}", self.describe()));
        let guest = |what: &str, p: &str, root_ok: bool| -> Result<()> {
            validate_guest_path(what, p).map_err(|e| bad(e.to_string()))?;
            if p.len() > MAX_GUEST_PATH {
                return Err(bad(format!("{what} is longer than {MAX_GUEST_PATH} bytes")));
            }
            if !root_ok && p.trim_end_matches('/').is_empty() {
                return Err(bad(format!("{what} must not be the root directory")));
            }
            Ok(())
        };
        let mode_ok = |m: &Option<u32>| match m {
            Some(m) if *m > 0o7777 => Err(bad(format!("mode {m:#o} is not a permission mode (0 to 0o7777)"))),
            _ => Ok(()),
        };
        let host = |src: &PathBuf, dir: bool| -> Result<()> {
            if !src.is_absolute() {
                return Err(bad("the host source must be an absolute path".into()));
            }
            match std::fs::metadata(src) {
                Ok(m) if dir && m.is_dir() => Ok(()),
                Ok(m) if !dir && m.is_file() => Ok(()),
                Ok(_) => Err(bad(format!("host source is not a {}", if dir { "directory" } else { "regular file" }))),
                Err(e) => Err(bad(format!("host source: {e}"))),
            }
        };
        match self {
            Patch::Text { path, mode, .. } => {
                guest("path", path, false)?;
                mode_ok(mode)
            }
            Patch::Mkdir { path, mode } => {
                guest("path", path, true)?;
                mode_ok(mode)
            }
            Patch::Append { path, .. } | Patch::Remove { path } => guest("path", path, false),
            Patch::CopyFile { src, dst, mode, .. } => {
                guest("destination", dst, false)?;
                mode_ok(mode)?;
                host(src, false)
            }
            Patch::CopyDir { src, dst, .. } => {
                guest("destination", dst, true)?;
                host(src, true)
            }
            Patch::Symlink { target, link, .. } => {
                guest("link", link, false)?;
                if target.is_empty() || target.contains('\0') || target.len() > MAX_GUEST_PATH {
                    return Err(bad(format!(
                        "the target must be 1 to {MAX_GUEST_PATH} bytes without NUL bytes"
                    )));
                }
                Ok(())
            }
        }
    }
}

/// A patch and how to name it when it fails (`script "greet"`, `patch 2 (append /x)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchStep {
    pub label: String,
    pub patch: Patch,
}

/// Checks a script name: a plain file name.
pub fn validate_script_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SCRIPT_NAME
        && !name.contains(['/', '\0'])
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "invalid script name {name:?}: use 1-{MAX_SCRIPT_NAME} bytes without '/' or NUL, not \".\" or \"..\""
        )))
    }
}

/// Validates scripts and patches together (including their total inline size).
pub fn validate(scripts: &BTreeMap<String, Bytes>, patches: &[Patch]) -> Result<()> {
    for name in scripts.keys() {
        validate_script_name(name)?;
    }
    for p in patches {
        p.validate()?;
    }
    let inline: usize =
        scripts.values().map(|s| s.0.len()).sum::<usize>() + patches.iter().map(Patch::inline_len).sum::<usize>();
    if inline > MAX_INLINE_BYTES {
        return Err(Error::InvalidConfig(format!(
            "scripts and patch contents total {inline} bytes; the limit is {} MiB (copy large files with Patch.copy_file)",
            MAX_INLINE_BYTES >> 20
        )));
    }
    Ok(())
}

/// The steps a create applies, in order: the scripts directory and scripts, then patches.
pub fn steps(scripts: &BTreeMap<String, Bytes>, patches: &[Patch]) -> Vec<PatchStep> {
    let mut out = Vec::new();
    if !scripts.is_empty() {
        out.push(PatchStep {
            label: format!("scripts directory {SCRIPTS_DIR}"),
            patch: Patch::Mkdir { path: SCRIPTS_DIR.into(), mode: Some(0o755) },
        });
    }
    for (name, source) in scripts {
        out.push(PatchStep {
            label: format!("script {name:?}"),
            // The scripts directory is this crate's: a script replaces what is there.
            patch: Patch::Text {
                path: format!("{SCRIPTS_DIR}/{name}"),
                content: source.clone(),
                mode: Some(0o755),
                replace: true,
            },
        });
    }
    for (i, p) in patches.iter().enumerate() {
        out.push(PatchStep { label: format!("patch {} ({})", i + 1, p.describe()), patch: p.clone() });
    }
    out
}

/// `PATH` with [`SCRIPTS_DIR`] appended (once).
pub fn path_with_scripts(path: &str) -> String {
    if path.split(':').any(|d| d == SCRIPTS_DIR) {
        path.to_string()
    } else if path.is_empty() {
        SCRIPTS_DIR.to_string()
    } else {
        format!("{path}:{SCRIPTS_DIR}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<Patch, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn patches_parse_with_base64_content_and_reject_unknown_fields() {
        let p = parse(r#"{"kind":"text","path":"/a","content":"AP8=","mode":420}"#).unwrap();
        assert_eq!(p, Patch::Text { path: "/a".into(), content: Bytes(vec![0, 255]), mode: Some(0o644), replace: false });
        assert!(parse(r#"{"kind":"text","path":"/a","content":"***"}"#).is_err());
        assert!(parse(r#"{"kind":"remove","path":"/a","bogus":1}"#).is_err());
        assert!(parse(r#"{"kind":"explode","path":"/a"}"#).is_err());
        let round = serde_json::to_string(&p).unwrap();
        assert_eq!(parse(&round).unwrap(), p);
    }

    #[test]
    fn validation_names_the_patch() {
        let e = Patch::Append { path: "rel".into(), content: Bytes::default() }.validate().unwrap_err();
        assert!(e.to_string().contains("append rel"), "{e}");
        assert!(Patch::Remove { path: "/".into() }.validate().is_err());
        assert!(Patch::Remove { path: "/x\0".into() }.validate().is_err());
        assert!(Patch::Mkdir { path: "/x".into(), mode: Some(0o10000) }.validate().is_err());
        assert!(Patch::Mkdir { path: "/x".into(), mode: Some(0o1777) }.validate().is_ok());
        assert!(Patch::Symlink { target: "".into(), link: "/l".into(), replace: false }.validate().is_err());
        assert!(Patch::Symlink { target: "../rel".into(), link: "/l".into(), replace: false }.validate().is_ok());
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(Patch::CopyFile { src: f.clone(), dst: "/f".into(), mode: None, replace: false }.validate().is_ok());
        assert!(Patch::CopyFile { src: d.path().into(), dst: "/f".into(), mode: None, replace: false }.validate().is_err());
        assert!(Patch::CopyDir { src: f, dst: "/d".into(), replace: false }.validate().is_err());
        assert!(Patch::CopyDir { src: d.path().into(), dst: "/".into(), replace: false }.validate().is_ok());
        assert!(Patch::CopyDir { src: d.path().join("missing"), dst: "/d".into(), replace: false }.validate().is_err());
        assert!(Patch::CopyFile { src: "rel".into(), dst: "/f".into(), mode: None, replace: false }.validate().is_err());
    }

    #[test]
    fn script_names() {
        for ok in ["greet", "a.sh", "-x", &"n".repeat(255)] {
            assert!(validate_script_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a\0", &"n".repeat(256)] {
            assert!(validate_script_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inline_size_is_bounded() {
        let big = BTreeMap::from([("s".to_string(), Bytes(vec![0; MAX_INLINE_BYTES + 1]))]);
        assert!(validate(&big, &[]).is_err());
    }

    #[test]
    fn steps_put_scripts_first() {
        let scripts = BTreeMap::from([("greet".to_string(), Bytes(b"echo hi".to_vec()))]);
        let s = steps(&scripts, &[Patch::Remove { path: "/x".into() }]);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].patch, Patch::Mkdir { path: SCRIPTS_DIR.into(), mode: Some(0o755) });
        assert_eq!(s[1].label, "script \"greet\"");
        assert_eq!(s[2].label, "patch 1 (remove /x)");
    }

    #[test]
    fn path_gets_the_scripts_dir_once() {
        assert_eq!(path_with_scripts("/bin"), "/bin:/.msb/scripts");
        assert_eq!(path_with_scripts("/bin:/.msb/scripts"), "/bin:/.msb/scripts");
        assert_eq!(path_with_scripts(""), "/.msb/scripts");
    }
}
