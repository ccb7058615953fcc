//! Lends windows of the transfer disk (see `microsandbox::sandbox::transfer`) to
//! filesystem sessions, one session per window, so concurrent transfers never share bytes.
//!
//! A window is lent when a client asks for it in its `FsRequest` and stays lent until
//! both ends are done with it: the agent ended the session (its `FsDone`/`Error`, after
//! which it no longer touches the disk for it) *and* the client's connection closed
//! (after which the client no longer reads or writes its slots; it may still be copying
//! the last slots out after the agent finished). Only then can another session reuse it,
//! and its bytes are discarded (hole punched) so an idle sandbox keeps no transfer data on
//! the host. A guest that never ends a session keeps its window: it only slows its own
//! transfers down, since sessions without a window use frames.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use microsandbox::sandbox::transfer::TransferSpec;
use microsandbox_protocol::{BulkWindow, Frame, FsAck, FsBulk, Kind};

struct Lease {
    session: u32,
    agent_done: bool,
    client_done: bool,
}

pub struct Windows {
    spec: Option<TransferSpec>,
    /// The disk, to discard released windows; `None` when it cannot be opened.
    file: Option<File>,
    /// Lease of each window, by window number.
    leases: Mutex<Vec<Option<Lease>>>,
}

impl Windows {
    /// Windows of the disk described by `spec`; none without one.
    pub fn new(spec: Option<TransferSpec>) -> Windows {
        let file = spec.as_ref().and_then(|s| std::fs::OpenOptions::new().write(true).open(&s.path).ok());
        // A disk the supervisor cannot open was not prepared: lend nothing.
        let spec = spec.filter(|_| file.is_some());
        let n = spec.as_ref().map_or(0, |s| s.windows as usize);
        Windows { spec, file, leases: Mutex::new((0..n).map(|_| None).collect()) }
    }

    /// No transfer disk: every session uses frames.
    #[cfg(test)]
    pub fn none() -> Windows {
        Windows::new(None)
    }

    /// Lends a free window to `session`, if any.
    pub fn lend(&self, session: u32) -> Option<BulkWindow> {
        let spec = self.spec.as_ref()?;
        let mut leases = self.leases.lock().unwrap();
        let i = leases.iter().position(Option::is_none)?;
        leases[i] = Some(Lease { session, agent_done: false, client_done: false });
        spec.window(i as u32)
    }

    /// The agent ended `session` (it sends nothing more for it).
    pub fn agent_done(&self, session: u32) {
        self.mark(session, |l| l.agent_done = true);
    }

    /// The client of `session` went away (it touches its slots no more).
    pub fn client_done(&self, session: u32) {
        self.mark(session, |l| l.client_done = true);
    }

    fn mark(&self, session: u32, f: impl FnOnce(&mut Lease)) {
        let mut leases = self.leases.lock().unwrap();
        let Some(i) = leases.iter().position(|l| l.as_ref().is_some_and(|l| l.session == session)) else { return };
        let lease = leases[i].as_mut().expect("found above");
        f(lease);
        if lease.agent_done && lease.client_done {
            leases[i] = None;
            self.discard(i as u32);
        }
    }

    /// Frees the host blocks of window `i` (best effort: only disk space is at stake).
    fn discard(&self, i: u32) {
        let (Some(spec), Some(file)) = (&self.spec, &self.file) else { return };
        let Some(w) = spec.window(i) else { return };
        // SAFETY: fallocate on our own open fd, with offsets inside the file.
        unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                w.offset as libc::off_t,
                w.span() as libc::off_t,
            );
        }
    }

    #[cfg(test)]
    fn lent(&self) -> usize {
        self.leases.lock().unwrap().iter().filter(|l| l.is_some()).count()
    }
}

/// Checks an `FsBulk`/`FsAck` frame against the session's window: it must parse, the
/// session must have a window, and the slot and length must lie inside it. Used for frames
/// from clients and from the agent alike.
pub fn check_bulk(frame: &Frame, window: Option<BulkWindow>) -> Result<(), String> {
    let w = window.ok_or_else(|| format!("{:?} frame in a session without a transfer window", frame.kind))?;
    let (slot, len) = match frame.kind {
        Kind::FsBulk => frame.parse::<FsBulk>().map(|b| (b.slot, b.len)),
        _ => frame.parse::<FsAck>().map(|a| (a.slot, 0)),
    }
    .map_err(|e| e.to_string())?;
    w.locate(slot, len).map(drop).ok_or_else(|| {
        format!("{:?} names {len} bytes in slot {slot}, outside its window ({} slots of {} bytes)", frame.kind, w.slots, w.slot_size)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    fn disk(windows: u32) -> (tempfile::TempDir, TransferSpec) {
        let dir = tempfile::tempdir().unwrap();
        let spec = TransferSpec { path: dir.path().join("t.raw"), windows, slots: 2, slot_size: 64 << 10 };
        File::create(&spec.path).unwrap().set_len(spec.size()).unwrap();
        (dir, spec)
    }

    #[test]
    fn one_session_per_window_until_both_ends_are_done() {
        let (_dir, spec) = disk(2);
        let w = Windows::new(Some(spec));
        let a = w.lend(1).unwrap();
        let b = w.lend(2).unwrap();
        assert_ne!(a.offset, b.offset);
        assert!(w.lend(3).is_none(), "every window is lent");
        w.agent_done(1);
        assert!(w.lend(3).is_none(), "the client may still read the last slots");
        w.client_done(1);
        assert_eq!(w.lend(3), Some(a));
        // Ends in the other order, and marks for unknown sessions, change nothing else.
        w.client_done(2);
        w.agent_done(99);
        assert_eq!(w.lent(), 2);
        w.agent_done(2);
        assert_eq!(w.lent(), 1);
    }

    #[test]
    fn released_windows_give_their_space_back() {
        let (_dir, spec) = disk(1);
        let path = spec.path.clone();
        let w = Windows::new(Some(spec));
        let win = w.lend(1).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&vec![7u8; win.span() as usize], win.offset).unwrap();
        f.sync_all().unwrap();
        assert!(std::fs::metadata(&path).unwrap().blocks() > 0);
        w.agent_done(1);
        w.client_done(1);
        assert_eq!(std::fs::metadata(&path).unwrap().blocks(), 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), win.span());
    }

    #[test]
    fn no_disk_lends_nothing() {
        assert!(Windows::none().lend(1).is_none());
        let (_dir, mut spec) = disk(1);
        spec.path = spec.path.with_file_name("missing.raw");
        assert!(Windows::new(Some(spec)).lend(1).is_none());
    }
}
