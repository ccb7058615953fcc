//! Guest filesystem sessions: one `FsRequest` each, served on its own thread so a big
//! transfer never blocks the port reader.
//!
//! - downloads (`read`) and `list` stream `FsData` frames of at most `MAX_CHUNK` bytes,
//!   then `FsDone`;
//! - uploads (`write`) queue the host's `FsData` frames in a bounded channel that the
//!   session thread writes to the file as they arrive; `FsEof` ends the upload. When the
//!   disk is slower than the port the dispatcher waits for room (at most
//!   [`UPLOAD_QUEUE`] frames are buffered), so memory stays bounded and nothing is lost;
//! - every session ends with exactly one `FsDone` or `Error{code: "fs-error", errno}`,
//!   sent after the session left the table;
//! - the host giving up (it sends `Signal` when a client disconnects) cancels the session
//!   between chunks. A cancelled upload leaves the partly written file;
//! - downloads and `list` send within the session's flow-control window (flow.rs).
//!
//! Bulk sessions (the request carries a transfer-disk `window`, see `bulk.rs`): a `read`
//! of a regular file of at least `BULK_MIN` bytes fills the window's slots and sends
//! `FsBulk` for each, reusing a slot only after the host's `FsAck`; a `write` takes
//! `FsBulk` from the host through the same queue as `FsData` and acks each slot once its
//! bytes are in the file. The file itself is read and written with `O_DIRECT` where the
//! filesystem allows it: under TCG the guest kernel's buffered write path is the slowest
//! part of an upload (measured in DESIGN.md), while direct I/O lets QEMU move the bytes.
//! `FsBulk`/`FsAck` count against the flow-control window like `FsData`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::sync::Mutex;

use microsandbox_protocol::{
    BulkWindow, FsAck, FsBulk, FsDone, FsEntry, FsKind, FsOp, FsRequest, FsStat, Frame, Kind, PathBytes, BULK_ALIGN,
    BULK_MIN, MAX_CHUNK,
};

use crate::bulk::{self, AlignedBuf};
use crate::flow::{self, Window, Windows};
use crate::util::{self, lock};
use crate::wire::Sink;

/// Upload frames buffered per session before the port reader waits for the disk.
const UPLOAD_QUEUE: usize = 64;
/// Serialized `FsEntry` bytes per `list` frame: one data chunk, like every output frame
/// (a frame must fit the flow-control window).
const LIST_BATCH: usize = MAX_CHUNK;
/// Most slots a window may have (the host chooses 4): bounds the ack queue.
const MAX_SLOTS: u32 = 64;
/// Largest slot the agent allocates a buffer for.
const MAX_SLOT_SIZE: u32 = 64 << 20;

enum Chunk {
    Data(Vec<u8>),
    /// Upload bytes waiting in a slot of the session's window.
    Bulk(FsBulk),
    Eof,
}

struct Handle {
    cancel: Arc<AtomicBool>,
    upload: Option<SyncSender<Chunk>>,
    /// Slots the host handed back, for a bulk download.
    acks: Option<SyncSender<u32>>,
}

/// All live filesystem sessions.
pub struct FsSessions {
    table: Mutex<HashMap<u32, Handle>>,
    windows: Windows,
    sink: Sink,
}

/// A failed operation: the errno and what was being done.
#[derive(Debug)]
struct Failure {
    errno: i32,
    message: String,
}

impl Failure {
    /// "<what> <path>: <errno>", the path escaped (`\xFF`, `\n`) so it is exact.
    fn new(what: &str, path: &Path, errno: i32) -> Failure {
        Failure { errno, message: format!("{what} {}: {}", show(path), describe(errno)) }
    }

    fn io(what: &str, path: &Path, e: &io::Error) -> Failure {
        Failure::new(what, path, e.raw_os_error().unwrap_or(libc::EIO))
    }

    /// Like [`io`](Self::io) for an operation on two paths.
    fn io2(what: &str, from: &Path, to: &Path, e: &io::Error) -> Failure {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        Failure { errno, message: format!("{what} {} to {}: {}", show(from), show(to), describe(errno)) }
    }
}

/// A path for a message, exact whatever its bytes.
fn show(p: &Path) -> String {
    microsandbox_protocol::escape(p.as_os_str().as_bytes())
}

/// `ENOENT (No such file or directory)`.
fn describe(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text.split(" (os error").next().unwrap_or(&text).to_string();
    match errno_name(errno) {
        Some(name) => format!("{name} ({text})"),
        None => format!("errno {errno} ({text})"),
    }
}

fn errno_name(errno: i32) -> Option<&'static str> {
    use libc::*;
    Some(match errno {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EIO => "EIO",
        ENXIO => "ENXIO",
        E2BIG => "E2BIG",
        EBADF => "EBADF",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        EXDEV => "EXDEV",
        ENODEV => "ENODEV",
        ENOTDIR => "ENOTDIR",
        EISDIR => "EISDIR",
        EINVAL => "EINVAL",
        ENFILE => "ENFILE",
        EMFILE => "EMFILE",
        ETXTBSY => "ETXTBSY",
        EFBIG => "EFBIG",
        ENOSPC => "ENOSPC",
        ESPIPE => "ESPIPE",
        EROFS => "EROFS",
        EMLINK => "EMLINK",
        ENAMETOOLONG => "ENAMETOOLONG",
        ENOTEMPTY => "ENOTEMPTY",
        ELOOP => "ELOOP",
        EOVERFLOW => "EOVERFLOW",
        EOPNOTSUPP => "EOPNOTSUPP",
        EDQUOT => "EDQUOT",
        ECANCELED => "ECANCELED",
        _ => return None,
    })
}

fn kind_of(ft: fs::FileType) -> FsKind {
    if ft.is_symlink() {
        FsKind::Symlink
    } else if ft.is_dir() {
        FsKind::Directory
    } else if ft.is_file() {
        FsKind::File
    } else {
        FsKind::Other
    }
}

impl FsSessions {
    pub fn new(sink: Sink) -> Arc<FsSessions> {
        Arc::new(FsSessions { table: Mutex::new(HashMap::new()), windows: Windows::default(), sink })
    }

    /// Starts session `id`. Failures are answered with one `Error` frame.
    pub fn start(self: &Arc<Self>, id: u32, req: FsRequest) {
        if id == 0 || lock(&self.table).contains_key(&id) {
            self.sink.error(id, "invalid-request", format!("session id {id} is reserved or in use"), None);
            return;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let (upload, rx) = if matches!(req.op, FsOp::Write | FsOp::Append) {
            let (tx, rx) = sync_channel(UPLOAD_QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // Only plain reads and writes use the transfer disk.
        let slots = req
            .window
            .filter(|w| w.slots <= MAX_SLOTS && w.slot_size <= MAX_SLOT_SIZE)
            .filter(|_| matches!(req.op, FsOp::Read | FsOp::Write));
        let (acks, acks_rx) = match slots {
            Some(w) if req.op == FsOp::Read => {
                let (tx, rx) = sync_channel(w.slots as usize);
                (Some(tx), Some(rx))
            }
            _ => (None, None),
        };
        lock(&self.table).insert(id, Handle { cancel: cancel.clone(), upload, acks });
        let window = self.windows.open(id);
        let this = self.clone();
        let started = util::spawn(&format!("fs-{id}"), move || {
            let bulk = Bulk { window: slots, acks: acks_rx };
            let res = this.run(id, &req, rx, &cancel, &window, bulk);
            lock(&this.table).remove(&id);
            this.windows.close(id);
            match res {
                Ok(done) => this.sink.send(&Frame::json(id, Kind::FsDone, &done)),
                Err(f) => this.sink.error(id, "fs-error", f.message, Some(f.errno)),
            }
        });
        if let Err(e) = started {
            lock(&self.table).remove(&id);
            self.windows.close(id);
            self.sink.error(id, "fs-error", format!("cannot start a session thread: {e}"), e.raw_os_error());
        }
    }

    /// Queues upload bytes; waits while the session's queue is full. Frames for unknown
    /// or finished sessions are dropped.
    pub fn data(&self, id: u32, data: Vec<u8>) {
        let tx = lock(&self.table).get(&id).and_then(|h| h.upload.clone());
        if let Some(tx) = tx {
            let _ = tx.send(Chunk::Data(data));
        }
    }

    /// Queues an upload slot (like [`data`](Self::data)).
    pub fn bulk(&self, id: u32, b: FsBulk) {
        let tx = lock(&self.table).get(&id).and_then(|h| h.upload.clone());
        if let Some(tx) = tx {
            let _ = tx.send(Chunk::Bulk(b));
        }
    }

    /// The host is done with a download slot. Never waits: the queue holds as many acks
    /// as the window has slots, and a host acking more is ignored.
    pub fn ack(&self, id: u32, a: FsAck) {
        if let Some(tx) = lock(&self.table).get(&id).and_then(|h| h.acks.as_ref()) {
            let _ = tx.try_send(a.slot);
        }
    }

    /// Ends an upload.
    pub fn eof(&self, id: u32) {
        let tx = lock(&self.table).get_mut(&id).and_then(|h| h.upload.take());
        if let Some(tx) = tx {
            let _ = tx.send(Chunk::Eof);
        }
    }

    /// Cancels session `id` (the host gave up on it). Unknown ids are ignored.
    pub fn cancel(&self, id: u32) {
        if let Some(h) = lock(&self.table).get_mut(&id) {
            h.cancel.store(true, Ordering::SeqCst);
            h.upload = None;
            h.acks = None;
            // A download waiting for credit that will never come gives up now.
            self.windows.close(id);
        }
    }

    /// The host consumed `bytes` of session `id`'s data.
    pub fn credit(&self, id: u32, bytes: usize) {
        self.windows.credit(id, bytes);
    }

    /// Sends one `FsData` frame within the window; false when the session was cancelled.
    fn send_data(&self, id: u32, window: &Window, bytes: Vec<u8>) -> bool {
        self.send_within(window, Frame::data(id, Kind::FsData, bytes))
    }

    /// Sends any output frame of a session within its window; false when cancelled.
    fn send_within(&self, window: &Window, frame: Frame) -> bool {
        if !window.acquire(flow::cost(frame.payload.len())) {
            return false;
        }
        self.sink.send(&frame);
        true
    }

    fn run(
        &self,
        id: u32,
        req: &FsRequest,
        rx: Option<Receiver<Chunk>>,
        cancel: &AtomicBool,
        window: &Window,
        bulk: Bulk,
    ) -> Result<FsDone, Failure> {
        let op = format!("{:?}", req.op).to_lowercase();
        let path = checked(&op, &req.path)?;
        let path2 = || match &req.path2 {
            Some(p) => checked(&op, p),
            None => Err(Failure { errno: libc::EINVAL, message: format!("{op} {}: a destination path is required", show(path)) }),
        };
        let cancelled = || Failure::new(&op, path, libc::ECANCELED);
        match req.op {
            FsOp::Read => {
                let mut f = File::open(path).map_err(|e| Failure::io("read", path, &e))?;
                let meta = f.metadata().ok();
                if meta.as_ref().is_some_and(|m| m.is_dir()) {
                    return Err(Failure::new("read", path, libc::EISDIR));
                }
                let big = meta.is_some_and(|m| m.is_file() && m.len() >= BULK_MIN);
                if let (true, Some(w), Some(acks), Some(disk)) = (big, bulk.window, bulk.acks, bulk::disk()) {
                    if disk.holds(&w) {
                        let total = self.download(id, &f, path, &w, disk, &acks, cancel, window)?;
                        return Ok(FsDone { size: Some(total), ..Default::default() });
                    }
                }
                let mut buf = vec![0u8; MAX_CHUNK];
                let mut total = 0u64;
                loop {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(cancelled());
                    }
                    let n = match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(Failure::io("read", path, &e)),
                    };
                    if !self.send_data(id, window, buf[..n].to_vec()) {
                        return Err(cancelled());
                    }
                    total += n as u64;
                }
                Ok(FsDone { size: Some(total), ..Default::default() })
            }
            FsOp::Write | FsOp::Append => {
                let rx = rx.expect("upload sessions have a queue");
                let mut f = if req.op == FsOp::Append {
                    OpenOptions::new().append(true).open(path).map_err(|e| Failure::io("append", path, &e))?
                } else {
                    OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(req.mode.unwrap_or(0o644))
                        .open(path)
                        .map_err(|e| Failure::io("write", path, &e))?
                };
                if let (FsOp::Write, Some(mode)) = (req.op, req.mode) {
                    // Exact bits: creation above is subject to the umask and skips existing files.
                    f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))
                        .map_err(|e| Failure::io("write", path, &e))?;
                }
                let mut up = match (bulk.window, bulk::disk()) {
                    (Some(w), Some(disk)) if disk.holds(&w) => Some(Upload::new(&f, w, disk, path)?),
                    _ => None,
                };
                let mut total = 0u64;
                loop {
                    match rx.recv() {
                        Ok(Chunk::Data(d)) => {
                            match up.as_mut() {
                                // Positional, like the bulk writes it may follow.
                                Some(up) => {
                                    up.buffered(&f);
                                    f.write_all_at(&d, total)
                                }
                                None => f.write_all(&d),
                            }
                            .map_err(|e| Failure::io("write", path, &e))?;
                            total += d.len() as u64;
                        }
                        Ok(Chunk::Bulk(b)) => {
                            let up = up.as_mut().ok_or_else(|| Failure::new("write", path, libc::EPROTO))?;
                            up.write(&f, b, total, path)?;
                            if !self.send_within(window, Frame::json(id, Kind::FsAck, &FsAck { slot: b.slot })) {
                                return Err(cancelled());
                            }
                            total += b.len as u64;
                        }
                        Ok(Chunk::Eof) => break,
                        Err(_) => return Err(cancelled()),
                    }
                    if cancel.load(Ordering::Relaxed) {
                        return Err(cancelled());
                    }
                }
                Ok(FsDone { size: Some(total), ..Default::default() })
            }
            FsOp::Exists => match fs::metadata(path) {
                Ok(_) => Ok(FsDone { exists: Some(true), ..Default::default() }),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                    Ok(FsDone { exists: Some(false), ..Default::default() })
                }
                Err(e) => Err(Failure::io("exists?", path, &e)),
            },
            FsOp::Mkdir => {
                let mut b = fs::DirBuilder::new();
                b.recursive(req.parents).mode(req.mode.unwrap_or(0o755));
                // `recursive` accepts an existing directory but must not accept a file.
                if req.parents {
                    if let Ok(m) = fs::metadata(path) {
                        if !m.is_dir() {
                            return Err(Failure::new("mkdir", path, libc::EEXIST));
                        }
                    }
                }
                b.create(path).map_err(|e| Failure::io("mkdir", path, &e))?;
                if let Some(mode) = req.mode {
                    fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
                        .map_err(|e| Failure::io("mkdir", path, &e))?;
                }
                Ok(FsDone::default())
            }
            FsOp::Remove => {
                let m = fs::symlink_metadata(path).map_err(|e| Failure::io("remove", path, &e))?;
                let res = if !m.is_dir() {
                    fs::remove_file(path)
                } else if req.recursive {
                    fs::remove_dir_all(path)
                } else {
                    fs::remove_dir(path)
                };
                res.map_err(|e| Failure::io("remove", path, &e))?;
                Ok(FsDone::default())
            }
            FsOp::Copy => {
                let dst = path2()?;
                let m = fs::metadata(path).map_err(|e| Failure::io("copy", path, &e))?;
                if m.is_dir() {
                    return Err(Failure::new("copy", path, libc::EISDIR));
                }
                let n = fs::copy(path, dst).map_err(|e| Failure::io2("copy", path, dst, &e))?;
                Ok(FsDone { size: Some(n), ..Default::default() })
            }
            FsOp::Rename => {
                let dst = path2()?;
                fs::rename(path, dst).map_err(|e| Failure::io2("rename", path, dst, &e))?;
                Ok(FsDone::default())
            }
            FsOp::List => {
                let dir = fs::read_dir(path).map_err(|e| Failure::io("list", path, &e))?;
                let mut batch: Vec<u8> = b"[".to_vec();
                for entry in dir {
                    if cancel.load(Ordering::Relaxed) {
                        return Err(cancelled());
                    }
                    let entry = entry.map_err(|e| Failure::io("list", path, &e))?;
                    // An entry removed meanwhile is skipped.
                    let Ok(m) = entry.metadata() else { continue };
                    let e = FsEntry {
                        name: entry.file_name().into_vec().into(),
                        kind: kind_of(m.file_type()),
                        size: m.len(),
                        mode: m.mode() & 0o7777,
                        mtime_sec: m.mtime(),
                        mtime_nsec: m.mtime_nsec().clamp(0, 999_999_999) as u32,
                    };
                    let json = serde_json::to_vec(&e).expect("entries serialize");
                    // Flush before an entry would take the frame past LIST_BATCH (`,` and `]`
                    // included); one entry (a name of at most 255 bytes) always fits.
                    if batch.len() > 1 && batch.len() + json.len() + 2 > LIST_BATCH {
                        batch.push(b']');
                        if !self.send_data(id, window, std::mem::replace(&mut batch, b"[".to_vec())) {
                            return Err(cancelled());
                        }
                    }
                    if batch.len() > 1 {
                        batch.push(b',');
                    }
                    batch.extend(json);
                }
                if batch.len() > 1 {
                    batch.push(b']');
                    if !self.send_data(id, window, batch) {
                        return Err(cancelled());
                    }
                }
                Ok(FsDone::default())
            }
            FsOp::Symlink => {
                // The target is stored as given: relative targets are legitimate.
                let target = match req.path2.as_ref().map(|t| t.as_bytes()) {
                    Some(t) if !t.is_empty() && !t.contains(&0) => Path::new(OsStr::from_bytes(t)),
                    _ => {
                        return Err(Failure {
                            errno: libc::EINVAL,
                            message: format!("symlink {}: the target must be a non-empty string without NUL bytes", show(path)),
                        })
                    }
                };
                std::os::unix::fs::symlink(target, path).map_err(|e| Failure::io("symlink", path, &e))?;
                Ok(FsDone::default())
            }
            FsOp::Stat => {
                let m = fs::symlink_metadata(path).map_err(|e| Failure::io("stat", path, &e))?;
                let stat = FsStat {
                    kind: kind_of(m.file_type()),
                    size: m.len(),
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    mtime_sec: m.mtime(),
                    mtime_nsec: m.mtime_nsec().clamp(0, 999_999_999) as u32,
                    // std reads the birth time with statx; filesystems without one give Err.
                    btime_sec: None,
                    btime_nsec: None,
                };
                let stat = match m.created().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()) {
                    Some(d) => FsStat {
                        btime_sec: i64::try_from(d.as_secs()).ok(),
                        btime_nsec: Some(d.subsec_nanos()),
                        ..stat
                    },
                    None => stat,
                };
                Ok(FsDone { stat: Some(stat), ..Default::default() })
            }
        }
    }
}

/// A session's share of the transfer disk, if any.
struct Bulk {
    window: Option<BulkWindow>,
    /// Slots the host handed back (bulk `read` only).
    acks: Option<Receiver<u32>>,
}

impl FsSessions {
    /// Streams `f` through the window's slots; returns the bytes sent.
    #[allow(clippy::too_many_arguments)]
    fn download(
        &self,
        id: u32,
        mut f: &File,
        path: &Path,
        w: &BulkWindow,
        disk: &bulk::Disk,
        acks: &Receiver<u32>,
        cancel: &AtomicBool,
        flow: &Window,
    ) -> Result<u64, Failure> {
        let mut buf = AlignedBuf::new(w.slot_size as usize).ok_or_else(|| Failure::new("read", path, libc::ENOMEM))?;
        // Direct reads skip the guest page cache: several times faster than a cold
        // buffered read under TCG. Filesystems without direct I/O read buffered.
        let mut direct = bulk::set_direct(f, true).is_ok();
        let mut free: Vec<u32> = (0..w.slots).rev().collect();
        let mut lent = vec![false; w.slots as usize];
        let mut total = 0u64;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(Failure::new("read", path, libc::ECANCELED));
            }
            let slot = match free.pop() {
                Some(s) => s,
                None => match acks.recv() {
                    Ok(s) if lent.get(s as usize) == Some(&true) => s,
                    // The host returned a slot it never had: a host bug; stop cleanly.
                    Ok(_) => return Err(Failure::new("read", path, libc::EPROTO)),
                    Err(_) => return Err(Failure::new("read", path, libc::ECANCELED)),
                },
            };
            lent[slot as usize] = false;
            // Fill the slot; a short read is the end of the file (also for direct reads,
            // whose next read would start unaligned).
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => {
                        n += k;
                        if direct && n % BULK_ALIGN as usize != 0 {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                        bulk::set_direct(f, false).map_err(|e| Failure::io("read", path, &e))?;
                        direct = false;
                    }
                    Err(e) => return Err(Failure::io("read", path, &e)),
                }
            }
            if n == 0 {
                return Ok(total);
            }
            disk.write_slot(w, slot, n as u32, &buf).map_err(|e| Failure::io("read (transfer disk)", path, &e))?;
            lent[slot as usize] = true;
            if !self.send_within(flow, Frame::json(id, Kind::FsBulk, &FsBulk { slot, len: n as u32 })) {
                return Err(Failure::new("read", path, libc::ECANCELED));
            }
            total += n as u64;
            if n < buf.len() {
                return Ok(total);
            }
        }
    }
}

/// An upload through the transfer disk: the slot buffer and whether the file is still
/// written with `O_DIRECT` (only while every write so far was aligned).
struct Upload {
    buf: AlignedBuf,
    window: BulkWindow,
    disk: &'static bulk::Disk,
    direct: bool,
}

impl Upload {
    fn new(f: &File, window: BulkWindow, disk: &'static bulk::Disk, path: &Path) -> Result<Upload, Failure> {
        let buf = AlignedBuf::new(window.slot_size as usize).ok_or_else(|| Failure::new("write", path, libc::ENOMEM))?;
        Ok(Upload { buf, window, disk, direct: bulk::set_direct(f, true).is_ok() })
    }

    /// Switches the file to buffered writes for good (an unaligned write is coming).
    fn buffered(&mut self, f: &File) {
        go_buffered(&mut self.direct, f);
    }

    /// Copies one slot into the file at byte `pos`.
    fn write(&mut self, f: &File, b: FsBulk, pos: u64, path: &Path) -> Result<(), Failure> {
        self.disk
            .read_slot(&self.window, b.slot, b.len, &mut self.buf)
            .map_err(|e| Failure::io("write (transfer disk)", path, &e))?;
        let data = &self.buf[..b.len as usize];
        // Whole blocks go direct; a tail (the end of the file) is written buffered.
        let whole = if self.direct { data.len() / BULK_ALIGN as usize * BULK_ALIGN as usize } else { 0 };
        if whole > 0 {
            match f.write_all_at(&data[..whole], pos) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Positional writes make redoing it buffered safe whatever got through.
                    go_buffered(&mut self.direct, f);
                    f.write_all_at(&data[..whole], pos).map_err(|e| Failure::io("write", path, &e))?;
                }
                Err(e) => return Err(Failure::io("write", path, &e)),
            }
        }
        if whole < data.len() {
            go_buffered(&mut self.direct, f);
            f.write_all_at(&data[whole..], pos + whole as u64).map_err(|e| Failure::io("write", path, &e))?;
        }
        Ok(())
    }
}

fn go_buffered(direct: &mut bool, f: &File) {
    if *direct {
        *direct = false;
        let _ = bulk::set_direct(f, false);
    }
}

/// Paths must be absolute and free of NUL bytes (the host checks too).
/// The request's path as a `Path` (bytes as they are), if absolute and without NUL.
fn checked<'a>(op: &str, p: &'a PathBytes) -> Result<&'a Path, Failure> {
    let bytes = p.as_bytes();
    if bytes.first() != Some(&b'/') || bytes.contains(&0) {
        return Err(Failure { errno: libc::EINVAL, message: format!("{op} {p:?}: not an absolute path without NUL bytes") });
    }
    Ok(Path::new(OsStr::from_bytes(bytes)))
}

#[cfg(test)]
mod tests {
    //! Bulk transfers against a regular file standing in for the transfer disk, and a
    //! regular file standing in for the port (frames are read back from it).
    use super::*;
    use std::sync::atomic::AtomicU32;

    static N: AtomicU32 = AtomicU32::new(0);

    fn tmp(name: &str) -> std::path::PathBuf {
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("msb-agent-fs-{}-{n}-{name}", std::process::id()))
    }

    const W: BulkWindow = BulkWindow { offset: 8192, slot_size: 8192, slots: 3 };

    fn disk() -> &'static bulk::Disk {
        let path = tmp("disk");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(8192 * 4).unwrap();
        let _ = fs::remove_file(&path); // the open file lives on
        Box::leak(Box::new(bulk::Disk::from_file(f)))
    }

    /// Sessions whose frames land in a file; returns it to read them back.
    fn sessions() -> (Arc<FsSessions>, std::path::PathBuf) {
        let port = tmp("port");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&port).unwrap();
        (FsSessions::new(Sink::new(f)), port)
    }

    fn frames(port: &Path) -> Vec<Frame> {
        let bytes = fs::read(port).unwrap();
        let mut r = &bytes[..];
        let mut out = Vec::new();
        while let Some(f) = microsandbox_protocol::read_frame(&mut r).unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn download_fills_slots_and_reuses_only_returned_ones() {
        let disk = disk();
        let (s, port) = sessions();
        let src = tmp("src");
        let data: Vec<u8> = (0..8192 * 4 + 100).map(|i| (i % 253) as u8).collect();
        fs::write(&src, &data).unwrap();
        let (tx, acks) = sync_channel(3);
        // The host returns slot 0 once; the download needs it for its fourth slot.
        tx.send(0).unwrap();
        let f = File::open(&src).unwrap();
        let cancel = AtomicBool::new(false);
        // Five slots of data, three slots, one return: the fifth slot never comes back.
        drop(tx);
        let err = s.download(7, &f, Path::new("/src"), &W, disk, &acks, &cancel, &Window::default()).unwrap_err();
        assert_eq!(err.errno, libc::ECANCELED);
        let sent: Vec<FsBulk> = frames(&port).iter().map(|f| f.parse().unwrap()).collect();
        assert_eq!(sent.iter().map(|b| b.slot).collect::<Vec<_>>(), [0, 1, 2, 0]);
        // The last slot 0 holds the fourth chunk.
        let mut buf = AlignedBuf::new(8192).unwrap();
        disk.read_slot(&W, 0, 8192, &mut buf).unwrap();
        assert_eq!(&buf[..], &data[8192 * 3..8192 * 4]);
        let _ = fs::remove_file(&src);
        let _ = fs::remove_file(&port);
    }

    #[test]
    fn download_refuses_a_slot_the_host_never_had() {
        let disk = disk();
        let (s, port) = sessions();
        let src = tmp("src");
        fs::write(&src, vec![1u8; 8192 * 5]).unwrap();
        let (tx, acks) = sync_channel(3);
        // When the download waits for a slot all three are lent, so only a slot outside
        // the window can be one it never had.
        tx.send(7).unwrap();
        drop(tx);
        let flow = Window::default();
        let err = s.download(7, &File::open(&src).unwrap(), Path::new("/src"), &W, disk, &acks, &AtomicBool::new(false), &flow).unwrap_err();
        assert_eq!(err.errno, libc::EPROTO);
        let _ = fs::remove_file(&src);
        let _ = fs::remove_file(&port);
    }

    #[test]
    fn upload_writes_slots_at_their_position_and_refuses_bad_ones() {
        let disk = disk();
        let dst = tmp("dst");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&dst).unwrap();
        let mut up = Upload::new(&f, W, disk, Path::new("/dst")).unwrap();
        let mut buf = AlignedBuf::new(8192).unwrap();
        buf.fill(5);
        disk.write_slot(&W, 1, 8192, &buf).unwrap();
        buf[..3].copy_from_slice(b"end");
        disk.write_slot(&W, 2, 3, &buf).unwrap();
        up.write(&f, FsBulk { slot: 1, len: 8192 }, 0, Path::new("/dst")).unwrap();
        up.write(&f, FsBulk { slot: 2, len: 3 }, 8192, Path::new("/dst")).unwrap();
        let got = fs::read(&dst).unwrap();
        assert_eq!(got.len(), 8195);
        assert!(got[..8192].iter().all(|&b| b == 5));
        assert_eq!(&got[8192..], b"end");
        for (slot, len) in [(3, 1), (0, 8193), (u32::MAX, u32::MAX)] {
            let e = up.write(&f, FsBulk { slot, len }, 0, Path::new("/dst")).unwrap_err();
            assert_eq!(e.errno, libc::EPROTO, "slot {slot} len {len}");
        }
        let _ = fs::remove_file(&dst);
    }
}
