//! Session routing between client connections and the single agent channel.
//!
//! Clients number their sessions freely; the router gives each a global id unique on
//! the agent channel and maps agent frames back. Only frames for live sessions are
//! forwarded, and a session ends at its `Exited`/`Error` frame.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use microsandbox_protocol::{BulkWindow, Frame};
use tokio::sync::mpsc;

use crate::flow::SessionFlow;

/// One frame from the agent on its way to a client's writer.
pub struct Routed {
    /// The frame, already carrying the client's session id.
    pub frame: Frame,
    /// The session's id on the agent channel (for credit).
    pub global: u32,
    /// Window bytes the frame holds (0 for final frames).
    pub cost: usize,
    pub flow: Arc<SessionFlow>,
}

/// Where a session's frames go. The queue is unbounded so the agent pump never waits on
/// a client; the session's flow window bounds what it holds.
#[derive(Clone)]
pub struct Route {
    pub client: mpsc::UnboundedSender<Routed>,
    pub local_id: u32,
    pub flow: Arc<SessionFlow>,
}

pub struct Router {
    inner: Mutex<Inner>,
    /// Where session output is also logged (unset in tests).
    log: std::sync::OnceLock<crate::logbook::LogSink>,
    /// Last time a frame crossed in either direction (for `idle_timeout`).
    last_activity: Mutex<std::time::Instant>,
}

impl Default for Router {
    fn default() -> Self {
        Router { inner: Mutex::default(), log: std::sync::OnceLock::new(), last_activity: Mutex::new(std::time::Instant::now()) }
    }
}

#[derive(Default)]
struct Inner {
    next: u32,
    routes: HashMap<u32, Route>,
    /// Set once by a drain: no session opens any more.
    draining: bool,
    /// Sessions the supervisor runs itself (the main process): they are not client
    /// activity, so they neither keep an `idle_timeout` sandbox alive nor hold up a drain.
    background: std::collections::HashSet<u32>,
    /// Transfer-disk windows lent to open filesystem sessions (transfer.rs).
    windows: HashMap<u32, BulkWindow>,
    /// Once-per-session frames already forwarded ([`Router::first`]), as bits.
    seen: HashMap<u32, u8>,
}

/// Frames an agent sends at most once per session; repeats are dropped so that a
/// hostile guest cannot queue unbounded control frames (they cost no flow-control window).
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum Once {
    Started = 1,
    StdinError = 2,
}

impl Router {
    /// Sends session output to `sink` from now on.
    pub fn set_log(&self, sink: crate::logbook::LogSink) {
        let _ = self.log.set(sink);
    }

    /// Logs output of guest session `session` (a global id), or with `None` a message of
    /// the supervisor's own, if a log is set.
    pub fn log(&self, source: &'static str, session: Option<u32>, bytes: &[u8]) {
        if let Some(l) = self.log.get() {
            l.record(source, session, bytes);
        }
    }

    /// Notes traffic; called for every frame relayed.
    pub fn touch(&self) {
        *self.last_activity.lock().unwrap() = std::time::Instant::now();
    }

    /// How long the sandbox has had no open client session and no traffic.
    pub fn idle_for(&self) -> std::time::Duration {
        let g = self.inner.lock().unwrap();
        if g.routes.keys().any(|id| !g.background.contains(id)) {
            return std::time::Duration::ZERO;
        }
        drop(g);
        self.last_activity.lock().unwrap().elapsed()
    }

    /// Refuses new sessions from now on. Checked under the same lock as [`Router::open`],
    /// so once this returns, [`Router::session_count`] only goes down.
    pub fn start_drain(&self) {
        self.inner.lock().unwrap().draining = true;
    }

    /// Client sessions still open (the supervisor's own, like the main process, are not
    /// waited for: they end with the VM).
    pub fn session_count(&self) -> usize {
        let g = self.inner.lock().unwrap();
        g.routes.keys().filter(|id| !g.background.contains(id)).count()
    }

    /// Numbers the next sessions after `base`. A resumed or forked VM's agent still runs
    /// the sessions of the supervisor it was saved from, numbered from 1: starting at a
    /// random base keeps new sessions apart from those.
    pub fn start_ids_after(&self, base: u32) {
        self.inner.lock().unwrap().next = base;
    }

    /// The id last given out (the base of the next, see [`Router::start_ids_after`]).
    pub fn last_id(&self) -> u32 {
        self.inner.lock().unwrap().next
    }

    /// Registers a session and returns its global id (never 0, which is the control id);
    /// `None` while draining.
    pub fn open(&self, route: Route) -> Option<u32> {
        let mut g = self.inner.lock().unwrap();
        if g.draining {
            return None;
        }
        loop {
            g.next = g.next.wrapping_add(1);
            if g.next != 0 && !g.routes.contains_key(&g.next) {
                break;
            }
        }
        let id = g.next;
        g.routes.insert(id, route);
        Some(id)
    }

    /// Registers a session the supervisor itself runs (see `Inner::background`);
    /// `None` while draining.
    pub fn open_background(&self, route: Route) -> Option<u32> {
        let id = self.open(route)?;
        self.inner.lock().unwrap().background.insert(id);
        Some(id)
    }

    /// True for a session opened with [`open_background`](Self::open_background).
    pub fn is_background(&self, id: u32) -> bool {
        self.inner.lock().unwrap().background.contains(&id)
    }

    pub fn get(&self, id: u32) -> Option<Route> {
        self.inner.lock().unwrap().routes.get(&id).cloned()
    }

    pub fn close(&self, id: u32) {
        let mut g = self.inner.lock().unwrap();
        g.routes.remove(&id);
        g.background.remove(&id);
        g.windows.remove(&id);
        g.seen.remove(&id);
    }

    /// True the first time open session `id` sends `what`; false for repeats and for
    /// sessions that are not open.
    pub fn first(&self, id: u32, what: Once) -> bool {
        let mut g = self.inner.lock().unwrap();
        if !g.routes.contains_key(&id) {
            return false;
        }
        let bits = g.seen.entry(id).or_default();
        let new = *bits & what as u8 == 0;
        *bits |= what as u8;
        new
    }

    /// Records the transfer-disk window lent to open session `id`.
    pub fn set_window(&self, id: u32, window: BulkWindow) {
        let mut g = self.inner.lock().unwrap();
        if g.routes.contains_key(&id) {
            g.windows.insert(id, window);
        }
    }

    /// The window lent to open session `id`, if any.
    pub fn window(&self, id: u32) -> Option<BulkWindow> {
        self.inner.lock().unwrap().windows.get(&id).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_nonzero() {
        let r = Router::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let a = r.open(Route { client: tx.clone(), local_id: 1, flow: Default::default() }).unwrap();
        let b = r.open(Route { client: tx, local_id: 1, flow: Default::default() }).unwrap();
        assert_ne!(a, b);
        assert!(a != 0 && b != 0);
        r.close(a);
        assert!(r.get(a).is_none());
        assert_eq!(r.get(b).unwrap().local_id, 1);
    }

    #[test]
    fn windows_belong_to_open_sessions_only() {
        let r = Router::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let a = r.open(Route { client: tx, local_id: 1, flow: Default::default() }).unwrap();
        let w = BulkWindow { offset: 0, slot_size: 4096, slots: 1 };
        r.set_window(a, w);
        assert_eq!(r.window(a), Some(w));
        r.close(a);
        assert_eq!(r.window(a), None);
        r.set_window(a, w);
        assert_eq!(r.window(a), None, "a closed session gets no window");
    }

    #[test]
    fn once_frames_pass_once_per_open_session() {
        let r = Router::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let a = r.open(Route { client: tx, local_id: 1, flow: Default::default() }).unwrap();
        assert!(r.first(a, Once::Started));
        assert!(!r.first(a, Once::Started));
        assert!(r.first(a, Once::StdinError));
        assert!(!r.first(a, Once::StdinError));
        assert!(!r.first(a + 1, Once::Started), "not an open session");
        r.close(a);
        assert!(!r.first(a, Once::StdinError));
    }

    #[test]
    fn a_drain_refuses_new_sessions_and_keeps_running_ones() {
        let r = Router::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let a = r.open(Route { client: tx.clone(), local_id: 1, flow: Default::default() }).unwrap();
        r.start_drain();
        assert!(r.open(Route { client: tx, local_id: 2, flow: Default::default() }).is_none());
        assert_eq!(r.session_count(), 1);
        r.close(a);
        assert_eq!(r.session_count(), 0);
    }

    #[test]
    fn background_sessions_are_neither_activity_nor_drained() {
        let r = Router::default();
        let (tx, _rx) = mpsc::unbounded_channel();
        let bg = r.open_background(Route { client: tx.clone(), local_id: 1, flow: Default::default() }).unwrap();
        assert!(r.is_background(bg));
        assert_eq!(r.session_count(), 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(r.idle_for() >= std::time::Duration::from_millis(20));
        let fg = r.open(Route { client: tx, local_id: 2, flow: Default::default() }).unwrap();
        assert_eq!(r.idle_for(), std::time::Duration::ZERO);
        assert_eq!(r.session_count(), 1);
        r.close(fg);
        r.close(bg);
        assert!(!r.is_background(bg));
    }
}
