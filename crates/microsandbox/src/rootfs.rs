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

/// Size in MiB of the private root disk for `dir`: its content plus a quarter, plus
/// [`HEADROOM`] of free space.
pub fn disk_size_mib(dir: &Path) -> u64 {
    (tree_size(dir) * 5 / 4 + HEADROOM) >> 20
}

/// Creates `disk` as a sparse file of `size_mib` MiB, not yet formatted.
///
/// Why separately from [`format_disk`]: QEMU opens the disk when it starts and takes its
/// size then, so a create allocates the file at its final size, starts QEMU paused and
/// formats it meanwhile (the supervisor does; see DESIGN.md, "Root filesystem").
pub fn allocate_disk(disk: &Path, size_mib: u64) -> Result<()> {
    let f = std::fs::File::create(disk).context(|| format!("creating the root disk {}", disk.display()))?;
    f.set_len(size_mib << 20).context(|| format!("sizing the root disk {}", disk.display()))
}

/// Formats `disk`, a file of `size_mib` MiB, as ext4 holding a copy of `dir`. `mke2fs`
/// writes into the existing file (same inode, same size), so a QEMU that opened it before
/// reads the new filesystem through the host page cache. On failure the file is removed.
pub fn format_disk(dir: &Path, disk: &Path, size_mib: u64) -> Result<()> {
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

/// Builds a sparse ext4 image at `disk` holding a copy of `dir` ([`allocate_disk`] then
/// [`format_disk`]).
pub fn build_disk_from_dir(dir: &Path, disk: &Path) -> Result<()> {
    let size_mib = disk_size_mib(dir);
    allocate_disk(disk, size_mib)?;
    format_disk(dir, disk, size_mib)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file QEMU opened before the format is the one that holds the filesystem: same
    /// inode, same size, ext4 magic in its superblock.
    #[test]
    fn format_writes_into_the_allocated_file() {
        if Command::new("mke2fs").arg("-V").output().is_err() {
            return; // e2fsprogs missing: bin/setup installs it
        }
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/hello"), b"hi").unwrap();
        let disk = t.path().join("root.ext4");
        let size = disk_size_mib(&tree);
        assert!(size >= HEADROOM >> 20);
        allocate_disk(&disk, size).unwrap();
        let before = std::fs::metadata(&disk).unwrap();
        assert_eq!(before.len(), size << 20);
        let opened = std::fs::File::open(&disk).unwrap();
        format_disk(&tree, &disk, size).unwrap();
        let after = std::fs::metadata(&disk).unwrap();
        assert_eq!((after.ino(), after.len()), (before.ino(), before.len()));
        use std::os::unix::fs::FileExt;
        let mut magic = [0u8; 2];
        opened.read_exact_at(&mut magic, 1024 + 0x38).unwrap();
        assert_eq!(u16::from_le_bytes(magic), 0xEF53);
    }

    #[test]
    fn a_failed_format_removes_the_disk() {
        if Command::new("mke2fs").arg("-V").output().is_err() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("root.ext4");
        allocate_disk(&disk, 1).unwrap(); // far too small for the -d tree below
        let tree = t.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("big"), vec![7u8; 4 << 20]).unwrap();
        let e = format_disk(&tree, &disk, 1).unwrap_err();
        assert!(matches!(e, Error::Filesystem(_)), "{e}");
        assert!(!disk.exists());
    }
}
