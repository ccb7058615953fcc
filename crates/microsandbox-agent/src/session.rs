//! Sessions: one spawned process each, with its output pumps, stdin feeder and a monitor
//! that sends the final frame.
//!
//! Per session there are up to four threads: stdout and stderr pumps, a stdin feeder (only
//! with `stdin: true`) and the monitor. The first frame of a session is `Started`. Pumps send only within the session's flow-control
//! window (flow.rs), so a host that stops reading one session stalls just that one.
//! Invariants:
//! - the final frame (`Exited`, or `Error` when the agent gave up on the session) is sent
//!   exactly once, after every output frame; [`Output`] enforces it by closing a gate
//!   that pumps check under the same lock they send with;
//! - a session leaves the table before its final frame, so the host may reuse the id
//!   as soon as it sees that frame;
//! - only the single dispatcher thread inserts sessions, so the duplicate-id check and
//!   the insert need not be atomic;
//! - no stdin byte is dropped unreported: the feeder counts what it wrote, reports its
//!   first failed write (`StdinError`, e.g. `EPIPE` when the command closed its stdin) and
//!   the final count goes out in `Exited`, so the host can account for every byte it sent.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use microsandbox_protocol::{ExecRequest, Exited, Frame, Kind, Started, StdinError, WinSize, MAX_CHUNK};

use crate::command::{self, Failure};
use crate::flow::{self, Window, Windows};
use crate::reaper::{ExitStatus, Reaper};
use crate::spawn;
use crate::util::{self, lock, log};
use crate::wire::Sink;

/// After the process exits, how long to wait for its output pipes to reach EOF. A
/// background grandchild may hold them open forever; the session ends regardless. Time
/// in which output waits for the host's credit does not count: a slow reader still gets
/// everything the process wrote.
const EOF_GRACE: Duration = Duration::from_secs(1);

/// Stdin bytes queued for a child that is not reading. Past this the session fails with
/// `stdin-overflow` rather than stalling the port (and every other session) or silently
/// dropping data.
const STDIN_LIMIT: usize = 16 << 20;

/// The output side of a session, shared by its pumps and monitor.
struct Output {
    id: u32,
    sink: Sink,
    state: Mutex<OutState>,
    /// The session's flow-control window; pumps acquire before they send.
    window: Arc<Window>,
    /// Stdin bytes the feeder has written into the command's stdin; `None` without stdin.
    stdin_written: Option<AtomicU64>,
}

struct OutState {
    /// False once the final frame is sent; nothing may follow it.
    open: bool,
    /// Set when the agent kills the session itself; the final frame is then this error.
    failure: Option<(&'static str, String)>,
}

impl Output {
    /// Sends a data frame unless the session is already finished.
    fn data(&self, kind: Kind, bytes: &[u8]) {
        let state = lock(&self.state);
        if state.open {
            self.sink.send(&Frame::data(self.id, kind, bytes.to_vec()));
        }
    }

    /// Sends a control frame of this session (`Started`, `StdinError`) unless the session
    /// is finished.
    fn control(&self, frame: Frame) {
        let state = lock(&self.state);
        if state.open {
            self.sink.send(&frame);
        }
    }

    /// Closes the gate and sends the final frame.
    fn finish(&self, status: Option<ExitStatus>, timed_out: bool) {
        // Pumps still waiting for credit give up (their output can no longer be sent).
        self.window.close();
        let mut state = lock(&self.state);
        state.open = false;
        match state.failure.take() {
            Some((code, message)) => self.sink.error(self.id, code, message, None),
            None => {
                let s = status.unwrap_or(ExitStatus {
                    code: None,
                    signal: None,
                });
                let msg = Exited {
                    code: s.code,
                    signal: s.signal,
                    timed_out,
                    // Bytes the feeder writes after this (to a grandchild holding the
                    // pipe) count as undelivered: the command itself has ended.
                    stdin_written: self.stdin_written.as_ref().map(|w| w.load(Ordering::Acquire)),
                };
                self.sink.send(&Frame::json(self.id, Kind::Exited, &msg));
            }
        }
    }
}

/// The dispatcher's side of a session's stdin: an unbounded channel bounded by bytes.
struct StdinTx {
    tx: Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

struct Handle {
    pgid: i32,
    stdin: Option<StdinTx>,
    out: Arc<Output>,
    /// The terminal master of a tty session (for `Resize`).
    pty: Option<File>,
}

/// All live sessions.
pub struct Sessions {
    table: Mutex<HashMap<u32, Handle>>,
    windows: Windows,
    sink: Sink,
    reaper: Arc<Reaper>,
}

/// Signals a process group (negative pid). Errors (ESRCH: already gone) are irrelevant.
pub fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(-pgid, signal) };
}

impl Sessions {
    pub fn new(sink: Sink, reaper: Arc<Reaper>) -> Arc<Sessions> {
        Arc::new(Sessions {
            table: Mutex::new(HashMap::new()),
            windows: Windows::default(),
            sink,
            reaper,
        })
    }

    /// Process groups of all live sessions.
    pub fn pgids(&self) -> Vec<i32> {
        lock(&self.table).values().map(|h| h.pgid).collect()
    }

    /// Starts session `id`. Failures are answered with an `Error` frame and nothing else.
    pub fn exec(self: &Arc<Self>, id: u32, req: ExecRequest) {
        if let Err(f) = self.try_exec(id, &req) {
            self.sink.error(id, f.code, f.message, f.errno);
        }
    }

    fn try_exec(self: &Arc<Self>, id: u32, req: &ExecRequest) -> Result<(), Failure> {
        let invalid = |message: String| Failure {
            code: "invalid-request",
            message,
            errno: None,
        };
        if id == 0 {
            return Err(invalid("session id 0 is reserved".into()));
        }
        if lock(&self.table).contains_key(&id) {
            return Err(invalid(format!("session {id} is already running")));
        }
        let prepared = command::prepare(req)?;
        let (pid, pipes, status_rx) = self
            .reaper
            .spawn(|| spawn::spawn(&prepared))
            .map_err(|e| Failure::os(&req.program, e.raw_os_error().unwrap_or(libc::EIO)))?;

        let out = Arc::new(Output {
            id,
            sink: self.sink.clone(),
            state: Mutex::new(OutState {
                open: true,
                failure: None,
            }),
            window: self.windows.open(id),
            stdin_written: pipes.stdin.is_some().then(|| AtomicU64::new(0)),
        });
        // Before any output: the pumps do not exist yet.
        out.control(Frame::json(id, Kind::Started, &Started { pid: pid as u32 }));
        let tty = pipes.pty.is_some();
        let stdin = pipes.stdin.and_then(|pipe| {
            let (tx, rx) = channel();
            let queued = Arc::new(AtomicUsize::new(0));
            let (q, feed_out) = (queued.clone(), out.clone());
            util::spawn(&format!("stdin-{id}"), move || feed(pipe, rx, q, tty, &feed_out)).ok()?;
            Some(StdinTx { tx, queued })
        });
        lock(&self.table).insert(
            id,
            Handle {
                pgid: pid,
                stdin,
                out: out.clone(),
                pty: pipes.pty,
            },
        );

        // Pumps hold clones of `eof_tx`; the monitor sees the channel disconnect once both
        // have hit EOF (or failed to start, which drops their closure and the pipe).
        let (eof_tx, eof_rx) = channel::<()>();
        // A tty session has one output (the terminal master), reported as stdout.
        let outputs = [
            Some(("stdout", pipes.stdout, Kind::Stdout)),
            pipes.stderr.map(|p| ("stderr", p, Kind::Stderr)),
        ];
        for (name, pipe, kind) in outputs.into_iter().flatten() {
            let (out, eof) = (out.clone(), eof_tx.clone());
            if let Err(e) =
                util::spawn(&format!("{name}-{id}"), move || pump(pipe, kind, &out, eof))
            {
                log!("session {id}: cannot start {name} pump: {e}");
            }
        }
        drop(eof_tx);
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let this = self.clone();
        let monitor_out = out.clone();
        let started = util::spawn(&format!("session-{id}"), move || {
            this.monitor(id, pid, status_rx, eof_rx, timeout, &monitor_out)
        });
        if let Err(e) = started {
            // Without a monitor nobody would ever end the session: end it here.
            kill_group(pid, libc::SIGKILL);
            self.forget(id);
            lock(&out.state).failure =
                Some(("exec-failed", format!("cannot start session thread: {e}")));
            out.finish(None, false);
        }
        Ok(())
    }

    /// Waits for the exit status (killing on timeout), then for output EOF (bounded by
    /// [`EOF_GRACE`]), then ends the session.
    fn monitor(
        &self,
        id: u32,
        pid: i32,
        status_rx: Receiver<ExitStatus>,
        eof_rx: Receiver<()>,
        timeout: Option<Duration>,
        out: &Output,
    ) {
        let mut timed_out = false;
        let status = match timeout {
            None => status_rx.recv().ok(),
            Some(t) => match status_rx.recv_timeout(t) {
                Ok(s) => Some(s),
                Err(RecvTimeoutError::Disconnected) => None,
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    kill_group(pid, libc::SIGKILL);
                    status_rx.recv().ok()
                }
            },
        };
        // The grace counts only time in which output is not waiting for credit.
        let start = Instant::now();
        let stalled_before = out.window.stalled_time();
        loop {
            let stalled = out.window.stalled_time().saturating_sub(stalled_before);
            let Some(left) = EOF_GRACE.checked_sub(start.elapsed().saturating_sub(stalled)) else {
                break;
            };
            if let Err(RecvTimeoutError::Disconnected) = eof_rx.recv_timeout(left.max(Duration::from_millis(50))) {
                break; // both pumps hit EOF
            }
        }
        self.forget(id);
        out.finish(status, timed_out);
    }

    /// Removes session `id` from the tables (before its final frame, so the host may
    /// reuse the id as soon as it sees that frame).
    fn forget(&self, id: u32) {
        lock(&self.table).remove(&id);
        self.windows.close(id);
    }

    /// The host consumed `bytes` of session `id`'s output.
    pub fn credit(&self, id: u32, bytes: usize) {
        self.windows.credit(id, bytes);
    }

    /// Queues stdin bytes for session `id`. Unknown sessions and closed stdin drop them;
    /// they are then missing from `Exited::stdin_written`, which tells the host.
    pub fn stdin(&self, id: u32, data: Vec<u8>) {
        let mut table = lock(&self.table);
        let Some(h) = table.get_mut(&id) else { return };
        let Some(s) = &h.stdin else { return };
        let len = data.len();
        if s.queued.fetch_add(len, Ordering::AcqRel) + len > STDIN_LIMIT {
            log!("session {id}: child not reading stdin, {STDIN_LIMIT} bytes queued; killing it");
            lock(&h.out.state).failure = Some((
                "stdin-overflow",
                format!("more than {STDIN_LIMIT} bytes of stdin queued"),
            ));
            h.stdin = None;
            kill_group(h.pgid, libc::SIGKILL);
            return;
        }
        if s.tx.send(data).is_err() {
            h.stdin = None; // the feeder is gone
        }
    }

    /// Closes session `id`'s stdin once queued bytes are written.
    pub fn stdin_eof(&self, id: u32) {
        if let Some(h) = lock(&self.table).get_mut(&id) {
            h.stdin = None;
        }
    }

    /// Resizes session `id`'s terminal; unknown and pipe sessions are ignored (the host
    /// refuses to resize those, so only a confused host gets here).
    pub fn resize(&self, id: u32, size: WinSize) {
        if !size.is_valid() {
            return;
        }
        if let Some(pty) = lock(&self.table).get(&id).and_then(|h| h.pty.as_ref()) {
            if let Err(e) = spawn::set_winsize(pty, size) {
                log!("session {id}: cannot resize the terminal: {e}");
            }
        }
    }

    /// Signals session `id`'s process group; unknown sessions are ignored.
    pub fn signal(&self, id: u32, signal: i32) {
        if let Some(h) = lock(&self.table).get(&id) {
            kill_group(h.pgid, signal);
        }
    }
}

/// Streams one output pipe to the host, a chunk per read so output arrives as produced.
/// The `_eof` sender drops on return, telling the monitor this stream is done. A terminal
/// master reports EIO instead of EOF once the last slave holder has gone.
///
/// Credit is acquired after the read, outside the output lock: at most one chunk per
/// pump is held while the host is behind, and `finish` is never blocked by a waiting pump.
fn pump(mut pipe: File, kind: Kind, out: &Output, _eof: Sender<()>) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if !out.window.acquire(flow::cost(n)) {
                    return; // the session is over
                }
                out.data(kind, &buf[..n])
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Writes queued stdin to the child until the queue closes, counting the bytes written
/// in `out.stdin_written`. The first failed write (EPIPE once the child has closed its
/// end) is reported to the host as `StdinError`; the pipe is then dropped and later data
/// discarded — the host knows, from the count, that none of it arrived. A terminal
/// cannot be half-closed, so the end of a tty session's stdin is its EOF character (what
/// Ctrl-D types).
fn feed(pipe: File, rx: Receiver<Vec<u8>>, queued: Arc<AtomicUsize>, tty: bool, out: &Output) {
    let mut pipe = Some(pipe);
    for chunk in rx {
        if let Some(p) = &mut pipe {
            if let Err(e) = write_counted(p, &chunk, out.stdin_written.as_ref()) {
                pipe = None;
                let written = out.stdin_written.as_ref().map_or(0, |w| w.load(Ordering::Acquire));
                out.control(Frame::json(out.id, Kind::StdinError, &StdinError { errno: e.raw_os_error(), written }));
            }
        }
        queued.fetch_sub(chunk.len(), Ordering::AcqRel);
    }
    if let (Some(p), true) = (pipe, tty) {
        type_eof(p, out);
    }
}

/// Types end-of-file on a terminal whose stdin the host closed. In canonical mode the
/// line discipline turns the VEOF character into an end-of-file mark for the next
/// `read` — but a program that switches the terminal to raw mode before reading it (a
/// shell's line editor starting up just after the host closed stdin) gets that mark as a
/// NUL byte and would wait for input forever. So while the session lives, a terminal that
/// goes raw after a canonical-mode VEOF gets the character once more, which a line editor
/// reads as Ctrl-D. At most two characters are typed; the wait ends with the session.
fn type_eof(mut pty: File, out: &Output) {
    let Some(was_canonical) = is_canonical(&pty) else { return };
    if pty.write_all(&[eof_char(&pty)]).is_err() || !was_canonical {
        return;
    }
    let mut wait = Duration::from_millis(10);
    while lock(&out.state).open {
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(250));
        match is_canonical(&pty) {
            Some(true) => {}
            Some(false) => {
                let _ = pty.write_all(&[eof_char(&pty)]);
                return;
            }
            None => return, // the terminal is gone
        }
    }
}

/// Whether the terminal is in canonical (line) mode; `None` once it cannot be read.
fn is_canonical(pty: &File) -> Option<bool> {
    use std::os::fd::AsFd;
    // On a pseudo-terminal master, the termios calls act on the slave's settings.
    nix::sys::termios::tcgetattr(pty.as_fd())
        .ok()
        .map(|t| t.local_flags.contains(nix::sys::termios::LocalFlags::ICANON))
}

/// `write_all` that adds every byte the kernel accepted to `counter`, also when a later
/// part of `buf` fails.
fn write_counted(w: &mut File, mut buf: &[u8], counter: Option<&AtomicU64>) -> std::io::Result<()> {
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                if let Some(c) = counter {
                    c.fetch_add(n as u64, Ordering::AcqRel);
                }
                buf = &buf[n..];
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The terminal's VEOF character (Ctrl-D unless the program changed it).
fn eof_char(pty: &File) -> u8 {
    use std::os::fd::AsFd;
    nix::sys::termios::tcgetattr(pty.as_fd())
        .map(|t| t.control_chars[libc::VEOF])
        .unwrap_or(4)
}
