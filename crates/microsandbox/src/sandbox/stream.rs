//! Streaming exec: events arrive as the guest produces them, stdin can be written
//! while the command runs, and signals can be sent.
//!
//! One tokio task owns the session's connection. Dropping the [`ExecStream`] ends that
//! task and closes the connection; the supervisor then kills the command in the guest,
//! so an abandoned stream never leaves a process running.

use microsandbox_protocol::{
    read_frame_async, write_frame_async, ErrorMsg, ExecRequest, Exited, Frame, Kind, SignalMsg, Started, StdinError,
    WinSize, MAX_CHUNK,
};
use std::sync::{Arc, Mutex};

use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::error::{Error, Result};

const SESSION: u32 = 1;
/// Events buffered between the connection task and the consumer. When the consumer is
/// slower than the guest, the task stops reading and back-pressure reaches the guest.
const EVENT_QUEUE: usize = 32;

/// One thing that happened in a streaming exec, in this order: `Started`, then output
/// and at most one `StdinError` in the order they happened, then `Exited` — or only
/// `Failed` when the command could not be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// The command runs, as guest process `pid`; the first event.
    Started { pid: u32 },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Bytes written to stdin did not reach the command (it closed its stdin, or ended
    /// before taking them); `message` says how many. At most once per stream; later
    /// writes raise [`Error::StdinBroken`].
    StdinError { errno: Option<i32>, message: String },
    /// Always the last event of a command that ran.
    Exited { code: Option<i32>, signal: Option<i32> },
    /// The command could not be started (not found, not executable, no such cwd or
    /// user…); the only event of such a stream. `errno` is the guest's, when there is one.
    Failed { errno: Option<i32>, message: String },
}

impl ExecEvent {
    /// True for the last event of a stream (`Exited`, `Failed`).
    pub fn is_last(&self) -> bool {
        matches!(self, ExecEvent::Exited { .. } | ExecEvent::Failed { .. })
    }
}

enum Control {
    Stdin(Vec<u8>),
    StdinEof,
    Signal(i32),
    Resize(WinSize),
}

/// A running command whose output is consumed as it arrives.
pub struct ExecStream {
    events: mpsc::Receiver<Result<ExecEvent>>,
    control: mpsc::Sender<Control>,
    task: tokio::task::JoinHandle<()>,
    done: bool,
    /// The command runs on a pseudo-terminal (it can be resized).
    tty: bool,
    stdin: Arc<Mutex<StdinState>>,
}

/// The stdin side of a stream, shared by [`ExecControl`]'s clones and the session task.
///
/// Invariant: every chunk queued for the guest is counted in `accepted` under this lock,
/// and only while `mode` is `Open`; the task sets `Broken`/`Finished` under the same lock
/// when it compares `accepted` with what the agent wrote. So a byte a write accepted is
/// either counted in that comparison (and reported if it did not arrive) or the write
/// raised — never silently dropped.
#[derive(Debug)]
struct StdinState {
    mode: StdinMode,
    /// Bytes handed to the session for the command's stdin (the `stdin:` String included).
    accepted: u64,
    /// The session's last event is decided. Set before that event is queued, so a caller
    /// that has read it sees signals and resizes refused even while the session task is
    /// still winding down (its control queue may accept a message for a little longer).
    ended: bool,
}

#[derive(Debug, Clone)]
enum StdinMode {
    Open,
    /// Closed by the caller.
    Closed,
    /// Started without a pipe the caller may write.
    NotAPipe,
    /// The command stopped taking stdin; the message says what happened.
    Broken(String),
    /// The command has ended.
    Finished,
}

impl StdinState {
    /// The command ended: an open stdin is now finished. The other modes keep their
    /// reason (closed by the caller, never a pipe, broken), which says more.
    fn finish(&mut self) {
        self.ended = true;
        if matches!(self.mode, StdinMode::Open) {
            self.mode = StdinMode::Finished;
        }
    }

    fn writable(&self) -> Result<()> {
        match &self.mode {
            StdinMode::Open => Ok(()),
            StdinMode::Closed => Err(Error::StdinClosed("stdin is already closed; a closed stdin cannot be written again".into())),
            StdinMode::NotAPipe => Err(Error::StdinClosed(
                "this command has no stdin to write: start it with stdin: :pipe (or tty: true) to write to it".into(),
            )),
            StdinMode::Broken(why) => Err(Error::StdinBroken(format!(
                "cannot write to stdin: {why}. The command reads no more input: stop writing (its output and exit status still arrive)"
            ))),
            StdinMode::Finished => Err(Error::StdinClosed("the command has finished; its stdin is closed".into())),
        }
    }
}
fn vm_gone() -> Error {
    Error::SandboxNotRunning("the sandbox VM exited during the command".into())
}

impl ExecStream {
    /// Starts the session on `conn`. With `stdin` given, it is written and closed first.
    /// `writable`: the caller may write stdin through [`ExecControl`]; otherwise writes
    /// raise [`Error::StdinClosed`].
    pub(crate) async fn start(conn: UnixStream, req: ExecRequest, stdin: Option<Vec<u8>>, writable: bool) -> Result<ExecStream> {
        let program = req.program.clone();
        let tty = req.tty.is_some();
        let state = Arc::new(Mutex::new(StdinState {
            mode: if writable { StdinMode::Open } else { StdinMode::NotAPipe },
            accepted: stdin.as_ref().map_or(0, |d| d.len() as u64),
            ended: false,
        }));
        let task_state = state.clone();
        let (mut rd, mut wr) = conn.into_split();
        write_frame_async(&mut wr, &Frame::json(SESSION, Kind::Exec, &req)).await.map_err(|_| vm_gone())?;
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let (ctl_tx, mut ctl_rx) = mpsc::channel::<Control>(8);
        if let Some(data) = stdin {
            let tx = ctl_tx.clone();
            tokio::spawn(async move {
                for chunk in data.chunks(MAX_CHUNK) {
                    if tx.send(Control::Stdin(chunk.to_vec())).await.is_err() {
                        return;
                    }
                }
                let _ = tx.send(Control::StdinEof).await;
            });
        }
        let task = tokio::spawn(async move {
            let writer = async move {
                while let Some(c) = ctl_rx.recv().await {
                    let f = match c {
                        Control::Stdin(d) => Frame::data(SESSION, Kind::Stdin, d),
                        Control::StdinEof => Frame::data(SESSION, Kind::StdinEof, Vec::new()),
                        Control::Signal(s) => Frame::json(SESSION, Kind::Signal, &SignalMsg { signal: s }),
                        Control::Resize(size) => Frame::json(SESSION, Kind::Resize, &size),
                    };
                    if write_frame_async(&mut wr, &f).await.is_err() {
                        break;
                    }
                }
                // Keep the write half (and so the session) open until the reader ends.
                std::future::pending::<()>().await;
            };
            let reader = async move {
                let state = task_state;
                // A stream reports undeliverable stdin once: the first report covers
                // every byte accepted until then, and later writes raise.
                let mut reported = false;
                loop {
                    let event = match read_frame_async(&mut rd).await {
                        Err(e) => Err(e.into()),
                        Ok(None) => Err(vm_gone()),
                        Ok(Some(f)) if f.id != SESSION => Err(Error::Protocol(format!("frame for unknown session {}", f.id))),
                        Ok(Some(f)) => match f.kind {
                            Kind::Started => f.parse::<Started>().map(|s| ExecEvent::Started { pid: s.pid }).map_err(Error::from),
                            Kind::Stdout => Ok(ExecEvent::Stdout(f.payload)),
                            Kind::Stderr => Ok(ExecEvent::Stderr(f.payload)),
                            Kind::StdinError => match f.parse::<StdinError>() {
                                Ok(_) if reported => continue,
                                Ok(err) => {
                                    reported = true;
                                    let mut s = state.lock().unwrap();
                                    let message = super::exec::stdin_failed_message(&err, s.accepted);
                                    if matches!(s.mode, StdinMode::Open | StdinMode::Closed) {
                                        s.mode = StdinMode::Broken(message.clone());
                                    }
                                    Ok(ExecEvent::StdinError { errno: err.errno, message })
                                }
                                Err(e) => Err(e.into()),
                            },
                            Kind::Exited => match f.parse::<Exited>() {
                                Ok(ex) if ex.timed_out => Err(Error::ExecTimeout(format!(
                                    "{program} did not finish within its timeout and was killed"
                                ))),
                                Ok(ex) => {
                                    let lost = {
                                        let mut s = state.lock().unwrap();
                                        s.finish();
                                        super::exec::undelivered_at_exit(&ex, s.accepted)
                                    };
                                    if let (Some(message), false) = (lost, reported) {
                                        let ev = Ok(ExecEvent::StdinError { errno: None, message });
                                        if ev_tx.send(ev).await.is_err() {
                                            return;
                                        }
                                    }
                                    Ok(ExecEvent::Exited { code: ex.code, signal: ex.signal })
                                }
                                Err(e) => Err(e.into()),
                            },
                            Kind::Error => match f.parse::<ErrorMsg>() {
                                Ok(e) if e.code == "exec-failed" => Ok(ExecEvent::Failed { errno: e.errno, message: e.message }),
                                Ok(e) => Err(Error::from_supervisor_code(&e.code, &e.message)
                                    .unwrap_or_else(|| Error::Protocol(format!("agent error {}: {}", e.code, e.message)))),
                                Err(e) => Err(e.into()),
                            },
                            other => Err(Error::Protocol(format!("unexpected {other:?} frame in an exec session"))),
                        },
                    };
                    let last = !matches!(&event, Ok(ev) if !ev.is_last());
                    if last {
                        state.lock().unwrap().finish();
                    }
                    if ev_tx.send(event).await.is_err() || last {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = writer => {},
                _ = reader => {},
            }
        });
        Ok(ExecStream { events: ev_rx, control: ctl_tx, task, done: false, tty, stdin: state })
    }

    /// The next event; `None` after the last one (`Exited` or an error).
    pub async fn next(&mut self) -> Option<Result<ExecEvent>> {
        if self.done {
            return None;
        }
        let ev = self.events.recv().await;
        if !matches!(&ev, Some(Ok(e)) if !e.is_last()) {
            self.done = true;
        }
        ev
    }

    /// A handle for stdin and signals, usable while another task waits in [`next`](Self::next).
    pub fn control(&self) -> ExecControl {
        ExecControl { control: self.control.clone(), tty: self.tty, stdin: self.stdin.clone() }
    }

    /// True once the last event was consumed.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        // Closing the connection makes the supervisor kill the command.
        self.task.abort();
    }
}

/// Writes stdin to and signals a streaming exec; cheap to clone.
#[derive(Clone)]
pub struct ExecControl {
    control: mpsc::Sender<Control>,
    tty: bool,
    /// Shared by every clone and the session task: one `close_stdin` closes it for all.
    stdin: Arc<Mutex<StdinState>>,
}

impl ExecControl {
    fn closed() -> Error {
        Error::ExecFailed("the command has already finished; its stdin and signals are closed".into())
    }

    fn check_running(&self) -> Result<()> {
        if self.stdin.lock().unwrap().ended {
            return Err(Self::closed());
        }
        Ok(())
    }

    /// Writes to the command's stdin (waiting while the session's queue is full).
    /// Returning means the bytes are on their way; if the command then does not take
    /// them, the stream reports it with an [`ExecEvent::StdinError`].
    ///
    /// Raises [`Error::StdinClosed`] when the bytes cannot reach the command: stdin was
    /// closed ([`close_stdin`](Self::close_stdin)), the stream was started without a
    /// stdin pipe, or the command has finished; [`Error::StdinBroken`] once the command
    /// has stopped taking stdin (the stream reported a `StdinError`).
    pub async fn write_stdin(&self, data: Vec<u8>) -> Result<()> {
        self.stdin.lock().unwrap().writable()?;
        let finished = || Error::StdinClosed("the command has finished; its stdin is closed".into());
        for chunk in data.chunks(MAX_CHUNK) {
            let permit = self.control.reserve().await.map_err(|_| finished())?;
            // Count and queue under the lock (see `StdinState`).
            let mut s = self.stdin.lock().unwrap();
            s.writable()?;
            s.accepted += chunk.len() as u64;
            permit.send(Control::Stdin(chunk.to_vec()));
        }
        Ok(())
    }

    /// Closes the command's stdin (end of file). Idempotent; a no-op once the command has
    /// finished, has stopped taking stdin, or when it never had a stdin pipe.
    pub async fn close_stdin(&self) -> Result<()> {
        let open = {
            let mut s = self.stdin.lock().unwrap();
            let open = matches!(s.mode, StdinMode::Open);
            if open {
                s.mode = StdinMode::Closed;
            }
            open
        };
        if open {
            let _ = self.control.send(Control::StdinEof).await;
        }
        Ok(())
    }

    /// Sends `signal` to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        if !(1..=64).contains(&signal) {
            return Err(Error::InvalidConfig(format!("signal {signal} is not a valid signal number (1-64)")));
        }
        self.check_running()?;
        self.control.send(Control::Signal(signal)).await.map_err(|_| Self::closed())
    }

    /// Sets the size of the command's terminal; the guest kernel sends `SIGWINCH` to its
    /// foreground process group. Only for commands started with a tty.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<()> {
        if !self.tty {
            return Err(Error::InvalidConfig(
                "resize needs a terminal: start the command with tty: true".into(),
            ));
        }
        let size = WinSize { rows, cols };
        super::exec::validate_winsize(size)?;
        self.check_running()?;
        self.control.send(Control::Resize(size)).await.map_err(|_| Self::closed())
    }
}

#[cfg(test)]
mod tests {
    //! The session task against a fake supervisor at the other end of the connection.
    use super::*;
    use microsandbox_protocol::{read_frame_async, write_frame_async};

    async fn start(writable: bool, stdin: Option<Vec<u8>>) -> (ExecStream, UnixStream) {
        let (host, mut peer) = UnixStream::pair().unwrap();
        let req = ExecRequest { program: "prog".into(), stdin: true, ..Default::default() };
        let stream = ExecStream::start(host, req, stdin, writable).await.unwrap();
        let exec = read_frame_async(&mut peer).await.unwrap().unwrap();
        assert_eq!(exec.kind, Kind::Exec);
        (stream, peer)
    }

    async fn send<T: serde::Serialize>(peer: &mut UnixStream, kind: Kind, msg: &T) {
        write_frame_async(peer, &Frame::json(SESSION, kind, msg)).await.unwrap();
    }

    async fn next(s: &mut ExecStream) -> ExecEvent {
        s.next().await.unwrap().unwrap()
    }

    #[tokio::test]
    async fn a_stdin_error_is_one_event_and_later_writes_raise_stdin_broken() {
        let (mut s, mut peer) = start(true, None).await;
        let ctl = s.control();
        send(&mut peer, Kind::Started, &Started { pid: 7 }).await;
        assert_eq!(next(&mut s).await, ExecEvent::Started { pid: 7 });
        ctl.write_stdin(vec![b'x'; 10]).await.unwrap();
        let stdin = read_frame_async(&mut peer).await.unwrap().unwrap();
        assert_eq!((stdin.kind, stdin.payload.len()), (Kind::Stdin, 10));
        send(&mut peer, Kind::StdinError, &StdinError { errno: Some(32), written: 4 }).await;
        let ExecEvent::StdinError { errno, message } = next(&mut s).await else { panic!("not a stdin error") };
        assert_eq!(errno, Some(32));
        assert!(message.contains("closed its stdin (broken pipe) after 4 bytes"), "{message}");
        assert!(message.contains("6 of the 10 bytes"), "{message}");
        let err = ctl.write_stdin(b"more".to_vec()).await.unwrap_err();
        assert_eq!(err.code(), "stdin-broken");
        assert!(err.to_string().contains("stop writing"), "{err}");
        ctl.close_stdin().await.unwrap(); // a no-op, never an error
        // A repeat from the guest is ignored; the exit does not report the bytes again.
        send(&mut peer, Kind::StdinError, &StdinError { errno: Some(32), written: 4 }).await;
        send(&mut peer, Kind::Exited, &Exited { code: Some(0), stdin_written: Some(4), ..Default::default() }).await;
        assert_eq!(next(&mut s).await, ExecEvent::Exited { code: Some(0), signal: None });
        assert!(s.next().await.is_none());
        assert_eq!(ctl.write_stdin(b"x".to_vec()).await.unwrap_err().code(), "stdin-broken");
    }

    #[tokio::test]
    async fn bytes_the_command_never_took_are_reported_before_exited() {
        // The `stdin:` String counts as accepted.
        let (mut s, mut peer) = start(false, Some(b"hello".to_vec())).await;
        send(&mut peer, Kind::Exited, &Exited { code: Some(0), stdin_written: Some(2), ..Default::default() }).await;
        let ExecEvent::StdinError { errno: None, message } = next(&mut s).await else { panic!("not a stdin error") };
        assert!(message.contains("after 2 bytes reached its stdin; 3 of the 5 bytes"), "{message}");
        assert_eq!(next(&mut s).await, ExecEvent::Exited { code: Some(0), signal: None });
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_clean_run_has_no_stdin_error_and_writes_after_exit_raise_stdin_closed() {
        let (mut s, mut peer) = start(true, None).await;
        let ctl = s.control();
        ctl.write_stdin(b"abc".to_vec()).await.unwrap();
        ctl.close_stdin().await.unwrap();
        send(&mut peer, Kind::Exited, &Exited { code: Some(0), stdin_written: Some(3), ..Default::default() }).await;
        assert_eq!(next(&mut s).await, ExecEvent::Exited { code: Some(0), signal: None });
        let err = ctl.write_stdin(b"x".to_vec()).await.unwrap_err();
        assert_eq!(err.code(), "stdin-closed");
        assert!(err.to_string().contains("already closed"), "the caller's close is the reason: {err}");

        // Open until the end: finished. Never a pipe: says so, also after the end.
        let (mut s, mut peer) = start(true, None).await;
        let ctl = s.control();
        send(&mut peer, Kind::Exited, &Exited { code: Some(0), stdin_written: Some(0), ..Default::default() }).await;
        next(&mut s).await;
        assert!(ctl.write_stdin(b"x".to_vec()).await.unwrap_err().to_string().contains("finished"));
        let (mut s, mut peer) = start(false, None).await;
        let ctl = s.control();
        send(&mut peer, Kind::Exited, &Exited { code: Some(0), ..Default::default() }).await;
        next(&mut s).await;
        assert!(ctl.write_stdin(b"x".to_vec()).await.unwrap_err().to_string().contains("stdin: :pipe"));
    }

    #[tokio::test]
    async fn signals_after_the_last_event_raise_even_while_the_task_winds_down() {
        let (mut s, mut peer) = start(true, None).await;
        let ctl = s.control();
        send(&mut peer, Kind::Exited, &Exited { code: Some(0), ..Default::default() }).await;
        assert_eq!(next(&mut s).await, ExecEvent::Exited { code: Some(0), signal: None });
        // The control queue may still be open here; the decided end refuses anyway.
        assert!(ctl.signal(15).await.unwrap_err().to_string().contains("already finished"));
        // Before the end, a signal is queued for the guest.
        let (s, mut peer) = start(true, None).await;
        s.control().signal(15).await.unwrap();
        let f = read_frame_async(&mut peer).await.unwrap().unwrap();
        assert_eq!(f.kind, Kind::Signal);
    }

    #[tokio::test]
    async fn a_spawn_failure_is_a_failed_event_and_the_end() {
        let (mut s, mut peer) = start(false, None).await;
        let msg = ErrorMsg { code: "exec-failed".into(), message: "prog: No such file or directory".into(), errno: Some(2) };
        send(&mut peer, Kind::Error, &msg).await;
        assert_eq!(next(&mut s).await, ExecEvent::Failed { errno: Some(2), message: msg.message.clone() });
        assert!(s.is_done());
        assert!(s.next().await.is_none());
    }

    #[test]
    fn guest_errno_is_translated_only_when_plausible() {
        let m = super::super::exec::stdin_failed_message(&StdinError { errno: Some(5), written: 0 }, 3);
        assert!(m.contains("writing the command's stdin failed (Input/output error"), "{m}");
        let m = super::super::exec::stdin_failed_message(&StdinError { errno: Some(-7), written: 9 }, 3);
        assert!(m.starts_with("writing the command's stdin failed after 9 bytes"), "{m}");
        assert!(m.contains("0 of the 3 bytes"), "{m}");
    }
}
