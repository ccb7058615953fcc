//! Leaf certificates for the names guests connect to, signed by the interception CA and
//! kept in a bounded least-recently-used cache; also the rustls resolver that picks the
//! leaf by SNI.
//!
//! Invariants: a leaf is made only for a syntactically valid DNS name (the SNI is
//! guest-controlled); the cache never holds more than its capacity; a leaf is reused
//! until it is within an hour of expiry.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::{Duration, OffsetDateTime};

use super::ca::InterceptCa;
use super::config::TlsError;

/// Default number of cached leaves (as upstream).
pub const DEFAULT_CAPACITY: usize = 1000;
/// Lifetime of a leaf.
const LEAF_VALIDITY: Duration = Duration::hours(24);

struct Entry {
    key: Arc<CertifiedKey>,
    expires: OffsetDateTime,
}

#[derive(Default)]
struct Lru {
    map: HashMap<String, Entry>,
    order: VecDeque<String>,
}

/// Leaves by name, signed by one CA.
pub struct LeafCache {
    ca: Arc<InterceptCa>,
    capacity: usize,
    inner: Mutex<Lru>,
}

impl fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCache").field("capacity", &self.capacity).field("len", &self.len()).finish()
    }
}

/// Whether `name` is a DNS name we issue for (ASCII LDH labels, ≤ 253 bytes, at least
/// one dot — no IP literals, no single labels, no wildcards).
pub fn valid_sni(name: &str) -> bool {
    name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

impl LeafCache {
    pub fn new(ca: Arc<InterceptCa>, capacity: usize) -> LeafCache {
        LeafCache { ca, capacity: capacity.max(1), inner: Mutex::new(Lru::default()) }
    }

    /// Cached leaves.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|l| l.map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The leaf for `name` (lower-cased), generating and caching it when needed.
    pub fn get(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !valid_sni(&name) {
            return Err(TlsError::new("server name is not a DNS name a certificate can be issued for"));
        }
        let now = OffsetDateTime::now_utc();
        {
            let mut lru = self.inner.lock().map_err(|_| TlsError::new("leaf cache poisoned"))?;
            if let Some(e) = lru.map.get(&name) {
                if e.expires - Duration::hours(1) > now {
                    let key = Arc::clone(&e.key);
                    lru.order.retain(|n| n != &name);
                    lru.order.push_back(name);
                    return Ok(key);
                }
            }
        }
        // Generated outside the lock: two racing handshakes may both sign; one wins.
        let (key, expires) = self.issue(&name, now)?;
        let mut lru = self.inner.lock().map_err(|_| TlsError::new("leaf cache poisoned"))?;
        lru.order.retain(|n| n != &name);
        while lru.map.len() >= self.capacity {
            match lru.order.pop_front() {
                Some(old) => {
                    lru.map.remove(&old);
                }
                None => break,
            }
        }
        lru.map.insert(name.clone(), Entry { key: Arc::clone(&key), expires });
        lru.order.push_back(name);
        Ok(key)
    }

    fn issue(&self, name: &str, now: OffsetDateTime) -> Result<(Arc<CertifiedKey>, OffsetDateTime), TlsError> {
        let fail = |e: rcgen::Error| TlsError::new(format!("leaf certificate generation failed: {e}"));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(fail)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - Duration::hours(1);
        let expires = now + LEAF_VALIDITY;
        params.not_after = expires;
        let cert = params.signed_by(&key, &self.ca.issuer).map_err(fail)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = super::provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| TlsError::new(format!("leaf key unusable: {e}")))?;
        let chain = vec![cert.der().clone(), self.ca.cert_der().clone()];
        Ok((Arc::new(CertifiedKey::new(chain, signer)), expires))
    }
}

impl ResolvesServerCert for LeafCache {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // No SNI or an unusable one: no certificate, the handshake fails (never a guess).
        self.get(hello.server_name()?).ok()
    }
}
