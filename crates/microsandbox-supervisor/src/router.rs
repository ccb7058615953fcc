//! Session routing between client connections and the single agent channel.
//!
//! Clients number their sessions freely; the router gives each a global id unique on
//! the agent channel and maps agent frames back. Only frames for live sessions are
//! forwarded, and a session ends at its `Exited`/`Error` frame.

use std::collections::HashMap;
use std::sync::Mutex;

use microsandbox_protocol::Frame;
use tokio::sync::mpsc;

/// Where a session's frames go.
#[derive(Clone)]
pub struct Route {
    pub client: mpsc::Sender<Frame>,
    pub local_id: u32,
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
}

impl Router {
    /// Sends session output to `sink` from now on.
    pub fn set_log(&self, sink: crate::logbook::LogSink) {
        let _ = self.log.set(sink);
    }

    /// Logs session output, if a log is set.
    pub fn log(&self, source: &'static str, bytes: &[u8]) {
        if let Some(l) = self.log.get() {
            l.record(source, bytes);
        }
    }

    /// Notes traffic; called for every frame relayed.
    pub fn touch(&self) {
        *self.last_activity.lock().unwrap() = std::time::Instant::now();
    }

    /// How long the sandbox has had no open session and no traffic.
    pub fn idle_for(&self) -> std::time::Duration {
        if !self.inner.lock().unwrap().routes.is_empty() {
            return std::time::Duration::ZERO;
        }
        self.last_activity.lock().unwrap().elapsed()
    }

    /// Refuses new sessions from now on. Checked under the same lock as [`Router::open`],
    /// so once this returns, [`Router::session_count`] only goes down.
    pub fn start_drain(&self) {
        self.inner.lock().unwrap().draining = true;
    }

    /// Sessions still open.
    pub fn session_count(&self) -> usize {
        self.inner.lock().unwrap().routes.len()
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

    pub fn get(&self, id: u32) -> Option<Route> {
        self.inner.lock().unwrap().routes.get(&id).cloned()
    }

    pub fn close(&self, id: u32) {
        self.inner.lock().unwrap().routes.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_nonzero() {
        let r = Router::default();
        let (tx, _rx) = mpsc::channel(1);
        let a = r.open(Route { client: tx.clone(), local_id: 1 }).unwrap();
        let b = r.open(Route { client: tx, local_id: 1 }).unwrap();
        assert_ne!(a, b);
        assert!(a != 0 && b != 0);
        r.close(a);
        assert!(r.get(a).is_none());
        assert_eq!(r.get(b).unwrap().local_id, 1);
    }

    #[test]
    fn a_drain_refuses_new_sessions_and_keeps_running_ones() {
        let r = Router::default();
        let (tx, _rx) = mpsc::channel(1);
        let a = r.open(Route { client: tx.clone(), local_id: 1 }).unwrap();
        r.start_drain();
        assert!(r.open(Route { client: tx, local_id: 2 }).is_none());
        assert_eq!(r.session_count(), 1);
        r.close(a);
        assert_eq!(r.session_count(), 0);
    }
}
