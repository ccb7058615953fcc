//! The control socket: clients (the Ruby extension, in this or another process) open
//! sessions, send stdin and signals, ask for info, or stop the sandbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use microsandbox_protocol::{
    read_frame_async, write_frame_async, BulkWindow, ErrorMsg, Frame, FsRequest, FsWindow, Info, Kind, SignalMsg,
    StopRequest, Stopped, DRAINING,
};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::flow::Credits;
use crate::router::{Route, Routed, Router};
use crate::transfer::{check_bulk, Windows};

/// Answers to a client's own requests (info, errors…) queued before its reader waits.
/// Session output does not go through here but through the routed queue (flow.rs).
const REPLY_QUEUE: usize = 64;

/// A stop request and where to answer it.
pub type StopTicket = (StopRequest, oneshot::Sender<Stopped>);

/// Shared by every client connection.
#[derive(Clone)]
pub struct Ctx {
    pub router: Arc<Router>,
    /// Windows of the transfer disk, lent to filesystem sessions that ask.
    pub windows: Arc<Windows>,
    pub to_agent: mpsc::Sender<Frame>,
    pub info: Info,
    pub stop: mpsc::Sender<StopTicket>,
    /// Set when a client detaches the sandbox from its owner process.
    pub detached: tokio::sync::watch::Sender<bool>,
    /// The NIC's byte counters (`None`: no NIC), reported live in `Info` answers.
    pub net: Option<Arc<microsandbox_network::stack::Counters>>,
}

/// Accepts clients forever.
pub async fn serve(listener: UnixListener, ctx: Ctx) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(client(stream, ctx.clone()));
    }
}

fn protocol_error(id: u32, message: &str) -> Frame {
    Frame::json(id, Kind::Error, &ErrorMsg { code: "protocol".into(), message: message.into(), errno: None })
}

fn draining_error(id: u32, name: &str) -> Frame {
    let message = format!(
        "sandbox {name:?} is draining: it finishes the commands already running, then stops, and accepts no new ones"
    );
    Frame::json(id, Kind::Error, &ErrorMsg { code: DRAINING.into(), message, errno: None })
}

/// How often a drain checks whether the running sessions have ended.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Waits until no session is open (or the drain deadline passed), then stops the sandbox
/// like a `Stop` would and answers `Stopped` to the client if it is still there.
async fn drain_then_stop(ctx: Ctx, req: StopRequest, tx: mpsc::Sender<Frame>, id: u32) {
    let deadline = req.drain_timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    while ctx.router.session_count() > 0 && deadline.is_none_or(|d| tokio::time::Instant::now() < d) {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let (done_tx, done_rx) = oneshot::channel();
    if ctx.stop.send((req, done_tx)).await.is_ok() {
        if let Ok(stopped) = done_rx.await {
            let _ = tx.send(Frame::json(id, Kind::Stopped, &stopped)).await;
        }
    }
}

/// Writes to one client: its replies and its sessions' output. Returns credit to the
/// agent as output is written. Once the client is gone, output is discarded (and still
/// credited) until its sessions end, so a killed session can drain to its final frame.
/// Ends when the client and all its sessions are done.
async fn client_writer(
    mut wr: OwnedWriteHalf,
    mut replies: mpsc::Receiver<Frame>,
    mut routed: mpsc::UnboundedReceiver<Routed>,
    to_agent: mpsc::Sender<Frame>,
) {
    let mut writable = true;
    let (mut routed_open, mut replies_open) = (true, true);
    let mut credits = Credits::new(to_agent);
    while routed_open || replies_open {
        tokio::select! {
            r = routed.recv(), if routed_open => {
                let Some(r) = r else {
                    routed_open = false;
                    continue;
                };
                if writable && write_frame_async(&mut wr, &r.frame).await.is_err() {
                    writable = false;
                }
                credits.consumed(&r).await;
            }
            f = replies.recv(), if replies_open => match f {
                Some(f) => {
                    if writable && write_frame_async(&mut wr, &f).await.is_err() {
                        writable = false;
                    }
                }
                None => replies_open = false,
            },
        }
    }
}

async fn client(stream: UnixStream, ctx: Ctx) {
    let (mut rd, wr) = stream.into_split();
    let (tx, replies) = mpsc::channel::<Frame>(REPLY_QUEUE);
    let (routed_tx, routed) = mpsc::unbounded_channel::<Routed>();
    tokio::spawn(client_writer(wr, replies, routed, ctx.to_agent.clone()));
    // local id → global id and transfer window, for this connection's sessions.
    let mut sessions: HashMap<u32, (u32, Option<BulkWindow>)> = HashMap::new();
    while let Ok(Some(frame)) = read_frame_async(&mut rd).await {
        ctx.router.touch();
        match frame.kind {
            Kind::Exec | Kind::FsRequest => {
                let fs_req = if frame.kind == Kind::FsRequest {
                    match frame.parse::<FsRequest>() {
                        Ok(r) => Some(r),
                        Err(e) => {
                            let _ = tx.send(protocol_error(frame.id, &e.to_string())).await;
                            continue;
                        }
                    }
                } else {
                    None
                };
                if sessions.get(&frame.id).is_some_and(|(g, _)| ctx.router.get(*g).is_some()) {
                    let _ = tx.send(protocol_error(frame.id, "session id already in use")).await;
                    continue;
                }
                let local = frame.id;
                let flow: Arc<crate::flow::SessionFlow> = Default::default();
                let route = Route { client: routed_tx.clone(), local_id: local, flow: flow.clone() };
                let Some(global) = ctx.router.open(route) else {
                    let _ = tx.send(draining_error(local, &ctx.info.name)).await;
                    continue;
                };
                let (frame, window) = match fs_req {
                    Some(mut req) => {
                        // Only the supervisor places sessions on the transfer disk.
                        req.window = if req.bulk { ctx.windows.lend(global) } else { None };
                        if let Some(w) = req.window {
                            ctx.router.set_window(global, w);
                        }
                        if req.bulk {
                            // Through the session's own queue, so it precedes the session's
                            // frames. It costs nothing against the window (and the credit
                            // batcher has nothing yet for a session that has not started).
                            let answer = Frame::json(local, Kind::FsWindow, &FsWindow { window: req.window });
                            let _ = routed_tx.send(Routed { frame: answer, global, cost: 0, flow });
                        }
                        (Frame::json(global, Kind::FsRequest, &req), req.window)
                    }
                    None => (Frame { id: global, ..frame }, None),
                };
                if let Some((old, _)) = sessions.insert(local, (global, window)) {
                    // Reusing an id means the client is done with the old session.
                    ctx.windows.client_done(old);
                }
                let _ = ctx.to_agent.send(frame).await;
            }
            Kind::FsBulk | Kind::FsAck => {
                let Some(&(g, window)) = sessions.get(&frame.id) else { continue };
                if let Err(why) = check_bulk(&frame, window) {
                    let _ = tx.send(protocol_error(frame.id, &why)).await;
                    continue;
                }
                // A session the agent already ended ignores it (e.g. the ack of its last slot).
                let _ = ctx.to_agent.send(Frame { id: g, ..frame }).await;
            }
            Kind::Stdin | Kind::StdinEof | Kind::Signal | Kind::Resize | Kind::FsData | Kind::FsEof => {
                if let Some(&(g, _)) = sessions.get(&frame.id) {
                    let _ = ctx.to_agent.send(Frame { id: g, ..frame }).await;
                }
            }
            Kind::Detach => {
                ctx.detached.send_replace(true);
                let _ = tx.send(Frame::data(frame.id, Kind::Detach, Vec::new())).await;
            }
            Kind::Info => {
                let mut info = ctx.info.clone();
                if let Some(c) = &ctx.net {
                    use std::sync::atomic::Ordering::Relaxed;
                    info.net = Some(microsandbox_protocol::NetCounters { rx_bytes: c.rx_bytes.load(Relaxed), tx_bytes: c.tx_bytes.load(Relaxed) });
                }
                let _ = tx.send(Frame::json(frame.id, Kind::Info, &info)).await;
            }
            Kind::Fork => {
                let answer = match frame.parse::<microsandbox_protocol::ForkRequest>() {
                    Ok(req) => match crate::template::fork(req).await {
                        Ok(()) => Frame::data(frame.id, Kind::Fork, Vec::new()),
                        Err(why) => Frame::json(frame.id, Kind::Error, &microsandbox_protocol::ErrorMsg { code: "fork-failed".into(), message: why, errno: None }),
                    },
                    Err(e) => protocol_error(frame.id, &e.to_string()),
                };
                let _ = tx.send(answer).await;
            }
            Kind::Stop => match frame.parse::<StopRequest>() {
                Ok(req) if req.drain => {
                    // Refuse new sessions now; the stop itself waits in its own task, so
                    // it goes on after this client disconnects (request_drain returns at once).
                    ctx.router.start_drain();
                    tokio::spawn(drain_then_stop(ctx.clone(), req, tx.clone(), frame.id));
                }
                Ok(req) => {
                    let (done_tx, done_rx) = oneshot::channel();
                    if ctx.stop.send((req, done_tx)).await.is_ok() {
                        if let Ok(stopped) = done_rx.await {
                            let _ = tx.send(Frame::json(frame.id, Kind::Stopped, &stopped)).await;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(protocol_error(frame.id, &e.to_string())).await;
                }
            },
            _ => {
                let _ = tx.send(protocol_error(frame.id, "unexpected frame kind from a client")).await;
            }
        }
    }
    // The client went away: kill whatever it still had running. The routes stay open
    // until the final frames, which the writer discards while returning credit, so
    // output waiting for credit in the guest drains and the sessions can end.
    for (_, (global, _)) in sessions {
        ctx.windows.client_done(global);
        if ctx.router.get(global).is_some() {
            let kill = Frame::json(global, Kind::Signal, &SignalMsg { signal: libc::SIGKILL });
            let _ = ctx.to_agent.send(kill).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use microsandbox::sandbox::transfer::TransferSpec;
    use microsandbox_protocol::{FsAck, FsBulk, FsOp};
    use std::time::Duration;

    struct Setup {
        _dir: tempfile::TempDir,
        ctx: Ctx,
        agent: mpsc::Receiver<Frame>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let spec = TransferSpec { path: dir.path().join("t.raw"), windows: 1, slots: 2, slot_size: 64 << 10 };
        std::fs::File::create(&spec.path).unwrap().set_len(spec.size()).unwrap();
        let (to_agent, agent) = mpsc::channel(16);
        let (stop, _) = mpsc::channel(1);
        let info = Info {
            name: "t".into(),
            vmm: "qemu".into(),
            accel: "tcg".into(),
            vmm_pid: 0,
            supervisor_pid: 0,
            kernel: String::new(),
            boot_ms: 0,
            start: "booted".into(),
            template: None,
            net: None,
            boot_phases: Vec::new(),
        };
        let ctx = Ctx {
            router: Arc::new(Router::default()),
            windows: Arc::new(Windows::new(Some(spec))),
            to_agent,
            info,
            stop,
            detached: tokio::sync::watch::channel(false).0,
            net: None,
        };
        Setup { _dir: dir, ctx, agent }
    }

    async fn recv(s: &mut UnixStream) -> Frame {
        tokio::time::timeout(Duration::from_secs(5), read_frame_async(s)).await.unwrap().unwrap().unwrap()
    }

    fn fs_request(bulk: bool, window: Option<BulkWindow>) -> FsRequest {
        FsRequest { op: FsOp::Read, path: "/f".into(), path2: None, recursive: false, parents: false, mode: None, bulk, window }
    }

    #[tokio::test]
    async fn windows_are_lent_by_the_supervisor_only_and_checked_both_ways() {
        let mut s = setup();
        let (mut c, server) = UnixStream::pair().unwrap();
        let task = tokio::spawn(client(server, s.ctx.clone()));

        // A client cannot choose its window: the supervisor's replaces it.
        let forged = BulkWindow { offset: 1 << 40, slot_size: 1 << 30, slots: 9 };
        write_frame_async(&mut c, &Frame::json(1, Kind::FsRequest, &fs_request(true, Some(forged)))).await.unwrap();
        let answer = recv(&mut c).await;
        let lent = answer.parse::<FsWindow>().unwrap().window.expect("a free window");
        assert_ne!(lent, forged);
        let to_agent = s.agent.recv().await.unwrap();
        let global = to_agent.id;
        assert_eq!(to_agent.parse::<FsRequest>().unwrap().window, Some(lent));

        // The only window is taken: the next bulk session gets none; a plain one no answer.
        write_frame_async(&mut c, &Frame::json(2, Kind::FsRequest, &fs_request(true, None))).await.unwrap();
        assert_eq!(recv(&mut c).await.parse::<FsWindow>().unwrap().window, None);
        assert_eq!(s.agent.recv().await.unwrap().parse::<FsRequest>().unwrap().window, None);
        write_frame_async(&mut c, &Frame::json(3, Kind::FsRequest, &fs_request(false, Some(forged)))).await.unwrap();
        assert_eq!(s.agent.recv().await.unwrap().parse::<FsRequest>().unwrap().window, None);

        // Slots outside the window, or in a session without one, never reach the agent.
        for (id, f) in [
            (1, Frame::json(1, Kind::FsBulk, &FsBulk { slot: 2, len: 1 })),
            (1, Frame::json(1, Kind::FsBulk, &FsBulk { slot: 0, len: (64 << 10) + 1 })),
            (1, Frame::json(1, Kind::FsAck, &FsAck { slot: 5 })),
            (2, Frame::json(2, Kind::FsBulk, &FsBulk { slot: 0, len: 1 })),
        ] {
            write_frame_async(&mut c, &f).await.unwrap();
            let e = recv(&mut c).await;
            assert_eq!((e.id, e.kind), (id, Kind::Error));
        }
        write_frame_async(&mut c, &Frame::json(1, Kind::FsBulk, &FsBulk { slot: 1, len: 10 })).await.unwrap();
        let fwd = s.agent.recv().await.unwrap();
        assert_eq!((fwd.id, fwd.kind), (global, Kind::FsBulk));

        // The window comes back once the client left and the agent ended the session.
        drop(c);
        task.await.unwrap();
        assert!(s.ctx.windows.lend(100).is_none(), "the agent has not ended the session");
        s.ctx.windows.agent_done(global);
        assert_eq!(s.ctx.windows.lend(100), Some(lent));
    }
}
