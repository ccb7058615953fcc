//! `volumes:` of `Sandbox.create`: checking the mounts and turning them into devices.
//!
//! Each mount becomes one of:
//! - **virtio-fs** (bind mounts, dir volumes without quota): a `virtiofsd` per mount,
//!   started by the supervisor on a socket QEMU connects to (`vhost-user-fs-pci`; guest
//!   RAM is a shared memfd so the daemon can reach the buffers). The guest mounts the
//!   tag `msbfs<i>` with `-t virtiofs`.
//! - **virtio-blk** (disk volumes, dir volumes with `quota_mib`, `disk:` images): the
//!   image is a QEMU drive with serial `msbvol<i>`; the guest finds the device by that
//!   serial and mounts its filesystem.
//! - **tmpfs**: nothing on the host; the guest mounts a tmpfs of `size_mib`.
//!
//! The guest learns what to mount from the kernel command line (`msb.mounts=`, base64url
//! of a JSON list of [`GuestMount`]), so the mounts exist before any process runs.
//! Every check happens here, at create, before a name is claimed or a VM started.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{content_path, read_meta, Kind};
use crate::error::{Error, Result};
use crate::paths::Home;

/// Most mounts of one sandbox (each is a PCI device or a daemon).
pub const MAX_MOUNTS: usize = 16;
/// Longest guest mount path, bytes (the whole list rides on a 2 KiB kernel command line).
pub const MAX_GUEST_MOUNT_PATH: usize = 256;
/// Longest encoded `msb.mounts=` value.
pub const MAX_CMDLINE_BYTES: usize = 1400;
/// Guest paths a mount may not be at or under: the root itself is the image, and these
/// are the kernel's (the agent mounts them; shadowing them breaks the guest).
const RESERVED: &[&str] = &["/proc", "/dev", "/sys"];
/// Filesystems a `disk:` image may hold (what the guest kernel has built in).
pub const DISK_FSTYPES: &[&str] = &["ext4", "ext3", "ext2"];
/// Image formats of `disk:`.
pub const DISK_FORMATS: &[&str] = &["raw", "qcow2"];

/// One `volumes:` entry as Ruby sends it (exactly one of `bind`, `named`, `tmpfs`, `disk`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    /// Absolute guest path.
    pub guest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub named: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tmpfs: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<PathBuf>,
    /// Size of a tmpfs, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_mib: Option<u64>,
    /// `disk:` image format (default: `qcow2` for a `.qcow2` file, else `raw`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// `disk:` filesystem (default `ext4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub noexec: bool,
    #[serde(default)]
    pub nosuid: bool,
    #[serde(default)]
    pub nodev: bool,
}

impl MountSpec {
    /// The volume name of a `named:` mount.
    pub fn named_volume(&self) -> Option<&str> {
        self.named.as_deref()
    }
}

pub use microsandbox_protocol::GuestMount;

/// A `virtiofsd` the supervisor starts for one mount.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VirtiofsShare {
    pub tag: String,
    pub dir: PathBuf,
    pub readonly: bool,
    /// vhost-user socket the supervisor listens on and QEMU connects to.
    pub socket: PathBuf,
}

/// A block-device mount's drive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockDrive {
    pub serial: String,
    pub path: PathBuf,
    pub format: String,
    pub readonly: bool,
}

/// A volume lock the supervisor holds while the VM runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldLock {
    pub volume: String,
    pub path: PathBuf,
    /// Block-backed volumes attach to one sandbox at a time.
    pub exclusive: bool,
}

/// What the supervisor runs and holds for `volumes:` (part of its spec).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRuntime {
    /// The `virtiofsd` binary (needed only with shares).
    pub virtiofsd: PathBuf,
    pub shares: Vec<VirtiofsShare>,
    pub locks: Vec<HeldLock>,
}

/// Fails the create early when a volume cannot be locked the way the supervisor will:
/// an image-backed volume attached to another running sandbox (`VolumeInUse`), or a
/// volume being removed. The probe's locks are released at once; the supervisor takes
/// them for real (and fails the boot if it lost a race).
pub fn probe_locks(plan: &Plan) -> Result<()> {
    use std::os::fd::AsRawFd;
    for l in &plan.locks {
        let f = std::fs::File::open(&l.path)
            .map_err(|_| Error::VolumeNotFound(format!("volume {:?} was removed", l.volume)))?;
        let how = if l.exclusive { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
        // SAFETY: flock on a descriptor we own; closing it releases the lock.
        if unsafe { libc::flock(f.as_raw_fd(), how) } != 0 {
            return Err(if l.exclusive {
                Error::VolumeInUse(format!(
                    "volume {:?} is attached to another running sandbox; image-backed volumes (disk, or dir with quota_mib) attach to one sandbox at a time",
                    l.volume
                ))
            } else {
                Error::VolumeNotFound(format!("volume {:?} is being removed", l.volume))
            });
        }
    }
    Ok(())
}

/// Everything `volumes:` adds to a VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Plan {
    pub guest: Vec<GuestMount>,
    pub shares: Vec<VirtiofsShare>,
    pub drives: Vec<BlockDrive>,
    pub locks: Vec<HeldLock>,
}

impl Plan {
    /// The kernel parameter carrying [`Plan::guest`], or None without mounts.
    pub fn kernel_param(&self) -> Result<Option<String>> {
        if self.guest.is_empty() {
            return Ok(None);
        }
        let enc = microsandbox_protocol::encode_mounts(&self.guest);
        if enc.len() > MAX_CMDLINE_BYTES {
            return Err(Error::InvalidConfig(format!(
                "volumes: the mount list is too long for the guest kernel command line ({} bytes encoded, at most {MAX_CMDLINE_BYTES}); use fewer mounts or shorter guest paths",
                enc.len()
            )));
        }
        Ok(Some(enc))
    }
}

/// Checks a guest mount path and returns it normalized (no trailing slash).
pub fn guest_path(p: &str) -> Result<String> {
    let bad = |why: &str| Error::InvalidConfig(format!("volumes: guest path {p:?} {why}"));
    if !p.starts_with('/') {
        return Err(bad("must be absolute"));
    }
    if p.contains('\0') || p.chars().any(char::is_control) {
        return Err(bad("must not contain NUL or control characters"));
    }
    if p.len() > MAX_GUEST_MOUNT_PATH {
        return Err(bad(&format!("is longer than {MAX_GUEST_MOUNT_PATH} bytes")));
    }
    let mut parts = Vec::new();
    // Split by hand: `Path::components` drops inner "." silently.
    for c in p.split('/').filter(|c| !c.is_empty()) {
        if c == "." || c == ".." {
            return Err(bad("must not contain '.' or '..' components"));
        }
        parts.push(c);
    }
    if parts.is_empty() {
        return Err(bad("would shadow the root filesystem; mount below it, e.g. /data"));
    }
    let norm = format!("/{}", parts.join("/"));
    for r in RESERVED {
        if norm == *r || norm.starts_with(&format!("{r}/")) {
            return Err(bad(&format!("would shadow {r}, which the guest kernel needs")));
        }
    }
    Ok(norm)
}

/// True when `a` and `b` are the same directory or one contains the other.
fn overlap(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// Checks every mount against the host (paths, volumes) and lays out devices.
/// `socket_prefix` names the vhost-user sockets (`<prefix><i>`). `memory_mib` bounds a
/// tmpfs.
pub fn plan(home: &Home, mounts: &[MountSpec], socket_prefix: &Path, memory_mib: u64) -> Result<Plan> {
    if mounts.len() > MAX_MOUNTS {
        return Err(Error::InvalidConfig(format!("volumes: at most {MAX_MOUNTS} mounts, got {}", mounts.len())));
    }
    let mut plan = Plan::default();
    let mut seen: Vec<String> = Vec::new();
    let mut volumes = BTreeSet::new();
    for m in mounts {
        let target = guest_path(&m.guest)?;
        if let Some(other) = seen.iter().find(|s| overlap(s, &target)) {
            return Err(Error::InvalidConfig(format!(
                "volumes: {target:?} overlaps {other:?}; mounts may not be nested or repeated"
            )));
        }
        seen.push(target.clone());
        let sources = [m.bind.is_some(), m.named.is_some(), m.tmpfs, m.disk.is_some()].iter().filter(|b| **b).count();
        if sources != 1 {
            return Err(Error::InvalidConfig(format!(
                "volumes: {target:?} needs exactly one of bind:, named:, tmpfs: true or disk: (got {sources})"
            )));
        }
        if m.size_mib.is_some() && !m.tmpfs {
            return Err(Error::InvalidConfig(format!("volumes: {target:?}: size_mib: sizes a tmpfs; a volume's size is set at Volume.create")));
        }
        if (m.format.is_some() || m.fstype.is_some()) && m.disk.is_none() {
            return Err(Error::InvalidConfig(format!("volumes: {target:?}: format: and fstype: apply to disk: images")));
        }
        let mut gm = GuestMount {
            target: target.clone(),
            fstype: String::new(),
            source: String::new(),
            readonly: m.readonly,
            noexec: m.noexec,
            nosuid: m.nosuid,
            nodev: m.nodev,
            data: None,
        };
        let share = |plan: &mut Plan, dir: PathBuf, gm: &mut GuestMount| {
            let i = plan.shares.len();
            let tag = format!("msbfs{i}");
            let mut sock = socket_prefix.as_os_str().to_owned();
            sock.push(i.to_string());
            plan.shares.push(VirtiofsShare { tag: tag.clone(), dir, readonly: m.readonly, socket: PathBuf::from(sock) });
            gm.fstype = "virtiofs".into();
            gm.source = tag;
        };
        let drive = |plan: &mut Plan, path: PathBuf, format: &str, fstype: &str, gm: &mut GuestMount| {
            let serial = format!("msbvol{}", plan.drives.len());
            plan.drives.push(BlockDrive { serial: serial.clone(), path, format: format.into(), readonly: m.readonly });
            gm.fstype = fstype.into();
            gm.source = serial;
        };
        if let Some(host) = &m.bind {
            if !host.is_absolute() {
                return Err(Error::InvalidConfig(format!("volumes: {target:?}: bind path {} must be absolute", host.display())));
            }
            let md = std::fs::metadata(host).map_err(|e| {
                Error::InvalidConfig(format!("volumes: {target:?}: bind path {} cannot be used: {e}", host.display()))
            })?;
            if !md.is_dir() {
                return Err(Error::InvalidConfig(format!(
                    "volumes: {target:?}: bind path {} is not a directory (only directories can be shared)",
                    host.display()
                )));
            }
            let canon = std::fs::canonicalize(host)
                .map_err(|e| Error::InvalidConfig(format!("volumes: {target:?}: bind path {}: {e}", host.display())))?;
            share(&mut plan, canon, &mut gm);
        } else if let Some(name) = &m.named {
            let meta = read_meta(home, name)?;
            if !volumes.insert(name.clone()) {
                return Err(Error::InvalidConfig(format!("volumes: volume {name:?} is mounted twice; mount it once")));
            }
            let block = meta.kind == Kind::Disk || meta.quota_mib.is_some();
            plan.locks.push(HeldLock { volume: name.clone(), path: super::volume_dir(home, name).join(super::LOCK_FILE), exclusive: block });
            if block {
                drive(&mut plan, super::block_path(home, &meta), "raw", "ext4", &mut gm);
            } else {
                share(&mut plan, content_path(home, &meta), &mut gm);
            }
        } else if m.tmpfs {
            let mut data = "mode=1777".to_string();
            if let Some(size) = m.size_mib {
                if !(1..=memory_mib).contains(&size) {
                    return Err(Error::InvalidConfig(format!(
                        "volumes: {target:?}: tmpfs size_mib must be between 1 and the sandbox's memory ({memory_mib} MiB), got {size}"
                    )));
                }
                data.push_str(&format!(",size={size}m"));
            }
            gm.fstype = "tmpfs".into();
            gm.source = "tmpfs".into();
            gm.data = Some(data);
        } else if let Some(img) = &m.disk {
            if !img.is_absolute() {
                return Err(Error::InvalidConfig(format!("volumes: {target:?}: disk path {} must be absolute", img.display())));
            }
            let md = std::fs::metadata(img).map_err(|e| {
                Error::InvalidConfig(format!("volumes: {target:?}: disk image {} cannot be used: {e}", img.display()))
            })?;
            if !md.is_file() {
                return Err(Error::InvalidConfig(format!("volumes: {target:?}: disk image {} is not a file", img.display())));
            }
            let default_format = if img.extension().is_some_and(|e| e == "qcow2") { "qcow2" } else { "raw" };
            let format = m.format.as_deref().unwrap_or(default_format);
            if !DISK_FORMATS.contains(&format) {
                return Err(Error::InvalidConfig(format!("volumes: {target:?}: disk format {format:?} is not supported; use one of {DISK_FORMATS:?}")));
            }
            let fstype = m.fstype.as_deref().unwrap_or("ext4");
            if !DISK_FSTYPES.contains(&fstype) {
                return Err(Error::InvalidConfig(format!("volumes: {target:?}: fstype {fstype:?} is not supported; use one of {DISK_FSTYPES:?}")));
            }
            check_image_format(img, format).map_err(|why| Error::InvalidConfig(format!("volumes: {target:?}: disk image {}: {why}", img.display())))?;
            let canon = std::fs::canonicalize(img)
                .map_err(|e| Error::InvalidConfig(format!("volumes: {target:?}: disk image {}: {e}", img.display())))?;
            drive(&mut plan, canon, format, fstype, &mut gm);
        }
        plan.guest.push(gm);
    }
    plan.kernel_param()?;
    Ok(plan)
}

/// A qcow2 named as raw (or the other way round) would be misread: the first bytes must
/// agree with the format. A qcow2 with a backing file is refused (QEMU would open a host
/// path that the image names).
fn check_image_format(img: &Path, format: &str) -> std::result::Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 32];
    let n = std::fs::File::open(img).and_then(|mut f| f.read(&mut head)).map_err(|e| e.to_string())?;
    let is_qcow2 = n >= 4 && head[..4] == *b"QFI\xfb";
    match (format, is_qcow2) {
        ("qcow2", false) => Err("is not a qcow2 image".into()),
        ("raw", true) => Err("is a qcow2 image; pass format: \"qcow2\"".into()),
        ("qcow2", true) => {
            // Header: backing_file_offset is the big-endian u64 at byte 8.
            let backing = u64::from_be_bytes(head[8..16].try_into().unwrap());
            if backing != 0 {
                Err("has a backing file; flatten it first (qemu-img convert)".into())
            } else {
                Ok(())
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(guest: &str) -> MountSpec {
        MountSpec { guest: guest.into(), tmpfs: true, ..Default::default() }
    }

    #[test]
    fn guest_paths() {
        assert_eq!(guest_path("/data/").unwrap(), "/data");
        assert_eq!(guest_path("/a//b").unwrap(), "/a/b");
        assert_eq!(guest_path("/proc2").unwrap(), "/proc2");
        for bad in ["data", "/", "//", "/proc", "/proc/x", "/dev", "/sys/fs", "/a/../b", "/a/./b", "/a\0", "/a\nb"] {
            assert!(matches!(guest_path(bad), Err(Error::InvalidConfig(_))), "{bad:?}");
        }
    }

    #[test]
    fn overlapping_and_repeated_mounts_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(t.path());
        let p = t.path().join("s");
        assert!(plan(&h, &[spec("/a"), spec("/b"), spec("/ab")], &p, 512).is_ok());
        for pair in [["/a", "/a/b"], ["/a/b", "/a"], ["/a", "/a/"]] {
            let r = plan(&h, &[spec(pair[0]), spec(pair[1])], &p, 512);
            assert!(matches!(r, Err(Error::InvalidConfig(ref m)) if m.contains("overlaps")), "{pair:?}: {r:?}");
        }
    }

    #[test]
    fn sources_and_their_checks() {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(t.path());
        let p = t.path().join("s");
        let file = t.path().join("f.txt");
        std::fs::write(&file, "x").unwrap();
        let bind = |host: &Path| MountSpec { guest: "/m".into(), bind: Some(host.into()), ..Default::default() };
        // A directory works; a file, a missing path and a relative path do not.
        let ok = plan(&h, &[MountSpec { readonly: true, ..bind(t.path()) }], &p, 512).unwrap();
        assert_eq!(ok.shares.len(), 1);
        assert!(ok.shares[0].readonly && ok.guest[0].readonly);
        assert_eq!(ok.guest[0].fstype, "virtiofs");
        assert_eq!(ok.shares[0].socket, t.path().join("s0"));
        for bad in [file.clone(), t.path().join("missing"), PathBuf::from("rel")] {
            assert!(matches!(plan(&h, &[bind(&bad)], &p, 512), Err(Error::InvalidConfig(_))), "{bad:?}");
        }
        // Unknown volume.
        let named = MountSpec { guest: "/v".into(), named: Some("nope".into()), ..Default::default() };
        assert!(matches!(plan(&h, &[named], &p, 512), Err(Error::VolumeNotFound(_))));
        // Two sources, none.
        let two = MountSpec { tmpfs: true, ..bind(t.path()) };
        assert!(plan(&h, &[two], &p, 512).is_err());
        assert!(plan(&h, &[MountSpec { guest: "/x".into(), ..Default::default() }], &p, 512).is_err());
        // tmpfs sizes.
        let sized = |s| MountSpec { size_mib: Some(s), ..spec("/t") };
        assert_eq!(plan(&h, &[sized(64)], &p, 512).unwrap().guest[0].data.as_deref(), Some("mode=1777,size=64m"));
        assert!(plan(&h, &[sized(0)], &p, 512).is_err());
        assert!(plan(&h, &[sized(513)], &p, 512).is_err());
        // Disk images: format must match the bytes.
        let raw = t.path().join("d.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let disk = |fmt: Option<&str>| MountSpec { guest: "/d".into(), disk: Some(raw.clone()), format: fmt.map(Into::into), ..Default::default() };
        let d = plan(&h, &[disk(None)], &p, 512).unwrap();
        assert_eq!((d.drives[0].format.as_str(), d.guest[0].fstype.as_str(), d.guest[0].source.as_str()), ("raw", "ext4", "msbvol0"));
        assert!(plan(&h, &[disk(Some("qcow2"))], &p, 512).is_err());
        assert!(plan(&h, &[disk(Some("vmdk"))], &p, 512).is_err());
        let xfs = MountSpec { fstype: Some("xfs".into()), ..disk(None) };
        assert!(plan(&h, &[xfs], &p, 512).is_err());
    }

    #[test]
    fn named_volumes_pick_their_device() {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(t.path());
        let p = t.path().join("s");
        let o = |kind: &str, size, quota| super::super::CreateOptions { kind: Some(kind.into()), size_mib: size, quota_mib: quota, ..Default::default() };
        super::super::create(&h, "plain", &o("dir", None, None)).unwrap();
        super::super::create(&h, "quota", &o("dir", None, Some(16))).unwrap();
        super::super::create(&h, "blk", &o("disk", Some(16), None)).unwrap();
        let m = |g: &str, n: &str| MountSpec { guest: g.into(), named: Some(n.into()), ..Default::default() };
        let pl = plan(&h, &[m("/a", "plain"), m("/b", "quota"), m("/c", "blk")], &p, 512).unwrap();
        assert_eq!(pl.shares.len(), 1);
        assert_eq!(pl.drives.len(), 2);
        assert_eq!(pl.locks.iter().map(|l| l.exclusive).collect::<Vec<_>>(), [false, true, true]);
        assert!(pl.kernel_param().unwrap().unwrap().starts_with("msb.mounts="));
        assert!(plan(&h, &[m("/a", "plain"), m("/b", "plain")], &p, 512).is_err(), "mounted twice");
    }

    #[test]
    fn the_command_line_stays_bounded() {
        let t = tempfile::tempdir().unwrap();
        let h = Home::at(t.path());
        let long: Vec<_> = (0..MAX_MOUNTS).map(|i| spec(&format!("/{}{i}", "x".repeat(200)))).collect();
        assert!(matches!(plan(&h, &long, &t.path().join("s"), 512), Err(Error::InvalidConfig(ref m)) if m.contains("command line")));
        assert!(plan(&h, &vec![spec("/a"); MAX_MOUNTS + 1], &t.path().join("s"), 512).is_err());
    }
}
