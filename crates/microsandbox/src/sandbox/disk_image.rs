//! Disk-image roots: `image: "/path/root.raw" | ".qcow2" | ".vmdk"` (the reference gem's
//! `DISK_IMAGE_EXTENSIONS`), with an optional `fstype:`.
//!
//! The image must hold a filesystem directly (no partition table). The sandbox boots from
//! a qcow2 overlay in its own directory whose backing file is the user's image, opened
//! read-only by QEMU: the guest's writes land in the overlay and the image is never
//! modified (several sandboxes can share it). The guest mounts the root disk as ext4,
//! whose driver also mounts ext2 and ext3; other filesystems are refused before anything
//! starts ([`Error::Unsupported`]), since the guest kernel's initramfs carries no other
//! filesystem driver. Without `fstype:` the filesystem is detected from its superblock,
//! read through `qemu-img dd` (so qcow2 and vmdk images are read the same way as raw).
//!
//! The overlay refers to the image by absolute path: moving or changing the image breaks
//! `Sandbox.start` of a stopped sandbox that uses it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result};

/// Image formats by file extension.
pub const EXTENSIONS: [&str; 3] = ["raw", "qcow2", "vmdk"];
/// `fstype:` values the guest can mount (all through the ext4 driver).
pub const FSTYPES: [&str; 3] = ["ext4", "ext3", "ext2"];

/// Offset and value of the ext2/3/4 superblock magic.
const EXT_MAGIC_OFFSET: usize = 1024 + 56;
const EXT_MAGIC: [u8; 2] = [0x53, 0xEF];

/// The disk format of `image` when it names a disk image (by extension, any case).
pub fn format_of(image: &str) -> Option<&'static str> {
    let ext = Path::new(image).extension()?.to_str()?.to_ascii_lowercase();
    EXTENSIONS.iter().copied().find(|e| *e == ext)
}

/// Checks `fstype:` against the filesystems the guest can mount.
pub fn check_fstype(fstype: &str) -> Result<()> {
    if FSTYPES.contains(&fstype) {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "fstype {fstype:?} cannot be mounted as a root here: the guest kernel mounts {} roots; \
         convert the image (e.g. copy its files into a new ext4 image with mkfs.ext4 -d)",
        FSTYPES.join(", ")
    )))
}

/// Validates a disk-image root before anything is claimed: the file exists, `qemu-img`
/// reads it in the format its extension names, and its filesystem (given or detected) is
/// one the guest mounts. Returns the absolute image path and its format.
pub fn check(image: &str, fstype: Option<&str>) -> Result<(PathBuf, &'static str)> {
    let format = format_of(image).ok_or_else(|| Error::InvalidConfig(format!("{image:?} is not a disk image")))?;
    let path = match std::fs::metadata(image) {
        Ok(md) if md.is_file() => std::fs::canonicalize(image).context(|| format!("disk image {image}"))?,
        Ok(_) => {
            return Err(Error::InvalidConfig(format!("disk image {image:?} is not a regular file")));
        }
        Err(_) => {
            return Err(Error::ImageNotFound(format!(
                "disk image {image:?} does not exist; pass the path of a .raw, .qcow2 or .vmdk file"
            )))
        }
    };
    if let Some(f) = fstype {
        check_fstype(f)?;
    }
    let head = read_head(&path, format)?;
    let is_ext = head.get(EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2) == Some(&EXT_MAGIC[..]);
    if !is_ext {
        return Err(match fstype {
            Some(f) => Error::InvalidConfig(format!(
                "disk image {image:?} holds no {f} filesystem at its start (a partitioned disk is not supported: \
                 the image must be the filesystem itself)"
            )),
            None => Error::Unsupported(format!(
                "the filesystem of disk image {image:?} is not ext2/3/4 (or the image is a partitioned disk): \
                 the guest mounts {} roots only",
                FSTYPES.join(", ")
            )),
        });
    }
    Ok((path, format))
}

/// The first 4 KiB of the image's contents, read by `qemu-img dd` as `format`.
fn read_head(path: &Path, format: &str) -> Result<Vec<u8>> {
    let tmp = tempfile_path();
    let out = Command::new("qemu-img")
        .args(["dd", "-f", format, "-O", "raw", "bs=4096", "count=1"])
        .arg(format!("if={}", path.display()))
        .arg(format!("of={}", tmp.display()))
        .output()
        .map_err(|e| Error::Runtime(format!("cannot run qemu-img (install qemu-utils): {e}")))?;
    let head = std::fs::read(&tmp);
    let _ = std::fs::remove_file(&tmp);
    if !out.status.success() {
        return Err(Error::InvalidConfig(format!(
            "disk image {} is not a readable {format} image: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    head.context(|| format!("reading the start of {}", path.display()))
}

fn tempfile_path() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!("msb-disk-head-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

/// Creates the sandbox's qcow2 overlay on `image` (opened read-only as its backing file).
pub fn create_overlay(image: &Path, format: &str, overlay: &Path) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(image)
        .arg(overlay)
        .output()
        .map_err(|e| Error::Runtime(format!("cannot run qemu-img (install qemu-utils): {e}")))?;
    if !out.status.success() {
        return Err(Error::Filesystem(format!(
            "qemu-img could not create the overlay {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_extension() {
        assert_eq!(format_of("/a/root.raw"), Some("raw"));
        assert_eq!(format_of("/a/ROOT.QCOW2"), Some("qcow2"));
        assert_eq!(format_of("./r.vmdk"), Some("vmdk"));
        assert_eq!(format_of("/a/rootfs"), None);
        assert_eq!(format_of("alpine:3.19"), None);
        assert_eq!(format_of("/a/root.img"), None);
    }

    #[test]
    fn fstypes() {
        assert!(check_fstype("ext4").is_ok());
        assert!(check_fstype("ext2").is_ok());
        assert!(matches!(check_fstype("xfs"), Err(Error::Unsupported(_))));
    }

    #[test]
    fn missing_and_non_ext_images() {
        assert!(matches!(check("/nonexistent/root.raw", None), Err(Error::ImageNotFound(_))));
        let dir = std::env::temp_dir().join(format!("msb-disk-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let zeros = dir.join("zeros.raw");
        std::fs::write(&zeros, vec![0u8; 8192]).unwrap();
        if Command::new("qemu-img").arg("--version").output().is_ok() {
            assert!(matches!(check(zeros.to_str().unwrap(), None), Err(Error::Unsupported(_))));
            assert!(matches!(check(zeros.to_str().unwrap(), Some("ext4")), Err(Error::InvalidConfig(_))));
            let mut ext = vec![0u8; 8192];
            ext[EXT_MAGIC_OFFSET..EXT_MAGIC_OFFSET + 2].copy_from_slice(&EXT_MAGIC);
            let fake = dir.join("ext.raw");
            std::fs::write(&fake, ext).unwrap();
            assert_eq!(check(fake.to_str().unwrap(), None).unwrap().1, "raw");
            assert!(matches!(check(fake.to_str().unwrap(), Some("btrfs")), Err(Error::Unsupported(_))));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
