//! The transfer disk, guest side: a raw virtio-blk disk (serial
//! [`TRANSFER_DISK_SERIAL`]) through which large filesystem transfers move, one slot of
//! the session's window at a time (see `fs.rs` and the protocol's `BulkWindow`).
//!
//! Every access uses `O_DIRECT`: the guest page cache never holds the disk's bytes, so a
//! slot the host rewrote is always read afresh, and QEMU copies the data straight between
//! the host file and guest memory (natively, even under TCG), which is what makes this
//! path fast. Offsets and lengths are rounded to [`BULK_ALIGN`] inside the slot; buffers
//! are [`AlignedBuf`]s.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use microsandbox_protocol::{BulkWindow, BULK_ALIGN, TRANSFER_DISK_SERIAL};

use crate::util::lock;

const SYS_BLOCK: &str = "/sys/block";

/// Name of the block device (e.g. `vdb`) whose serial is `serial`.
pub fn find(sys_block: &Path, serial: &str) -> Option<String> {
    fs::read_dir(sys_block).ok()?.flatten().find_map(|e| {
        let s = fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim_end() == serial).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

/// The opened transfer disk.
pub struct Disk {
    file: File,
    size: u64,
}

/// Opened on first use (it may probe after the root disk at boot) and kept for the agent's
/// life; unset until found, so a VM without the disk looks again at the next bulk request.
static DISK: OnceLock<Disk> = OnceLock::new();
static OPENING: Mutex<()> = Mutex::new(());

/// The transfer disk, if the VM has one.
pub fn disk() -> Option<&'static Disk> {
    if let Some(d) = DISK.get() {
        return Some(d);
    }
    let _g = lock(&OPENING);
    if let Some(d) = DISK.get() {
        return Some(d);
    }
    let dev = find(Path::new(SYS_BLOCK), TRANSFER_DISK_SERIAL)?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(Path::new("/dev").join(dev))
        .ok()?;
    let size = file.seek(SeekFrom::End(0)).ok()?;
    Some(DISK.get_or_init(|| Disk { file, size }))
}

/// `n` rounded up to the transfer alignment.
fn aligned(n: usize) -> usize {
    let a = BULK_ALIGN as usize;
    n.div_ceil(a) * a
}

impl Disk {
    /// A disk backed by any file (tests: a regular file stands in for the device).
    #[cfg(test)]
    pub fn from_file(file: File) -> Disk {
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Disk { file, size }
    }

    /// True when `w` lies on this disk.
    pub fn holds(&self, w: &BulkWindow) -> bool {
        w.fits(self.size)
    }

    /// Reads the `len` bytes of `slot` into the start of `buf`.
    pub fn read_slot(&self, w: &BulkWindow, slot: u32, len: u32, buf: &mut AlignedBuf) -> io::Result<()> {
        let at = locate(w, slot, len, buf)?;
        let n = aligned(len as usize);
        self.file.read_exact_at(&mut buf[..n], at)
    }

    /// Writes the first `len` bytes of `buf` to `slot` (padded to the alignment with
    /// whatever follows them in `buf`; the reader takes only `len`).
    pub fn write_slot(&self, w: &BulkWindow, slot: u32, len: u32, buf: &AlignedBuf) -> io::Result<()> {
        let at = locate(w, slot, len, buf)?;
        let n = aligned(len as usize);
        self.file.write_all_at(&buf[..n], at)
    }
}

fn locate(w: &BulkWindow, slot: u32, len: u32, buf: &AlignedBuf) -> io::Result<u64> {
    match w.locate(slot, len) {
        Some(at) if aligned(len as usize) <= buf.len() => Ok(at),
        _ => Err(io::Error::from_raw_os_error(libc::EPROTO)),
    }
}

/// Sets or clears `O_DIRECT` on an open file. Fails (EINVAL) where the filesystem has no
/// direct I/O, e.g. tmpfs before Linux 6.6.
pub fn set_direct(f: &File, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    // SAFETY: as above.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A zeroed heap buffer aligned to [`BULK_ALIGN`], as `O_DIRECT` requires.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` bytes (rounded up to the alignment); `None` when memory is short.
    pub fn new(len: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(aligned(len.max(1)), BULK_ALIGN as usize).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(AlignedBuf { ptr, layout })
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialised bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_disk_by_serial() {
        let dir = std::env::temp_dir().join(format!("msb-bulk-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (dev, serial) in [("vda", Some("")), ("vdb", Some("msb.transfer\n")), ("vdc", None)] {
            fs::create_dir_all(dir.join(dev)).unwrap();
            if let Some(s) = serial {
                fs::write(dir.join(dev).join("serial"), s).unwrap();
            }
        }
        assert_eq!(find(&dir, "msb.transfer").as_deref(), Some("vdb"));
        assert_eq!(find(&dir, "other"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn buffers_are_aligned_and_slots_bounded() {
        let buf = AlignedBuf::new(5000).unwrap();
        assert_eq!(buf.as_ptr() as usize % BULK_ALIGN as usize, 0);
        assert_eq!(buf.len(), 8192);
        let w = BulkWindow { offset: 0, slot_size: 8192, slots: 2 };
        assert_eq!(locate(&w, 1, 8192, &buf).unwrap(), 8192);
        assert!(locate(&w, 2, 1, &buf).is_err());
        assert!(locate(&w, 0, 8193, &buf).is_err());
        let small = AlignedBuf::new(4096).unwrap();
        assert!(locate(&w, 0, 4097, &small).is_err(), "never past the buffer");
    }

    #[test]
    fn slots_round_trip_through_a_file() {
        // A regular file stands in for the disk (tmp may not do O_DIRECT: open plainly).
        let path = std::env::temp_dir().join(format!("msb-bulk-disk-{}", std::process::id()));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(4 * 8192).unwrap();
        let disk = Disk::from_file(file);
        let w = BulkWindow { offset: 16384, slot_size: 8192, slots: 2 };
        assert!(disk.holds(&w));
        assert!(!disk.holds(&BulkWindow { offset: 32768, ..w }));
        let mut buf = AlignedBuf::new(8192).unwrap();
        buf[..5].copy_from_slice(b"hello");
        disk.write_slot(&w, 1, 5, &buf).unwrap();
        let mut back = AlignedBuf::new(8192).unwrap();
        disk.read_slot(&w, 1, 5, &mut back).unwrap();
        assert_eq!(&back[..5], b"hello");
        let _ = fs::remove_file(&path);
    }
}
