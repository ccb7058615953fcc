//! Provisioning of what the VMM driver needs under `<home>`: guest kernel, initramfs
//! (agent + modules) and the supervisor binary. [`install`] is idempotent and safe to
//! run from several processes at once (an exclusive lock file serializes them).

mod initramfs;
pub mod kernel;
pub mod modules;
mod package;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::paths::Home;

/// The binaries this build of the gem ships; install copies them into the home.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub agent: PathBuf,
    pub supervisor: PathBuf,
}

/// Installed runtime, as recorded in `<home>/runtime/manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub kernel_release: String,
    /// File name (in the runtime dir) of the kernel QEMU boots: `vmlinux` or `vmlinuz`.
    pub kernel_file: String,
    pub agent_sha256: String,
    pub supervisor_sha256: String,
}

/// Absolute paths of an installed runtime.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub manifest: Manifest,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub supervisor: PathBuf,
}

fn sha256_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p).context(|| format!("reading {}", p.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Reads the installed runtime, or `None` when it is absent or incomplete.
pub fn load(home: &Home) -> Option<Runtime> {
    let dir = home.runtime_dir();
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).ok()?).ok()?;
    let rt = Runtime {
        kernel: dir.join(&manifest.kernel_file),
        initramfs: dir.join("initramfs.cpio"),
        supervisor: home.supervisor_path(),
        manifest,
    };
    (rt.kernel.is_file() && rt.initramfs.is_file() && rt.supervisor.is_file()).then_some(rt)
}

/// True when the runtime is installed and was built from exactly `bundle`'s binaries.
pub fn is_installed(home: &Home, bundle: &Bundle) -> bool {
    let Some(rt) = load(home) else { return false };
    sha256_file(&bundle.agent).ok().as_deref() == Some(rt.manifest.agent_sha256.as_str())
        && sha256_file(&bundle.supervisor).ok().as_deref() == Some(rt.manifest.supervisor_sha256.as_str())
}

/// Installs (or repairs) the runtime. Cheap when it is already current, unless `force`.
pub fn install(home: &Home, bundle: &Bundle, force: bool, progress: &mut dyn FnMut(&str)) -> Result<Runtime> {
    for (what, p) in [("guest agent", &bundle.agent), ("supervisor", &bundle.supervisor)] {
        if !p.is_file() {
            return Err(Error::Runtime(format!(
                "the {what} binary {} is missing; build the gem first (`bundle exec rake compile`)",
                p.display()
            )));
        }
    }
    std::fs::create_dir_all(home.root()).context(|| format!("creating {}", home.root().display()))?;
    let lock_path = home.root().join("install.lock");
    let _lock = crate::lockfile::lock_exclusive(&lock_path)?;

    if !force && is_installed(home, bundle) {
        return load(home).ok_or_else(|| Error::Runtime("runtime vanished during install".into()));
    }

    let runtime_dir = home.runtime_dir();
    for d in [&runtime_dir, &home.bin_dir(), &home.cache_dir()] {
        std::fs::create_dir_all(d).context(|| format!("creating {}", d.display()))?;
    }
    let kernel = package::unpack_kernel(home, force, progress)?;

    progress("extracting vmlinux");
    let vmlinuz = std::fs::read(&kernel.vmlinuz).context(|| format!("reading {}", kernel.vmlinuz.display()))?;
    let kernel_file = match kernel::extract_vmlinux(&vmlinuz) {
        Ok(elf) => {
            write_atomic(&runtime_dir.join("vmlinux"), &elf)?;
            "vmlinux"
        }
        Err(e) => {
            progress(&format!("{e}; booting the compressed kernel instead"));
            write_atomic(&runtime_dir.join("vmlinuz"), &vmlinuz)?;
            "vmlinuz"
        }
    };

    progress("building initramfs");
    let index = modules::index(&kernel.modules_dir)?;
    let mut mods = Vec::new();
    let required = modules::load_order(modules::REQUIRED, &index)?;
    for path in &required {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        mods.push((name, read_module(path)?));
    }
    // The NIC's modules, minus those every sandbox loads anyway (virtio_ring, virtio).
    let mut net_mods = Vec::new();
    for path in modules::load_order(modules::NETWORK, &index)?.into_iter().filter(|p| !required.contains(p)) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        net_mods.push((name, read_module(&path)?));
    }
    // virtio-fs (volumes:), minus those already listed.
    let mut fs_mods = Vec::new();
    for path in modules::load_order(modules::VIRTIOFS, &index)?.into_iter().filter(|p| !required.contains(p)) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        fs_mods.push((name, read_module(&path)?));
    }
    let agent = std::fs::read(&bundle.agent).context(|| format!("reading {}", bundle.agent.display()))?;
    initramfs::build(&agent, &mods, &net_mods, &fs_mods, &runtime_dir.join("initramfs.cpio"))?;

    let supervisor = std::fs::read(&bundle.supervisor).context(|| format!("reading {}", bundle.supervisor.display()))?;
    write_atomic(&home.supervisor_path(), &supervisor)?;
    set_executable(&home.supervisor_path())?;

    let manifest = Manifest {
        kernel_release: kernel.release.clone(),
        kernel_file: kernel_file.into(),
        agent_sha256: hex::encode(Sha256::digest(&agent)),
        supervisor_sha256: hex::encode(Sha256::digest(&supervisor)),
    };
    write_atomic(&runtime_dir.join("manifest.json"), &serde_json::to_vec_pretty(&manifest).unwrap())?;
    let _ = std::fs::remove_dir_all(&kernel.unpacked);
    progress(&format!("runtime ready in {}", home.root().display()));
    load(home).ok_or_else(|| Error::Runtime("runtime incomplete right after install".into()))
}

/// A kernel module for the initramfs, without its signature (see [`modules::strip_signature`]).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let ko = std::fs::read(path).context(|| format!("reading {}", path.display()))?;
    Ok(modules::strip_signature(&ko).to_vec())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).context(|| format!("renaming into {}", path.display()))
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .context(|| format!("chmod {}", path.display()))
}
