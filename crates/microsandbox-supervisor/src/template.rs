//! The supervisor's side of templates (see `microsandbox::template`): saving a booted VM
//! through QMP, and making a restored VM this sandbox (the `Restore` handshake).

use std::time::{Duration, Instant};

use microsandbox_protocol::{read_frame_async, write_frame_async, Frame, Kind, Ready, RestoreIdentity, RESTORE_ENTROPY_BYTES};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest QMP line read (QMP answers here are small; a runaway monitor must not grow memory).
const MAX_QMP_LINE: usize = 64 * 1024;
/// How often `query-migrate` is polled while saving.
const POLL: Duration = Duration::from_millis(20);

/// A minimal QMP client: one command at a time, events skipped.
struct Qmp {
    rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    async fn connect(path: &std::path::Path, within: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + within;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => return Err(format!("cannot connect to QMP at {}: {e}", path.display())),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        };
        let (rd, wr) = stream.into_split();
        let mut q = Qmp { rd: BufReader::new(rd), wr };
        q.line().await?; // greeting
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn line(&mut self) -> Result<Value, String> {
        let mut buf = Vec::new();
        loop {
            let chunk = self.rd.fill_buf().await.map_err(|e| format!("QMP: {e}"))?;
            if chunk.is_empty() {
                return Err("QMP closed".into());
            }
            let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            buf.extend_from_slice(&chunk[..take]);
            self.rd.consume(take);
            if buf.len() > MAX_QMP_LINE {
                return Err("QMP line too long".into());
            }
            if done {
                return serde_json::from_slice(&buf).map_err(|e| format!("QMP: {e}"));
            }
        }
    }

    /// Runs `cmd` and returns its `return` value; an `error` answer is an error.
    async fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let mut msg = serde_json::to_vec(&json!({"execute": cmd, "arguments": args})).unwrap();
        msg.push(b'\n');
        self.wr.write_all(&msg).await.map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.line().await?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {}", e.get("desc").and_then(Value::as_str).unwrap_or("error")));
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

/// Saves the running VM to `state` (relative to QEMU's working directory, the build
/// directory: no path ever reaches a shell) and has QEMU quit. The guest is idle at its
/// `Ready`, so a live migration converges in a pass or two.
pub async fn save(qmp: &std::path::Path, state: &str, within: Duration) -> Result<(), String> {
    if !state.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return Err(format!("refusing state file name {state:?}"));
    }
    let deadline = Instant::now() + within;
    let mut q = Qmp::connect(qmp, within).await?;
    // QEMU 7.2 throttles migration to 32 MiB/s by default; this is a local file.
    q.execute("migrate-set-parameters", json!({"max-bandwidth": 16u64 << 30, "downtime-limit": 2000})).await?;
    q.execute("migrate", json!({"uri": format!("exec:cat > {state}")})).await?;
    loop {
        let st = q.execute("query-migrate", json!({})).await?;
        match st.get("status").and_then(Value::as_str) {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => {
                return Err(format!(
                    "QEMU could not save the VM: {}",
                    st.get("error-desc").and_then(Value::as_str).unwrap_or("migration failed")
                ))
            }
            _ if Instant::now() >= deadline => return Err("saving the VM timed out".into()),
            _ => tokio::time::sleep(POLL).await,
        }
    }
    // `completed` is reported once the stream is written and the disks are flushed and
    // released (QEMU inactivates them at the end of a migration); `cat` may still be
    // writing its last bytes, which the caller waits for by waiting for QEMU's exit.
    let _ = q.execute("quit", json!({})).await;
    Ok(())
}

/// Fresh host randomness for a restored guest, hex.
fn entropy() -> Result<String, String> {
    let mut buf = [0u8; RESTORE_ENTROPY_BYTES];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: writes at most `buf.len() - got` bytes into `buf[got..]`.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("getrandom: {e}"));
        }
        got += n as usize;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Makes the just-restored guest this sandbox: sends its identity and waits for the
/// agent's `Ready`, which it sends only after applying all of it.
pub async fn handshake(stream: &mut UnixStream, hostname: &str) -> Result<Ready, String> {
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_nanos() as u64;
    let id = RestoreIdentity { entropy: entropy()?, realtime_ns, hostname: hostname.to_string() };
    write_frame_async(stream, &Frame::json(0, Kind::Restore, &id)).await.map_err(|e| format!("agent channel: {e}"))?;
    let frame = read_frame_async(stream)
        .await
        .map_err(|e| format!("agent channel: {e}"))?
        .ok_or("the agent channel closed during the restore")?;
    match frame.kind {
        Kind::Ready => frame.parse().map_err(|e| e.to_string()),
        Kind::Error => {
            let e: microsandbox_protocol::ErrorMsg = frame.parse().map_err(|e| e.to_string())?;
            Err(format!("the agent could not take this sandbox's identity: {}", e.message))
        }
        other => Err(format!("the agent sent {other:?} instead of Ready after the restore")),
    }
}
