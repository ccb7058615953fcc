//! The owner's end of a supervisor's liveness pipe, and what happens to it across `fork`.
//!
//! The supervisor kills its VM when every copy of the write end is closed. `fork` copies
//! file descriptors, so without care a forked child (a Puma/Unicorn worker, a Resque job)
//! would hold the pipe open: the VM would then outlive its owner's death for as long as
//! the child lives. So every write end is recorded in a fixed, lock-free bitmap indexed
//! by fd number, and a `pthread_atfork` child handler closes all recorded fds in the
//! child before `fork` returns there. A lock-free table matters: other threads of the
//! parent (tokio workers, Ruby threads without the GVL) may be anywhere at the moment of
//! `fork`, and a lock one of them held would stay locked forever in the child.
//!
//! Invariants:
//! - a bit is set only while this process holds that fd open as a liveness end;
//! - the bit is cleared *before* the fd is closed, so a child never closes an fd number
//!   that was reused for something else (the price of the other order: a `fork` between
//!   the two steps leaves one stale copy in that child until it exits);
//! - a [`Liveness`] dropped in another process than the one that opened it (a forked
//!   child) closes nothing: the atfork handler already closed the child's copy, and the
//!   number may since belong to another file.

use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

/// Highest fd number (exclusive) the table covers: 2^20, the usual hard `RLIMIT_NOFILE`.
/// A liveness fd above it (only possible with a raised limit and a million open files)
/// is not closed in forked children; everything else still works.
const MAX_FD: usize = 1 << 20;
const WORDS: usize = MAX_FD / 64;

static OPEN: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];
static HANDLER: Once = Once::new();

/// The write end of one supervisor's liveness pipe, held by the sandbox's owner.
#[derive(Debug)]
pub struct Liveness {
    fd: Option<OwnedFd>,
    pid: u32,
}

impl Liveness {
    /// Takes ownership of `fd` and records it so forked children close their copy.
    pub fn new(fd: OwnedFd) -> Liveness {
        HANDLER.call_once(|| {
            // SAFETY: registers a plain function; it runs in the child only, where it
            // makes async-signal-safe calls (atomics, close).
            unsafe { libc::pthread_atfork(None, None, Some(close_inherited)) };
        });
        set(fd.as_raw_fd(), true);
        Liveness { fd: Some(fd), pid: std::process::id() }
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        let Some(fd) = self.fd.take() else { return };
        if self.pid != std::process::id() {
            // A forked child: its copy is already closed (see the module comment).
            let _ = fd.into_raw_fd();
            return;
        }
        set(fd.as_raw_fd(), false);
        drop(fd);
    }
}

fn set(fd: RawFd, on: bool) {
    let Ok(i) = usize::try_from(fd) else { return };
    if i >= MAX_FD {
        return;
    }
    let bit = 1u64 << (i % 64);
    if on {
        OPEN[i / 64].fetch_or(bit, Ordering::SeqCst);
    } else {
        OPEN[i / 64].fetch_and(!bit, Ordering::SeqCst);
    }
}

/// `pthread_atfork` child handler: closes every recorded liveness fd.
extern "C" fn close_inherited() {
    for (w, word) in OPEN.iter().enumerate() {
        let mut bits = word.swap(0, Ordering::SeqCst);
        while bits != 0 {
            let b = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            // SAFETY: the fd was open in the parent at fork time (bit set), so the child
            // holds a copy that nothing else in the child refers to as its own.
            unsafe { libc::close((w * 64 + b) as RawFd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_open(fd: RawFd) -> bool {
        unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
    }

    #[test]
    fn a_forked_child_does_not_hold_the_pipe_and_the_parent_does() {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let raw = w.as_raw_fd();
        let live = Liveness::new(w);
        // SAFETY: the child only calls fcntl and _exit.
        match unsafe { libc::fork() } {
            0 => unsafe { libc::_exit(if is_open(raw) { 1 } else { 0 }) },
            pid => {
                let mut status = 0;
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "child still had the fd");
            }
        }
        assert!(is_open(raw), "the parent's end must stay open");
        drop(live);
        // Now the only write end is gone: the read end sees EOF.
        let mut buf = [0u8; 1];
        assert_eq!(nix::unistd::read(r.as_raw_fd(), &mut buf).unwrap(), 0);
    }

    #[test]
    fn dropped_ends_leave_the_table() {
        let (_r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let raw = w.as_raw_fd() as usize;
        let live = Liveness::new(w);
        assert_ne!(OPEN[raw / 64].load(Ordering::SeqCst) & (1 << (raw % 64)), 0);
        drop(live);
        assert_eq!(OPEN[raw / 64].load(Ordering::SeqCst) & (1 << (raw % 64)), 0);
    }
}
