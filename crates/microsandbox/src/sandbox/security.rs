//! The `security:` profile of a sandbox (the reference gem's "default" / "restricted").
//!
//! Enforced by the guest agent per process (see `ExecRequest::restricted`): under
//! `restricted`, every command and the main process start with `PR_SET_NO_NEW_PRIVS` and
//! with every capability dropped, bounding set included — uid 0 keeps its uid but loses
//! what it is privileged for (mount, chown of others' files, raw sockets, module loading,
//! ptrace of other users, reboot…), and setuid or file-capability programs grant nothing.
//! The host's own filesystem calls (`Sandbox#fs`) and patches are the agent's, not a
//! command's, and are not restricted.

use crate::error::{Error, Result};

/// The profiles this engine knows.
pub const PROFILES: [&str; 2] = ["default", "restricted"];

/// Checks `security:`; returns true for `restricted`.
pub fn restricted(profile: Option<&str>) -> Result<bool> {
    match profile {
        None | Some("default") => Ok(false),
        Some("restricted") => Ok(true),
        Some(other) => Err(Error::InvalidConfig(format!(
            "unknown security profile {other:?}; use \"default\" or \"restricted\""
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        assert!(!restricted(None).unwrap());
        assert!(!restricted(Some("default")).unwrap());
        assert!(restricted(Some("restricted")).unwrap());
        assert!(matches!(restricted(Some("strict")), Err(Error::InvalidConfig(_))));
    }
}
