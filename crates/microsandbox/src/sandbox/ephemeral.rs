//! `ephemeral: true` (the reference gem's option): a sandbox that leaves nothing behind
//! once it has stopped, however it stopped.
//!
//! Two halves, because the sandbox can end while no engine is around (its owner died,
//! `max_duration`, a crash): the supervisor deletes the run's data as it exits — root
//! disk, logs, sockets, everything in the sandbox directory but the small stop record
//! (`SupervisorSpec::ephemeral`); and the engine deletes the record and what is left of
//! the directory the next time it looks the sandbox up by name or lists sandboxes
//! ([`purge`]). So after the stop, `get`/`list`/`start`/`remove` no longer find it and
//! `create` may reuse the name, while the handle that was already open (the owner's, or
//! one got before the stop) still reads how the run ended until that next lookup.

use crate::error::Result;
use crate::paths::Home;
use crate::state::{Record, StateDb, Status};

/// True when the stored create options say `ephemeral: true`.
pub fn is_ephemeral(rec: &Record) -> bool {
    serde_json::from_str::<serde_json::Value>(&rec.config)
        .ok()
        .and_then(|v| v.get("ephemeral").and_then(serde_json::Value::as_bool))
        .unwrap_or(false)
}

/// Deletes a stopped ephemeral sandbox's record and directory. Returns true when it did
/// (the caller must then treat the sandbox as absent).
pub fn purge(home: &Home, db: &StateDb, rec: &Record) -> Result<bool> {
    if rec.status != Status::Stopped || !is_ephemeral(rec) {
        return Ok(false);
    }
    db.delete(&rec.name)?;
    let _ = std::fs::remove_dir_all(home.sandbox_dir(&rec.name));
    Ok(true)
}

/// `recs` without the stopped ephemeral ones, which are purged.
pub fn sweep(home: &Home, db: &StateDb, recs: Vec<Record>) -> Result<Vec<Record>> {
    let mut kept = Vec::with_capacity(recs.len());
    for rec in recs {
        if !purge(home, db, &rec)? {
            kept.push(rec);
        }
    }
    Ok(kept)
}

/// What the supervisor of an ephemeral sandbox leaves in its directory at exit: only
/// the stop record (deleting the rest frees the disk at once).
pub fn clear_run_data(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if e.file_name() == std::ffi::OsStr::new(super::stop_record::STOP_RECORD_FILE) {
            continue;
        }
        let path = e.path();
        let _ = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clears_everything_but_the_stop_record() {
        let dir = std::env::temp_dir().join(format!("msb-ephemeral-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("root.ext4"), b"x").unwrap();
        std::fs::write(dir.join("sub/f"), b"x").unwrap();
        std::fs::write(dir.join(super::super::stop_record::STOP_RECORD_FILE), b"{}").unwrap();
        clear_run_data(&dir);
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("stop.json")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
