//! Builds the guest's initramfs: the agent as `/init` plus the kernel modules it loads.

use std::io::Cursor;
use std::path::Path;

use cpio::newc::Builder;

use crate::error::{IoContext, Result};

/// Directories the agent expects to exist before it mounts anything.
const DIRS: &[&str] = &["dev", "proc", "sys", "newroot", "lib", "lib/modules"];

/// Writes a newc cpio archive to `out` with `agent` as `/init` and `modules` (in load
/// order) under `/lib/modules/`, listed in `/lib/modules.order`; `net_modules` likewise,
/// listed in `/lib/modules.net.order` (the agent loads those only when the sandbox has a
/// NIC); `fs_modules` in `/lib/modules.fs.order` (loaded only for virtio-fs volumes).
pub fn build(
    agent: &[u8],
    modules: &[(String, Vec<u8>)],
    net_modules: &[(String, Vec<u8>)],
    fs_modules: &[(String, Vec<u8>)],
    out: &Path,
) -> Result<()> {
    let mut entries: Vec<(Builder, Cursor<Vec<u8>>)> = Vec::new();
    let mut ino = 1;
    let mut next = |name: &str, mode: u32| {
        ino += 1;
        Builder::new(name).ino(ino).mode(mode).uid(0).gid(0).nlink(1)
    };
    for d in DIRS {
        entries.push((next(d, 0o040755), Cursor::new(Vec::new())));
    }
    entries.push((next("init", 0o100755), Cursor::new(agent.to_vec())));
    for (list, mods) in [("lib/modules.order", modules), ("lib/modules.net.order", net_modules), ("lib/modules.fs.order", fs_modules)] {
        let mut order = String::new();
        for (name, bytes) in mods {
            order.push_str(name);
            order.push('\n');
            entries.push((next(&format!("lib/modules/{name}"), 0o100644), Cursor::new(bytes.clone())));
        }
        entries.push((next(list, 0o100644), Cursor::new(order.into_bytes())));
    }

    let tmp = out.with_extension("tmp");
    let file = std::fs::File::create(&tmp).context(|| format!("creating {}", tmp.display()))?;
    let file = cpio::write_cpio(entries.into_iter(), std::io::BufWriter::new(file))
        .context(|| format!("writing {}", tmp.display()))?;
    file.into_inner()
        .map_err(|e| e.into_error())
        .and_then(|f| f.sync_all())
        .context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).context(|| format!("renaming into {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_lists_init_and_modules() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("i.cpio");
        build(b"AGENT", &[("a.ko".into(), b"A".to_vec())], &[("n.ko".into(), b"N".to_vec())], &[("f.ko".into(), b"F".to_vec())], &out).unwrap();
        let mut r = std::fs::File::open(&out).unwrap();
        let mut names = vec![];
        loop {
            let rd = cpio::NewcReader::new(r).unwrap();
            if rd.entry().is_trailer() {
                break;
            }
            names.push((rd.entry().name().to_string(), rd.entry().mode()));
            r = rd.finish().unwrap();
        }
        assert!(names.contains(&("init".into(), 0o100755)));
        assert!(names.contains(&("lib/modules/a.ko".into(), 0o100644)));
        assert!(names.iter().any(|(n, _)| n == "lib/modules.order"));
        assert!(names.iter().any(|(n, _)| n == "lib/modules.net.order"));
        assert!(names.contains(&("lib/modules/n.ko".into(), 0o100644)));
        assert!(names.contains(&("lib/modules/f.ko".into(), 0o100644)));
        assert!(names.iter().any(|(n, _)| n == "lib/modules.fs.order"));
    }
}
