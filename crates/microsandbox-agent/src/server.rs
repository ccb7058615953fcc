//! The port reader: one thread decoding host frames and dispatching them. It never blocks
//! on a session (stdin goes through per-session queues), so `Signal` and `Shutdown` are
//! always served.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;
use std::thread::sleep;
use std::time::Duration;

use microsandbox_protocol::{Credit, ExecRequest, Frame, FsRequest, Kind, SignalMsg, WinSize, HEADER_LEN, MAX_CHUNK};

use crate::fs::FsSessions;

use crate::session::Sessions;
use crate::shutdown;
use crate::util::log;
use crate::wire::{self, Incoming, Sink};

/// virtio-serial reads return EOF while no host is connected; poll at this pace.
const RECONNECT_POLL: Duration = Duration::from_millis(100);

/// Serves frames from `port` forever.
pub fn serve(port: File, sink: Sink, sessions: Arc<Sessions>) -> ! {
    let mut r = BufReader::with_capacity(HEADER_LEN + MAX_CHUNK, port);
    let fs = FsSessions::new(sink.clone());
    loop {
        match wire::read(&mut r) {
            Ok(Incoming::Frame(f)) => dispatch(f, &sink, &sessions, &fs),
            Ok(Incoming::Invalid { id, why }) => sink.error(id, "protocol", why, None),
            Ok(Incoming::Eof) => sleep(RECONNECT_POLL),
            // The host went away mid-frame; the next connection starts a fresh stream.
            Err(_) => sleep(RECONNECT_POLL),
        }
    }
}

fn dispatch(f: Frame, sink: &Sink, sessions: &Arc<Sessions>, fs: &Arc<FsSessions>) {
    match f.kind {
        // Filesystem sessions (fs.rs); `Signal` also cancels one (the host gave up on it).
        Kind::FsRequest => match f.parse::<FsRequest>() {
            Ok(req) => fs.start(f.id, req),
            Err(e) => sink.error(f.id, "protocol", e.to_string(), None),
        },
        Kind::FsData => fs.data(f.id, f.payload),
        Kind::FsBulk => match f.parse() {
            Ok(b) => fs.bulk(f.id, b),
            Err(e) => sink.error(f.id, "protocol", e.to_string(), None),
        },
        Kind::FsAck => match f.parse() {
            Ok(a) => fs.ack(f.id, a),
            Err(e) => sink.error(f.id, "protocol", e.to_string(), None),
        },
        Kind::FsEof => fs.eof(f.id),
        Kind::Exec => match f.parse::<ExecRequest>() {
            Ok(req) => sessions.exec(f.id, req),
            Err(e) => sink.error(f.id, "protocol", e.to_string(), None),
        },
        Kind::Stdin => sessions.stdin(f.id, f.payload),
        Kind::StdinEof => sessions.stdin_eof(f.id),
        Kind::Resize => match f.parse::<WinSize>() {
            Ok(size) => sessions.resize(f.id, size),
            Err(e) => sink.error(f.id, "protocol", e.to_string(), None),
        },
        Kind::Signal => match f.parse::<SignalMsg>() {
            Ok(s) => {
                fs.cancel(f.id);
                sessions.signal(f.id, s.signal)
            }
            Err(e) => sink.error(f.id, "protocol", e.to_string(), None),
        },
        // Session ids are unique across exec and fs sessions: at most one of them knows it.
        Kind::Credit => match f.parse::<Credit>() {
            Ok(c) => {
                let bytes = usize::try_from(c.bytes).unwrap_or(usize::MAX);
                sessions.credit(f.id, bytes);
                fs.credit(f.id, bytes);
            }
            Err(e) => sink.error(f.id, "protocol", e.to_string(), None),
        },
        Kind::Shutdown => shutdown::shutdown(sessions),
        // Only ever the first frame after a restore from a template (see restore.rs).
        Kind::Restore => match f.parse::<microsandbox_protocol::RestoreIdentity>().map_err(|e| e.to_string()).and_then(|id| crate::restore::apply(&id)) {
            Ok(()) => sink.send(&Frame::json(0, Kind::Ready, &crate::ready(Vec::new()))),
            Err(why) => sink.error(0, "restore-failed", why, None),
        },
        // The host giving up on a session has no guest-side meaning; answering an
        // error with an error could loop.
        Kind::Error => log!("host reported an error on session {}", f.id),
        other => sink.error(
            f.id,
            "protocol",
            format!("unexpected {other:?} frame from the host"),
            None,
        ),
    }
}
