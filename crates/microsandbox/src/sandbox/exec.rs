//! Host side of one exec session over a supervisor control connection.

use std::time::Duration;

use microsandbox_protocol::{
    read_frame_async, write_frame_async, ErrorMsg, ExecRequest, Exited, Frame, Kind, Started, StdinError, WinSize,
    MAX_CHUNK,
};
use tokio::net::UnixStream;

use super::config::{validate_env, validate_guest_path};
use crate::error::{Error, Result};

/// Session id on a connection that carries a single session.
const SESSION: u32 = 1;
/// Collected output larger than this (stdout + stderr) aborts the exec: memory stays bounded
/// however much a guest writes.
pub const MAX_COLLECTED_OUTPUT: usize = 256 << 20;
/// How long past the guest-side timeout the host waits before giving up on the agent.
const TIMEOUT_GRACE: Duration = Duration::from_secs(10);

pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One command to run.
#[derive(Debug, Clone, Default)]
pub struct ExecCall {
    pub program: String,
    pub args: Vec<String>,
    /// Added to (and overriding) the sandbox's environment.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub timeout: Option<Duration>,
    pub stdin: Option<Vec<u8>>,
    /// Run as this guest user (`name`, `uid`, `name:group`, `uid:gid`); default: the sandbox's.
    pub user: Option<String>,
    /// Resource limits for the command.
    pub rlimits: Vec<microsandbox_protocol::Rlimit>,
    /// Run on a pseudo-terminal of this initial size: output is merged into stdout, and
    /// stdin stays open (a collected exec closes it with the terminal's EOF character).
    pub tty: Option<WinSize>,
}

/// Terminal type a tty command gets when neither the sandbox nor the call sets `TERM`.
pub const DEFAULT_TERM: &str = "xterm";

/// Checks a terminal size: both dimensions at least 1 (at most 65535 by type).
pub fn validate_winsize(size: WinSize) -> Result<()> {
    if size.is_valid() {
        Ok(())
    } else {
        Err(Error::InvalidConfig(format!(
            "terminal size {}x{} is invalid: rows and cols must be between 1 and 65535",
            size.rows, size.cols
        )))
    }
}

/// A finished command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecResult {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Set when part of the call's stdin never reached the command (it closed its stdin
    /// or exited first): says how much, and why.
    pub stdin_error: Option<String>,
}

/// Linux's errno for a write to a pipe nobody reads (the same number in every guest).
const EPIPE: i32 = 32;

/// Words an agent's `StdinError` for the caller: `accepted` bytes were handed to the
/// stream, `written` of them reached the command. The errno comes from the guest, so
/// only a plausible number is translated.
pub(crate) fn stdin_failed_message(err: &StdinError, accepted: u64) -> String {
    let why = match err.errno {
        Some(EPIPE) => "the command closed its stdin (broken pipe)".to_string(),
        Some(e) if (1..4096).contains(&e) => format!("writing the command's stdin failed ({})", std::io::Error::from_raw_os_error(e)),
        _ => "writing the command's stdin failed".to_string(),
    };
    let lost = accepted.saturating_sub(err.written);
    format!("{why} after {} bytes reached it; {lost} of the {accepted} bytes written to stdin so far were not delivered", err.written)
}

/// Words bytes the agent never got into the command's stdin before it ended.
pub(crate) fn stdin_unread_message(written: u64, accepted: u64) -> String {
    format!(
        "the command ended after {written} bytes reached its stdin; {} of the {accepted} bytes written to stdin were not delivered",
        accepted.saturating_sub(written)
    )
}

/// The caller's stdin bytes that an `Exited` says never reached the command, as a message.
pub(crate) fn undelivered_at_exit(ex: &Exited, accepted: u64) -> Option<String> {
    let written = ex.stdin_written?;
    (accepted > written).then(|| stdin_unread_message(written, accepted))
}

impl ExecCall {
    /// Validates the call and merges environments: PATH default < sandbox env < call env.
    pub fn into_request(&self, sandbox_env: &[(String, String)], workdir: Option<&str>, default_user: Option<&str>) -> Result<ExecRequest> {
        for l in &self.rlimits {
            if !microsandbox_protocol::RLIMIT_NAMES.contains(&l.resource.as_str()) {
                return Err(Error::InvalidConfig(format!(
                    "unknown rlimit {:?}; use one of {}",
                    l.resource,
                    microsandbox_protocol::RLIMIT_NAMES.join(", ")
                )));
            }
            if l.soft > l.hard {
                return Err(Error::InvalidConfig(format!("rlimit {}: soft limit above hard limit", l.resource)));
            }
        }
        let user = self.user.clone().or_else(|| default_user.map(str::to_string));
        if let Some(u) = &user {
            if u.is_empty() || u.contains(['\0', ',', ' ']) || u.len() > 256 {
                return Err(Error::InvalidConfig(format!("invalid user {u:?}; use name, uid, name:group or uid:gid")));
            }
        }
        if self.program.is_empty() || self.program.contains('\0') {
            return Err(Error::InvalidConfig("command must be a non-empty string without NUL bytes".into()));
        }
        if let Some(i) = self.args.iter().position(|a| a.contains('\0')) {
            return Err(Error::InvalidConfig(format!("argument {i} contains a NUL byte")));
        }
        validate_env(&self.env)?;
        if let Some(c) = &self.cwd {
            validate_guest_path("cwd", c)?;
        }
        if let Some(size) = self.tty {
            validate_winsize(size)?;
        }
        let mut env: Vec<(String, String)> = vec![("PATH".into(), DEFAULT_PATH.into())];
        if self.tty.is_some() {
            // Full-screen programs need a terminal type; the caller's env may override it.
            env.push(("TERM".into(), DEFAULT_TERM.into()));
        }
        for (k, v) in sandbox_env.iter().chain(self.env.iter()) {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        validate_env(&env)?;
        Ok(ExecRequest {
            program: self.program.clone(),
            args: self.args.clone(),
            env,
            cwd: self.cwd.clone().or_else(|| workdir.map(str::to_string)),
            // The sandbox's workdir is created on first use, owned by the sandbox's user
            // (as an image's WORKDIR is owned by its USER); a per-call cwd must exist.
            create_cwd: match (&self.cwd, workdir) {
                (None, Some(_)) => Some(default_user.unwrap_or("0").to_string()),
                _ => None,
            },
            timeout_ms: self.timeout.map(|t| t.as_millis().max(1) as u64),
            // A terminal's input is always open; without data it is closed at once (EOF).
            stdin: self.stdin.is_some() || self.tty.is_some(),
            user,
            rlimits: self.rlimits.clone(),
            tty: self.tty,
            restricted: false,
        })
    }
}

fn vm_gone() -> Error {
    Error::SandboxNotRunning("the sandbox VM exited during the command".into())
}

/// Sends `req` (and `stdin`) and collects output until the session ends.
///
/// Stdin the command does not take (it closes its stdin, or exits, before reading it all)
/// never makes this wait: the session ends with the command, the rest of `stdin` is not
/// sent, and [`ExecResult::stdin_error`] says how many bytes were not delivered.
pub async fn run(conn: UnixStream, req: ExecRequest, stdin: Option<Vec<u8>>, timeout: Option<Duration>) -> Result<ExecResult> {
    let program = req.program.clone();
    let (mut rd, mut wr) = conn.into_split();
    write_frame_async(&mut wr, &Frame::json(SESSION, Kind::Exec, &req)).await.map_err(|_| vm_gone())?;
    let accepted = stdin.as_ref().map_or(0, |d| d.len() as u64);

    let writer = async move {
        if let Some(data) = stdin {
            for chunk in data.chunks(MAX_CHUNK) {
                if write_frame_async(&mut wr, &Frame::data(SESSION, Kind::Stdin, chunk.to_vec())).await.is_err() {
                    return std::future::pending::<std::convert::Infallible>().await;
                }
            }
            let _ = write_frame_async(&mut wr, &Frame::data(SESSION, Kind::StdinEof, Vec::new())).await;
        }
        // Keep the connection's write half open until the reader ends.
        std::future::pending::<std::convert::Infallible>().await
    };

    let name = program.clone();
    let reader = async move {
        let program = name;
        let mut out = ExecResult::default();
        loop {
            let frame = read_frame_async(&mut rd).await?.ok_or_else(vm_gone)?;
            if frame.id != SESSION {
                return Err(Error::Protocol(format!("frame for unknown session {}", frame.id)));
            }
            match frame.kind {
                Kind::Started => {
                    frame.parse::<Started>()?;
                }
                Kind::Stdout => out.stdout.extend_from_slice(&frame.payload),
                Kind::Stderr => out.stderr.extend_from_slice(&frame.payload),
                Kind::StdinError => {
                    let err: StdinError = frame.parse()?;
                    out.stdin_error.get_or_insert_with(|| stdin_failed_message(&err, accepted));
                }
                Kind::Exited => {
                    let ex: Exited = frame.parse()?;
                    if ex.timed_out {
                        return Err(Error::ExecTimeout(format!(
                            "{program} did not finish within its timeout and was killed"
                        )));
                    }
                    out.code = ex.code;
                    out.signal = ex.signal;
                    if out.stdin_error.is_none() {
                        out.stdin_error = undelivered_at_exit(&ex, accepted);
                    }
                    return Ok(out);
                }
                Kind::Error => {
                    let e: ErrorMsg = frame.parse()?;
                    if let Some(err) = Error::from_supervisor_code(&e.code, &e.message) {
                        return Err(err);
                    }
                    return Err(match e.code.as_str() {
                        "exec-failed" => Error::ExecFailed(e.message),
                        "invalid-request" => Error::InvalidConfig(e.message),
                        _ => Error::Protocol(format!("agent error {}: {}", e.code, e.message)),
                    });
                }
                other => return Err(Error::Protocol(format!("unexpected {other:?} frame in an exec session"))),
            }
            if out.stdout.len() + out.stderr.len() > MAX_COLLECTED_OUTPUT {
                return Err(Error::ExecFailed(format!(
                    "{program} wrote more than {MAX_COLLECTED_OUTPUT} bytes of output; it was killed (stream large output instead)"
                )));
            }
        }
    };

    // The session ends with the reader; stdin not yet sent then has nowhere to go.
    let both = async {
        tokio::select! {
            res = reader => res,
            never = writer => match never {},
        }
    };
    match timeout {
        // The agent enforces the timeout; this is the backstop for an agent that doesn't.
        Some(t) => tokio::time::timeout(t + TIMEOUT_GRACE, both)
            .await
            .unwrap_or_else(|_| Err(Error::ExecTimeout(format!("{program} did not finish within its timeout")))),
        None => both.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge_order() {
        let call = ExecCall {
            program: "x".into(),
            env: vec![("A".into(), "call".into())],
            ..Default::default()
        };
        let req = call
            .into_request(&[("A".into(), "box".into()), ("B".into(), "box".into())], Some("/w"), None)
            .unwrap();
        let get = |k: &str| req.env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("call"));
        assert_eq!(get("B"), Some("box"));
        assert_eq!(get("PATH"), Some(DEFAULT_PATH));
        assert_eq!(req.cwd.as_deref(), Some("/w"));
    }

    #[test]
    fn tty_defaults_term_and_checks_size() {
        let call = ExecCall { program: "x".into(), tty: Some(WinSize { rows: 24, cols: 80 }), ..Default::default() };
        let req = call.into_request(&[], None, None).unwrap();
        assert!(req.stdin);
        assert!(req.env.contains(&("TERM".into(), DEFAULT_TERM.into())));
        let req = call.into_request(&[("TERM".into(), "vt100".into())], None, None).unwrap();
        assert_eq!(req.env.iter().filter(|(k, _)| k == "TERM").count(), 1);
        assert!(req.env.contains(&("TERM".into(), "vt100".into())));
        let bad = ExecCall { program: "x".into(), tty: Some(WinSize { rows: 0, cols: 80 }), ..Default::default() };
        assert!(matches!(bad.into_request(&[], None, None), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn rejects_nul() {
        let call = ExecCall { program: "a\0".into(), ..Default::default() };
        assert!(call.into_request(&[], None, None).is_err());
        let call = ExecCall { program: "a".into(), args: vec!["\0".into()], ..Default::default() };
        assert!(call.into_request(&[], None, None).is_err());
    }
}
