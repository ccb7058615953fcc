//! Owning a sandbox: claiming its directory, spawning its supervisor, reading the
//! supervisor's startup report.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

use super::spec::{StartupReport, LIVENESS_FD_ENV};
use crate::error::{Error, IoContext, Result};

const OWNER_FILE: &str = "owner.pid";
pub const SUPERVISOR_PID_FILE: &str = "supervisor.pid";

fn pid_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// Creates `dir` for a new sandbox. A directory left by a dead owner is reclaimed; one
/// whose owner or supervisor still runs means the name is taken.
pub fn claim_dir(dir: &Path, name: &str) -> Result<()> {
    let parent = dir.parent().expect("sandbox dir has a parent");
    std::fs::create_dir_all(parent).context(|| format!("creating {}", parent.display()))?;
    for _ in 0..2 {
        match std::fs::create_dir(dir) {
            Ok(()) => {
                std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
                    .context(|| format!("writing {}", dir.join(OWNER_FILE).display()))?;
                return Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let live = [OWNER_FILE, SUPERVISOR_PID_FILE]
                    .iter()
                    .filter_map(|f| read_pid(&dir.join(f)))
                    .any(pid_alive);
                if live {
                    return Err(Error::SandboxAlreadyExists(format!(
                        "a sandbox named {name:?} is already running; stop it first or choose another name"
                    )));
                }
                std::fs::remove_dir_all(dir).context(|| format!("removing stale {}", dir.display()))?;
            }
            Err(e) => return Err(Error::Io { context: format!("creating {}", dir.display()), source: e }),
        }
    }
    Err(Error::SandboxAlreadyExists(format!("a sandbox named {name:?} is being created by another process")))
}

/// Starts the supervisor in its own session with the liveness pipe as fd 3. Returns the
/// child and the pipe's write end, which the caller keeps for the sandbox's lifetime.
pub fn spawn_supervisor(bin: &Path, spec: &Path, dir: &Path) -> Result<(tokio::process::Child, OwnedFd)> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::Runtime(format!("cannot create the liveness pipe: {e}")))?;
    let log = std::fs::File::create(dir.join("supervisor.log")).context(|| "creating supervisor.log".into())?;
    let rfd = read_end.as_raw_fd();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg(spec)
        .env(LIVENESS_FD_ENV, "3")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if rfd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(rfd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Own session: a terminal's Ctrl-C reaches Ruby, which then stops the VM cleanly.
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::Runtime(format!("cannot start supervisor {}: {e}", bin.display())))?;
    drop(read_end);
    Ok((child, write_end))
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
        "exec-failed" => Error::ExecFailed(message),
        "runtime-error" => Error::Runtime(message),
        "protocol-error" => Error::Protocol(message),
        "filesystem-error" => Error::Filesystem(message),
        _ => Error::Boot(message),
    }
}
