//! Wire protocol between the host (supervisor, Ruby extension) and the guest agent.
//!
//! One byte stream (the `msb.agent` virtio-serial port, or a supervisor control socket)
//! carries many concurrent sessions. Every frame names its session by `id`:
//!
//! ```text
//! | len: u32 BE | id: u32 BE | kind: u8 | payload: len bytes |
//! ```
//!
//! Invariants every reader enforces (the guest is hostile, so the host relies on them):
//! - `len <= MAX_PAYLOAD`; a larger header is a protocol error, never an allocation.
//! - `kind` is one of [`Kind`]; an unknown kind is a protocol error.
//! - control payloads are JSON of a known shape; data payloads (`Stdout`, `Stderr`,
//!   `Stdin`) are raw bytes.
//!
//! Framing is written by hand because it is nine bytes of header; the payloads use serde.
//!
//! An exec session (`Exec` … `Exited`/`Error`) runs on pipes, or with
//! [`ExecRequest::tty`] on a pseudo-terminal: then all output is `Stdout`, `StdinEof`
//! types the terminal's EOF character (the terminal cannot be half-closed), and
//! `Resize` ([`WinSize`]) changes the terminal size (ignored for pipe sessions).
//!
//! An exec session's first frame is `Started` (the guest pid) unless it fails to start
//! (then `Error` is its only frame). Stdin is accounted for: the agent counts the bytes it
//! wrote into the command's stdin, sends `StdinError` once when a write fails (the command
//! closed its stdin: `EPIPE`), and reports the count in `Exited`, so the host can tell the
//! caller about every byte it accepted that never reached the command.
//!
//! Flow control is per session so that one host consumer that stops reading cannot stall
//! the shared stream for the others: the agent keeps at most [`WINDOW`] bytes of a
//! session's data frames uncredited and waits for `Credit` ([`Credit`]) beyond that; the
//! host returns credit as it passes the frames on.

mod frame;
mod init;
mod messages;
mod mounts;
mod path_bytes;

pub use frame::{read_frame, write_frame, Frame, FrameError, Kind, HEADER_LEN, MAX_PAYLOAD};
#[cfg(feature = "tokio")]
pub use frame::{read_frame_async, write_frame_async};
pub use messages::*;
pub use mounts::{decode_mounts, encode_mounts, GuestMount, MOUNTS_PARAM};
pub use init::{InitSpec, AUTO, AUTO_INIT, INIT_PARAM, MAX_INIT_PARAM};
pub use path_bytes::{escape, PathBytes};

/// Version of this protocol; the agent reports it in [`Ready`] and the host refuses others.
/// 2: per-session flow control (`Credit`, [`WINDOW`]).
/// 3: bulk transfers through the transfer disk (`FsWindow`, `FsBulk`, `FsAck`,
/// `FsRequest.window`).
/// 4: paths as bytes ([`PathBytes`]).
/// 5: exec sessions report their start (`Started`, [`Started`]) and undeliverable stdin
/// (`StdinError`, [`StdinError`], and [`Exited::stdin_written`]).
pub const PROTOCOL_VERSION: u32 = 5;

/// Per-session flow-control window: the agent never has more than this many bytes of a
/// session's `Stdout`/`Stderr`/`FsData`/`FsBulk`/`FsAck` frames (header + payload each) outstanding, i.e.
/// sent and not yet returned by `Credit`. The host relies on it to bound what it buffers
/// per session and treats a session that exceeds it as a protocol violation. 1 MiB: credit
/// takes a round trip through the VMM, and a smaller window measurably cut throughput
/// under software emulation.
pub const WINDOW: u32 = 1024 * 1024;

/// Largest data chunk a writer puts in one `Stdout`/`Stderr`/`Stdin` frame.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Filesystem transfers smaller than this move as `FsData` frames even when the session
/// has a transfer-disk window: a few frames cost less than slot round trips.
pub const BULK_MIN: u64 = 1 << 20;

/// Serial number of the bulk-transfer virtio-blk disk; the agent finds it by this name.
pub const TRANSFER_DISK_SERIAL: &str = "msb.transfer";

/// Name of the virtio-serial port the agent listens on.
pub const AGENT_PORT_NAME: &str = "msb.agent";
