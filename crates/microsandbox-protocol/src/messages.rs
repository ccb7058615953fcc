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
    /// Kill the process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// When true the host sends `Stdin` frames then `StdinEof`; otherwise stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
}

/// `Exited`: how the process ended. Sent after all of its output frames.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exited {
    /// Exit status when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// True when the agent killed it because `timeout_ms` elapsed.
    #[serde(default)]
    pub timed_out: bool,
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

/// `Signal`: deliver `signal` to the session's process group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignalMsg {
    pub signal: i32,
}

/// `Stop`: ask the supervisor to shut the guest down, killing it after `timeout_ms`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StopRequest {
    pub timeout_ms: u64,
}

/// `Stopped`: the VM is gone; `graceful` is false when it had to be killed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stopped {
    pub graceful: bool,
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
}
