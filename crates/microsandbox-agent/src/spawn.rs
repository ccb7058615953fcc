//! Starting a prepared command with `posix_spawn`.
//!
//! `posix_spawn` rather than `std::process::Command`: after a failed exec, std's fork path
//! calls `waitpid(child)` itself and panics when our reaper thread got there first. glibc's
//! `posix_spawn` (CLONE_VFORK) reports exec errors directly and tolerates the reaper.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr;

use nix::fcntl::OFlag;
use nix::unistd::pipe2;

use crate::command::Prepared;

/// The parent's ends of a spawned child's standard streams.
pub struct Pipes {
    pub stdin: Option<File>,
    pub stdout: File,
    pub stderr: File,
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
    let stdin = if p.stdin { Some(pipe()?) } else { None };
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut argv: Vec<*mut libc::c_char> = p.argv.iter().map(|s| s.as_ptr() as *mut _).collect();
    argv.push(ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = p.envp.iter().map(|s| s.as_ptr() as *mut _).collect();
    envp.push(ptr::null_mut());

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
        // The child-side ends (stdin read, output writes) drop here, so EOF on the output
        // pipes means every process holding them has gone.
        Ok((
            pid,
            Pipes {
                stdin: stdin.map(|(_, w)| File::from(w)),
                stdout: File::from(out_r),
                stderr: File::from(err_r),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{prepare, DEFAULT_PATH};
    use microsandbox_protocol::ExecRequest;

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
        pipes.stderr.read_to_string(&mut err).unwrap();
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
}
