//! TLS interception: the host ends the guest's TLS with a leaf certificate for the name
//! the guest asked for, and opens its own verified TLS connection upstream; the bytes in
//! between go through the secrets engine ([`crate::secrets::Substituter`]).
//!
//! - [`config`]: the `tls:` options ([`TlsConfig`]), PEM-or-path inputs, key-file checks,
//!   the [`TlsError`] type.
//! - [`ca`]: the interception CA ([`InterceptCa`]): generated per sandbox in memory
//!   (ECDSA P-256, its key never on disk) or given by the user.
//! - [`leaf`]: leaf certificates per SNI, signed by the CA and kept in a bounded cache
//!   ([`LeafCache`], also the rustls certificate resolver).
//! - [`server_config`] / [`upstream_config`]: the two rustls configurations, both on the
//!   aws-lc-rs provider the workspace already uses (one TLS stack in the build).

pub mod ca;
pub mod config;
pub mod leaf;

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

pub use ca::InterceptCa;
/// The rustls the configurations are built with (one version in the build).
pub use rustls;
pub use config::{TlsConfig, TlsError};
pub use leaf::LeafCache;

/// The crypto provider every config here uses (aws-lc-rs, as the rest of the build).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// ALPN offered to the guest and upstream: HTTP/1.1 only, since substitution reads
/// HTTP/1.x (a client that insists on h2 fails the handshake instead of being let
/// through unread).
pub const ALPN: &[&[u8]] = &[b"http/1.1"];

/// The guest-facing server config: leaf chosen by SNI from `leaves`; no SNI ⇒ no
/// certificate ⇒ the handshake fails.
pub fn server_config(leaves: Arc<LeafCache>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(format!("TLS server setup: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(leaves);
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The upstream client config: trusts the host's roots (when `host_roots`) plus
/// `extra_cas` (PEM text); `verify: false` accepts any certificate (the reference's
/// `verify_upstream: false`, for tests against self-signed servers only).
pub fn upstream_config(verify: bool, extra_cas: &[String], host_roots: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new(format!("TLS client setup: {e}")))?;
    let mut cfg = if verify {
        let mut roots = RootCertStore::empty();
        if host_roots {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
        for (i, pem) in extra_cas.iter().enumerate() {
            let certs = config::certs_from_pem(pem)
                .map_err(|_| TlsError::new(format!("tls.upstream_ca_cert[{i}] holds no PEM certificate")))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| TlsError::new(format!("tls.upstream_ca_cert[{i}] is not a usable CA certificate: {e}")))?;
            }
        }
        // No roots at all (a host without a CA bundle and no upstream_ca_cert) is not an
        // error here: every upstream is then refused, which the stack reports per
        // connection as a tls-error naming tls.upstream_ca_cert.
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth()
    };
    cfg.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// `verify_upstream: false`: signatures are still checked (the handshake stays a real
/// one), the chain and name are not.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
