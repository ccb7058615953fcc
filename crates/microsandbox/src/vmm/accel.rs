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

/// `/dev/kvm` must open read-write *and*, on x86, the CPU must advertise VMX/SVM.
/// Some sandboxed hosts (this project's CI among them) expose a `/dev/kvm` that opens and
/// creates VMs but cannot run a Linux guest (it dies early with a CPU dump); such hosts
/// show no `vmx`/`svm` flag, while real and nested KVM hosts do.
fn kvm_usable() -> bool {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return false;
    }
    if !cfg!(target_arch = "x86_64") {
        return true;
    }
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| cpu_has_virtualization(&c))
}

fn cpu_has_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtualization_flag() {
        assert!(cpu_has_virtualization("flags\t\t: fpu vme vmx sse\n"));
        assert!(!cpu_has_virtualization("flags\t\t: fpu vme sse\n"));
        assert!(!cpu_has_virtualization("model name : vmx\n"));
    }

    #[test]
    fn parses_names() {
        assert_eq!(Accel::resolve(Some("tcg")).unwrap(), Accel::Tcg);
        assert!(Accel::resolve(Some("warp")).is_err());
    }
}
