//! The control socket: clients (the Ruby extension, in this or another process) open
//! sessions, send stdin and signals, ask for info, or stop the sandbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use microsandbox_protocol::{
    read_frame_async, write_frame_async, ErrorMsg, Frame, FsRequest, Info, Kind, SignalMsg, StopRequest, Stopped,
    DRAINING,
};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::flow::Credits;
use crate::router::{Route, Routed, Router};

/// Answers to a client's own requests (info, errors…) queued before its reader waits.
/// Session output does not go through here but through the routed queue (flow.rs).
const REPLY_QUEUE: usize = 64;

/// A stop request and where to answer it.
pub type StopTicket = (StopRequest, oneshot::Sender<Stopped>);

/// Shared by every client connection.
#[derive(Clone)]
pub struct Ctx {
    pub router: Arc<Router>,
    pub to_agent: mpsc::Sender<Frame>,
    pub info: Info,
    pub stop: mpsc::Sender<StopTicket>,
    /// Set when a client detaches the sandbox from its owner process.
    pub detached: tokio::sync::watch::Sender<bool>,
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
    // local id → global id, for this connection's sessions.
    let mut sessions: HashMap<u32, u32> = HashMap::new();
    while let Ok(Some(frame)) = read_frame_async(&mut rd).await {
        ctx.router.touch();
        match frame.kind {
            Kind::Exec | Kind::FsRequest => {
                if frame.kind == Kind::FsRequest {
                    if let Err(e) = frame.parse::<FsRequest>() {
                        let _ = tx.send(protocol_error(frame.id, &e.to_string())).await;
                        continue;
                    }
                }
                if sessions.get(&frame.id).is_some_and(|g| ctx.router.get(*g).is_some()) {
                    let _ = tx.send(protocol_error(frame.id, "session id already in use")).await;
                    continue;
                }
                let route = Route { client: routed_tx.clone(), local_id: frame.id, flow: Default::default() };
                let Some(global) = ctx.router.open(route) else {
                    let _ = tx.send(draining_error(frame.id, &ctx.info.name)).await;
                    continue;
                };
                sessions.insert(frame.id, global);
                let _ = ctx.to_agent.send(Frame { id: global, ..frame }).await;
            }
            Kind::Stdin | Kind::StdinEof | Kind::Signal | Kind::Resize | Kind::FsData | Kind::FsEof => {
                if let Some(&g) = sessions.get(&frame.id) {
                    let _ = ctx.to_agent.send(Frame { id: g, ..frame }).await;
                }
            }
            Kind::Detach => {
                ctx.detached.send_replace(true);
                let _ = tx.send(Frame::data(frame.id, Kind::Detach, Vec::new())).await;
            }
            Kind::Info => {
                let _ = tx.send(Frame::json(frame.id, Kind::Info, &ctx.info)).await;
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
    for (_, global) in sessions {
        if ctx.router.get(global).is_some() {
            let kill = Frame::json(global, Kind::Signal, &SignalMsg { signal: libc::SIGKILL });
            let _ = ctx.to_agent.send(kill).await;
        }
    }
}
