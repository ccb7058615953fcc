//! JSON payloads of the control frames.

use serde::{Deserialize, Serialize};

/// `Ready`: sent once by the agent when the root is mounted and it accepts sessions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ready {
    pub protocol: u32,
    pub agent_version: String,
    /// `uname -r` of the guest kernel.
    pub kernel: String,
    /// Guest uptime in milliseconds when the agent became ready.
    pub uptime_ms: u64,
    /// Where the agent's boot went: `(step, guest uptime in microseconds at its end)`, in
    /// order, the first being `init` (the kernel started the agent). Sent by a booting
    /// agent only (empty after a restore); informational, the host bounds what it keeps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases_us: Vec<(String, u64)>,
}

/// `Exec`: run `program` with `args`. The session id is the frame id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct ExecRequest {
    pub program: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Complete environment of the process (the host merges sandbox and call env).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the agent uses `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Set when `cwd` is the sandbox's working directory rather than one the caller
    /// asked for: if it does not exist, the agent creates it and its missing parents
    /// (mode 0755, like Docker) owned by this user (`user[:group]`, resolved like `user`).
    /// `None`: a missing `cwd` fails the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_cwd: Option<String>,
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// When true the host sends `Stdin` frames then `StdinEof`; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
    /// Run as this user: `name`, `uid`, `name:group` or `uid:gid` (guest /etc/passwd and
    /// /etc/group resolve names). `None`: as the agent (root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Resource limits applied before the program starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
    /// Run on a pseudo-terminal of this initial size: the terminal is the process's
    /// stdin, stdout, stderr and controlling terminal; its output arrives as `Stdout`
    /// (no `Stderr`), `Stdin` goes to the terminal, `StdinEof` sends the terminal's EOF
    /// character, and `Resize` changes the size. `None`: pipes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<WinSize>,
    /// The `restricted` security profile: the process starts with no new privileges
    /// (`PR_SET_NO_NEW_PRIVS`: setuid/file capabilities grant nothing) and with every
    /// capability dropped (bounding, inheritable, ambient, permitted, effective), so even
    /// uid 0 cannot mount, load modules, change ownership, trace others, etc.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restricted: bool,
}

/// Size of a session's terminal in character cells. Both must be at least 1.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

impl WinSize {
    /// True when both dimensions are usable (a zero size means "unknown" to programs).
    pub fn is_valid(&self) -> bool {
        self.rows > 0 && self.cols > 0
    }
}

/// One resource limit, e.g. `nofile` 256/256. Names are the lowercase `RLIMIT_*` suffixes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

/// Resource names an [`Rlimit`] may use.
pub const RLIMIT_NAMES: &[&str] = &[
    "as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss", "rtprio",
    "sigpending", "stack",
];

/// `Started`: the session's process runs; sent before any of its output.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Started {
    /// Its process id in the guest (also its process group id).
    pub pid: u32,
}

/// `StdinError`: writing the session's stdin failed; nothing more will be written to it.
/// Carries numbers only: the host words the message (guest text is not trusted).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct StdinError {
    /// The guest errno of the failed write (`EPIPE`: the command closed its stdin).
    pub errno: Option<i32>,
    /// Stdin bytes written into the command's stdin before the failure.
    pub written: u64,
}

/// `Exited`: how the process ended. Sent after all of its output frames.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Exited {
    /// Exit status when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// True when the agent killed it because `timeout_ms` elapsed.
    #[serde(default)]
    pub timed_out: bool,
    /// Stdin bytes written into the command's stdin (delivered to its pipe or terminal)
    /// by the time it ended; `None` when the session had no stdin. The host compares it
    /// with what it sent: the difference never reached the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_written: Option<u64>,
}

/// `Error`: a session failed before or instead of producing an exit status.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorMsg {
    /// Stable kebab-case code, e.g. `exec-failed`, `invalid-request`, `protocol`.
    pub code: String,
    pub message: String,
    /// The guest errno behind the failure, when there is one.
    #[serde(default)]
    pub errno: Option<i32>,
}

/// `Credit`: the host consumed `bytes` of a session's output frames (each counted as
/// header + payload); the agent may send that much more.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credit {
    pub bytes: u64,
}

/// `Signal`: deliver `signal` to the session's process group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalMsg {
    pub signal: i32,
}

/// `Stop`: ask the supervisor to shut the guest down, killing it after `timeout_ms`.
///
/// With `drain`, the supervisor first stops accepting sessions (new ones get an `Error`
/// with code [`DRAINING`]) and waits for the running ones to end — at most
/// `drain_timeout_ms` when given — before it shuts the guest down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct StopRequest {
    pub timeout_ms: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
    /// Pause instead of shutting down: save the running VM (memory, devices) to the
    /// sandbox's `paused.state` and end QEMU; the next start resumes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause: bool,
}

/// `Error` code of a session refused because the sandbox is draining.
pub const DRAINING: &str = "sandbox-draining";

/// `Stopped`: the VM is gone; `graceful` is false when it had to be killed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stopped {
    pub graceful: bool,
    /// A pause request saved the VM (false: the save failed and the VM shut down instead).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// `Info` answer: what the supervisor runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub vmm: String,
    pub accel: String,
    pub vmm_pid: u32,
    pub supervisor_pid: u32,
    pub kernel: String,
    pub boot_ms: u64,
    /// How the VM came up: `"booted"` (kernel boot) or `"restored"` (from a template's
    /// saved state). Empty in records written before templates existed.
    #[serde(default)]
    pub start: String,
    /// The template a restored VM came from (its key, hex), else `None`.
    #[serde(default)]
    pub template: Option<String>,
    /// Where a cold boot's time went, in microseconds, in order: `engine.*` measured by the
    /// engine from the start of `create` (or `start`), `supervisor.*` by the supervisor from
    /// its start, `guest.*` the agent's steps in guest uptime (time since the guest kernel
    /// started). Empty for a restored, resumed or forked VM and in older records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boot_phases: Vec<(String, u64)>,
    /// The NIC's traffic so far, filled in live by the supervisor's `Info` answer (absent
    /// without a NIC, and in the `Info` recorded at boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetCounters>,
}

/// Bytes through a sandbox's NIC (whole Ethernet frames), counted by the host's stack.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetCounters {
    /// Delivered to the guest.
    pub rx_bytes: u64,
    /// Sent by the guest (also frames the stack dropped).
    pub tx_bytes: u64,
}

/// `Restore`: what makes a VM restored from a template this sandbox. Every field is
/// validated by the agent; all of it is applied before the agent answers `Ready`, so
/// before any command of the sandbox can run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreIdentity {
    /// Fresh host randomness (hex, [`RESTORE_ENTROPY_BYTES`] bytes) credited to the guest's
    /// input pool, which is then reseeded: a template's copies never share random state.
    pub entropy: String,
    /// Host wall clock, nanoseconds since the Unix epoch (the saved guest clock stopped
    /// when the template was saved).
    pub realtime_ns: u64,
    /// The sandbox's hostname.
    pub hostname: String,
    /// A fresh `/etc/machine-id` (32 lowercase hex digits) for a new sandbox (template
    /// restore, fork); `None` for a resumed one, which keeps its own.
    #[serde(default)]
    pub machine_id: Option<String>,
}

/// `Fork`: where the supervisor streams its running VM and copies its disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// A FIFO (in the new sandbox's directory) whose reader is the new sandbox's QEMU:
    /// the migration stream goes there, loaded as it is written.
    pub fifo: std::path::PathBuf,
    /// File name of the sandbox's root disk in its directory, to copy while the VM is stopped.
    pub disk: String,
    /// Where the copy goes (the new sandbox's directory).
    pub disk_to: std::path::PathBuf,
    /// The new sandbox's RAM file (created by the engine, the VM's size, sparse): when
    /// set, the supervisor copies the stopped VM's guest memory into it and writes only
    /// the device state into `fifo` (the new VM maps the file privately); when `None`,
    /// the whole migration stream, memory included, goes into `fifo`.
    #[serde(default)]
    pub ram_to: Option<std::path::PathBuf>,
}

/// Bytes of entropy in a [`RestoreIdentity`] (a full ChaCha20 key twice over).
pub const RESTORE_ENTROPY_BYTES: usize = 64;

/// What an `FsRequest` asks the agent to do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsOp {
    /// Stream `path` to the host as `FsData` frames, then `FsDone{size}`.
    Read,
    /// Create/truncate `path` and write the `FsData` frames the host sends until `FsEof`.
    Write,
    /// `FsDone{exists}`; never an error for a missing path.
    Exists,
    /// Create a directory (`parents`: like `mkdir -p`).
    Mkdir,
    /// Remove a file, symlink or empty directory (`recursive`: a whole tree).
    Remove,
    /// Copy the file `path` to `path2` (contents and permission bits).
    Copy,
    /// `rename(2)` of `path` to `path2`.
    Rename,
    /// Directory entries as `FsData` frames of JSON arrays of [`FsEntry`], then `FsDone`.
    List,
    /// `lstat(2)`: `FsDone{stat}`.
    Stat,
    /// Like `write`, but appends to an existing file (never creates one).
    Append,
    /// Create the symlink `path` pointing at `path2` (which may be relative).
    Symlink,
}

/// `FsRequest`: one filesystem operation; the session id is the frame id. Paths are
/// absolute guest paths.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsRequest {
    pub op: FsOp,
    /// Bytes, not necessarily UTF-8 (see [`PathBytes`]).
    pub path: crate::PathBytes,
    /// Destination of `copy` and `rename`; the target of `symlink`.
    #[serde(default)]
    pub path2: Option<crate::PathBytes>,
    #[serde(default)]
    pub recursive: bool,
    #[serde(default)]
    pub parents: bool,
    /// Exact permission bits (no umask) for `write` (also of an existing file) and
    /// `mkdir` (the last component); when absent, new files get 0644 and directories
    /// 0755 less the umask, and an existing file keeps its mode.
    #[serde(default)]
    pub mode: Option<u32>,
    /// client → supervisor: move the data of this `read`/`write` through the transfer
    /// disk if a window is free. The supervisor always answers it with `FsWindow`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bulk: bool,
    /// supervisor → agent: the window lent to this session. Set only by the supervisor,
    /// which discards any value a client sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<BulkWindow>,
}

/// Alignment of every offset and length on the transfer disk: the guest reads and writes
/// it with `O_DIRECT`, which needs logical-block alignment (4096 covers any block size).
/// A power of two.
pub const BULK_ALIGN: u64 = 4096;

/// A share of the transfer disk (a raw virtio-blk disk backed by a sparse host file) lent
/// to one filesystem session: `slots` consecutive slots of `slot_size` bytes from byte
/// `offset`. Data moves one slot at a time: the sender fills a slot it owns and sends
/// `FsBulk`, which hands the slot to the receiver; the receiver copies the bytes out and
/// answers `FsAck`, which hands it back. For a `write` the host owns every slot at the
/// start, for a `read` the guest does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BulkWindow {
    pub offset: u64,
    pub slot_size: u32,
    pub slots: u32,
}

impl BulkWindow {
    /// Byte offset on the transfer disk of `len` bytes in `slot`, or `None` when the slot
    /// or the length is out of this window. Everything read from a peer goes through here.
    pub fn locate(&self, slot: u32, len: u32) -> Option<u64> {
        if slot >= self.slots || len > self.slot_size {
            return None;
        }
        Some(self.offset + slot as u64 * self.slot_size as u64)
    }

    /// Bytes the window spans.
    pub fn span(&self) -> u64 {
        self.slots as u64 * self.slot_size as u64
    }

    /// True when the window is non-empty, aligned, and ends within `disk_size` bytes.
    pub fn fits(&self, disk_size: u64) -> bool {
        self.slots > 0
            && self.slot_size > 0
            && self.offset & (BULK_ALIGN - 1) == 0
            && self.slot_size as u64 & (BULK_ALIGN - 1) == 0
            && self.offset.checked_add(self.span()).is_some_and(|end| end <= disk_size)
    }
}

/// `FsWindow`: the window lent to a bulk session, or `None` (no transfer disk, or every
/// window is in use): then the data moves as `FsData` frames.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsWindow {
    pub window: Option<BulkWindow>,
}

/// `FsBulk`: the next `len` bytes of the session's data are in `slot` of its window.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsBulk {
    pub slot: u32,
    pub len: u32,
}

/// `FsAck`: the receiver of `FsBulk{slot}` is done with the slot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsAck {
    pub slot: u32,
}

/// File type as reported by `list` and `stat`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FsKind {
    File,
    Directory,
    Symlink,
    Other,
}

/// One directory entry of `list` (not following symlinks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsEntry {
    /// File name, exactly (see [`PathBytes`]).
    pub name: crate::PathBytes,
    pub kind: FsKind,
    pub size: u64,
    /// `st_mode` permission and special bits (`& 0o7777`).
    pub mode: u32,
    /// Modification time, seconds and nanoseconds since the Unix epoch (absent from older
    /// agents: then 0).
    #[serde(default)]
    pub mtime_sec: i64,
    #[serde(default)]
    pub mtime_nsec: u32,
}

/// `lstat` of a path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FsStat {
    pub kind: FsKind,
    pub size: u64,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds and nanoseconds since the Unix epoch.
    pub mtime_sec: i64,
    #[serde(default)]
    pub mtime_nsec: u32,
    /// Creation (birth) time, when the guest filesystem records it (statx `btime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub btime_sec: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub btime_nsec: Option<u32>,
}

/// `FsDone`: the operation succeeded; which fields are set depends on the op.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct FsDone {
    /// Bytes read or written (`read`, `write`, `copy`).
    #[serde(default)]
    pub size: Option<u64>,
    /// Answer of `exists`.
    #[serde(default)]
    pub exists: Option<bool>,
    /// Answer of `stat`.
    #[serde(default)]
    pub stat: Option<FsStat>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_locates_only_inside_itself() {
        let w = BulkWindow { offset: 8 << 20, slot_size: 4 << 20, slots: 4 };
        assert_eq!(w.locate(0, 0), Some(8 << 20));
        assert_eq!(w.locate(3, 4 << 20), Some((8 << 20) + 3 * (4 << 20)));
        assert_eq!(w.locate(4, 1), None);
        assert_eq!(w.locate(0, (4 << 20) + 1), None);
        assert_eq!(w.locate(u32::MAX, u32::MAX), None);
        assert!(w.fits(24 << 20));
        assert!(!w.fits((24 << 20) - 1));
        assert!(!BulkWindow { offset: 512, ..w }.fits(u64::MAX));
        assert!(!BulkWindow { offset: u64::MAX - 4095, ..w }.fits(u64::MAX));
        assert!(!BulkWindow { slots: 0, ..w }.fits(u64::MAX));
    }

    #[test]
    fn stdin_written_is_optional_on_the_wire() {
        let ex: Exited = serde_json::from_str(r#"{"code":0,"signal":null}"#).unwrap();
        assert_eq!(ex, Exited { code: Some(0), ..Default::default() });
        let json = serde_json::to_string(&ex).unwrap();
        assert!(!json.contains("stdin_written"), "{json}");
        let ex = Exited { stdin_written: Some(7), ..ex };
        assert_eq!(serde_json::from_str::<Exited>(&serde_json::to_string(&ex).unwrap()).unwrap(), ex);
    }

    #[test]
    fn bulk_fields_are_optional_on_the_wire() {
        let req: FsRequest = serde_json::from_str(r#"{"op":"read","path":"/x"}"#).unwrap();
        assert!(!req.bulk && req.window.is_none());
        let json = serde_json::to_string(&req).unwrap();
        assert!(!json.contains("bulk") && !json.contains("window"), "{json}");
    }
}
