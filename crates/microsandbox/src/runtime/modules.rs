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
    }

    #[test]
    fn missing_module_is_an_error() {
        assert!(load_order(&["nope"], &HashMap::new()).is_err());
    }
}
