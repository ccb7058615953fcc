//! How a sandbox's last run ended: `<sandbox dir>/stop.json`, written once per run.
//!
//! The supervisor writes it as it tears the VM down (it knows why: a stop request, a
//! drain, `max_duration`/`idle_timeout`, the owner exiting, or the VM ending by itself).
//! A supervisor killed with SIGKILL cannot write, so the engine call that kills it writes
//! the record instead. No record after a run means the supervisor vanished without either
//! (e.g. the kernel's OOM killer): that run *crashed*. Every boot deletes the previous
//! record first, so a record always describes the latest run.
//!
//! Only host processes of this user write the file (the guest cannot reach it); it is
//! still read with a size bound and parsed strictly, like any file on disk.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name inside the sandbox directory.
pub const STOP_RECORD_FILE: &str = "stop.json";
/// Largest record read; a real one is ~150 bytes.
const MAX_RECORD_BYTES: u64 = 4096;

/// Why the run ended (`source` of the Ruby `SandboxStopResult`).
pub mod source {
    /// `stop`/`request_stop` (clean shutdown, killed after its timeout).
    pub const STOP: &str = "stop";
    /// `request_drain`: sessions finished, then a stop.
    pub const DRAIN: &str = "drain";
    /// `pause`: the VM was saved to `paused.state` (the next start resumes it).
    pub const PAUSE: &str = "pause";
    /// `kill`/`request_kill`: SIGKILL to the supervisor and the VM.
    pub const KILL: &str = "kill";
    /// `max_duration` ran out.
    pub const MAX_DURATION: &str = "max-duration";
    /// `idle_timeout` ran out.
    pub const IDLE_TIMEOUT: &str = "idle-timeout";
    /// The (non-detached) owner process exited, which stops its sandboxes by design.
    pub const OWNER_EXITED: &str = "owner-exited";
    /// A secret's placeholder headed where it may not go, with `block_and_terminate`.
    pub const SECRET_VIOLATION: &str = "secret-violation";
    /// Someone sent the supervisor SIGTERM.
    pub const SIGTERM: &str = "sigterm";
    /// The VM (QEMU) ended without being asked: a guest power-off, panic or QEMU crash.
    pub const VM_EXITED: &str = "vm-exited";
    /// The supervisor lost its link to the guest agent.
    pub const AGENT_LOST: &str = "agent-link-lost";
    /// No record: the supervisor vanished without writing one.
    pub const SUPERVISOR_GONE: &str = "supervisor-gone";
}

/// How one run of a sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopRecord {
    /// `stopped` (ended as asked or as configured) or `crashed` (ended on its own).
    pub status: String,
    /// Exit code of the VM process (QEMU), when it exited rather than being killed.
    pub exit_code: Option<i32>,
    /// Signal that ended the VM process (9 when it was killed).
    pub signal: Option<i32>,
    /// Why, one of [`source`].
    pub source: String,
    /// When the end was observed, milliseconds since the Unix epoch.
    pub observed_at_ms: i64,
}

impl StopRecord {
    /// A record observed now.
    pub fn now(status: &str, source: &str, exit_code: Option<i32>, signal: Option<i32>) -> StopRecord {
        StopRecord { status: status.into(), exit_code, signal, source: source.into(), observed_at_ms: now_ms() }
    }

    /// What to report when a run ended without a record.
    pub fn missing() -> StopRecord {
        StopRecord::now("crashed", source::SUPERVISOR_GONE, None, None)
    }

    /// True for a crash (the run ended by itself, not as asked or configured).
    pub fn crashed(&self) -> bool {
        self.status == "crashed"
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Path of the record in `sandbox_dir`.
pub fn path(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join(STOP_RECORD_FILE)
}

/// Writes the record atomically (temp file + rename), keeping one written earlier in this
/// run unless `overwrite`: the first observer of an end knows best why it happened.
pub fn write(sandbox_dir: &Path, rec: &StopRecord, overwrite: bool) -> std::io::Result<()> {
    let target = path(sandbox_dir);
    if !overwrite && target.exists() {
        return Ok(());
    }
    let tmp = sandbox_dir.join(format!(".{STOP_RECORD_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(rec).expect("stop record serializes"))?;
    std::fs::rename(&tmp, &target)
}

/// Deletes the record of the previous run (at every boot).
pub fn clear(sandbox_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path(sandbox_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The record of the last run, if one was written and is well-formed.
pub fn read(sandbox_dir: &Path) -> Option<StopRecord> {
    let mut buf = Vec::new();
    std::fs::File::open(path(sandbox_dir)).ok()?.take(MAX_RECORD_BYTES + 1).read_to_end(&mut buf).ok()?;
    if buf.len() as u64 > MAX_RECORD_BYTES {
        return None;
    }
    let rec: StopRecord = serde_json::from_slice(&buf).ok()?;
    matches!(rec.status.as_str(), "stopped" | "crashed").then_some(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_first_writer_wins_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        let first = StopRecord::now("stopped", source::STOP, Some(0), None);
        write(dir.path(), &first, false).unwrap();
        write(dir.path(), &StopRecord::now("crashed", source::VM_EXITED, Some(1), None), false).unwrap();
        assert_eq!(read(dir.path()), Some(first));
        let kill = StopRecord::now("stopped", source::KILL, None, Some(9));
        write(dir.path(), &kill, true).unwrap();
        assert_eq!(read(dir.path()), Some(kill));
        clear(dir.path()).unwrap();
        clear(dir.path()).unwrap();
        assert_eq!(read(dir.path()), None);
    }

    #[test]
    fn rejects_oversized_unknown_and_malformed_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        std::fs::write(&p, vec![b' '; 5000]).unwrap();
        assert_eq!(read(dir.path()), None);
        std::fs::write(&p, r#"{"status":"exploded","exit_code":null,"signal":null,"source":"x","observed_at_ms":1}"#).unwrap();
        assert_eq!(read(dir.path()), None);
        std::fs::write(&p, r#"{"status":"stopped","source":"x","observed_at_ms":1,"extra":1,"exit_code":null,"signal":null}"#).unwrap();
        assert_eq!(read(dir.path()), None);
        assert!(StopRecord::missing().crashed());
    }
}
