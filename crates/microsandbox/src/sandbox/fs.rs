//! Host side of guest filesystem sessions (`FsRequest` … `FsDone`/`Error`).
//!
//! Each call opens its own control connection, like exec: cancelling a call (dropping
//! its future, a stream or a sink) closes the connection and the supervisor cancels the
//! session in the guest. Everything that could grow with guest data is bounded: `read`
//! refuses files over [`MAX_READ`], `list` over [`MAX_LIST_ENTRIES`]; the streaming
//! calls hold at most a few frames.

use std::path::{Path, PathBuf};

use microsandbox_protocol::{
    read_frame_async, write_frame_async, ErrorMsg, Frame, FsDone, FsOp, FsRequest, Kind, MAX_CHUNK,
};
pub use microsandbox_protocol::{FsEntry, FsKind, FsStat};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;

use super::config::validate_guest_path;
use super::Sandbox;
use crate::error::Error;

const SESSION: u32 = 1;
/// Largest file [`Sandbox::fs_read`] loads into memory.
pub const MAX_READ: u64 = 256 << 20;
/// Most entries [`Sandbox::fs_list`] returns.
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// Bytes per upload frame.
const UPLOAD_CHUNK: usize = MAX_CHUNK;

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
        "fs-error" => Error::Filesystem(e.message),
        "invalid-request" => Error::InvalidConfig(e.message),
        _ => Error::Protocol(format!("agent error {}: {}", e.code, e.message)),
    };
    FsError { error, errno: e.errno }
}

fn host_io(what: String) -> impl FnOnce(std::io::Error) -> FsError {
    move |source| Error::Io { context: what, source }.into()
}

/// One frame of a filesystem session, as the host sees it.
enum Event {
    Data(Vec<u8>),
    Done(FsDone),
}

async fn next_event(rd: &mut OwnedReadHalf) -> FsResult<Event> {
    let f = read_frame_async(rd).await?.ok_or_else(vm_gone)?;
    if f.id != SESSION {
        return Err(Error::Protocol(format!("frame for unknown session {}", f.id)).into());
    }
    match f.kind {
        Kind::FsData => Ok(Event::Data(f.payload)),
        Kind::FsDone => Ok(Event::Done(f.parse()?)),
        Kind::Error => Err(agent_error(f.parse()?)),
        other => Err(Error::Protocol(format!("unexpected {other:?} frame in a filesystem session")).into()),
    }
}

/// Waits for the session's last frame, refusing data.
async fn final_event(rd: &mut OwnedReadHalf) -> FsResult<FsDone> {
    match next_event(rd).await? {
        Event::Done(d) => Ok(d),
        Event::Data(_) => Err(Error::Protocol("unexpected data in a filesystem session".into()).into()),
    }
}

fn request(op: FsOp, path: &str) -> FsRequest {
    FsRequest { op, path: path.into(), path2: None, recursive: false, parents: false, mode: None }
}

impl Sandbox {
    /// Opens a connection and sends `req` after validating its paths.
    async fn fs_open(&self, req: &FsRequest) -> FsResult<(OwnedReadHalf, OwnedWriteHalf)> {
        validate_guest_path("path", &req.path)?;
        if let Some(p) = &req.path2 {
            validate_guest_path("path", p)?;
        }
        let conn = self.connect().await?;
        let (rd, mut wr) = conn.into_split();
        write_frame_async(&mut wr, &Frame::json(SESSION, Kind::FsRequest, req)).await.map_err(|_| vm_gone())?;
        Ok((rd, wr))
    }

    /// Runs an operation that answers with a single `FsDone`.
    async fn fs_simple(&self, req: FsRequest) -> FsResult<FsDone> {
        let (mut rd, _wr) = self.fs_open(&req).await?;
        self.fs_map(final_event(&mut rd).await)
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
    pub async fn fs_read(&self, path: &str) -> FsResult<Vec<u8>> {
        let mut s = self.fs_read_stream(path).await?;
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await? {
            if out.len() as u64 + chunk.len() as u64 > MAX_READ {
                return Err(Error::Filesystem(format!(
                    "{path} is larger than {} MiB; read it in chunks with read_stream",
                    MAX_READ >> 20
                ))
                .into());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Creates or truncates a guest file and writes `data` to it.
    pub async fn fs_write(&self, path: &str, data: Vec<u8>) -> FsResult<u64> {
        let mut sink = self.fs_write_stream(path).await?;
        for chunk in data.chunks(UPLOAD_CHUNK) {
            sink.write(chunk).await?;
        }
        sink.finish().await
    }

    /// True when `path` exists in the guest (following symlinks).
    pub async fn fs_exists(&self, path: &str) -> FsResult<bool> {
        Ok(self.fs_simple(request(FsOp::Exists, path)).await?.exists.unwrap_or(false))
    }

    /// Creates a directory; with `parents`, missing parents too and an existing directory is fine.
    pub async fn fs_mkdir(&self, path: &str, parents: bool) -> FsResult<()> {
        self.fs_simple(FsRequest { parents, ..request(FsOp::Mkdir, path) }).await.map(drop)
    }

    /// Removes a file, symlink or empty directory; with `recursive`, a whole tree.
    pub async fn fs_remove(&self, path: &str, recursive: bool) -> FsResult<()> {
        self.fs_simple(FsRequest { recursive, ..request(FsOp::Remove, path) }).await.map(drop)
    }

    /// Copies a guest file to another guest path (inside the guest).
    pub async fn fs_copy(&self, src: &str, dst: &str) -> FsResult<()> {
        self.fs_simple(FsRequest { path2: Some(dst.into()), ..request(FsOp::Copy, src) }).await.map(drop)
    }

    /// Renames (moves) a guest path.
    pub async fn fs_rename(&self, src: &str, dst: &str) -> FsResult<()> {
        self.fs_simple(FsRequest { path2: Some(dst.into()), ..request(FsOp::Rename, src) }).await.map(drop)
    }

    /// Entries of a guest directory, sorted by name (at most [`MAX_LIST_ENTRIES`]).
    pub async fn fs_list(&self, path: &str) -> FsResult<Vec<FsEntry>> {
        let (mut rd, _wr) = self.fs_open(&request(FsOp::List, path)).await?;
        let mut out: Vec<FsEntry> = Vec::new();
        loop {
            match self.fs_map(next_event(&mut rd).await)? {
                Event::Data(batch) => {
                    let mut entries: Vec<FsEntry> = serde_json::from_slice(&batch)
                        .map_err(|e| Error::Protocol(format!("malformed directory listing from the guest: {e}")))?;
                    if out.len() + entries.len() > MAX_LIST_ENTRIES {
                        return Err(Error::Filesystem(format!(
                            "{path} has more than {MAX_LIST_ENTRIES} entries; list it with a command instead"
                        ))
                        .into());
                    }
                    out.append(&mut entries);
                }
                Event::Done(_) => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// `lstat` of a guest path.
    pub async fn fs_stat(&self, path: &str) -> FsResult<FsStat> {
        self.fs_simple(request(FsOp::Stat, path))
            .await?
            .stat
            .ok_or_else(|| Error::Protocol("the guest answered stat without metadata".into()).into())
    }

    /// Streams a guest file in chunks of at most `MAX_CHUNK` bytes.
    pub async fn fs_read_stream(&self, path: &str) -> FsResult<FsReadStream> {
        let (rd, wr) = self.fs_open(&request(FsOp::Read, path)).await?;
        Ok(FsReadStream { rd, _wr: wr, done: false })
    }

    /// Creates or truncates a guest file and returns a sink that uploads to it.
    pub async fn fs_write_stream(&self, path: &str) -> FsResult<FsWriteSink> {
        let (mut rd, wr) = self.fs_open(&request(FsOp::Write, path)).await?;
        // The agent may fail at any time (cannot create the file, disk full): watch for
        // its answer while the caller writes.
        let answer = tokio::spawn(async move { final_event(&mut rd).await });
        Ok(FsWriteSink { wr: Some(wr), answer: Some(answer), written: 0 })
    }

    /// Uploads a host file to the guest, streaming (memory stays bounded).
    pub async fn fs_copy_from_host(&self, host: &Path, guest: &str) -> FsResult<u64> {
        let mut file = tokio::fs::File::open(host).await.map_err(host_io(format!("opening {}", host.display())))?;
        let mut sink = self.fs_write_stream(guest).await?;
        let mut buf = vec![0u8; UPLOAD_CHUNK];
        loop {
            let n = file.read(&mut buf).await.map_err(host_io(format!("reading {}", host.display())))?;
            if n == 0 {
                break;
            }
            sink.write(&buf[..n]).await?;
        }
        sink.finish().await
    }

    /// Downloads a guest file to a host path, streaming. A failed download removes the
    /// partial host file.
    pub async fn fs_copy_to_host(&self, guest: &str, host: &Path) -> FsResult<u64> {
        let mut s = self.fs_read_stream(guest).await?;
        let host: PathBuf = host.to_path_buf();
        let mut file = tokio::fs::File::create(&host).await.map_err(host_io(format!("creating {}", host.display())))?;
        let res = async {
            let mut total = 0u64;
            while let Some(chunk) = s.next().await? {
                file.write_all(&chunk).await.map_err(host_io(format!("writing {}", host.display())))?;
                total += chunk.len() as u64;
            }
            file.flush().await.map_err(host_io(format!("writing {}", host.display())))?;
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
    rd: OwnedReadHalf,
    /// Closing the write half would end the session: keep it until the stream is dropped.
    _wr: OwnedWriteHalf,
    done: bool,
}

impl FsReadStream {
    /// The next chunk; `Ok(None)` at the end of the file.
    pub async fn next(&mut self) -> FsResult<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        let ev = next_event(&mut self.rd).await;
        match ev {
            Ok(Event::Data(d)) => Ok(Some(d)),
            Ok(Event::Done(_)) => {
                self.done = true;
                Ok(None)
            }
            Err(e) => {
                self.done = true;
                Err(e)
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
}

impl FsWriteSink {
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

    /// Appends `data` to the file (waits while the guest is behind).
    pub async fn write(&mut self, data: &[u8]) -> FsResult<()> {
        if self.answer.as_ref().is_some_and(|a| a.is_finished()) {
            // The guest ended the session early: that is always an error for an upload.
            return Err(match self.take_answer().await {
                Err(e) => e,
                Ok(_) => Error::Protocol("the guest ended an upload before it was finished".into()).into(),
            });
        }
        let wr = self.wr.as_mut().ok_or_else(Self::closed)?;
        for chunk in data.chunks(UPLOAD_CHUNK) {
            if write_frame_async(wr, &Frame::data(SESSION, Kind::FsData, chunk.to_vec())).await.is_err() {
                // The connection broke: the answer (or its absence) says why.
                return Err(self.take_answer().await.err().unwrap_or_else(vm_gone));
            }
        }
        self.written += data.len() as u64;
        Ok(())
    }

    /// Completes the upload; returns the bytes written.
    pub async fn finish(&mut self) -> FsResult<u64> {
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
