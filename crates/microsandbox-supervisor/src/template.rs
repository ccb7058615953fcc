//! The supervisor's side of templates, pause and fork (see `microsandbox::template`):
//! saving a running VM through QMP, and making a restored VM this sandbox (the `Restore`
//! handshake).

use std::time::{Duration, Instant};

use microsandbox_protocol::{read_frame_async, write_frame_async, Frame, Kind, Ready, RestoreIdentity, RESTORE_ENTROPY_BYTES};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest QMP line read (QMP answers here are small; a runaway monitor must not grow memory).
const MAX_QMP_LINE: usize = 64 * 1024;
/// How often `query-migrate` is polled while saving.
const POLL: Duration = Duration::from_millis(20);

/// A minimal QMP client: one command at a time, events skipped.
struct Qmp {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &std::path::Path, within: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("cannot connect to QMP at {}: {e}", path.display())),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        };
        let (rd, wr) = stream.into_split();
        let mut q = Qmp { rd: BufReader::new(rd), wr };
        q.line().await?; // greeting
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn line(&mut self) -> Result<Value, String> {
        let mut buf = Vec::new();
        loop {
            let chunk = self.rd.fill_buf().await.map_err(|e| format!("QMP: {e}"))?;
            if chunk.is_empty() {
                return Err("QMP closed".into());
            }
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            buf.extend_from_slice(&chunk[..take]);
            self.rd.consume(take);
            if buf.len() > MAX_QMP_LINE {
                return Err("QMP line too long".into());
            }
            if done {
                return serde_json::from_slice(&buf).map_err(|e| format!("QMP: {e}"));
            }
        }
    }

    /// Runs `cmd` and returns its `return` value; an `error` answer is an error.
    async fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let mut msg = serde_json::to_vec(&json!({"execute": cmd, "arguments": args})).unwrap();
        msg.push(b'\n');
        self.wr.write_all(&msg).await.map_err(|e| format!("QMP: {e}"))?;
        self.answer(cmd).await
    }

    /// The answer to the command just sent (events skipped).
    async fn answer(&mut self, cmd: &str) -> Result<Value, String> {
        loop {
            let v = self.line().await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {}", e.get("desc").and_then(Value::as_str).unwrap_or("error")));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

/// Sends `cmd` on the QMP socket with `fd` attached (`SCM_RIGHTS`), as `getfd` needs.
fn send_with_fd(sock: &impl std::os::fd::AsRawFd, cmd: &[u8], fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: a msghdr over `cmd` with one SCM_RIGHTS control message of one fd, in a
    // buffer sized and aligned by CMSG_SPACE; all pointers outlive the call.
    unsafe {
        let mut iov = libc::iovec { iov_base: cmd.as_ptr() as *mut libc::c_void, iov_len: cmd.len() };
        let space = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        let mut control = vec![0u64; space.div_ceil(8)];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n as usize != cmd.len() {
            return Err(std::io::Error::other("short write on the QMP socket"));
        }
    }
    Ok(())
}

/// What a migration leaves the source VM doing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// `quit`: the VM ends (template build, pause).
    Quit,
    /// Keep the source paused, for the caller to copy its disk and `cont` it (fork).
    Paused,
}

/// Writes the running VM's migration stream into `out` (a file the supervisor opened,
/// handed to QEMU with `getfd`, so no path or shell is involved). The guest is idle or
/// nearly so, so a live migration converges in a pass or two; at `completed` QEMU has
/// written the whole stream to the file and flushed and released the disks, and the VM
/// is paused. Returns the QMP connection for [`After::Paused`].
pub async fn save_to(qmp: &std::path::Path, out: &std::fs::File, within: Duration, after: After) -> Result<Option<QmpConn>, String> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + within;
    let mut q = Qmp::connect(qmp, within).await?;
    let mut cmd = serde_json::to_vec(&json!({"execute": "getfd", "arguments": {"fdname": "msbstate"}})).unwrap();
    cmd.push(b'\n');
    q.wr.writable().await.map_err(|e| format!("QMP: {e}"))?;
    send_with_fd(q.wr.as_ref(), &cmd, out.as_raw_fd()).map_err(|e| format!("QMP getfd: {e}"))?;
    q.answer("getfd").await?;
    // QEMU 7.2 throttles migration to 32 MiB/s by default; this is a local file.
    q.execute("migrate-set-parameters", json!({"max-bandwidth": 16u64 << 30, "downtime-limit": 2000})).await?;
    q.execute("migrate", json!({"uri": "fd:msbstate"})).await?;
    loop {
        let st = q.execute("query-migrate", json!({})).await?;
        match st.get("status").and_then(Value::as_str) {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => {
                return Err(format!(
                    "QEMU could not save the VM: {}",
                    st.get("error-desc").and_then(Value::as_str).unwrap_or("migration failed")
                ))
            }
            _ if Instant::now() >= deadline => {
                let _ = q.execute("migrate_cancel", json!({})).await;
                return Err("saving the VM timed out".into());
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
    match after {
        After::Quit => {
            let _ = q.execute("quit", json!({})).await;
            Ok(None)
        }
        After::Paused => Ok(Some(QmpConn(q))),
    }
}

/// A QMP connection kept open after a save (the source VM is paused).
pub struct QmpConn(Qmp);

impl QmpConn {
    /// Lets the paused source VM run again (its disks are re-activated by `cont`).
    pub async fn resume(mut self) -> Result<(), String> {
        self.0.execute("cont", json!({})).await.map(|_| ())
    }
}

/// Saves the running VM into `dir/<name>` (created 0600) and has QEMU quit.
pub async fn save(qmp: &std::path::Path, path: &std::path::Path, within: Duration) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    save_to(qmp, &out, within, After::Quit).await?;
    out.sync_all().map_err(|e| format!("cannot sync {}: {e}", path.display()))
}

/// The running VM's QMP socket and sandbox directory, for [`fork`]; set once it booted.
static FORK_SOURCE: std::sync::OnceLock<(std::path::PathBuf, std::path::PathBuf)> = std::sync::OnceLock::new();

pub fn set_fork_source(qmp: std::path::PathBuf, dir: std::path::PathBuf) {
    let _ = FORK_SOURCE.set((qmp, dir));
}

/// Bound on snapshotting the VM for a fork (its whole memory at most).
const FORK_TIMEOUT: Duration = Duration::from_secs(120);

fn plain_file_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 128 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') && !n.starts_with('.')
}

/// Snapshots the running VM for `Sandbox#fork`: the migration stream into `req.state`
/// (in the sandbox directory), then — while the VM is paused at the end of the
/// migration, its disk flushed and released — a copy of its root disk to `req.disk_to`,
/// then the VM runs on. The VM is resumed whatever happened after the save.
pub async fn fork(req: microsandbox_protocol::ForkRequest) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let (qmp, dir) = FORK_SOURCE.get().ok_or("this sandbox cannot be forked (its QEMU has no QMP socket)")?;
    if !plain_file_name(&req.state) || !plain_file_name(&req.disk) {
        return Err("invalid fork file names".into());
    }
    let path = dir.join(&req.state);
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let conn = match save_to(qmp, &out, FORK_TIMEOUT, After::Paused).await {
        Ok(c) => c.expect("a paused save returns its connection"),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
    };
    let (from, to) = (dir.join(&req.disk), req.disk_to.clone());
    let copied = tokio::task::spawn_blocking(move || std::fs::copy(&from, &to).map(|_| ()).map_err(|e| format!("cannot copy the disk: {e}")))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    let resumed = conn.resume().await;
    let synced = out.sync_all().map_err(|e| format!("cannot sync the state: {e}"));
    if copied.is_err() || synced.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    copied?;
    synced?;
    resumed.map_err(|e| format!("the sandbox did not run again after the snapshot: {e}"))
}

/// A random number from the host (0 if the kernel refuses, which it does not).
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    fill_random(&mut b).map(|_| u32::from_ne_bytes(b)).unwrap_or(0)
}

/// Fresh host randomness for a restored guest, hex.
fn entropy() -> Result<String, String> {
    let mut buf = [0u8; RESTORE_ENTROPY_BYTES];
    fill_random(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn fill_random(buf: &mut [u8]) -> Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: writes at most `buf.len() - got` bytes into `buf[got..]`.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("getrandom: {e}"));
        }
        got += n as usize;
    }
    Ok(())
}

/// Makes the just-restored guest this sandbox: sends its identity and waits for the
/// agent's `Ready`, which it sends only after applying all of it.
pub async fn handshake(stream: &mut UnixStream, hostname: &str) -> Result<Ready, String> {
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_nanos() as u64;
    let id = RestoreIdentity { entropy: entropy()?, realtime_ns, hostname: hostname.to_string() };
    write_frame_async(stream, &Frame::json(0, Kind::Restore, &id)).await.map_err(|e| format!("agent channel: {e}"))?;
    let frame = read_frame_async(stream)
        .await
        .map_err(|e| format!("agent channel: {e}"))?
        .ok_or("the agent channel closed during the restore")?;
    match frame.kind {
        Kind::Ready => frame.parse().map_err(|e| e.to_string()),
        Kind::Error => {
            let e: microsandbox_protocol::ErrorMsg = frame.parse().map_err(|e| e.to_string())?;
            Err(format!("the agent could not take this sandbox's identity: {}", e.message))
        }
        other => Err(format!("the agent sent {other:?} instead of Ready after the restore")),
    }
}
