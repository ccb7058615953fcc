//! Running a command as another user or with resource limits.
//!
//! `posix_spawn` can neither change credentials nor set limits, so such commands start
//! through a trampoline: the agent binary itself (`/proc/self/exe`, reachable after the
//! root switch because it is a magic link) run as `msb-agent --exec-as UID GID LIMITS --
//! PATH ARGV...`, which applies the limits, drops privileges and `execve`s the program.
//! It is a fresh process, so the usual post-fork restrictions of a threaded parent do not
//! apply to it.

use std::ffi::{CStr, CString};

use microsandbox_protocol::Rlimit;

/// Flag that selects trampoline mode in `main`.
pub const TRAMPOLINE_FLAG: &str = "--exec-as";

/// Credentials to switch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

fn lookup(file: &str, name: &str, field: usize) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(field)?.parse().ok()).flatten()
    })
}

fn passwd_gid_of_uid(uid: u32) -> Option<u32> {
    std::fs::read_to_string("/etc/passwd").ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2)?.parse::<u32>().ok()? == uid).then(|| f.get(3)?.parse().ok()).flatten()
    })
}

/// Resolves `user[:group]` against the guest's /etc/passwd and /etc/group.
pub fn resolve(spec: &str) -> Result<Ids, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, default_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, passwd_gid_of_uid(uid).unwrap_or(0)),
        Err(_) => {
            let uid = lookup("/etc/passwd", user, 2).ok_or_else(|| format!("unknown user {user:?} (not in /etc/passwd)"))?;
            (uid, lookup("/etc/passwd", user, 3).unwrap_or(0))
        }
    };
    let gid = match group {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("/etc/group", g, 2).ok_or_else(|| format!("unknown group {g:?} (not in /etc/group)"))?,
        },
    };
    Ok(Ids { uid, gid })
}

fn resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "as" => libc::RLIMIT_AS,
        "core" => libc::RLIMIT_CORE,
        "cpu" => libc::RLIMIT_CPU,
        "data" => libc::RLIMIT_DATA,
        "fsize" => libc::RLIMIT_FSIZE,
        "locks" => libc::RLIMIT_LOCKS,
        "memlock" => libc::RLIMIT_MEMLOCK,
        "msgqueue" => libc::RLIMIT_MSGQUEUE,
        "nice" => libc::RLIMIT_NICE,
        "nofile" => libc::RLIMIT_NOFILE,
        "nproc" => libc::RLIMIT_NPROC,
        "rss" => libc::RLIMIT_RSS,
        "rtprio" => libc::RLIMIT_RTPRIO,
        "sigpending" => libc::RLIMIT_SIGPENDING,
        "stack" => libc::RLIMIT_STACK,
        _ => return None,
    })
}

/// Checks limits and encodes them for the trampoline's command line (`-` for none).
pub fn encode_limits(limits: &[Rlimit]) -> Result<String, String> {
    if limits.is_empty() {
        return Ok("-".into());
    }
    let mut parts = Vec::new();
    for l in limits {
        if resource(&l.resource).is_none() {
            return Err(format!("unknown rlimit {:?}", l.resource));
        }
        if l.soft > l.hard {
            return Err(format!("rlimit {}: soft limit {} is above hard limit {}", l.resource, l.soft, l.hard));
        }
        parts.push(format!("{}={}:{}", l.resource, l.soft, l.hard));
    }
    Ok(parts.join(","))
}

/// Trampoline arguments placed before `-- PATH ARGV...`.
pub fn trampoline_args(ids: Ids, limits: &str) -> Vec<String> {
    vec!["msb-agent".into(), TRAMPOLINE_FLAG.into(), ids.uid.to_string(), ids.gid.to_string(), limits.into()]
}

fn fail(what: &str, err: std::io::Error) -> ! {
    eprintln!("msb-agent: {what}: {err}");
    std::process::exit(127)
}

/// Trampoline mode: `args` = [exe, --exec-as, uid, gid, limits, --, path, argv...]. Never returns.
pub fn trampoline(args: &[CString]) -> ! {
    let s = |i: usize| args.get(i).and_then(|a| a.to_str().ok()).unwrap_or("");
    let (uid, gid) = match (s(2).parse::<u32>(), s(3).parse::<u32>()) {
        (Ok(u), Ok(g)) => (u, g),
        _ => fail("bad trampoline arguments", std::io::Error::from_raw_os_error(libc::EINVAL)),
    };
    if s(4) != "-" {
        for spec in s(4).split(',') {
            let parsed = spec.split_once('=').and_then(|(n, v)| {
                let (soft, hard) = v.split_once(':')?;
                Some((resource(n)?, soft.parse::<u64>().ok()?, hard.parse::<u64>().ok()?))
            });
            let Some((res, soft, hard)) = parsed else {
                fail("bad rlimit", std::io::Error::from_raw_os_error(libc::EINVAL))
            };
            let lim = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            // SAFETY: plain syscall with a valid pointer.
            if unsafe { libc::setrlimit(res, &lim) } != 0 {
                fail(&format!("setrlimit {spec}"), std::io::Error::last_os_error());
            }
        }
    }
    if s(5) != "--" || args.len() < 8 {
        fail("bad trampoline arguments", std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: plain syscalls; group list first, then gid, then uid (after which we could not).
    unsafe {
        let groups = [gid];
        if libc::setgroups(1, groups.as_ptr()) != 0 {
            fail("setgroups", std::io::Error::last_os_error());
        }
        if libc::setgid(gid) != 0 {
            fail("setgid", std::io::Error::last_os_error());
        }
        if libc::setuid(uid) != 0 {
            fail("setuid", std::io::Error::last_os_error());
        }
    }
    let path: &CStr = &args[6];
    let mut argv: Vec<*const libc::c_char> = args[7..].iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    extern "C" {
        static environ: *const *const libc::c_char;
    }
    // SAFETY: argv is NUL-terminated and its strings outlive the call; environ is the
    // environment posix_spawn gave us.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), environ) };
    fail(&format!("cannot run {}", path.to_string_lossy()), std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_ids_resolve_without_files() {
        assert_eq!(resolve("1234:99").unwrap(), Ids { uid: 1234, gid: 99 });
        assert_eq!(resolve("0").unwrap().uid, 0);
    }

    #[test]
    fn limits_are_checked_and_encoded() {
        let l = |r: &str, s, h| Rlimit { resource: r.into(), soft: s, hard: h };
        assert_eq!(encode_limits(&[]).unwrap(), "-");
        assert_eq!(encode_limits(&[l("nofile", 64, 128)]).unwrap(), "nofile=64:128");
        assert!(encode_limits(&[l("bogus", 1, 1)]).is_err());
        assert!(encode_limits(&[l("nofile", 9, 1)]).is_err());
    }
}
