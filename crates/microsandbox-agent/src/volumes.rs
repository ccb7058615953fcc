//! `volumes:` mounts at boot: the host lists them on the kernel command line
//! (`msb.mounts=`, see `microsandbox_protocol::GuestMount`); they are mounted after the
//! switch into the root disk and before anything else runs. A mount that fails fails the
//! boot: the user asked for it, and a sandbox writing into its root instead of a volume
//! would lose data silently.

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use microsandbox_protocol::GuestMount;
use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// Read-ahead of volume mounts, as for the root disk (`boot::ROOT_READ_AHEAD_KB`): every
/// request is an emulated round trip under TCG, and the data is in the host's page cache.
/// Measured on a virtio-fs bind mount (256 MiB sequential read after `drop_caches`): the
/// kernel's 128 KiB gave ~240 MB/s, 4 MiB ~610 MB/s.
const READ_AHEAD_KB: &str = "4096";

/// How long a device (virtio-fs tag or disk) may take to appear after the modules loaded.
const DEVICE_WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(5);

/// The mounts of this boot (empty without `volumes:`).
pub fn from_cmdline() -> Result<Vec<GuestMount>, String> {
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    microsandbox_protocol::decode_mounts(&cmdline)
}

/// True when some mount needs the virtio-fs modules.
pub fn needs_virtiofs(mounts: &[GuestMount]) -> bool {
    mounts.iter().any(|m| m.fstype == "virtiofs")
}

/// Mount flags of `m`.
pub fn flags(m: &GuestMount) -> MsFlags {
    let mut f = MsFlags::empty();
    for (on, flag) in [(m.readonly, MsFlags::MS_RDONLY), (m.noexec, MsFlags::MS_NOEXEC), (m.nosuid, MsFlags::MS_NOSUID), (m.nodev, MsFlags::MS_NODEV)] {
        if on {
            f |= flag;
        }
    }
    f
}

/// Mounts every entry, in order.
pub fn mount_all(mounts: &[GuestMount]) -> Result<(), String> {
    for m in mounts {
        mount_one(m).map_err(|e| format!("volume {}: {e}", m.target))?;
    }
    Ok(())
}

fn mount_one(m: &GuestMount) -> Result<(), String> {
    if !m.target.starts_with('/') || m.target == "/" {
        return Err("the mount point must be an absolute path below /".into());
    }
    match fs::DirBuilder::new().recursive(true).mode(0o755).create(&m.target) {
        Ok(()) => {}
        Err(e) => return Err(format!("cannot create the mount point: {e}")),
    }
    let flags = flags(m);
    let deadline = Instant::now() + DEVICE_WAIT;
    let source = match m.fstype.as_str() {
        "virtiofs" | "tmpfs" => m.source.clone(),
        _ => {
            // A block volume: the virtio-blk device whose serial the host chose.
            loop {
                if let Some(dev) = block_device_by_serial(Path::new("/sys/block"), &m.source) {
                    break format!("/dev/{dev}");
                }
                if Instant::now() >= deadline {
                    return Err(format!("no disk with serial {} appeared within {}s", m.source, DEVICE_WAIT.as_secs()));
                }
                sleep(POLL);
            }
        }
    };
    let mut data = m.data.clone();
    loop {
        match mount(Some(source.as_str()), m.target.as_str(), Some(m.fstype.as_str()), flags, data.as_deref()) {
            Ok(()) => {
                tune_read_ahead(&m.target);
                return Ok(());
            }
            // A read-only device whose ext journal needs replaying (its last writer was
            // killed): mount it without the replay, as it was at the last commit point.
            Err(Errno::EROFS) if m.readonly && m.fstype.starts_with("ext") && data.is_none() => {
                data = Some("noload".into());
            }
            // The virtio-fs tag or the block device node is not registered yet.
            Err(Errno::ENOENT | Errno::ENODEV | Errno::ENXIO) if Instant::now() < deadline => sleep(POLL),
            Err(e) => return Err(format!("cannot mount {} ({}) on it: {e}", m.source, m.fstype)),
        }
    }
}

/// Sets the read-ahead of the filesystem mounted at `target` (its backing device info,
/// `/sys/class/bdi/<major>:<minor>`). Best effort: only a tuning knob; a tmpfs has none.
fn tune_read_ahead(target: &str) {
    let Ok(st) = nix::sys::stat::stat(target) else { return };
    let dev = st.st_dev;
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    let _ = fs::write(path, READ_AHEAD_KB);
}

/// Unmounts the volumes (last first) at shutdown, so a block volume's filesystem is
/// clean for its next user; one that cannot be unmounted is remounted read-only, which
/// also flushes it. Best effort: the VM ends anyway.
pub fn unmount_all() {
    let Ok(mounts) = from_cmdline() else { return };
    for m in mounts.iter().rev() {
        if nix::mount::umount(m.target.as_str()).is_err() {
            let _ = mount(None::<&str>, m.target.as_str(), None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>);
        }
    }
}

/// The `vdX` whose `serial` attribute is `serial` (virtio-blk exposes the drive's serial).
pub fn block_device_by_serial(sys_block: &Path, serial: &str) -> Option<String> {
    let entries = fs::read_dir(sys_block).ok()?;
    for e in entries.flatten() {
        let name = e.file_name().into_string().ok()?;
        if !name.starts_with("vd") {
            continue;
        }
        if let Ok(s) = fs::read_to_string(e.path().join("serial")) {
            if s.trim_end_matches(['\n', '\0']) == serial {
                return Some(name);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_disks_by_serial() {
        let t = std::env::temp_dir().join(format!("msb-serial-{}", std::process::id()));
        for (dev, serial) in [("vda", ""), ("vdb", "msb.transfer"), ("vdc", "msbvol0\n")] {
            fs::create_dir_all(t.join(dev)).unwrap();
            fs::write(t.join(dev).join("serial"), serial).unwrap();
        }
        fs::create_dir_all(t.join("loop0")).unwrap();
        assert_eq!(block_device_by_serial(&t, "msbvol0").as_deref(), Some("vdc"));
        assert_eq!(block_device_by_serial(&t, "msbvol1"), None);
        fs::remove_dir_all(&t).unwrap();
    }

    #[test]
    fn flags_follow_the_options() {
        let m = GuestMount {
            target: "/d".into(),
            fstype: "tmpfs".into(),
            source: "tmpfs".into(),
            readonly: true,
            noexec: true,
            nosuid: false,
            nodev: true,
            data: None,
        };
        assert_eq!(flags(&m), MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV);
    }
}
