//! Puts the sandbox's interception CA (and, with `trust_host_cas:`, the host's CA roots)
//! into the guest's trust store at every boot, before the main process starts or a client
//! can connect — through the agent's filesystem operations, like patches.
//!
//! What the guest gets (the certificates are public; no key ever goes in):
//! - [`EXTRA`]: only the added certificates (`NODE_EXTRA_CA_CERTS` points here: Node adds
//!   them to its own roots);
//! - [`BUNDLE`]: the image's system roots plus the added certificates (`SSL_CERT_FILE`,
//!   `REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE` point here: those *replace* the default roots);
//! - every system bundle the image has ([`SYSTEM_BUNDLES`]: Debian/Ubuntu/Alpine,
//!   Alpine's `cert.pem`, Fedora/RHEL) gets the added certificates between marker lines,
//!   replaced at every boot (a restarted sandbox has a new CA); an image without one gets
//!   the Debian path, so OpenSSL-based tools that read it trust the CA too.
//!
//! The guest's files are read bounded ([`MAX_BUNDLE`]); what a hostile guest put there
//! only ever goes back into the guest.

use microsandbox_protocol::{ErrorMsg, FsOp, FsRequest, Kind};

use crate::flow::session_channel;
use crate::patches::{Failure, Guest};

/// The added certificates only.
pub const EXTRA: &str = "/.msb/tls/extra.pem";
/// System roots + the added certificates.
pub const BUNDLE: &str = "/.msb/tls/bundle.pem";
/// Where images keep their CA bundle (the first is created when none exists).
pub const SYSTEM_BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem", "/etc/pki/tls/certs/ca-bundle.crt"];
/// Largest guest bundle read (Debian's is ~200 KiB).
const MAX_BUNDLE: usize = 8 * 1024 * 1024;
const BEGIN: &str = "# BEGIN microsandbox: added at boot, replaced at every boot\n";
const END: &str = "# END microsandbox\n";

/// `text` without a block an earlier boot added.
pub fn strip_block(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(b) = rest.find(BEGIN) {
        out.push_str(&rest[..b]);
        match rest[b..].find(END) {
            Some(e) => rest = &rest[b + e + END.len()..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// `text` (stripped) followed by the block holding `pem`.
pub fn with_block(text: &str, pem: &str) -> String {
    let mut out = strip_block(text);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(BEGIN);
    out.push_str(pem.trim_end());
    out.push('\n');
    out.push_str(END);
    out
}

/// Reads a guest file, at most `max` bytes; `Ok(None)` when it does not exist.
async fn read(guest: &Guest, path: &str, max: usize) -> Result<Option<Vec<u8>>, Failure> {
    let (route, mut rx) = session_channel(0, guest.to_agent.clone());
    let id = guest
        .router
        .open_background(route)
        .ok_or_else(|| Failure { message: "the sandbox is draining".into(), errno: None })?;
    let request = FsRequest {
        op: FsOp::Read,
        path: path.into(),
        path2: None,
        recursive: false,
        parents: false,
        mode: None,
        bulk: false,
        window: None,
    };
    let result = async {
        let gone = || Failure { message: "the agent channel closed".into(), errno: None };
        guest.to_agent.send(microsandbox_protocol::Frame::json(id, Kind::FsRequest, &request)).await.map_err(|_| gone())?;
        let mut data = Vec::new();
        loop {
            let f = rx.recv().await.ok_or_else(gone)?;
            match f.kind {
                Kind::FsData => {
                    if data.len() + f.payload.len() > max {
                        return Err(Failure { message: format!("{path} is over {max} bytes"), errno: Some(libc::EFBIG) });
                    }
                    data.extend_from_slice(&f.payload);
                }
                Kind::FsDone => return Ok(Some(data)),
                Kind::Error => {
                    let e: ErrorMsg = f.parse().map_err(|e| Failure { message: e.to_string(), errno: None })?;
                    if e.errno == Some(libc::ENOENT) {
                        return Ok(None);
                    }
                    return Err(Failure { message: e.message, errno: e.errno });
                }
                _ => continue,
            }
        }
    }
    .await;
    guest.router.close(id);
    result
}

/// Installs `pem` (one or more certificates) as described in the module documentation.
pub async fn install(guest: &Guest, pem: &str) -> Result<(), String> {
    let fail = |what: &str, f: Failure| format!("{what}: {}", f.message);
    guest.write_file(EXTRA, 0o644, pem.as_bytes()).await.map_err(|f| fail(EXTRA, f))?;
    let mut base: Option<String> = None;
    for path in SYSTEM_BUNDLES {
        let Some(bytes) = read(guest, path, MAX_BUNDLE).await.map_err(|f| fail(path, f))? else { continue };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        guest.write_file(path, 0o644, with_block(&text, pem).as_bytes()).await.map_err(|f| fail(path, f))?;
        base.get_or_insert_with(|| strip_block(&text));
    }
    if base.is_none() {
        let path = SYSTEM_BUNDLES[0];
        guest.write_file(path, 0o644, with_block("", pem).as_bytes()).await.map_err(|f| fail(path, f))?;
    }
    let bundle = with_block(&base.unwrap_or_default(), pem);
    guest.write_file(BUNDLE, 0o644, bundle.as_bytes()).await.map_err(|f| fail(BUNDLE, f))?;
    Ok(())
}

/// The host's CA roots as PEM (for `trust_host_cas:`): the first bundle file found in the
/// usual places (`SSL_CERT_FILE` first), bounded.
pub fn host_roots_pem() -> Option<String> {
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("SSL_CERT_FILE") {
        candidates.push(p.into());
    }
    candidates.extend(
        ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
            .iter()
            .map(std::path::PathBuf::from),
    );
    for p in candidates {
        let Ok(meta) = std::fs::metadata(&p) else { continue };
        if !meta.is_file() || meta.len() as usize > MAX_BUNDLE {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(&p) {
            if text.contains("-----BEGIN CERTIFICATE-----") {
                return Some(text);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_is_replaced_not_stacked() {
        let sys = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        let once = with_block(sys, "CA1");
        let twice = with_block(&once, "CA2");
        assert!(twice.starts_with(sys));
        assert!(twice.contains("CA2") && !twice.contains("CA1"));
        assert_eq!(twice.matches(BEGIN).count(), 1);
        assert_eq!(strip_block(&twice), sys);
        assert_eq!(with_block("", "CA"), format!("{BEGIN}CA\n{END}"));
        assert_eq!(with_block("no newline", "CA"), format!("no newline\n{BEGIN}CA\n{END}"));
        // An unterminated block (a guest edited it) drops everything after BEGIN.
        assert_eq!(strip_block(&format!("x\n{BEGIN}junk")), "x\n");
    }
}
