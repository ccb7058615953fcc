//! `VolumeFs`: a dir volume's files, read and written on the host without booting a VM.
//!
//! The volume's data directory is shared live with guests, so a guest can plant anything
//! in it: symlinks to `/etc/shadow`, symlinks to paths that do not exist yet, and it can
//! swap a directory for a symlink while a host call runs. Every path is therefore
//! resolved *beneath* the data directory by `cap-std` (`openat2(RESOLVE_BENEATH)` where
//! the kernel has it, else a component-by-component walk with `O_NOFOLLOW`), starting
//! from a directory descriptor opened once per call: a symlink is followed only when its
//! target stays inside, absolute symlink targets and `..` above the root are refused, and
//! nothing is ever resolved through a path string again after a check (no
//! canonicalise-then-compare, which a swap between check and use defeats).
//!
//! Paths are relative to the volume root; a leading `/` means the root, so `/a/b` and
//! `a/b` name the same file. Names are bytes (NUL refused).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use cap_std::fs::{Dir, MetadataExt, PermissionsExt};
use microsandbox_protocol::{FsEntry, FsKind, FsStat, PathBytes};

use super::{read_meta, volume_dir, Kind, DATA_DIR};
use crate::error::{Error, Result};
use crate::paths::Home;
use crate::sandbox::{MAX_LIST_ENTRIES, MAX_READ};

/// An open volume root. Every operation resolves beneath it.
pub struct VolumeFs {
    name: String,
    root: Dir,
}

impl VolumeFs {
    /// Opens dir volume `name` of `home`.
    pub fn open(home: &Home, name: &str) -> Result<VolumeFs> {
        let meta = read_meta(home, name)?;
        if super::is_block(&meta) {
            let what = if meta.kind == Kind::Disk { "a disk volume" } else { "a dir volume with quota_mib (stored as an ext4 image that enforces the quota)" };
            return Err(Error::UnsupportedOperation(format!(
                "volume {name:?} is {what}: its files live inside its ext4 image; mount it in a sandbox (volumes: {{\"/mnt\" => {{named: {name:?}}}}}) to read or write them"
            )));
        }
        Self::open_dir(name, &volume_dir(home, name).join(DATA_DIR))
    }

    /// A `VolumeFs` rooted at `dir` (the volume's data directory).
    pub fn open_dir(name: &str, dir: &Path) -> Result<VolumeFs> {
        let root = Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .map_err(|e| Error::Filesystem(format!("volume {name:?}: cannot open its data directory {}: {e}", dir.display())))?;
        Ok(VolumeFs { name: name.into(), root })
    }

    /// The relative path for `p`: leading slashes stripped, `.` for the root.
    fn rel(&self, p: &[u8]) -> Result<PathBuf> {
        if p.contains(&0) {
            return Err(Error::InvalidConfig("volume paths must not contain NUL bytes".into()));
        }
        let trimmed = {
            let mut s = p;
            while let [b'/', rest @ ..] = s {
                s = rest;
            }
            s
        };
        Ok(if trimmed.is_empty() { PathBuf::from(".") } else { PathBuf::from(OsStr::from_bytes(trimmed)) })
    }

    fn err(&self, op: &str, p: &Path, e: std::io::Error) -> Error {
        let shown = PathBytes(p.as_os_str().as_bytes().to_vec()).escaped();
        let what = format!("volume {:?}: {op} {shown}", self.name);
        match e.kind() {
            std::io::ErrorKind::NotFound => Error::PathNotFound(format!("{what}: no such file or directory")),
            // cap-std's refusal of `..` above the root, absolute symlinks and symlinks that
            // lead out of the volume.
            std::io::ErrorKind::PermissionDenied if e.to_string().contains("outside of the filesystem") => {
                Error::Filesystem(format!("{what}: the path leads outside the volume (through '..', an absolute or an escaping symlink) and was refused"))
            }
            _ => Error::Filesystem(format!("{what}: {e}")),
        }
    }

    /// The whole file (at most [`MAX_READ`] bytes).
    pub fn read(&self, path: &[u8]) -> Result<Vec<u8>> {
        let p = self.rel(path)?;
        let f = self.root.open(&p).map_err(|e| self.err("read", &p, e))?;
        let len = f.metadata().map_err(|e| self.err("read", &p, e))?.len();
        if len > MAX_READ {
            return Err(Error::Filesystem(format!(
                "volume {:?}: {} is {len} bytes; read at most {MAX_READ} at once",
                self.name,
                p.display()
            )));
        }
        let mut out = Vec::with_capacity(len as usize);
        f.take(MAX_READ + 1).read_to_end(&mut out).map_err(|e| self.err("read", &p, e))?;
        if out.len() as u64 > MAX_READ {
            return Err(Error::Filesystem(format!("volume {:?}: {} grew past {MAX_READ} bytes while read", self.name, p.display())));
        }
        Ok(out)
    }

    /// Creates or truncates a file and writes `data`; returns the bytes written.
    pub fn write(&self, path: &[u8], data: &[u8]) -> Result<u64> {
        let p = self.rel(path)?;
        let mut f = self.root.create(&p).map_err(|e| self.err("write", &p, e))?;
        f.write_all(data).map_err(|e| self.err("write", &p, e))?;
        f.flush().map_err(|e| self.err("write", &p, e))?;
        Ok(data.len() as u64)
    }

    /// Entries of a directory (symlinks not followed), sorted by name.
    pub fn list(&self, path: &[u8]) -> Result<Vec<FsEntry>> {
        let p = self.rel(path)?;
        let rd = self.root.read_dir(&p).map_err(|e| self.err("list", &p, e))?;
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| self.err("list", &p, e))?;
            if out.len() >= MAX_LIST_ENTRIES {
                return Err(Error::Filesystem(format!(
                    "volume {:?}: {} has more than {MAX_LIST_ENTRIES} entries",
                    self.name,
                    p.display()
                )));
            }
            // DirEntry::metadata does not follow a symlink.
            let m = e.metadata().map_err(|err| self.err("list", &p.join(e.file_name()), err))?;
            out.push(FsEntry {
                name: PathBytes(e.file_name().as_bytes().to_vec()),
                kind: kind_of(&m),
                size: m.len(),
                mode: m.permissions().mode() & 0o7777,
                mtime_sec: m.mtime(),
                mtime_nsec: m.mtime_nsec().clamp(0, 999_999_999) as u32,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Creates a directory and its missing parents (an existing directory is fine).
    pub fn mkdir(&self, path: &[u8]) -> Result<()> {
        let p = self.rel(path)?;
        self.root.create_dir_all(&p).map_err(|e| self.err("mkdir", &p, e))
    }

    /// Removes a file or symlink (never what a symlink points to).
    pub fn remove_file(&self, path: &[u8]) -> Result<()> {
        let p = self.rel(path)?;
        self.root.remove_file(&p).map_err(|e| self.err("remove", &p, e))
    }

    /// Removes a directory and everything in it (symlinks inside are removed, not followed).
    pub fn remove_dir(&self, path: &[u8]) -> Result<()> {
        let p = self.rel(path)?;
        if p == Path::new(".") {
            return Err(Error::InvalidConfig(format!(
                "volume {:?}: remove_dir of the volume root; remove the volume with Volume.remove instead",
                self.name
            )));
        }
        self.root.remove_dir_all(&p).map_err(|e| self.err("remove_dir", &p, e))
    }

    /// Whether the path exists (following symlinks that stay inside the volume). A
    /// symlink that leads outside raises.
    pub fn exists(&self, path: &[u8]) -> Result<bool> {
        let p = self.rel(path)?;
        match self.root.metadata(&p) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.err("exists?", &p, e)),
        }
    }

    /// Copies a file's contents and permission bits; returns the bytes copied.
    pub fn copy(&self, src: &[u8], dst: &[u8]) -> Result<u64> {
        let (s, d) = (self.rel(src)?, self.rel(dst)?);
        self.root.copy(&s, &self.root, &d).map_err(|e| self.err("copy", &s, e))
    }

    /// Renames (moves) a path inside the volume.
    pub fn rename(&self, src: &[u8], dst: &[u8]) -> Result<()> {
        let (s, d) = (self.rel(src)?, self.rel(dst)?);
        self.root.rename(&s, &self.root, &d).map_err(|e| self.err("rename", &s, e))
    }

    /// `lstat` of a path.
    pub fn stat(&self, path: &[u8]) -> Result<FsStat> {
        let p = self.rel(path)?;
        let m = self.root.symlink_metadata(&p).map_err(|e| self.err("stat", &p, e))?;
        let (btime_sec, btime_nsec) = match m.created() {
            Ok(t) => match t.into_std().duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => (Some(d.as_secs() as i64), Some(d.subsec_nanos())),
                Err(_) => (None, None),
            },
            Err(_) => (None, None),
        };
        Ok(FsStat {
            kind: kind_of(&m),
            size: m.len(),
            mode: m.permissions().mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec().clamp(0, 999_999_999) as u32,
            btime_sec,
            btime_nsec,
        })
    }
}

fn kind_of(m: &cap_std::fs::Metadata) -> FsKind {
    let t = m.file_type();
    if t.is_symlink() {
        FsKind::Symlink
    } else if t.is_dir() {
        FsKind::Directory
    } else if t.is_file() {
        FsKind::File
    } else {
        FsKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A volume root inside a scratch directory that also holds an `outside` directory
    /// with a secret: nothing a test does may read or create anything there.
    struct Fixture {
        _t: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        fs: VolumeFs,
    }

    fn fixture() -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("vol");
        let outside = t.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host secret").unwrap();
        let fs = VolumeFs::open_dir("v", &root).unwrap();
        Fixture { _t: t, root, outside, fs }
    }

    fn refused(r: Result<impl std::fmt::Debug>) {
        match r {
            Err(Error::Filesystem(m)) | Err(Error::PathNotFound(m)) => assert!(!m.contains("host secret"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn round_trip_inside_the_volume() {
        let f = fixture();
        f.fs.mkdir(b"/a/b").unwrap();
        assert_eq!(f.fs.write(b"a/b/c.txt", b"hi").unwrap(), 2);
        assert_eq!(f.fs.read(b"/a/b/c.txt").unwrap(), b"hi");
        assert!(f.fs.exists(b"a/b/c.txt").unwrap());
        assert!(!f.fs.exists(b"a/nope").unwrap());
        f.fs.copy(b"a/b/c.txt", b"a/d.txt").unwrap();
        f.fs.rename(b"a/d.txt", b"e.txt").unwrap();
        let names: Vec<_> = f.fs.list(b"/").unwrap().into_iter().map(|e| e.name.0).collect();
        assert_eq!(names, [b"a".to_vec(), b"e.txt".to_vec()]);
        assert_eq!(f.fs.stat(b"e.txt").unwrap().size, 2);
        assert_eq!(f.fs.stat(b"a").unwrap().kind, FsKind::Directory);
        // A relative symlink that stays inside is followed.
        symlink("b/c.txt", f.root.join("a/link")).unwrap();
        assert_eq!(f.fs.read(b"a/link").unwrap(), b"hi");
        assert_eq!(f.fs.stat(b"a/link").unwrap().kind, FsKind::Symlink);
        f.fs.remove_file(b"e.txt").unwrap();
        f.fs.remove_dir(b"a").unwrap();
        assert!(f.fs.list(b"").unwrap().is_empty());
        assert!(matches!(f.fs.read(b"nope"), Err(Error::PathNotFound(_))));
        assert!(matches!(f.fs.read(b"a\0b"), Err(Error::InvalidConfig(_))));
        assert!(matches!(f.fs.remove_dir(b"/"), Err(Error::InvalidConfig(_))));
    }

    #[test]
    fn dot_dot_and_absolute_paths_stay_inside() {
        let f = fixture();
        refused(f.fs.read(b"../outside/secret"));
        refused(f.fs.read(b"a/../../outside/secret"));
        refused(f.fs.write(b"../outside/new", b"x"));
        refused(f.fs.mkdir(b"../outside/newdir"));
        refused(f.fs.list(b".."));
        refused(f.fs.copy(b"../outside/secret", b"stolen"));
        // An absolute path names a file of the volume, never of the host.
        let host_file = f.outside.join("secret");
        refused(f.fs.read(host_file.as_os_str().as_bytes()));
        assert!(!f.outside.join("newdir").exists() && !f.outside.join("new").exists());
        assert!(!f.root.join("stolen").exists());
    }

    #[test]
    fn planted_symlinks_are_not_followed_out() {
        let f = fixture();
        // What a guest can plant: absolute targets (which mean the *guest's* root) and
        // relative ones climbing out of the volume, to files and to directories.
        symlink(f.outside.join("secret"), f.root.join("abs")).unwrap();
        symlink("../outside/secret", f.root.join("rel")).unwrap();
        symlink("../outside", f.root.join("dirlink")).unwrap();
        symlink("/etc", f.root.join("etc")).unwrap();
        for p in [&b"abs"[..], b"rel", b"dirlink/secret", b"etc/passwd"] {
            refused(f.fs.read(p));
        }
        refused(f.fs.list(b"dirlink"));
        refused(f.fs.write(b"rel", b"overwrite"));
        refused(f.fs.write(b"dirlink/new", b"x"));
        refused(f.fs.exists(b"abs"));
        refused(f.fs.copy(b"rel", b"copy"));
        assert_eq!(std::fs::read(f.outside.join("secret")).unwrap(), b"host secret");
        assert!(!f.outside.join("new").exists());
        // stat and remove act on the link itself.
        assert_eq!(f.fs.stat(b"abs").unwrap().kind, FsKind::Symlink);
        f.fs.remove_file(b"abs").unwrap();
        assert!(f.outside.join("secret").exists());
        // remove_dir of a directory holding an escaping link removes the link only.
        std::fs::create_dir(f.root.join("d")).unwrap();
        symlink("../../outside", f.root.join("d/out")).unwrap();
        f.fs.remove_dir(b"d").unwrap();
        assert!(f.outside.join("secret").exists());
        // Renaming onto a path through a link is refused too.
        f.fs.write(b"mine", b"m").unwrap();
        refused(f.fs.rename(b"mine", b"dirlink/mine"));
        assert!(!f.outside.join("mine").exists());
    }

    #[test]
    fn dangling_symlinks_to_the_outside_are_never_created_through() {
        let f = fixture();
        // Targets that do not exist yet: writing through them would create them on the host.
        symlink(f.outside.join("created"), f.root.join("abs-dangling")).unwrap();
        symlink("../outside/created2", f.root.join("rel-dangling")).unwrap();
        symlink("../outside/newdir", f.root.join("dir-dangling")).unwrap();
        refused(f.fs.write(b"abs-dangling", b"x"));
        refused(f.fs.write(b"rel-dangling", b"x"));
        refused(f.fs.mkdir(b"dir-dangling/sub"));
        refused(f.fs.copy(b"nonexistent-src", b"rel-dangling"));
        f.fs.write(b"src", b"data").unwrap();
        refused(f.fs.copy(b"src", b"rel-dangling"));
        assert_eq!(std::fs::read_dir(&f.outside).unwrap().count(), 1, "only the secret is there");
        // A dangling link that stays inside is an ordinary new file.
        symlink("later.txt", f.root.join("in-dangling")).unwrap();
        f.fs.write(b"in-dangling", b"ok").unwrap();
        assert_eq!(std::fs::read(f.root.join("later.txt")).unwrap(), b"ok");
    }

    /// A guest swaps `d` between a real directory and a symlink to the outside as fast as
    /// it can while the host writes and reads `d/f`: no write may land outside and no read
    /// may return the secret, whichever state each call meets.
    #[test]
    fn a_symlink_swapped_in_between_check_and_use_is_not_followed() {
        let f = fixture();
        std::fs::write(f.outside.join("f"), "host secret").unwrap();
        std::fs::create_dir(f.root.join("d")).unwrap();
        symlink("../outside", f.root.join("d.link")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swapper = {
            let (root, stop) = (f.root.clone(), stop.clone());
            std::thread::spawn(move || {
                use std::ffi::CString;
                let d = CString::new(root.join("d").as_os_str().as_bytes()).unwrap();
                let link = CString::new(root.join("d.link").as_os_str().as_bytes()).unwrap();
                let mut swaps = 0u64;
                while !stop.load(Ordering::Relaxed) && swaps < 50_000_000 {
                    // Atomically exchanges the directory and the symlink: `d` is one or
                    // the other at every instant.
                    // SAFETY: two valid NUL-terminated paths.
                    let r = unsafe {
                        libc::renameat2(libc::AT_FDCWD, d.as_ptr(), libc::AT_FDCWD, link.as_ptr(), libc::RENAME_EXCHANGE)
                    };
                    assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
                    swaps += 1;
                }
                swaps
            })
        };
        let mut wrote = 0;
        for i in 0..3_000u32 {
            if f.fs.write(b"d/f", format!("guest {i}").as_bytes()).is_ok() {
                wrote += 1;
            }
            if let Ok(data) = f.fs.read(b"d/f") {
                assert!(data.starts_with(b"guest "), "read the host's file: {:?}", String::from_utf8_lossy(&data));
            }
            let _ = f.fs.mkdir(b"d/sub");
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        assert!(swaps > 100, "the swapper must have raced: {swaps} swaps");
        assert!(wrote > 0, "some writes met the real directory");
        assert_eq!(std::fs::read(f.outside.join("f")).unwrap(), b"host secret", "a write went through the link");
        assert!(!f.outside.join("sub").exists());
        assert_eq!(std::fs::read_dir(&f.outside).unwrap().count(), 2);
    }
}
