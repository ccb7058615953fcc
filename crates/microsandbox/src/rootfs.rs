//! Root filesystems. A local directory becomes a private ext4 disk per sandbox, built
//! with `mke2fs -d` (no root privileges and no loop devices needed), so writes in the
//! guest never reach the host directory and sandboxes never see each other's writes.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, IoContext, Result};

/// Free space added on top of the directory's content.
const HEADROOM: u64 = 512 << 20;

/// Total bytes of regular files below `dir` (symlinks not followed).
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

/// Checks that `image` names an existing directory.
pub fn check_dir_image(image: &str) -> Result<()> {
    let p = Path::new(image);
    match std::fs::metadata(p) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => Err(Error::InvalidConfig(format!(
            "image {image:?} is a file, not a directory; pass the path of an unpacked root filesystem"
        ))),
        Err(_) => Err(Error::ImageNotFound(format!(
            "image directory {image:?} does not exist; pass the path of an unpacked root filesystem (registry images are not supported yet)"
        ))),
    }
}

/// The error for an `mke2fs` that could not be started (shared with volume formatting).
pub(crate) fn mke2fs_spawn_error(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::Runtime("mke2fs is not installed; install Debian's e2fsprogs package".into())
    } else {
        Error::Io { context: "running mke2fs".into(), source: e }
    }
}

/// Builds a sparse ext4 image at `disk` holding a copy of `dir`.
pub fn build_disk_from_dir(dir: &Path, disk: &Path) -> Result<()> {
    let size_mib = (tree_size(dir) * 5 / 4 + HEADROOM) >> 20;
    let out = Command::new("mke2fs")
        // 256-byte inodes: timestamps past 2038 and a filesystem ext4 mounts as checked.
        .args(["-q", "-F", "-t", "ext4", "-I", "256", "-O", "^has_journal", "-E", "lazy_itable_init=1,root_owner=0:0", "-d"])
        .arg(dir)
        .arg(disk)
        .arg(format!("{size_mib}M"))
        .output()
        .map_err(mke2fs_spawn_error)?;
    if !out.status.success() {
        let _ = std::fs::remove_file(disk);
        return Err(Error::Filesystem(format!(
            "could not build the root disk from {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::metadata(disk).context(|| format!("root disk {}", disk.display()))?;
    Ok(())
}
