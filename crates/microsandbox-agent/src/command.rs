//! Turning an `ExecRequest` into exactly what `execve` needs: environment, PATH
//! resolution, working directory and validation. Pure except for `stat` calls; it runs
//! before any lock is taken, so slow filesystems never stall the reaper.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use microsandbox_protocol::{ExecRequest, WinSize};

/// PATH searched when the request's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a request could not be started: the protocol `Error` to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
    pub errno: Option<i32>,
}

impl Failure {
    fn invalid(message: String) -> Failure {
        Failure {
            code: "invalid-request",
            message,
            errno: None,
        }
    }

    /// `exec-failed` as "<what>: <os error text>".
    pub fn os(what: &str, errno: i32) -> Failure {
        let text = nix::errno::Errno::from_raw(errno).desc();
        Failure {
            code: "exec-failed",
            message: format!("{what}: {text}"),
            errno: Some(errno),
        }
    }
}

/// A request checked and converted to what `posix_spawn` needs, built before any lock is
/// taken.
#[derive(Debug)]
pub struct Prepared {
    /// Absolute (or cwd-relative) path of the resolved program.
    pub path: CString,
    /// argv[0] is the program as requested, like execvp.
    pub argv: Vec<CString>,
    /// `KEY=VALUE`, keys unique.
    pub envp: Vec<CString>,
    pub cwd: CString,
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size instead of pipes.
    pub tty: Option<WinSize>,
    /// Who gets the terminal (like `login` does): the requested user, else root.
    pub tty_owner: crate::identity::Ids,
}

/// The environment exactly as given, later duplicates overriding earlier ones (the
/// semantics of `env_clear` followed by `envs`), in first-seen order.
pub fn effective_env(env: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut out: Vec<(&str, &str)> = Vec::with_capacity(env.len());
    for (k, v) in env {
        match out.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out
}

/// Resolves `program` like `execvp` with the given PATH: names containing `/` are taken as
/// is (relative ones against `cwd`); otherwise the first executable regular file wins.
/// Errno mirrors execvp: EACCES if only non-executable candidates exist, else ENOENT.
pub fn resolve(program: &str, path: &str, cwd: &Path) -> Result<PathBuf, i32> {
    if program.is_empty() {
        return Err(libc::ENOENT);
    }
    if program.contains('/') {
        return Ok(cwd.join(program));
    }
    let mut err = libc::ENOENT;
    for dir in path.split(':') {
        // An empty PATH entry means the current directory.
        let candidate = cwd
            .join(if dir.is_empty() { "." } else { dir })
            .join(program);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_file() => err = libc::EACCES,
            _ => {}
        }
    }
    Err(err)
}

fn cstring(what: &str, s: impl Into<Vec<u8>>) -> Result<CString, Failure> {
    CString::new(s).map_err(|_| Failure::invalid(format!("{what} contains a NUL byte")))
}

/// Creates `dir` and its missing parents (mode 0755), each new one owned by `owner`, the
/// way Docker creates a container's missing working directory. Existing components are
/// left alone; one that is not a directory fails with ENOTDIR.
pub fn create_workdir(dir: &Path, owner: crate::identity::Ids) -> Result<(), i32> {
    use std::os::unix::fs::DirBuilderExt;
    let mut at = PathBuf::from("/");
    for part in dir.components().skip_while(|c| matches!(c, std::path::Component::RootDir)) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => continue,
            // A symlink component is followed, as the kernel does for the final chdir.
            Ok(m) if m.file_type().is_symlink() => match std::fs::metadata(&at) {
                Ok(t) if t.is_dir() => continue,
                Ok(_) => return Err(libc::ENOTDIR),
                Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
            },
            Ok(_) => return Err(libc::ENOTDIR),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
        match std::fs::DirBuilder::new().mode(0o755).create(&at) {
            Ok(()) => {
                // Exact mode whatever the umask, then the owner.
                std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o755)).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                std::os::unix::fs::lchown(&at, Some(owner.uid), Some(owner.gid)).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            }
            // Another command created it meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }
    Ok(())
}

/// Validates `req` and resolves its program.
pub fn prepare(req: &ExecRequest) -> Result<Prepared, Failure> {
    let cwd = req.cwd.as_deref().unwrap_or("/");
    match std::fs::metadata(cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Failure::os(&format!("cwd {cwd}"), libc::ENOTDIR)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && req.create_cwd.is_some() => {
            let owner = crate::identity::resolve(req.create_cwd.as_deref().unwrap_or("0")).map_err(Failure::invalid)?;
            create_workdir(Path::new(cwd), owner.ids)
                .map_err(|errno| Failure::os(&format!("cannot create working directory {cwd}"), errno))?;
        }
        Err(e) => {
            return Err(Failure::os(
                &format!("cwd {cwd}"),
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        }
    }
    // Like `docker exec`: credentials, home and supplementary groups from the guest's
    // /etc/passwd and /etc/group; root when no user is given.
    let identity = crate::identity::resolve(req.user.as_deref().unwrap_or("0")).map_err(Failure::invalid)?;
    let mut env = effective_env(&req.env);
    // HOME from passwd unless the caller set it (Docker does the same).
    if !env.iter().any(|(k, _)| *k == "HOME") {
        env.push(("HOME", identity.home.as_str()));
    }
    let mut envp = Vec::with_capacity(env.len());
    for (k, v) in &env {
        if k.is_empty() || k.contains('=') {
            return Err(Failure::invalid(format!(
                "invalid environment variable name {k:?}"
            )));
        }
        envp.push(cstring("environment", format!("{k}={v}"))?);
    }
    let mut argv = vec![cstring("program", req.program.as_str())?];
    for a in &req.args {
        argv.push(cstring("argument", a.as_str())?);
    }
    let search = env
        .iter()
        .find(|(k, _)| *k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v);
    let path = resolve(&req.program, search, Path::new(cwd))
        .map_err(|errno| Failure::os(&req.program, errno))?;
    let mut path = cstring("program", path.into_os_string().into_encoded_bytes())?;
    if let Some(size) = req.tty {
        if !size.is_valid() {
            return Err(Failure::invalid(format!("terminal size {}x{} must be at least 1x1", size.rows, size.cols)));
        }
    }
    if req.user.is_some() || !req.rlimits.is_empty() || !identity.groups.is_empty() || req.restricted {
        // Through the trampoline: it sets limits, credentials and the security profile,
        // then execs `path`. (Plain root without supplementary groups, limits or profile
        // needs none of that and spawns directly.)
        let limits = crate::identity::encode_limits(&req.rlimits).map_err(Failure::invalid)?;
        let mut t: Vec<CString> = crate::identity::trampoline_args(&identity, &limits, req.restricted)
            .into_iter()
            .map(|a| cstring("argument", a))
            .collect::<Result<_, _>>()?;
        t.push(cstring("argument", "--")?);
        t.push(path);
        t.append(&mut argv);
        argv = t;
        path = cstring("program", "/proc/self/exe")?;
    }
    Ok(Prepared {
        path,
        argv,
        envp,
        cwd: cstring("cwd", cwd)?,
        stdin: req.stdin,
        tty: req.tty,
        tty_owner: identity.ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn later_env_entries_override() {
        let e = env(&[("A", "1"), ("PATH", "/x"), ("A", "2")]);
        assert_eq!(effective_env(&e), [("A", "2"), ("PATH", "/x")]);
    }

    #[test]
    fn resolves_with_given_path() {
        let dir = std::env::temp_dir().join(format!("msb-exec-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("b")).unwrap();
        let noexec = dir.join("a/tool");
        std::fs::write(&noexec, "").unwrap();
        std::fs::set_permissions(&noexec, std::fs::Permissions::from_mode(0o644)).unwrap();
        let exe = dir.join("b/tool");
        std::fs::write(&exe, "").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(dir.join("a/dironly")).unwrap();

        let path = format!("{}:{}", dir.join("a").display(), dir.join("b").display());
        let root = Path::new("/");
        assert_eq!(resolve("tool", &path, root), Ok(exe.clone()));
        assert_eq!(
            resolve("tool", &dir.join("a").display().to_string(), root),
            Err(libc::EACCES)
        );
        assert_eq!(resolve("dironly", &path, root), Err(libc::ENOENT));
        assert_eq!(resolve("nope", &path, root), Err(libc::ENOENT));
        assert_eq!(resolve("", &path, root), Err(libc::ENOENT));
        // Relative PATH entries and slash names resolve against cwd.
        assert_eq!(resolve("tool", "b", &dir), Ok(dir.join("b").join("tool")));
        assert_eq!(resolve("b/tool", "", &dir), Ok(dir.join("b/tool")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prepare_uses_default_path_and_validates() {
        let req = ExecRequest {
            program: "sh".into(),
            ..Default::default()
        };
        let p = prepare(&req).unwrap();
        assert!(p.path.to_str().unwrap().ends_with("/sh"));
        // Only HOME is added (root's, from this machine's /etc/passwd).
        assert_eq!(p.envp.len(), 1);
        assert!(p.envp[0].to_str().unwrap().starts_with("HOME=/"));
        let req = ExecRequest {
            program: "sh".into(),
            env: env(&[("HOME", "/given")]),
            ..Default::default()
        };
        assert_eq!(prepare(&req).unwrap().envp, [CString::new("HOME=/given").unwrap()]);

        let req = ExecRequest {
            program: "sh".into(),
            env: env(&[("PATH", "/nonexistent")]),
            ..Default::default()
        };
        let f = prepare(&req).unwrap_err();
        assert_eq!((f.code, f.errno), ("exec-failed", Some(libc::ENOENT)));
        assert_eq!(f.message, "sh: No such file or directory");

        let req = ExecRequest {
            program: "sh".into(),
            env: env(&[("A=B", "x")]),
            ..Default::default()
        };
        assert_eq!(prepare(&req).unwrap_err().code, "invalid-request");
        let req = ExecRequest {
            program: "sh".into(),
            args: vec!["a\0b".into()],
            ..Default::default()
        };
        assert_eq!(prepare(&req).unwrap_err().code, "invalid-request");
        let req = ExecRequest {
            program: "sh".into(),
            cwd: Some("/nonexistent".into()),
            ..Default::default()
        };
        assert_eq!(prepare(&req).unwrap_err().errno, Some(libc::ENOENT));
    }

    #[test]
    fn creates_missing_workdir_components_only() {
        let dir = tempfile_dir("workdir");
        let me = crate::identity::Ids { uid: unsafe { libc::getuid() }, gid: unsafe { libc::getgid() } };
        let target = dir.join("a/b/c");
        create_workdir(&target, me).unwrap();
        assert!(target.is_dir());
        assert_eq!(std::fs::metadata(dir.join("a/b")).unwrap().permissions().mode() & 0o7777, 0o755);
        // Existing: nothing to do. A file in the way: ENOTDIR.
        create_workdir(&target, me).unwrap();
        std::fs::write(dir.join("file"), "").unwrap();
        assert_eq!(create_workdir(&dir.join("file/x"), me), Err(libc::ENOTDIR));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("msb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
