//! Resource usage of a sandbox, read on the host from its VMM process.
//!
//! The guest is not asked: a hostile guest cannot lie about what it costs the host.
//! CPU and disk figures are those of the QEMU process (all vCPUs and device threads),
//! memory is its resident set (guest RAM actually touched plus QEMU itself).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};

/// Window over which `cpu_percent` is measured.
pub const CPU_SAMPLE: Duration = Duration::from_millis(250);

/// One snapshot.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    /// CPU used over the last sample window, in percent of one host core (can exceed 100).
    pub cpu_percent: f64,
    /// Resident memory of the VM process, bytes.
    pub memory_bytes: u64,
    /// Guest memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// Bytes the VM read from / wrote to its disks since boot.
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    /// Bytes the NIC delivered to the guest / the guest sent, whole Ethernet frames,
    /// counted by the supervisor's network stack (0 without a NIC).
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub uptime_secs: f64,
    /// CPU time the VM process has used since boot (user + system, all vCPU and device
    /// threads), nanoseconds. An upper bound of the vCPUs' own time.
    pub vcpu_time_ns: u64,
    /// Resident memory of the VM process, bytes (the same value as `memory_bytes`).
    pub memory_host_resident_bytes: u64,
    /// Bytes the host has allocated for the sandbox's writable root disk (its copy-on-write
    /// overlay, or its private copy of a local root). `None` when the disk is not found.
    pub upper_host_allocated_bytes: Option<u64>,
    /// When the sample was taken, Unix milliseconds.
    pub timestamp_ms: u64,
}

struct Sample {
    cpu_ticks: u64,
    at: Instant,
}

/// Where process statistics are read (a parameter only so tests can use a fake procfs).
const PROC: &str = "/proc";

/// Reads `<proc>/<pid>/<file>`. A vanished process means the sandbox stopped; any other
/// failure (no procfs on this host, statistics not readable) means metrics are unavailable
/// here — the sandbox itself is fine.
fn read_proc(proc: &Path, pid: u32, file: &str) -> Result<String> {
    let path = proc.join(pid.to_string()).join(file);
    std::fs::read_to_string(&path).map_err(|e| {
        if !proc.join("self").exists() {
            Error::MetricsUnavailable(format!(
                "metrics need a procfs at {} (Linux hosts); this host has none",
                proc.display()
            ))
        } else if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) {
            Error::SandboxNotRunning(format!("the VM process {pid} is gone; the sandbox is not running"))
        } else {
            Error::MetricsUnavailable(format!(
                "cannot read {} for the sandbox's VM process: {e}; check that this user may read its procfs entries (hidepid, another user's VM)",
                path.display()
            ))
        }
    })
}

/// utime + stime in clock ticks, from /proc/<pid>/stat.
fn cpu_ticks(proc: &Path, pid: u32) -> Result<u64> {
    let stat = read_proc(proc, pid, "stat")?;
    let rest = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Ok(num(11) + num(12))
}

fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn sample(proc: &Path, pid: u32) -> Result<Sample> {
    Ok(Sample { cpu_ticks: cpu_ticks(proc, pid)?, at: Instant::now() })
}

/// Seconds since the process `pid` started (its start time against the host's uptime).
fn process_uptime(pid: u32, ticks_per_sec: f64) -> f64 {
    let start = crate::state::process_start_time(pid).unwrap_or(0) as f64 / ticks_per_sec;
    let host_uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or(start);
    (host_uptime - start).max(0.0)
}

/// Measures the VMM process `pid` of a sandbox with `memory_mib` of guest memory whose
/// writable root disk is `upper_disk` (when known).
pub async fn collect(pid: u32, memory_mib: u64, upper_disk: Option<&Path>) -> Result<Metrics> {
    let mut m = collect_from(Path::new(PROC), pid, memory_mib).await?;
    m.upper_host_allocated_bytes = upper_disk.and_then(allocated_bytes);
    Ok(m)
}

/// Bytes of disk the host allocated for `path` (sparse files count only written blocks).
fn allocated_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks().saturating_mul(512))
}

async fn collect_from(proc: &Path, pid: u32, memory_mib: u64) -> Result<Metrics> {
    if pid == 0 {
        return Err(Error::SandboxNotRunning("the sandbox is not running".into()));
    }
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_sec = if ticks > 0 { ticks as f64 } else { 100.0 };
    let a = sample(proc, pid)?;
    tokio::time::sleep(CPU_SAMPLE).await;
    let b = sample(proc, pid)?;
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
    let cpu_percent = (b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks_per_sec) / secs * 100.0;
    let status = read_proc(proc, pid, "status")?;
    // /proc/<pid>/io is readable by the process owner, which we are.
    let io = read_proc(proc, pid, "io").unwrap_or_default();
    let rss = field(&status, "VmRSS:") * 1024;
    let timestamp_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Ok(Metrics {
        cpu_percent: (cpu_percent * 10.0).round() / 10.0,
        memory_bytes: rss,
        memory_limit_bytes: memory_mib << 20,
        disk_read_bytes: field(&io, "read_bytes:"),
        disk_write_bytes: field(&io, "write_bytes:"),
        net_rx_bytes: 0,
        net_tx_bytes: 0,
        uptime_secs: (process_uptime(pid, ticks_per_sec) * 10.0).round() / 10.0,
        vcpu_time_ns: (b.cpu_ticks as f64 / ticks_per_sec * 1e9) as u64,
        memory_host_resident_bytes: rss,
        upper_host_allocated_bytes: None,
        timestamp_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn measures_a_live_process_and_rejects_a_dead_one() {
        let m = collect(std::process::id(), 512, Some(Path::new("/proc/self/exe"))).await.unwrap();
        assert!(m.memory_bytes > 0);
        assert_eq!(m.memory_host_resident_bytes, m.memory_bytes);
        assert!(m.timestamp_ms > 1_600_000_000_000);
        let exe = std::fs::canonicalize("/proc/self/exe").unwrap();
        assert!(collect(std::process::id(), 512, Some(&exe)).await.unwrap().upper_host_allocated_bytes.unwrap() > 0);
        assert_eq!(m.memory_limit_bytes, 512 << 20);
        assert!(m.uptime_secs >= 0.0);
        assert!(matches!(collect(u32::MAX - 1, 512, None).await, Err(Error::SandboxNotRunning(_))));
    }

    #[tokio::test]
    async fn unreadable_statistics_are_unavailable_not_a_stopped_sandbox() {
        let t = tempfile::tempdir().unwrap();
        // No procfs at all (a non-Linux host).
        assert!(matches!(collect_from(t.path(), 42, 512).await, Err(Error::MetricsUnavailable(m)) if m.contains("procfs")));
        // A procfs whose entry for the VM cannot be read (EISDIR here; EACCES with hidepid).
        std::fs::create_dir_all(t.path().join("self")).unwrap();
        std::fs::create_dir_all(t.path().join("42/stat")).unwrap();
        assert!(matches!(collect_from(t.path(), 42, 512).await, Err(Error::MetricsUnavailable(m)) if m.contains("42/stat")));
        // A process that is gone is a stopped sandbox.
        assert!(matches!(collect_from(t.path(), 43, 512).await, Err(Error::SandboxNotRunning(_))));
    }

    #[test]
    fn parses_status_fields() {
        assert_eq!(field("Name:\tqemu\nVmRSS:\t  2048 kB\n", "VmRSS:"), 2048);
        assert_eq!(field("read_bytes: 42\n", "read_bytes:"), 42);
        assert_eq!(field("", "VmRSS:"), 0);
    }
}
