//! Becoming a new sandbox after the VM was restored from a template.
//!
//! A template is one booted guest saved to a file; every sandbox restored from it starts
//! with the same memory: the same random pool, the same wall clock (stopped at the save),
//! the template's hostname. The host's `Restore` frame carries what must differ, and the
//! agent applies all of it before it answers `Ready` — so before any patch, script or
//! command of the sandbox runs:
//!
//! - **Randomness**: the host's bytes are credited to the input pool (`RNDADDENTROPY`) and
//!   the CRNG is reseeded from it (`RNDRESEEDCRNG`). The reseed bumps the CRNG generation,
//!   which makes every per-CPU CRNG and the batched `get_random_u32/u64` state re-key on
//!   their next use. (This kernel has no vmgenid driver that would do it by itself.)
//!   `/proc/sys/kernel/random/boot_id` is generated lazily on its first read; nothing
//!   reads it before the save, so each restored sandbox generates its own afterwards.
//! - **Clock**: `CLOCK_REALTIME` from the host (`CLOCK_MONOTONIC` continues from the
//!   template's, as a monotonic clock may).
//! - **Hostname** and its `/etc/hosts` line (when the sandbox has a NIC).
//! - **Machine id**: the fresh `/etc/machine-id` the host sends for a new sandbox
//!   (see `machine_id`); a failure to write it fails the restore.

use std::fs::File;
use std::os::fd::AsRawFd;

use microsandbox_protocol::{RestoreIdentity, RESTORE_ENTROPY_BYTES};

use crate::procfs;

/// `_IOW('R', 0x03, int[2])`: add entropy (and credit it) to the input pool.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Decodes and checks the host's identity (the host is trusted, but a malformed frame
/// must fail loudly, never half-apply).
fn entropy_bytes(id: &RestoreIdentity) -> Result<Vec<u8>, String> {
    let hex = id.entropy.as_bytes();
    if hex.len() != RESTORE_ENTROPY_BYTES * 2 {
        return Err(format!("restore entropy must be {RESTORE_ENTROPY_BYTES} bytes"));
    }
    let nib = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.chunks(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| "restore entropy is not hex".to_string())
}

/// Mixes `bytes` into the kernel's input pool, credits them, and reseeds the CRNG.
fn reseed(bytes: &[u8]) -> Result<(), String> {
    let urandom = File::options().write(true).open("/dev/urandom").map_err(|e| format!("cannot open /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut req: Vec<u8> = Vec::with_capacity(8 + bytes.len());
    req.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    req.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    req.extend_from_slice(bytes);
    // SAFETY: `req` is a valid rand_pool_info of `bytes.len()` payload bytes, alive for the call.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, req.as_ptr()) } != 0 {
        return Err(format!("RNDADDENTROPY failed: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(format!("RNDRESEEDCRNG failed: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn set_clock(realtime_ns: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (realtime_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!("cannot set the clock: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Applies `id`; an error means the sandbox must not be used (the host then kills the VM
/// and boots the sandbox cold).
pub fn apply(id: &RestoreIdentity) -> Result<(), String> {
    let entropy = entropy_bytes(id)?;
    let host = id.hostname.as_str();
    if host.is_empty() || host.len() > 64 || !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') {
        return Err(format!("invalid hostname {host:?}"));
    }
    if let Some(m) = &id.machine_id {
        if !crate::machine_id::valid(m) {
            return Err("invalid machine id".into());
        }
    }
    reseed(&entropy)?;
    set_clock(id.realtime_ns)?;
    let old = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    nix::unistd::sethostname(host).map_err(|e| format!("cannot set hostname {host:?}: {e}"))?;
    if let Some(m) = &id.machine_id {
        crate::machine_id::write(m)?;
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if procfs::net(&cmdline).is_some() && !old.is_empty() {
        // The boot wrote "127.0.1.1 <template's hostname>" into a fresh /etc/hosts; best
        // effort, as at boot: an odd root only loses name resolution.
        if let Ok(text) = std::fs::read_to_string("/etc/hosts") {
            let new = rename_host_line(&text, &old, host);
            if new != text {
                if let Err(e) = std::fs::write("/etc/hosts", new) {
                    eprintln!("msb-agent: cannot write /etc/hosts: {e}");
                }
            }
        }
    }
    Ok(())
}

/// `hosts` with the line `127.0.1.1 <old>` naming `new` instead.
fn rename_host_line(hosts: &str, old: &str, new: &str) -> String {
    let mut out = String::with_capacity(hosts.len());
    for line in hosts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() == 2 && f[0] == "127.0.1.1" && f[1] == old {
            out.push_str(&format!("127.0.1.1\t{new}\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(entropy: String) -> RestoreIdentity {
        RestoreIdentity { entropy, realtime_ns: 0, hostname: "h".into(), machine_id: None }
    }

    #[test]
    fn host_line_renamed() {
        let h = "127.0.0.1\tlocalhost\n127.0.1.1\ttpl\n10.0.0.1 tpl.other\n";
        assert_eq!(rename_host_line(h, "tpl", "box"), "127.0.0.1\tlocalhost\n127.0.1.1\tbox\n10.0.0.1 tpl.other\n");
    }

    #[test]
    fn entropy_must_be_exact_hex() {
        assert_eq!(entropy_bytes(&id("ab".repeat(64))).unwrap(), vec![0xab; 64]);
        assert!(entropy_bytes(&id("ab".repeat(63))).is_err());
        assert!(entropy_bytes(&id("zz".repeat(64))).is_err());
    }
}
