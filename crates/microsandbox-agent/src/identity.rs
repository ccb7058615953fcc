//! Running a command as another user, with resource limits or under the `restricted`
//! security profile.
//!
//! `posix_spawn` can neither change credentials nor set limits, so such commands start
//! through a trampoline: the agent binary itself (`/proc/self/exe`, reachable after the
//! root switch because it is a magic link) run as `msb-agent --exec-as UID GID GROUPS
//! LIMITS PROFILE -- PATH ARGV...`, which applies the limits, drops privileges (and under
//! `restricted` every capability) and `execve`s the program.
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

/// Who a command runs as, resolved the way `docker exec --user` does (runc's
/// `GetExecUser`): the user's primary group, home directory and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub ids: Ids,
    /// Groups from /etc/group that list the user by name; empty when a group was given
    /// explicitly (`user:group`) or the uid has no passwd entry.
    pub groups: Vec<u32>,
    /// Home from /etc/passwd; `/` for a uid without an entry.
    pub home: String,
}

/// One `/etc/passwd` entry: (name, uid, gid, home).
fn passwd_entry(passwd: &str, matches: impl Fn(&str, u32) -> bool) -> Option<(String, u32, u32, String)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        let (name, uid, gid) = (*f.first()?, f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?);
        matches(name, uid).then(|| (name.to_string(), uid, gid, f.get(5).copied().unwrap_or("").to_string()))
    })
}

/// `/etc/group` entries as (name, gid, members).
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        let members = f.get(3).map(|m| m.split(',').filter(|m| !m.is_empty()).collect()).unwrap_or_default();
        Some((*f.first()?, f.get(2)?.parse().ok()?, members))
    })
}

/// Resolves `user[:group]` against the given /etc/passwd and /etc/group contents.
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<Identity, String> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd_entry(passwd, |_, u| u == uid).or(Some((String::new(), uid, 0, String::new()))),
        Err(_) => passwd_entry(passwd, |n, _| n == user),
    };
    let (name, uid, default_gid, home) = entry.ok_or_else(|| format!("unknown user {user:?} (not in /etc/passwd)"))?;
    let home = if home.is_empty() { "/".to_string() } else { home };
    let (gid, groups) = match group_spec {
        Some(g) => {
            let gid = match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_entries(group)
                    .find(|(n, _, _)| *n == g)
                    .map(|(_, gid, _)| gid)
                    .ok_or_else(|| format!("unknown group {g:?} (not in /etc/group)"))?,
            };
            (gid, Vec::new())
        }
        None => {
            let mut groups: Vec<u32> = Vec::new();
            if !name.is_empty() {
                for (_, gid, members) in group_entries(group) {
                    if members.contains(&name.as_str()) && !groups.contains(&gid) {
                        groups.push(gid);
                    }
                }
            }
            (default_gid, groups)
        }
    };
    Ok(Identity { ids: Ids { uid, gid }, groups, home })
}

/// Resolves `user[:group]` against the guest's /etc/passwd and /etc/group (missing files
/// read as empty: a bare root filesystem still runs numeric users).
pub fn resolve(spec: &str) -> Result<Identity, String> {
    let read = |p: &str| std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    resolve_in(spec, &read("/etc/passwd"), &read("/etc/group"))
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

/// Trampoline arguments placed before `-- PATH ARGV...`: uid, gid, supplementary groups
/// (comma-separated, `-` for none), limits and the security profile (`default` or
/// `restricted`).
pub fn trampoline_args(id: &Identity, limits: &str, restricted: bool) -> Vec<String> {
    let groups = if id.groups.is_empty() { "-".to_string() } else { id.groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",") };
    let profile = if restricted { "restricted" } else { "default" };
    vec!["msb-agent".into(), TRAMPOLINE_FLAG.into(), id.ids.uid.to_string(), id.ids.gid.to_string(), groups, limits.into(), profile.into()]
}

/// The `restricted` profile, first half (while still root: dropping from the bounding
/// set needs CAP_SETPCAP): no new privileges, empty bounding set, no ambient caps.
fn restrict_before_setuid() {
    // SAFETY: plain prctl calls with integer arguments.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail("PR_SET_NO_NEW_PRIVS", std::io::Error::last_os_error());
        }
        // Capability numbers up to the kernel's last one; EINVAL past it.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                fail("PR_CAPBSET_DROP", err);
            }
        }
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
            fail("PR_CAP_AMBIENT_CLEAR_ALL", std::io::Error::last_os_error());
        }
    }
}

/// The `restricted` profile, second half (after setuid): empty permitted, effective and
/// inheritable sets. With the bounding set empty, `execve` grants nothing back, also to
/// uid 0 and to setuid or file-capability programs.
fn restrict_after_setuid() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capset reads one header and two data structs (version 3) from valid pointers.
    if unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) } != 0 {
        fail("capset", std::io::Error::last_os_error());
    }
}

fn fail(what: &str, err: std::io::Error) -> ! {
    eprintln!("msb-agent: {what}: {err}");
    std::process::exit(127)
}

/// Trampoline mode: `args` = [exe, --exec-as, uid, gid, groups, limits, profile, --, path,
/// argv...].
/// Never returns.
pub fn trampoline(args: &[CString]) -> ! {
    let s = |i: usize| args.get(i).and_then(|a| a.to_str().ok()).unwrap_or("");
    let (uid, gid) = match (s(2).parse::<u32>(), s(3).parse::<u32>()) {
        (Ok(u), Ok(g)) => (u, g),
        _ => fail("bad trampoline arguments", std::io::Error::from_raw_os_error(libc::EINVAL)),
    };
    let groups: Vec<libc::gid_t> = match s(4) {
        "-" => Vec::new(),
        list => match list.split(',').map(str::parse).collect::<Result<_, _>>() {
            Ok(g) => g,
            Err(_) => fail("bad trampoline arguments", std::io::Error::from_raw_os_error(libc::EINVAL)),
        },
    };
    if s(5) != "-" {
        for spec in s(5).split(',') {
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
    let restricted = match s(6) {
        "default" => false,
        "restricted" => true,
        _ => fail("bad trampoline arguments", std::io::Error::from_raw_os_error(libc::EINVAL)),
    };
    if s(7) != "--" || args.len() < 10 {
        fail("bad trampoline arguments", std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: plain syscalls; group list first, then gid, then uid (after which we could not).
    // The list is exactly the supplementary groups, as runc sets it for `docker exec`.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            fail("setgroups", std::io::Error::last_os_error());
        }
        if libc::setgid(gid) != 0 {
            fail("setgid", std::io::Error::last_os_error());
        }
    }
    if restricted {
        restrict_before_setuid();
    }
    // SAFETY: plain syscall.
    if unsafe { libc::setuid(uid) } != 0 {
        fail("setuid", std::io::Error::last_os_error());
    }
    if restricted {
        restrict_after_setuid();
    }
    let path: &CStr = &args[8];
    let mut argv: Vec<*const libc::c_char> = args[9..].iter().map(|a| a.as_ptr()).collect();
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

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nnohome:x:1001:1001::::\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nextra:x:2000:app,other\nmore:x:2001:other,app\nwheel:x:10:root\n";

    fn id(spec: &str) -> Identity {
        resolve_in(spec, PASSWD, GROUP).unwrap()
    }

    #[test]
    fn names_and_uids_get_home_and_supplementary_groups() {
        let app = Identity { ids: Ids { uid: 1000, gid: 1000 }, groups: vec![2000, 2001], home: "/home/app".into() };
        assert_eq!(id("app"), app);
        assert_eq!(id("1000"), app);
        assert_eq!(id("root"), Identity { ids: Ids { uid: 0, gid: 0 }, groups: vec![10], home: "/root".into() });
        // An explicit group replaces the supplementary ones, as in Docker.
        assert_eq!(id("app:extra"), Identity { ids: Ids { uid: 1000, gid: 2000 }, groups: vec![], home: "/home/app".into() });
        assert_eq!(id("1000:7").ids, Ids { uid: 1000, gid: 7 });
        // No passwd entry: gid 0, home /, no groups.
        assert_eq!(id("4242"), Identity { ids: Ids { uid: 4242, gid: 0 }, groups: vec![], home: "/".into() });
        assert_eq!(id("4242:99").ids, Ids { uid: 4242, gid: 99 });
        assert_eq!(id("nohome").home, "/");
        assert!(resolve_in("ghost", PASSWD, GROUP).unwrap_err().contains("unknown user"));
        assert!(resolve_in("app:ghost", PASSWD, GROUP).unwrap_err().contains("unknown group"));
        // Without the files, numeric users still resolve.
        assert_eq!(resolve_in("1234:99", "", "").unwrap().ids, Ids { uid: 1234, gid: 99 });
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
