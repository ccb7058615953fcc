//! Sandbox creation options as received from the Ruby layer, and their validation.
//!
//! Ruby validates types first; this is the authoritative check of values, so the
//! engine never starts anything for a config it would later reject.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest single environment value (bytes); the whole exec request must fit a frame.
pub const MAX_ENV_VALUE: usize = 128 * 1024;
/// Largest total environment (bytes, keys + values).
pub const MAX_ENV_TOTAL: usize = 512 * 1024;
pub const MIN_MEMORY_MIB: u64 = 128;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
pub const MAX_CPUS: u64 = 255;
/// Longest guest path accepted in options (the kernel's PATH_MAX).
pub const MAX_GUEST_PATH: usize = 4096;
/// Default shell of `Sandbox#shell`.
pub const DEFAULT_SHELL: &str = "/bin/sh";
/// Default writable space of a sandbox on a registry image (`oci_upper_size`), MiB.
pub const DEFAULT_OCI_UPPER_SIZE_MIB: u64 = 4096;
/// Largest `oci_upper_size`, MiB (1 TiB; growing the root to it takes seconds at first
/// boot under TCG, and ext4 without `64bit` ends at 16 TiB).
pub const MAX_OCI_UPPER_SIZE_MIB: u64 = 1 << 20;

/// Options of `Sandbox.create`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    pub name: String,
    /// A local root filesystem directory (a path: starts with `/` or `.`), or an OCI
    /// image reference.
    pub image: String,
    /// `always`, `if_missing` (default) or `never`.
    #[serde(default)]
    pub pull_policy: Option<String>,
    /// Explicit registry credentials. Never stored in the state database.
    #[serde(default, skip_serializing)]
    pub registry_auth: Option<RegistryAuth>,
    /// Plain HTTP to the registry.
    #[serde(default)]
    pub registry_insecure: bool,
    /// Extra trusted CA certificates (PEM).
    #[serde(default)]
    pub registry_ca_certs: Vec<String>,
    /// u64 so that absurd values reach [`SandboxConfig::validate`] and get its message.
    #[serde(default = "default_cpus")]
    pub cpus: u64,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// `secrets:` — stored without their values (see [`super::secrets`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<super::secrets::SecretEntry>,
    /// `on_secret_violation:` — the sandbox-wide action (wire form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_secret_violation: Option<serde_json::Value>,
    /// `tls:` — interception options (a PEM key text is never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<super::secrets::TlsOptions>,
    /// `trust_host_cas:` — copy the host's CA roots into the guest's trust store at
    /// every boot.
    #[serde(default)]
    pub trust_host_cas: bool,
    #[serde(default)]
    pub workdir: Option<String>,
    /// `auto` (default), `kvm`, `hvf` or `tcg`.
    #[serde(default)]
    pub accel: Option<String>,
    #[serde(default)]
    pub boot_timeout_ms: Option<u64>,
    /// Default guest user of commands (`name`, `uid`, `name:group`, `uid:gid`).
    #[serde(default)]
    pub user: Option<String>,
    /// Guest hostname (default: the sandbox name).
    #[serde(default)]
    pub hostname: Option<String>,
    /// `template:` — `false`: always boot cold; `true`: use templates even when
    /// `MICROSANDBOX_TEMPLATES` turns them off; unset: the environment decides (on).
    #[serde(default)]
    pub template: Option<bool>,
    /// Stop by itself this long after boot (milliseconds).
    #[serde(default)]
    pub max_duration_ms: Option<u64>,
    /// Stop by itself after this long without sessions or client traffic (milliseconds).
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    /// Writable space of a sandbox on a registry image, MiB (default
    /// [`DEFAULT_OCI_UPPER_SIZE_MIB`]): its overlay is the image root plus this much, and
    /// the guest grows the root filesystem into it. Local directory roots ignore it.
    #[serde(default)]
    pub oci_upper_size_mib: Option<u64>,
    /// `network:` as Ruby sends it (a preset name for now; see `sandbox::network`).
    #[serde(default)]
    pub network: Option<serde_json::Value>,
    /// `dns:` as Ruby sends it (`nameservers`, `query_timeout_ms`, `rebind_protection`).
    #[serde(default)]
    pub dns: Option<serde_json::Value>,
    /// Published TCP ports (`ports:`, normalised by Ruby), checked by `network::ports`.
    #[serde(default)]
    pub ports: Vec<microsandbox_network::published::PortSpec>,
    /// Published UDP ports (`ports_udp:`).
    #[serde(default)]
    pub ports_udp: Vec<microsandbox_network::published::PortSpec>,
    /// CIDR the link's addresses come from (`ipv4_pool:`; default 172.16.0.0/30).
    #[serde(default)]
    pub ipv4_pool: Option<String>,
    /// IPv6 CIDR of the link (`ipv6_pool:`; default fd42:6d73:62::/64: gateway ::1,
    /// guest ::2, on-link /126).
    #[serde(default)]
    pub ipv6_pool: Option<String>,
    /// Cap on concurrent TCP connections through the NIC (`max_connections:`, 1–4096,
    /// default 256).
    #[serde(default)]
    pub max_connections: Option<i64>,
    /// Engine home; defaults to `$MICROSANDBOX_HOME` or `~/.microsandbox`.
    #[serde(default)]
    pub home: Option<PathBuf>,
    /// Supervisor binary override (`Microsandbox.runtime_path=` / `MSB_PATH`).
    #[serde(default)]
    pub supervisor: Option<PathBuf>,
    // --- what runs in the sandbox (entrypoint, shell, scripts, patches) ---
    /// argv of the main process started after every boot. `None` on input: the image's
    /// Entrypoint + Cmd; `create` stores the resolved argv, so `start` runs the same.
    /// An empty list runs nothing.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Shell of `Sandbox#shell` (an absolute guest path); `/bin/sh` when unset.
    #[serde(default)]
    pub shell: Option<String>,
    /// `name => source`, written to `/.msb/scripts/<name>` (0755) at create. Applied once
    /// (the root keeps them), so not stored.
    #[serde(default, skip_serializing)]
    pub scripts: std::collections::BTreeMap<String, super::patch::Bytes>,
    /// Root filesystem changes applied at create, after the scripts. Not stored.
    #[serde(default, skip_serializing)]
    pub patches: Vec<super::patch::Patch>,
    /// Resource limits of every command and of the main process; an exec's own `rlimits`
    /// override them per resource.
    #[serde(default)]
    pub rlimits: Vec<microsandbox_protocol::Rlimit>,
    /// Guest kernel console verbosity (the `system` log source): `error`, `warn`, `info`,
    /// `debug` or `trace`; default: errors only.
    #[serde(default)]
    pub log_level: Option<String>,
    /// Do not record the output of commands and the main process in the logs.
    #[serde(default)]
    pub quiet_logs: bool,
    /// Run one trivial command in the guest before the sandbox is reported ready
    /// (`warm_up:`; `Pool` sets it): see `warm_up_request` in `sandbox/mod.rs`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm_up: bool,
    /// `from_snapshot:` as given (a snapshot name, digest or artifact path); `image` is
    /// then empty on input and set from the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// The digest of the snapshot this sandbox was booted from (its snapshots' parent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_digest: Option<String>,
    /// The OCI manifest digest of the image the root disk came from (set at create from
    /// the pulled image, or inherited from `from_snapshot:`); recorded in snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_manifest_digest: Option<String>,
    /// `volumes:` mounts (see `volume::mount`); checked against the host at every boot.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volume::mount::MountSpec>,
    /// Security profile of every command and the main process: `default` or `restricted`
    /// (see `sandbox::security`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<String>,
    /// Remove the sandbox (record, root disk, logs) once it has stopped (see
    /// `sandbox::ephemeral`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
    /// Filesystem of a disk-image root (`ext4`, `ext3`, `ext2`); detected when unset
    /// (see `sandbox::disk_image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    /// A custom init the agent hands PID 1 to after boot (`init:`; see the agent's
    /// `init.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<microsandbox_protocol::InitSpec>,
}

/// Kernel `loglevel=` for a `log_level:` (messages below it reach the console).
pub fn kernel_loglevel(level: Option<&str>) -> Result<u8> {
    Ok(match level {
        None | Some("error") => 3,
        Some("warn") => 5,
        Some("info") => 7,
        Some("debug" | "trace") => 8,
        Some(other) => {
            return Err(Error::InvalidConfig(format!(
                "unknown log_level {other:?}; use \"error\", \"warn\", \"info\", \"debug\" or \"trace\""
            )))
        }
    })
}

/// `defaults` with `own` laid over them, per resource.
pub fn merge_rlimits(defaults: &[microsandbox_protocol::Rlimit], own: &[microsandbox_protocol::Rlimit]) -> Vec<microsandbox_protocol::Rlimit> {
    let mut out: Vec<_> = defaults.iter().filter(|d| !own.iter().any(|o| o.resource == d.resource)).cloned().collect();
    out.extend(own.iter().cloned());
    out
}

/// `registry_auth: {username:, password:}`; the password never appears in Debug output.
#[derive(Clone, Deserialize)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth").field("username", &self.username).finish_non_exhaustive()
    }
}

/// True when `image` names a local directory rather than a registry reference.
pub fn is_local_path(image: &str) -> bool {
    image.starts_with('/') || image == "." || image == ".." || image.starts_with("./") || image.starts_with("../")
}

fn default_cpus() -> u64 {
    1
}
fn default_memory() -> u64 {
    512
}

/// Longest sandbox name, in bytes of UTF-8 (the reference gem's limit).
pub const MAX_NAME_BYTES: usize = 128;

/// Checks a sandbox name: 1–128 bytes of UTF-8 without control characters. Names are
/// stored and shown as given, never used as paths as such (see `Home::sandbox_dir`).
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(Error::InvalidConfig(format!(
            "invalid sandbox name {name:?}: use 1-{MAX_NAME_BYTES} bytes of UTF-8 without control characters"
        )));
    }
    Ok(())
}

/// The guest hostname of a sandbox without `hostname:`: its name when it is a plain name
/// (`paths::is_plain_name`, as every name was before longer names were allowed), else the
/// name with every other character made '-' (ASCII letters and digits kept, lowercased),
/// at most 63 bytes, or "sandbox" when nothing is left. It goes on the kernel command
/// line, so it must never carry spaces.
pub fn default_hostname(name: &str) -> String {
    if crate::paths::is_plain_name(name) {
        return name.to_string();
    }
    let mapped: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .take(63)
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() { "sandbox".into() } else { trimmed.to_string() }
}

/// Checks environment pairs for characters the kernel cannot pass and for size.
pub fn validate_env(env: &[(String, String)]) -> Result<()> {
    let mut total = 0;
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(Error::InvalidConfig(format!(
                "invalid environment variable name {k:?}: it must be non-empty and contain no '=' or NUL"
            )));
        }
        if v.contains('\0') {
            return Err(Error::InvalidConfig(format!("environment variable {k} contains a NUL byte")));
        }
        if v.len() > MAX_ENV_VALUE {
            return Err(Error::InvalidConfig(format!(
                "environment variable {k} is {} bytes; the limit is {MAX_ENV_VALUE}",
                v.len()
            )));
        }
        total += k.len() + v.len();
    }
    if total > MAX_ENV_TOTAL {
        return Err(Error::InvalidConfig(format!(
            "the environment totals {total} bytes; the limit is {MAX_ENV_TOTAL}"
        )));
    }
    Ok(())
}

/// Checks a guest path: absolute and without NUL bytes.
pub fn validate_guest_path(what: &str, p: &str) -> Result<()> {
    if !p.starts_with('/') || p.contains('\0') {
        return Err(Error::InvalidConfig(format!("{what} {p:?} must be an absolute guest path without NUL bytes")));
    }
    Ok(())
}

/// Checks a main-process argv: no NUL bytes, and a program name when not empty.
pub fn validate_entrypoint(argv: &[String]) -> Result<()> {
    if argv.first().is_some_and(|p| p.is_empty()) {
        return Err(Error::InvalidConfig("entrypoint: the program (first element) must not be empty".into()));
    }
    if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
        return Err(Error::InvalidConfig(format!("entrypoint[{i}] contains a NUL byte")));
    }
    Ok(())
}

impl SandboxConfig {
    /// The secrets-related options, borrowed.
    pub fn secrets_view(&self) -> super::secrets::SandboxSecrets<'_> {
        super::secrets::SandboxSecrets {
            secrets: &self.secrets,
            on_violation: self.on_secret_violation.as_ref(),
            tls: self.tls.as_ref(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(Error::InvalidConfig(format!("cpus must be between 1 and {MAX_CPUS}, got {}", self.cpus)));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(Error::InvalidConfig(format!(
                "memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {}",
                self.memory_mib
            )));
        }
        validate_env(&self.env)?;
        super::security::restricted(self.security.as_deref())?;
        if let Some(f) = &self.fstype {
            super::disk_image::check_fstype(f)?;
        }
        if let Some(init) = &self.init {
            init.validate().map_err(Error::InvalidConfig)?;
        }
        super::network::validate(self)?;
        self.secrets_view().validate(&self.env)?;
        if let Some(w) = &self.workdir {
            validate_guest_path("workdir", w)?;
        }
        kernel_loglevel(self.log_level.as_deref())?;
        // The same checks an exec's own limits get.
        crate::sandbox::ExecCall { program: "/".into(), rlimits: self.rlimits.clone(), ..Default::default() }
            .into_request(&[], None, None)
            .map_err(|e| Error::InvalidConfig(format!("rlimits: {e}")))?;
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= 63
                && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                && !h.starts_with(['-', '.']);
            if !ok {
                return Err(Error::InvalidConfig(format!(
                    "invalid hostname {h:?}: use 1-63 letters, digits, '-' or '.', not starting with '-' or '.'"
                )));
            }
        }
        if let Some(upper) = self.oci_upper_size_mib {
            if !(1..=MAX_OCI_UPPER_SIZE_MIB).contains(&upper) {
                return Err(Error::InvalidConfig(format!(
                    "oci_upper_size must be between 1 and {MAX_OCI_UPPER_SIZE_MIB} MiB, got {upper}"
                )));
            }
        }
        for (what, v) in [("max_duration", self.max_duration_ms), ("idle_timeout", self.idle_timeout_ms)] {
            if v == Some(0) {
                return Err(Error::InvalidConfig(format!("{what} must be positive")));
            }
        }
        if self.from_snapshot.is_some() {
            if !self.image.is_empty() {
                return Err(Error::InvalidConfig("image: and from_snapshot: are exclusive; a snapshot brings its own root".into()));
            }
        } else if self.image.is_empty() || self.image.contains('\0') {
            return Err(Error::InvalidConfig("image must be a non-empty path or image reference".into()));
        }
        self.pull_options()?;
        if let Some(argv) = &self.entrypoint {
            validate_entrypoint(argv)?;
        }
        super::patch::validate(&self.scripts, &self.patches)?;
        for m in &self.volumes {
            crate::volume::mount::guest_path(&m.guest)?;
        }
        if let Some(sh) = &self.shell {
            validate_guest_path("shell", sh)?;
            if sh.len() > MAX_GUEST_PATH {
                return Err(Error::InvalidConfig(format!("shell is longer than {MAX_GUEST_PATH} bytes")));
            }
        }
        Ok(())
    }

    /// How to pull the image, from the registry options.
    pub fn pull_options(&self) -> Result<crate::image::PullOptions> {
        use crate::image::{PullOptions, PullPolicy, RegistryCredentials};
        let policy = match self.pull_policy.as_deref() {
            // "if-missing" is the reference gem's spelling, "if_missing" this gem's: both work.
            None | Some("if_missing" | "if-missing") => PullPolicy::IfMissing,
            Some("always") => PullPolicy::Always,
            Some("never") => PullPolicy::Never,
            Some(other) => {
                return Err(Error::InvalidConfig(format!(
                    "unknown pull_policy {other:?}; use \"always\", \"if_missing\" (or \"if-missing\") or \"never\""
                )))
            }
        };
        Ok(PullOptions {
            policy,
            auth: self.registry_auth.as_ref().map(|a| RegistryCredentials { username: a.username.clone(), password: a.password.clone() }),
            insecure: self.registry_insecure,
            ca_certs: self.registry_ca_certs.iter().map(|c| c.as_bytes().to_vec()).collect(),
            ..Default::default()
        })
    }

    /// Bytes a sandbox on a registry image may write beyond its image.
    pub fn oci_upper_size_bytes(&self) -> u64 {
        self.oci_upper_size_mib.unwrap_or(DEFAULT_OCI_UPPER_SIZE_MIB) << 20
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_millis(self.boot_timeout_ms.unwrap_or(180_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SandboxConfig {
        serde_json::from_str(r#"{"name":"a","image":"/x"}"#).unwrap()
    }

    #[test]
    fn names() {
        for ok in ["a", "A-1", "x.y_z", &"n".repeat(63), "-a", ".a", "a/b", "my box", "é", "..", &"n".repeat(128), &"é".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", &"n".repeat(129), &"é".repeat(65), "a\0", "a\nb", "\u{7f}"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_hostnames_are_valid_hostnames() {
        assert_eq!(default_hostname("web-1.a"), "web-1.a");
        assert_eq!(default_hostname("My Box_2"), "my-box-2");
        assert_eq!(default_hostname("ééé"), "sandbox");
        assert_eq!(default_hostname(&"x".repeat(128)).len(), 63);
        for n in ["My Box_2", "ééé", "-x-", &"ab ".repeat(40)] {
            let c = SandboxConfig { hostname: Some(default_hostname(n)), ..cfg() };
            assert!(c.validate().is_ok(), "{n}");
        }
    }

    #[test]
    fn log_levels_and_rlimits() {
        assert_eq!(kernel_loglevel(None).unwrap(), 3);
        assert_eq!(kernel_loglevel(Some("debug")).unwrap(), 8);
        assert!(SandboxConfig { log_level: Some("loud".into()), ..cfg() }.validate().is_err());
        let r = |res: &str, v| microsandbox_protocol::Rlimit { resource: res.into(), soft: v, hard: v };
        let merged = merge_rlimits(&[r("nofile", 64), r("nproc", 10)], &[r("nofile", 128)]);
        assert_eq!(merged, vec![r("nproc", 10), r("nofile", 128)]);
        assert!(SandboxConfig { rlimits: vec![r("bogus", 1)], ..cfg() }.validate().is_err());
        assert!(SandboxConfig { rlimits: vec![r("nofile", 64)], ..cfg() }.validate().is_ok());
    }

    #[test]
    fn pull_policy_spellings() {
        use crate::image::PullPolicy;
        for (given, want) in [("if_missing", PullPolicy::IfMissing), ("if-missing", PullPolicy::IfMissing), ("always", PullPolicy::Always), ("never", PullPolicy::Never)] {
            let c = SandboxConfig { pull_policy: Some(given.into()), ..cfg() };
            assert!(c.pull_options().unwrap().policy == want, "{given}");
        }
        let c = SandboxConfig { pull_policy: Some("sometimes".into()), ..cfg() };
        assert!(matches!(c.pull_options(), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn ranges() {
        let mut c = cfg();
        assert!(c.validate().is_ok());
        c.cpus = 0;
        assert!(c.validate().is_err());
        c.cpus = 1;
        c.memory_mib = 64;
        assert!(c.validate().is_err());
        c.memory_mib = 512;
        for (upper, ok) in [(0, false), (1, true), (MAX_OCI_UPPER_SIZE_MIB, true), (MAX_OCI_UPPER_SIZE_MIB + 1, false)] {
            c.oci_upper_size_mib = Some(upper);
            assert_eq!(c.validate().is_ok(), ok, "{upper}");
        }
    }

    #[test]
    fn env_rules() {
        assert!(validate_env(&[("A".into(), "b".into())]).is_ok());
        assert!(validate_env(&[("A=B".into(), "b".into())]).is_err());
        assert!(validate_env(&[("A".into(), "b\0".into())]).is_err());
        assert!(validate_env(&[("A".into(), "x".repeat(MAX_ENV_VALUE + 1))]).is_err());
    }

    #[test]
    fn entrypoints() {
        let mut c = cfg();
        c.entrypoint = Some(vec![]);
        assert!(c.validate().is_ok());
        c.entrypoint = Some(vec!["/bin/app".into(), "--x".into()]);
        assert!(c.validate().is_ok());
        c.entrypoint = Some(vec!["".into()]);
        assert!(c.validate().is_err());
        c.entrypoint = Some(vec!["a".into(), "b\0".into()]);
        assert!(c.validate().is_err());
    }

    #[test]
    fn shells() {
        let mut c = cfg();
        c.shell = Some("/bin/bash".into());
        assert!(c.validate().is_ok());
        for bad in ["bash", "", "/bin/a\0"] {
            c.shell = Some(bad.into());
            assert!(c.validate().is_err(), "{bad:?}");
        }
        c.shell = Some(format!("/{}", "a".repeat(MAX_GUEST_PATH)));
        assert!(c.validate().is_err());
    }

    #[test]
    fn unknown_fields_rejected() {
        assert!(serde_json::from_str::<SandboxConfig>(r#"{"name":"a","image":"/x","bogus":1}"#).is_err());
    }
}
