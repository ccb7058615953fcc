//! The guest's `volumes:` mounts, as the host passes them on the kernel command line
//! (`msb.mounts=<base64url of a JSON list of GuestMount>`), so they are mounted before
//! any process runs. The host bounds the encoded length; the agent decodes strictly.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Kernel command-line parameter carrying the mounts.
pub const MOUNTS_PARAM: &str = "msb.mounts=";

/// One mount the agent performs at boot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuestMount {
    /// Absolute guest directory (created when missing).
    pub target: String,
    /// `virtiofs`, `tmpfs` or a block filesystem (`ext4`, `ext3`, `ext2`).
    pub fstype: String,
    /// The virtio-fs tag, the virtio-blk serial of the device, or `tmpfs`.
    pub source: String,
    #[serde(default)]
    pub readonly: bool,
    #[serde(default)]
    pub noexec: bool,
    #[serde(default)]
    pub nosuid: bool,
    #[serde(default)]
    pub nodev: bool,
    /// Mount data (e.g. `mode=1777,size=64m` for a tmpfs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// The command-line word for `mounts` (`msb.mounts=…`).
pub fn encode_mounts(mounts: &[GuestMount]) -> String {
    let json = serde_json::to_vec(mounts).expect("mounts serialize");
    format!("{MOUNTS_PARAM}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json))
}

/// The mounts of a kernel command line (last `msb.mounts=` wins); empty without one.
pub fn decode_mounts(cmdline: &str) -> Result<Vec<GuestMount>, String> {
    let Some(v) = cmdline.split_whitespace().rev().find_map(|w| w.strip_prefix(MOUNTS_PARAM)) else {
        return Ok(Vec::new());
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(v)
        .map_err(|e| format!("msb.mounts is not base64url: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("msb.mounts is malformed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_a_command_line() {
        let m = GuestMount {
            target: "/data dir".into(),
            fstype: "virtiofs".into(),
            source: "msbfs0".into(),
            readonly: true,
            noexec: false,
            nosuid: true,
            nodev: false,
            data: None,
        };
        let line = format!("console=ttyS0 {} quiet", encode_mounts(std::slice::from_ref(&m)));
        assert!(!encode_mounts(std::slice::from_ref(&m)).contains(' '));
        assert_eq!(decode_mounts(&line).unwrap(), vec![m]);
        assert!(decode_mounts("quiet").unwrap().is_empty());
        assert!(decode_mounts("msb.mounts=!!").is_err());
        assert!(decode_mounts("msb.mounts=e30").is_err(), "an object, not a list");
    }
}
