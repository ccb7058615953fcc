//! Persistent sandbox records in `<home>/state.db` (SQLite through `rusqlite`).
//!
//! SQLite gives atomic name claims and consistent reads across threads and processes
//! without a daemon. Liveness is never trusted from the table alone: a record says which
//! supervisor (pid + kernel start time, so a reused pid is not mistaken for it) runs the
//! sandbox, and every read reconciles a `running` record whose supervisor is gone to
//! `stopped`. That is what makes the state correct after a crash of the owner or the
//! supervisor.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::paths::Home;

/// Lifecycle state of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Claimed by a create/start that has not finished booting.
    Starting,
    Running,
    Stopped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopped => "stopped",
        }
    }
    fn parse(s: &str) -> Status {
        match s {
            "starting" => Status::Starting,
            "running" => Status::Running,
            _ => Status::Stopped,
        }
    }
}

/// One sandbox as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub status: Status,
    /// The create options, as JSON (so `start` can boot it again).
    pub config: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub detached: bool,
    /// The process that created/started it (for non-detached sandboxes, its owner).
    pub owner_pid: Option<u32>,
    pub supervisor_pid: Option<u32>,
    /// Kernel start time (clock ticks) of the supervisor, to tell a reused pid apart.
    pub supervisor_start: Option<u64>,
    /// JSON of the supervisor's `Info` while running.
    pub info: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Start time (field 22 of /proc/<pid>/stat) of a live, non-zombie process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

fn alive(pid: Option<u32>, start: Option<u64>) -> bool {
    match (pid, start) {
        (Some(p), Some(s)) => process_start_time(p) == Some(s),
        (Some(p), None) => process_start_time(p).is_some(),
        _ => false,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::Runtime(format!("sandbox state database: {e}"))
}

/// An open state database.
pub struct StateDb {
    conn: Connection,
}

/// Run at every open: idempotent.
const SCHEMA: &str = "PRAGMA journal_mode=WAL;
     CREATE TABLE IF NOT EXISTS sandboxes (
       name TEXT PRIMARY KEY,
       status TEXT NOT NULL,
       config TEXT NOT NULL,
       labels TEXT NOT NULL DEFAULT '{}',
       detached INTEGER NOT NULL DEFAULT 0,
       owner_pid INTEGER,
       supervisor_pid INTEGER,
       supervisor_start INTEGER,
       info TEXT,
       created_at INTEGER NOT NULL,
       updated_at INTEGER NOT NULL
     );";

const COLUMNS: &str =
    "name, status, config, labels, detached, owner_pid, supervisor_pid, supervisor_start, info, created_at, updated_at";

impl StateDb {
    /// Opens (creating if needed) `<home>/state.db`.
    pub fn open(home: &Home) -> Result<StateDb> {
        std::fs::create_dir_all(home.root())
            .map_err(|e| Error::Io { context: format!("creating {}", home.root().display()), source: e })?;
        StateDb::open_at(&home.root().join("state.db"))
    }

    pub fn open_at(path: &Path) -> Result<StateDb> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
        // Switching a fresh database to WAL needs an exclusive lock, and SQLite reports
        // SQLITE_BUSY for it at once, without the busy handler, while another process opens
        // the same new file (seen: two processes creating their first sandboxes together).
        // The mode is persistent, so only the first opens can collide; retry them briefly.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match conn.execute_batch(SCHEMA) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if matches!(e.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r.map_err(db_err)?,
            }
        }
        Ok(StateDb { conn })
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
        let labels: String = r.get(3)?;
        Ok(Record {
            name: r.get(0)?,
            status: Status::parse(&r.get::<_, String>(1)?),
            config: r.get(2)?,
            labels: serde_json::from_str(&labels).unwrap_or_default(),
            detached: r.get::<_, i64>(4)? != 0,
            owner_pid: r.get(5)?,
            supervisor_pid: r.get(6)?,
            supervisor_start: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
            info: r.get(8)?,
            created_at: r.get(9)?,
            updated_at: r.get(10)?,
        })
    }

    /// A record whose processes are gone is stopped, whatever the table said.
    fn reconcile(&self, mut rec: Record) -> Result<Record> {
        let stale = match rec.status {
            Status::Running => !alive(rec.supervisor_pid, rec.supervisor_start),
            // A claim whose creator died before the supervisor was recorded.
            Status::Starting => !alive(rec.supervisor_pid, rec.supervisor_start) && !alive(rec.owner_pid, None),
            Status::Stopped => false,
        };
        if stale {
            self.conn
                .execute(
                    "UPDATE sandboxes SET status='stopped', supervisor_pid=NULL, supervisor_start=NULL, updated_at=?2
                     WHERE name=?1 AND status=?3",
                    params![rec.name, now(), rec.status.as_str()],
                )
                .map_err(db_err)?;
            rec.status = Status::Stopped;
            rec.supervisor_pid = None;
            rec.supervisor_start = None;
        }
        Ok(rec)
    }

    /// The record named `name`, reconciled.
    pub fn get(&self, name: &str) -> Result<Option<Record>> {
        let rec = self
            .conn
            .query_row(&format!("SELECT {COLUMNS} FROM sandboxes WHERE name=?1"), [name], Self::row)
            .optional()
            .map_err(db_err)?;
        rec.map(|r| self.reconcile(r)).transpose()
    }

    /// Every record, reconciled, by name.
    pub fn list(&self) -> Result<Vec<Record>> {
        let mut stmt = self.conn.prepare(&format!("SELECT {COLUMNS} FROM sandboxes ORDER BY name")).map_err(db_err)?;
        let rows: Vec<Record> = stmt.query_map([], Self::row).map_err(db_err)?.collect::<rusqlite::Result<_>>().map_err(db_err)?;
        rows.into_iter().map(|r| self.reconcile(r)).collect()
    }

    /// Claims `name` for a new sandbox. Fails when a record exists, unless it is stopped
    /// and `replace_stopped` is set (then the old record is overwritten).
    pub fn claim_new(
        &mut self,
        name: &str,
        config: &str,
        labels: &std::collections::BTreeMap<String, String>,
        detached: bool,
    ) -> Result<()> {
        let existing = self.get(name)?;
        if let Some(rec) = existing {
            return Err(match rec.status {
                Status::Stopped => Error::SandboxAlreadyExists(format!(
                    "a stopped sandbox named {name:?} exists; start it with Sandbox.start, remove it with Sandbox.remove, or pass replace: true"
                )),
                _ => Error::SandboxAlreadyExists(format!(
                    "a sandbox named {name:?} is already running; stop it first, choose another name, or pass replace: true"
                )),
            });
        }
        let t = now();
        let inserted = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO sandboxes (name, status, config, labels, detached, owner_pid, created_at, updated_at)
                 VALUES (?1, 'starting', ?2, ?3, ?4, ?5, ?6, ?6)",
                params![name, config, serde_json::to_string(labels).unwrap(), detached as i64, std::process::id(), t],
            )
            .map_err(db_err)?;
        if inserted == 0 {
            return Err(Error::SandboxAlreadyExists(format!("a sandbox named {name:?} is being created by another process")));
        }
        Ok(())
    }

    /// Moves a stopped record back to `starting` for `start`. Fails if it is not stopped.
    pub fn claim_start(&self, name: &str) -> Result<Record> {
        let rec = self
            .get(name)?
            .ok_or_else(|| Error::SandboxNotFound(format!("no sandbox named {name:?}; create it with Sandbox.create")))?;
        let n = self
            .conn
            .execute(
                "UPDATE sandboxes SET status='starting', owner_pid=?2, updated_at=?3 WHERE name=?1 AND status='stopped'",
                params![name, std::process::id(), now()],
            )
            .map_err(db_err)?;
        if n == 0 {
            return Err(Error::SandboxStillRunning(format!("sandbox {name:?} is already running")));
        }
        let _ = rec;
        self.get(name)?.ok_or_else(|| Error::SandboxNotFound(format!("sandbox {name:?} vanished while starting")))
    }

    /// Records the booted supervisor.
    pub fn set_running(&self, name: &str, supervisor_pid: u32, info_json: &str, detached: bool) -> Result<()> {
        let start = process_start_time(supervisor_pid).map(|s| s as i64);
        self.conn
            .execute(
                "UPDATE sandboxes SET status='running', supervisor_pid=?2, supervisor_start=?3, info=?4, detached=?5, updated_at=?6
                 WHERE name=?1",
                params![name, supervisor_pid, start, info_json, detached as i64, now()],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_stopped(&self, name: &str) -> Result<()> {
        self.conn
            .execute(
                "UPDATE sandboxes SET status='stopped', supervisor_pid=NULL, supervisor_start=NULL, updated_at=?2 WHERE name=?1",
                params![name, now()],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn set_detached(&self, name: &str, detached: bool) -> Result<()> {
        self.conn
            .execute("UPDATE sandboxes SET detached=?2, updated_at=?3 WHERE name=?1", params![name, detached as i64, now()])
            .map_err(db_err)?;
        Ok(())
    }

    /// Deletes a record (the caller removes the files).
    pub fn delete(&self, name: &str) -> Result<()> {
        self.conn.execute("DELETE FROM sandboxes WHERE name=?1", [name]).map_err(db_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Several first opens of a new database at once (threads stand in for processes:
    /// each has its own connection) must all succeed.
    #[test]
    fn concurrent_first_opens_of_a_new_database() {
        for _ in 0..20 {
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("s.db");
            let gate = std::sync::Arc::new(std::sync::Barrier::new(6));
            let opens: Vec<_> = (0..6)
                .map(|_| {
                    let (p, g) = (path.clone(), gate.clone());
                    std::thread::spawn(move || {
                        g.wait();
                        StateDb::open_at(&p).map(|db| db.list().unwrap().len())
                    })
                })
                .collect();
            for t in opens {
                assert_eq!(t.join().unwrap().unwrap(), 0);
            }
        }
    }

    fn db() -> (tempfile::TempDir, StateDb) {
        let d = tempfile::tempdir().unwrap();
        let db = StateDb::open_at(&d.path().join("s.db")).unwrap();
        (d, db)
    }

    #[test]
    fn claim_is_exclusive_and_stale_running_is_reconciled() {
        let (_d, mut db) = db();
        let labels = Default::default();
        db.claim_new("a", "{}", &labels, false).unwrap();
        assert!(matches!(db.claim_new("a", "{}", &labels, false), Err(Error::SandboxAlreadyExists(_))));
        // Running under a pid that does not exist → reconciled to stopped.
        db.conn.execute("UPDATE sandboxes SET status='running', supervisor_pid=999999999", []).unwrap();
        assert_eq!(db.get("a").unwrap().unwrap().status, Status::Stopped);
    }

    #[test]
    fn running_under_a_live_process_stays_running() {
        let (_d, mut db) = db();
        db.claim_new("a", "{}", &Default::default(), true).unwrap();
        db.set_running("a", std::process::id(), "{}", true).unwrap();
        let rec = db.get("a").unwrap().unwrap();
        assert_eq!(rec.status, Status::Running);
        assert!(rec.detached);
        assert!(matches!(db.claim_start("a"), Err(Error::SandboxStillRunning(_))));
        db.set_stopped("a").unwrap();
        assert_eq!(db.claim_start("a").unwrap().status, Status::Starting);
    }

    #[test]
    fn start_of_unknown_is_not_found() {
        let (_d, db) = db();
        assert!(matches!(db.claim_start("nope"), Err(Error::SandboxNotFound(_))));
    }

    #[test]
    fn reused_pid_is_not_mistaken_for_the_supervisor() {
        let (_d, mut db) = db();
        db.claim_new("a", "{}", &Default::default(), false).unwrap();
        db.set_running("a", std::process::id(), "{}", false).unwrap();
        db.conn.execute("UPDATE sandboxes SET supervisor_start=1", []).unwrap();
        assert_eq!(db.get("a").unwrap().unwrap().status, Status::Stopped);
    }

    #[test]
    fn start_time_parses_odd_command_names() {
        assert!(process_start_time(std::process::id()).is_some());
        assert!(process_start_time(u32::MAX).is_none());
    }
}
