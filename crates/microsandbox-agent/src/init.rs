//! `init:` — handing PID 1 to a custom init once the guest has booted.
//!
//! PID 1 is whoever calls `execve` in the first process, so the agent forks: the parent
//! (PID 1) becomes the init, the child carries on as the agent. This happens right after
//! boot, before the agent starts any thread, so the fork copies a single-threaded process.
//! The child makes itself a child subreaper, so the orphans of its commands still come
//! back to its reaper and sessions end as they do without an init; everything else that
//! is orphaned goes to the init, as on any Linux system. The agent still powers the VM off
//! itself (`reboot` needs CAP_SYS_BOOT, not PID 1). If the init exits, the kernel panics
//! and the VM ends (reported as crashed).

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use microsandbox_protocol::{InitSpec, AUTO, AUTO_INIT};
use nix::unistd::{fork, ForkResult};

/// Default PATH of the init (its own `env` may replace it).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The executable `cmd` names in the (new) root: `auto` is the first of [`AUTO_INIT`].
pub fn resolve(spec: &InitSpec, root: &Path) -> Result<String, String> {
    let executable = |p: &str| {
        let path = root.join(p.trim_start_matches('/'));
        std::fs::metadata(path).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
    };
    if spec.cmd == AUTO {
        return AUTO_INIT
            .iter()
            .find(|p| executable(p))
            .map(|p| p.to_string())
            .ok_or_else(|| format!("init: \"auto\" found no init in the root (looked for {})", AUTO_INIT.join(", ")));
    }
    if executable(&spec.cmd) {
        Ok(spec.cmd.clone())
    } else {
        Err(format!("init: {} is not an executable file in the root", spec.cmd))
    }
}

/// Hands PID 1 to the init named on the kernel command line, if any. Returns in the agent
/// (the child); the parent only returns an error when `execve` failed.
pub fn handoff(cmdline: &str) -> Result<(), String> {
    let Some(spec) = InitSpec::from_cmdline(cmdline) else { return Ok(()) };
    let path = resolve(&spec, Path::new("/"))?;
    let cstr = |s: &str| CString::new(s).map_err(|_| "init: NUL byte in cmd, args or env".to_string());
    let mut argv = vec![cstr(&path)?];
    for a in &spec.args {
        argv.push(cstr(a)?);
    }
    let mut env: Vec<(String, String)> = vec![("PATH".into(), PATH.into()), ("TERM".into(), "linux".into())];
    for (k, v) in &spec.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let envp = env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect::<Result<Vec<_>, _>>()?;
    let path = cstr(&path)?;
    // SAFETY: no thread has been started yet (see the module docs), so the child is a
    // complete copy of a single-threaded process.
    match unsafe { fork() }.map_err(|e| format!("init: fork failed: {e}"))? {
        ForkResult::Child => {
            // SAFETY: plain prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
                crate::util::log!("cannot become a child subreaper: {}", std::io::Error::last_os_error());
            }
            Ok(())
        }
        ForkResult::Parent { .. } => {
            // The init starts with default signal handling (Rust ignores SIGPIPE) and an
            // empty signal mask.
            // SAFETY: plain libc calls on a local, initialised sigset.
            unsafe {
                for sig in 1..libc::SIGRTMAX() {
                    if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                        libc::signal(sig, libc::SIG_DFL);
                    }
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            }
            let err = nix::unistd::execve(&path, &argv, &envp).unwrap_err();
            Err(format!("init: cannot run {}: {err}", path.to_string_lossy()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_auto_and_paths_in_a_root() {
        let root = std::env::temp_dir().join(format!("msb-init-test-{}", std::process::id()));
        std::fs::create_dir_all(root.join("lib/systemd")).unwrap();
        std::fs::create_dir_all(root.join("sbin")).unwrap();
        let spec = |cmd: &str| InitSpec { cmd: cmd.into(), ..Default::default() };
        assert!(resolve(&spec("auto"), &root).unwrap_err().contains("found no init"));
        std::fs::write(root.join("lib/systemd/systemd"), b"").unwrap();
        std::fs::set_permissions(root.join("lib/systemd/systemd"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve(&spec("auto"), &root).unwrap(), "/lib/systemd/systemd");
        std::fs::write(root.join("sbin/init"), b"").unwrap();
        assert_eq!(resolve(&spec("auto"), &root).unwrap(), "/lib/systemd/systemd"); // not executable
        assert!(resolve(&spec("/sbin/init"), &root).is_err());
        std::fs::set_permissions(root.join("sbin/init"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(resolve(&spec("auto"), &root).unwrap(), "/sbin/init");
        assert!(resolve(&spec("/missing"), &root).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
