//! Starting a prepared command with `posix_spawn`.
//!
//! `posix_spawn` rather than `std::process::Command`: after a failed exec, std's fork path
//! calls `waitpid(child)` itself and panics when our reaper thread got there first. glibc's
//! `posix_spawn` (CLONE_VFORK) reports exec errors directly and tolerates the reaper.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::ptr;

use microsandbox_protocol::WinSize;
use nix::fcntl::OFlag;
use nix::unistd::pipe2;

use crate::command::Prepared;
use crate::identity::Ids;

/// The parent's ends of a spawned child's standard streams.
pub struct Pipes {
    /// The stdin pipe, or for a tty session the terminal master (when stdin is wanted).
    pub stdin: Option<File>,
    /// The stdout pipe, or the terminal master: a terminal merges all output.
    pub stdout: File,
    /// The stderr pipe; `None` for a tty session.
    pub stderr: Option<File>,
    /// The terminal master of a tty session, for resizing.
    pub pty: Option<File>,
}

/// Sets the size of the terminal behind `master`. The kernel sends SIGWINCH to the
/// terminal's foreground process group when the size changes.
pub fn set_winsize(master: &impl AsRawFd, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Allocates a pseudo-terminal of `size` whose slave belongs to `owner`. Returns the
/// master (close-on-exec, so no other session inherits it) and the slave's path, which
/// the child opens itself: a session leader opening a terminal without `O_NOCTTY`
/// acquires it as its controlling terminal, which `posix_spawn` cannot do otherwise.
fn open_pty(size: WinSize, owner: Ids) -> io::Result<(OwnedFd, CString)> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let name = ptsname_r(&master)?;
    // SAFETY: into_raw_fd hands over sole ownership of a valid open fd.
    let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };
    set_winsize(&master, size)?;
    if owner.uid != 0 || owner.gid != 0 {
        std::os::unix::fs::chown(&name, Some(owner.uid), Some(owner.gid))?;
    }
    let name = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok((master, name))
}

/// Owns the posix_spawn attribute objects so every exit path destroys them.
struct SpawnAttrs {
    actions: libc::posix_spawn_file_actions_t,
    attr: libc::posix_spawnattr_t,
}

impl SpawnAttrs {
    /// Both objects initialised; only a fully built value is ever dropped (destroyed).
    fn new() -> io::Result<SpawnAttrs> {
        // SAFETY: the init functions fully initialise the zeroed objects; on failure the
        // one already initialised is destroyed here, as no SpawnAttrs exists yet. Both
        // types hold no self-references, so moving them into the struct is fine.
        unsafe {
            let mut actions = std::mem::zeroed();
            check(libc::posix_spawn_file_actions_init(&mut actions))?;
            let mut attr = std::mem::zeroed();
            if let Err(e) = check(libc::posix_spawnattr_init(&mut attr)) {
                libc::posix_spawn_file_actions_destroy(&mut actions);
                return Err(e);
            }
            Ok(SpawnAttrs { actions, attr })
        }
    }
}

impl Drop for SpawnAttrs {
    fn drop(&mut self) {
        // SAFETY: both were initialised by `new`.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    // CLOEXEC so sibling sessions spawned concurrently never inherit each other's pipes
    // (which would keep a session's output open past its exit).
    pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Signals 1–64 but SIGKILL/SIGSTOP, as a `SETSIGDEF` set. Built from raw words because
/// glibc's `sigaddset` refuses its internal signals 32 and 33, and its `posix_spawn` leaves
/// exactly those SIG_IGN in the child (inherited across exec) unless they are in this set.
fn all_signals() -> libc::sigset_t {
    const WORDS: usize =
        std::mem::size_of::<libc::sigset_t>() / std::mem::size_of::<libc::c_ulong>();
    const _: () = assert!(
        WORDS * std::mem::size_of::<libc::c_ulong>() == std::mem::size_of::<libc::sigset_t>()
    );
    let mut words: [libc::c_ulong; WORDS] = [0; WORDS];
    words[0] = !(1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1));
    // SAFETY: glibc's sigset_t is exactly an array of unsigned longs, bit (sig - 1) per signal.
    unsafe { std::mem::transmute::<[libc::c_ulong; WORDS], libc::sigset_t>(words) }
}

/// Starts the process in a new session (so its pgid is its pid), with signal dispositions
/// and mask reset (PID 1 ignores SIGPIPE; children must not inherit that). Returns the pid
/// and the parent's pipe ends. Call through `Reaper::spawn`.
pub fn spawn(p: &Prepared) -> io::Result<(i32, Pipes)> {
    match p.tty {
        Some(size) => spawn_on_pty(p, size),
        None => spawn_on_pipes(p),
    }
}

fn spawn_on_pipes(p: &Prepared) -> io::Result<(i32, Pipes)> {
    let stdin = if p.stdin { Some(pipe()?) } else { None };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut a = SpawnAttrs::new()?;
    // SAFETY: the attribute objects are initialised (`SpawnAttrs::new`) and every pointer
    // handed to posix_spawn (strings, fds, argv/envp arrays) outlives the call.
    unsafe {
        match &stdin {
            Some((r, _)) => check(libc::posix_spawn_file_actions_adddup2(
                &mut a.actions,
                r.as_raw_fd(),
                0,
            ))?,
            None => check(libc::posix_spawn_file_actions_addopen(
                &mut a.actions,
                0,
                c"/dev/null".as_ptr(),
                libc::O_RDONLY,
                0,
            ))?,
        }
        check(libc::posix_spawn_file_actions_adddup2(
            &mut a.actions,
            out_w.as_raw_fd(),
            1,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut a.actions,
            err_w.as_raw_fd(),
            2,
        ))?;
        let pid = launch(p, &mut a)?;
        // The child-side ends (stdin read, output writes) drop here, so EOF on the output
        // pipes means every process holding them has gone.
        Ok((
            pid,
            Pipes {
                stdin: stdin.map(|(_, w)| File::from(w)),
                stdout: File::from(out_r),
                stderr: Some(File::from(err_r)),
                pty: None,
            },
        ))
    }
}

/// The child gets the terminal's slave as fds 0–2 and as controlling terminal (it is a
/// session leader through `POSIX_SPAWN_SETSID`, which glibc applies before the file
/// actions). The agent keeps only the master: once every process holding the slave has
/// gone, reading the master fails with EIO, which ends the output like EOF on a pipe.
fn spawn_on_pty(p: &Prepared, size: WinSize) -> io::Result<(i32, Pipes)> {
    let (master, slave) = open_pty(size, p.tty_owner)?;
    let mut a = SpawnAttrs::new()?;
    // SAFETY: as in `spawn_on_pipes`; `slave` outlives the posix_spawn call.
    let pid = unsafe {
        check(libc::posix_spawn_file_actions_addopen(
            &mut a.actions,
            0,
            slave.as_ptr(),
            libc::O_RDWR,
            0,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(&mut a.actions, 0, 1))?;
        check(libc::posix_spawn_file_actions_adddup2(&mut a.actions, 0, 2))?;
        launch(p, &mut a)?
    };
    let master = File::from(master);
    let stdin = if p.stdin { Some(master.try_clone()?) } else { None };
    let pty = Some(master.try_clone()?);
    Ok((pid, Pipes { stdin, stdout: master, stderr: None, pty }))
}

/// Adds the working directory, the new session and the reset signal state to `a`, then
/// spawns. Safety: `a` must hold only file actions whose pointers are still valid.
unsafe fn launch(p: &Prepared, a: &mut SpawnAttrs) -> io::Result<i32> {
    let mut argv: Vec<*mut libc::c_char> = p.argv.iter().map(|s| s.as_ptr() as *mut _).collect();
    argv.push(ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = p.envp.iter().map(|s| s.as_ptr() as *mut _).collect();
    envp.push(ptr::null_mut());
    check(libc::posix_spawn_file_actions_addchdir_np(
        &mut a.actions,
        p.cwd.as_ptr(),
    ))?;

    let mut mask: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut mask);
    check(libc::posix_spawnattr_setsigmask(&mut a.attr, &mask))?;
    check(libc::posix_spawnattr_setsigdefault(
        &mut a.attr,
        &all_signals(),
    ))?;
    let flags = libc::POSIX_SPAWN_SETSID as libc::c_int
        | libc::POSIX_SPAWN_SETSIGMASK
        | libc::POSIX_SPAWN_SETSIGDEF;
    check(libc::posix_spawnattr_setflags(
        &mut a.attr,
        flags as libc::c_short,
    ))?;

    let mut pid: libc::pid_t = 0;
    check(libc::posix_spawn(
        &mut pid,
        p.path.as_ptr(),
        &a.actions,
        &a.attr,
        argv.as_ptr(),
        envp.as_ptr(),
    ))?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{prepare, DEFAULT_PATH};
    use microsandbox_protocol::{ExecRequest, WinSize};

    #[test]
    fn spawns_with_exact_env_and_cwd() {
        use std::io::Read;
        let req = ExecRequest {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                "echo \"$A $PWD\"; echo e >&2; grep -E '^Sig(Blk|Ign)' /proc/self/status".into(),
            ],
            env: vec![
                ("A".into(), "x".into()),
                ("PATH".into(), DEFAULT_PATH.into()),
            ],
            cwd: Some("/tmp".into()),
            ..Default::default()
        };
        let p = prepare(&req).unwrap();
        let (pid, mut pipes) = spawn(&p).unwrap();
        let mut out = String::new();
        pipes.stdout.read_to_string(&mut out).unwrap();
        let mut err = String::new();
        pipes.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        // Nothing blocked or ignored leaks from the (SIGPIPE-ignoring) parent.
        assert_eq!(
            out,
            "x /tmp\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
        );
        assert_eq!(err, "e\n");
        let mut status = 0;
        // SAFETY: reaping our own child in a test.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(status, 0);
    }

    #[test]
    fn tty_session_gets_a_controlling_terminal_of_the_given_size() {
        use std::io::Read;
        let req = ExecRequest {
            program: "sh".into(),
            args: vec![
                "-c".into(),
                // /dev/tty opens only for a process with a controlling terminal.
                "tty -s && echo isatty; stty size; echo via-ctty > /dev/tty; exit 3".into(),
            ],
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            tty: Some(WinSize { rows: 33, cols: 111 }),
            ..Default::default()
        };
        let p = prepare(&req).unwrap();
        let (pid, mut pipes) = spawn(&p).unwrap();
        assert!(pipes.stderr.is_none() && pipes.stdin.is_none());
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match pipes.stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                // EIO: the last holder of the slave has gone.
                Err(_) => break,
            }
        }
        // The terminal turns \n into \r\n (ONLCR).
        assert_eq!(String::from_utf8_lossy(&out), "isatty\r\n33 111\r\nvia-ctty\r\n");
        let mut status = 0;
        // SAFETY: reaping our own child in a test.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert_eq!(libc::WEXITSTATUS(status), 3);
    }
}
