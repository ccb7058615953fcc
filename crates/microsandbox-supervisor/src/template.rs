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

/// Streams the VM's migration into `out` (a file or FIFO the supervisor opened, handed to
/// QEMU with `getfd`, so no path or shell is involved) and waits for `completed`: QEMU
/// has then written the whole stream, flushed and released the disks, and the VM is
/// paused (`postmigrate`; `cont` activates the disks again).
async fn migrate_into(q: &mut Qmp, out: &impl std::os::fd::AsRawFd, deadline: Instant) -> Result<(), String> {
    let mut cmd = serde_json::to_vec(&json!({"execute": "getfd", "arguments": {"fdname": "msbstate"}})).unwrap();
    cmd.push(b'\n');
    q.wr.writable().await.map_err(|e| format!("QMP: {e}"))?;
    send_with_fd(q.wr.as_ref(), &cmd, out.as_raw_fd()).map_err(|e| format!("QMP getfd: {e}"))?;
    q.answer("getfd").await?;
    // QEMU 7.2 throttles migration to 32 MiB/s by default; this is a local file or pipe.
    q.execute("migrate-set-parameters", json!({"max-bandwidth": 16u64 << 30, "downtime-limit": 2000})).await?;
    set_capabilities(q).await?;
    q.execute("migrate", json!({"uri": "fd:msbstate"})).await?;
    loop {
        let st = q.execute("query-migrate", json!({})).await?;
        match st.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
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
}

/// Every migration, out and in, runs with `x-ignore-shared`: RAM in a shared file (a
/// template's, see `microsandbox::vmm::RamFile`) stays out of the stream, private RAM is
/// migrated in full. QEMU refuses a stream whose capability differs from its own, so both
/// ends always set it (QEMU 7.2 has no command-line switch for it: QMP it is, and a
/// restoring QEMU starts with `-incoming defer`).
async fn set_capabilities(q: &mut Qmp) -> Result<(), String> {
    q.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})).await.map(|_| ())
}

/// Writes the running VM's migration stream into `out` and has QEMU quit (template
/// build, pause). The guest is idle or nearly so, so a live migration converges in a
/// pass or two.
async fn save_to(qmp: &std::path::Path, out: &std::fs::File, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut q = Qmp::connect(qmp, within).await?;
    migrate_into(&mut q, out, deadline).await?;
    let _ = q.execute("quit", json!({})).await;
    Ok(())
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
    save_to(qmp, &out, within).await?;
    out.sync_all().map_err(|e| format!("cannot sync {}: {e}", path.display()))
}

/// The running VM's QMP socket and sandbox directory, for [`fork`]; set once it booted.
static FORK_SOURCE: std::sync::OnceLock<(std::path::PathBuf, std::path::PathBuf)> = std::sync::OnceLock::new();

pub fn set_fork_source(qmp: std::path::PathBuf, dir: std::path::PathBuf) {
    let _ = FORK_SOURCE.set((qmp, dir));
}

/// Bound on streaming the VM to a fork (its whole memory at most), and on waiting for
/// the child's QEMU to open the stream.
const FORK_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the parent looks for the child's reader on the fork FIFO.
const FIFO_POLL: Duration = Duration::from_millis(5);

fn plain_file_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 128 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') && !n.starts_with('.')
}

/// Clears `O_NONBLOCK` on `f` (QEMU gets a blocking descriptor).
fn set_blocking(f: &std::fs::File) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor `f` owns.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The parent's end of the fork FIFO: opened for writing once the child's supervisor has
/// it open for reading (`ENXIO` until then). The engine deletes the FIFO when it gives
/// the child up, which ends the wait (`ENOENT`).
async fn open_fifo_writer(path: &std::path::Path, deadline: Instant) -> Result<std::fs::File, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    loop {
        match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path) {
            Ok(f) => {
                if !f.metadata().map(|m| m.file_type().is_fifo()).unwrap_or(false) {
                    return Err(format!("{} is not a FIFO", path.display()));
                }
                set_blocking(&f)?;
                // Larger pipe buffer, fewer wake-ups (best effort: capped by pipe-max-size).
                // SAFETY: fcntl on a descriptor `f` owns.
                unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_SETPIPE_SZ, 1 << 20) };
                return Ok(f);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => tokio::time::sleep(FIFO_POLL).await,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Err("the new sandbox did not start reading the state in time".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("the new sandbox was given up".into()),
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        }
    }
}

/// `Sandbox#fork`, the parent's side: the VM is stopped (QEMU flushes its disks), its
/// root disk copied to `req.disk_to`, then its migration stream written into the FIFO
/// `req.fifo`, whose reader is the new sandbox's QEMU (`migrate-incoming fd:`), which loads it
/// as it arrives: save and restore overlap, and nothing of the memory touches a file.
/// The VM runs on afterwards, whatever happened (`cont`).
///
/// Stopping first (rather than a live migration of the running VM) is what makes the disk
/// copy consistent with the memory: the child's QEMU opens its disk when it starts, so the
/// copy must be complete before the first byte of the stream — and a stopped VM streams in
/// one pass. The stream then says "paused", so the child's supervisor `cont`s the child
/// once it is loaded ([`cont_after_load`]).
pub async fn fork(req: microsandbox_protocol::ForkRequest) -> Result<(), String> {
    let (qmp, dir) = FORK_SOURCE.get().ok_or("this sandbox cannot be forked (its QEMU has no QMP socket)")?;
    if !plain_file_name(&req.disk) {
        return Err("invalid fork file names".into());
    }
    let started = Instant::now();
    let deadline = started + FORK_TIMEOUT;
    let mut q = Qmp::connect(qmp, FORK_TIMEOUT).await?;
    q.execute("stop", json!({})).await?;
    let streamed = async {
        let (from, to) = (dir.join(&req.disk), req.disk_to.clone());
        tokio::task::spawn_blocking(move || std::fs::copy(&from, &to).map(|_| ()).map_err(|e| format!("cannot copy the disk: {e}")))
            .await
            .map_err(|e| e.to_string())??;
        let copied = started.elapsed();
        let fifo = open_fifo_writer(&req.fifo, deadline).await?;
        let reader = started.elapsed();
        migrate_into(&mut q, &fifo, deadline).await?;
        // For the supervisor log: where a fork's time goes.
        eprintln!(
            "msb: fork: stopped + disk copied {} ms, child reading {} ms, stream done {} ms",
            copied.as_millis(),
            reader.as_millis(),
            started.elapsed().as_millis()
        );
        Ok::<(), String>(())
        // `fifo` (our copy of the write end) closes here; QEMU closed its own at completion.
    }
    .await;
    let resumed = q.execute("cont", json!({})).await;
    streamed?;
    resumed.map(|_| ()).map_err(|e| format!("the sandbox did not run again after the snapshot: {e}"))
}

/// `Sandbox#fork`, the child's side: its end of the fork FIFO, opened for reading without
/// waiting for a writer, then (up to `within`) until the parent's QEMU has written the
/// first bytes — a QEMU reading a FIFO that never had a writer would see end-of-file. The
/// returned file is blocking, for QEMU (`migrate-incoming fd:`).
pub async fn open_fork_stream(path: &std::path::Path, within: Duration) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open the fork stream {}: {e}", path.display()))?;
    if !f.metadata().map(|m| m.file_type().is_fifo()).unwrap_or(false) {
        return Err(format!("{} is not a FIFO", path.display()));
    }
    let ms = within.as_millis().min(i32::MAX as u128) as i32;
    let (f, revents) = tokio::task::spawn_blocking(move || {
        let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd. Before a writer ever opened the FIFO, Linux reports
        // neither POLLIN nor POLLHUP for it.
        let n = loop {
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        };
        (f, if n > 0 { p.revents } else { 0 })
    })
    .await
    .map_err(|e| e.to_string())?;
    if revents & libc::POLLIN == 0 {
        return Err(if revents == 0 { "the parent sandbox did not send its state in time".into() } else { "the parent sandbox gave up sending its state".into() });
    }
    set_blocking(&f)?;
    Ok(f)
}

/// Logs (supervisor log) how long a fork's load took, however it ended.
struct Logged(Instant);

impl Drop for Logged {
    fn drop(&mut self) {
        eprintln!("msb: fork: loaded and running {} ms after migrate-incoming", self.0.elapsed().as_millis());
    }
}

/// Starts loading the state a restoring QEMU inherited at `fd` (it runs with
/// `-incoming defer`: the capabilities must be set first, see [`set_capabilities`]). A
/// template restore or a resume starts the guest by itself once loaded. A fork (`forked`)
/// comes up paused — the parent was stopped when it streamed — so this waits until the
/// load is done (`inmigrate` → `paused`) and lets it run (`cont`).
pub async fn incoming(qmp: &std::path::Path, fd: i32, forked: bool, within: Duration) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started + within;
    let mut q = Qmp::connect(qmp, within).await?;
    set_capabilities(&mut q).await?;
    q.execute("migrate-incoming", json!({"uri": format!("fd:{fd}")})).await?;
    if !forked {
        return Ok(());
    }
    let _log = Logged(started);
    loop {
        let st = q.execute("query-status", json!({})).await?;
        match st.get("status").and_then(Value::as_str) {
            Some("inmigrate") | Some("prelaunch") if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            Some("paused") | Some("postmigrate") => return q.execute("cont", json!({})).await.map(|_| ()),
            Some("running") => return Ok(()),
            other => return Err(format!("the forked VM did not load its state (QEMU status {})", other.unwrap_or("unknown"))),
        }
    }
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

/// A fresh machine id (see the agent's `machine_id`): 128 random bits, UUID v4 bits set.
fn machine_id() -> Result<String, String> {
    let mut b = [0u8; 16];
    fill_random(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b.iter().map(|b| format!("{b:02x}")).collect())
}

/// Makes the just-restored guest this sandbox: sends its identity and waits for the
/// agent's `Ready`, which it sends only after applying all of it. `new_sandbox` (a
/// template restore or a fork, not a resume) also gives it a fresh machine id.
pub async fn handshake(stream: &mut UnixStream, hostname: &str, new_sandbox: bool) -> Result<Ready, String> {
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_nanos() as u64;
    let machine_id = if new_sandbox { Some(machine_id()?) } else { None };
    let id = RestoreIdentity { entropy: entropy()?, realtime_ns, hostname: hostname.to_string(), machine_id };
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
