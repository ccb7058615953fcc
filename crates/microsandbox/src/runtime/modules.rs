//! Orders the guest kernel modules the agent must load.
//!
//! Debian's kernel package ships no `modules.dep`, so dependencies come from each
//! module's `.modinfo` section (`depends=a,b`), read with the `object` crate.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::error::{Error, IoContext, Result};

/// Modules the guest needs: PCI transport, the agent's serial port and the root disk.
pub const REQUIRED: &[&str] = &["virtio_pci", "virtio_console", "virtio_blk"];
/// Modules for the guest NIC (with their dependencies, e.g. `net_failover`), loaded only
/// by sandboxes that have one.
pub const NETWORK: &[&str] = &["virtio_net"];
/// Modules for `volumes:` shared through virtio-fs (`virtiofs` and `fuse`), loaded only by
/// sandboxes with such a mount.
pub const VIRTIOFS: &[&str] = &["virtiofs"];

/// The marker the kernel's `scripts/sign-file` appends after a module's signature.
const SIG_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature` (before the marker): algo, hash, id_type, signer_len,
/// key_id_len, 3 pad bytes, then the signature length as a big-endian u32.
const SIG_INFO_LEN: usize = 12;

/// A module without its appended signature (the bytes unchanged when it has none or the
/// trailer does not add up).
///
/// Why the initramfs carries unsigned modules: the guest kernel checks a signed module's
/// PKCS#7 signature on every load — a SHA-256 of the whole module and an RSA verification,
/// in software under TCG — ~5 ms per module, a third of the module loading at boot
/// (measured, DESIGN.md "Performance"). The check protects nothing here: the kernel does
/// not enforce signatures (`module.sig_enforce` is off; an unsigned module loads and only
/// taints the kernel with `E`), the modules come from the same Debian package as the
/// kernel the VM boots, which is not verified at boot either, and only the agent loads
/// modules, from the initramfs the host built.
pub fn strip_signature(ko: &[u8]) -> &[u8] {
    let Some(body) = ko.strip_suffix(SIG_MAGIC) else { return ko };
    let Some(info_at) = body.len().checked_sub(SIG_INFO_LEN) else { return ko };
    let info = &body[info_at..];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let trailer = sig_len + usize::from(info[3]) + usize::from(info[4]);
    match info_at.checked_sub(trailer) {
        Some(end) if end > 0 => &ko[..end],
        _ => ko,
    }
}

/// Module names treat `-` and `_` alike.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Indexes every `*.ko` below `dir` by module name.
pub fn index(dir: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut out = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).context(|| format!("reading {}", d.display()))? {
            let entry = entry.context(|| format!("reading {}", d.display()))?;
            let path = entry.path();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            } else if let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                out.insert(normalize(stem), path);
            }
        }
    }
    Ok(out)
}

/// The `depends=` list of a module file.
pub fn depends(ko: &[u8]) -> Result<Vec<String>> {
    let file = object::File::parse(ko).map_err(|e| Error::Runtime(format!("bad kernel module: {e}")))?;
    let Some(section) = file.section_by_name(".modinfo") else { return Ok(vec![]) };
    let data = section.data().map_err(|e| Error::Runtime(format!("bad .modinfo: {e}")))?;
    Ok(data
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| String::from_utf8_lossy(v).split(',').map(normalize).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect())
}

/// Load order (dependencies first) for `wanted`, as paths from `index`.
pub fn load_order(wanted: &[&str], index: &HashMap<String, PathBuf>) -> Result<Vec<PathBuf>> {
    let mut order = Vec::new();
    let mut done = HashSet::new();
    for w in wanted {
        visit(&normalize(w), index, &mut done, &mut HashSet::new(), &mut order)?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &HashMap<String, PathBuf>,
    done: &mut HashSet<String>,
    on_path: &mut HashSet<String>,
    order: &mut Vec<PathBuf>,
) -> Result<()> {
    if done.contains(name) {
        return Ok(());
    }
    if !on_path.insert(name.to_string()) {
        return Err(Error::Runtime(format!("kernel module dependency cycle at {name}")));
    }
    let path = index
        .get(name)
        .ok_or_else(|| Error::Runtime(format!("kernel module {name} is missing from the kernel package")))?;
    let bytes = std::fs::read(path).context(|| format!("reading {}", path.display()))?;
    for dep in depends(&bytes)? {
        visit(&dep, index, done, on_path, order)?;
    }
    on_path.remove(name);
    done.insert(name.to_string());
    order.push(path.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs against a real unpacked kernel package when MSB_TEST_MODULES points at
    /// `lib/modules/<release>`.
    #[test]
    fn real_modules_when_available() {
        let Some(dir) = std::env::var_os("MSB_TEST_MODULES") else { return };
        let idx = index(Path::new(&dir)).unwrap();
        let order = load_order(REQUIRED, &idx).unwrap();
        let names: Vec<_> = order.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(pos("virtio_ring.ko") < pos("virtio_pci.ko"));
        assert!(pos("virtio.ko") < pos("virtio_blk.ko"));
        for path in &order {
            let ko = std::fs::read(path).unwrap();
            let stripped = strip_signature(&ko);
            assert!(stripped.len() < ko.len(), "{} is signed", path.display());
            assert!(depends(stripped).is_ok(), "{} is still an ELF module", path.display());
        }
    }

    #[test]
    fn strips_an_appended_signature_only() {
        let body = b"\x7fELF module body".to_vec();
        let mut signed = body.clone();
        signed.extend_from_slice(&[0xAB; 7]); // the PKCS#7 blob
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 7]); // id_type 2, sig_len 7
        signed.extend_from_slice(SIG_MAGIC);
        assert_eq!(strip_signature(&signed), &body[..]);
        assert_eq!(strip_signature(&body), &body[..]);
        // A trailer whose length points before the start is left alone.
        let mut bad = body.clone();
        bad.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        bad.extend_from_slice(SIG_MAGIC);
        assert_eq!(strip_signature(&bad), &bad[..]);
        assert_eq!(strip_signature(SIG_MAGIC), SIG_MAGIC);
    }

    #[test]
    fn missing_module_is_an_error() {
        assert!(load_order(&["nope"], &HashMap::new()).is_err());
    }
}
