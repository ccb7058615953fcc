//! `/etc/machine-id`: one per sandbox, with systemd's semantics.
//!
//! - **Cold boot**: an image whose `/etc/machine-id` is absent, empty or `uninitialized`
//!   gets a fresh random one before anything of the sandbox runs (what `systemd` does on a
//!   first boot); an image that ships a valid one keeps it (as systemd would). A sandbox
//!   with `init:` is left alone: its init owns the file (systemd's first-boot logic keys on
//!   it being empty).
//! - **Restore and fork**: the saved VM's disk already has the template's (or the parent's)
//!   id, so the host sends a fresh one in the `Restore` frame and the agent writes it
//!   before it answers `Ready`. A resumed sandbox is the same sandbox and keeps its id (the
//!   host sends none).
//!
//! The id is 128 random bits printed as 32 lowercase hex digits, with the UUID v4 version
//! and variant bits set as `sd_id128_randomize` sets them, and a newline; the file is
//! written to a temporary name and renamed over the old one (mode 0444), so a reader sees
//! the old id or the new one, never a torn one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

/// Where the id lives in the (switched-to) root.
const PATH: &str = "/etc/machine-id";
const TMP: &str = "/etc/.machine-id.msb";

/// True for a well-formed id: 32 lowercase hex digits, not all zero.
pub fn valid(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) && id.bytes().any(|b| b != b'0')
}

/// `bytes` as a machine id (UUID v4 bits set).
pub fn format(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// True when `content` (the file's text) holds no usable id: systemd's "uninitialized".
pub fn needs_one(content: Option<&str>) -> bool {
    match content.map(str::trim) {
        None => true,
        Some(t) => t.is_empty() || t == "uninitialized" || !valid(t),
    }
}

/// Writes `id` (already validated) as `/etc/machine-id`.
pub fn write(id: &str) -> Result<(), String> {
    if !valid(id) {
        return Err("invalid machine id".into());
    }
    let _ = std::fs::remove_file(TMP);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(TMP)
        .map_err(|e| format!("cannot write {PATH}: {e}"))?;
    f.write_all(format!("{id}\n").as_bytes()).map_err(|e| format!("cannot write {PATH}: {e}"))?;
    drop(f);
    std::fs::rename(TMP, PATH).map_err(|e| {
        let _ = std::fs::remove_file(TMP);
        format!("cannot write {PATH}: {e}")
    })
}

/// Cold boot: gives the root a machine id when it has none (see the module docs). Best
/// effort, as the other name files of a boot: the console says why when it cannot.
pub fn ensure_at_boot(cmdline: &str) {
    if microsandbox_protocol::InitSpec::from_cmdline(cmdline).is_some() {
        return;
    }
    let current = std::fs::read_to_string(PATH).ok();
    if !needs_one(current.as_deref()) {
        return;
    }
    let mut bytes = [0u8; 16];
    // GRND_INSECURE: never waits for the CRNG at early boot (nothing here is a key; the
    // pool has the boot's timings and the command line with the sandbox's hostname).
    // SAFETY: writes at most 16 bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), libc::GRND_INSECURE) };
    if n != bytes.len() as isize {
        eprintln!("msb-agent: cannot make a machine id: {}", std::io::Error::last_os_error());
        return;
    }
    if let Err(e) = write(&format(bytes)) {
        eprintln!("msb-agent: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_sets_uuid_v4_bits() {
        let id = format([0xff; 16]);
        assert_eq!(id, "ffffffffffff4fffbfffffffffffffff");
        assert!(valid(&id));
        assert_eq!(format([0; 16]), "00000000000040008000000000000000");
    }

    #[test]
    fn validity() {
        assert!(valid("0123456789abcdef0123456789abcdef"));
        assert!(!valid("0123456789ABCDEF0123456789abcdef"));
        assert!(!valid("0123456789abcdef0123456789abcde"));
        assert!(!valid("00000000000000000000000000000000"));
        assert!(!valid("0123456789abcdef0123456789abcdeg"));
    }

    #[test]
    fn what_counts_as_uninitialized() {
        assert!(needs_one(None));
        assert!(needs_one(Some("")));
        assert!(needs_one(Some("\n")));
        assert!(needs_one(Some("uninitialized\n")));
        assert!(needs_one(Some("garbage\n")));
        assert!(!needs_one(Some("0123456789abcdef0123456789abcdef\n")));
    }
}
