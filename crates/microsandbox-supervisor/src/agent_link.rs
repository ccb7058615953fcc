//! The supervisor's end of the guest agent channel (QEMU's chardev socket).
//!
//! Everything read here comes from the guest and is untrusted: the codec bounds frame
//! sizes, kinds are checked against what an agent may send, payloads are parsed before
//! they are forwarded, and frames for sessions that are not open are dropped.

use std::sync::Arc;

use microsandbox_protocol::{
    read_frame_async, write_frame_async, ErrorMsg, Exited, Frame, FsDone, Kind, Ready, PROTOCOL_VERSION,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::router::Router;

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
/// the protocol. Returns why it stopped.
pub async fn pump_from_agent(mut rd: OwnedReadHalf, router: Arc<Router>) -> String {
    loop {
        let frame = match read_frame_async(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => return "the agent channel closed".into(),
            Err(e) => return format!("the guest broke the agent protocol: {e}"),
        };
        let ends_session = match frame.kind {
            Kind::Stdout | Kind::Stderr | Kind::FsData => false,
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
            // Anything else is not the agent's to send; ignore it rather than trust it.
            _ => continue,
        };
        let Some(route) = router.get(frame.id) else { continue };
        if !router.is_background(frame.id) {
            router.touch();
        }
        match frame.kind {
            Kind::Stdout => router.log("stdout", &frame.payload),
            Kind::Stderr => router.log("stderr", &frame.payload),
            _ => {}
        }
        if ends_session {
            router.close(frame.id);
        }
        let local = Frame { id: route.local_id, ..frame };
        // A slow client applies back-pressure here (bounded memory, no dropped output);
        // a vanished client's queue is closed, so the send fails at once.
        // Known limit: until the protocol has per-session flow control, a client that
        // stops reading without disconnecting stalls the other sessions of this sandbox.
        let _ = route.client.send(local).await;
    }
}

#[cfg(test)]
mod tests {
    //! The guest is hostile: these feed the pump what a malicious agent could send.
    use super::*;
    use crate::router::Route;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    async fn pump_with(bytes: Vec<u8>, router: Arc<Router>) -> String {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let (rd, _wr) = host.into_split();
        let pump = tokio::spawn(pump_from_agent(rd, router));
        guest.write_all(&bytes).await.unwrap();
        drop(guest);
        tokio::time::timeout(Duration::from_secs(5), pump).await.unwrap().unwrap()
    }

    fn open_session(router: &Router) -> (u32, mpsc::Receiver<Frame>) {
        let (tx, rx) = mpsc::channel(16);
        (router.open(Route { client: tx, local_id: 7 }).unwrap(), rx)
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
        let exit = Exited { code: Some(0), signal: None, timed_out: false };
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
    async fn ready_must_come_first_and_match_the_protocol() {
        let (mut host, mut guest) = UnixStream::pair().unwrap();
        let bad = Ready { protocol: 999, agent_version: "x".into(), kernel: "k".into(), uptime_ms: 1 };
        guest.write_all(&Frame::json(0, Kind::Ready, &bad).encode()).await.unwrap();
        assert!(wait_ready(&mut host).await.unwrap_err().contains("protocol 999"));
        guest.write_all(&Frame::data(0, Kind::Stdout, b"x".to_vec()).encode()).await.unwrap();
        assert!(wait_ready(&mut host).await.is_err());
    }
}
