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
        Qmp::connect_polling(path, within, POLL).await
    }

    /// [`Qmp::connect`], trying again every `poll` until QEMU has created the socket.
    async fn connect_polling(path: &std::path::Path, within: Duration, poll: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("cannot connect to QMP at {}: {e}", path.display())),
                Err(_) => tokio::time::sleep(poll).await,
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

/// Writes the stopped VM's device state — everything but its RAM — into the fork FIFO
/// at `fifo` with `xen-save-devices-state` (QEMU's device-only save; despite the name
/// not tied to Xen). The command takes a path and QEMU opens it for writing, which for a
/// FIFO blocks until there is a reader: this supervisor holds a read end of its own
/// meanwhile (never read), so the open cannot freeze QEMU if the child's reader went
/// away. Should the child stop reading while the FIFO's buffer is full, the caller's
/// bound drops this future and with it that read end: QEMU's write then fails
/// (`EPIPE`) instead of blocking for ever. The VM stays stopped.
async fn save_devices_into(q: &mut Qmp, fifo: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = fifo.to_str().ok_or("the fork FIFO's path is not UTF-8")?;
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)
        .map_err(|e| format!("cannot open {}: {e}", fifo.display()))?;
    q.execute("xen-save-devices-state", json!({"filename": path}))
        .await
        .map(|_| ())
        .map_err(|e| format!("QEMU could not save the device state: {e}"))
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

/// What [`fork`] needs of the running VM; set once it booted.
struct ForkSource {
    qmp: std::path::PathBuf,
    dir: std::path::PathBuf,
    /// QEMU's pid (the supervisor's child) and where its guest RAM comes from, when that
    /// is a file mapped privately: a fork then copies the memory out of QEMU itself.
    ram: Option<(u32, RamIdentity)>,
}

/// A privately mapped guest RAM file, identified as `/proc/<pid>/maps` shows it (the
/// file may be deleted since: a fork's own RAM file is, once loaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RamIdentity {
    dev_major: u32,
    dev_minor: u32,
    ino: u64,
    bytes: u64,
}

static FORK_SOURCE: std::sync::OnceLock<ForkSource> = std::sync::OnceLock::new();

/// Records the running VM for [`fork`]: its QMP socket, directory, QEMU's pid and, from
/// its command line, the file its RAM is privately mapped from (stat'ed now, while the
/// path still names it).
pub fn set_fork_source(qmp: std::path::PathBuf, dir: std::path::PathBuf, qemu_pid: Option<u32>, qemu_args: &[String]) {
    use std::os::unix::fs::MetadataExt;
    let ram = qemu_pid.zip(microsandbox::vmm::qemu::private_ram_file(qemu_args)).and_then(|(pid, (path, bytes))| {
        let m = std::fs::metadata(&path).ok()?;
        let (dev_major, dev_minor) = (libc::major(m.dev()), libc::minor(m.dev()));
        Some((pid, RamIdentity { dev_major, dev_minor, ino: m.ino(), bytes }))
    });
    let _ = FORK_SOURCE.set(ForkSource { qmp, dir, ram });
}

/// Longest `/proc/<pid>/maps` read (QEMU's own, a few hundred lines).
const MAX_MAPS: u64 = 4 << 20;

/// Where `ram` is mapped in QEMU's address space, from its `/proc/<pid>/maps` line
/// (`start-end perms offset major:minor inode path`): the mapping of that file at offset
/// 0 and at least the RAM's size.
fn find_ram_mapping(maps: &str, ram: &RamIdentity) -> Option<usize> {
    maps.lines().find_map(|l| {
        let mut f = l.split_ascii_whitespace();
        let (range, _perms, offset, dev, ino) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let (start, end) = range.split_once('-')?;
        let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
        let (maj, min) = dev.split_once(':')?;
        let matches = u64::from_str_radix(offset, 16).ok()? == 0
            && u32::from_str_radix(maj, 16).ok()? == ram.dev_major
            && u32::from_str_radix(min, 16).ok()? == ram.dev_minor
            && ino.parse::<u64>().ok()? == ram.ino
            && (end.checked_sub(start)? as u64) >= ram.bytes;
        matches.then_some(start)
    })
}

/// Bytes read from QEMU per `process_vm_readv`.
const RAM_CHUNK: usize = 4 << 20;
const PAGE: usize = 4096;
/// Threads copying guest RAM: reading QEMU's memory and scanning for zero pages run in
/// parallel (the writes into one file take its inode lock in turn).
const RAM_COPY_THREADS: u64 = 2;

/// What copying guest RAM took (for the supervisor log).
#[derive(Debug, Default, Clone, Copy)]
struct RamCopied {
    written: u64,
    read: Duration,
    write: Duration,
}

/// Copies the stopped VM's guest RAM (`bytes` at `addr` in QEMU `pid`) into `to`, a file
/// of exactly that size the engine created sparse: pages that are all zeros stay holes,
/// the others are written. Reading another process's memory needs the right to trace it:
/// QEMU is this supervisor's child, of the same user.
fn copy_guest_ram(pid: u32, addr: usize, bytes: u64, to: &std::path::Path) -> Result<RamCopied, String> {
    let out = std::fs::OpenOptions::new().write(true).open(to).map_err(|e| format!("cannot open {}: {e}", to.display()))?;
    let meta = out.metadata().map_err(|e| format!("{}: {e}", to.display()))?;
    if !meta.is_file() || meta.len() != bytes {
        return Err(format!("{} is not a file of the VM's memory size", to.display()));
    }
    // Whole chunks per thread.
    let chunks = bytes.div_ceil(RAM_CHUNK as u64);
    let per = chunks.div_ceil(RAM_COPY_THREADS) * RAM_CHUNK as u64;
    let parts: Vec<(u64, u64)> = (0..RAM_COPY_THREADS).map(|i| (i * per, ((i + 1) * per).min(bytes))).filter(|(a, b)| a < b).collect();
    let results: Vec<Result<RamCopied, String>> = std::thread::scope(|sc| {
        let handles: Vec<_> = parts.iter().map(|&(from, until)| sc.spawn({
            let out = &out;
            move || copy_ram_range(pid, addr, from, until, out, to)
        })).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("the RAM copy thread panicked".into()))).collect()
    });
    let mut total = RamCopied::default();
    for r in results {
        let r = r?;
        total.written += r.written;
        total.read = total.read.max(r.read);
        total.write = total.write.max(r.write);
    }
    Ok(total)
}

/// One thread's part of [`copy_guest_ram`]: bytes `from..until` of the RAM.
fn copy_ram_range(pid: u32, addr: usize, from: u64, until: u64, out: &std::fs::File, to: &std::path::Path) -> Result<RamCopied, String> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; RAM_CHUNK];
    let mut done = RamCopied::default();
    let mut off = from;
    while off < until {
        let len = (until - off).min(RAM_CHUNK as u64) as usize;
        let t = Instant::now();
        let mut got = 0;
        while got < len {
            let local = libc::iovec { iov_base: buf[got..].as_mut_ptr().cast(), iov_len: len - got };
            let remote = libc::iovec { iov_base: (addr + off as usize + got) as *mut libc::c_void, iov_len: len - got };
            // SAFETY: `local` is within `buf`; the kernel checks the remote range.
            let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
            if n <= 0 {
                return Err(format!("cannot read the VM's memory: {}", std::io::Error::last_os_error()));
            }
            got += n as usize;
        }
        let t = {
            done.read += t.elapsed();
            Instant::now()
        };
        // Runs of non-zero pages, written at once.
        let mut page = 0;
        while page < len {
            if is_zero(&buf[page..page + PAGE]) {
                page += PAGE;
                continue;
            }
            let run = page;
            while page < len && !is_zero(&buf[page..page + PAGE]) {
                page += PAGE;
            }
            out.write_all_at(&buf[run..page], off + run as u64).map_err(|e| format!("cannot write {}: {e}", to.display()))?;
            done.written += (page - run) as u64;
        }
        done.write += t.elapsed();
        off += len as u64;
    }
    Ok(done)
}

fn is_zero(b: &[u8]) -> bool {
    b.chunks_exact(16).all(|c| u128::from_ne_bytes(c.try_into().unwrap()) == 0)
}

/// Reads at most `max` bytes of `path` as text.
fn read_bounded(path: &std::path::Path, max: u64) -> Result<String, String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max).read_to_string(&mut s))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(s)
}

/// Bound on streaming the VM to a fork (its whole memory at most), and on waiting for
/// the child's QEMU to open the stream.
const FORK_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on writing a fork's device state (a few hundred KB) into the FIFO.
const DEVICE_SAVE_TIMEOUT: Duration = Duration::from_secs(30);

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
/// root disk copied to `req.disk_to` (under a temporary name, then renamed). With
/// `req.ram_to` (the VM's RAM is a file mapped privately, see [`set_fork_source`]) its
/// guest memory is then copied into that file ([`copy_guest_ram`]) and only its device
/// state goes into the FIFO `req.fifo` ([`save_devices_into`]); otherwise its whole
/// migration stream does. The FIFO's reader is the new sandbox's QEMU
/// (`migrate-incoming fd:`), which loads it as it arrives; nothing of the memory touches
/// a disk. The VM runs on afterwards, whatever happened (`cont`).
///
/// Stopping first (rather than a live migration of the running VM) is what makes the disk
/// and memory copies consistent with each other and with the device state: the child's
/// QEMU opens its disk when it starts, so the copy must be complete by then — and a
/// stopped VM is copied in one pass. A full stream then says "paused", so the child's
/// supervisor `cont`s the child once it is loaded ([`incoming`]); a device-only one
/// says "running" and the child starts by itself.
pub async fn fork(req: microsandbox_protocol::ForkRequest) -> Result<(), String> {
    let src = FORK_SOURCE.get().ok_or("this sandbox cannot be forked (its QEMU has no QMP socket)")?;
    if !plain_file_name(&req.disk) {
        return Err("invalid fork file names".into());
    }
    // Over a RAM file: QEMU's mapping of it, found before the VM stops.
    let ram = match &req.ram_to {
        None => None,
        Some(to) => {
            let (pid, id) = src.ram.ok_or("this sandbox's memory is not in a file; fork it through the stream")?;
            let maps = read_bounded(&std::path::PathBuf::from(format!("/proc/{pid}/maps")), MAX_MAPS)?;
            let addr = find_ram_mapping(&maps, &id).ok_or("the VM's memory mapping was not found")?;
            Some((pid, addr, id.bytes, to.clone()))
        }
    };
    let started = Instant::now();
    let deadline = started + FORK_TIMEOUT;
    let mut q = Qmp::connect(&src.qmp, FORK_TIMEOUT).await?;
    q.execute("stop", json!({})).await?;
    let streamed = async {
        // Copied under another name and renamed: a child whose QEMU starts before the
        // state comes (over a RAM file) waits for the disk's name.
        let (from, to) = (src.dir.join(&req.disk), req.disk_to.clone());
        tokio::task::spawn_blocking(move || {
            let mut part = to.clone().into_os_string();
            part.push(".part");
            std::fs::copy(&from, &part).and_then(|_| std::fs::rename(&part, &to)).map_err(|e| {
                let _ = std::fs::remove_file(&part);
                format!("cannot copy the disk: {e}")
            })
        })
        .await
        .map_err(|e| e.to_string())??;
        let copied = started.elapsed();
        let mut ram_written = None;
        if let Some((pid, addr, bytes, to)) = ram.clone() {
            // The VM is stopped (no vCPU runs, devices are drained): the copy is its memory
            // at this instant. Only then does the child see a first byte on the FIFO.
            ram_written = Some(tokio::task::spawn_blocking(move || copy_guest_ram(pid, addr, bytes, &to)).await.map_err(|e| e.to_string())??);
        }
        let ram_copied = started.elapsed();
        let fifo = open_fifo_writer(&req.fifo, deadline).await?;
        let reader = started.elapsed();
        match &req.ram_to {
            // Device state only (no RAM section, no configuration section: the child runs
            // with `migration.send-configuration=off`).
            Some(_) => tokio::time::timeout(DEVICE_SAVE_TIMEOUT, save_devices_into(&mut q, &req.fifo))
                .await
                .map_err(|_| "saving the device state timed out".to_string())??,
            None => migrate_into(&mut q, &fifo, deadline).await?,
        }
        // For the supervisor log: where a fork's time goes.
        let ram_log = ram_written
            .map(|r: RamCopied| format!(" ({} MB written; slowest thread reading {} ms, scanning + writing {} ms)", r.written / 1_000_000, r.read.as_millis(), r.write.as_millis()))
            .unwrap_or_default();
        eprintln!(
            "msb: fork: stopped + disk copied {} ms, RAM copied {} ms{ram_log}, child reading {} ms, state done {} ms",
            copied.as_millis(),
            ram_copied.as_millis(),
            reader.as_millis(),
            started.elapsed().as_millis()
        );
        Ok::<(), String>(())
        // `fifo` (our copy of the write end) closes here; QEMU closed its own when done.
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
    let f = open_fork_fifo(path)?;
    wait_first_bytes(&f, within).await?;
    Ok(f)
}

/// The child's end of the fork FIFO, opened without waiting for a writer; blocking for
/// QEMU once open. Nothing may read it before the first bytes are there
/// ([`wait_first_bytes`]).
pub fn open_fork_fifo(path: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open the fork stream {}: {e}", path.display()))?;
    if !f.metadata().map(|m| m.file_type().is_fifo()).unwrap_or(false) {
        return Err(format!("{} is not a FIFO", path.display()));
    }
    set_blocking(&f)?;
    Ok(f)
}

/// Waits (up to `within`) until the fork FIFO `f` has bytes to read.
async fn wait_first_bytes(f: &std::fs::File, within: Duration) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = f.try_clone().map_err(|e| format!("fork stream: {e}"))?;
    let ms = within.as_millis().min(i32::MAX as u128) as i32;
    let revents = tokio::task::spawn_blocking(move || {
        let mut p = libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd. Before a writer ever opened the FIFO, Linux reports
        // neither POLLIN nor POLLHUP for it.
        let n = loop {
            let n = unsafe { libc::poll(&mut p, 1, ms) };
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n > 0 { p.revents } else { 0 }
    })
    .await
    .map_err(|e| e.to_string())?;
    if revents & libc::POLLIN == 0 {
        return Err(if revents == 0 { "the parent sandbox did not send its state in time".into() } else { "the parent sandbox gave up sending its state".into() });
    }
    Ok(())
}

/// Waits (up to `within`) until `path` exists: a fork's disk, renamed into place by the
/// parent's supervisor once copied.
pub async fn wait_for_file(path: &std::path::Path, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err("the parent sandbox did not copy its disk in time".into());
        }
        tokio::time::sleep(FIFO_POLL).await;
    }
    Ok(())
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
///
/// `first_bytes`: the fork FIFO of a QEMU started before the parent's state was there;
/// the load begins once its first bytes arrived.
pub async fn incoming(qmp: &std::path::Path, fd: i32, forked: bool, within: Duration, first_bytes: Option<&std::fs::File>) -> Result<(), String> {
    let started = Instant::now();
    let deadline = started + within;
    let mut q = Qmp::connect(qmp, within).await?;
    set_capabilities(&mut q).await?;
    if let Some(f) = first_bytes {
        wait_first_bytes(f, within).await?;
        eprintln!("msb: fork: the parent's state began {} ms after QMP was up", started.elapsed().as_millis());
    }
    let started = Instant::now();
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

/// How often [`StartGate::open`] looks for the QMP socket of a QEMU that is still starting: the boot
/// waits on it, so finer than [`POLL`] (a failed `connect` costs microseconds).
const START_POLL: Duration = Duration::from_millis(2);

/// The QMP connection of a VM started with `-S`, ready to let it run: the handshake
/// (connect, greeting, capabilities) happens while the root disk is formatted, so only
/// `cont` is left on the boot's path.
pub struct StartGate(Qmp);

impl StartGate {
    /// Connects to a starting QEMU's QMP socket (polled until QEMU created it).
    pub async fn open(qmp: &std::path::Path, within: Duration) -> Result<StartGate, String> {
        Qmp::connect_polling(qmp, within, START_POLL).await.map(StartGate)
    }

    /// Lets the VM run.
    pub async fn cont(mut self) -> Result<(), String> {
        self.0.execute("cont", json!({})).await.map(|_| ())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_ram_mapping_by_device_and_inode() {
        let ram = RamIdentity { dev_major: 0xfe, dev_minor: 1, ino: 1234, bytes: 512 << 20 };
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:01 999 /usr/bin/qemu-system-x86_64
7f0000000000-7f0010000000 rw-p 00000000 fe:01 1234 /h/templates/k/ram
7f1000000000-7f1020000000 rw-p 00000000 fe:01 1234 /h/templates/k/ram
7f2000000000-7f2020000000 rw-p 00001000 fe:01 1234 /h/sandboxes/c/fork.ram (deleted)
7f3000000000-7f3020000000 rw-p 00000000 fe:01 1234 /h/sandboxes/c/fork.ram (deleted)
";
        // The first line of the right file is too short (256 MiB), the second fits.
        assert_eq!(find_ram_mapping(maps, &ram), Some(0x7f1000000000));
        assert_eq!(find_ram_mapping(maps, &RamIdentity { ino: 4321, ..ram }), None);
        assert_eq!(find_ram_mapping(maps, &RamIdentity { dev_minor: 2, ..ram }), None);
        // A deleted file still matches (a fork's own RAM file), at offset 0 only.
        let deleted = "7f2000000000-7f2020000000 rw-p 00001000 fe:01 1234 /x (deleted)\n7f3000000000-7f3020000000 rw-p 00000000 fe:01 1234 /x (deleted)\n";
        assert_eq!(find_ram_mapping(deleted, &ram), Some(0x7f3000000000));
        assert_eq!(find_ram_mapping("garbage\n\n1-2 x\n", &ram), None);
    }

    #[test]
    fn zero_pages_are_found() {
        let mut page = vec![0u8; PAGE];
        assert!(is_zero(&page));
        page[PAGE - 1] = 1;
        assert!(!is_zero(&page));
    }
}
