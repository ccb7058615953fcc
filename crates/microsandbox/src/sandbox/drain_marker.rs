//! The drain marker: `<sandbox dir>/draining` says "a drain was asked of this run", so
//! every process reports the sandbox's status as draining (Ruby `:draining`) until it
//! stops, not only the process that asked.
//!
//! It holds the pid of the supervisor the drain was asked of, in decimal. `request_drain`
//! writes it (temp file + rename) before it sends the request, so a status read after
//! `drain` returns already sees it; the supervisor deletes it as it tears the VM down, and
//! every boot deletes a leftover one. A marker counts only while its pid is the running
//! supervisor of the sandbox's record: a marker left by a supervisor that was killed
//! (SIGKILL cannot clean up) names a process that is gone, so it is ignored.
//!
//! Only host processes of this user write the file (the guest cannot reach it); it is
//! still read with a size bound and parsed strictly, like anything on disk.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::paths::Home;
use crate::state::{Record, Status};

/// File name inside the sandbox directory.
pub const DRAIN_MARKER_FILE: &str = "draining";
/// Longest marker read: a pid has at most 10 digits.
const MAX_MARKER_BYTES: u64 = 16;

/// Path of the marker in `sandbox_dir`.
pub fn path(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join(DRAIN_MARKER_FILE)
}

/// Marks a drain asked of the supervisor `supervisor_pid`.
pub fn write(sandbox_dir: &Path, supervisor_pid: u32) -> std::io::Result<()> {
    let tmp = sandbox_dir.join(format!(".{DRAIN_MARKER_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, supervisor_pid.to_string())?;
    std::fs::rename(&tmp, path(sandbox_dir))
}

/// Deletes the marker (the run it describes has ended, or a new one begins).
pub fn clear(sandbox_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path(sandbox_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The supervisor pid the marker names, if there is a well-formed one.
pub fn read(sandbox_dir: &Path) -> Option<u32> {
    let mut buf = Vec::new();
    std::fs::File::open(path(sandbox_dir)).ok()?.take(MAX_MARKER_BYTES + 1).read_to_end(&mut buf).ok()?;
    parse(&buf)
}

fn parse(buf: &[u8]) -> Option<u32> {
    if buf.is_empty() || buf.len() as u64 > MAX_MARKER_BYTES || !buf.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(buf).ok()?.parse().ok().filter(|&pid| pid > 0)
}

/// True when the marker names `supervisor_pid`, the supervisor of the running sandbox
/// (the caller has checked that it is alive).
pub fn names(sandbox_dir: &Path, supervisor_pid: u32) -> bool {
    supervisor_pid > 0 && read(sandbox_dir) == Some(supervisor_pid)
}

/// True when the (reconciled) record is a running sandbox whose supervisor was asked to
/// drain.
pub fn of_record(home: &Home, rec: &Record) -> bool {
    rec.status == Status::Running && rec.supervisor_pid.is_some_and(|pid| names(&home.sandbox_dir(&rec.name), pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_parsed_strictly() {
        assert_eq!(parse(b"4242"), Some(4242));
        for bad in [&b""[..], b"0", b"-1", b"12 ", b"x", b"99999999999", b"12345678901234567"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_marker_counts_only_for_the_supervisor_it_names() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!names(dir.path(), 77));
        write(dir.path(), 77).unwrap();
        assert!(names(dir.path(), 77));
        // A later run's supervisor (another pid) is not draining.
        assert!(!names(dir.path(), 78));
        assert!(!names(dir.path(), 0));
        clear(dir.path()).unwrap();
        clear(dir.path()).unwrap(); // idempotent
        assert!(!names(dir.path(), 77));
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn only_running_records_drain() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::at(dir.path());
        let sb = home.sandbox_dir("box");
        std::fs::create_dir_all(&sb).unwrap();
        write(&sb, 4242).unwrap();
        let mut rec = Record {
            name: "box".into(),
            status: Status::Running,
            config: "{}".into(),
            labels: Default::default(),
            detached: false,
            owner_pid: None,
            supervisor_pid: Some(4242),
            supervisor_start: None,
            info: None,
            created_at: 0,
            updated_at: 0,
        };
        assert!(of_record(&home, &rec));
        rec.supervisor_pid = Some(4243);
        assert!(!of_record(&home, &rec));
        rec.supervisor_pid = Some(4242);
        rec.status = Status::Stopped;
        assert!(!of_record(&home, &rec));
    }
}
