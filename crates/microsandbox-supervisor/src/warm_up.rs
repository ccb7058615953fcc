//! `warm_up:`: one command (the engine sends `true`) run in the guest before the ready
//! report, so that the sandbox's first real command does not pay for TCG translating the
//! whole exec path anew (agent, guest kernel, the program's loading) — see
//! `warm_up_request` in the engine. Pools set it: their sandboxes wait for a caller
//! anyway, so the warm-up costs the caller nothing.
//!
//! Invisible to the user: it runs before the control socket accepts anyone, its output
//! (none, for `true`) is not logged (the log sink is set only afterwards), and once its
//! final frame is in, the router gives its session id out again (the agent forgets a
//! session before sending that frame), so the user's first command gets the id it would
//! have had. The command ends before the report (or is killed by the agent's timeout):
//! no process is left. Bounded by [`WITHIN`]; a failure (no `true` in the image, a timeout)
//! is only worth a line in the supervisor's log: the sandbox works either way.

use std::time::Duration;

use microsandbox_protocol::{ErrorMsg, ExecRequest, Frame, Kind, SignalMsg};
use tokio::sync::mpsc;

use crate::flow::session_channel;
use crate::router::Router;

/// How long the supervisor waits for the command's end (the agent kills it earlier,
/// at the request's `timeout_ms`).
pub const WITHIN: Duration = Duration::from_secs(15);

/// Runs `req` to its end. `Ok(Some(exit code))`, `Ok(None)` for a signal, `Err(why)` when it
/// could not start or did not end within `within`.
pub async fn run(router: &Router, to_agent: &mpsc::Sender<Frame>, req: &ExecRequest, within: Duration) -> Result<Option<i32>, String> {
    let before = router.last_id();
    let (route, mut rx) = session_channel(0, to_agent.clone());
    let id = router.open_background(route).ok_or_else(|| "the sandbox is draining".to_string())?;
    if to_agent.send(Frame::json(id, Kind::Exec, req)).await.is_err() {
        router.close(id);
        return Err("the agent channel closed".into());
    }
    let end = tokio::time::timeout(within, async {
        while let Some(f) = rx.recv().await {
            match f.kind {
                Kind::Exited => return Ok(f.parse::<microsandbox_protocol::Exited>().map_err(|e| e.to_string())?.code),
                Kind::Error => return Err(f.parse::<ErrorMsg>().map(|e| e.message).unwrap_or_else(|e| e.to_string())),
                // Output of an image's `true` that prints: read (and credited) and dropped.
                _ => continue,
            }
        }
        Err("the agent channel closed".to_string())
    })
    .await;
    router.close(id);
    match end {
        Ok(result) => {
            // The agent has forgotten the session: its id can be the user's.
            router.start_ids_after(before);
            result
        }
        Err(_) => {
            // Still running: kill it and never reuse its id.
            let _ = to_agent.try_send(Frame::json(id, Kind::Signal, &SignalMsg { signal: libc::SIGKILL }));
            Err(format!("it did not end within {}s", within.as_secs()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Routed;
    use microsandbox_protocol::Exited;
    use std::sync::Arc;

    /// A fake agent: answers the first frame it gets with `answer(id)` through the router.
    fn agent(router: Arc<Router>, answer: Option<fn(u32) -> Frame>) -> (mpsc::Sender<Frame>, tokio::task::JoinHandle<Vec<Frame>>) {
        let (tx, mut rx) = mpsc::channel::<Frame>(8);
        let task = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(f) = rx.recv().await {
                if let (Kind::Exec, Some(answer)) = (f.kind, answer) {
                    let route = router.get(f.id).unwrap();
                    for frame in [Frame::data(f.id, Kind::Stdout, b"noise".to_vec()), answer(f.id)] {
                        let cost = crate::flow::cost(frame.kind, frame.payload.len());
                        route.flow.charge(cost).unwrap();
                        let frame = Frame { id: route.local_id, ..frame };
                        route.client.send(Routed { frame, global: f.id, cost, flow: route.flow.clone() }).ok();
                    }
                }
                got.push(f);
            }
            got
        });
        (tx, task)
    }

    fn req() -> ExecRequest {
        serde_json::from_value(serde_json::json!({"program": "true"})).unwrap()
    }

    #[tokio::test]
    async fn the_users_first_session_gets_the_id_the_warm_up_had() {
        let router = Arc::new(Router::default());
        let (tx, task) = agent(router.clone(), Some(|id| Frame::json(id, Kind::Exited, &Exited { code: Some(0), ..Default::default() })));
        assert_eq!(run(&router, &tx, &req(), WITHIN).await, Ok(Some(0)));
        let (route, rx) = session_channel(7, tx.clone());
        assert_eq!(router.open(route), Some(1), "the warm-up's id is given out again");
        drop((rx, tx));
        let frames = task.await.unwrap();
        assert_eq!(frames[0].kind, Kind::Exec);
        assert_eq!(frames[0].id, 1);
    }

    #[tokio::test]
    async fn a_failed_start_is_reported_and_its_id_reused() {
        let router = Arc::new(Router::default());
        router.start_ids_after(1 << 30);
        let err = |id| Frame::json(id, Kind::Error, &ErrorMsg { code: "exec-failed".into(), message: "true: not found".into(), errno: None });
        let (tx, _task) = agent(router.clone(), Some(err));
        assert_eq!(run(&router, &tx, &req(), WITHIN).await, Err("true: not found".into()));
        let (route, _rx) = session_channel(7, tx.clone());
        assert_eq!(router.open(route), Some((1 << 30) + 1));
    }

    #[tokio::test]
    async fn a_command_that_does_not_end_is_killed_and_its_id_never_reused() {
        let router = Arc::new(Router::default());
        let (tx, task) = agent(router.clone(), None);
        let r = run(&router, &tx, &req(), Duration::from_millis(50)).await;
        assert!(r.unwrap_err().contains("did not end"));
        let (route, rx) = session_channel(7, tx.clone());
        assert_eq!(router.open(route), Some(2));
        drop((rx, tx));
        let frames = task.await.unwrap();
        assert_eq!(frames[1].kind, Kind::Signal);
        assert_eq!(frames[1].id, 1);
    }
}
