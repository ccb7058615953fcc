//! Templates: booted VMs saved to disk, restored instead of booted (issue 13).
//!
//! A template is one VM booted to the agent's `Ready` (nothing of any sandbox inside: no
//! patch, no command, no user data, a neutral hostname) and saved with QEMU's migration
//! stream, plus its disk layer frozen at that instant. Layout under the home (directory
//! 0700, files 0600 / 0400):
//!
//! ```text
//! templates/<key>/template.json   Meta: what it was built from, state size
//!                 vm.state        QEMU migration stream: device state (the RAM is in `ram`)
//!                 disk.qcow2      frozen disk: qcow2 over the image's root (0400)
//!                 ram             the guest's memory (memory-backend-file, 0600)
//! templates/<key>.lock            flock: one build per key at a time, across processes
//! ```
//!
//! A sandbox restored from it gets its own qcow2 overlay backed by `disk.qcow2` — the
//! guest's page cache in the saved RAM matches that disk exactly — and a QEMU started
//! with the same command line (same devices, same kernel and initramfs), `ram` mapped
//! privately (copy-on-write, see `vmm::RamFile`) and `-incoming defer`. The `<key>` is a SHA-256 over everything that shapes the saved guest
//! (see [`Key`]): a create whose options change any of it gets another template, and a
//! new runtime (kernel, agent or supervisor) never restores an old one.
//!
//! The engine side lives here (key, store, build); the supervisor's side (QMP save,
//! the restore handshake) is `microsandbox-supervisor/src/template.rs`.

mod store;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use store::{discard_state, ensure, find, list, prune, remove_for_root, users, Meta, Template, TemplateInfo};

/// Hostname a template boots with; the restore handshake sets the sandbox's own.
pub const TEMPLATE_HOSTNAME: &str = "msb-template";
/// Descriptor at which a restoring QEMU inherits the open state file (`-incoming defer`,
/// then `migrate-incoming fd:101` from the supervisor).
pub const STATE_FD: i32 = 101;
pub const STATE_FILE: &str = "vm.state";
pub const DISK_FILE: &str = "disk.qcow2";
/// The template VM's RAM (a `memory-backend-file`), mapped privately by every restore.
pub const RAM_FILE: &str = "ram";
pub const META_FILE: &str = "template.json";

/// `MICROSANDBOX_TEMPLATES=0|off|false|no` turns templates off for every create.
pub const ENV: &str = "MICROSANDBOX_TEMPLATES";
/// Version of the template format; part of every key.
const FORMAT: u32 = 2;

/// What the supervisor does with a template in this run (part of its spec).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum TemplateRun {
    /// Boot, wait for `Ready`, save the running VM through QMP (at `qmp`) into `state`
    /// (a file name in the sandbox directory), then exit.
    Save { state: String, qmp: PathBuf },
    /// QEMU loads `state` (inherited at [`STATE_FD`]); the supervisor then sends the
    /// sandbox's identity (`Restore` frame) and waits for the agent's new `Ready`.
    ///
    /// With `resumed`, the state is the sandbox's own (`Sandbox#pause`), not a template's.
    Restore {
        state: PathBuf,
        template: String,
        hostname: String,
        #[serde(default)]
        resumed: bool,
        /// The state is a snapshot of another running sandbox (`Sandbox#fork`).
        #[serde(default)]
        forked: bool,
        /// A fork over a RAM file (`sandbox::warm::fork_ram_file`): QEMU starts as soon as this file
        /// (the copy of the parent's root disk, renamed into place once complete)
        /// exists, while the parent still copies its memory; it is told to load the
        /// state once its first bytes are in the FIFO.
        #[serde(default)]
        disk_ready: Option<PathBuf>,
    },
}

/// The `template:` option of a create and the environment: whether this create may
/// restore from (and build) a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TemplateOptions {
    pub enabled: bool,
}

impl TemplateOptions {
    /// `option` (`template:` of create) wins; else the environment; else on.
    pub fn resolve(option: Option<bool>) -> TemplateOptions {
        let env = std::env::var(ENV).ok();
        TemplateOptions { enabled: option.unwrap_or_else(|| !env_says_off(env.as_deref())) }
    }
}

fn env_says_off(v: Option<&str>) -> bool {
    matches!(v.map(|s| s.trim().to_ascii_lowercase()).as_deref(), Some("0" | "off" | "false" | "no"))
}

/// Everything that shapes a template's saved guest. Paths that differ per sandbox (its
/// disks, sockets, console log) are placeholders in `qemu_args`; the rest — machine,
/// memory, CPUs, kernel command line (log level, NIC address), device list — is there
/// verbatim.
#[derive(Debug, Clone, Serialize)]
pub struct Key {
    pub qemu_args: Vec<String>,
    /// [`runtime_fingerprint`] of the runtime that saves and restores it.
    pub runtime: String,
    /// The image's root disk the template's disk layer is backed by (its name holds the
    /// manifest digest) and the disk's virtual size.
    pub image_root: PathBuf,
    pub disk_bytes: u64,
}

impl Key {
    /// The template's id: hex SHA-256 of the key (with the format version).
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(&(FORMAT, self)).expect("key serializes");
        hex::encode(Sha256::digest(&json))
    }
}

/// What a template depends on besides its configuration: the QEMU binary (another QEMU
/// may not load this one's stream), the kernel and the initramfs (path, size, mtime; the
/// initramfs holds the agent), and the runtime manifest (kernel release, agent and
/// supervisor digests). Templates of any other fingerprint are stale.
pub fn runtime_fingerprint(rt: &crate::runtime::Runtime, qemu: &Path) -> String {
    format!(
        "{}|{}|{}|{}|{}|{}",
        file_stamp(qemu),
        file_stamp(&rt.kernel),
        file_stamp(&rt.initramfs),
        rt.manifest.kernel_release,
        rt.manifest.agent_sha256,
        rt.manifest.supervisor_sha256
    )
}

/// Identity of a file cheap enough for every create: path, size, mtime.
pub fn file_stamp(p: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => format!("{}:{}:{}.{}", p.display(), m.len(), m.mtime(), m.mtime_nsec()),
        Err(_) => format!("{}:missing", p.display()),
    }
}

/// Directory holding every template of `home`.
pub fn root(home: &crate::paths::Home) -> PathBuf {
    home.root().join("templates")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_off_values() {
        for v in ["0", "off", "OFF", "false", " no "] {
            assert!(env_says_off(Some(v)), "{v}");
        }
        for v in [None, Some("1"), Some("on"), Some("")] {
            assert!(!env_says_off(v), "{v:?}");
        }
    }

    #[test]
    fn key_changes_with_every_field() {
        let base = Key { qemu_args: vec!["-m".into(), "256M".into()], runtime: "rt".into(), image_root: "/r".into(), disk_bytes: 1 };
        let id = base.id();
        assert_eq!(id.len(), 64);
        assert_eq!(base.clone().id(), id, "stable");
        assert_ne!(Key { qemu_args: vec!["-m".into(), "512M".into()], ..base.clone() }.id(), id);
        assert_ne!(Key { runtime: "rt2".into(), ..base.clone() }.id(), id);
        assert_ne!(Key { image_root: "/other".into(), ..base.clone() }.id(), id);
        assert_ne!(Key { disk_bytes: 2, ..base.clone() }.id(), id);
    }
}
