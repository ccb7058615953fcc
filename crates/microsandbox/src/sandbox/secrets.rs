//! The `secrets:` / `tls:` create options on the engine side: validation, the guest's
//! placeholder environment, and the handover of the values to the supervisor.
//!
//! Invariants:
//! - a secret value is never serialized into the state database or any file:
//!   [`SecretText`] skips serialization and redacts itself in `Debug`; so does a
//!   `tls.intercept_ca_key` given as PEM text (a key *path* is kept);
//! - the values reach the supervisor only through an inherited pipe ([`SECRETS_FD_ENV`]),
//!   read once at its start and held in its memory;
//! - a stopped sandbox that was created with secrets starts again only when the caller
//!   passes the values again ([`SandboxSecrets::merge_for_start`]).

use std::fmt;

use microsandbox_network::secrets::SecretSet;
use microsandbox_network::tls::{self, TlsConfig};
use serde::{Deserialize, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Environment variable naming the fd the supervisor reads the secrets from.
pub const SECRETS_FD_ENV: &str = "MSB_SECRETS_FD";
/// The fd number the secrets pipe gets in the supervisor.
pub const SECRETS_FD: i32 = 4;
/// Most bytes the supervisor reads from the secrets pipe.
pub const MAX_HANDOVER: usize = 32 * 1024 * 1024;

/// Text that must never be stored or printed (a secret value, a PEM private key).
#[derive(Clone, Default)]
pub struct SecretText(pub Zeroizing<String>);

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d).map(|s| SecretText(Zeroizing::new(s)))
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// Which parts a secret is substituted in (`inject_*` in Ruby).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<bool>,
}

/// One `secrets:` entry. Everything but `value` is kept with the sandbox's options.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretEntry {
    pub env: String,
    #[serde(default, skip_serializing)]
    pub value: Option<SecretText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placeholder: Option<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_tls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<Inject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_violation: Option<serde_json::Value>,
}

impl SecretEntry {
    /// The placeholder the guest sees.
    pub fn placeholder(&self) -> String {
        self.placeholder.clone().unwrap_or_else(|| format!("$MSB_{}", self.env))
    }
}

/// The `tls:` option as given (certificates/keys as paths or PEM text).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    #[serde(default)]
    pub bypass: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_upstream: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercepted_ports: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_quic: Option<bool>,
    #[serde(default)]
    pub upstream_ca_cert: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept_ca_cert: Option<String>,
    /// Kept only when it is a path; PEM key text is never stored.
    #[serde(default, serialize_with = "key_if_path", skip_serializing_if = "Option::is_none")]
    pub intercept_ca_key: Option<SecretText>,
    #[serde(default)]
    pub intercept_all: bool,
}

fn key_if_path<S: Serializer>(key: &Option<SecretText>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match key {
        Some(k) if !tls::config::is_pem_text(&k.0) => s.serialize_some(k.0.as_str()),
        _ => s.serialize_none(),
    }
}

/// What the supervisor reads from the secrets pipe.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// The secret set in [`SecretSet::from_wire`] form.
    pub set: serde_json::Value,
    /// The interception CA given by the user (PEM texts); `None` ⇒ generate one.
    #[serde(default)]
    pub ca_cert: Option<String>,
    #[serde(default)]
    pub ca_key: Option<String>,
}

impl Drop for Handover {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Some(k) = &mut self.ca_key {
            k.zeroize();
        }
    }
}

/// The secrets-related options of one sandbox.
pub struct SandboxSecrets<'a> {
    pub secrets: &'a [SecretEntry],
    pub on_violation: Option<&'a serde_json::Value>,
    pub tls: Option<&'a TlsOptions>,
}

fn invalid(msg: String) -> Error {
    Error::InvalidConfig(msg)
}

impl SandboxSecrets<'_> {
    /// The wire form of the set, with values when `with_values` (else a stand-in value:
    /// only for validating the stored options).
    fn wire(&self, with_values: bool) -> Result<Zeroizing<Vec<u8>>> {
        let mut list = Vec::with_capacity(self.secrets.len());
        for (i, s) in self.secrets.iter().enumerate() {
            let value = match (&s.value, with_values) {
                (Some(v), true) => v.0.as_str().to_string(),
                (None, true) => {
                    return Err(invalid(format!(
                        "secrets[{i}] ({}): value is missing; secret values are never stored, so pass secrets: \
                         (with values) again to start a sandbox created with them",
                        s.env
                    )))
                }
                (_, false) => "stand-in-value".into(),
            };
            let mut e = serde_json::json!({ "env": s.env, "value": value, "hosts": s.hosts });
            if let Some(p) = &s.placeholder {
                e["placeholder"] = p.clone().into();
            }
            if let Some(r) = s.require_tls {
                e["require_tls"] = r.into();
            }
            if let Some(inj) = &s.inject {
                e["inject"] = serde_json::to_value(inj).expect("inject serializes");
            }
            if let Some(v) = &s.on_violation {
                e["on_violation"] = v.clone();
            }
            list.push(e);
        }
        let mut set = serde_json::json!({ "secrets": list });
        if let Some(v) = self.on_violation {
            set["on_violation"] = v.clone();
        }
        let bytes = Zeroizing::new(serde_json::to_vec(&set).expect("secrets serialize"));
        // serde_json::Value holds copies of the values: scrub them too.
        scrub(&mut set);
        Ok(bytes)
    }

    /// Checks everything that can be checked without the values (also for stored options).
    pub fn validate(&self, env: &[(String, String)]) -> Result<()> {
        if self.secrets.is_empty() && self.on_violation.is_some() {
            return Err(invalid("on_secret_violation is given but there are no secrets:".into()));
        }
        let with_values = self.secrets.iter().all(|s| s.value.is_some());
        let wire = self.wire(with_values)?;
        SecretSet::from_wire(&wire).map_err(|e| invalid(e.to_string()))?;
        for s in self.secrets {
            if env.iter().any(|(k, _)| k == &s.env) {
                return Err(invalid(format!(
                    "env: {} is also a secret; the guest gets its placeholder, drop it from env:",
                    s.env
                )));
            }
        }
        if let Some(t) = self.tls {
            if self.secrets.is_empty() && !t.intercept_all {
                return Err(invalid(
                    "tls: is given but nothing would be intercepted: interception applies to the hosts of secrets:, \
                     or to every host with tls: { intercept_all: true }"
                        .into(),
                ));
            }
            self.validate_tls(t)?;
        }
        Ok(())
    }

    /// Whether connections are intercepted at all (secrets, or `tls.intercept_all`).
    pub fn intercepts(&self) -> bool {
        !self.secrets.is_empty() || self.tls.is_some_and(|t| t.intercept_all)
    }

    fn validate_tls(&self, t: &TlsOptions) -> Result<()> {
        for (i, b) in t.bypass.iter().enumerate() {
            microsandbox_network::secrets::HostPattern::parse(b)
                .map_err(|p| invalid(format!("tls.bypass[{i}] {p}")))?;
        }
        if let Some(ports) = &t.intercepted_ports {
            if ports.is_empty() || ports.iter().any(|p| !(1..=65535).contains(p)) {
                return Err(invalid("tls.intercepted_ports must be a non-empty list of ports 1-65535".into()));
            }
        }
        match (&t.intercept_ca_cert, &t.intercept_ca_key) {
            (Some(_), None) => {
                return Err(invalid(
                    "tls.intercept_ca_cert needs tls.intercept_ca_key (a PEM key given as text is never stored: pass it again to start)".into(),
                ))
            }
            (None, Some(_)) => return Err(invalid("tls.intercept_ca_key needs tls.intercept_ca_cert".into())),
            _ => {}
        }
        Ok(())
    }

    /// The public TLS settings for the supervisor spec (CA texts read from paths).
    pub fn tls_config(&self) -> Result<TlsConfig> {
        let d = TlsConfig::default();
        let Some(t) = self.tls else { return Ok(d) };
        let upstream_ca_certs = t
            .upstream_ca_cert
            .iter()
            .enumerate()
            .map(|(i, c)| tls::config::pem_or_path(c, &format!("tls.upstream_ca_cert[{i}]")).map_err(tls_err))
            .collect::<Result<Vec<_>>>()?;
        Ok(TlsConfig {
            bypass: t.bypass.clone(),
            verify_upstream: t.verify_upstream.unwrap_or(d.verify_upstream),
            intercepted_ports: t
                .intercepted_ports
                .as_ref()
                .map(|p| p.iter().map(|&p| p as u16).collect())
                .unwrap_or(d.intercepted_ports),
            block_quic: t.block_quic.unwrap_or(d.block_quic),
            upstream_ca_certs,
            intercept_all: t.intercept_all,
        })
    }

    /// The bytes for the supervisor's secrets pipe; `None` when nothing is intercepted.
    pub fn handover(&self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        if !self.intercepts() {
            return Ok(None);
        }
        let wire = self.wire(true)?;
        let set: serde_json::Value = serde_json::from_slice(&wire).expect("own JSON");
        let (ca_cert, ca_key) = match self.tls {
            Some(TlsOptions { intercept_ca_cert: Some(c), intercept_ca_key: Some(k), .. }) => {
                let cert = tls::config::pem_or_path(c, "tls.intercept_ca_cert").map_err(tls_err)?;
                let key = tls::config::key_pem_or_path(&k.0, "tls.intercept_ca_key").map_err(tls_err)?;
                // Checked here so a mismatch is a create error, not a supervisor one.
                tls::InterceptCa::from_pem(&cert, &key).map_err(tls_err)?;
                (Some(cert), Some(key))
            }
            _ => (None, None),
        };
        let mut h = Handover { set, ca_cert, ca_key };
        let bytes = Zeroizing::new(serde_json::to_vec(&h).expect("handover serializes"));
        scrub(&mut h.set);
        Ok(Some(bytes))
    }

    /// The guest environment additions: each secret's env var set to its placeholder.
    pub fn placeholder_env(&self) -> Vec<(String, String)> {
        self.secrets.iter().map(|s| (s.env.clone(), s.placeholder())).collect()
    }
}

/// The guest environment that points TLS clients at the CA files the supervisor writes
/// at every boot (`/.msb/tls/`): the bundle (system roots + the sandbox's CA) for the
/// variables that replace the default roots, the CA alone for Node's, which adds to them.
pub fn trust_env() -> Vec<(String, String)> {
    const BUNDLE: &str = "/.msb/tls/bundle.pem";
    [
        ("SSL_CERT_FILE", BUNDLE),
        ("REQUESTS_CA_BUNDLE", BUNDLE),
        ("CURL_CA_BUNDLE", BUNDLE),
        ("NODE_EXTRA_CA_CERTS", "/.msb/tls/extra.pem"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Puts the caller's values (given again at start) into the stored entries; every
/// stored secret needs one, and no unknown env may be given.
pub fn merge_for_start(stored: &mut [SecretEntry], given: Vec<SecretEntry>) -> Result<()> {
    for g in &given {
        if !stored.iter().any(|s| s.env == g.env) {
            return Err(invalid(format!(
                "secrets: {} was not given at create; a sandbox's secrets are fixed when it is created",
                g.env
            )));
        }
    }
    for s in stored.iter_mut() {
        let v = given.iter().find(|g| g.env == s.env).and_then(|g| g.value.clone());
        match v {
            Some(v) => s.value = Some(v),
            None => {
                return Err(invalid(format!(
                    "sandbox was created with secret {}; secret values are never stored, so pass secrets: \
                     [{{ env: \"{}\", value: ... }}] again to start it",
                    s.env, s.env
                )))
            }
        }
    }
    Ok(())
}

fn tls_err(e: tls::TlsError) -> Error {
    Error::Tls(e.0)
}

fn scrub(v: &mut serde_json::Value) {
    use zeroize::Zeroize;
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(scrub),
        serde_json::Value::Object(m) => m.values_mut().for_each(scrub),
        _ => {}
    }
}

/// Reads and parses the handover in the supervisor. Errors never carry a value.
pub fn read_handover(bytes: &[u8]) -> Result<(SecretSet, Option<tls::InterceptCa>)> {
    let mut h: Handover = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("secrets handover does not parse (line {}, column {})", e.line(), e.column())))?;
    let set_bytes = Zeroizing::new(serde_json::to_vec(&h.set).expect("value serializes"));
    scrub(&mut h.set);
    let set = SecretSet::from_wire(&set_bytes).map_err(|e| invalid(e.to_string()))?;
    let ca = match (&h.ca_cert, &h.ca_key) {
        (Some(c), Some(k)) => Some(tls::InterceptCa::from_pem(c, k).map_err(tls_err)?),
        _ => None,
    };
    Ok((set, ca))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> SecretEntry {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn values_are_never_serialized_or_printed() {
        let e = entry(r#"{"env":"K","value":"s3cr3t-value","hosts":["a.test"]}"#);
        let stored = serde_json::to_string(&e).unwrap();
        assert!(!stored.contains("s3cr3t"), "{stored}");
        assert!(!format!("{e:?}").contains("s3cr3t"));
        let t: TlsOptions = serde_json::from_str(
            r#"{"intercept_ca_cert":"-----BEGIN CERTIFICATE-----x","intercept_ca_key":"-----BEGIN PRIVATE KEY-----\nsecretkey"}"#,
        )
        .unwrap();
        let s = serde_json::to_string(&t).unwrap();
        assert!(!s.contains("secretkey") && s.contains(r#""intercept_ca_key":null"#), "{s}");
        let back: TlsOptions = serde_json::from_str(&s).unwrap();
        assert!(back.intercept_ca_key.is_none() && back.intercept_ca_cert.is_some());
        let t: TlsOptions = serde_json::from_str(r#"{"intercept_ca_key":"/etc/ca.key"}"#).unwrap();
        assert!(serde_json::to_string(&t).unwrap().contains("/etc/ca.key"));
    }

    #[test]
    fn handover_round_trip_and_start_needs_values() {
        let e = entry(r#"{"env":"K","value":"s3cr3t-value","hosts":["a.test"],"inject":{"query":true}}"#);
        let list = vec![e];
        let s = SandboxSecrets { secrets: &list, on_violation: None, tls: None };
        s.validate(&[]).unwrap();
        assert_eq!(s.placeholder_env(), vec![("K".to_string(), "$MSB_K".to_string())]);
        let bytes = s.handover().unwrap().unwrap();
        let (set, ca) = read_handover(&bytes).unwrap();
        assert_eq!(set.secrets[0].value.expose(), b"s3cr3t-value");
        assert!(set.secrets[0].injection.query && ca.is_none());
        assert!(s.validate(&[("K".into(), "x".into())]).is_err());

        // Stored form (no value) + start without values: a clear error naming the env.
        let mut stored: Vec<SecretEntry> = serde_json::from_str(&serde_json::to_string(&list).unwrap()).unwrap();
        let e = merge_for_start(&mut stored, vec![]).unwrap_err();
        assert!(e.to_string().contains("pass secrets:") && e.to_string().contains('K'), "{e}");
        merge_for_start(&mut stored, list.clone()).unwrap();
        assert!(stored[0].value.is_some());
        let bad = vec![entry(r#"{"env":"OTHER","value":"v","hosts":["a.test"]}"#)];
        assert!(merge_for_start(&mut stored, bad).is_err());
    }

    #[test]
    fn errors_name_keys_never_values() {
        let list = vec![entry(r#"{"env":"K","value":"s3cr3t\nvalue","hosts":["a.test"]}"#)];
        let s = SandboxSecrets { secrets: &list, on_violation: None, tls: None };
        let e = s.validate(&[]).unwrap_err().to_string();
        assert!(e.contains("value") && !e.contains("s3cr3t"), "{e}");
        let tls = TlsOptions { intercept_ca_cert: Some("/x.pem".into()), intercept_all: true, ..Default::default() };
        let s = SandboxSecrets { secrets: &[], on_violation: None, tls: Some(&tls) };
        assert!(s.validate(&[]).unwrap_err().to_string().contains("intercept_ca_key"));
    }

    #[test]
    fn tls_without_anything_to_intercept_is_refused() {
        let tls = TlsOptions { verify_upstream: Some(false), ..Default::default() };
        let s = SandboxSecrets { secrets: &[], on_violation: None, tls: Some(&tls) };
        let e = s.validate(&[]).unwrap_err().to_string();
        assert!(e.contains("intercept_all"), "{e}");
        assert!(!s.intercepts());
        let all = TlsOptions { intercept_all: true, ..Default::default() };
        let s = SandboxSecrets { secrets: &[], on_violation: None, tls: Some(&all) };
        s.validate(&[]).unwrap();
        assert!(s.intercepts() && s.handover().unwrap().is_some());
    }
}
