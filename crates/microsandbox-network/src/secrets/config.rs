//! The secrets of one sandbox, validated: what each secret is, where it may go and what
//! happens when its placeholder heads anywhere else.
//!
//! Invariant: a secret's *value* never appears in a `Debug`/`Display` output or an error
//! message produced here ([`SecretValue`] redacts itself; errors name the env var and the
//! key, never the value).

use std::fmt;

use serde::Deserialize;
use zeroize::Zeroizing;

/// Longest placeholder accepted (bytes), as upstream.
pub const MAX_PLACEHOLDER_LEN: usize = 1024;
/// Longest secret value accepted (bytes). Values travel in headers, so they are bounded.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Most secrets one sandbox may carry.
pub const MAX_SECRETS: usize = 256;

/// A config mistake, naming the secret (by env var or index) and the key — never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secrets[{index}] ({env}): {key} {problem}")]
pub struct SecretConfigError {
    pub index: usize,
    /// The env var name (or `?` when it is itself the problem).
    pub env: String,
    pub key: &'static str,
    pub problem: String,
}

impl SecretConfigError {
    /// Stable error code for the Ruby mapping.
    pub const CODE: &'static str = "invalid-config";
}

/// A secret value: zeroed on drop, redacted in every format.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> Self {
        SecretValue(Zeroizing::new(bytes))
    }

    /// The clear bytes: only the substitution engine calls this.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue([REDACTED])")
    }
}

/// Where a secret may be sent. Names are lower-case without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this name.
    Exact(String),
    /// `*.suffix`: any name strictly below `suffix` (not `suffix` itself), any depth.
    Wildcard(String),
    /// `*`: every host.
    Any,
}

impl HostPattern {
    /// Parses `name`, `*.suffix` or `*`.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        let t = text.trim().trim_end_matches('.').to_ascii_lowercase();
        if t == "*" {
            return Ok(HostPattern::Any);
        }
        let (wild, name) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, t),
        };
        if !valid_hostname(&name) {
            return Err("is not a host name or *.suffix pattern".into());
        }
        Ok(if wild { HostPattern::Wildcard(name) } else { HostPattern::Exact(name) })
    }

    /// Whether `host` (any case, trailing dot allowed) matches.
    pub fn matches(&self, host: &str) -> bool {
        let h = normalize_host(host);
        match self {
            HostPattern::Any => !h.is_empty(),
            HostPattern::Exact(n) => h == *n,
            HostPattern::Wildcard(s) => {
                h.len() > s.len() + 1 && h.ends_with(s.as_str()) && h.as_bytes()[h.len() - s.len() - 1] == b'.'
            }
        }
    }
}

/// Lower-cases and strips one trailing dot and a `:port`.
pub fn normalize_host(host: &str) -> String {
    let mut h = host.trim();
    if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        if let Some(end) = rest.find(']') {
            return rest[..end].to_ascii_lowercase();
        }
    }
    if let Some((name, port)) = h.rsplit_once(':') {
        if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) {
            h = name;
        }
    }
    h.trim_end_matches('.').to_ascii_lowercase()
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Which parts of a request a secret is substituted in (toward an allowed host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    pub headers: bool,
    pub basic_auth: bool,
    pub query: bool,
    pub body: bool,
}

impl Default for Injection {
    fn default() -> Self {
        Injection { headers: true, basic_auth: true, query: false, body: false }
    }
}

/// What happens when a placeholder heads to a host it is not allowed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViolationAction {
    /// Cut the connection.
    Block,
    /// Cut the connection and write a `system` log entry (the default).
    BlockAndLog,
    /// Cut the connection, log, and stop the sandbox.
    BlockAndTerminate,
    /// Let the placeholder (never the value) through to these hosts; block elsewhere
    /// (with a log entry).
    Passthrough(Vec<HostPattern>),
}

impl ViolationAction {
    /// Whether a violation toward `host` is let through unchanged.
    pub fn passes(&self, host: &str) -> bool {
        matches!(self, ViolationAction::Passthrough(p) if p.iter().any(|p| p.matches(host)))
    }

    /// Whether the caller writes a log entry when it blocks.
    pub fn logs(&self) -> bool {
        !matches!(self, ViolationAction::Block)
    }

    /// Whether the caller stops the sandbox when it blocks.
    pub fn terminates(&self) -> bool {
        matches!(self, ViolationAction::BlockAndTerminate)
    }
}

/// One validated secret.
#[derive(Debug, Clone)]
pub struct Secret {
    pub env: String,
    pub value: SecretValue,
    pub placeholder: String,
    pub hosts: Vec<HostPattern>,
    pub injection: Injection,
    pub require_tls: bool,
    /// `None` ⇒ the set-wide action.
    pub on_violation: Option<ViolationAction>,
}

impl Secret {
    /// Whether this secret may be substituted toward `host`.
    pub fn allows(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| p.matches(host))
    }
}

/// Bytes of fixed-length bodies that all connections sharing one [`SecretSet`] may hold
/// for substitution at the same time (each is also capped at
/// [`super::stream::MAX_SUBST_BODY`]).
pub const MAX_BUFFERED_BODIES: u64 = 64 * 1024 * 1024;

/// Every secret of one sandbox plus the sandbox-wide violation action.
#[derive(Debug, Clone)]
pub struct SecretSet {
    pub secrets: Vec<Secret>,
    pub on_violation: ViolationAction,
    /// Body bytes held for substitution right now, across connections (a budget of
    /// [`MAX_BUFFERED_BODIES`], so many connections cannot add up to gigabytes).
    pub(crate) buffered: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl SecretSet {
    /// The action that applies to `secret`.
    pub fn action_for<'a>(&'a self, secret: &'a Secret) -> &'a ViolationAction {
        secret.on_violation.as_ref().unwrap_or(&self.on_violation)
    }

    /// Whether some secret may go to `host` (⇒ connections to it are intercepted).
    pub fn carries(&self, host: &str) -> bool {
        self.secrets.iter().any(|s| s.allows(host))
    }

    /// The env var of the first secret whose placeholder appears (in any encoding) in
    /// `name` — for SNI and DNS names, which leave the host in the clear.
    pub fn placeholder_in_name(&self, name: &[u8]) -> Option<&str> {
        let pats: Vec<&[u8]> = self.secrets.iter().map(|s| s.placeholder.as_bytes()).collect();
        let mut scanner = super::scan::Scanner::new(pats);
        scanner.feed(name).map(|i| self.secrets[i].env.as_str())
    }

    /// Parses the wire form the engine sends the supervisor:
    /// `{"secrets": [{"env","value","placeholder"?,"hosts":[..],"require_tls"?,
    /// "inject":{"headers","basic_auth","query","body"}?,"on_violation"?}],
    /// "on_violation"?}` where an action is `"block" | "block_and_log" |
    /// "block_and_terminate" | "passthrough" | {"passthrough": [patterns]}`.
    pub fn from_wire(bytes: &[u8]) -> Result<SecretSet, SecretConfigError> {
        let wire: WireSet = serde_json::from_slice(bytes).map_err(|e| SecretConfigError {
            index: 0,
            env: "?".into(),
            key: "secrets",
            // serde_json's message names the position, never the content of a string.
            problem: format!("is not valid secrets JSON (line {}, column {})", e.line(), e.column()),
        })?;
        let on_violation = match wire.on_violation {
            None => ViolationAction::BlockAndLog,
            Some(v) => parse_action(&v).map_err(|p| SecretConfigError {
                index: 0,
                env: "*".into(),
                key: "on_secret_violation",
                problem: p,
            })?,
        };
        let secrets = wire
            .secrets
            .into_iter()
            .enumerate()
            .map(|(i, w)| w.validate(i))
            .collect::<Result<Vec<_>, _>>()?;
        SecretSet::new(secrets, on_violation)
    }

    /// Checks the set-wide invariants (count, distinct env vars and placeholders).
    pub fn new(secrets: Vec<Secret>, on_violation: ViolationAction) -> Result<SecretSet, SecretConfigError> {
        if secrets.len() > MAX_SECRETS {
            return Err(SecretConfigError {
                index: MAX_SECRETS,
                env: "?".into(),
                key: "secrets",
                problem: format!("has more than {MAX_SECRETS} entries"),
            });
        }
        for (i, s) in secrets.iter().enumerate() {
            for t in &secrets[..i] {
                if t.env == s.env {
                    return Err(err(i, &s.env, "env", "is used by two secrets"));
                }
                if t.placeholder == s.placeholder {
                    return Err(err(i, &s.env, "placeholder", "is used by two secrets"));
                }
            }
        }
        Ok(SecretSet { secrets, on_violation, buffered: Default::default() })
    }
}

fn err(index: usize, env: &str, key: &'static str, problem: &str) -> SecretConfigError {
    SecretConfigError { index, env: env.to_string(), key, problem: problem.to_string() }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSet {
    #[serde(default)]
    secrets: Vec<WireSecret>,
    #[serde(default)]
    on_violation: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSecret {
    env: String,
    value: String,
    #[serde(default)]
    placeholder: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    require_tls: Option<bool>,
    #[serde(default)]
    inject: Option<WireInject>,
    #[serde(default)]
    on_violation: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireInject {
    headers: Option<bool>,
    basic_auth: Option<bool>,
    query: Option<bool>,
    body: Option<bool>,
}

/// Whether `env` is a usable environment variable name.
pub fn valid_env_name(env: &str) -> bool {
    let b = env.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// Whether `p` is a usable placeholder (non-empty, ≤ 1024 B, printable ASCII without
/// whitespace: it must survive headers, URLs and env vars unchanged).
pub fn valid_placeholder(p: &str) -> bool {
    !p.is_empty() && p.len() <= MAX_PLACEHOLDER_LEN && p.bytes().all(|b| (0x21..0x7f).contains(&b))
}

impl Drop for WireSecret {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.value.zeroize();
    }
}

impl WireSecret {
    fn validate(mut self, i: usize) -> Result<Secret, SecretConfigError> {
        if !valid_env_name(&self.env) {
            return Err(err(i, "?", "env", "must be a variable name ([A-Za-z_][A-Za-z0-9_]*, at most 256 bytes)"));
        }
        let env = std::mem::take(&mut self.env);
        let v = self.value.as_bytes();
        if v.is_empty() {
            return Err(err(i, &env, "value", "is empty"));
        }
        if v.len() > MAX_VALUE_LEN {
            return Err(err(i, &env, "value", "is longer than 64 KiB"));
        }
        if v.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Err(err(i, &env, "value", "contains NUL, CR or LF (it could split a header)"));
        }
        let placeholder = self.placeholder.take().unwrap_or_else(|| format!("$MSB_{env}"));
        if !valid_placeholder(&placeholder) {
            return Err(err(
                i,
                &env,
                "placeholder",
                "must be 1..1024 bytes of printable ASCII without spaces, CR, LF or NUL",
            ));
        }
        if placeholder.as_bytes() == v {
            return Err(err(i, &env, "placeholder", "equals the value"));
        }
        if self.hosts.is_empty() {
            return Err(err(i, &env, "host", "is missing: give host:, hosts: or host_patterns:"));
        }
        let hosts = self
            .hosts
            .iter()
            .map(|h| HostPattern::parse(h).map_err(|p| err(i, &env, "hosts", &p)))
            .collect::<Result<Vec<_>, _>>()?;
        let d = Injection::default();
        let injection = match self.inject.take() {
            None => d,
            Some(w) => Injection {
                headers: w.headers.unwrap_or(d.headers),
                basic_auth: w.basic_auth.unwrap_or(d.basic_auth),
                query: w.query.unwrap_or(d.query),
                body: w.body.unwrap_or(d.body),
            },
        };
        let on_violation = match self.on_violation.take() {
            None => None,
            Some(v) => Some(parse_action(&v).map_err(|p| err(i, &env, "on_violation", &p))?),
        };
        Ok(Secret {
            env,
            value: SecretValue::new(v.to_vec()),
            placeholder,
            hosts,
            injection,
            require_tls: self.require_tls.unwrap_or(true),
            on_violation,
        })
    }
}

fn parse_action(v: &serde_json::Value) -> Result<ViolationAction, String> {
    const BAD: &str = "must be block, block_and_log, block_and_terminate, passthrough or {passthrough: [hosts]}";
    match v {
        serde_json::Value::String(s) => match s.as_str() {
            "block" => Ok(ViolationAction::Block),
            "block_and_log" => Ok(ViolationAction::BlockAndLog),
            "block_and_terminate" => Ok(ViolationAction::BlockAndTerminate),
            "passthrough" => Ok(ViolationAction::Passthrough(vec![HostPattern::Any])),
            _ => Err(BAD.into()),
        },
        serde_json::Value::Object(m) if m.len() == 1 => match m.get("passthrough") {
            Some(serde_json::Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|h| h.as_str().ok_or_else(|| BAD.to_string()).and_then(HostPattern::parse))
                .collect::<Result<Vec<_>, _>>()
                .map(ViolationAction::Passthrough),
            _ => Err(BAD.into()),
        },
        _ => Err(BAD.into()),
    }
}
