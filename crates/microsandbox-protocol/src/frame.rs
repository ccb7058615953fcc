//! Length-prefixed frames with a session id and a kind byte.

use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Serialize};

/// Bytes in a frame header: length, id, kind.
pub const HEADER_LEN: usize = 9;

/// Largest payload a reader accepts. Bigger headers are rejected before allocating.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// What a frame carries. The numeric values are the wire format: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// agent → host, id 0: the agent is up ([`crate::Ready`]).
    Ready = 1,
    /// host → agent: start a command ([`crate::ExecRequest`]).
    Exec = 2,
    /// agent → host: raw stdout bytes of a session.
    Stdout = 3,
    /// agent → host: raw stderr bytes of a session.
    Stderr = 4,
    /// host → agent: raw stdin bytes for a session.
    Stdin = 5,
    /// host → agent: close the session's stdin.
    StdinEof = 6,
    /// agent → host: the session's process ended ([`crate::Exited`]); last frame of a session.
    Exited = 7,
    /// either way: the session failed ([`crate::ErrorMsg`]); last frame of a session.
    Error = 8,
    /// host → agent: send a signal to the session's process group ([`crate::SignalMsg`]).
    Signal = 9,
    /// host → agent, id 0: sync and power off.
    Shutdown = 10,
    /// client → supervisor: stop the sandbox ([`crate::StopRequest`]).
    Stop = 11,
    /// supervisor → client: the sandbox stopped ([`crate::Stopped`]).
    Stopped = 12,
    /// client → supervisor: describe the sandbox; answered with the same kind ([`crate::Info`]).
    Info = 13,
    /// client → supervisor: stop watching the owner process; acknowledged with the same kind.
    Detach = 14,
    /// host → agent: start a guest filesystem operation ([`crate::FsRequest`]); opens a
    /// session like `Exec`.
    FsRequest = 15,
    /// either way: raw file bytes of a filesystem session (a download from the agent, an
    /// upload to it); for `list`, a JSON array of [`crate::FsEntry`].
    FsData = 16,
    /// host → agent: the upload of a filesystem session is complete.
    FsEof = 17,
    /// agent → host: the filesystem operation succeeded ([`crate::FsDone`]); last frame
    /// of the session.
    FsDone = 18,
    /// host → agent: set the terminal size of a `tty` session ([`crate::WinSize`]); the
    /// guest kernel sends `SIGWINCH` to the terminal's foreground process group.
    Resize = 19,
    /// host → agent: the host has consumed this many bytes of the session's output
    /// ([`crate::Credit`]); reopens its flow-control window ([`crate::WINDOW`]).
    Credit = 20,
    /// supervisor → client: the answer to an `FsRequest` with `bulk: true`
    /// ([`crate::FsWindow`]); the client's first frame of that session.
    FsWindow = 21,
    /// either way: `len` bytes of a filesystem session are in one slot of its transfer-disk
    /// window ([`crate::FsBulk`]); the slot now belongs to the receiver.
    FsBulk = 22,
    /// either way: the receiver of an `FsBulk` is done with that slot ([`crate::FsAck`]);
    /// it belongs to the sender again.
    FsAck = 23,
    /// host → agent, id 0, only right after a VM was restored from a template: the
    /// sandbox's own identity ([`crate::RestoreIdentity`]); the agent applies it and
    /// answers `Ready` again. (Numbered apart from the others so that kinds added by
    /// other features do not collide with it.)
    Restore = 40,
    /// client → supervisor: snapshot this running VM for a fork ([`crate::ForkRequest`]);
    /// answered with the same kind (empty payload) once the state and the disk copy are
    /// written and the VM runs again, or with `Error`.
    Fork = 41,
    /// agent → host: the session's process was spawned ([`crate::Started`]); the first
    /// frame of a successful exec session, before any output.
    Started = 24,
    /// agent → host: the session's stdin cannot take bytes any more ([`crate::StdinError`]):
    /// the command closed it (`EPIPE`) or writing failed otherwise. At most once per
    /// session; stdin bytes that arrive after it are discarded by the agent.
    StdinError = 25,
}

impl Kind {
    /// Parses a kind byte; `None` for bytes this version does not know.
    pub fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Ready,
            2 => Exec,
            3 => Stdout,
            4 => Stderr,
            5 => Stdin,
            6 => StdinEof,
            7 => Exited,
            8 => Error,
            9 => Signal,
            10 => Shutdown,
            11 => Stop,
            12 => Stopped,
            13 => Info,
            14 => Detach,
            15 => FsRequest,
            16 => FsData,
            17 => FsEof,
            18 => FsDone,
            19 => Resize,
            20 => Credit,
            21 => FsWindow,
            22 => FsBulk,
            23 => FsAck,
            40 => Restore,
            41 => Fork,
            24 => Started,
            25 => StdinError,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub id: u32,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

/// Why a byte stream could not be read as frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error("malformed {kind:?} payload: {source}")]
    BadPayload {
        kind: Kind,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Frame {
    /// A frame with raw bytes as payload.
    pub fn data(id: u32, kind: Kind, payload: impl Into<Vec<u8>>) -> Frame {
        Frame { id, kind, payload: payload.into() }
    }

    /// A frame whose payload is `msg` as JSON.
    pub fn json<T: Serialize>(id: u32, kind: Kind, msg: &T) -> Frame {
        // Serializing our own plain structs cannot fail.
        let payload = serde_json::to_vec(msg).expect("protocol messages serialize");
        Frame { id, kind, payload }
    }

    /// Decodes the JSON payload as `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload)
            .map_err(|source| FrameError::BadPayload { kind: self.kind, source })
    }

    /// Header and payload as one buffer, ready to write.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.payload.len() <= MAX_PAYLOAD as usize, "frame payload over limit");
        let mut buf = Vec::with_capacity(HEADER_LEN + self.payload.len());
        buf.extend_from_slice(&(self.payload.len() as u32).to_be_bytes());
        buf.extend_from_slice(&self.id.to_be_bytes());
        buf.push(self.kind as u8);
        buf.extend_from_slice(&self.payload);
        buf
    }
}

/// Validates a header; returns payload length, id and kind.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(u32, u32, Kind), FrameError> {
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    let kind = Kind::from_u8(h[8]).ok_or(FrameError::UnknownKind(h[8]))?;
    Ok((len, id, kind))
}

/// Reads one frame. `Ok(None)` means the stream ended cleanly between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (len, id, kind) = decode_header(&h)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => e.into(),
    })?;
    Ok(Some(Frame { id, kind, payload }))
}

/// Writes one frame in a single `write_all`, so frames from threads sharing a
/// locked writer never interleave.
pub fn write_frame<W: Write>(w: &mut W, f: &Frame) -> io::Result<()> {
    w.write_all(&f.encode())?;
    w.flush()
}

/// Async twin of [`read_frame`].
#[cfg(feature = "tokio")]
pub async fn read_frame_async<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Frame>, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => got += n,
        }
    }
    let (len, id, kind) = decode_header(&h)?;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => e.into(),
    })?;
    Ok(Some(Frame { id, kind, payload }))
}

/// Async twin of [`write_frame`].
#[cfg(feature = "tokio")]
pub async fn write_frame_async<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    f: &Frame,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&f.encode()).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let f = Frame::data(7, Kind::Stdout, b"hello".to_vec());
        let bytes = f.encode();
        let got = read_frame(&mut &bytes[..]).unwrap().unwrap();
        assert_eq!(got, f);
    }

    #[test]
    fn clean_eof_is_none() {
        assert!(read_frame(&mut &b""[..]).unwrap().is_none());
    }

    #[test]
    fn truncated_header_and_payload() {
        let bytes = Frame::data(1, Kind::Stdin, b"abc".to_vec()).encode();
        assert!(matches!(read_frame(&mut &bytes[..4]), Err(FrameError::Truncated)));
        assert!(matches!(read_frame(&mut &bytes[..10]), Err(FrameError::Truncated)));
    }

    #[test]
    fn oversized_length_rejected_without_allocating() {
        let mut h = vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, Kind::Stdout as u8];
        h.extend_from_slice(b"x");
        assert!(matches!(read_frame(&mut &h[..]), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn unknown_kind_rejected() {
        let h = [0, 0, 0, 0, 0, 0, 0, 1, 200];
        assert!(matches!(read_frame(&mut &h[..]), Err(FrameError::UnknownKind(200))));
    }

    #[test]
    fn every_kind_byte_round_trips() {
        for b in 0..=255u8 {
            if let Some(k) = Kind::from_u8(b) {
                assert_eq!(k as u8, b);
            }
        }
    }

    #[test]
    fn bad_json_payload_is_an_error() {
        let f = Frame::data(1, Kind::Exited, b"{not json".to_vec());
        assert!(f.parse::<crate::Exited>().is_err());
    }
}
