//! The supervisor's end of the guest agent channel (QEMU's chardev socket).
//!
//! Everything read here comes from the guest and is untrusted: the codec bounds frame
//! sizes, kinds are checked against what an agent may send, payloads are parsed before
//! they are forwarded, and frames for sessions that are not open are dropped.

use std::sync::Arc;
use std::time::Duration;

use microsandbox_protocol::{
    read_frame_async, write_frame_async, ErrorMsg, Exited, Frame, Kind, Ready, PROTOCOL_VERSION,
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
            Kind::Stdout | Kind::Stderr => false,
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
        if ends_session {
            router.close(frame.id);
        }
        let local = Frame { id: route.local_id, ..frame };
        // A slow client applies back-pressure here; a vanished one is skipped quickly.
        let _ = tokio::time::timeout(Duration::from_secs(30), route.client.send(local)).await;
    }
}
