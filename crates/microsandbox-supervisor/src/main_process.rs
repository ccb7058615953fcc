//! The sandbox's main process: the image's Entrypoint + Cmd (or `entrypoint:`), started
//! by the supervisor once per boot, after the guest is ready.
//!
//! It is an ordinary exec session that belongs to the supervisor instead of a client:
//! stdin at EOF, its stdout/stderr recorded in the sandbox log like every session's
//! output (the agent pump does that), and how it ended recorded as a `system` entry.
//! Its exit does not stop the sandbox, and it does not count as activity for
//! `idle_timeout` (see `Router::open_background`).

use std::sync::Arc;

use microsandbox_protocol::{ErrorMsg, ExecRequest, Exited, Frame, Kind};
use tokio::sync::mpsc;

use crate::flow::session_channel;
use crate::router::Router;

/// How the main process ended, as one log line.
fn describe_end(program: &str, frame: &Frame) -> Option<String> {
    match frame.kind {
        Kind::Exited => {
            let ex: Exited = frame.parse().ok()?;
            Some(match (ex.code, ex.signal) {
                (Some(c), _) => format!("main process {program} exited with code {c}"),
                (None, Some(s)) => format!("main process {program} was killed by signal {s}"),
                (None, None) => format!("main process {program} ended"),
            })
        }
        Kind::Error => {
            let e: ErrorMsg = frame.parse().ok()?;
            Some(format!("main process {program} could not start: {}", e.message))
        }
        _ => None,
    }
}

/// Starts `req` in the guest and records its end in the log. Returns at once.
pub async fn start(router: Arc<Router>, to_agent: &mpsc::Sender<Frame>, req: ExecRequest) {
    // Only the last frame (`Exited`/`Error`) is of interest; output is logged by the pump
    // and credited as it is read here, so a chatty main process is never held back.
    let (route, mut rx) = session_channel(0, to_agent.clone());
    // Only a drain refuses it, and none can have started before the ready report.
    let Some(id) = router.open_background(route) else { return };
    let program = req.program.clone();
    router.log("system", None, format!("starting main process {program}").as_bytes());
    if to_agent.send(Frame::json(id, Kind::Exec, &req)).await.is_err() {
        router.close(id);
        return;
    }
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if let Some(line) = describe_end(&program, &f) {
                router.log("system", None, line.as_bytes());
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_are_described() {
        let exit = Frame::json(1, Kind::Exited, &Exited { code: Some(3), ..Default::default() });
        assert_eq!(describe_end("/app", &exit).unwrap(), "main process /app exited with code 3");
        let killed = Frame::json(1, Kind::Exited, &Exited { signal: Some(9), ..Default::default() });
        assert!(describe_end("/app", &killed).unwrap().contains("signal 9"));
        let err = Frame::json(1, Kind::Error, &ErrorMsg { code: "exec-failed".into(), message: "ENOENT".into(), errno: None });
        assert!(describe_end("/app", &err).unwrap().contains("could not start: ENOENT"));
        assert!(describe_end("/app", &Frame::data(1, Kind::Stdout, b"x".to_vec())).is_none());
    }
}
