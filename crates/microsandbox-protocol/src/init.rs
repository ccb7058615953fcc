//! A custom init (`init:` at create): the process the agent hands PID 1 to once the guest
//! has booted, while the agent keeps serving as its child. Passed on the kernel command
//! line (the agent needs it before any host connection exists), as `msb.init=` followed by
//! the spec's JSON in URL-safe base64 without padding (no spaces or quotes to escape).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Kernel command line key.
pub const INIT_PARAM: &str = "msb.init=";
/// Longest encoded parameter: the x86 kernel command line holds 2048 bytes in all.
pub const MAX_INIT_PARAM: usize = 1024;
/// `cmd` value that picks the first of [`AUTO_INIT`] present in the root.
pub const AUTO: &str = "auto";
/// Where `auto` looks, in order.
pub const AUTO_INIT: [&str; 4] = ["/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd", "/init"];

/// The init program: absolute path (or [`AUTO`]), arguments after argv[0], extra environment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
}

impl InitSpec {
    /// Checks what the guest could not run, with a message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.cmd != AUTO && !self.cmd.starts_with('/') {
            return Err(format!("init: cmd must be an absolute guest path or \"auto\" (got {:?})", self.cmd));
        }
        if self.cmd.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err("init: cmd and args must not contain NUL bytes".into());
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(format!("init: invalid environment variable {k:?}"));
            }
        }
        let len = self.to_param().len();
        if len > MAX_INIT_PARAM {
            return Err(format!(
                "init: cmd, args and env are too long for the kernel command line ({len} > {MAX_INIT_PARAM} bytes encoded); \
                 put the init's arguments in a script in the image"
            ));
        }
        Ok(())
    }

    /// `msb.init=<base64url JSON>`.
    pub fn to_param(&self) -> String {
        let json = serde_json::to_vec(self).expect("init spec serializes");
        format!("{INIT_PARAM}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json))
    }

    /// The spec in a kernel command line (last one wins); `None` when absent or malformed.
    pub fn from_cmdline(cmdline: &str) -> Option<InitSpec> {
        let value = cmdline.split_whitespace().rev().find_map(|w| w.strip_prefix(INIT_PARAM))?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(value).ok()?;
        serde_json::from_slice(&json).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_command_line() {
        let spec = InitSpec { cmd: "/bin/sh".into(), args: vec!["-c".into(), "echo 'a b' \"c\"".into()], env: vec![("K".into(), "v w".into())] };
        let line = format!("console=ttyS0 {} quiet", spec.to_param());
        assert!(!spec.to_param().contains([' ', '"', '\'']));
        assert_eq!(InitSpec::from_cmdline(&line), Some(spec.clone()));
        assert_eq!(InitSpec::from_cmdline("console=ttyS0"), None);
        assert_eq!(InitSpec::from_cmdline("msb.init=!!"), None);
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn validation() {
        let ok = |cmd: &str| InitSpec { cmd: cmd.into(), ..Default::default() }.validate();
        assert!(ok("auto").is_ok());
        assert!(ok("/sbin/init").is_ok());
        assert!(ok("sbin/init").is_err());
        assert!(InitSpec { cmd: "/x".into(), env: vec![("A=B".into(), "v".into())], ..Default::default() }.validate().is_err());
        assert!(InitSpec { cmd: "/x".into(), args: vec!["a".repeat(2000)], ..Default::default() }.validate().is_err());
    }
}
