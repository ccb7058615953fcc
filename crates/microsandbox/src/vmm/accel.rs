//! Hardware acceleration choice: KVM when `/dev/kvm` is usable, HVF on macOS, else TCG.

use crate::error::{Error, Result};

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Hvf,
    /// Software emulation: slow but works on every host.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        }
    }

    /// The best accelerator this host offers.
    pub fn detect() -> Accel {
        if cfg!(target_os = "macos") {
            return Accel::Hvf;
        }
        if kvm_usable() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// Resolves a requested accelerator (`auto`, `kvm`, `hvf`, `tcg`; `None` reads
    /// `MICROSANDBOX_ACCEL`, default `auto`) and checks the host can provide it.
    pub fn resolve(requested: Option<&str>) -> Result<Accel> {
        let env = std::env::var("MICROSANDBOX_ACCEL").ok().filter(|s| !s.is_empty());
        let want = requested.map(str::to_string).or(env).unwrap_or_else(|| "auto".into());
        match want.as_str() {
            "auto" => Ok(Accel::detect()),
            "tcg" => Ok(Accel::Tcg),
            "kvm" if kvm_usable() => Ok(Accel::Kvm),
            "kvm" => Err(Error::InvalidConfig(
                "accel: kvm was requested but /dev/kvm is missing or not writable by this user; use accel: \"auto\" or \"tcg\", or enable KVM".into(),
            )),
            "hvf" if cfg!(target_os = "macos") => Ok(Accel::Hvf),
            "hvf" => Err(Error::InvalidConfig("accel: hvf exists only on macOS; use \"auto\"".into())),
            other => Err(Error::InvalidConfig(format!(
                "unknown accelerator {other:?}; use one of \"auto\", \"kvm\", \"hvf\", \"tcg\""
            ))),
        }
    }
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(Accel::resolve(Some("tcg")).unwrap(), Accel::Tcg);
        assert!(Accel::resolve(Some("warp")).is_err());
    }
}
