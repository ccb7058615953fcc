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

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::sync::Mutex;

use microsandbox_protocol::{
    FsDone, FsEntry, FsKind, FsOp, FsRequest, FsStat, Frame, Kind, MAX_CHUNK,
};

use crate::flow::{self, Window, Windows};
use crate::util::{self, lock};
use crate::wire::Sink;

/// Upload frames buffered per session before the port reader waits for the disk.
const UPLOAD_QUEUE: usize = 64;
/// Serialized `FsEntry` bytes per `list` frame: one data chunk, like every output frame
/// (a frame must fit the flow-control window).
const LIST_BATCH: usize = MAX_CHUNK;

enum Chunk {
    Data(Vec<u8>),
    Eof,
}

struct Handle {
    cancel: Arc<AtomicBool>,
    upload: Option<SyncSender<Chunk>>,
}

/// All live filesystem sessions.
pub struct FsSessions {
    table: Mutex<HashMap<u32, Handle>>,
    windows: Windows,
    sink: Sink,
}

/// A failed operation: the errno and what was being done.
struct Failure {
    errno: i32,
    message: String,
}

impl Failure {
    fn new(what: &str, path: &str, errno: i32) -> Failure {
        Failure { errno, message: format!("{what} {path}: {}", describe(errno)) }
    }

    fn io(what: &str, path: &str, e: &io::Error) -> Failure {
        Failure::new(what, path, e.raw_os_error().unwrap_or(libc::EIO))
    }
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
        lock(&self.table).insert(id, Handle { cancel: cancel.clone(), upload });
        let window = self.windows.open(id);
        let this = self.clone();
        let started = util::spawn(&format!("fs-{id}"), move || {
            let res = this.run(id, &req, rx, &cancel, &window);
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
        if !window.acquire(flow::cost(bytes.len())) {
            return false;
        }
        self.sink.send(&Frame::data(id, Kind::FsData, bytes));
        true
    }

    fn run(&self, id: u32, req: &FsRequest, rx: Option<Receiver<Chunk>>, cancel: &AtomicBool, window: &Window) -> Result<FsDone, Failure> {
        let op = format!("{:?}", req.op).to_lowercase();
        let path = checked(&op, &req.path)?;
        let path2 = || match &req.path2 {
            Some(p) => checked(&op, p),
            None => Err(Failure { errno: libc::EINVAL, message: format!("{op} {path}: a destination path is required") }),
        };
        let cancelled = || Failure::new(&op, path, libc::ECANCELED);
        match req.op {
            FsOp::Read => {
                let mut f = File::open(path).map_err(|e| Failure::io("read", path, &e))?;
                if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                    return Err(Failure::new("read", path, libc::EISDIR));
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
                let mut total = 0u64;
                loop {
                    match rx.recv() {
                        Ok(Chunk::Data(d)) => {
                            f.write_all(&d).map_err(|e| Failure::io("write", path, &e))?;
                            total += d.len() as u64;
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
                let n = fs::copy(path, dst).map_err(|e| Failure::io("copy", &format!("{path} to {dst}"), &e))?;
                Ok(FsDone { size: Some(n), ..Default::default() })
            }
            FsOp::Rename => {
                let dst = path2()?;
                fs::rename(path, dst).map_err(|e| Failure::io("rename", &format!("{path} to {dst}"), &e))?;
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
                        name: entry.file_name().to_string_lossy().into_owned(),
                        kind: kind_of(m.file_type()),
                        size: m.len(),
                        mode: m.mode() & 0o7777,
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
                let target = match req.path2.as_deref() {
                    Some(t) if !t.is_empty() && !t.contains('\0') => t,
                    _ => {
                        return Err(Failure {
                            errno: libc::EINVAL,
                            message: format!("symlink {path}: the target must be a non-empty string without NUL bytes"),
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
                };
                Ok(FsDone { stat: Some(stat), ..Default::default() })
            }
        }
    }
}

/// Paths must be absolute and free of NUL bytes (the host checks too).
fn checked<'a>(op: &str, p: &'a str) -> Result<&'a str, Failure> {
    if !Path::new(p).is_absolute() || p.contains('\0') {
        return Err(Failure { errno: libc::EINVAL, message: format!("{op} {p:?}: not an absolute path without NUL bytes") });
    }
    Ok(p)
}
