//! Per-session output flow control: the agent side of the credit window.
//!
//! Every session may have at most [`WINDOW`] bytes of output frames (header + payload)
//! that the host has not yet credited back. A sender that would exceed it waits here, so
//! a host consumer that stops reading one session stalls only that session's output (its
//! pipes fill, then its process blocks) while the shared port keeps serving the others.
//!
//! Invariants: `used <= WINDOW` at all times; a closed window never blocks again, so a
//! finished or cancelled session's sender threads always return.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use microsandbox_protocol::{HEADER_LEN, WINDOW};

use crate::util::lock;

/// What one data frame of `payload` bytes costs against the window.
pub fn cost(payload: usize) -> usize {
    HEADER_LEN + payload
}

#[derive(Default)]
struct State {
    /// Bytes sent and not yet credited.
    used: usize,
    closed: bool,
    /// Senders currently waiting for credit.
    waiting: usize,
    /// When the current stall (some sender waiting) began.
    stalled_since: Option<Instant>,
    /// Total length of the stalls that have ended.
    stalled_total: Duration,
}

/// One session's window.
#[derive(Default)]
pub struct Window {
    state: Mutex<State>,
    credited: Condvar,
}

impl Window {
    /// Waits until `cost` more bytes fit, then charges them. False when the window was
    /// closed (the session is over): the caller must not send.
    pub fn acquire(&self, cost: usize) -> bool {
        // A frame larger than the window could never be sent; senders never build one
        // (MAX_CHUNK + header is far below WINDOW), so clamp rather than deadlock.
        let cost = cost.min(WINDOW as usize);
        let mut s = lock(&self.state);
        while !s.closed && s.used + cost > WINDOW as usize {
            if s.waiting == 0 {
                s.stalled_since = Some(Instant::now());
            }
            s.waiting += 1;
            s = self.credited.wait(s).unwrap_or_else(|e| e.into_inner());
            s.waiting -= 1;
            if s.waiting == 0 {
                if let Some(since) = s.stalled_since.take() {
                    s.stalled_total += since.elapsed();
                }
            }
        }
        if s.closed {
            return false;
        }
        s.used += cost;
        true
    }

    /// The host consumed `bytes`. More than was charged is clamped: a confused host can
    /// only reopen the window, never make it negative.
    pub fn credit(&self, bytes: usize) {
        let mut s = lock(&self.state);
        s.used = s.used.saturating_sub(bytes);
        self.credited.notify_all();
    }

    /// Ends the session's flow: waiting and future senders return false at once.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.credited.notify_all();
    }

    /// How long, in total, senders have waited for credit (including a current wait).
    pub fn stalled_time(&self) -> Duration {
        let s = lock(&self.state);
        s.stalled_total + s.stalled_since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// Windows of live sessions by id, so the port reader can route `Credit` frames.
#[derive(Default)]
pub struct Windows {
    table: Mutex<HashMap<u32, Arc<Window>>>,
}

impl Windows {
    /// A fresh window for session `id` (replacing any stale one).
    pub fn open(&self, id: u32) -> Arc<Window> {
        let w = Arc::new(Window::default());
        if let Some(old) = lock(&self.table).insert(id, w.clone()) {
            old.close();
        }
        w
    }

    /// Credits session `id`; unknown ids (finished sessions) are ignored.
    pub fn credit(&self, id: u32, bytes: usize) {
        if let Some(w) = lock(&self.table).get(&id) {
            w.credit(bytes);
        }
    }

    /// Closes and forgets session `id`'s window.
    pub fn close(&self, id: u32) {
        if let Some(w) = lock(&self.table).remove(&id) {
            w.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const W: usize = WINDOW as usize;

    #[test]
    fn charges_up_to_the_window_then_waits_for_credit() {
        let w = Arc::new(Window::default());
        assert!(w.acquire(W - 100));
        assert!(w.acquire(100)); // exactly full
        let w2 = w.clone();
        let sender = std::thread::spawn(move || w2.acquire(cost(10)));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!sender.is_finished(), "a full window must block the sender");
        assert_eq!(lock(&w.state).waiting, 1);
        w.credit(cost(9)); // not enough yet
        std::thread::sleep(Duration::from_millis(50));
        assert!(!sender.is_finished());
        w.credit(1);
        assert!(sender.join().unwrap());
        assert_eq!(lock(&w.state).waiting, 0);
        assert_eq!(lock(&w.state).used, W);
        // The ~100 ms the sender waited is on record, and no longer grows.
        let stalled = w.stalled_time();
        assert!(stalled >= Duration::from_millis(90), "{stalled:?}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(w.stalled_time(), stalled);
    }

    #[test]
    fn over_credit_is_clamped() {
        let w = Window::default();
        assert!(w.acquire(1000));
        w.credit(1 << 40);
        assert_eq!(lock(&w.state).used, 0);
        // The window is still exactly WINDOW wide, not wider.
        assert!(w.acquire(W));
        assert_eq!(lock(&w.state).used, W);
    }

    #[test]
    fn close_releases_waiters_and_refuses_new_sends() {
        let windows = Arc::new(Windows::default());
        let w = windows.open(7);
        assert!(w.acquire(W));
        let w2 = w.clone();
        let sender = std::thread::spawn(move || w2.acquire(cost(1)));
        std::thread::sleep(Duration::from_millis(50));
        windows.close(7);
        assert!(!sender.join().unwrap());
        assert!(!w.acquire(1));
        // Credit for a finished session is ignored.
        windows.credit(7, 10);
    }

    #[test]
    fn credit_reaches_the_right_session() {
        let windows = Windows::default();
        let a = windows.open(1);
        let b = windows.open(2);
        assert!(a.acquire(W) && b.acquire(W));
        windows.credit(2, W);
        assert_eq!(lock(&a.state).used, W);
        assert_eq!(lock(&b.state).used, 0);
    }
}
