//! Turns a staged [`Tree`] into an ext4 disk image without root, and makes per-sandbox
//! copy-on-write overlays of it.
//!
//! 1. `mke2fs -d STAGING` copies the content (files, directories, symlinks, hardlinks);
//! 2. `debugfs -w -f SCRIPT` then applies what an unprivileged build could not put in the
//!    staging directory: it creates device nodes and fifos (`mknod`) and sets owner, group
//!    and the full mode (setuid/setgid/sticky included) of every node (`sif`).
//!
//! debugfs reads its script through libss, whose parser treats `"` as a quote and `""`
//! inside quotes as a literal quote; nothing else is special. [`quote`] relies on exactly
//! that, and names with line breaks are refused earlier (layers.rs), so every path in the
//! script means what it says. `mknod` links its *name argument* verbatim into the current
//! directory, so the script `cd`s into the parent and passes the bare base name.
//!
//! 3. the same script sets extended attributes (`ea_set -f VALUE_FILE PATH NAME`): values
//!    are binary (e.g. `security.capability`), so each goes through a file rather than the
//!    command line. [`super::layers`] bounds their number and size.
//!
//! debugfs exits 0 even when a command fails; failures are detected by anything on stderr
//! other than its version banner.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use super::layers::{NodeKind, Tree};
use crate::error::{Error, IoContext, Result};

/// Quotes a path for a debugfs script line.
pub fn quote(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    // Non-UTF-8 names: lossy conversion would name another file; refuse upstream instead.
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn missing_tool<'a>(tool: &'a str, pkg: &'a str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Runtime(format!("{tool} is not installed; install Debian's {pkg} package"))
        } else {
            Error::Io { context: format!("running {tool}"), source: e }
        }
    }
}

/// The debugfs script that applies `tree.meta` to a disk built from `tree`'s staging dir.
/// Entries equal to what mke2fs copied from staging (`staged_uid`/`staged_gid`, 0644 files,
/// 0755 dirs, 0777 symlinks) are skipped to keep the script short.
pub fn debugfs_script(tree: &Tree, staged_uid: u32, staged_gid: u32) -> Result<String> {
    use std::os::unix::ffi::OsStrExt;
    let mut s = String::new();
    for (rel, m) in &tree.meta {
        let rb = rel.as_os_str().as_bytes();
        if std::str::from_utf8(rb).is_err() {
            return Err(Error::Filesystem(format!(
                "the image has a file name that is not UTF-8 ({:?}); such names are not supported yet",
                rel
            )));
        }
        let mut abs = b"/".to_vec();
        abs.extend_from_slice(rb);
        let q = quote(&abs);
        if m.kind.is_special() {
            let parent = rel.parent().map(|p| p.as_os_str().as_bytes()).unwrap_or(b"");
            let base = rel.file_name().map(|b| b.as_bytes()).unwrap_or(b"");
            let mut pabs = b"/".to_vec();
            pabs.extend_from_slice(parent);
            let spec = match m.kind {
                NodeKind::Char { major, minor } => format!("c {major} {minor}"),
                NodeKind::Block { major, minor } => format!("b {major} {minor}"),
                _ => "p".to_string(),
            };
            let _ = writeln!(s, "cd {}\nmknod {} {spec}\ncd /", quote(&pabs), quote(base));
        }
        let staged_mode = match m.kind {
            NodeKind::File => 0o100644,
            NodeKind::Dir => 0o040755,
            NodeKind::Symlink => 0o120777,
            _ => 0,
        };
        let staged_owner = !m.kind.is_special() && !rb.is_empty();
        if !(staged_owner && m.uid == staged_uid) {
            let _ = writeln!(s, "sif {q} uid {}", m.uid);
        }
        if !(staged_owner && m.gid == staged_gid) {
            let _ = writeln!(s, "sif {q} gid {}", m.gid);
        }
        if m.mode() != staged_mode {
            let _ = writeln!(s, "sif {q} mode 0{:o}", m.mode());
        }
    }
    Ok(s)
}

/// Builds `disk` (a sparse ext4 image) holding `tree` with its recorded metadata, shrunk
/// to (nearly) no free space. `work` is a scratch directory for the debugfs script.
///
/// The disk is the shared read-only base of every sandbox of the image. A sandbox's
/// writable space comes from its overlay being larger than the base (`oci_upper_size`):
/// the guest agent grows the filesystem online to the device size at first boot. Hence
/// the features: `meta_bg` instead of `resize_inode` (growing needs no reserved
/// descriptor blocks, and writes far fewer blocks: measured under TCG, +4 GiB in 10-15 ms
/// against 35-160 ms) and `uninit_bg`, so new groups' inode tables are zeroed lazily
/// instead of during boot. `-m 0`: no blocks reserved for root, a sandbox's user gets
/// all of its space.
pub fn build_ext4(tree: &Tree, disk: &Path, work: &Path) -> Result<()> {
    let (used, nodes) = tree.usage();
    // Generous room for mke2fs -d (metadata, directories); shrink_to_fit removes it.
    let size = (used + used / 5 + (64 << 20)).div_ceil(1 << 20) << 20;
    let inodes = (size / 16384).max(nodes * 2 + 16384);
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0", "-N"])
        .arg(inodes.to_string())
        .args([
            // Explicit features (no dependence on the host's mke2fs.conf) and 256-byte
            // inodes, so timestamps go past 2038. Without ext_attr, debugfs drops xattrs
            // silently.
            "-I",
            "256",
            "-O",
            "^has_journal,ext_attr,^resize_inode,meta_bg,uninit_bg,extent,huge_file,flex_bg,dir_nlink,extra_isize,sparse_super,large_file,filetype,dir_index",
            "-E",
            "lazy_itable_init=1,root_owner=0:0",
            "-d",
        ])
        .arg(tree.root())
        .arg(disk)
        .arg(format!("{}k", size >> 10))
        .env("MKE2FS_CONFIG", "/dev/null")
        .output()
        .map_err(missing_tool("mke2fs", "e2fsprogs"))?;
    if !out.status.success() {
        return Err(Error::Filesystem(format!(
            "mke2fs could not build the root disk {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut script = debugfs_script(tree, unsafe { libc::geteuid() }, unsafe { libc::getegid() })?;
    script += &xattr_script(tree, &work.join("xattrs"))?;
    if !script.is_empty() {
        let script_path = work.join("meta.debugfs");
        std::fs::write(&script_path, &script).context(|| format!("writing {}", script_path.display()))?;
        run_debugfs(disk, &script_path)?;
    }
    shrink_to_fit(disk)
}

/// Shrinks the filesystem (and the file) to its content plus a small margin, so the base
/// adds little to a sandbox's writable space.
///
/// Not `resize2fs -M`: with `flex_bg` its minimum-size estimate is far too high (measured
/// with e2fsprogs 1.47: 1.7x the used blocks for a 760 MiB tree). An explicit size with
/// `-f` skips that estimate; resize2fs still refuses (and changes nothing) when the data
/// does not fit, so growing margins are tried. If none fits, the disk keeps its size —
/// the sandbox then gets that much more space, which is still bounded.
pub fn shrink_to_fit(disk: &Path) -> Result<()> {
    let (blocks, free) = block_usage(disk)?;
    let used = blocks.saturating_sub(free);
    for margin in [used / 100 + 256, used / 20 + 2048, used / 4 + 8192] {
        let target = used + margin;
        if target >= blocks {
            return Ok(());
        }
        let ok = Command::new("resize2fs")
            .arg("-f")
            .arg(disk)
            .arg(target.to_string())
            .output()
            .map_err(missing_tool("resize2fs", "e2fsprogs"))?
            .status
            .success();
        if ok {
            return Ok(());
        }
    }
    Ok(())
}

/// `(block count, free blocks)` of the ext4 image `disk`, from `dumpe2fs -h`.
pub fn block_usage(disk: &Path) -> Result<(u64, u64)> {
    let out = Command::new("dumpe2fs").arg("-h").arg(disk).output().map_err(missing_tool("dumpe2fs", "e2fsprogs"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok());
    match (field("Block count:"), field("Free blocks:")) {
        (Some(b), Some(f)) if out.status.success() => Ok((b, f)),
        _ => Err(Error::Filesystem(format!(
            "dumpe2fs could not read the root disk {}: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// debugfs lines setting `tree.xattrs`; each value is written to a file in `values_dir`
/// (created when needed), which must outlive the debugfs run.
pub fn xattr_script(tree: &Tree, values_dir: &Path) -> Result<String> {
    use std::os::unix::ffi::OsStrExt;
    let mut s = String::new();
    let mut n = 0usize;
    for (rel, attrs) in &tree.xattrs {
        if !tree.meta.contains_key(rel) {
            continue;
        }
        let mut abs = b"/".to_vec();
        abs.extend_from_slice(rel.as_os_str().as_bytes());
        for (name, value) in attrs {
            if n == 0 {
                std::fs::create_dir_all(values_dir).context(|| format!("creating {}", values_dir.display()))?;
            }
            let vf = values_dir.join(n.to_string());
            n += 1;
            std::fs::write(&vf, value).context(|| format!("writing {}", vf.display()))?;
            let _ = writeln!(s, "ea_set -f {} {} {}", quote(vf.as_os_str().as_bytes()), quote(&abs), quote(name));
        }
    }
    Ok(s)
}

/// Runs a debugfs script read-write against `disk`; any error message fails the call.
pub fn run_debugfs(disk: &Path, script: &Path) -> Result<()> {
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(script)
        .arg(disk)
        .output()
        .map_err(missing_tool("debugfs", "e2fsprogs"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs ")).collect();
    if !out.status.success() || !errors.is_empty() {
        return Err(Error::Filesystem(format!(
            "debugfs could not apply ownership/modes to {}: {}",
            disk.display(),
            errors.iter().take(5).copied().collect::<Vec<_>>().join("; ")
        )));
    }
    Ok(())
}

/// Creates `overlay` as a qcow2 copy-on-write layer over the read-only raw `base`.
/// `size` (bytes) defaults to the base's size. The guest agent grows the filesystem to
/// the device size at boot, so the bytes beyond the base are the sandbox's writable
/// space; the overlay file can never grow past `size` plus qcow2 metadata.
pub fn create_overlay(base: &Path, overlay: &Path, size: Option<u64>) -> Result<()> {
    create_overlay_with_format(base, "raw", overlay, size)
}

/// [`create_overlay`] over a base of format `base_format` (`raw`, or `qcow2` for a
/// template's disk layer).
pub fn create_overlay_with_format(base: &Path, base_format: &str, overlay: &Path, size: Option<u64>) -> Result<()> {
    let base = std::fs::canonicalize(base).context(|| format!("root disk {}", base.display()))?;
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", base_format, "-b"]).arg(&base).arg(overlay);
    if let Some(s) = size {
        cmd.arg(s.to_string());
    }
    let out = cmd.output().map_err(missing_tool("qemu-img", "qemu-utils"))?;
    if !out.status.success() {
        return Err(Error::Filesystem(format!(
            "qemu-img could not create the overlay {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// `debugfs -R "stat <path>"` output (tests and diagnostics).
pub fn debugfs_stat(disk: &Path, path: &str) -> Result<String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {}", quote(path.as_bytes())))
        .arg(disk)
        .output()
        .map_err(missing_tool("debugfs", "e2fsprogs"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::layers::tests::TarBuilder;
    use crate::image::layers::LayerInput;

    #[test]
    fn quoting() {
        assert_eq!(quote(b"/a b"), "\"/a b\"");
        assert_eq!(quote(b"/we\"ird"), "\"/we\"\"ird\"");
        assert_eq!(quote(b"/it's\\x"), "\"/it's\\x\"");
    }

    /// Real mke2fs + debugfs: awkward names, owners, setuid, devices — read back with stat.
    #[test]
    fn builds_ext4_with_recorded_metadata() {
        let t = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(&t.path().join("root")).unwrap();
        let tar = TarBuilder::default()
            .dir("sp ace/", 0o750, 1000, 1001)
            .file("sp ace/we\"ird 'name'", 0o4711, 1000, 1001, b"hi")
            .file("back\\slash", 0o2755, 7, 8, b"x")
            .link(tar::EntryType::Link, "sp ace/hard", "sp ace/we\"ird 'name'")
            .link(tar::EntryType::Symlink, "lnk", "/sp ace")
            .dev(tar::EntryType::Char, "dev/n ull", 0o666, 1, 3)
            .dev(tar::EntryType::Block, "dev/sda", 0o660, 8, 0)
            .dev(tar::EntryType::Fifo, "sp ace/fi\"fo", 0o1620, 0, 0)
            .dir("tmp/", 0o1777, 0, 0)
            .build();
        let p = t.path().join("l");
        std::fs::write(&p, &tar).unwrap();
        let d = crate::image::store::sha256_digest(&tar);
        tree.apply_layer(&LayerInput { path: p, digest: d, size: 0, media_type: String::new(), diff_id: None }).unwrap();
        let disk = t.path().join("d.ext4");
        build_ext4(&tree, &disk, t.path()).unwrap();

        let st = |p: &str| debugfs_stat(&disk, p).unwrap();
        let s = st("/sp ace/we\"ird 'name'");
        assert!(s.contains("Mode:  04711"), "{s}");
        assert!(s.contains("User:  1000   Group:  1001"), "{s}");
        assert!(s.contains("Links: 2"), "{s}");
        let s = st("/sp ace");
        assert!(s.contains("Type: directory") && s.contains("Mode:  0750"), "{s}");
        let s = st("/back\\slash");
        assert!(s.contains("Mode:  02755") && s.contains("User:     7   Group:     8"), "{s}");
        let s = st("/dev/n ull");
        assert!(s.contains("Type: character special") && s.contains("Mode:  0666"), "{s}");
        assert!(s.contains("Device major/minor number: 01:03"), "{s}");
        let s = st("/dev/sda");
        assert!(s.contains("Type: block special") && s.contains("Device major/minor number: 08:00"), "{s}");
        let s = st("/sp ace/fi\"fo");
        assert!(s.contains("Type: FIFO") && s.contains("Mode:  01620"), "{s}");
        let s = st("/tmp");
        assert!(s.contains("Mode:  01777"), "{s}");
        let s = st("/lnk");
        assert!(s.contains("Type: symlink") && s.contains("Fast link dest: \"/sp ace\""), "{s}");
        // No stray entry named with a slash (mknod links its argument verbatim).
        let out = Command::new("debugfs").args(["-R", "ls -p /"]).arg(&disk).output().unwrap();
        let ls = String::from_utf8_lossy(&out.stdout);
        assert!(ls.contains("/dev//") && !ls.contains("n ull") && !ls.contains("fifo"), "{ls}");
    }

    /// Real mke2fs + debugfs: PAX xattrs (binary values included) land on the right inodes.
    #[test]
    fn builds_ext4_with_xattrs() {
        let t = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(&t.path().join("root")).unwrap();
        // v2 file capabilities with NUL and newline bytes in the value.
        let cap: &[u8] = &[0, 0, 0, 2, 0x0a, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let tar = TarBuilder::default()
            .xattrs(&[("user.root", b"/")])
            .dir("./", 0o755, 0, 0)
            .xattrs(&[("security.capability", cap), ("user.msb \"q\"", b"two words")])
            .file("bin/ca p", 0o755, 0, 0, b"\x7fELF")
            .link(tar::EntryType::Link, "bin/hard", "bin/ca p")
            .xattrs(&[("trusted.t", b"dev")])
            .dev(tar::EntryType::Char, "dev/null", 0o666, 1, 3)
            .xattrs(&[("user.big", &[b'x'; 3000])])
            .dir("srv/", 0o755, 0, 0)
            .build();
        let p = t.path().join("l");
        std::fs::write(&p, &tar).unwrap();
        let d = crate::image::store::sha256_digest(&tar);
        tree.apply_layer(&LayerInput { path: p, digest: d, size: 0, media_type: String::new(), diff_id: None }).unwrap();
        let disk = t.path().join("d.ext4");
        build_ext4(&tree, &disk, t.path()).unwrap();

        let get = |path: &str, name: &str| {
            let out = t.path().join("ea.out");
            let _ = std::fs::remove_file(&out);
            let cmd = format!("ea_get -f {} {} {}", quote(out.to_str().unwrap().as_bytes()), quote(path.as_bytes()), quote(name.as_bytes()));
            let o = Command::new("debugfs").arg("-R").arg(cmd).arg(&disk).output().unwrap();
            std::fs::read(&out).unwrap_or_else(|_| panic!("{path} {name}: {}", String::from_utf8_lossy(&o.stderr)))
        };
        assert_eq!(get("/", "user.root"), b"/");
        assert_eq!(get("/bin/ca p", "security.capability"), cap);
        assert_eq!(get("/bin/ca p", "user.msb \"q\""), b"two words");
        assert_eq!(get("/bin/hard", "security.capability"), cap, "one inode, two names");
        assert_eq!(get("/dev/null", "trusted.t"), b"dev");
        assert_eq!(get("/srv", "user.big"), vec![b'x'; 3000]);
    }

    /// The base is shrunk to its content and can grow online (meta_bg, no resize_inode).
    #[test]
    fn base_has_almost_no_free_space_and_can_grow() {
        let t = tempfile::tempdir().unwrap();
        let mut tree = Tree::new(&t.path().join("root")).unwrap();
        let tar = TarBuilder::default().file("data", 0o644, 0, 0, &vec![7u8; 3 << 20]).build();
        let p = t.path().join("l");
        std::fs::write(&p, &tar).unwrap();
        let d = crate::image::store::sha256_digest(&tar);
        tree.apply_layer(&LayerInput { path: p, digest: d, size: 0, media_type: String::new(), diff_id: None }).unwrap();
        let disk = t.path().join("d.ext4");
        build_ext4(&tree, &disk, t.path()).unwrap();
        let out = Command::new("dumpe2fs").arg("-h").arg(&disk).output().unwrap();
        let h = String::from_utf8_lossy(&out.stdout);
        let field = |k: &str| -> u64 {
            h.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_else(|| panic!("{k} in {h}")).trim().parse().unwrap()
        };
        let features = h.lines().find(|l| l.starts_with("Filesystem features:")).unwrap();
        assert!(features.contains("meta_bg") && features.contains("uninit_bg") && !features.contains("resize_inode"), "{features}");
        let used = field("Block count:") - field("Free blocks:");
        assert!(field("Free blocks:") <= used / 100 + 256, "{h}");
        assert_eq!(field("Reserved block count:"), 0);
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), field("Block count:") * 4096);
    }

    #[test]
    fn overlay_is_backed_by_the_read_only_base() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().join("base.ext4");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let ov = t.path().join("root.qcow2");
        create_overlay(&base, &ov, None).unwrap();
        assert_eq!(crate::image::store::qcow2_backing_file(&ov).unwrap(), std::fs::canonicalize(&base).unwrap());
        // A larger overlay: the virtual size (qcow2 header, offset 24, u64 BE) is base + upper.
        let big = t.path().join("big.qcow2");
        create_overlay(&base, &big, Some((1 << 20) + (64 << 20))).unwrap();
        let hdr = std::fs::read(&big).unwrap();
        assert_eq!(u64::from_be_bytes(hdr[24..32].try_into().unwrap()), (1 << 20) + (64 << 20));
    }
}
