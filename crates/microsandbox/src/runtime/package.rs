//! Finds and unpacks Debian's cloud kernel package.
//!
//! Order: `$MICROSANDBOX_KERNEL_DEB` (a `.deb` path), a package already cached in
//! `<home>/cache`, else `apt-get download` of the package that
//! `linux-image-cloud-amd64` depends on. Unpacking uses `dpkg-deb -x`; nothing is
//! installed on the host.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, IoContext, Result};
use crate::paths::Home;

/// Debian's meta package that names the current cloud kernel.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// An unpacked kernel package.
pub struct UnpackedKernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    /// Temporary directory to delete once the runtime is built.
    pub unpacked: PathBuf,
}

fn missing_kernel(why: &str) -> Error {
    Error::Runtime(format!(
        "no guest kernel: {why}. The runtime needs Debian's {META_PACKAGE} kernel package: on Debian/Ubuntu run \
         `apt-get update` so that `apt-get download {META_PACKAGE}` works, or download a linux-image-*-cloud-amd64 \
         .deb yourself and set MICROSANDBOX_KERNEL_DEB=/path/to/it"
    ))
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            missing_kernel(&format!("`{what}` is not available on this host"))
        } else {
            Error::Io { context: format!("running {what}"), source: e }
        }
    })?;
    if !out.status.success() {
        return Err(missing_kernel(&format!(
            "`{what}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cached_deb(cache: &Path) -> Option<PathBuf> {
    let mut debs: Vec<_> = std::fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("linux-image-") && n.ends_with(".deb")
        })
        .collect();
    debs.sort();
    debs.pop()
}

fn download(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let deps = run(Command::new("apt-cache").args(["depends", META_PACKAGE]), "apt-cache depends")?;
    let pkg = deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| missing_kernel(&format!("apt-cache knows no {META_PACKAGE} (run `apt-get update`)")))?
        .to_string();
    progress(&format!("downloading {pkg} with apt-get"));
    run(Command::new("apt-get").args(["download", "-q", &pkg]).current_dir(cache), "apt-get download")?;
    cached_deb(cache).ok_or_else(|| missing_kernel("apt-get download produced no .deb"))
}

/// Locates (downloading if needed) and unpacks the kernel package.
pub fn unpack_kernel(home: &Home, force: bool, progress: &mut dyn FnMut(&str)) -> Result<UnpackedKernel> {
    let cache = home.cache_dir();
    let deb = match std::env::var_os("MICROSANDBOX_KERNEL_DEB").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => match cached_deb(&cache).filter(|_| !force) {
            Some(p) => p,
            None => download(&cache, progress)?,
        },
    };
    if !deb.is_file() {
        return Err(missing_kernel(&format!("{} does not exist", deb.display())));
    }
    let unpacked = cache.join(format!("unpack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&unpacked);
    std::fs::create_dir_all(&unpacked).context(|| format!("creating {}", unpacked.display()))?;
    progress(&format!("unpacking {}", deb.file_name().unwrap_or_default().to_string_lossy()));
    let deb_s = deb.to_string_lossy().into_owned();
    let dest_s = unpacked.to_string_lossy().into_owned();
    run(Command::new("dpkg-deb").args(["-x", &deb_s, &dest_s]), "dpkg-deb -x")?;

    let boot = unpacked.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .context(|| format!("{} has no boot/ directory", deb.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .ok_or_else(|| missing_kernel(&format!("{} contains no boot/vmlinuz-*", deb.display())))?;
    let release = vmlinuz.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    let modules_dir = unpacked.join("lib/modules").join(&release);
    if !modules_dir.is_dir() {
        return Err(missing_kernel(&format!("{} contains no lib/modules/{release}", deb.display())));
    }
    Ok(UnpackedKernel { release, vmlinuz, modules_dir, unpacked })
}
