//! Host side of guest filesystem sessions (`FsRequest` … `FsDone`/`Error`).
//!
//! Each call opens its own control connection, like exec: cancelling a call (dropping
//! its future, a stream or a sink) closes the connection and the supervisor cancels the
//! session in the guest. Everything that could grow with guest data is bounded: `read`
//! refuses files over [`MAX_READ`], `list` over [`MAX_LIST_ENTRIES`]; the streaming
//! calls hold at most a few frames.
//!
//! Large transfers (streams, host copies, `write` of more than [`BULK_MIN`] bytes, and
//! `read`) ask the supervisor for a window of the transfer disk (`transfer.rs`): file
//! bytes then move through it one slot at a time (`FsBulk` hands a filled slot over,
//! `FsAck` hands it back) and only those small frames cross the agent channel. Without a
//! window (the disk is busy with other transfers) the same calls move `FsData` frames.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use microsandbox_protocol::{
    escape, PathBytes,
    read_frame_async, write_frame_async, ErrorMsg, Frame, FsAck, FsBulk, FsDone, FsOp, FsRequest, FsWindow, Kind,
    BULK_MIN, MAX_CHUNK,
};
pub use microsandbox_protocol::{FsEntry, FsKind, FsStat};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

use super::transfer::{WindowFile, TRANSFER_DISK};
use super::Sandbox;
use crate::error::{Error, Result};

const SESSION: u32 = 1;
/// Largest file [`Sandbox::fs_read`] loads into memory.
pub const MAX_READ: u64 = 256 << 20;
/// Most entries [`Sandbox::fs_list`] returns.
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// Bytes per upload frame.
const UPLOAD_CHUNK: usize = MAX_CHUNK;
/// Setting this environment variable to `off` makes every call use frames (to compare
/// both paths in benchmarks).
pub const BULK_ENV: &str = "MICROSANDBOX_FS_BULK";

fn bulk_allowed() -> bool {
    std::env::var(BULK_ENV).map_or(true, |v| v != "off")
}

/// A failed filesystem call: the engine error plus the guest errno when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct FsError {
    pub error: Error,
    pub errno: Option<i32>,
}

impl From<Error> for FsError {
    fn from(error: Error) -> Self {
        FsError { error, errno: None }
    }
}

impl From<FsError> for Error {
    fn from(e: FsError) -> Self {
        e.error
    }
}

impl From<microsandbox_protocol::FrameError> for FsError {
    fn from(e: microsandbox_protocol::FrameError) -> Self {
        Error::from(e).into()
    }
}

pub type FsResult<T> = std::result::Result<T, FsError>;

fn vm_gone() -> FsError {
    Error::SandboxNotRunning("the sandbox VM exited during the filesystem operation".into()).into()
}

fn agent_error(e: ErrorMsg) -> FsError {
    if let Some(error) = Error::from_supervisor_code(&e.code, &e.message) {
        return FsError { error, errno: None };
    }
    let error = match e.code.as_str() {
        "fs-error" if e.errno == Some(GUEST_ENOENT) => Error::PathNotFound(e.message),
        "fs-error" => Error::Filesystem(e.message),
        "invalid-request" => Error::InvalidConfig(e.message),
        _ => Error::Protocol(format!("agent error {}: {}", e.code, e.message)),
    };
    FsError { error, errno: e.errno }
}

/// The guest's (Linux) ENOENT, whatever the host's libc calls it.
const GUEST_ENOENT: i32 = 2;

fn host_io(what: String) -> impl FnOnce(std::io::Error) -> FsError {
    move |source| Error::Io { context: what, source }.into()
}

/// One frame of a filesystem session, as the host sees it.
enum Event {
    Data(Vec<u8>),
    Bulk(FsBulk),
    Ack(FsAck),
    Done(FsDone),
}

async fn next_event(rd: &mut OwnedReadHalf) -> FsResult<Event> {
    let f = read_frame_async(rd).await?.ok_or_else(vm_gone)?;
    if f.id != SESSION {
        return Err(Error::Protocol(format!("frame for unknown session {}", f.id)).into());
    }
    match f.kind {
        Kind::FsData => Ok(Event::Data(f.payload)),
        Kind::FsBulk => Ok(Event::Bulk(f.parse()?)),
        Kind::FsAck => Ok(Event::Ack(f.parse()?)),
        Kind::FsDone => Ok(Event::Done(f.parse()?)),
        Kind::Error => Err(agent_error(f.parse()?)),
        other => Err(Error::Protocol(format!("unexpected {other:?} frame in a filesystem session")).into()),
    }
}

/// Waits for the session's last frame, refusing data.
async fn final_event(rd: &mut OwnedReadHalf) -> FsResult<FsDone> {
    match next_event(rd).await? {
        Event::Done(d) => Ok(d),
        _ => Err(Error::Protocol("unexpected data in a filesystem session".into()).into()),
    }
}

/// Checks a guest path: absolute and without NUL bytes (any other bytes are fine:
/// Linux names are bytes).
fn validate_path(p: &PathBytes) -> Result<()> {
    let b = p.as_bytes();
    if b.first() != Some(&b'/') || b.contains(&0) {
        return Err(Error::InvalidConfig(format!("path {p:?} must be an absolute guest path without NUL bytes")));
    }
    Ok(())
}

/// A host path for a message, exact whatever its bytes.
fn show_host(p: &Path) -> String {
    escape(p.as_os_str().as_bytes())
}

fn request(op: FsOp, path: &[u8]) -> FsRequest {
    FsRequest { op, path: path.into(), path2: None, recursive: false, parents: false, mode: None, bulk: false, window: None }
}

/// An open filesystem session: its connection and, for a bulk transfer, its window.
struct Conn {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    bulk: Option<WindowFile>,
}

impl Sandbox {
    /// Opens a connection and sends `req` after validating its paths. With `req.bulk`,
    /// also waits for the supervisor's `FsWindow` and opens the transfer disk.
    async fn fs_open(&self, req: &FsRequest) -> FsResult<Conn> {
        validate_path(&req.path)?;
        if let Some(p) = &req.path2 {
            validate_path(p)?;
        }
        let mut req = req.clone();
        req.window = None;
        // Open the disk first: a window the host cannot use would be of no help.
        let disk = if req.bulk && bulk_allowed() {
            WindowFile::open_disk(&self.home.sandbox_dir(&self.name).join(TRANSFER_DISK)).ok()
        } else {
            None
        };
        req.bulk = disk.is_some();
        let conn = self.connect().await?;
        let (mut rd, mut wr) = conn.into_split();
        write_frame_async(&mut wr, &Frame::json(SESSION, Kind::FsRequest, &req)).await.map_err(|_| vm_gone())?;
        let bulk = match disk {
            Some(disk) => {
                let f = self.fs_map(read_frame_async(&mut rd).await.map_err(FsError::from).and_then(|f| f.ok_or_else(vm_gone)))?;
                match f.kind {
                    Kind::FsWindow => f.parse::<FsWindow>()?.window.map(|w| WindowFile::new(disk, w)).transpose()?,
                    Kind::Error => return Err(agent_error(f.parse()?)),
                    other => return Err(Error::Protocol(format!("expected FsWindow, got {other:?}")).into()),
                }
            }
            None => None,
        };
        Ok(Conn { rd, wr, bulk })
    }

    /// Runs an operation that answers with a single `FsDone`.
    async fn fs_simple(&self, req: FsRequest) -> FsResult<FsDone> {
        let mut c = self.fs_open(&req).await?;
        self.fs_map(final_event(&mut c.rd).await)
    }

    /// Marks the sandbox stopped when its VM went away mid-call.
    fn fs_map<T>(&self, r: FsResult<T>) -> FsResult<T> {
        r.map_err(|e| match e.error {
            Error::SandboxNotRunning(_) => {
                self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
                self.not_running().into()
            }
            _ => e,
        })
    }

    /// The whole content of a guest file. Files over [`MAX_READ`] are refused: stream
    /// them with [`fs_read_stream`](Self::fs_read_stream).
    pub async fn fs_read(&self, path: &[u8]) -> FsResult<Vec<u8>> {
        let mut s = self.fs_read_stream(path).await?;
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await? {
            if out.len() as u64 + chunk.len() as u64 > MAX_READ {
                return Err(Error::Filesystem(format!(
                    "{} is larger than {} MiB; read it in chunks with read_stream",
                    escape(path),
                    MAX_READ >> 20
                ))
                .into());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Creates or truncates a guest file and writes `data` to it.
    pub async fn fs_write(&self, path: &[u8], data: Vec<u8>) -> FsResult<u64> {
        let mut sink = self.fs_upload(path, data.len() as u64 >= BULK_MIN).await?;
        sink.write_owned(data).await?;
        sink.finish().await
    }

    /// True when `path` exists in the guest (following symlinks).
    pub async fn fs_exists(&self, path: &[u8]) -> FsResult<bool> {
        Ok(self.fs_simple(request(FsOp::Exists, path)).await?.exists.unwrap_or(false))
    }

    /// Creates a directory; with `parents`, missing parents too and an existing directory is fine.
    pub async fn fs_mkdir(&self, path: &[u8], parents: bool) -> FsResult<()> {
        self.fs_simple(FsRequest { parents, ..request(FsOp::Mkdir, path) }).await.map(drop)
    }

    /// Removes a file, symlink or empty directory; with `recursive`, a whole tree.
    pub async fn fs_remove(&self, path: &[u8], recursive: bool) -> FsResult<()> {
        self.fs_simple(FsRequest { recursive, ..request(FsOp::Remove, path) }).await.map(drop)
    }

    /// Copies a guest file to another guest path (inside the guest).
    pub async fn fs_copy(&self, src: &[u8], dst: &[u8]) -> FsResult<()> {
        self.fs_simple(FsRequest { path2: Some(dst.into()), ..request(FsOp::Copy, src) }).await.map(drop)
    }

    /// Renames (moves) a guest path.
    pub async fn fs_rename(&self, src: &[u8], dst: &[u8]) -> FsResult<()> {
        self.fs_simple(FsRequest { path2: Some(dst.into()), ..request(FsOp::Rename, src) }).await.map(drop)
    }

    /// Entries of a guest directory, sorted by name (at most [`MAX_LIST_ENTRIES`]).
    pub async fn fs_list(&self, path: &[u8]) -> FsResult<Vec<FsEntry>> {
        let mut c = self.fs_open(&request(FsOp::List, path)).await?;
        let mut out: Vec<FsEntry> = Vec::new();
        loop {
            match self.fs_map(next_event(&mut c.rd).await)? {
                Event::Data(batch) => {
                    let mut entries: Vec<FsEntry> = serde_json::from_slice(&batch)
                        .map_err(|e| Error::Protocol(format!("malformed directory listing from the guest: {e}")))?;
                    if out.len() + entries.len() > MAX_LIST_ENTRIES {
                        return Err(Error::Filesystem(format!(
                            "{} has more than {MAX_LIST_ENTRIES} entries; list it with a command instead",
                            escape(path)
                        ))
                        .into());
                    }
                    out.append(&mut entries);
                }
                Event::Done(_) => break,
                _ => return Err(Error::Protocol("unexpected bulk frame in a listing".into()).into()),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// `lstat` of a guest path.
    pub async fn fs_stat(&self, path: &[u8]) -> FsResult<FsStat> {
        self.fs_simple(request(FsOp::Stat, path))
            .await?
            .stat
            .ok_or_else(|| Error::Protocol("the guest answered stat without metadata".into()).into())
    }

    /// Streams a guest file in chunks: transfer-disk slots (at most
    /// [`SLOT_SIZE`](super::transfer::SLOT_SIZE) bytes), or `MAX_CHUNK`-byte frames when
    /// no window was free or the file is small.
    pub async fn fs_read_stream(&self, path: &[u8]) -> FsResult<FsReadStream> {
        let c = self.fs_open(&FsRequest { bulk: true, ..request(FsOp::Read, path) }).await?;
        Ok(FsReadStream { conn: Some(c), done: false })
    }

    /// Creates or truncates a guest file and returns a sink that uploads to it.
    pub async fn fs_write_stream(&self, path: &[u8]) -> FsResult<FsWriteSink> {
        self.fs_upload(path, true).await
    }

    async fn fs_upload(&self, path: &[u8], bulk: bool) -> FsResult<FsWriteSink> {
        Ok(FsWriteSink::start(self.fs_open(&FsRequest { bulk, ..request(FsOp::Write, path) }).await?))
    }

    /// Uploads a host file to the guest, streaming (memory stays bounded).
    pub async fn fs_copy_from_host(&self, host: &Path, guest: &[u8]) -> FsResult<u64> {
        let file = std::fs::File::open(host).map_err(host_io(format!("opening {}", show_host(&host))))?;
        let file = std::sync::Arc::new(file);
        let mut sink = self.fs_write_stream(guest).await?;
        if sink.bulk.is_some() && file.metadata().map(|m| m.is_file()).unwrap_or(false) {
            sink.copy_file(&file).await?;
            return sink.finish().await;
        }
        loop {
            // One slot's worth per read, straight into a buffer the sink takes over.
            let f = file.clone();
            let buf = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; super::transfer::SLOT_SIZE as usize];
                let mut n = 0;
                while n < buf.len() {
                    match (&*f).read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(n);
                Ok(buf)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(host_io(format!("reading {}", show_host(&host))))?;
            if buf.is_empty() {
                break;
            }
            sink.write_owned(buf).await?;
        }
        sink.finish().await
    }

    /// Downloads a guest file to a host path, streaming. A failed download removes the
    /// partial host file.
    pub async fn fs_copy_to_host(&self, guest: &[u8], host: &Path) -> FsResult<u64> {
        let mut s = self.fs_read_stream(guest).await?;
        let host: PathBuf = host.to_path_buf();
        let file = std::fs::File::create(&host).map_err(host_io(format!("creating {}", show_host(&host))))?;
        let file = std::sync::Arc::new(file);
        // Positional writes (and in-kernel copies) need a regular file; anything else
        // (a FIFO, a device) is written in order.
        let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        let res = async {
            let mut total = 0u64;
            if regular {
                while let Some(n) = s.next_to_file(&file, total).await? {
                    total += n;
                }
            } else {
                while let Some(chunk) = s.next().await? {
                    total += chunk.len() as u64;
                    let f = file.clone();
                    tokio::task::spawn_blocking(move || (&*f).write_all(&chunk))
                        .await
                        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                        .map_err(host_io(format!("writing {}", show_host(&host))))?;
                }
            }
            Ok(total)
        }
        .await;
        if res.is_err() {
            drop(file);
            let _ = tokio::fs::remove_file(&host).await;
        }
        self.fs_map(res)
    }
}

/// A guest file being downloaded. Dropping it cancels the transfer.
pub struct FsReadStream {
    /// Closing it would end the session; it is dropped as soon as the session ended, which
    /// also tells the supervisor the session's window is free.
    conn: Option<Conn>,
    done: bool,
}

/// Where a download step puts its bytes.
enum Dest<'a> {
    Memory,
    /// At this offset of this host file.
    File(&'a std::sync::Arc<std::fs::File>, u64),
}

enum Piece {
    Bytes(Vec<u8>),
    Written(u64),
}

impl FsReadStream {
    /// The next chunk; `Ok(None)` at the end of the file.
    pub async fn next(&mut self) -> FsResult<Option<Vec<u8>>> {
        Ok(match self.step(Dest::Memory).await? {
            Some(Piece::Bytes(b)) => Some(b),
            _ => None,
        })
    }

    /// Writes the next chunk at byte `at` of `dst`; its length, or `Ok(None)` at the end.
    /// Slots of the transfer disk are copied file to file, never through this process.
    async fn next_to_file(&mut self, dst: &std::sync::Arc<std::fs::File>, at: u64) -> FsResult<Option<u64>> {
        Ok(match self.step(Dest::File(dst, at)).await? {
            Some(Piece::Written(n)) => Some(n),
            _ => None,
        })
    }

    async fn step(&mut self, dest: Dest<'_>) -> FsResult<Option<Piece>> {
        let res = self.step_inner(dest).await;
        if !matches!(res, Ok(Some(_))) {
            self.done = true;
            self.conn = None;
        }
        res
    }

    async fn step_inner(&mut self, dest: Dest<'_>) -> FsResult<Option<Piece>> {
        let Some(c) = self.conn.as_mut().filter(|_| !self.done) else { return Ok(None) };
        loop {
            match next_event(&mut c.rd).await? {
                Event::Data(d) => {
                    return Ok(Some(match dest {
                        Dest::Memory => Piece::Bytes(d),
                        Dest::File(f, at) => {
                            let (f, n) = (f.clone(), d.len() as u64);
                            tokio::task::spawn_blocking(move || std::os::unix::fs::FileExt::write_all_at(&*f, &d, at))
                                .await
                                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                                .map_err(host_io("writing the downloaded file".into()))?;
                            Piece::Written(n)
                        }
                    }));
                }
                Event::Bulk(b) => {
                    let file = c.bulk.as_ref().ok_or_else(|| Error::Protocol("FsBulk in a session without a window".into()))?;
                    let piece = match dest {
                        Dest::Memory => Piece::Bytes(file.read_slot(b.slot, b.len).await?),
                        Dest::File(f, at) => {
                            file.copy_slot_to(b.slot, b.len, f.clone(), at).await?;
                            Piece::Written(b.len as u64)
                        }
                    };
                    // The copy is ours: hand the slot back at once so the guest refills it
                    // while the caller consumes this chunk.
                    write_frame_async(&mut c.wr, &Frame::json(SESSION, Kind::FsAck, &FsAck { slot: b.slot }))
                        .await
                        .map_err(|_| vm_gone())?;
                    if b.len > 0 {
                        return Ok(Some(piece));
                    }
                }
                Event::Done(_) => return Ok(None),
                Event::Ack(_) => return Err(Error::Protocol("unexpected FsAck in a download".into()).into()),
            }
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}

/// A guest file being uploaded. Call [`finish`](Self::finish) to complete it; dropping
/// the sink cancels the upload (the guest file keeps what was written so far).
pub struct FsWriteSink {
    wr: Option<OwnedWriteHalf>,
    answer: Option<JoinHandle<FsResult<FsDone>>>,
    written: u64,
    bulk: Option<BulkUpload>,
}

/// Slot bookkeeping of an upload through the transfer disk. The host owns every slot at
/// the start; `FsBulk` lends one to the guest, `FsAck` returns it.
struct BulkUpload {
    file: WindowFile,
    /// Slots the guest handed back, from the answer task.
    acks: tokio::sync::mpsc::Receiver<u32>,
    /// Slots the host owns and has not started filling.
    free: Vec<u32>,
    /// Slots lent to the guest: an ack for any other slot is a lie.
    held: Vec<bool>,
    /// The slot being filled and how many bytes it has.
    filling: Option<(u32, u32)>,
}

impl FsWriteSink {
    /// Takes over an open `write` session.
    fn start(conn: Conn) -> FsWriteSink {
        let Conn { mut rd, wr, bulk } = conn;
        // The agent may fail at any time (cannot create the file, disk full): watch for
        // its answer while the caller writes, passing on the slots it hands back. It can
        // never rightly have returned more slots than the window has, which bounds the
        // queue; a fuller queue is a lie.
        let slots = bulk.as_ref().map_or(1, |b| b.window().slots as usize);
        let (acks_tx, acks) = tokio::sync::mpsc::channel(slots);
        let answer = tokio::spawn(async move {
            loop {
                match next_event(&mut rd).await? {
                    Event::Done(d) => return Ok(d),
                    Event::Ack(a) => {
                        if acks_tx.try_send(a.slot).is_err() {
                            return Err(Error::Protocol("the guest returned more slots than it held".into()).into());
                        }
                    }
                    _ => return Err(Error::Protocol("unexpected data in an upload".into()).into()),
                }
            }
        });
        let bulk = bulk.map(|file| {
            let slots = file.window().slots;
            BulkUpload { file, acks, free: (0..slots).rev().collect(), held: vec![false; slots as usize], filling: None }
        });
        FsWriteSink { wr: Some(wr), answer: Some(answer), written: 0, bulk }
    }

    fn closed() -> FsError {
        Error::Filesystem("the write stream is already closed".into()).into()
    }

    /// The agent's answer, once the session ended.
    async fn take_answer(&mut self) -> FsResult<FsDone> {
        let answer = self.answer.take().ok_or_else(Self::closed)?;
        // Closing the write half first would end the session before its answer arrives.
        let res = answer.await.map_err(|e| Error::Runtime(format!("filesystem session task failed: {e}")))?;
        self.wr = None;
        res
    }

    /// The guest ended the session early (or broke the connection): that is always an
    /// error for an upload.
    async fn ended_early(&mut self) -> FsError {
        match self.take_answer().await {
            Err(e) => e,
            Ok(_) => Error::Protocol("the guest ended an upload before it was finished".into()).into(),
        }
    }

    /// Sends one frame; a broken connection is explained by the answer (or its absence).
    async fn send(&mut self, f: Frame) -> FsResult<()> {
        let wr = self.wr.as_mut().ok_or_else(Self::closed)?;
        if write_frame_async(wr, &f).await.is_err() {
            return Err(self.take_answer().await.err().unwrap_or_else(vm_gone));
        }
        Ok(())
    }

    /// Appends `data` to the file (waits while the guest is behind).
    pub async fn write(&mut self, data: &[u8]) -> FsResult<()> {
        self.write_owned(data.to_vec()).await
    }

    /// Like [`write`](Self::write), taking the buffer (saves a copy of large data).
    pub async fn write_owned(&mut self, data: Vec<u8>) -> FsResult<()> {
        if self.answer.as_ref().is_some_and(|a| a.is_finished()) {
            return Err(self.ended_early().await);
        }
        if self.wr.is_none() {
            return Err(Self::closed());
        }
        let len = data.len() as u64;
        if self.bulk.is_some() {
            self.write_bulk(std::sync::Arc::new(data)).await?;
        } else {
            for chunk in data.chunks(UPLOAD_CHUNK) {
                self.send(Frame::data(SESSION, Kind::FsData, chunk.to_vec())).await?;
            }
        }
        self.written += len;
        Ok(())
    }

    /// Packs `data` into slots, handing each to the guest when it is full.
    async fn write_bulk(&mut self, data: std::sync::Arc<Vec<u8>>) -> FsResult<()> {
        let mut at = 0;
        while at < data.len() {
            let (slot, fill) = match self.bulk.as_ref().and_then(|b| b.filling) {
                Some(f) => f,
                None => (self.free_slot().await?, 0),
            };
            let b = self.bulk.as_mut().expect("bulk upload");
            let slot_size = b.file.window().slot_size;
            let n = (data.len() - at).min((slot_size - fill) as usize);
            b.file.write_slot(slot, fill, data.clone(), at..at + n).await?;
            at += n;
            let fill = fill + n as u32;
            if fill == slot_size {
                self.lend(slot, fill).await?;
            } else {
                b.filling = Some((slot, fill));
            }
        }
        Ok(())
    }

    /// Uploads the rest of the regular file `src` through the window, copying it into the
    /// slots in the kernel (it never passes through this process).
    async fn copy_file(&mut self, src: &std::sync::Arc<std::fs::File>) -> FsResult<()> {
        let mut at = 0u64;
        loop {
            let (slot, fill) = match self.bulk.as_ref().and_then(|b| b.filling) {
                Some(f) => f,
                None => (self.free_slot().await?, 0),
            };
            let b = self.bulk.as_mut().expect("bulk upload");
            let slot_size = b.file.window().slot_size;
            let n = b.file.fill_slot_from(slot, fill, slot_size - fill, src.clone(), at).await?;
            at += n as u64;
            self.written += n as u64;
            if fill + n == slot_size {
                self.lend(slot, slot_size).await?;
            } else {
                // The end of the file: finish() hands over the partial slot.
                b.filling = (fill + n > 0).then_some((slot, fill + n));
                if fill + n == 0 {
                    b.free.push(slot);
                }
                return Ok(());
            }
        }
    }

    /// A slot the host owns, waiting for the guest to hand one back if needed.
    async fn free_slot(&mut self) -> FsResult<u32> {
        let b = self.bulk.as_mut().expect("bulk upload");
        if let Some(s) = b.free.pop() {
            return Ok(s);
        }
        match b.acks.recv().await {
            Some(s) if b.held.get(s as usize) == Some(&true) => {
                b.held[s as usize] = false;
                Ok(s)
            }
            Some(s) => Err(Error::Protocol(format!("the guest returned slot {s}, which it did not hold")).into()),
            None => Err(self.ended_early().await),
        }
    }

    /// Hands a filled slot to the guest.
    async fn lend(&mut self, slot: u32, len: u32) -> FsResult<()> {
        let b = self.bulk.as_mut().expect("bulk upload");
        b.filling = None;
        b.held[slot as usize] = true;
        self.send(Frame::json(SESSION, Kind::FsBulk, &FsBulk { slot, len })).await
    }

    /// Completes the upload; returns the bytes written.
    pub async fn finish(&mut self) -> FsResult<u64> {
        if self.wr.is_none() {
            return Err(Self::closed());
        }
        if let Some((slot, fill)) = self.bulk.as_ref().and_then(|b| b.filling) {
            self.lend(slot, fill).await?;
        }
        let wr = self.wr.as_mut().ok_or_else(Self::closed)?;
        let _ = write_frame_async(wr, &Frame::data(SESSION, Kind::FsEof, Vec::new())).await;
        let done = self.take_answer().await?;
        Ok(done.size.unwrap_or(self.written))
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl Drop for FsWriteSink {
    fn drop(&mut self) {
        if let Some(a) = self.answer.take() {
            a.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    //! The guest is hostile: a fake agent (the far end of a socket pair, standing in for the
    //! supervisor connection) feeds the host side of bulk sessions lies about slots and
    //! lengths. The supervisor refuses them too (agent_link.rs); these check the client.
    use super::*;
    use crate::sandbox::transfer::{self, SLOTS, SLOT_SIZE};
    use tokio::net::UnixStream;

    struct Fake {
        _dir: tempfile::TempDir,
        disk: std::sync::Arc<std::fs::File>,
        window: microsandbox_protocol::BulkWindow,
        guest: UnixStream,
    }

    /// A session over a socket pair with window 1 of a real transfer-disk file.
    fn session() -> (Conn, Fake) {
        let dir = tempfile::tempdir().unwrap();
        let spec = transfer::prepare(dir.path()).unwrap();
        let disk = WindowFile::open_disk(&spec.path).unwrap();
        let window = spec.window(1).unwrap();
        let (host, guest) = UnixStream::pair().unwrap();
        let (rd, wr) = host.into_split();
        let bulk = Some(WindowFile::new(disk.clone(), window).unwrap());
        (Conn { rd, wr, bulk }, Fake { _dir: dir, disk, window, guest })
    }

    async fn send(guest: &mut UnixStream, f: Frame) {
        write_frame_async(guest, &f).await.unwrap();
    }

    fn bulk(slot: u32, len: u32) -> Frame {
        Frame::json(SESSION, Kind::FsBulk, &FsBulk { slot, len })
    }

    #[tokio::test]
    async fn download_reads_exactly_the_named_slot_and_returns_it() {
        use std::os::unix::fs::FileExt;
        let (conn, mut g) = session();
        let at = g.window.locate(2, 5).unwrap();
        g.disk.write_all_at(b"hello", at).unwrap();
        let mut s = FsReadStream { conn: Some(conn), done: false };
        send(&mut g.guest, bulk(2, 5)).await;
        assert_eq!(s.next().await.unwrap().unwrap(), b"hello");
        let ack = read_frame_async(&mut g.guest).await.unwrap().unwrap();
        assert_eq!((ack.kind, ack.parse::<FsAck>().unwrap()), (Kind::FsAck, FsAck { slot: 2 }));
        send(&mut g.guest, Frame::json(SESSION, Kind::FsDone, &FsDone::default())).await;
        assert!(s.next().await.unwrap().is_none());
        assert!(s.conn.is_none(), "the connection closes with the session, freeing the window");
    }

    #[tokio::test]
    async fn download_refuses_slots_and_lengths_outside_the_window() {
        for (slot, len) in [(SLOTS, 1), (0, SLOT_SIZE + 1), (u32::MAX, u32::MAX)] {
            let (conn, mut g) = session();
            let mut s = FsReadStream { conn: Some(conn), done: false };
            send(&mut g.guest, bulk(slot, len)).await;
            let err = s.next().await.unwrap_err();
            assert!(matches!(err.error, Error::Protocol(_)), "slot {slot} len {len}: {err}");
            assert!(s.next().await.unwrap().is_none(), "a failed stream stays ended");
        }
        // Bulk frames in a session that got no window.
        let (mut conn, mut g) = session();
        conn.bulk = None;
        let mut s = FsReadStream { conn: Some(conn), done: false };
        send(&mut g.guest, bulk(0, 1)).await;
        assert!(matches!(s.next().await.unwrap_err().error, Error::Protocol(_)));
    }

    #[tokio::test]
    async fn upload_fills_slots_in_order_and_waits_for_them_back() {
        use std::os::unix::fs::FileExt;
        let (conn, mut g) = session();
        let mut sink = FsWriteSink::start(conn);
        let data: Vec<u8> = (0..(SLOT_SIZE as usize * 2 + 10)).map(|i| (i % 251) as u8).collect();
        sink.write(&data).await.unwrap();
        // Two full slots were handed over; the tail waits for finish().
        let mut got = Vec::new();
        for _ in 0..2 {
            let f = read_frame_async(&mut g.guest).await.unwrap().unwrap();
            let b: FsBulk = f.parse().unwrap();
            assert_eq!(b.len, SLOT_SIZE);
            let mut buf = vec![0u8; b.len as usize];
            g.disk.read_exact_at(&mut buf, g.window.locate(b.slot, b.len).unwrap()).unwrap();
            got.extend(buf);
            send(&mut g.guest, Frame::json(SESSION, Kind::FsAck, &FsAck { slot: b.slot })).await;
        }
        let fin = tokio::spawn(async move { sink.finish().await });
        let f = read_frame_async(&mut g.guest).await.unwrap().unwrap();
        let b: FsBulk = f.parse().unwrap();
        assert_eq!(b.len, 10);
        let mut buf = vec![0u8; 10];
        g.disk.read_exact_at(&mut buf, g.window.locate(b.slot, b.len).unwrap()).unwrap();
        got.extend(buf);
        assert_eq!(read_frame_async(&mut g.guest).await.unwrap().unwrap().kind, Kind::FsEof);
        send(&mut g.guest, Frame::json(SESSION, Kind::FsDone, &FsDone { size: Some(data.len() as u64), ..Default::default() })).await;
        assert_eq!(fin.await.unwrap().unwrap(), data.len() as u64);
        assert!(got == data);
    }

    #[tokio::test]
    async fn host_files_are_copied_into_slots_in_order() {
        use std::os::unix::fs::FileExt;
        let (conn, mut g) = session();
        let mut sink = FsWriteSink::start(conn);
        let data: Vec<u8> = (0..(SLOT_SIZE as usize * 2 + 5)).map(|i| (i % 241) as u8).collect();
        let src = std::sync::Arc::new(tempfile::tempfile().unwrap());
        src.write_all_at(&data, 0).unwrap();
        let guest = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let f = read_frame_async(&mut g.guest).await.unwrap().unwrap();
                if f.kind == Kind::FsEof {
                    break;
                }
                let b: FsBulk = f.parse().unwrap();
                let mut buf = vec![0u8; b.len as usize];
                g.disk.read_exact_at(&mut buf, g.window.locate(b.slot, b.len).unwrap()).unwrap();
                got.extend(buf);
                send(&mut g.guest, Frame::json(SESSION, Kind::FsAck, &FsAck { slot: b.slot })).await;
            }
            send(&mut g.guest, Frame::json(SESSION, Kind::FsDone, &FsDone::default())).await;
            got
        });
        sink.copy_file(&src).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), data.len() as u64);
        assert!(guest.await.unwrap() == data);
    }

    #[tokio::test]
    async fn upload_refuses_a_guest_returning_slots_it_does_not_have() {
        // A slot outside the window, returned when the host needs one back.
        let (conn, mut g) = session();
        let mut sink = FsWriteSink::start(conn);
        send(&mut g.guest, Frame::json(SESSION, Kind::FsAck, &FsAck { slot: SLOTS + 5 })).await;
        let big = vec![7u8; SLOT_SIZE as usize * (SLOTS as usize + 1)];
        let err = sink.write(&big).await.unwrap_err();
        assert!(matches!(err.error, Error::Protocol(_)), "{err}");

        // More slots returned than the window has: the queue of returned slots stays
        // bounded and the upload fails.
        let (conn, mut g) = session();
        let mut sink = FsWriteSink::start(conn);
        for _ in 0..SLOTS * 10 {
            send(&mut g.guest, Frame::json(SESSION, Kind::FsAck, &FsAck { slot: 0 })).await;
        }
        let err = sink.finish().await.unwrap_err();
        assert!(err.to_string().contains("more slots than it held"), "{err}");
    }
}
