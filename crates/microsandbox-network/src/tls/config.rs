//! The `tls:` options as the supervisor receives them, and the input helpers: a
//! certificate or key is given as a path or as PEM text (like `registry_ca_certs:`).

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// A TLS setup failure; the message names the option, never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);

impl TlsError {
    /// Stable error code for the Ruby mapping.
    pub const CODE: &'static str = "tls-error";

    pub fn new(msg: impl Into<String>) -> TlsError {
        TlsError(msg.into())
    }
}

/// The public part of the `tls:` options (no private key: the interception CA's key
/// travels with the secrets, outside any file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Host patterns (`name`, `*.suffix`) never intercepted.
    pub bypass: Vec<String>,
    pub verify_upstream: bool,
    /// TCP ports whose connections to secret-carrying hosts are intercepted.
    pub intercepted_ports: Vec<u16>,
    /// Drop UDP/443 (QUIC) toward intercepted hosts so clients fall back to TCP.
    pub block_quic: bool,
    /// Extra upstream trust anchors, PEM text.
    pub upstream_ca_certs: Vec<String>,
    /// Intercept every host on the intercepted ports, not only those carrying a secret.
    pub intercept_all: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            bypass: Vec::new(),
            verify_upstream: true,
            intercepted_ports: vec![443],
            block_quic: true,
            upstream_ca_certs: Vec::new(),
            intercept_all: false,
        }
    }
}

/// Whether `s` is PEM text rather than a path.
pub fn is_pem_text(s: &str) -> bool {
    s.contains("-----BEGIN ")
}

/// Reads `input` (PEM text or a path to a PEM file) as text; `option` names it in errors.
pub fn pem_or_path(input: &str, option: &str) -> Result<String, TlsError> {
    if is_pem_text(input) {
        return Ok(input.to_string());
    }
    let path = Path::new(input);
    let text = std::fs::read_to_string(path)
        .map_err(|e| TlsError::new(format!("{option}: cannot read {}: {e}; give a PEM file path or PEM text", path.display())))?;
    if !is_pem_text(&text) {
        return Err(TlsError::new(format!("{option}: {} is not a PEM file", path.display())));
    }
    Ok(text)
}

/// Reads a private key given as PEM text or a path. A key *file* readable by group or
/// others is refused (like ssh does), so a CA key that can sign for any name stays private.
pub fn key_pem_or_path(input: &str, option: &str) -> Result<String, TlsError> {
    if !is_pem_text(input) {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(input)
            .map_err(|e| TlsError::new(format!("{option}: cannot read {input}: {e}")))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TlsError::new(format!(
                "{option}: {input} is readable by other users; chmod 600 it"
            )));
        }
    }
    pem_or_path(input, option)
}

/// Every certificate in PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TlsError::new("PEM certificate does not parse"))?;
    if certs.is_empty() {
        return Err(TlsError::new("no certificate in PEM text"));
    }
    Ok(certs)
}

/// The private key in PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::new("no usable private key in PEM text"))
}
