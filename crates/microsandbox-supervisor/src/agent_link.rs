//! The supervisor's end of the guest agent channel (QEMU's chardev socket).
//!
//! Everything read here comes from the guest and is untrusted: the codec bounds frame
//! sizes, kinds are checked against what an agent may send, payloads are parsed before
//! they are forwarded, frames for sessions that are not open are dropped, and a session
//! that exceeds its flow-control window is failed (flow.rs).

use std::sync::Arc;

use microsandbox_protocol::{
    read_frame_async, write_frame_async, ErrorMsg, Exited, Frame, FsDone, Kind, Ready, SignalMsg, Started, StdinError,
    PROTOCOL_VERSION, WINDOW,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::flow::{self, Overrun};
use crate::router::{Once, Routed, Router};
use crate::transfer::{check_bulk, Windows};

/// Frames queued toward the agent before senders wait.
const TO_AGENT_QUEUE: usize = 256;

/// Reads the agent's first frame, which must be a `Ready` of our protocol version.
pub async fn wait_ready(stream: &mut UnixStream) -> Result<Ready, String> {
    let frame = read_frame_async(stream)
        .await
        .map_err(|e| format!("agent channel: {e}"))?
        .ok_or("the agent channel closed before the agent was ready")?;
    if frame.kind != Kind::Ready {
        return Err(format!("the agent sent {:?} before Ready", frame.kind));
    }
    let ready: Ready = frame.parse().map_err(|e| e.to_string())?;
    if ready.protocol != PROTOCOL_VERSION {
        return Err(format!(
            "guest agent speaks protocol {} but this host speaks {PROTOCOL_VERSION}; reinstall the runtime (Microsandbox.install)",
            ready.protocol
        ));
    }
    Ok(ready)
}

/// Starts the writer task and returns the queue that feeds it.
pub fn spawn_writer(mut wr: OwnedWriteHalf) -> mpsc::Sender<Frame> {
    let (tx, mut rx) = mpsc::channel::<Frame>(TO_AGENT_QUEUE);
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if write_frame_async(&mut wr, &f).await.is_err() {
                break;
            }
        }
    });
    tx
}

/// Forwards agent frames to their sessions until the channel ends or the agent breaks
/// the protocol. Returns why it stopped. Never waits on a client: frames are charged to
/// their session's window and queued (see flow.rs); `to_agent` carries the kill of a
/// session whose agent overran its window. `windows` learns when the agent is done with a
/// session's transfer-disk window.
pub async fn pump_from_agent(
    mut rd: OwnedReadHalf,
    router: Arc<Router>,
    to_agent: mpsc::Sender<Frame>,
    windows: Arc<Windows>,
) -> String {
    loop {
        let frame = match read_frame_async(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => return "the agent channel closed".into(),
            Err(e) => return format!("the guest broke the agent protocol: {e}"),
        };
        let ends_session = match frame.kind {
            Kind::Stdout | Kind::Stderr | Kind::FsData | Kind::FsBulk | Kind::FsAck => false,
            Kind::FsDone => {
                if frame.parse::<FsDone>().is_err() {
                    return "the guest sent a malformed FsDone frame".into();
                }
                true
            }
            Kind::Exited => {
                if frame.parse::<Exited>().is_err() {
                    return "the guest sent a malformed Exited frame".into();
                }
                true
            }
            Kind::Error => {
                if frame.parse::<ErrorMsg>().is_err() {
                    return "the guest sent a malformed Error frame".into();
                }
                true
            }
            // Once per session each: they cost no window, so repeats are dropped.
            Kind::Started => {
                if frame.parse::<Started>().is_err() {
                    return "the guest sent a malformed Started frame".into();
                }
                if !router.first(frame.id, Once::Started) {
                    continue;
                }
                false
            }
            Kind::StdinError => {
                if frame.parse::<StdinError>().is_err() {
                    return "the guest sent a malformed StdinError frame".into();
                }
                if !router.first(frame.id, Once::StdinError) {
                    continue;
                }
                false
            }
            // Anything else is not the agent's to send; ignore it rather than trust it.
            _ => continue,
        };
        if ends_session {
            // The agent is done with the session's window even if its client is gone.
            windows.agent_done(frame.id);
        }
        let Some(route) = router.get(frame.id) else {
            // Output of a session this supervisor never opened: in a resumed or forked
            // guest, the sessions of the supervisor it was saved from (its main process,
            // commands left running). Nobody reads it; credit it back at once so such a
            // process never blocks on a full window. (`try_send`: the pump never waits.)
            if matches!(frame.kind, Kind::Stdout | Kind::Stderr) {
                let bytes = flow::cost(frame.kind, frame.payload.len()) as u64;
                let _ = to_agent.try_send(Frame::json(frame.id, Kind::Credit, &microsandbox_protocol::Credit { bytes }));
            }
            continue;
        };
        if matches!(frame.kind, Kind::FsBulk | Kind::FsAck) {
            // The client would refuse a slot outside the window too; a guest that names
            // one is broken or hostile either way.
            if let Err(why) = check_bulk(&frame, router.window(frame.id)) {
                return format!("the guest broke the transfer protocol: {why}");
            }
        }
        if !router.is_background(frame.id) {
            router.touch();
        }
        let global = frame.id;
        let cost = flow::cost(frame.kind, frame.payload.len());
        if let Err(Overrun(queued)) = route.flow.charge(cost) {
            // Only an agent ignoring the window gets here: fail this session, keep the rest.
            router.close(global);
            let msg = ErrorMsg {
                code: "protocol".into(),
                message: format!(
                    "the guest overran the session's flow-control window ({queued} bytes queued, {WINDOW} allowed); the command was killed"
                ),
                errno: None,
            };
            let frame = Frame::json(route.local_id, Kind::Error, &msg);
            let _ = route.client.send(Routed { frame, global, cost: 0, flow: route.flow.clone() });
            let _ = to_agent.try_send(Frame::json(global, Kind::Signal, &SignalMsg { signal: libc::SIGKILL }));
            continue;
        }
        match frame.kind {
            Kind::Stdout => router.log("stdout", Some(global), &frame.payload),
            Kind::Stderr => router.log("stderr", Some(global), &frame.payload),
            _ => {}
        }
        if ends_session {
            router.close(global);
        }
        let frame = Frame { id: route.local_id, ..frame };
        // Unbounded queue, bounded by the window; a vanished client's writer discards
        // (and credits) so the session can still end.
        if let Err(e) = route.client.send(Routed { frame, global, cost, flow: route.flow.clone() }) {
            route.flow.release(e.0.cost);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The guest is hostile: these feed the pump what a malicious agent could send.
    use super::*;
    use crate::router::Route;
    use microsandbox_protocol::{BulkWindow, FsAck, FsBulk};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    async fn pump_with(bytes: Vec<u8>, router: Arc<Router>) -> String {
        pump_with_agent_queue(bytes, router, mpsc::channel(16).0).await
    }

    async fn pump_with_agent_queue(bytes: Vec<u8>, router: Arc<Router>, to_agent: mpsc::Sender<Frame>) -> String {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let (rd, _wr) = host.into_split();
        let pump = tokio::spawn(pump_from_agent(rd, router, to_agent, Arc::new(Windows::none())));
        guest.write_all(&bytes).await.unwrap();
        drop(guest);
        tokio::time::timeout(Duration::from_secs(5), pump).await.unwrap().unwrap()
    }

    /// A client's end of a session: routed frames, with their local ids.
    struct Client(mpsc::UnboundedReceiver<Routed>);

    impl Client {
        async fn recv(&mut self) -> Option<Frame> {
            self.0.recv().await.map(|r| r.frame)
        }

        fn try_recv(&mut self) -> Result<Frame, mpsc::error::TryRecvError> {
            self.0.try_recv().map(|r| r.frame)
        }
    }

    fn open_session(router: &Router) -> (u32, Client) {
        let (tx, rx) = mpsc::unbounded_channel();
        (router.open(Route { client: tx, local_id: 7, flow: Default::default() }).unwrap(), Client(rx))
    }

    #[tokio::test]
    async fn oversized_frame_ends_the_link_without_allocating() {
        let router = Arc::new(Router::default());
        let mut evil = vec![0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 1, Kind::Stdout as u8];
        evil.extend_from_slice(&[0u8; 16]);
        let why = pump_with(evil, router).await;
        assert!(why.contains("protocol"), "{why}");
    }

    #[tokio::test]
    async fn frames_for_unknown_sessions_and_host_only_kinds_are_dropped() {
        let router = Arc::new(Router::default());
        let (id, mut rx) = open_session(&router);
        let mut bytes = Frame::data(id + 100, Kind::Stdout, b"not yours".to_vec()).encode();
        bytes.extend(Frame::data(id, Kind::Exec, b"{}".to_vec()).encode());
        bytes.extend(Frame::data(id, Kind::Shutdown, Vec::new()).encode());
        bytes.extend(Frame::data(id, Kind::Stdout, b"mine".to_vec()).encode());
        let why = pump_with(bytes, router).await;
        assert!(why.contains("closed"), "{why}");
        let got = rx.recv().await.unwrap();
        assert_eq!((got.id, got.kind, got.payload.as_slice()), (7, Kind::Stdout, &b"mine"[..]));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn started_and_stdin_error_pass_once_per_session() {
        let router = Arc::new(Router::default());
        let (id, mut rx) = open_session(&router);
        let mut bytes = Vec::new();
        for _ in 0..1000 {
            bytes.extend(Frame::json(id, Kind::Started, &Started { pid: 42 }).encode());
            bytes.extend(Frame::json(id, Kind::StdinError, &StdinError { errno: Some(32), written: 3 }).encode());
        }
        bytes.extend(Frame::json(id + 100, Kind::Started, &Started { pid: 1 }).encode());
        let why = pump_with(bytes, router).await;
        assert!(why.contains("closed"), "{why}");
        let started = rx.recv().await.unwrap();
        assert_eq!((started.id, started.kind), (7, Kind::Started));
        assert_eq!(started.parse::<Started>().unwrap().pid, 42);
        let err = rx.recv().await.unwrap();
        assert_eq!(err.parse::<StdinError>().unwrap(), StdinError { errno: Some(32), written: 3 });
        assert!(rx.try_recv().is_err(), "repeats and other sessions' frames are dropped");
    }

    #[tokio::test]
    async fn malformed_started_payload_ends_the_link() {
        let router = Arc::new(Router::default());
        let (id, _rx) = open_session(&router);
        let why = pump_with(Frame::data(id, Kind::Started, b"{\"pid\":-1}".to_vec()).encode(), router).await;
        assert!(why.contains("malformed Started"), "{why}");
    }

    #[tokio::test]
    async fn malformed_exit_payload_ends_the_link() {
        let router = Arc::new(Router::default());
        let (id, _rx) = open_session(&router);
        let why = pump_with(Frame::data(id, Kind::Exited, b"{\"code\":\"x\"".to_vec()).encode(), router).await;
        assert!(why.contains("malformed"), "{why}");
    }

    #[tokio::test]
    async fn session_closes_after_exit_and_late_frames_are_dropped() {
        let router = Arc::new(Router::default());
        let (id, mut rx) = open_session(&router);
        let exit = Exited { code: Some(0), ..Default::default() };
        let mut bytes = Frame::json(id, Kind::Exited, &exit).encode();
        bytes.extend(Frame::data(id, Kind::Stdout, b"late".to_vec()).encode());
        pump_with(bytes, router.clone()).await;
        assert_eq!(rx.recv().await.unwrap().kind, Kind::Exited);
        assert!(rx.try_recv().is_err());
        assert!(router.get(id).is_none());
    }

    #[tokio::test]
    async fn malformed_fs_done_ends_the_link() {
        let router = Arc::new(Router::default());
        let (id, _rx) = open_session(&router);
        let why = pump_with(Frame::data(id, Kind::FsDone, b"{\"size\":\"many\"}".to_vec()).encode(), router).await;
        assert!(why.contains("malformed FsDone"), "{why}");
    }

    #[tokio::test]
    async fn fs_frames_for_unknown_sessions_and_host_only_fs_kinds_are_dropped() {
        let router = Arc::new(Router::default());
        let (id, mut rx) = open_session(&router);
        let mut bytes = Frame::data(id + 100, Kind::FsData, b"not yours".to_vec()).encode();
        bytes.extend(Frame::data(id + 100, Kind::FsDone, b"{}".to_vec()).encode());
        bytes.extend(Frame::data(id, Kind::FsRequest, b"{\"op\":\"read\",\"path\":\"/x\"}".to_vec()).encode());
        bytes.extend(Frame::data(id, Kind::FsEof, Vec::new()).encode());
        bytes.extend(Frame::data(id, Kind::FsData, b"mine".to_vec()).encode());
        bytes.extend(Frame::json(id, Kind::FsDone, &FsDone { size: Some(4), ..Default::default() }).encode());
        bytes.extend(Frame::data(id, Kind::FsData, b"late".to_vec()).encode());
        let why = pump_with(bytes, router.clone()).await;
        assert!(why.contains("closed"), "{why}");
        let got = rx.recv().await.unwrap();
        assert_eq!((got.id, got.kind, got.payload.as_slice()), (7, Kind::FsData, &b"mine"[..]));
        let done = rx.recv().await.unwrap();
        assert_eq!(done.kind, Kind::FsDone);
        assert_eq!(done.parse::<FsDone>().unwrap().size, Some(4));
        assert!(rx.try_recv().is_err());
        assert!(router.get(id).is_none());
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_never_stalls_other_sessions() {
        let router = Arc::new(Router::default());
        let (stalled, _never_read) = open_session(&router);
        let (other, mut rx) = open_session(&router);
        // Exactly a window's worth for the stalled session, then output for the other.
        let chunk = vec![b'y'; microsandbox_protocol::MAX_CHUNK];
        let mut bytes = Vec::new();
        let mut sent = 0;
        while sent + flow::cost(Kind::Stdout, chunk.len()) <= WINDOW as usize {
            bytes.extend(Frame::data(stalled, Kind::Stdout, chunk.clone()).encode());
            sent += flow::cost(Kind::Stdout, chunk.len());
        }
        bytes.extend(Frame::data(other, Kind::Stdout, b"hi".to_vec()).encode());
        pump_with(bytes, router.clone()).await;
        assert_eq!(rx.recv().await.unwrap().payload, b"hi");
        assert!(router.get(stalled).is_some(), "a session within its window stays open");
    }

    #[tokio::test]
    async fn a_window_overrun_fails_only_that_session_and_kills_it() {
        let router = Arc::new(Router::default());
        let (greedy, mut greedy_rx) = open_session(&router);
        let (other, mut other_rx) = open_session(&router);
        let chunk = vec![b'y'; microsandbox_protocol::MAX_CHUNK];
        let mut bytes = Vec::new();
        // One frame more than the window holds; nobody reads, so nothing is credited.
        for _ in 0..=(WINDOW as usize / flow::cost(Kind::Stdout, chunk.len())) {
            bytes.extend(Frame::data(greedy, Kind::Stdout, chunk.clone()).encode());
        }
        bytes.extend(Frame::data(greedy, Kind::Stdout, b"late".to_vec()).encode());
        bytes.extend(Frame::data(other, Kind::Stdout, b"fine".to_vec()).encode());
        let (to_agent, mut agent_rx) = mpsc::channel(16);
        let why = pump_with_agent_queue(bytes, router.clone(), to_agent).await;
        assert!(why.contains("closed"), "the link survives: {why}");
        let mut frames = Vec::new();
        while let Ok(f) = greedy_rx.try_recv() {
            frames.push(f);
        }
        let last = frames.pop().unwrap();
        assert_eq!(last.kind, Kind::Error);
        assert_eq!(last.parse::<ErrorMsg>().unwrap().code, "protocol");
        assert!(frames.iter().all(|f| f.kind == Kind::Stdout && f.payload.len() == chunk.len()));
        assert!(router.get(greedy).is_none());
        let kill = agent_rx.recv().await.unwrap();
        assert_eq!((kill.id, kill.kind), (greedy, Kind::Signal));
        assert_eq!(kill.parse::<SignalMsg>().unwrap().signal, libc::SIGKILL);
        assert_eq!(other_rx.recv().await.unwrap().payload, b"fine");
    }

    fn bulk_session(router: &Router) -> (u32, Client, BulkWindow) {
        let window = BulkWindow { offset: 1 << 20, slot_size: 64 << 10, slots: 2 };
        let (id, rx) = open_session(router);
        router.set_window(id, window);
        (id, rx, window)
    }

    #[tokio::test]
    async fn bulk_frames_inside_the_window_are_forwarded() {
        let router = Arc::new(Router::default());
        let (id, mut rx, w) = bulk_session(&router);
        let mut bytes = Frame::json(id, Kind::FsBulk, &FsBulk { slot: 1, len: w.slot_size }).encode();
        bytes.extend(Frame::json(id, Kind::FsAck, &FsAck { slot: 0 }).encode());
        let why = pump_with(bytes, router).await;
        assert!(why.contains("closed"), "{why}");
        let got = rx.recv().await.unwrap();
        assert_eq!((got.id, got.kind), (7, Kind::FsBulk));
        assert_eq!(got.parse::<FsBulk>().unwrap(), FsBulk { slot: 1, len: w.slot_size });
        assert_eq!(rx.recv().await.unwrap().kind, Kind::FsAck);
    }

    #[tokio::test]
    async fn a_guest_lying_about_slots_or_lengths_ends_the_link() {
        let lies: Vec<(&str, Frame)> = vec![
            ("length past the slot", Frame::json(0, Kind::FsBulk, &FsBulk { slot: 0, len: (64 << 10) + 1 })),
            ("slot past the window", Frame::json(0, Kind::FsBulk, &FsBulk { slot: 2, len: 1 })),
            ("huge slot", Frame::json(0, Kind::FsBulk, &FsBulk { slot: u32::MAX, len: u32::MAX })),
            ("ack past the window", Frame::json(0, Kind::FsAck, &FsAck { slot: 9 })),
            ("malformed", Frame::data(0, Kind::FsBulk, b"{\"slot\":-1}".to_vec())),
        ];
        for (what, lie) in lies {
            let router = Arc::new(Router::default());
            let (id, mut rx, _) = bulk_session(&router);
            let why = pump_with(Frame { id, ..lie }.encode(), router).await;
            assert!(why.contains("transfer protocol"), "{what}: {why}");
            assert!(rx.try_recv().is_err(), "{what}: nothing forwarded");
        }
        // A session that was lent no window gets no bulk frames at all.
        let router = Arc::new(Router::default());
        let (id, _rx) = open_session(&router);
        let why = pump_with(Frame::json(id, Kind::FsBulk, &FsBulk { slot: 0, len: 1 }).encode(), router).await;
        assert!(why.contains("without a transfer window"), "{why}");
    }

    #[tokio::test]
    async fn the_agent_ending_a_session_returns_its_window_once_the_client_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let spec = microsandbox::sandbox::transfer::TransferSpec {
            path: dir.path().join("t.raw"),
            windows: 1,
            slots: 2,
            slot_size: 64 << 10,
        };
        std::fs::File::create(&spec.path).unwrap().set_len(spec.size()).unwrap();
        let windows = Arc::new(Windows::new(Some(spec)));
        let router = Arc::new(Router::default());
        let (id, _rx) = open_session(&router);
        let w = windows.lend(id);
        router.set_window(id, w.expect("a free window"));
        // The client left first (its route is closed); the agent's answer still counts.
        router.close(id);
        windows.client_done(id);
        assert!(windows.lend(id + 1).is_none());
        let (host, mut guest) = UnixStream::pair().unwrap();
        let (rd, _wr) = host.into_split();
        let pump = tokio::spawn(pump_from_agent(rd, router, mpsc::channel(16).0, windows.clone()));
        guest.write_all(&Frame::json(id, Kind::FsDone, &FsDone::default()).encode()).await.unwrap();
        drop(guest);
        tokio::time::timeout(Duration::from_secs(5), pump).await.unwrap().unwrap();
        assert_eq!(windows.lend(id + 1), w);
    }

    #[tokio::test]
    async fn ready_must_come_first_and_match_the_protocol() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let bad = Ready { protocol: 999, agent_version: "x".into(), kernel: "k".into(), uptime_ms: 1, phases_us: vec![] };
        guest.write_all(&Frame::json(0, Kind::Ready, &bad).encode()).await.unwrap();
        assert!(wait_ready(&mut host).await.unwrap_err().contains("protocol 999"));
        guest.write_all(&Frame::data(0, Kind::Stdout, b"x".to_vec()).encode()).await.unwrap();
        assert!(wait_ready(&mut host).await.is_err());
    }
}
