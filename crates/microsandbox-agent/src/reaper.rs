//! PID-1 child reaping. Exactly one thread calls `waitpid(-1)`; everything else learns about
//! exits through the channel registered for its pid.
//!
//! Race rule: a child is spawned *and* registered while holding `inner`, and the reaper
//! takes `inner` after `waitpid` returns, so it always finds the pid of a session child
//! even if that child exits before the spawner's next instruction. Statuses of pids nobody
//! registered (orphaned grandchildren re-parented to us) are discarded.

use std::collections::HashMap;
use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::util::lock;

/// How a process ended, as reported by the protocol's `Exited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Maps a raw `waitpid` status. Raw ints rather than nix's `WaitStatus`, whose
    /// conversion fails for real-time signals and would lose the status.
    pub fn from_raw(status: i32) -> ExitStatus {
        if libc::WIFEXITED(status) {
            ExitStatus {
                code: Some(libc::WEXITSTATUS(status)),
                signal: None,
            }
        } else if libc::WIFSIGNALED(status) {
            ExitStatus {
                code: None,
                signal: Some(libc::WTERMSIG(status)),
            }
        } else {
            ExitStatus {
                code: None,
                signal: None,
            }
        }
    }
}

/// Fallback poll when no child exists; a spawn wakes the reaper at once. Nothing else can
/// give the agent a child while it has none: every command is started through
/// [`Reaper::spawn`], and an orphan is adopted only from the agent's own descendants, at
/// the moment its parent exits — while that parent is still an unreaped child. So the poll
/// is only a safety net, and a slow one: each wake-up of an idle guest costs host CPU
/// under software emulation (at 50 ms it was 20 of the ~49 timer interrupts per second
/// of an idle sandbox).
const IDLE_POLL: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Inner {
    waiting: HashMap<i32, Sender<ExitStatus>>,
    /// Bumped on every spawn so an idle reaper knows a child may now exist.
    spawns: u64,
}

#[derive(Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
    spawned: Condvar,
}

impl Reaper {
    /// Runs `spawn` (which returns the child's pid and anything else) under the lock and
    /// registers the pid. The receiver yields the child's status exactly once.
    pub fn spawn<T>(
        &self,
        spawn: impl FnOnce() -> io::Result<(i32, T)>,
    ) -> io::Result<(i32, T, Receiver<ExitStatus>)> {
        let mut inner = lock(&self.inner);
        let (pid, extra) = spawn()?;
        let (tx, rx) = channel();
        inner.waiting.insert(pid, tx);
        inner.spawns += 1;
        self.spawned.notify_one();
        Ok((pid, extra, rx))
    }

    /// The reaping loop; never returns.
    pub fn run(&self) -> ! {
        loop {
            let seen = lock(&self.inner).spawns;
            let mut status = 0;
            // SAFETY: plain waitpid into a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                if let Some(tx) = lock(&self.inner).waiting.remove(&pid) {
                    let _ = tx.send(ExitStatus::from_raw(status));
                }
                continue;
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // No children: sleep until a spawn (or the poll interval) instead of spinning.
                _ => {
                    let inner = lock(&self.inner);
                    if inner.spawns == seen {
                        let _ = self.spawned.wait_timeout(inner, IDLE_POLL);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_raw_statuses() {
        assert_eq!(
            ExitStatus::from_raw(0),
            ExitStatus {
                code: Some(0),
                signal: None
            }
        );
        assert_eq!(
            ExitStatus::from_raw(3 << 8),
            ExitStatus {
                code: Some(3),
                signal: None
            }
        );
        assert_eq!(
            ExitStatus::from_raw(9),
            ExitStatus {
                code: None,
                signal: Some(9)
            }
        );
        // Core dumped flag, and a real-time signal nix could not represent.
        assert_eq!(
            ExitStatus::from_raw(0x80 | 11),
            ExitStatus {
                code: None,
                signal: Some(11)
            }
        );
        assert_eq!(
            ExitStatus::from_raw(34),
            ExitStatus {
                code: None,
                signal: Some(34)
            }
        );
    }
}
