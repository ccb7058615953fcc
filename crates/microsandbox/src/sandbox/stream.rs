//! Streaming exec: events arrive as the guest produces them, stdin can be written
//! while the command runs, and signals can be sent.
//!
//! One tokio task owns the session's connection. Dropping the [`ExecStream`] ends that
//! task and closes the connection; the supervisor then kills the command in the guest,
//! so an abandoned stream never leaves a process running.

use microsandbox_protocol::{
    read_frame_async, write_frame_async, ErrorMsg, ExecRequest, Exited, Frame, Kind, SignalMsg, WinSize, MAX_CHUNK,
};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::error::{Error, Result};

const SESSION: u32 = 1;
/// Events buffered between the connection task and the consumer. When the consumer is
/// slower than the guest, the task stops reading and back-pressure reaches the guest.
const EVENT_QUEUE: usize = 32;

/// One thing that happened in a streaming exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Always the last event of a successful stream.
    Exited { code: Option<i32>, signal: Option<i32> },
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
    stdin: Arc<AtomicU8>,
}

/// [`ExecControl`]'s stdin states.
const STDIN_OPEN: u8 = 0;
const STDIN_CLOSED: u8 = 1;
const STDIN_NOT_A_PIPE: u8 = 2;

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
                loop {
                    let event = match read_frame_async(&mut rd).await {
                        Err(e) => Err(e.into()),
                        Ok(None) => Err(vm_gone()),
                        Ok(Some(f)) if f.id != SESSION => Err(Error::Protocol(format!("frame for unknown session {}", f.id))),
                        Ok(Some(f)) => match f.kind {
                            Kind::Stdout => Ok(ExecEvent::Stdout(f.payload)),
                            Kind::Stderr => Ok(ExecEvent::Stderr(f.payload)),
                            Kind::Exited => match f.parse::<Exited>() {
                                Ok(ex) if ex.timed_out => Err(Error::ExecTimeout(format!(
                                    "{program} did not finish within its timeout and was killed"
                                ))),
                                Ok(ex) => Ok(ExecEvent::Exited { code: ex.code, signal: ex.signal }),
                                Err(e) => Err(e.into()),
                            },
                            Kind::Error => match f.parse::<ErrorMsg>() {
                                Ok(e) if e.code == "exec-failed" => Err(Error::ExecFailed(e.message)),
                                Ok(e) => Err(Error::from_supervisor_code(&e.code, &e.message)
                                    .unwrap_or_else(|| Error::Protocol(format!("agent error {}: {}", e.code, e.message)))),
                                Err(e) => Err(e.into()),
                            },
                            other => Err(Error::Protocol(format!("unexpected {other:?} frame in an exec session"))),
                        },
                    };
                    let last = !matches!(event, Ok(ExecEvent::Stdout(_)) | Ok(ExecEvent::Stderr(_)));
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
        let state = if writable { STDIN_OPEN } else { STDIN_NOT_A_PIPE };
        Ok(ExecStream { events: ev_rx, control: ctl_tx, task, done: false, tty, stdin: Arc::new(AtomicU8::new(state)) })
    }

    /// The next event; `None` after the last one (`Exited` or an error).
    pub async fn next(&mut self) -> Option<Result<ExecEvent>> {
        if self.done {
            return None;
        }
        let ev = self.events.recv().await;
        if !matches!(ev, Some(Ok(ExecEvent::Stdout(_))) | Some(Ok(ExecEvent::Stderr(_)))) {
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
    /// Shared by every clone: one `close_stdin` closes it for all.
    stdin: Arc<AtomicU8>,
}

impl ExecControl {
    fn closed() -> Error {
        Error::ExecFailed("the command has already finished; its stdin and signals are closed".into())
    }

    /// Writes to the command's stdin. Raises [`Error::StdinClosed`] when the bytes cannot
    /// reach it: stdin was closed ([`close_stdin`](Self::close_stdin)), the stream was
    /// started without a stdin pipe, or the command has finished.
    pub async fn write_stdin(&self, data: Vec<u8>) -> Result<()> {
        match self.stdin.load(Ordering::SeqCst) {
            STDIN_CLOSED => {
                return Err(Error::StdinClosed("stdin is already closed; a closed stdin cannot be written again".into()))
            }
            STDIN_NOT_A_PIPE => {
                return Err(Error::StdinClosed(
                    "this command has no stdin to write: start it with stdin: :pipe (or tty: true) to write to it".into(),
                ))
            }
            _ => {}
        }
        let finished = || Error::StdinClosed("the command has finished; its stdin is closed".into());
        for chunk in data.chunks(MAX_CHUNK) {
            self.control.send(Control::Stdin(chunk.to_vec())).await.map_err(|_| finished())?;
        }
        Ok(())
    }

    /// Closes the command's stdin (end of file). Idempotent; a no-op once the command has
    /// finished or when it never had a stdin pipe.
    pub async fn close_stdin(&self) -> Result<()> {
        if self.stdin.compare_exchange(STDIN_OPEN, STDIN_CLOSED, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            let _ = self.control.send(Control::StdinEof).await;
        }
        Ok(())
    }

    /// Sends `signal` to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        if !(1..=64).contains(&signal) {
            return Err(Error::InvalidConfig(format!("signal {signal} is not a valid signal number (1-64)")));
        }
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
        self.control.send(Control::Resize(size)).await.map_err(|_| Self::closed())
    }
}
