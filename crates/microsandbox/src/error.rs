//! Engine errors. Each variant has a stable kebab-case code that the Ruby layer maps
//! one-to-one onto a `Microsandbox::Error` subclass.

use std::io;

/// Result alias used across the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way an engine call can fail. Messages say what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A create/exec option is invalid; nothing was started.
    #[error("{0}")]
    InvalidConfig(String),
    /// A malformed `network:` or `dns:` value (the message names the key, never a value).
    #[error("{0}")]
    NetworkPolicy(String),
    /// A published host port (`ports:`, `ports_udp:`) is held by another socket; nothing
    /// was started.
    #[error("{0}")]
    PortInUse(String),
    /// No sandbox of that name exists (or it is stopped).
    #[error("{0}")]
    SandboxNotFound(String),
    /// A running sandbox already has this name.
    #[error("{0}")]
    SandboxAlreadyExists(String),
    /// The operation needs a stopped sandbox, but it runs.
    #[error("{0}")]
    SandboxStillRunning(String),
    /// The sandbox is not running any more, so the call cannot be served.
    #[error("{0}")]
    SandboxNotRunning(String),
    /// The sandbox is draining (finishing running sessions before it stops) and refuses
    /// new ones.
    #[error("{0}")]
    SandboxDraining(String),
    /// The image (a root directory for now) does not exist.
    #[error("{0}")]
    ImageNotFound(String),
    /// The command could not be started in the guest (e.g. not found).
    #[error("{0}")]
    ExecFailed(String),
    /// The command ran longer than its timeout and was killed.
    #[error("{0}")]
    ExecTimeout(String),
    /// The runtime (kernel, agent, supervisor) is missing or could not be installed.
    #[error("{0}")]
    Runtime(String),
    /// The VM failed to boot or died.
    #[error("{0}")]
    Boot(String),
    /// The guest sent something that violates the protocol.
    #[error("{0}")]
    Protocol(String),
    /// The root filesystem could not be prepared.
    #[error("{0}")]
    Filesystem(String),
    /// A guest filesystem call named a path that does not exist (ENOENT).
    #[error("{0}")]
    PathNotFound(String),
    /// An image cannot be removed because sandbox root disks are built on it.
    #[error("{0}")]
    ImageInUse(String),
    /// A create's patch or script could not be applied; nothing was kept.
    #[error("{0}")]
    Patch(String),
    /// A registry refused or broke a request, or sent content that failed verification.
    #[error("{0}")]
    Registry(String),
    /// The registry rejected the credentials (or demanded some and none were given).
    #[error("{0}")]
    Auth(String),
    /// The image index offers no manifest for the host platform; the message names those offered.
    #[error("{0}")]
    PlatformNotFound(String),
    /// The call was interrupted by the caller (Ruby thread kill, Ctrl-C, Timeout). When
    /// the interrupt raises nothing in Ruby (`Thread#wakeup`, a signal whose trap handler
    /// returns), Ruby sees this error itself.
    #[error("the call was interrupted before it finished (Thread#wakeup/#run, or a signal handled by a trap) and anything it started in the sandbox was stopped; call it again")]
    Cancelled,
    /// A forked child called an object (exec stream, upload, download, pull) that its
    /// parent opened; its connection and task belong to the parent.
    #[error("{0}")]
    InheritedHandle(String),
    /// A write to a streaming command's stdin cannot reach it: stdin was closed by the
    /// caller, was never a pipe, or the command has finished.
    #[error("{0}")]
    StdinClosed(String),
    /// A write to a streaming command's stdin after the command stopped taking it (it
    /// closed its stdin, or writing it failed in the guest); the stream reported it as a
    /// stdin error event.
    #[error("{0}")]
    StdinBroken(String),
    /// Metrics cannot be read on this host for a running sandbox (no procfs, or the VM
    /// process's statistics are not readable).
    #[error("{0}")]
    MetricsUnavailable(String),
    /// TLS interception could not be set up (a CA, key or upstream CA option is unusable).
    #[error("{0}")]
    Tls(String),
    /// A secret's placeholder was headed to a host it is not allowed for.
    #[error("{0}")]
    SecretViolation(String),
    /// No volume of that name exists.
    #[error("{0}")]
    VolumeNotFound(String),
    /// A volume of that name already exists.
    #[error("{0}")]
    VolumeAlreadyExists(String),
    /// The volume is mounted by a running sandbox (`Volume.remove` refused).
    #[error("{0}")]
    VolumeInUse(String),
    /// No snapshot of that name, digest or path exists.
    #[error("{0}")]
    SnapshotNotFound(String),
    /// A snapshot already exists at the destination.
    #[error("{0}")]
    SnapshotAlreadyExists(String),
    /// `Snapshot.create` of a sandbox that is not stopped.
    #[error("{0}")]
    SnapshotSandboxRunning(String),
    /// A snapshot's manifest or disk does not match its digests (truncated, edited).
    #[error("{0}")]
    SnapshotIntegrity(String),
    /// The operation does not apply to this object (e.g. host-side file access to a
    /// disk volume, whose files live inside its filesystem image).
    #[error("{0}")]
    UnsupportedOperation(String),
    /// Something this engine cannot do (e.g. a disk-image root whose filesystem the guest
    /// kernel cannot mount).
    #[error("{0}")]
    Unsupported(String),
    /// Any other host I/O failure.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The stable code shown to users as `Microsandbox::Error#code`.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidConfig(_) => "invalid-config",
            Error::NetworkPolicy(_) => "network-policy-error",
            Error::PortInUse(_) => "port-in-use",
            Error::SandboxNotFound(_) => "sandbox-not-found",
            Error::SandboxAlreadyExists(_) => "sandbox-already-exists",
            Error::SandboxStillRunning(_) => "sandbox-still-running",
            Error::SandboxNotRunning(_) => "sandbox-not-running",
            Error::SandboxDraining(_) => microsandbox_protocol::DRAINING,
            Error::ImageNotFound(_) => "image-not-found",
            Error::ExecFailed(_) => "exec-failed",
            Error::ExecTimeout(_) => "exec-timeout",
            Error::Runtime(_) => "runtime-error",
            Error::Boot(_) => "boot-failed",
            Error::Protocol(_) => "protocol-error",
            Error::Filesystem(_) => "filesystem-error",
            Error::PathNotFound(_) => "path-not-found",
            Error::ImageInUse(_) => "image-in-use",
            Error::Patch(_) => "patch-failed",
            Error::Registry(_) => "registry-error",
            Error::Auth(_) => "registry-auth-failed",
            Error::PlatformNotFound(_) => "platform-not-found",
            Error::Cancelled => "cancelled",
            Error::InheritedHandle(_) => "inherited-handle",
            Error::StdinClosed(_) => "stdin-closed",
            Error::StdinBroken(_) => "stdin-broken",
            Error::MetricsUnavailable(_) => "metrics-unavailable",
            Error::Tls(_) => "tls-error",
            Error::SecretViolation(_) => "secret-violation",
            Error::VolumeNotFound(_) => "volume-not-found",
            Error::VolumeAlreadyExists(_) => "volume-already-exists",
            Error::VolumeInUse(_) => "volume-in-use",
            Error::UnsupportedOperation(_) => "unsupported-operation",
            Error::SnapshotNotFound(_) => "snapshot-not-found",
            Error::SnapshotAlreadyExists(_) => "snapshot-already-exists",
            Error::SnapshotSandboxRunning(_) => "snapshot-sandbox-running",
            Error::SnapshotIntegrity(_) => "snapshot-integrity",
            Error::Unsupported(_) => "unsupported",
            Error::Io { .. } => "io-error",
        }
    }
}

/// Adds "what we were doing" to an `io::Error`.
pub trait IoContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io { context: what(), source })
    }
}

impl Error {
    /// The error for a session the supervisor refused with `Error{code}`, if the code is
    /// one of the supervisor's own (not the agent's).
    pub fn from_supervisor_code(code: &str, message: &str) -> Option<Error> {
        (code == microsandbox_protocol::DRAINING).then(|| Error::SandboxDraining(message.to_string()))
    }
}

impl From<microsandbox_protocol::FrameError> for Error {
    /// Frames the engine reads come from a sandbox's supervisor over its control socket.
    /// The supervisor closes client connections only when it exits (its VM stopped or
    /// died, or it was killed), so a connection that breaks — reset, broken pipe, EOF in
    /// the middle of a frame — means the sandbox is gone, not that someone lied.
    fn from(e: microsandbox_protocol::FrameError) -> Self {
        use microsandbox_protocol::FrameError;
        use std::io::ErrorKind;
        match e {
            FrameError::Truncated => connection_lost(),
            FrameError::Io(io)
                if matches!(
                    io.kind(),
                    ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                        | ErrorKind::UnexpectedEof
                        | ErrorKind::NotConnected
                ) =>
            {
                connection_lost()
            }
            e => Error::Protocol(format!("agent channel: {e}")),
        }
    }
}

fn connection_lost() -> Error {
    Error::SandboxNotRunning(
        "the connection to the sandbox broke: its VM or supervisor is gone (stopped, killed or crashed); \
         start it again with Sandbox.start"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use microsandbox_protocol::FrameError;

    #[test]
    fn a_broken_connection_means_the_sandbox_is_gone() {
        for kind in [std::io::ErrorKind::ConnectionReset, std::io::ErrorKind::BrokenPipe, std::io::ErrorKind::UnexpectedEof] {
            let e = Error::from(FrameError::Io(io::Error::from(kind)));
            assert_eq!(e.code(), "sandbox-not-running", "{kind:?}");
        }
        assert_eq!(Error::from(FrameError::Truncated).code(), "sandbox-not-running");
        assert_eq!(Error::from(FrameError::UnknownKind(200)).code(), "protocol-error");
    }
}
