//! The host side of `volumes:` while the VM runs: volume locks and one `virtiofsd` per
//! shared directory.
//!
//! Each `virtiofsd` gets an already listening socket (`--fd`), bound here before QEMU
//! starts, so QEMU's connect never races the daemon's start-up. It runs with
//! `PR_SET_PDEATHSIG=SIGKILL` (it never outlives this supervisor), in its own mount
//! namespace confined to the shared directory (`--sandbox=namespace`), and exits by itself
//! when QEMU closes the connection. Dropping [`Running`] kills the daemons and releases the
//! locks; `vm::cleanup` removes the sockets.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;

use microsandbox::volume::mount::VolumeRuntime;
use tokio::process::{Child, Command};

/// First descriptor number at which a `virtiofsd` finds its listening socket (one per
/// daemon, so each child sets up only its own).
const VIRTIOFSD_FD: i32 = 100;

/// What must live as long as the VM.
pub struct Running {
    _locks: Vec<std::fs::File>,
    /// `kill_on_drop`: the daemons go with this value (they normally exit with QEMU).
    _daemons: Vec<Child>,
}

/// Takes the volume locks and starts the file servers. The error is `(code, message)`;
/// the message names the volume.
pub fn start(rt: &VolumeRuntime, sandbox_dir: &std::path::Path) -> Result<Running, (&'static str, String)> {
    start_inner(rt, sandbox_dir)
}

fn start_inner(rt: &VolumeRuntime, sandbox_dir: &std::path::Path) -> Result<Running, (&'static str, String)> {
    let boot = |m: String| ("boot-failed", m);
    let mut locks = Vec::new();
    for l in &rt.locks {
        let f = std::fs::File::open(&l.path)
            .map_err(|e| ("volume-not-found", format!("volume {:?} is gone ({e}); was it removed?", l.volume)))?;
        let how = if l.exclusive { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), how) } != 0 {
            return Err(if l.exclusive {
                ("volume-in-use", format!("volume {:?} is attached to another running sandbox (image-backed volumes attach to one sandbox at a time)", l.volume))
            } else {
                ("volume-not-found", format!("volume {:?} is being removed", l.volume))
            });
        }
        locks.push(f);
    }
    let mut running = Running { _locks: locks, _daemons: Vec::new() };
    for (i, share) in rt.shares.iter().enumerate() {
        let _ = std::fs::remove_file(&share.socket);
        let listener = UnixListener::bind(&share.socket)
            .map_err(|e| boot(format!("cannot listen on {} for the volume at {}: {e}", share.socket.display(), share.dir.display())))?;
        let log = std::fs::File::create(sandbox_dir.join(format!("virtiofsd{i}.log")))
            .map_err(|e| boot(format!("cannot create the virtiofsd log: {e}")))?;
        let target = VIRTIOFSD_FD + i as i32;
        let mut cmd = Command::new(&rt.virtiofsd);
        cmd.arg(format!("--fd={target}"))
            .arg("--shared-dir")
            .arg(&share.dir)
            // Guest reads and writes reach the host file at once (no writeback cache);
            // attributes and directory entries are cached for about a second.
            .args(["--cache=auto", "--sandbox=namespace", "--seccomp=kill", "--log-level=error", "--inode-file-handles=never"])
            // Requests served by a pool instead of the queue's own thread: sequential reads
            // of a bind mount went from ~0.1x to ~0.4x of the root disk (bench/volumes.rb).
            .arg("--thread-pool-size=4")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if share.readonly {
            cmd.arg("--readonly");
        }
        let fd = listener.as_raw_fd();
        let parent = std::process::id() as i32;
        // SAFETY: prctl, getppid, dup2 and fcntl are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                let r = if fd == target { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| boot(format!("cannot start {}: {e}", rt.virtiofsd.display())))?;
        running._daemons.push(child);
        // The daemon has its own copy; ours is not needed.
        drop(listener);
    }
    Ok(running)
}
