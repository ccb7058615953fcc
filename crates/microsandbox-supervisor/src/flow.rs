//! Per-session flow control, the supervisor's half (the agent's is its `flow.rs`).
//!
//! The agent keeps at most [`WINDOW`] bytes of a session's data frames uncredited. Here:
//! - the agent pump charges every data frame to its session's [`SessionFlow`] and hands
//!   it to the client's writer without ever waiting, so one client that does not read
//!   cannot stall the agent channel for the others;
//! - the client writer releases the charge once the frame is written to the client (or
//!   discarded because the client is gone) and returns credit to the agent in batches
//!   ([`CreditBatcher`]);
//! - a session holding more than [`WINDOW`] bytes can only come from an agent that ignores
//!   the window: that session is failed and killed, so host memory per session stays
//!   bounded by the window whatever the guest sends.
//!
//! No deadlock: at most [`CREDIT_BATCH`] bytes of written frames wait uncredited per
//! session, and that plus one full frame fits the window, so the agent can always send
//! once the client has taken what is queued.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use microsandbox_protocol::{Credit, Frame, Kind, HEADER_LEN, MAX_CHUNK, WINDOW};
use tokio::sync::mpsc;

use crate::router::{Route, Routed};

/// Written bytes of one session collected before a `Credit` is sent back.
pub const CREDIT_BATCH: usize = WINDOW as usize / 4;

const _: () = assert!(CREDIT_BATCH + HEADER_LEN + MAX_CHUNK <= WINDOW as usize);

/// What a frame from the agent costs against its session's window: header + payload for
/// data frames (transfer-disk `FsBulk`/`FsAck` included, so a guest flooding them is
/// bounded too), nothing for the final frames.
pub fn cost(kind: Kind, payload: usize) -> usize {
    match kind {
        Kind::Stdout | Kind::Stderr | Kind::FsData | Kind::FsBulk | Kind::FsAck => HEADER_LEN + payload,
        _ => 0,
    }
}

/// Bytes of one session received from the agent and not yet written to its client.
#[derive(Debug, Default)]
pub struct SessionFlow {
    queued: AtomicUsize,
}

/// The agent sent more than the window allows; the session's queued bytes with it.
#[derive(Debug, PartialEq, Eq)]
pub struct Overrun(pub usize);

impl SessionFlow {
    /// Charges a frame about to be queued. Fails (without charging) when it would take
    /// the session past [`WINDOW`].
    pub fn charge(&self, cost: usize) -> Result<(), Overrun> {
        let before = self.queued.fetch_add(cost, Ordering::AcqRel);
        if before + cost > WINDOW as usize {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            return Err(Overrun(before + cost));
        }
        Ok(())
    }

    /// The frame was written to the client or dropped.
    pub fn release(&self, cost: usize) {
        self.queued.fetch_sub(cost, Ordering::AcqRel);
    }

    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

/// Credit owed to the agent per session, returned once it reaches [`CREDIT_BATCH`].
#[derive(Debug, Default)]
pub struct CreditBatcher {
    pending: HashMap<u32, usize>,
}

impl CreditBatcher {
    /// Records `cost` bytes of session `global` as consumed; returns the credit to send
    /// now, if the batch is full.
    pub fn consumed(&mut self, global: u32, cost: usize) -> Option<u64> {
        let p = self.pending.entry(global).or_default();
        *p += cost;
        if *p >= CREDIT_BATCH {
            return Some(std::mem::take(p) as u64);
        }
        None
    }

    /// The session ended; what it was owed no longer matters.
    pub fn end(&mut self, global: u32) {
        self.pending.remove(&global);
    }
}

/// Returns credit to the agent for frames a consumer has taken (written to a client, or
/// read by the supervisor itself).
pub struct Credits {
    to_agent: mpsc::Sender<Frame>,
    batcher: CreditBatcher,
}

impl Credits {
    pub fn new(to_agent: mpsc::Sender<Frame>) -> Credits {
        Credits { to_agent, batcher: CreditBatcher::default() }
    }

    /// `r` has been consumed: releases its charge and credits the agent once a batch is
    /// full. Waits only on the agent queue, never on a client.
    pub async fn consumed(&mut self, r: &Routed) {
        r.flow.release(r.cost);
        if r.cost == 0 {
            self.batcher.end(r.global);
        } else if let Some(bytes) = self.batcher.consumed(r.global, r.cost) {
            let _ = self.to_agent.send(Frame::json(r.global, Kind::Credit, &Credit { bytes })).await;
        }
    }
}

/// The receiving end of a session the supervisor consumes itself (the main process, patch
/// operations): frames in order, credit returned as they are taken.
pub struct SessionRx {
    rx: mpsc::UnboundedReceiver<Routed>,
    credits: Credits,
}

impl SessionRx {
    pub async fn recv(&mut self) -> Option<Frame> {
        let r = self.rx.recv().await?;
        self.credits.consumed(&r).await;
        Some(r.frame)
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// A route for a supervisor-owned session and its receiving end.
pub fn session_channel(local_id: u32, to_agent: mpsc::Sender<Frame>) -> (Route, SessionRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let route = Route { client: tx, local_id, flow: Arc::default() };
    (route, SessionRx { rx, credits: Credits::new(to_agent) })
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = WINDOW as usize;

    #[test]
    fn charges_within_the_window_and_refuses_beyond() {
        let f = SessionFlow::default();
        let full = cost(Kind::Stdout, MAX_CHUNK);
        let mut sent = 0;
        while sent + full <= W {
            f.charge(full).unwrap();
            sent += full;
        }
        assert_eq!(f.queued(), sent);
        assert_eq!(f.charge(full), Err(Overrun(sent + full)));
        assert_eq!(f.queued(), sent, "a refused frame is not charged");
        f.release(full);
        f.charge(full).unwrap();
    }

    #[test]
    fn final_frames_are_free() {
        assert_eq!(cost(Kind::Exited, 100), 0);
        assert_eq!(cost(Kind::Error, 100), 0);
        assert_eq!(cost(Kind::FsDone, 100), 0);
        assert_eq!(cost(Kind::FsData, 100), 100 + HEADER_LEN);
        assert_eq!(cost(Kind::FsBulk, 20), 20 + HEADER_LEN);
        assert_eq!(cost(Kind::FsAck, 10), 10 + HEADER_LEN);
    }

    #[test]
    fn credit_is_returned_in_batches_per_session() {
        let mut b = CreditBatcher::default();
        let c = cost(Kind::Stdout, 1000);
        let mut returned = 0u64;
        let mut consumed = 0usize;
        for _ in 0..1000 {
            consumed += c;
            if let Some(n) = b.consumed(1, c) {
                assert!(n as usize >= CREDIT_BATCH);
                returned += n;
            }
            // Another session's credit never mixes in.
            assert_eq!(b.consumed(2, 1), None);
        }
        assert!(consumed - (returned as usize) < CREDIT_BATCH);
        b.end(1);
        assert_eq!(b.consumed(1, c), None);
    }

    #[tokio::test]
    async fn an_internal_consumer_returns_credit_as_it_reads() {
        let (to_agent, mut agent_rx) = mpsc::channel(4);
        let (route, mut rx) = session_channel(0, to_agent);
        let c = cost(Kind::Stdout, MAX_CHUNK);
        let frames = CREDIT_BATCH / c + 1;
        for _ in 0..frames {
            route.flow.charge(c).unwrap();
            let frame = Frame::data(0, Kind::Stdout, vec![0; MAX_CHUNK]);
            route.client.send(Routed { frame, global: 9, cost: c, flow: route.flow.clone() }).unwrap();
        }
        for _ in 0..frames {
            rx.recv().await.unwrap();
        }
        assert_eq!(route.flow.queued(), 0);
        let credit = agent_rx.try_recv().unwrap();
        assert_eq!((credit.id, credit.kind), (9, Kind::Credit));
        assert_eq!(credit.parse::<Credit>().unwrap().bytes as usize, frames * c);
    }

    #[test]
    fn an_agent_respecting_the_window_never_overruns() {
        // Agent and supervisor accounting driven together: the agent sends while its own
        // outstanding count allows, the client consumes everything written.
        let f = SessionFlow::default();
        let mut b = CreditBatcher::default();
        let mut agent_outstanding = 0usize;
        let mut queue = std::collections::VecDeque::new();
        let mut frames = 0;
        for round in 0..10_000usize {
            let len = 1 + (round * 7919) % MAX_CHUNK;
            let c = cost(Kind::Stdout, len);
            if agent_outstanding + c <= W {
                agent_outstanding += c;
                f.charge(c).expect("no overrun for a well-behaved agent");
                queue.push_back(c);
                frames += 1;
            }
            // The client takes one frame every other round.
            if round % 2 == 0 {
                if let Some(c) = queue.pop_front() {
                    f.release(c);
                    if let Some(n) = b.consumed(1, c) {
                        agent_outstanding -= n as usize;
                    }
                }
            }
        }
        // Never stuck: the agent sent about as often as the client consumed.
        assert!(frames > 4_000, "{frames}");
    }
}
