//! Growing the root filesystem to fill its disk, at boot.
//!
//! A sandbox on a registry image boots from a qcow2 overlay that is larger than the shared
//! image root by its `oci_upper_size`, while the ext4 inside is only as large as the image.
//! The first boot grows it online (`EXT4_IOC_RESIZE_FS`) to the device size; that is
//! written to the overlay, so later boots find nothing to do. The image roots are built
//! with `meta_bg` (no reserved descriptor blocks needed) and `uninit_bg` (new groups' inode
//! tables are zeroed lazily), which keeps the growth to a few metadata writes.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

const SUPERBLOCK_OFFSET: u64 = 1024;
const SUPERBLOCK_LEN: usize = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;

nix::ioctl_write_ptr!(ext4_resize_fs, b'f', 16, u64);

/// `(block count, block size)` from an ext4 superblock; `None` if it is not one.
pub fn parse_superblock(sb: &[u8]) -> Option<(u64, u64)> {
    if sb.len() < SUPERBLOCK_LEN {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != EXT4_MAGIC {
        return None;
    }
    let log = u32_at(0x18);
    if log > 6 {
        return None; // ext4 blocks are 1 KiB to 64 KiB
    }
    let mut blocks = u64::from(u32_at(0x4));
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    Some((blocks, 1024 << log))
}

/// Grows the ext4 on `dev` (mounted at `mountpoint`) to the device size, read from
/// `sectors_file` (sysfs `size`, 512-byte sectors). Returns the new block count when it
/// grew, `None` when the filesystem already fills the device.
pub fn grow_to_device(dev: &str, sectors_file: &str, mountpoint: &str) -> Result<Option<u64>, String> {
    let mut sb = [0u8; SUPERBLOCK_LEN];
    File::open(dev)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))?;
            f.read_exact(&mut sb)
        })
        .map_err(|e| format!("cannot read the superblock of {dev}: {e}"))?;
    let (blocks, block_size) = parse_superblock(&sb).ok_or_else(|| format!("{dev} holds no ext4 filesystem"))?;
    let sectors: u64 = fs::read_to_string(sectors_file)
        .map_err(|e| format!("cannot read {sectors_file}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("bad device size in {sectors_file}: {e}"))?;
    let device_blocks = sectors * 512 / block_size;
    if device_blocks <= blocks {
        return Ok(None);
    }
    let root = File::open(mountpoint).map_err(|e| format!("cannot open {mountpoint}: {e}"))?;
    // SAFETY: the fd is open for the whole call and the argument is a valid u64.
    unsafe { ext4_resize_fs(root.as_raw_fd(), &device_blocks) }
        .map_err(|e| format!("cannot grow the root filesystem from {blocks} to {device_blocks} blocks: {e}"))?;
    Ok(Some(device_blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(blocks: u64, log: u32, bit64: bool) -> Vec<u8> {
        let mut sb = vec![0u8; SUPERBLOCK_LEN];
        sb[0x4..0x8].copy_from_slice(&(blocks as u32).to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&log.to_le_bytes());
        sb[0x38..0x3a].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        if bit64 {
            sb[0x60..0x64].copy_from_slice(&INCOMPAT_64BIT.to_le_bytes());
            sb[0x150..0x154].copy_from_slice(&((blocks >> 32) as u32).to_le_bytes());
        }
        sb
    }

    #[test]
    fn reads_block_count_and_size() {
        assert_eq!(parse_superblock(&superblock(1593, 2, false)), Some((1593, 4096)));
        assert_eq!(parse_superblock(&superblock((5 << 32) + 7, 2, true)), Some(((5 << 32) + 7, 4096)));
    }

    #[test]
    fn rejects_what_is_not_ext4() {
        assert_eq!(parse_superblock(&[0u8; SUPERBLOCK_LEN]), None);
        assert_eq!(parse_superblock(&superblock(1, 40, false)), None);
        assert_eq!(parse_superblock(&[0u8; 10]), None);
    }

    /// A real mke2fs image in a file larger than the filesystem: the size check sees it.
    #[test]
    fn finds_nothing_to_do_when_the_filesystem_fills_the_device() {
        let t = std::env::temp_dir().join(format!("msb-growfs-{}", std::process::id()));
        fs::create_dir_all(&t).unwrap();
        let img = t.join("fs.img");
        let made = std::process::Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
            .arg(&img)
            .arg("8M")
            .env("MKE2FS_CONFIG", "/dev/null")
            .status()
            .expect("mke2fs (Debian's e2fsprogs) is needed by this test");
        assert!(made.success());
        let sectors = t.join("size");
        fs::write(&sectors, format!("{}\n", (8 << 20) / 512)).unwrap();
        let img = img.to_str().unwrap();
        assert_eq!(grow_to_device(img, sectors.to_str().unwrap(), "/nonexistent"), Ok(None));
        fs::write(&sectors, format!("{}\n", (16 << 20) / 512)).unwrap();
        // It would grow now; the ioctl needs the mounted filesystem, which a test cannot have.
        let err = grow_to_device(img, sectors.to_str().unwrap(), "/nonexistent").unwrap_err();
        assert!(err.contains("/nonexistent"), "{err}");
        let _ = fs::remove_dir_all(&t);
    }
}
