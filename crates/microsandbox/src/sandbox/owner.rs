//! Owning a sandbox: claiming its directory, spawning its supervisor, reading the
//! supervisor's startup report.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use super::liveness::Liveness;
use super::spec::{StartupReport, LIVENESS_FD_ENV};
use crate::error::{Error, IoContext, Result};

/// Starts the supervisor in its own session. With `owned`, the read end of a liveness
/// pipe becomes its fd 3 and the write end is returned: the caller keeps it for as long
/// as the sandbox may live. A detached sandbox gets no pipe and outlives its creator.
///
/// With `secrets`, one end of a socket pair becomes the supervisor's fd
/// [`SECRETS_FD`](super::secrets::SECRETS_FD) (named by `MSB_SECRETS_FD`); the caller
/// writes the handover into the returned other end and closes it.
pub fn spawn_supervisor(
    bin: &Path,
    spec: &Path,
    dir: &Path,
    owned: bool,
    secrets: bool,
) -> Result<(tokio::process::Child, Option<Liveness>, Option<std::os::unix::net::UnixStream>)> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::Runtime(format!("cannot create the liveness pipe: {e}")))?;
    // Recorded at once, so a fork during the boot does not keep a copy either.
    let write_end = Liveness::new(write_end);
    // The child's end is moved above fd 9 so that placing the liveness pipe at fd 3
    // cannot clobber it before it is placed at fd 4.
    let secret_pair = if secrets {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| Error::Runtime(format!("cannot create the secrets channel: {e}")))?;
        // SAFETY: plain fcntl on an fd we own; the result is a new fd we then own.
        let hi = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        if hi < 0 {
            return Err(Error::Runtime(format!("cannot place the secrets channel: {}", std::io::Error::last_os_error())));
        }
        drop(theirs);
        // SAFETY: `hi` is a fresh fd owned by nobody else.
        Some((ours, unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(hi) }))
    } else {
        None
    };
    let sfd = secret_pair.as_ref().map(|(_, t)| t.as_raw_fd());
    let log = std::fs::File::create(dir.join("supervisor.log")).context(|| "creating supervisor.log".into())?;
    let rfd = read_end.as_raw_fd();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg(spec);
    if owned {
        cmd.env(LIVENESS_FD_ENV, "3");
    } else {
        cmd.env_remove(LIVENESS_FD_ENV);
    }
    if secrets {
        cmd.env(super::secrets::SECRETS_FD_ENV, super::secrets::SECRETS_FD.to_string());
    } else {
        cmd.env_remove(super::secrets::SECRETS_FD_ENV);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if !owned {
                // Detached: no liveness pipe at all.
            } else if rfd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(rfd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 clears FD_CLOEXEC on the copy: fd 4 survives exec, the original not.
            if let Some(sfd) = sfd {
                if libc::dup2(sfd, super::secrets::SECRETS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Own session: a terminal's Ctrl-C reaches Ruby, which then stops the VM cleanly.
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::Runtime(format!("cannot start supervisor {}: {e}", bin.display())))?;
    drop(read_end);
    let ours = secret_pair.map(|(ours, theirs)| {
        drop(theirs);
        ours
    });
    Ok((child, owned.then_some(write_end), ours))
}

/// Gives up ownership of a supervisor that must outlive this handle (a detached
/// sandbox) without killing it, and still reaps it when it exits, so it never stays a
/// zombie child of this process.
///
/// The `Child` has `kill_on_drop` (which protects a cancelled boot), so it must not be
/// dropped while the supervisor runs: a task on the current runtime waits for the exit.
/// Should that task be dropped first (its runtime shut down; the Ruby extension never
/// shuts its runtime down), [`NoKill`] forgets the handle instead of killing.
pub fn reap_in_background(child: tokio::process::Child) {
    let mut guard = NoKill(Some(child));
    tokio::spawn(async move {
        if let Some(c) = guard.0.as_mut() {
            let _ = c.wait().await;
        }
        // Exited and reaped: dropping the handle now kills nothing.
        drop(guard.0.take());
    });
}

/// Holds a child that must never be killed by being dropped.
struct NoKill(Option<tokio::process::Child>);
impl Drop for NoKill {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            std::mem::forget(c);
        }
    }
}

/// Waits for the supervisor's one-line startup report.
pub async fn read_startup(child: &mut tokio::process::Child, within: Duration) -> Result<StartupReport> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    let read = tokio::time::timeout(within, lines.read_line(&mut line)).await;
    match read {
        Err(_) => Err(Error::Boot(format!("the sandbox did not report ready within {}s", within.as_secs()))),
        Ok(Err(e)) => Err(Error::Io { context: "reading the supervisor's report".into(), source: e }),
        Ok(Ok(0)) => {
            let status = child.wait().await.ok();
            Err(Error::Boot(format!("the supervisor exited before the sandbox was ready ({status:?})")))
        }
        Ok(Ok(_)) => serde_json::from_str(line.trim())
            .map_err(|e| Error::Protocol(format!("unreadable supervisor report {line:?}: {e}"))),
    }
}

/// Rebuilds an engine error from a code sent across a process boundary.
pub fn error_from_code(code: &str, message: String) -> Error {
    match code {
        "invalid-config" => Error::InvalidConfig(message),
        "port-in-use" => Error::PortInUse(message),
        "exec-failed" => Error::ExecFailed(message),
        "runtime-error" => Error::Runtime(message),
        "protocol-error" => Error::Protocol(message),
        "filesystem-error" => Error::Filesystem(message),
        "patch-failed" => Error::Patch(message),
        "tls-error" => Error::Tls(message),
        "secret-violation" => Error::SecretViolation(message),
        "volume-in-use" => Error::VolumeInUse(message),
        "volume-not-found" => Error::VolumeNotFound(message),
        _ => Error::Boot(message),
    }
}
