//! Guest filesystem calls on `Microsandbox::Native::Sandbox` (`fs_*` methods) and the
//! streaming classes `Native::FsReadStream` / `Native::FsWriteSink`.
//!
//! Like exec: arguments are converted (and Ruby bytes copied) with the GVL held, then
//! the engine call runs in [`crate::gvl::run`]. Failures carry the guest errno, which is
//! set as `@errno` on the raised `Microsandbox::FilesystemError`.

use std::path::PathBuf;
use std::sync::Arc;

use magnus::{prelude::*, Error, RArray, RString, Ruby, Value};
use microsandbox::sandbox::{FsEntry, FsError, FsKind, FsReadStream, FsStat, FsWriteSink};
use tokio::sync::Mutex;

use crate::errors::to_ruby;
use crate::fork::ProcessLocal;
use crate::sandbox::RbSandbox;

/// Drops an open transfer (download or upload), which cancels it; a no-op once closed.
/// The lock is taken without the GVL: a transfer call may hold it while it waits.
/// In a forked child (the transfer is the parent's) it does nothing.
fn drop_transfer<T: Send + 'static>(ruby: &Ruby, slot: &ProcessLocal<Arc<Mutex<Option<T>>>>) -> Result<Value, Error> {
    let Some(slot) = slot.get().cloned() else { return Ok(nil(ruby)) };
    run(ruby, async move {
        drop(slot.lock().await.take());
        Ok(())
    })?;
    Ok(nil(ruby))
}

/// The transfer behind a stream, unless this process inherited it through `fork`.
fn local<T: Clone>(ruby: &Ruby, slot: &ProcessLocal<T>, what: &str) -> Result<T, Error> {
    slot.get().cloned().ok_or_else(|| to_ruby(ruby, crate::fork::inherited_error(what)))
}

/// Runs an fs future without the GVL; errors become Ruby exceptions with `@errno`.
fn run<T, F>(ruby: &Ruby, fut: F) -> Result<T, Error>
where
    F: std::future::Future<Output = Result<T, FsError>>,
{
    match crate::gvl::run(async move { Ok(fut.await) }) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(fs_to_ruby(ruby, e)),
        Err(e) => Err(to_ruby(ruby, e)),
    }
}

fn fs_to_ruby(ruby: &Ruby, e: FsError) -> Error {
    let err = to_ruby(ruby, e.error);
    if let (Some(errno), Some(exc)) = (e.errno, err.value()) {
        let _: Result<Value, Error> = exc.funcall("instance_variable_set", ("@errno", errno));
    }
    err
}

pub(crate) fn kind_sym(ruby: &Ruby, k: FsKind) -> magnus::Symbol {
    ruby.to_symbol(match k {
        FsKind::File => "file",
        FsKind::Directory => "directory",
        FsKind::Symlink => "symlink",
        FsKind::Other => "other",
    })
}

/// A copy of a Ruby String's bytes (paths are bytes: any encoding, not only UTF-8). Taken
/// with the GVL held, before the call releases it.
pub(crate) fn bytes(s: RString) -> Vec<u8> {
    // SAFETY: the slice is copied at once, while the GVL is held.
    unsafe { s.as_slice() }.to_vec()
}

fn host_path(s: RString) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(bytes(s)))
}

/// A guest name for Ruby: a UTF-8 String when its bytes are UTF-8, else a binary String
/// with the exact bytes (which names the same file when passed back).
pub(crate) fn name_to_ruby(ruby: &Ruby, name: &[u8]) -> RString {
    match std::str::from_utf8(name) {
        Ok(text) => ruby.str_new(text),
        Err(_) => ruby.str_from_slice(name),
    }
}

/// One `list` entry for Ruby: `[name, kind, size, mode, mtime_sec, mtime_nsec]`, shared by
/// the guest's `FS#list` and the host's `VolumeFs#list`. Nanoseconds are clamped below one
/// second: a guest's value is not trusted to be in range.
pub(crate) fn entry_row(ruby: &Ruby, e: &FsEntry) -> Result<RArray, Error> {
    let row = ruby.ary_new_capa(6);
    row.push(name_to_ruby(ruby, e.name.as_bytes()))?;
    row.push(kind_sym(ruby, e.kind))?;
    row.push(e.size)?;
    row.push(e.mode)?;
    row.push(e.mtime_sec)?;
    row.push(e.mtime_nsec.min(999_999_999))?;
    Ok(row)
}

/// One `stat` for Ruby: `[kind, size, mode, uid, gid, mtime_sec, mtime_nsec, btime_sec,
/// btime_nsec]` (birth time nil where the filesystem has none), nanoseconds clamped as in
/// [`entry_row`].
pub(crate) fn stat_row(ruby: &Ruby, st: &FsStat) -> Result<RArray, Error> {
    let out = ruby.ary_new_capa(9);
    out.push(kind_sym(ruby, st.kind))?;
    out.push(st.size)?;
    out.push(st.mode)?;
    out.push(st.uid)?;
    out.push(st.gid)?;
    out.push(st.mtime_sec)?;
    out.push(st.mtime_nsec.min(999_999_999))?;
    out.push(st.btime_sec)?;
    out.push(st.btime_nsec.map(|n| n.min(999_999_999)))?;
    Ok(out)
}

fn nil(ruby: &Ruby) -> Value {
    ruby.qnil().as_value()
}

impl RbSandbox {
    /// `fs_read(path)` → binary String.
    pub fn fs_read(ruby: &Ruby, rb_self: &Self, path: RString) -> Result<RString, Error> {
        let path = bytes(path);
        let sb = rb_self.handle();
        let bytes = run(ruby, async move { sb.fs_read(&path).await })?;
        Ok(ruby.str_from_slice(&bytes))
    }

    /// `fs_write(path, data)` → bytes written.
    pub fn fs_write(ruby: &Ruby, rb_self: &Self, path: RString, data: RString) -> Result<u64, Error> {
        let path = bytes(path);
        // Copy before the GVL is released: GC may move the string.
        let data = unsafe { data.as_slice() }.to_vec();
        let sb = rb_self.handle();
        run(ruby, async move { sb.fs_write(&path, data).await })
    }

    pub fn fs_exists(ruby: &Ruby, rb_self: &Self, path: RString) -> Result<bool, Error> {
        let path = bytes(path);
        let sb = rb_self.handle();
        run(ruby, async move { sb.fs_exists(&path).await })
    }

    pub fn fs_mkdir(ruby: &Ruby, rb_self: &Self, path: RString, parents: bool) -> Result<Value, Error> {
        let path = bytes(path);
        let sb = rb_self.handle();
        run(ruby, async move { sb.fs_mkdir(&path, parents).await })?;
        Ok(nil(ruby))
    }

    pub fn fs_remove(ruby: &Ruby, rb_self: &Self, path: RString, recursive: bool) -> Result<Value, Error> {
        let path = bytes(path);
        let sb = rb_self.handle();
        run(ruby, async move { sb.fs_remove(&path, recursive).await })?;
        Ok(nil(ruby))
    }

    pub fn fs_copy(ruby: &Ruby, rb_self: &Self, src: RString, dst: RString) -> Result<Value, Error> {
        let src = bytes(src);
        let dst = bytes(dst);
        let sb = rb_self.handle();
        run(ruby, async move { sb.fs_copy(&src, &dst).await })?;
        Ok(nil(ruby))
    }

    pub fn fs_rename(ruby: &Ruby, rb_self: &Self, src: RString, dst: RString) -> Result<Value, Error> {
        let src = bytes(src);
        let dst = bytes(dst);
        let sb = rb_self.handle();
        run(ruby, async move { sb.fs_rename(&src, &dst).await })?;
        Ok(nil(ruby))
    }

    /// `fs_list(path)` → `[[name, kind, size, mode], ...]` sorted by name.
    pub fn fs_list(ruby: &Ruby, rb_self: &Self, path: RString) -> Result<RArray, Error> {
        let path = bytes(path);
        let sb = rb_self.handle();
        let entries = run(ruby, async move { sb.fs_list(&path).await })?;
        let out = ruby.ary_new_capa(entries.len());
        for e in entries {
            out.push(entry_row(ruby, &e)?)?;
        }
        Ok(out)
    }

    /// `fs_stat(path)` → `[kind, size, mode, uid, gid, mtime_sec, mtime_nsec, btime_sec
    /// or nil, btime_nsec or nil]`.
    pub fn fs_stat(ruby: &Ruby, rb_self: &Self, path: RString) -> Result<RArray, Error> {
        let path = bytes(path);
        let sb = rb_self.handle();
        let st = run(ruby, async move { sb.fs_stat(&path).await })?;
        stat_row(ruby, &st)
    }

    /// `fs_copy_from_host(host_path, guest_path)` → bytes copied.
    pub fn fs_copy_from_host(ruby: &Ruby, rb_self: &Self, host: RString, guest: RString) -> Result<u64, Error> {
        let host = host_path(host);
        let guest = bytes(guest);
        let sb = rb_self.handle();
        run(ruby, async move { sb.fs_copy_from_host(&host, &guest).await })
    }

    /// `fs_copy_to_host(guest_path, host_path)` → bytes copied.
    pub fn fs_copy_to_host(ruby: &Ruby, rb_self: &Self, guest: RString, host: RString) -> Result<u64, Error> {
        let guest = bytes(guest);
        let host = host_path(host);
        let sb = rb_self.handle();
        run(ruby, async move { sb.fs_copy_to_host(&guest, &host).await })
    }

    pub fn fs_read_stream(ruby: &Ruby, rb_self: &Self, path: RString) -> Result<RbFsReadStream, Error> {
        let path = bytes(path);
        let sb = rb_self.handle();
        let s = run(ruby, async move { sb.fs_read_stream(&path).await })?;
        Ok(RbFsReadStream { inner: ProcessLocal::new(Arc::new(Mutex::new(Some(s)))) })
    }

    pub fn fs_write_stream(ruby: &Ruby, rb_self: &Self, path: RString) -> Result<RbFsWriteSink, Error> {
        let path = bytes(path);
        let sb = rb_self.handle();
        let s = run(ruby, async move { sb.fs_write_stream(&path).await })?;
        Ok(RbFsWriteSink { inner: ProcessLocal::new(Arc::new(Mutex::new(Some(s)))) })
    }
}

/// `Microsandbox::Native::FsReadStream`: a download in progress.
#[magnus::wrap(class = "Microsandbox::Native::FsReadStream", free_immediately, size)]
pub struct RbFsReadStream {
    /// Never touched or dropped in a forked child (see fork.rs).
    inner: ProcessLocal<Arc<Mutex<Option<FsReadStream>>>>,
}

impl RbFsReadStream {
    /// The next chunk (binary String), or nil at the end of the file.
    pub fn next_chunk(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        let inner = local(ruby, &rb_self.inner, "file read stream")?;
        let chunk = run(ruby, async move {
            let mut guard = inner.lock().await;
            match guard.as_mut() {
                Some(s) => {
                    let r = s.next().await;
                    if !matches!(r, Ok(Some(_))) {
                        guard.take(); // finished or failed: release the connection
                    }
                    r
                }
                None => Ok(None),
            }
        })?;
        Ok(match chunk {
            Some(b) => ruby.str_from_slice(&b).as_value(),
            None => nil(ruby),
        })
    }

    /// Cancels the download if it is still running. Idempotent.
    pub fn close(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        drop_transfer(ruby, &rb_self.inner)
    }
}

/// `Microsandbox::Native::FsWriteSink`: an upload in progress.
#[magnus::wrap(class = "Microsandbox::Native::FsWriteSink", free_immediately, size)]
pub struct RbFsWriteSink {
    /// Never touched or dropped in a forked child (see fork.rs).
    inner: ProcessLocal<Arc<Mutex<Option<FsWriteSink>>>>,
}

impl RbFsWriteSink {
    fn closed() -> FsError {
        microsandbox::Error::Filesystem("the write stream is already closed".into()).into()
    }

    pub fn write(ruby: &Ruby, rb_self: &Self, data: RString) -> Result<Value, Error> {
        let inner = local(ruby, &rb_self.inner, "file write stream")?;
        let data = unsafe { data.as_slice() }.to_vec();
        run(ruby, async move {
            let mut guard = inner.lock().await;
            let sink = guard.as_mut().ok_or_else(Self::closed)?;
            let r = sink.write_owned(data).await;
            if r.is_err() {
                guard.take();
            }
            r
        })?;
        Ok(nil(ruby))
    }

    /// Completes the upload → bytes written.
    pub fn finish(ruby: &Ruby, rb_self: &Self) -> Result<u64, Error> {
        let inner = local(ruby, &rb_self.inner, "file write stream")?;
        run(ruby, async move {
            let mut guard = inner.lock().await;
            let mut sink = guard.take().ok_or_else(Self::closed)?;
            sink.finish().await
        })
    }

    /// Abandons the upload if it is still open. Idempotent.
    pub fn close(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        drop_transfer(ruby, &rb_self.inner)
    }
}
