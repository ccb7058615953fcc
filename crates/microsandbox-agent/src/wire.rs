//! Frames on the agent port: a resynchronising reader and the shared writer.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use microsandbox_protocol::{write_frame, ErrorMsg, Frame, Kind, HEADER_LEN, MAX_PAYLOAD};

use crate::util::{lock, log};

/// One read from the port.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Frame(Frame),
    /// A frame was consumed whole but cannot be served; answer `Error{protocol}` on `id`.
    Invalid {
        id: u32,
        why: String,
    },
    /// The stream ended between frames (virtio-serial: no host connected).
    Eof,
}

/// Reads one frame. Unlike `protocol::read_frame`, a frame of unknown kind or oversized
/// length is consumed completely (payload skipped without allocating) so the stream stays
/// aligned and the caller learns the frame's id to answer on.
pub fn read<R: Read>(r: &mut R) -> io::Result<Incoming> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(Incoming::Eof),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_PAYLOAD {
        skip(r, len)?;
        return Ok(Incoming::Invalid {
            id,
            why: format!("payload of {len} bytes exceeds {MAX_PAYLOAD}"),
        });
    }
    let Some(kind) = Kind::from_u8(h[8]) else {
        skip(r, len)?;
        return Ok(Incoming::Invalid {
            id,
            why: format!("unknown frame kind {}", h[8]),
        });
    };
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(Incoming::Frame(Frame { id, kind, payload }))
}

fn skip<R: Read>(r: &mut R, len: u32) -> io::Result<()> {
    let skipped = io::copy(&mut r.take(len as u64), &mut io::sink())?;
    if skipped < len as u64 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The shared writing end of the port. Every frame is written whole under one mutex, so
/// frames from concurrent sessions never interleave on the wire.
#[derive(Clone)]
pub struct Sink {
    port: Arc<Mutex<File>>,
    /// Set after a failed write so a gone host does not flood the console.
    failing: Arc<AtomicBool>,
}

impl Sink {
    pub fn new(port: File) -> Sink {
        Sink {
            port: Arc::new(Mutex::new(port)),
            failing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sends one frame. Failures are logged, not returned: nobody could answer them, and
    /// the host notices a lost session on its own.
    pub fn send(&self, frame: &Frame) {
        let res = write_frame(&mut *lock(&self.port), frame);
        match res {
            Ok(()) => self.failing.store(false, Ordering::Relaxed),
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    log!("cannot write to the host: {e}");
                }
            }
        }
    }

    /// Sends an `Error` frame.
    pub fn error(&self, id: u32, code: &str, message: impl Into<String>, errno: Option<i32>) {
        let msg = ErrorMsg {
            code: code.into(),
            message: message.into(),
            errno,
        };
        self.send(&Frame::json(id, Kind::Error, &msg));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_frames_then_eof() {
        let mut bytes = Frame::data(3, Kind::Stdin, b"abc".to_vec()).encode();
        bytes.extend(Frame::data(0, Kind::Shutdown, Vec::new()).encode());
        let mut r = &bytes[..];
        assert_eq!(
            read(&mut r).unwrap(),
            Incoming::Frame(Frame::data(3, Kind::Stdin, b"abc".to_vec()))
        );
        assert_eq!(
            read(&mut r).unwrap(),
            Incoming::Frame(Frame::data(0, Kind::Shutdown, Vec::new()))
        );
        assert_eq!(read(&mut r).unwrap(), Incoming::Eof);
    }

    #[test]
    fn unknown_kind_is_skipped_and_stream_stays_aligned() {
        let mut bytes = vec![0, 0, 0, 2, 0, 0, 0, 9, 200, b'x', b'y'];
        bytes.extend(Frame::data(4, Kind::StdinEof, Vec::new()).encode());
        let mut r = &bytes[..];
        assert!(matches!(
            read(&mut r).unwrap(),
            Incoming::Invalid { id: 9, .. }
        ));
        assert_eq!(
            read(&mut r).unwrap(),
            Incoming::Frame(Frame::data(4, Kind::StdinEof, Vec::new()))
        );
    }

    #[test]
    fn oversized_frame_is_skipped() {
        let len = MAX_PAYLOAD + 1;
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend([0, 0, 0, 5, Kind::Stdin as u8]);
        bytes.extend(vec![0u8; len as usize]);
        bytes.extend(Frame::data(6, Kind::StdinEof, Vec::new()).encode());
        let mut r = &bytes[..];
        assert!(matches!(
            read(&mut r).unwrap(),
            Incoming::Invalid { id: 5, .. }
        ));
        assert_eq!(
            read(&mut r).unwrap(),
            Incoming::Frame(Frame::data(6, Kind::StdinEof, Vec::new()))
        );
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let bytes = Frame::data(3, Kind::Stdin, b"abc".to_vec()).encode();
        assert!(read(&mut &bytes[..5]).is_err());
        assert!(read(&mut &bytes[..10]).is_err());
    }
}
