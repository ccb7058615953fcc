//! The sandbox's secrets and TLS interception state, held in this process's memory only.
//!
//! The engine hands the secret values (and a user-given interception CA) over the
//! socket named by `MSB_SECRETS_FD`, never through a file; they are read once, before the
//! VM starts, and kept here for the network stack ([`get`]), which calls [`terminate`]
//! on a `block_and_terminate` violation. Log lines name secrets by
//! env var only.

use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::{Arc, OnceLock};

use microsandbox::sandbox::secrets::{read_handover, MAX_HANDOVER, SECRETS_FD, SECRETS_FD_ENV};
use microsandbox::sandbox::spec::SupervisorSpec;
use microsandbox_network::intercept::Interception;
use microsandbox_network::tls::{self, InterceptCa};
use zeroize::Zeroizing;

static STATE: OnceLock<Arc<Interception>> = OnceLock::new();
static TERMINATE: OnceLock<tokio::sync::Notify> = OnceLock::new();

/// The sandbox's interception state, when it intercepts anything.
pub fn get() -> Option<Arc<Interception>> {
    STATE.get().cloned()
}

fn terminate_notify() -> &'static tokio::sync::Notify {
    TERMINATE.get_or_init(tokio::sync::Notify::new)
}

/// Called by the network stack's thread on a `block_and_terminate` violation: the
/// supervisor stops the sandbox (stop record source `secret-violation`).
pub fn terminate(why: &str) {
    eprintln!("msb: stopping the sandbox: {why} (block_and_terminate)");
    terminate_notify().notify_one();
}

/// Resolves once [`terminate`] was called (a permit is kept if it came first).
pub async fn terminated() {
    terminate_notify().notified().await
}

/// Reads the handover when the engine sent one; `Err((code, message))` for the startup
/// report.
pub fn load(spec: &SupervisorSpec) -> Result<(), (String, String)> {
    let Some(fd) = std::env::var_os(SECRETS_FD_ENV) else { return Ok(()) };
    std::env::remove_var(SECRETS_FD_ENV);
    if fd.to_str() != Some(&SECRETS_FD.to_string()) {
        return Err(("runtime-error".into(), format!("{SECRETS_FD_ENV} must be {SECRETS_FD}")));
    }
    // SAFETY: the engine placed the socket at this fd for us alone; we take ownership.
    let mut file = unsafe { std::fs::File::from_raw_fd(SECRETS_FD) };
    let read_fail = |e: std::io::Error| ("runtime-error".to_string(), format!("cannot read the secrets handover: {e}"));
    // An 8-byte little-endian length, then exactly that many bytes (no wait for EOF).
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(read_fail)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HANDOVER as u64 {
        return Err(("invalid-config".into(), "secrets handover over 32 MiB".into()));
    }
    let mut bytes = Zeroizing::new(vec![0u8; len as usize]);
    file.read_exact(&mut bytes).map_err(read_fail)?;
    drop(file);
    let (set, user_ca) = read_handover(&bytes).map_err(|e| (e.code().to_string(), e.to_string()))?;
    let tls_cfg = spec.tls.clone().unwrap_or_default();
    let tls_fail = |e: tls::TlsError| ("tls-error".to_string(), e.0);
    let ca = match user_ca {
        Some(ca) => ca,
        None => InterceptCa::generate(&spec.name).map_err(tls_fail)?,
    };
    let names: Vec<&str> = set.secrets.iter().map(|s| s.env.as_str()).collect();
    eprintln!("msb: {} secret(s) held in memory for interception: {}", names.len(), names.join(", "));
    // Upstream certificates are checked against the host's roots plus tls.upstream_ca_cert.
    let state = Interception::new(set, tls_cfg, ca, true).map_err(tls_fail)?;
    let _ = STATE.set(Arc::new(state));
    Ok(())
}
