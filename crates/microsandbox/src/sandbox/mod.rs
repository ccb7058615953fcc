//! Sandbox lifecycle on the host: create (root disk, supervisor, boot), exec, stop, kill.
//!
//! Process tree: the creating process → `msb` supervisor (own session) → QEMU.
//! The creator keeps the write end of a "liveness" pipe whose read end is the
//! supervisor's fd 3; when the creator dies, even by SIGKILL, the supervisor sees EOF
//! and kills the VM. QEMU gets `PR_SET_PDEATHSIG` from the supervisor, so it never
//! outlives it either.

pub mod config;
mod exec;
pub mod logs;
pub mod metrics;
pub mod network;
mod fs;
pub mod liveness;
pub mod patch;
pub mod secrets;
pub mod security;
pub mod ephemeral;
pub mod disk_image;
pub mod drain_marker;
mod owner;
pub mod spec;
pub mod stop_record;
mod stream;
pub mod transfer;
mod warm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use microsandbox_protocol::{Frame, Info, Kind, StopRequest, Stopped};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

pub use config::SandboxConfig;
pub use crate::state::{Record as SandboxRecord, Status as SandboxStatus};
pub use exec::{ExecCall, ExecResult};
pub use fs::{FsEntry, FsError, FsKind, FsReadStream, FsResult, FsStat, FsWriteSink, MAX_LIST_ENTRIES, MAX_READ};
pub use stream::{ExecControl, ExecEvent, ExecStream};

use crate::error::{Error, IoContext, Result};
use crate::paths::Home;
use crate::runtime;
use crate::state::{Record, StateDb, Status};
use crate::vmm::{self, Accel};
use spec::{StartupReport, SupervisorSpec};

/// A handle on one sandbox: created or started here (then this process owns its
/// lifecycle unless detached), or looked up by name.
pub struct Sandbox {
    name: String,
    home: Home,
    control: PathBuf,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    labels: BTreeMap<String, String>,
    /// Default guest user of commands.
    user: Option<String>,
    /// Shell of `Sandbox#shell`.
    shell: String,
    memory_mib: u64,
    /// Sandbox-wide resource limits (`rlimits:` at create), under each exec's own.
    rlimits: Vec<microsandbox_protocol::Rlimit>,
    /// The `restricted` security profile (see [`security`]) for every command.
    restricted: bool,
    info: Info,
    supervisor: Mutex<Option<tokio::process::Child>>,
    /// Closing this (drop) tells the supervisor its owner is gone.
    liveness: std::sync::Mutex<Option<liveness::Liveness>>,
    stopped: AtomicBool,
    /// True when this process started the VM and it dies with this process.
    owns: AtomicBool,
    /// The process that made this handle. A forked child that inherits it must never
    /// drop its supervisor handle or kill its VM (see `Drop` and [`Sandbox::fork_view`]).
    pid: u32,
}

/// Resolves `from_snapshot:`: finds the snapshot, checks its disk against the manifest
/// (a truncated or edited artifact never boots), and gives `cfg` the snapshot's image
/// reference and inherited settings (the caller's own env entries, workdir, user,
/// entrypoint win).
fn from_snapshot(home: &Home, cfg: &mut SandboxConfig, key: &str) -> Result<crate::snapshot::SnapshotInfo> {
    let info = crate::snapshot::get(home, key)?;
    crate::snapshot::check_content(&info)?;
    let inh = &info.body.inherited;
    cfg.image = info.body.image_ref.clone().unwrap_or_else(|| format!("snapshot:{}", info.digest));
    let mut env = inh.env.clone();
    env.retain(|(k, _)| !cfg.env.iter().any(|(ck, _)| ck == k));
    env.extend(std::mem::take(&mut cfg.env));
    cfg.env = env;
    if cfg.workdir.is_none() {
        cfg.workdir = inh.workdir.clone();
    }
    if cfg.user.is_none() {
        cfg.user = inh.user.clone();
    }
    if cfg.entrypoint.is_none() {
        cfg.entrypoint = Some(inh.entrypoint.clone().unwrap_or_default());
    }
    cfg.from_snapshot = None;
    cfg.snapshot_digest = Some(info.digest.clone());
    cfg.image_manifest_digest = info.body.image_manifest_digest.clone();
    Ok(info)
}

/// `Snapshot.create` of the stopped sandbox `name`: its root disk, flattened, with a
/// manifest (see `crate::snapshot`).
pub fn snapshot_sandbox(
    home: Option<&std::path::Path>,
    name: &str,
    opts: &crate::snapshot::CreateOptions,
) -> Result<crate::snapshot::SnapshotInfo> {
    config::validate_name(name)?;
    let home = Home::resolve(home)?;
    let rec = StateDb::open(&home)?
        .get(name)?
        .ok_or_else(|| Error::SandboxNotFound(format!("no sandbox named {name:?}")))?;
    if rec.status != Status::Stopped {
        return Err(Error::SnapshotSandboxRunning(format!(
            "sandbox {name:?} is running; stop it first (a snapshot is the disk of a stopped sandbox)"
        )));
    }
    let cfg: SandboxConfig = serde_json::from_str(&rec.config)
        .map_err(|e| Error::Runtime(format!("stored options of sandbox {name:?} are unreadable: {e}")))?;
    let dir = home.sandbox_dir(name);
    let (disk, format) = if dir.join(OVERLAY_DISK).is_file() { (dir.join(OVERLAY_DISK), "qcow2") } else { (dir.join(PRIVATE_DISK), "raw") };
    if !disk.is_file() {
        return Err(Error::Filesystem(format!("the root disk of sandbox {name:?} is missing")));
    }
    let src = crate::snapshot::Source {
        name,
        disk: &disk,
        disk_format: format,
        image_ref: (!cfg.image.starts_with("snapshot:")).then(|| cfg.image.clone()),
        image_manifest_digest: cfg.image_manifest_digest.clone(),
        parent_digest: cfg.snapshot_digest.clone(),
        inherited: crate::snapshot::Inherited {
            env: cfg.env.clone(),
            workdir: cfg.workdir.clone(),
            user: cfg.user.clone(),
            entrypoint: cfg.entrypoint.clone(),
            shell: cfg.shell.clone(),
        },
    };
    crate::snapshot::create(&home, &src, opts)
}

/// The devices and guest mounts of `cfg.volumes`, checked against the host; also probes
/// the volume locks so a volume attached elsewhere fails here with `VolumeInUse`.
fn volume_plan(home: &Home, cfg: &SandboxConfig) -> Result<crate::volume::mount::Plan> {
    if cfg.volumes.is_empty() {
        return Ok(Default::default());
    }
    let plan = crate::volume::mount::plan(home, &cfg.volumes, &home.socket_path(&cfg.name, "vfs")?, cfg.memory_mib)?;
    crate::volume::mount::probe_locks(&plan)?;
    if !plan.shares.is_empty() {
        crate::volume::virtiofsd_binary()?;
    }
    Ok(plan)
}

/// What the supervisor runs and holds for a plan (None without volumes).
fn volume_runtime(plan: &crate::volume::mount::Plan) -> Result<Option<crate::volume::mount::VolumeRuntime>> {
    if plan.shares.is_empty() && plan.locks.is_empty() {
        return Ok(None);
    }
    let virtiofsd = if plan.shares.is_empty() { PathBuf::new() } else { crate::volume::virtiofsd_binary()? };
    Ok(Some(crate::volume::mount::VolumeRuntime { virtiofsd, shares: plan.shares.clone(), locks: plan.locks.clone() }))
}

/// Deletes a claimed record (and its directory) unless disarmed: a failed create leaves
/// nothing behind.
struct ClaimGuard {
    home: Home,
    name: String,
    dir: PathBuf,
    armed: bool,
    /// For `start`: keep the record and disk, only mark it stopped.
    keep: bool,
}
impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Ok(db) = StateDb::open(&self.home) {
            if self.keep {
                let _ = db.set_stopped(&self.name);
            } else {
                let _ = db.delete(&self.name);
            }
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Options of `create` that concern the record, not the VM.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct Placement {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub detached: bool,
    /// Stop and remove an existing sandbox of the same name first.
    #[serde(default)]
    pub replace: bool,
    /// How long to wait for the replaced sandbox to stop cleanly, in milliseconds.
    #[serde(default)]
    pub replace_timeout_ms: Option<u64>,
}

/// A create's clock, for `Info::boot_phases` (`engine.*`, µs since `create` began), and
/// the root disk the supervisor still has to format.
struct BootClock {
    started: Instant,
    /// When the root disk was overlaid (or, for a directory image, allocated), since `started`.
    disk_built: Duration,
    /// A directory image's disk, formatted by the supervisor while QEMU starts.
    root_build: Option<spec::RootBuild>,
}

impl BootClock {
    /// The engine's marks, given when the supervisor was spawned; the last one is now
    /// (its startup report, i.e. the agent's `Ready`, has arrived).
    fn phases(&self, spawning: Duration) -> Vec<(String, u64)> {
        let us = |d: Duration| d.as_micros() as u64;
        vec![
            ("engine.disk_built".to_string(), us(self.disk_built)),
            ("engine.supervisor_spawn".to_string(), us(spawning)),
            ("engine.reported".to_string(), us(self.started.elapsed())),
        ]
    }
}

impl Sandbox {
    /// Boots a new sandbox and returns once its agent answers.
    pub async fn create(cfg: SandboxConfig, place: Placement) -> Result<Sandbox> {
        let created = Instant::now();
        cfg.validate()?;
        // Certificates and keys are read now, so a bad one fails before anything starts.
        if cfg.secrets_view().intercepts() {
            cfg.secrets_view().tls_config()?;
            cfg.secrets_view().handover()?;
        }
        let mut cfg = cfg;
        let home = Home::resolve(cfg.home.as_deref())?;
        // from_snapshot: checked whole (manifest and disk digests) before anything else.
        let snapshot = match cfg.from_snapshot.clone() {
            Some(key) => Some(from_snapshot(&home, &mut cfg, &key)?),
            None => None,
        };
        let local = snapshot.is_none() && config::is_local_path(&cfg.image);
        // A local .raw/.qcow2/.vmdk file: booted through an overlay (see `disk_image`).
        let disk = match disk_image::format_of(&cfg.image).filter(|_| local) {
            Some(_) => {
                let (path, format) = disk_image::check(&cfg.image, cfg.fstype.as_deref())?;
                cfg.image = path.to_string_lossy().into_owned();
                Some((path, format))
            }
            None => {
                if cfg.fstype.is_some() {
                    return Err(Error::InvalidConfig(
                        "fstype: applies to disk-image roots (.raw, .qcow2, .vmdk) only".into(),
                    ));
                }
                if local {
                    crate::rootfs::check_dir_image(&cfg.image)?;
                }
                None
            }
        };
        let rt = load_runtime(&home)?;
        // Pull (or find) the image before claiming the name: a failed pull leaves nothing.
        let prepared = if local || snapshot.is_some() {
            None
        } else {
            let opts = cfg.pull_options()?;
            let image = crate::image::ensure_image(&home, &cfg.image, &opts, &mut |_| {}).await?;
            crate::image::usage::mark_used(&home, &image.reference).await?;
            apply_image_config(&mut cfg, &image.config);
            cfg.image_manifest_digest = Some(image.manifest_digest.clone());
            config::validate_env(&cfg.env)
                .map_err(|e| Error::InvalidConfig(format!("the image's environment is unusable: {e}")))?;
            Some(image)
        };
        if !cfg.scripts.is_empty() {
            add_scripts_to_path(&mut cfg.env);
        }
        // The guest sees each secret's placeholder, never its value.
        let placeholders = cfg.secrets_view().placeholder_env();
        cfg.env.retain(|(k, _)| !placeholders.iter().any(|(p, _)| p == k));
        cfg.env.extend(placeholders);
        // Where TLS clients find the CA bundle the supervisor writes at every boot.
        if cfg.secrets_view().intercepts() || cfg.trust_host_cas {
            let trust = secrets::trust_env();
            let missing: Vec<_> = trust.into_iter().filter(|(k, _)| !cfg.env.iter().any(|(e, _)| e == k)).collect();
            cfg.env.extend(missing);
        }
        // Checked now so a bad entrypoint fails before anything starts.
        main_request(&cfg)?;
        // `volumes:` against the host (paths, volumes, locks) before anything is claimed.
        volume_plan(&home, &cfg)?;
        let patches = patch::steps(&cfg.scripts, &cfg.patches);
        if place.replace {
            Sandbox::replace_existing(&home, &cfg.name, place.replace_timeout_ms).await?;
        }
        let dir = home.sandbox_dir(&cfg.name);
        let config_json = serde_json::to_string(&cfg).expect("config serializes");
        let mut db = StateDb::open(&home)?;
        if let Some(old) = db.get(&cfg.name)? {
            // A stopped ephemeral sandbox of that name is gone already, not in the way.
            ephemeral::purge(&home, &db, &old)?;
        }
        db.claim_new(&cfg.name, &config_json, &place.labels, place.detached)?;
        let mut guard = ClaimGuard { home: home.clone(), name: cfg.name.clone(), dir: dir.clone(), armed: true, keep: false };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        let name_file = dir.join(crate::paths::SANDBOX_NAME_FILE);
        std::fs::write(&name_file, &cfg.name).context(|| format!("writing {}", name_file.display()))?;
        let mut start = warm::Start::Cold;
        let mut cold_because = None;
        let mut root_build = None;
        match &prepared {
            // Copy-on-write overlay on the image's shared, read-only root — or on the disk
            // layer of a template of this configuration, whose saved VM is then restored.
            Some(image) => {
                let base = std::fs::metadata(&image.root_disk)
                    .context(|| format!("root disk {}", image.root_disk.display()))?
                    .len();
                let size = base + cfg.oci_upper_size_bytes();
                let supervisor_bin = cfg.supervisor.clone().unwrap_or_else(|| rt.supervisor.clone());
                let (template, why) = warm::template_for(&home, &rt, &cfg, &supervisor_bin, &image.root_disk, size).await;
                cold_because = why;
                match template {
                    Some(t) => {
                        warm::overlay_on(&t, &dir.join(OVERLAY_DISK))?;
                        start = warm::Start::Restore(t);
                    }
                    None => crate::image::create_overlay(&image.root_disk, &dir.join(OVERLAY_DISK), Some(size))?,
                }
            }
            // A copy-on-write overlay on the snapshot's (read-only, flattened) disk.
            None if snapshot.is_some() => {
                crate::snapshot::overlay_on(snapshot.as_ref().expect("checked"), &dir.join(OVERLAY_DISK))?;
            }
            None if disk.is_some() => {
                let (image, format) = disk.as_ref().expect("checked");
                disk_image::create_overlay(image, format, &dir.join(OVERLAY_DISK))?
            }
            // A directory: a private disk of the right size now; the supervisor formats it
            // while QEMU starts (`RootBuild`), which hides the `mke2fs` behind QEMU's start.
            None => {
                let image = PathBuf::from(&cfg.image);
                let disk = dir.join(PRIVATE_DISK);
                let size_mib = tokio::task::spawn_blocking({
                    let (image, disk) = (image.clone(), disk.clone());
                    move || {
                        let size_mib = crate::rootfs::disk_size_mib(&image);
                        crate::rootfs::allocate_disk(&disk, size_mib).map(|()| size_mib)
                    }
                })
                .await
                .map_err(|e| Error::Runtime(format!("root disk task failed: {e}")))??;
                root_build = Some(spec::RootBuild { image_dir: image, disk, size_mib });
            }
        }
        let clock = BootClock { started: created, disk_built: created.elapsed(), root_build };
        if let Some(why) = &cold_because {
            warm::system_log(&dir, why);
        }
        let sb = match Sandbox::boot_timed(&home, &rt, cfg.clone(), place.labels.clone(), place.detached, &patches, &start, Some(clock)).await {
            Ok(sb) => sb,
            // A state file that does not load, or a restored guest that does not answer:
            // boot the same sandbox cold, on a fresh overlay over the image's root.
            Err(e) if matches!(start, warm::Start::Restore(_)) && warm::worth_cold_boot(&e) => {
                warm::system_log(&dir, &format!("restoring from a template failed, booting cold: {e}"));
                if let warm::Start::Restore(t) = &start {
                    crate::template::discard_state(t);
                }
                let image = prepared.as_ref().expect("restores are for registry images");
                let size = std::fs::metadata(&image.root_disk).context(|| format!("root disk {}", image.root_disk.display()))?.len()
                    + cfg.oci_upper_size_bytes();
                let _ = std::fs::remove_file(dir.join(OVERLAY_DISK));
                crate::image::create_overlay(&image.root_disk, &dir.join(OVERLAY_DISK), Some(size))?;
                Sandbox::boot(&home, &rt, cfg, place.labels, place.detached, &patches, &warm::Start::Cold).await?
            }
            Err(e) => return Err(e),
        };
        guard.armed = false;
        Ok(sb)
    }

    /// Boots a stopped sandbox again with its root disk and options.
    ///
    /// `secrets` carries the values of the secrets the sandbox was created with (they are
    /// never stored); `tls_key` a `tls.intercept_ca_key` given as PEM text at create.
    pub async fn start(
        home: Option<&std::path::Path>,
        name: &str,
        detached: bool,
        secrets: Vec<secrets::SecretEntry>,
        tls_key: Option<secrets::SecretText>,
    ) -> Result<Sandbox> {
        config::validate_name(name)?;
        let home = Home::resolve(home)?;
        let rt = load_runtime(&home)?;
        let db = StateDb::open(&home)?;
        if let Some(old) = db.get(name)? {
            if ephemeral::purge(&home, &db, &old)? {
                return Err(not_found(name));
            }
        }
        let rec = db.claim_start(name)?;
        let dir = home.sandbox_dir(name);
        let mut guard = ClaimGuard { home: home.clone(), name: name.into(), dir: dir.clone(), armed: true, keep: true };
        let mut cfg: SandboxConfig = serde_json::from_str(&rec.config)
            .map_err(|e| Error::Runtime(format!("stored options of sandbox {name:?} are unreadable: {e}")))?;
        secrets::merge_for_start(&mut cfg.secrets, secrets)?;
        if let Some(t) = cfg.tls.as_mut() {
            if t.intercept_ca_cert.is_some() && t.intercept_ca_key.is_none() {
                t.intercept_ca_key = tls_key;
                if t.intercept_ca_key.is_none() {
                    return Err(Error::InvalidConfig(format!(
                        "sandbox {name:?} was created with tls.intercept_ca_key as PEM text, which is never stored; pass tls: {{ intercept_ca_key: }} again to start it"
                    )));
                }
            }
        }
        if !dir.join(PRIVATE_DISK).is_file() && !dir.join(OVERLAY_DISK).is_file() {
            return Err(Error::Filesystem(format!(
                "the root disk of sandbox {name:?} is missing; remove it (Sandbox.remove) and create it again"
            )));
        }
        let (start, dropped) = warm::resume_from(&dir, &rt);
        if let Some(why) = &dropped {
            warm::system_log(&dir, why);
        }
        let resuming = matches!(start, warm::Start::Resume { .. });
        // How the last run ended: `boot` clears it, but a start that fails before a VM
        // runs (e.g. a published port taken meanwhile) is no run, and the sandbox must stay
        // as it was — stopped or paused, not "crashed".
        let previous = stop_record::read(&dir);
        let sb = match Sandbox::boot(&home, &rt, cfg.clone(), rec.labels.clone(), detached || rec.detached, &[], &start).await {
            Ok(sb) => sb,
            Err(e) if resuming && warm::worth_cold_boot(&e) => {
                warm::forget_pause(&dir);
                warm::system_log(&dir, &format!("resuming the paused sandbox failed, booted cold (its processes are lost): {e}"));
                Sandbox::boot(&home, &rt, cfg, rec.labels, detached || rec.detached, &[], &warm::Start::Cold).await?
            }
            Err(e) => {
                // Not overwriting: a record the supervisor wrote for this attempt (its VM
                // ran and ended) describes it better.
                if let Some(rec) = previous {
                    let _ = stop_record::write(&dir, &rec, false);
                }
                return Err(e);
            }
        };
        if resuming {
            warm::forget_pause(&dir);
        }
        guard.armed = false;
        Ok(sb)
    }

    /// Starts the supervisor for a claimed record whose disk exists, and records it.
    /// `patches` (create only) are applied by the supervisor before it reports ready.
    async fn boot(
        home: &Home,
        rt: &runtime::Runtime,
        cfg: SandboxConfig,
        labels: BTreeMap<String, String>,
        detached: bool,
        patches: &[patch::PatchStep],
        start: &warm::Start,
    ) -> Result<Sandbox> {
        Sandbox::boot_timed(home, rt, cfg, labels, detached, patches, start, None).await
    }

    /// [`Sandbox::boot`]; with `clock` (a create's), a cold boot's `Info::boot_phases` get
    /// the engine's own marks in front of the supervisor's and the agent's.
    #[allow(clippy::too_many_arguments)]
    async fn boot_timed(
        home: &Home,
        rt: &runtime::Runtime,
        cfg: SandboxConfig,
        labels: BTreeMap<String, String>,
        detached: bool,
        patches: &[patch::PatchStep],
        start: &warm::Start,
        clock: Option<BootClock>,
    ) -> Result<Sandbox> {
        let restricted = security::restricted(cfg.security.as_deref())?;
        let accel = Accel::resolve(cfg.accel.as_deref())?;
        let qemu = vmm::qemu::binary()?;
        let supervisor_bin = cfg.supervisor.clone().unwrap_or_else(|| rt.supervisor.clone());
        if !supervisor_bin.is_file() {
            return Err(Error::Runtime(format!(
                "supervisor binary {} does not exist; check Microsandbox.runtime_path / MSB_PATH",
                supervisor_bin.display()
            )));
        }
        let control = home.socket_path(&cfg.name, "ctl")?;
        let agent_socket = home.socket_path(&cfg.name, "agent")?;
        std::fs::create_dir_all(home.run_dir()).context(|| format!("creating {}", home.run_dir().display()))?;
        let dir = home.sandbox_dir(&cfg.name);
        let (root_disk, root_format) = if dir.join(OVERLAY_DISK).is_file() {
            (dir.join(OVERLAY_DISK), "qcow2")
        } else {
            (dir.join(PRIVATE_DISK), "raw")
        };
        let mounts = volume_plan(home, &cfg)?;
        let transfer = transfer::prepare(&dir)?;
        let network = network::nic(&cfg)?;
        let hostname = cfg.hostname.clone().unwrap_or_else(|| config::default_hostname(&cfg.name));
        // A restored guest keeps the kernel command line it was saved with: the template's.
        let cmd_hostname = match start {
            warm::Start::Cold | warm::Start::Resume { .. } => hostname.clone(),
            warm::Start::Restore(_) => crate::template::TEMPLATE_HOSTNAME.to_string(),
        };
        let vm = warm::vm_spec(
            rt, &cfg, accel, &cmd_hostname, root_disk.clone(), root_format, agent_socket.clone(),
            dir.join("console.log"), transfer.path.clone(), network.as_ref(),
        )?;
        // volumes: devices and the guest's mount list (never with a template: see
        // `warm::template_for`).
        let mut vm = vm;
        if let Some(p) = mounts.kernel_param()? {
            vm.cmdline.push(' ');
            vm.cmdline.push_str(&p);
        }
        vmm::qemu::check_cmdline(&vm.cmdline)?;
        vm.shares = mounts.shares.clone();
        vm.drives = mounts.drives.clone();
        if let warm::Start::Restore(t) = start {
            // The template's RAM, mapped privately (see `vmm::RamFile`).
            vm.ram_file = Some(vmm::RamFile { path: t.ram_path(), shared: false });
        }
        let mut qemu_args = vmm::qemu::args(&vm);
        let template = match start {
            warm::Start::Cold => None,
            warm::Start::Restore(t) => {
                let (run, extra) = warm::restore_run(t, hostname);
                qemu_args.extend(extra);
                Some(run)
            }
            warm::Start::Resume { state, qemu_args: saved, forked, disk_ready } => {
                qemu_args = saved.clone();
                qemu_args.extend(["-incoming".to_string(), "defer".to_string()]);
                Some(crate::template::TemplateRun::Restore {
                    state: state.clone(),
                    template: String::new(),
                    hostname,
                    resumed: !forked,
                    forked: *forked,
                    disk_ready: disk_ready.clone(),
                })
            }
        };
        // QMP: how the supervisor saves the VM for `pause`.
        let qmp_socket = home.socket_path(&cfg.name, "qmp")?;
        qemu_args.extend(["-qmp".to_string(), format!("unix:{},server=on,wait=off", qmp_socket.display())]);
        let spec = SupervisorSpec {
            name: cfg.name.clone(),
            sandbox_dir: dir.clone(),
            qemu,
            qemu_args,
            accel: accel.as_str().into(),
            agent_socket,
            control_socket: control.clone(),
            console_log: vm.console_log.clone(),
            boot_timeout_ms: cfg.boot_timeout().as_millis() as u64,
            kernel_release: rt.manifest.kernel_release.clone(),
            remove_dir_on_exit: false,
            ephemeral: cfg.ephemeral,
            quiet_logs: cfg.quiet_logs,
            max_duration_ms: cfg.max_duration_ms,
            idle_timeout_ms: cfg.idle_timeout_ms,
            // A resumed VM's main process is still running in it.
            main: if matches!(start, warm::Start::Resume { .. }) { None } else { main_request(&cfg)? },
            // Only into a VM without processes of the user's: never a resumed or forked one.
            warm_up: if cfg.warm_up && !matches!(start, warm::Start::Resume { .. }) { Some(warm_up_request(&cfg)?) } else { None },
            patches_file: write_patches(&dir, patches)?,
            transfer: Some(transfer),
            network,
            tls: if cfg.secrets_view().intercepts() { Some(cfg.secrets_view().tls_config()?) } else { None },
            qmp_socket: Some(qmp_socket),
            template,
            volumes: volume_runtime(&mounts)?,
            trust_host_cas: cfg.trust_host_cas,
            root_build: clock.as_ref().and_then(|c| c.root_build.clone()),
        };
        let spec_path = dir.join(spec::SPEC_FILE);
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap())
            .context(|| format!("writing {}", spec_path.display()))?;
        // The record of the previous run must not describe this one.
        stop_record::clear(&dir).context(|| format!("removing {}", stop_record::path(&dir).display()))?;
        drain_marker::clear(&dir).context(|| format!("removing {}", drain_marker::path(&dir).display()))?;

        let handover = cfg.secrets_view().handover()?;
        let spawning = clock.as_ref().map(|c| c.started.elapsed());
        let (mut child, liveness, channel) =
            owner::spawn_supervisor(&supervisor_bin, &spec_path, &dir, !detached, handover.is_some())?;
        if let (Some(bytes), Some(mut channel)) = (handover, channel) {
            // The values go to the supervisor through the socket, never through a file.
            let sent = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                channel.set_write_timeout(Some(Duration::from_secs(30)))?;
                // Length-prefixed: the supervisor reads exactly this much and never waits
                // for an EOF that a forked copy of our end could hold back.
                channel.write_all(&(bytes.len() as u64).to_le_bytes())?;
                channel.write_all(&bytes)?;
                channel.shutdown(std::net::Shutdown::Write)
            })
            .await
            .map_err(|e| Error::Runtime(format!("secrets handover task failed: {e}")))?;
            if let Err(e) = sent {
                let _ = child.kill().await;
                return Err(Error::Runtime(format!("cannot hand the secrets to the supervisor: {e}")));
            }
        }
        let report = owner::read_startup(&mut child, cfg.boot_timeout() + Duration::from_secs(10)).await;
        let mut info = match report {
            Ok(StartupReport::Ready(info)) => info,
            Ok(StartupReport::Failed { code, message }) => {
                let _ = child.kill().await;
                return Err(owner::error_from_code(&code, message));
            }
            Err(e) => {
                let _ = child.kill().await;
                return Err(e);
            }
        };
        if let (Some(c), Some(spawning)) = (&clock, spawning) {
            if !info.boot_phases.is_empty() {
                info.boot_phases.splice(0..0, c.phases(spawning));
            }
        }
        StateDb::open(home)?.set_running(&cfg.name, info.supervisor_pid, &serde_json::to_string(&info).unwrap(), detached)?;
        let child = if detached {
            owner::reap_in_background(child);
            None
        } else {
            Some(child)
        };
        Ok(Sandbox {
            name: cfg.name,
            home: home.clone(),
            control,
            env: cfg.env,
            workdir: cfg.workdir,
            labels,
            user: cfg.user.clone(),
            shell: cfg.shell.clone().unwrap_or_else(|| config::DEFAULT_SHELL.into()),
            memory_mib: cfg.memory_mib,
            rlimits: cfg.rlimits.clone(),
            restricted,
            info,
            supervisor: Mutex::new(child),
            liveness: std::sync::Mutex::new(liveness),
            stopped: AtomicBool::new(false),
            owns: AtomicBool::new(!detached),
            pid: std::process::id(),
        })
    }

    /// A handle on an existing sandbox (running or stopped), e.g. from another process.
    pub fn get(home: Option<&std::path::Path>, name: &str) -> Result<Sandbox> {
        config::validate_name(name)?;
        let home = Home::resolve(home)?;
        let rec = lookup(&home, name)?;
        Sandbox::from_record(&home, rec)
    }

    /// Every known sandbox, running or stopped.
    pub fn list(home: Option<&std::path::Path>) -> Result<Vec<Record>> {
        let home = Home::resolve(home)?;
        let db = StateDb::open(&home)?;
        ephemeral::sweep(&home, &db, db.list()?)
    }

    /// Every known sandbox with how its last run ended (None while running or starting).
    pub fn list_with_stops(home: Option<&std::path::Path>) -> Result<Vec<(Record, Option<stop_record::StopRecord>)>> {
        let home = Home::resolve(home)?;
        let db = StateDb::open(&home)?;
        let recs = ephemeral::sweep(&home, &db, db.list()?)?;
        Ok(recs.into_iter().map(|r| {
            let stop = Self::stop_of(&home, &r);
            (r, stop)
        }).collect())
    }

    /// The record named `name` with how its last run ended.
    pub fn record(home: Option<&std::path::Path>, name: &str) -> Result<(Record, Option<stop_record::StopRecord>)> {
        config::validate_name(name)?;
        let home = Home::resolve(home)?;
        let rec = lookup(&home, name)?;
        let stop = Self::stop_of(&home, &rec);
        Ok((rec, stop))
    }

    fn stop_of(home: &Home, rec: &Record) -> Option<stop_record::StopRecord> {
        (rec.status == Status::Stopped).then(|| {
            stop_record::read(&home.sandbox_dir(&rec.name)).unwrap_or_else(stop_record::StopRecord::missing)
        })
    }

    fn from_record(home: &Home, rec: Record) -> Result<Sandbox> {
        let cfg: SandboxConfig = serde_json::from_str(&rec.config)
            .map_err(|e| Error::Runtime(format!("stored options of sandbox {:?} are unreadable: {e}", rec.name)))?;
        let running = rec.status == Status::Running;
        let info = rec
            .info
            .as_deref()
            .and_then(|i| serde_json::from_str::<Info>(i).ok())
            .filter(|_| running)
            .unwrap_or(Info {
                name: rec.name.clone(),
                vmm: "qemu".into(),
                accel: String::new(),
                vmm_pid: 0,
                supervisor_pid: 0,
                kernel: String::new(),
                boot_ms: 0,
                start: String::new(),
                template: None,
                net: None,
                boot_phases: Vec::new(),
            });
        Ok(Sandbox {
            control: home.socket_path(&rec.name, "ctl")?,
            home: home.clone(),
            name: rec.name,
            env: cfg.env,
            workdir: cfg.workdir,
            labels: rec.labels,
            user: cfg.user.clone(),
            shell: cfg.shell.clone().unwrap_or_else(|| config::DEFAULT_SHELL.into()),
            memory_mib: cfg.memory_mib,
            rlimits: cfg.rlimits.clone(),
            restricted: security::restricted(cfg.security.as_deref())?,
            info,
            supervisor: Mutex::new(None),
            liveness: std::sync::Mutex::new(None),
            stopped: AtomicBool::new(!running),
            owns: AtomicBool::new(false),
            pid: std::process::id(),
        })
    }

    /// Removes a stopped sandbox: its record and its root disk.
    pub fn remove(home: Option<&std::path::Path>, name: &str) -> Result<()> {
        config::validate_name(name)?;
        let home = Home::resolve(home)?;
        let db = StateDb::open(&home)?;
        let rec = db.get(name)?.ok_or_else(|| not_found(name))?;
        if ephemeral::purge(&home, &db, &rec)? {
            return Err(not_found(name));
        }
        if rec.status != Status::Stopped {
            return Err(Error::SandboxStillRunning(format!(
                "sandbox {name:?} is running; stop it before removing it"
            )));
        }
        db.delete(name)?;
        let dir = home.sandbox_dir(name);
        std::fs::remove_dir_all(&dir).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .context(|| format!("removing {}", dir.display()))
    }

    /// Stops (killing after `timeout`) and removes an existing sandbox named `name`.
    async fn replace_existing(home: &Home, name: &str, timeout_ms: Option<u64>) -> Result<()> {
        let Ok(old) = Sandbox::get(Some(home.root()), name) else { return Ok(()) };
        if old.is_running() {
            old.stop(Duration::from_millis(timeout_ms.unwrap_or(10_000))).await?;
        }
        Sandbox::remove(Some(home.root()), name)
    }

    /// Resource usage now (CPU sampled over [`metrics::CPU_SAMPLE`]).
    pub async fn metrics(&self) -> Result<metrics::Metrics> {
        if !self.is_running() {
            return Err(self.not_running());
        }
        let dir = self.home.sandbox_dir(&self.name);
        let upper = [OVERLAY_DISK, PRIVATE_DISK].iter().map(|f| dir.join(f)).find(|p| p.is_file());
        let mut m = metrics::collect(self.info.vmm_pid, self.memory_mib, upper.as_deref()).await.map_err(|e| match e {
            Error::SandboxNotRunning(_) => {
                self.stopped.store(true, Ordering::SeqCst);
                self.not_running()
            }
            e => e,
        })?;
        if let Some(net) = self.net_counters().await {
            m.net_rx_bytes = net.rx_bytes;
            m.net_tx_bytes = net.tx_bytes;
        }
        Ok(m)
    }

    /// The NIC's byte counters, asked from the supervisor (its stack counts them); `None`
    /// without a NIC or when the supervisor does not answer within a second (the other
    /// figures are still worth returning then).
    async fn net_counters(&self) -> Option<microsandbox_protocol::NetCounters> {
        let mut conn = UnixStream::connect(&self.control).await.ok()?;
        let ask = Frame::data(1, Kind::Info, Vec::new());
        tokio::time::timeout(Duration::from_secs(1), async {
            microsandbox_protocol::write_frame_async(&mut conn, &ask).await.ok()?;
            while let Ok(Some(f)) = microsandbox_protocol::read_frame_async(&mut conn).await {
                if f.kind == Kind::Info {
                    return f.parse::<Info>().ok()?.net;
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    /// The last `tail` log entries from `sources` (stdout, stderr, system; all when empty).
    pub fn logs(&self, tail: usize, sources: &[String]) -> Result<Vec<logs::LogEntry>> {
        logs::read(&self.home.sandbox_dir(&self.name), tail, sources)
    }

    /// The log entries `q` selects (time window, cursor, sources, tail).
    pub fn logs_query(&self, q: &logs::LogQuery) -> Result<Vec<logs::LogEntry>> {
        logs::query(&self.home.sandbox_dir(&self.name), q)
    }

    /// The history `q` selects and a follower that reads only what is logged after it
    /// (`log_stream(follow: true)`).
    pub fn log_follower(&self, q: &logs::LogQuery) -> Result<(logs::LogFollower, Vec<logs::LogEntry>)> {
        logs::LogFollower::start(&self.home.sandbox_dir(&self.name), q)
    }

    /// Labels given at create.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.labels
    }

    /// True when this process started the VM and it will die with this process.
    pub fn owns_lifecycle(&self) -> bool {
        self.owns.load(Ordering::SeqCst)
    }

    /// Lets the sandbox outlive this process (it keeps running until stopped).
    pub async fn detach(&self) -> Result<()> {
        let mut conn = self.connect().await?;
        microsandbox_protocol::write_frame_async(&mut conn, &Frame::data(0, Kind::Detach, Vec::new()))
            .await
            .map_err(|_| self.not_running())?;
        // Wait for the acknowledgement so the liveness pipe can be closed safely.
        match microsandbox_protocol::read_frame_async(&mut conn).await {
            Ok(Some(f)) if f.kind == Kind::Detach => {}
            _ => return Err(self.not_running()),
        }
        StateDb::open(&self.home)?.set_detached(&self.name, true)?;
        self.owns.store(false, Ordering::SeqCst);
        self.liveness.lock().unwrap().take();
        if let Some(child) = self.supervisor.lock().await.take() {
            owner::reap_in_background(child);
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle for a forked child on the sandbox this (inherited) handle names: it can
    /// run commands and use the filesystem over its own connections, but owns nothing —
    /// no supervisor handle, no liveness pipe — so dropping it, or the child exiting,
    /// leaves the parent's VM alone. Reads only plain fields and atomics, never a lock
    /// another thread of the parent might have held at `fork`.
    pub fn fork_view(&self) -> Sandbox {
        Sandbox {
            name: self.name.clone(),
            home: self.home.clone(),
            control: self.control.clone(),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            labels: self.labels.clone(),
            user: self.user.clone(),
            shell: self.shell.clone(),
            memory_mib: self.memory_mib,
            rlimits: self.rlimits.clone(),
            restricted: self.restricted,
            info: self.info.clone(),
            supervisor: Mutex::new(None),
            liveness: std::sync::Mutex::new(None),
            stopped: AtomicBool::new(self.stopped.load(Ordering::SeqCst)),
            owns: AtomicBool::new(false),
            pid: std::process::id(),
        }
    }

    /// True when this handle was made in another process (inherited through `fork`).
    pub fn is_inherited(&self) -> bool {
        self.pid != std::process::id()
    }

    /// Shell of `Sandbox#shell` (the `shell:` create option, default `/bin/sh`).
    pub fn shell(&self) -> &str {
        &self.shell
    }

    /// What runs this sandbox (VMM, accelerator, pids, kernel, boot time).
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// False once `stop`/`kill` ran or the VM was found gone — also when its supervisor
    /// died without anyone calling (then this records it, so every later call fails fast
    /// with [`Error::SandboxNotRunning`] instead of trying to connect).
    pub fn is_running(&self) -> bool {
        if self.stopped.load(Ordering::SeqCst) {
            return false;
        }
        let pid = self.info.supervisor_pid;
        // A zombie counts as gone (an exited supervisor this process has not reaped yet).
        if pid > 0 && crate::state::process_start_time(pid).is_none() {
            self.stopped.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn not_running(&self) -> Error {
        // A sandbox stopped for a secret violation says so (`block_and_terminate`).
        let dir = self.home.sandbox_dir(&self.name);
        if stop_record::read(&dir).is_some_and(|r| r.source == stop_record::source::SECRET_VIOLATION) {
            return Error::SecretViolation(format!(
                "sandbox {:?} was stopped: a secret's placeholder was headed to a host the secret does not name \
                 (on_violation: block_and_terminate); its system log says which secret and where",
                self.name
            ));
        }
        Error::SandboxNotRunning(format!(
            "sandbox {:?} is not running (stopped, killed or its VM exited); start it again with Sandbox.start",
            self.name
        ))
    }

    async fn connect(&self) -> Result<UnixStream> {
        if !self.is_running() {
            return Err(self.not_running());
        }
        match UnixStream::connect(&self.control).await {
            Ok(s) => Ok(s),
            Err(_) => {
                self.stopped.store(true, Ordering::SeqCst);
                self.reap().await;
                Err(self.not_running())
            }
        }
    }

    /// Runs a command and collects its output. A non-zero exit is a result, not an error.
    pub async fn exec(&self, mut call: ExecCall) -> Result<ExecResult> {
        call.rlimits = config::merge_rlimits(&self.rlimits, &call.rlimits);
        let conn = self.connect().await?;
        let mut req = call.into_request(&self.env, self.workdir.as_deref(), self.user.as_deref())?;
        req.restricted = self.restricted;
        exec::run(conn, req, call_stdin(&call), call.timeout).await.map_err(|e| match e {
            Error::SandboxNotRunning(_) => {
                self.stopped.store(true, Ordering::SeqCst);
                self.not_running()
            }
            e => e,
        })
    }

    /// Starts a command whose output is consumed as it arrives. With `stdin_pipe`, the
    /// caller writes stdin through the stream (and must close it); otherwise stdin is
    /// `call.stdin` (or empty). A tty command's stdin is always open for writing.
    pub async fn exec_stream(&self, mut call: ExecCall, stdin_pipe: bool) -> Result<ExecStream> {
        call.rlimits = config::merge_rlimits(&self.rlimits, &call.rlimits);
        let conn = self.connect().await?;
        let mut req = call.into_request(&self.env, self.workdir.as_deref(), self.user.as_deref())?;
        req.restricted = self.restricted;
        req.stdin = stdin_pipe || call.stdin.is_some() || call.tty.is_some();
        // Writable through the stream: a pipe the caller asked for, or a terminal not fed
        // from `call.stdin`. Otherwise writes raise instead of vanishing in the guest.
        let writable = stdin_pipe || (call.tty.is_some() && call.stdin.is_none());
        ExecStream::start(conn, req, if stdin_pipe { None } else { call.stdin.clone() }, writable).await
    }

    /// Shuts the guest down, waiting up to `timeout` before killing it.
    pub async fn stop(&self, timeout: Duration) -> Result<bool> {
        if !self.is_running() {
            self.reap().await;
            return Ok(false);
        }
        let graceful = match UnixStream::connect(&self.control).await {
            Ok(mut conn) => {
                let req = Frame::json(0, Kind::Stop, &StopRequest { timeout_ms: timeout.as_millis() as u64, ..Default::default() });
                let asked = microsandbox_protocol::write_frame_async(&mut conn, &req).await.is_ok();
                let answer = tokio::time::timeout(timeout + Duration::from_secs(5), async {
                    while let Ok(Some(f)) = microsandbox_protocol::read_frame_async(&mut conn).await {
                        if f.kind == Kind::Stopped {
                            return f.parse::<Stopped>().map(|s| s.graceful).unwrap_or(false);
                        }
                    }
                    false
                })
                .await
                .unwrap_or(false);
                asked && answer
            }
            Err(_) => false,
        };
        self.stopped.store(true, Ordering::SeqCst);
        self.reap().await;
        Ok(graceful)
    }

    /// A new running sandbox named `child` that is a copy of this running one — memory,
    /// processes, disk — at this instant ("branch like git"). The parent is paused while
    /// its state is written and its disk copied, then runs on; the child gets fresh
    /// entropy, the clock and its own hostname (the parent's `hostname:` if one was given)
    /// before anything of it runs. Both then diverge. The child is owned by this process.
    pub async fn fork(&self, child: &str) -> Result<Sandbox> {
        config::validate_name(child)?;
        if !self.is_running() {
            return Err(self.not_running());
        }
        let home = self.home.clone();
        let rt = load_runtime(&home)?;
        let mut db = StateDb::open(&home)?;
        let rec = db.get(&self.name)?.ok_or_else(|| self.not_running())?;
        let mut cfg: SandboxConfig = serde_json::from_str(&rec.config)
            .map_err(|e| Error::Runtime(format!("stored options of sandbox {:?} are unreadable: {e}", self.name)))?;
        if !cfg.secrets.is_empty() || cfg.tls.is_some() {
            return Err(Error::InvalidConfig(format!(
                "sandbox {:?} has secrets; forking it is not supported (its secret values are never stored)",
                self.name
            )));
        }
        refuse_host_volumes(&cfg, &self.name, "forking")?;
        let parent_dir = home.sandbox_dir(&self.name);
        let parent_spec: SupervisorSpec = serde_json::from_slice(
            &std::fs::read(parent_dir.join(spec::SPEC_FILE)).context(|| format!("reading the spec of {:?}", self.name))?,
        )
        .map_err(|e| Error::Runtime(format!("the supervisor spec of {:?} is unreadable: {e}", self.name)))?;
        cfg.name = child.to_string();
        let config_json = serde_json::to_string(&cfg).expect("config serializes");
        db.claim_new(child, &config_json, &rec.labels, false)?;
        let dir = home.sandbox_dir(child);
        let mut guard = ClaimGuard { home: home.clone(), name: child.into(), dir: dir.clone(), armed: true, keep: false };
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join(crate::paths::SANDBOX_NAME_FILE), child).context(|| format!("writing {}", dir.display()))?;
        let disk = if parent_dir.join(OVERLAY_DISK).is_file() { OVERLAY_DISK } else { PRIVATE_DISK };
        // The parent's QEMU streams its state into this FIFO, the child's QEMU loads it
        // as it comes (see `warm::make_fork_fifo`).
        let fifo = warm::make_fork_fifo(&dir)?;
        // Held open until the child booted (its QEMU then has the file mapped).
        let ram_file = warm::fork_ram_file(&parent_spec)?;
        let ram = ram_file.as_ref().map(|(_, path)| path.clone());
        let req = microsandbox_protocol::ForkRequest { fifo: fifo.clone(), disk: disk.into(), disk_to: dir.join(disk), ram_to: ram.clone() };
        let mut conn = self.connect().await?;
        microsandbox_protocol::write_frame_async(&mut conn, &Frame::json(0, Kind::Fork, &req)).await.map_err(|_| self.not_running())?;
        let name = self.name.clone();
        let answer = async {
            match microsandbox_protocol::read_frame_async(&mut conn).await {
                Ok(Some(f)) if f.kind == Kind::Fork => Ok(()),
                Ok(Some(f)) if f.kind == Kind::Error => {
                    let e: microsandbox_protocol::ErrorMsg = f.parse().map_err(|e| Error::Protocol(e.to_string()))?;
                    Err(Error::Runtime(format!("cannot fork sandbox {name:?}: {}", e.message)))
                }
                _ => Err(self.not_running()),
            }
        };
        let agent = home.socket_path(child, "agent")?;
        let qemu_args = warm::fork_args(&parent_spec, &dir, &agent, ram.as_deref());
        // Over a RAM file, the child's QEMU starts once the disk copy is there, while the
        // parent copies its memory.
        let disk_ready = ram.is_some().then(|| dir.join(disk));
        let start = warm::Start::Resume { state: fifo.clone(), qemu_args, forked: true, disk_ready };
        let boot = Sandbox::boot(&home, &rt, cfg, rec.labels, false, &[], &start);
        tokio::pin!(answer);
        tokio::pin!(boot);
        // The parent answers once its whole state went through the FIFO (or it failed);
        // the child is ready once it loaded the state and took its identity.
        let (booted, answered) = tokio::select! {
            b = &mut boot => {
                if b.is_err() {
                    // A parent still waiting for a reader stops waiting (it runs on).
                    let _ = std::fs::remove_file(&fifo);
                }
                (b, answer.await)
            }
            a = &mut answer => match a {
                // Dropping the boot kills the child's supervisor (and its QEMU).
                Err(e) => (Err(e), Err(Error::Runtime(String::new()))),
                Ok(()) => (boot.await, Ok(())),
            },
        };
        let _ = std::fs::remove_file(&fifo);
        drop(ram_file);
        let sb = match (booted, answered) {
            (Ok(sb), Ok(())) => sb,
            (Ok(sb), Err(e)) => {
                // Not expected (the child loaded a whole stream): never keep a child whose
                // parent reported a failure.
                let _ = sb.kill().await;
                return Err(e);
            }
            (Err(e), _) => return Err(e),
        };
        guard.armed = false;
        Ok(sb)
    }

    /// Saves the running VM — memory, devices, its processes — to the sandbox directory
    /// and ends it, freeing its memory; [`Sandbox::start`] (from any process) resumes it
    /// where it was. `timeout` bounds the clean shutdown used when the save fails (then
    /// this returns an error and the sandbox is stopped as by [`stop`](Self::stop)).
    pub async fn pause(&self, timeout: Duration) -> Result<()> {
        if !self.is_running() {
            return Err(self.not_running());
        }
        let rec = StateDb::open(&self.home)?.get(&self.name)?.ok_or_else(|| self.not_running())?;
        let cfg: SandboxConfig = serde_json::from_str(&rec.config)
            .map_err(|e| Error::Runtime(format!("stored options of sandbox {:?} are unreadable: {e}", self.name)))?;
        refuse_host_volumes(&cfg, &self.name, "pausing")?;
        let mut conn = self.connect().await?;
        let req = Frame::json(0, Kind::Stop, &StopRequest { timeout_ms: timeout.as_millis() as u64, pause: true, ..Default::default() });
        microsandbox_protocol::write_frame_async(&mut conn, &req).await.map_err(|_| self.not_running())?;
        let answer = tokio::time::timeout(timeout + Duration::from_secs(180), async {
            while let Ok(Some(f)) = microsandbox_protocol::read_frame_async(&mut conn).await {
                if f.kind == Kind::Stopped {
                    return f.parse::<Stopped>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        self.stopped.store(true, Ordering::SeqCst);
        self.reap().await;
        let dir = self.home.sandbox_dir(&self.name);
        match answer {
            Some(s) if s.paused => {
                let rt = load_runtime(&self.home)?;
                warm::record_pause(&dir, &rt).inspect_err(|_| warm::forget_pause(&dir))
            }
            _ => Err(Error::Runtime(format!(
                "sandbox {:?} could not be paused (see its logs); it was stopped instead",
                self.name
            ))),
        }
    }

    /// Asks the guest to shut down (killed after `timeout`) and returns at once; see
    /// [`wait_until_stopped`](Self::wait_until_stopped).
    pub async fn request_stop(&self, timeout: Duration) -> Result<()> {
        let mut conn = self.connect().await?;
        let req = Frame::json(0, Kind::Stop, &StopRequest { timeout_ms: timeout.as_millis() as u64, ..Default::default() });
        // The supervisor carries the stop out even after this connection closes.
        microsandbox_protocol::write_frame_async(&mut conn, &req).await.map_err(|_| self.not_running())
    }

    /// Asks for a graceful drain and returns at once: the supervisor refuses new exec and
    /// filesystem sessions ([`Error::SandboxDraining`]), waits for the running ones to end
    /// (at most `drain_timeout` when given), then shuts the guest down like
    /// [`request_stop`](Self::request_stop) with `stop_timeout`.
    ///
    /// Marks the drain first ([`drain_marker`]), so every process's status says draining
    /// from the moment this returns until the sandbox has stopped.
    pub async fn request_drain(&self, drain_timeout: Option<Duration>, stop_timeout: Duration) -> Result<()> {
        let mut conn = self.connect().await?;
        let req = StopRequest {
            timeout_ms: stop_timeout.as_millis() as u64,
            drain: true,
            drain_timeout_ms: drain_timeout.map(|t| t.as_millis() as u64),
            ..Default::default()
        };
        let dir = self.home.sandbox_dir(&self.name);
        let pid = self.info.supervisor_pid;
        if pid > 0 {
            drain_marker::write(&dir, pid).context(|| format!("writing {}", drain_marker::path(&dir).display()))?;
        }
        // The supervisor carries the drain out even after this connection closes.
        let sent = microsandbox_protocol::write_frame_async(&mut conn, &Frame::json(0, Kind::Stop, &req)).await;
        if sent.is_err() && pid > 0 {
            let _ = drain_marker::clear(&dir); // no drain was asked after all
        }
        sent.map_err(|_| self.not_running())
    }

    /// True while the sandbox runs and a drain was asked of it (by any process).
    pub fn is_draining(&self) -> bool {
        self.is_running() && drain_marker::names(&self.home.sandbox_dir(&self.name), self.info.supervisor_pid)
    }

    /// Sends SIGKILL to the VM and its supervisor and returns at once.
    pub fn request_kill(&self) {
        let sup = self.info.supervisor_pid;
        if sup > 0 && crate::state::process_start_time(sup).is_some() {
            self.record_kill(stop_record::source::KILL);
        }
        for pid in [self.info.vmm_pid, self.info.supervisor_pid] {
            if pid > 0 && crate::state::process_start_time(pid).is_some() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// Records a kill before sending it: the supervisor dies without writing, and it must
    /// not report the VM's death (the first signal) as a crash either. Its own record, if it
    /// was already stopping, is kept.
    fn record_kill(&self, why: &str) {
        let rec = stop_record::StopRecord::now("stopped", why, None, Some(nix::sys::signal::Signal::SIGKILL as i32));
        let _ = stop_record::write(&self.home.sandbox_dir(&self.name), &rec, false);
    }

    /// How the last run ended, once it has: the stop record, or a crash when the
    /// supervisor vanished without one. None while the sandbox runs.
    pub fn last_stop(&self) -> Option<stop_record::StopRecord> {
        if self.is_running() {
            return None;
        }
        Some(stop_record::read(&self.home.sandbox_dir(&self.name)).unwrap_or_else(stop_record::StopRecord::missing))
    }

    /// Waits until the supervisor is gone (`None`: no limit). Returns false on timeout.
    pub async fn wait_until_stopped(&self, timeout: Option<Duration>) -> Result<bool> {
        let pid = self.info.supervisor_pid;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let gone = pid == 0 || crate::state::process_start_time(pid).is_none() || {
                // Our own child only becomes "gone" once reaped.
                let mut guard = self.supervisor.lock().await;
                matches!(guard.as_mut().map(|c| c.try_wait()), Some(Ok(Some(_))))
            };
            if gone {
                self.stopped.store(true, Ordering::SeqCst);
                self.reap().await;
                self.wait_for_vmm_exit().await;
                return Ok(true);
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// QEMU dies with its supervisor (SIGKILL or PDEATHSIG), but a many-threaded process
    /// takes a moment to go; "stopped" must mean the VM is gone too. Bounded, because a
    /// recycled pid could otherwise keep us here (zombies count as gone).
    async fn wait_for_vmm_exit(&self) {
        let pid = self.info.vmm_pid;
        let deadline = tokio::time::Instant::now() + VMM_EXIT_GRACE;
        while pid > 0
            && crate::state::process_start_time(pid).is_some()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the VM at once (SIGKILL to QEMU and the supervisor).
    pub async fn kill(&self) -> Result<()> {
        let was_running = self.is_running();
        self.stopped.store(true, Ordering::SeqCst);
        if was_running {
            if self.info.supervisor_pid > 0 && crate::state::process_start_time(self.info.supervisor_pid).is_some() {
                self.record_kill(stop_record::source::KILL);
            }
            for pid in [self.info.vmm_pid, self.info.supervisor_pid] {
                if pid > 0 {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        self.reap().await;
        Ok(())
    }

    /// Waits for the supervisor to be gone and records the sandbox as stopped. The root
    /// disk stays, so the sandbox can be started again.
    async fn reap(&self) {
        let child = self.supervisor.lock().await.take();
        match child {
            Some(mut child) => {
                // Bounded in every branch: a call on a dead sandbox must fail fast.
                if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                    let _ = child.start_kill();
                    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
                }
            }
            // Not our child (looked up by name): poll until the pid is gone.
            None if self.info.supervisor_pid > 0 => {
                let pid = self.info.supervisor_pid;
                for _ in 0..100 {
                    if crate::state::process_start_time(pid).is_none() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            None => {}
        }
        self.liveness.lock().unwrap().take();
        let _ = std::fs::remove_file(&self.control);
        if let Ok(db) = StateDb::open(&self.home) {
            // Only if no other process started it again meanwhile.
            if db.get(&self.name).ok().flatten().is_some_and(|r| r.status != Status::Running || r.supervisor_pid == Some(self.info.supervisor_pid)) {
                let _ = db.set_stopped(&self.name);
            }
        }
    }
}

/// Stdin of a collected exec; a tty command gets an empty one, so the terminal sees EOF
/// instead of waiting for input nobody can type.
fn call_stdin(call: &ExecCall) -> Option<Vec<u8>> {
    call.stdin.clone().or_else(|| call.tty.map(|_| Vec::new()))
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // Inherited through fork: the VM belongs to the parent. Dropping the supervisor
            // handle would SIGKILL it (kill_on_drop) and deregister its pidfd from the
            // parent's epoll instance, which the child shares; forget it instead.
            if let Some(child) = self.supervisor.get_mut().take() {
                std::mem::forget(child);
            }
            return;
        }
        // An owned sandbox dies with its handle: the child has kill_on_drop and closing the
        // liveness pipe makes the supervisor kill QEMU; this makes it immediate.
        if self.is_running() && self.owns_lifecycle() {
            self.record_kill(stop_record::source::OWNER_EXITED);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.info.vmm_pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Root disk of a sandbox made from a local directory.
const PRIVATE_DISK: &str = "root.ext4";
/// Root disk of a sandbox made from a registry image: overlay on the shared image root.
const OVERLAY_DISK: &str = "root.qcow2";
/// File name of a sandbox's qcow2 overlay (snapshots look for users of their disk).
pub const OVERLAY_DISK_NAME: &str = OVERLAY_DISK;
/// How long [`Sandbox::wait_until_stopped`] waits for QEMU after its supervisor is gone.
const VMM_EXIT_GRACE: Duration = Duration::from_secs(5);

/// Image defaults under the caller's options: image env first (caller wins), image
/// working directory unless `workdir:` was given.
fn apply_image_config(cfg: &mut SandboxConfig, image: &crate::image::ImageConfig) {
    let mut env = image.env.clone();
    for (k, v) in std::mem::take(&mut cfg.env) {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
    cfg.env = env;
    if cfg.workdir.is_none() {
        cfg.workdir = image.working_dir.clone().filter(|w| w.starts_with('/'));
    }
    if cfg.user.is_none() {
        cfg.user = image.user.clone().filter(|u| !u.is_empty());
    }
    // `entrypoint:` replaces Entrypoint and drops Cmd, like `docker run --entrypoint`.
    if cfg.entrypoint.is_none() {
        cfg.entrypoint = Some(image.default_command());
    }
}

/// Appends the scripts directory to the sandbox's PATH (the default PATH if unset).
fn add_scripts_to_path(env: &mut Vec<(String, String)>) {
    match env.iter_mut().find(|(k, _)| k == "PATH") {
        Some((_, v)) => *v = patch::path_with_scripts(v),
        None => env.push(("PATH".into(), patch::path_with_scripts(exec::DEFAULT_PATH))),
    }
}

/// Writes the patch steps for the supervisor (owner-only: contents may be private).
fn write_patches(dir: &std::path::Path, patches: &[patch::PatchStep]) -> Result<Option<PathBuf>> {
    if patches.is_empty() {
        return Ok(None);
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(patch::PATCHES_FILE);
    let json = serde_json::to_vec(patches).expect("patches serialize");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(&json))
        .context(|| format!("writing {}", path.display()))?;
    Ok(Some(path))
}

/// The main process's exec request (sandbox env, workdir and user; stdin at EOF), or
/// `None` when there is nothing to run.
fn main_request(cfg: &SandboxConfig) -> Result<Option<microsandbox_protocol::ExecRequest>> {
    let Some((program, args)) = cfg.entrypoint.as_deref().and_then(<[String]>::split_first) else {
        return Ok(None);
    };
    let call = ExecCall { program: program.clone(), args: args.to_vec(), rlimits: cfg.rlimits.clone(), ..Default::default() };
    let mut req = call
        .into_request(&cfg.env, cfg.workdir.as_deref(), cfg.user.as_deref())
        .map_err(|e| Error::InvalidConfig(format!("entrypoint: {e}")))?;
    req.restricted = security::restricted(cfg.security.as_deref())?;
    Ok(Some(req))
}

/// `warm_up:`'s command: `true`, found through the sandbox's `PATH`, as the sandbox's
/// user and with its security profile and rlimits, in `/` (so no workdir is created),
/// stdin at EOF, killed after [`WARM_UP_TIMEOUT`].
///
/// Why: a VM restored from a template (or just booted) runs its first command through
/// code nobody ran since QEMU started, so TCG translates all of it — the agent's spawn
/// path, the guest kernel's fork/exec/exit and block-read paths, the program's loading —
/// and the first exec takes 5–20× a steady one (measured 2026-11-30, load 7, restored
/// busybox sandboxes idle 1.5 s: 190 ms first, 35 ms for a first exec after one warm-up).
/// A pool runs it while the sandbox waits for a caller. An image without `true` still
/// warms the agent's path (the spawn fails; nothing is left behind).
fn warm_up_request(cfg: &SandboxConfig) -> Result<microsandbox_protocol::ExecRequest> {
    let call = ExecCall { program: "true".into(), rlimits: cfg.rlimits.clone(), timeout: Some(WARM_UP_TIMEOUT), ..Default::default() };
    let mut req = call.into_request(&cfg.env, None, cfg.user.as_deref()).map_err(|e| Error::InvalidConfig(format!("warm_up: {e}")))?;
    req.restricted = security::restricted(cfg.security.as_deref())?;
    Ok(req)
}

/// The guest kills `warm_up:`'s command after this (the supervisor waits a little longer).
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(10);

fn not_found(name: &str) -> Error {
    Error::SandboxNotFound(format!("no sandbox named {name:?}"))
}

/// The record named `name`; a stopped ephemeral one is purged and reported absent.
fn lookup(home: &Home, name: &str) -> Result<Record> {
    let db = StateDb::open(home)?;
    let rec = db.get(name)?.ok_or_else(|| not_found(name))?;
    if ephemeral::purge(home, &db, &rec)? {
        return Err(not_found(name));
    }
    Ok(rec)
}

fn load_runtime(home: &Home) -> Result<runtime::Runtime> {
    runtime::load(home).ok_or_else(|| {
        Error::Runtime(format!(
            "the microsandbox runtime is not installed in {}; run Microsandbox.install",
            home.root().display()
        ))
    })
}

/// Host-backed volumes (virtio-fs daemons, block drives this sandbox holds locked) are not part of
/// a saved VM state, so pause and fork refuse them before touching the VM; tmpfs mounts live in
/// guest memory and travel with it.
fn refuse_host_volumes(cfg: &SandboxConfig, name: &str, what: &str) -> Result<()> {
    if cfg.volumes.iter().any(|m| !m.tmpfs) {
        return Err(Error::Unsupported(format!(
            "{what} sandbox {name:?} is not supported: it mounts host volumes, which cannot be saved with the VM; stop it instead"
        )));
    }
    Ok(())
}
