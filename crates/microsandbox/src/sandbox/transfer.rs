//! The bulk-transfer disk, host side: a sparse raw file in the sandbox directory that QEMU
//! attaches as a second virtio-blk disk. Large `sb.fs` transfers move through it instead
//! of through virtio-serial frames: under TCG the guest reads and writes a block device
//! with `O_DIRECT` at several times the rate it can push bytes through the serial port,
//! because QEMU copies the data natively (measured figures in DESIGN.md).
//!
//! Invariants:
//! - The engine decides the geometry ([`TransferSpec`]) and creates the file at each boot;
//!   the supervisor lends windows of it to sessions (one session per window, so
//!   concurrent transfers never share bytes) and discards a window's data when both ends
//!   are done with it.
//! - The guest owns the disk and may write anywhere on it: nothing read from it is
//!   trusted. [`WindowFile`] reads and writes only inside the session's window and at
//!   most one slot at a time, so a lying guest costs at most one slot of memory.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use microsandbox_protocol::BulkWindow;
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// File name of the transfer disk in the sandbox directory.
pub const TRANSFER_DISK: &str = "transfer.raw";
/// Bytes per slot: large `O_DIRECT` requests are what make the disk fast under TCG
/// (4 MiB: ~1.4× the throughput of 1 MiB, measured), and a slot is the unit of memory a
/// peer can make the host allocate.
pub const SLOT_SIZE: u32 = 4 << 20;
/// Slots per window: one being filled, one being drained, two in flight.
pub const SLOTS: u32 = 4;
/// Windows on the disk: this many transfers run concurrently on the disk; more fall back
/// to frames.
pub const WINDOWS: u32 = 4;

/// What the supervisor needs to lend windows of the transfer disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransferSpec {
    pub path: PathBuf,
    pub windows: u32,
    pub slots: u32,
    pub slot_size: u32,
}

impl TransferSpec {
    /// Window number `i`, or `None` past the last.
    pub fn window(&self, i: u32) -> Option<BulkWindow> {
        (i < self.windows).then(|| {
            let len = self.slots as u64 * self.slot_size as u64;
            BulkWindow { offset: i as u64 * len, slot_size: self.slot_size, slots: self.slots }
        })
    }

    /// Size of the whole disk in bytes.
    pub fn size(&self) -> u64 {
        self.windows as u64 * self.slots as u64 * self.slot_size as u64
    }
}

/// Creates (or empties) the sparse transfer disk in `dir`; it takes no space until used.
pub fn prepare(dir: &Path) -> Result<TransferSpec> {
    let spec = TransferSpec { path: dir.join(TRANSFER_DISK), windows: WINDOWS, slots: SLOTS, slot_size: SLOT_SIZE };
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&spec.path)
        .context(|| format!("creating {}", spec.path.display()))?;
    f.set_len(spec.size()).context(|| format!("sizing {}", spec.path.display()))?;
    Ok(spec)
}

/// One session's window of the transfer disk, opened by the client.
#[derive(Clone)]
pub struct WindowFile {
    file: Arc<File>,
    window: BulkWindow,
}

fn bad_slot(what: &str, slot: u32, len: u32, w: &BulkWindow) -> Error {
    Error::Protocol(format!(
        "{what} names {len} bytes in slot {slot}, outside the session's window ({} slots of {} bytes)",
        w.slots, w.slot_size
    ))
}

impl WindowFile {
    /// Opens the transfer disk at `path` for reading and writing.
    pub fn open_disk(path: &Path) -> std::io::Result<Arc<File>> {
        OpenOptions::new().read(true).write(true).open(path).map(Arc::new)
    }

    /// Checks that `window` is a sane window of `file` (whose size the engine chose).
    pub fn new(file: Arc<File>, window: BulkWindow) -> Result<WindowFile> {
        let size = file.metadata().map_err(|e| Error::Io { context: "reading the transfer disk size".into(), source: e })?.len();
        if !window.fits(size) {
            return Err(Error::Protocol(format!("transfer window {window:?} does not fit the {size}-byte transfer disk")));
        }
        Ok(WindowFile { file, window })
    }

    pub fn window(&self) -> &BulkWindow {
        &self.window
    }

    /// The `len` bytes a peer put in `slot`. Refuses anything outside the window.
    pub async fn read_slot(&self, slot: u32, len: u32) -> Result<Vec<u8>> {
        let at = self.window.locate(slot, len).ok_or_else(|| bad_slot("the guest", slot, len, &self.window))?;
        let file = self.file.clone();
        blocking(move || {
            let mut buf = vec![0u8; len as usize];
            file.read_exact_at(&mut buf, at).map(|_| buf)
        })
        .await
        .map_err(|e| Error::Io { context: "reading the transfer disk".into(), source: e })
    }

    /// Copies the `len` bytes a peer put in `slot` to byte `at` of `dst`, in the kernel
    /// (`copy_file_range`) where it can, so they never pass through this process.
    pub async fn copy_slot_to(&self, slot: u32, len: u32, dst: Arc<File>, at: u64) -> Result<()> {
        let from = self.window.locate(slot, len).ok_or_else(|| bad_slot("the guest", slot, len, &self.window))?;
        let file = self.file.clone();
        blocking(move || {
            let (mut off_in, mut off_out, mut left) = (from as i64, at as i64, len as usize);
            while left > 0 {
                // SAFETY: both fds are open for the call; the offsets are ours.
                let n = unsafe {
                    libc::copy_file_range(file.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, left, 0)
                };
                match n {
                    n if n > 0 => left -= n as usize,
                    // The transfer disk never ends inside a window (checked in `new`).
                    0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    _ => {
                        let e = std::io::Error::last_os_error();
                        match e.raw_os_error() {
                            Some(libc::EINTR) => {}
                            // Not possible between these files (e.g. a device): copy by hand.
                            Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF) => {
                                let mut buf = vec![0u8; left];
                                file.read_exact_at(&mut buf, off_in as u64)?;
                                return dst.write_all_at(&buf, off_out as u64);
                            }
                            _ => return Err(e),
                        }
                    }
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Io { context: "copying from the transfer disk".into(), source: e })
    }

    /// Fills `slot` from byte `pos` on with at most `max` bytes of `src` read at `src_at`,
    /// in the kernel where it can; returns how many (fewer only at the end of `src`).
    pub async fn fill_slot_from(&self, slot: u32, pos: u32, max: u32, src: Arc<File>, src_at: u64) -> Result<u32> {
        let end = pos.checked_add(max).ok_or_else(|| bad_slot("an upload", slot, u32::MAX, &self.window))?;
        let at = self.window.locate(slot, end).ok_or_else(|| bad_slot("an upload", slot, end, &self.window))?;
        let file = self.file.clone();
        blocking(move || {
            let (mut off_in, mut off_out, mut done) = (src_at as i64, (at + pos as u64) as i64, 0usize);
            let max = max as usize;
            while done < max {
                // SAFETY: both fds are open for the call; the offsets are ours.
                let n = unsafe {
                    libc::copy_file_range(src.as_raw_fd(), &mut off_in, file.as_raw_fd(), &mut off_out, max - done, 0)
                };
                match n {
                    0 => break,
                    n if n > 0 => done += n as usize,
                    _ => {
                        let e = std::io::Error::last_os_error();
                        match e.raw_os_error() {
                            Some(libc::EINTR) => {}
                            Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EBADF) => {
                                let mut buf = vec![0u8; max - done];
                                let mut got = 0;
                                while got < buf.len() {
                                    match src.read_at(&mut buf[got..], off_in as u64 + got as u64) {
                                        Ok(0) => break,
                                        Ok(k) => got += k,
                                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                                        Err(e) => return Err(e),
                                    }
                                }
                                file.write_all_at(&buf[..got], off_out as u64)?;
                                return Ok((done + got) as u32);
                            }
                            _ => return Err(e),
                        }
                    }
                }
            }
            Ok(done as u32)
        })
        .await
        .map_err(|e| Error::Io { context: "copying into the transfer disk".into(), source: e })
    }

    /// Writes `data[range]` at byte `pos` of `slot`; it must fit the slot. `data` is
    /// shared so that a caller's buffer reaches the file without another copy.
    pub async fn write_slot(&self, slot: u32, pos: u32, data: Arc<Vec<u8>>, range: Range<usize>) -> Result<()> {
        let end = (pos as u64 + range.len() as u64).min(u32::MAX as u64) as u32;
        let at = self.window.locate(slot, end).ok_or_else(|| bad_slot("an upload", slot, end, &self.window))?;
        let file = self.file.clone();
        blocking(move || file.write_all_at(&data[range], at + pos as u64))
            .await
            .map_err(|e| Error::Io { context: "writing the transfer disk".into(), source: e })
    }
}

/// Runs file I/O off the async workers: the host page cache may make a write wait for
/// writeback under memory pressure.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("transfer disk task failed: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_tile_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spec = prepare(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&spec.path).unwrap().len(), spec.size());
        let last = spec.window(spec.windows - 1).unwrap();
        assert_eq!(last.offset + last.span(), spec.size());
        assert!(last.fits(spec.size()));
        assert!(spec.window(spec.windows).is_none());
    }

    #[tokio::test]
    async fn slots_are_bounded_by_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let spec = prepare(dir.path()).unwrap();
        let file = WindowFile::open_disk(&spec.path).unwrap();
        let w = WindowFile::new(file.clone(), spec.window(1).unwrap()).unwrap();
        w.write_slot(2, 10, Arc::new(b"<hello>".to_vec()), 1..6).await.unwrap();
        let got = w.read_slot(2, 15).await.unwrap();
        assert_eq!(&got[10..], b"hello");
        let src = Arc::new(tempfile::tempfile().unwrap());
        src.write_all_at(b"0123456789", 0).unwrap();
        assert_eq!(w.fill_slot_from(3, 100, 64, src.clone(), 4).await.unwrap(), 6, "stops at the end of the source");
        assert_eq!(w.read_slot(3, 106).await.unwrap()[100..], *b"456789");
        assert!(matches!(w.fill_slot_from(3, SLOT_SIZE - 1, 2, src, 0).await, Err(Error::Protocol(_))));
        let out = Arc::new(tempfile::tempfile().unwrap());
        w.copy_slot_to(2, 15, out.clone(), 3).await.unwrap();
        let mut copied = vec![0u8; 18];
        out.read_exact_at(&mut copied, 0).unwrap();
        assert_eq!(&copied[13..], b"hello");
        // A lying peer: slot past the window, length past the slot.
        assert!(matches!(w.read_slot(SLOTS, 1).await, Err(Error::Protocol(_))));
        assert!(matches!(w.read_slot(0, SLOT_SIZE + 1).await, Err(Error::Protocol(_))));
        assert!(matches!(w.copy_slot_to(SLOTS, 1, out.clone(), 0).await, Err(Error::Protocol(_))));
        assert!(matches!(w.write_slot(0, SLOT_SIZE - 2, Arc::new(vec![0; 3]), 0..3).await, Err(Error::Protocol(_))));
        // A window that does not fit the file is refused up front.
        let huge = BulkWindow { offset: spec.size(), slot_size: SLOT_SIZE, slots: 1 };
        assert!(WindowFile::new(file, huge).is_err());
    }
}
