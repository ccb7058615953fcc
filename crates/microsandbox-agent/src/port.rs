//! Finding and opening the virtio-serial port the host talks to us on.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;

/// Where the kernel lists virtio-serial ports, one directory per port (`vport1p1`, ...).
pub const SYSFS_PORTS: &str = "/sys/class/virtio-ports";

/// Name of the port device (e.g. `vport1p1`) whose `name` attribute equals `wanted`.
/// The attribute is empty until the host has sent the port name, so callers poll.
pub fn find(sysfs_ports: &Path, wanted: &str) -> Option<String> {
    for entry in fs::read_dir(sysfs_ports).ok()?.flatten() {
        let Ok(name) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if name.trim_end_matches('\n') == wanted {
            return Some(entry.file_name().to_string_lossy().into_owned());
        }
    }
    None
}

/// Opens `/dev/<dev>` read-write. The kernel allows one open of a port at a time, so
/// this fd (and its dups) is the agent's only handle for its whole life; it is opened
/// before the root switch and stays valid across it.
pub fn open(dev: &str) -> io::Result<File> {
    // std opens with O_CLOEXEC, so session processes never inherit the port.
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev").join(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name() {
        let dir = std::env::temp_dir().join(format!("msb-port-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (dev, name) in [
            ("vport0p0", ""),
            ("vport1p1", "org.other\n"),
            ("vport1p2", "msb.agent\n"),
        ] {
            fs::create_dir_all(dir.join(dev)).unwrap();
            fs::write(dir.join(dev).join("name"), name).unwrap();
        }
        fs::create_dir_all(dir.join("vport9p9")).unwrap(); // no name attribute yet
        assert_eq!(find(&dir, "msb.agent").as_deref(), Some("vport1p2"));
        assert_eq!(find(&dir, "msb.none"), None);
        assert_eq!(find(&dir.join("missing"), "msb.agent"), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
