//! The interception CA: the trust anchor the guest installs so the host can end its TLS.
//!
//! Choice (DESIGN.md "Secrets"): one CA per *sandbox*, generated in memory when the
//! sandbox starts (ECDSA P-256: well under a millisecond, see the `ca_generation_time`
//! test) — its key never touches the disk, and a guest that keeps the certificate gains
//! nothing against any other sandbox. A user-given CA (`intercept_ca_cert:` +
//! `intercept_ca_key:`) replaces it, e.g. to pre-install the anchor in an image.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use super::config::TlsError;

/// Lifetime of a generated CA (sandboxes are short-lived; a long-running one restarts
/// into a new CA with its next start).
const CA_VALIDITY: Duration = Duration::days(30);

/// A CA certificate plus its signing key. `Debug` never prints the key.
pub struct InterceptCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for InterceptCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InterceptCa").field("key", &"[REDACTED]").finish_non_exhaustive()
    }
}

impl InterceptCa {
    /// Generates a fresh CA named after `label` (e.g. the sandbox name).
    pub fn generate(label: &str) -> Result<InterceptCa, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| TlsError::new(format!("interception CA key generation failed: {e}")))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let label: String = label.chars().filter(|c| c.is_ascii_graphic()).take(40).collect();
        dn.push(DnType::CommonName, format!("microsandbox interception CA {label}"));
        dn.push(DnType::OrganizationName, "microsandbox");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::new(format!("interception CA signing failed: {e}")))?;
        Ok(InterceptCa { cert_pem: cert.pem(), cert_der: cert.der().clone(), issuer: Issuer::new(params, key) })
    }

    /// Uses a CA given as PEM texts (see [`super::config::pem_or_path`] for paths).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<InterceptCa, TlsError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|_| TlsError::new("tls.intercept_ca_key holds no usable private key (PEM)"))?;
        let certs = super::config::certs_from_pem(cert_pem)
            .map_err(|_| TlsError::new("tls.intercept_ca_cert holds no PEM certificate"))?;
        let cert_der = certs.into_iter().next().expect("non-empty");
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|_| TlsError::new("tls.intercept_ca_cert does not parse as an X.509 CA certificate"))?;
        // The key must be the certificate's: otherwise every leaf fails verification.
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|_| TlsError::new("tls.intercept_ca_cert does not parse as an X.509 certificate"))?;
        use rcgen::PublicKeyData;
        if x509.public_key().subject_public_key.data.as_ref() != issuer.key().der_bytes() {
            return Err(TlsError::new("tls.intercept_ca_key does not belong to tls.intercept_ca_cert"));
        }
        let cert_pem = cert_pem.to_string();
        Ok(InterceptCa { cert_pem, cert_der, issuer })
    }

    /// The CA certificate, PEM (public: the guest's trust store gets it).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER (sent after each leaf in the chain).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
}
