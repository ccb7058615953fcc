//! Warm starts in the sandbox lifecycle: choosing a template for a create, building it
//! (one boot + save by a supervisor in save mode), and falling back to a cold boot when a
//! restore fails. The template store itself is `crate::template`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{config, network, owner, spec, transfer, SandboxConfig};
use crate::error::{Error, IoContext, Result};
use crate::paths::Home;
use crate::runtime::Runtime;
use crate::template::{self, Key, Template, TemplateOptions, TemplateRun};
use crate::vmm::{self, Accel, VmSpec};

/// How a sandbox's VM comes up.
pub enum Start {
    /// Kernel boot.
    Cold,
    /// QEMU loads the template's saved state; the sandbox's disk is an overlay on the
    /// template's disk layer.
    Restore(Template),
    /// QEMU loads the sandbox's own state saved by `pause`, with the exact command line
    /// it was saved from (without its `-qmp`/`-incoming`) — or, `forked`, another running
    /// sandbox streamed through the FIFO `state`, with that sandbox's command line moved to
    /// this one's paths.
    /// `disk_ready`: see `TemplateRun::Restore`.
    Resume { state: PathBuf, qemu_args: Vec<String>, forked: bool, disk_ready: Option<PathBuf> },
}

/// What `pause` records beside `paused.state` (0600, in the sandbox directory).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PausedMeta {
    /// [`template::runtime_fingerprint`] when paused: another runtime cannot resume it.
    pub runtime: String,
    pub state_bytes: u64,
    pub qemu_args: Vec<String>,
}

pub const PAUSED_STATE: &str = "paused.state";
pub const PAUSED_META: &str = "paused.json";

/// `args` without `-qmp X` and `-incoming X` (each run adds its own), and with a
/// template's RAM file replaced by anonymous memory (see `vmm::qemu::anonymous_ram`):
/// what a run that loads this VM's whole saved stream (resume, fork) starts with.
pub(super) fn strip_run_args(args: &[String]) -> Vec<String> {
    without_run_args(&vmm::qemu::anonymous_ram(args))
}

/// `args` without `-qmp X` and `-incoming X`.
fn without_run_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "-qmp" || a == "-incoming" {
            it.next();
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// Records a just-paused sandbox's state beside it; its command line comes from the spec
/// its supervisor ran with.
pub(super) fn record_pause(dir: &Path, rt: &Runtime) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let spec: spec::SupervisorSpec = serde_json::from_slice(&std::fs::read(dir.join(spec::SPEC_FILE)).context(|| "reading the supervisor spec".to_string())?)
        .map_err(|e| Error::Runtime(format!("the supervisor spec is unreadable: {e}")))?;
    let state_bytes = std::fs::metadata(dir.join(PAUSED_STATE)).context(|| "the paused state".to_string())?.len();
    let meta = PausedMeta { runtime: template::runtime_fingerprint(rt, &spec.qemu), state_bytes, qemu_args: strip_run_args(&spec.qemu_args) };
    let p = dir.join(PAUSED_META);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&p).context(|| format!("writing {}", p.display()))?;
    use std::io::Write;
    f.write_all(&serde_json::to_vec(&meta).unwrap()).context(|| format!("writing {}", p.display()))
}

/// The parent's QEMU command line (from its supervisor spec) for a fork living in
/// `child_dir`: every path in the parent's directory and the parent's agent socket now
/// name the child's; the device list, machine and kernel stay exactly the parent's.
/// With `ram` (a fork over a RAM file, see [`fork_ram_file`]) the child maps that file
/// privately and loads a stream without a configuration section; without it, its RAM is
/// anonymous and the whole stream, memory included, comes through the FIFO.
pub(super) fn fork_args(parent: &spec::SupervisorSpec, child_dir: &Path, child_agent: &Path, ram: Option<&Path>) -> Vec<String> {
    let from_dir = format!("{}/", parent.sandbox_dir.display());
    let to_dir = format!("{}/", child_dir.display());
    let from_agent = parent.agent_socket.display().to_string();
    let to_agent = child_agent.display().to_string();
    let base = match ram {
        Some(_) => without_run_args(&parent.qemu_args),
        None => strip_run_args(&parent.qemu_args),
    };
    let mut args: Vec<String> = base.into_iter().map(|a| a.replace(&from_agent, &to_agent).replace(&from_dir, &to_dir)).collect();
    if let Some(ram) = ram {
        args = vmm::qemu::with_private_ram_file(&args, ram);
        let [flag, value] = vmm::qemu::NO_CONFIGURATION_SECTION;
        if !args.windows(2).any(|w| w[0] == flag && w[1] == value) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args
}

/// A fork of a VM whose guest RAM is a file mapped privately (a sandbox restored from a
/// template, or itself a fork) copies that memory into a file of its own: a memfd
/// (tmpfs: no disk writes, and nothing outlives the processes holding it), sized to the
/// VM's memory and empty (sparse), which the parent's supervisor fills and the child's
/// QEMU maps privately. Both open it by `path` (`/proc/<this pid>/fd/<n>`, reopened
/// read-write), so the returned file must stay open until the child has booted. `None`
/// for a parent with anonymous RAM (booted cold, resumed): its memory can only go
/// through the migration stream.
pub(super) fn fork_ram_file(parent: &spec::SupervisorSpec) -> Result<Option<(std::fs::File, PathBuf)>> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let Some((_, bytes)) = vmm::qemu::private_ram_file(&parent.qemu_args) else { return Ok(None) };
    // SAFETY: a NUL-terminated name; the returned descriptor is new and owned here.
    let fd = unsafe { libc::memfd_create(c"msb-fork-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Runtime(format!("cannot create the fork's memory file: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(bytes).map_err(|e| Error::Runtime(format!("cannot size the fork's memory file: {e}")))?;
    let path = PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd()));
    Ok(Some((f, path)))
}

/// Name of the fork FIFO in the new sandbox's directory.
pub const FORK_FIFO: &str = "fork.fifo";

/// Creates the FIFO (0600) through which a fork's state goes from the parent's QEMU to
/// the child's: the parent's supervisor opens it for writing once the child's supervisor
/// has it open for reading; deleting it tells a parent still waiting to give up.
pub(super) fn make_fork_fifo(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(FORK_FIFO);
    let _ = std::fs::remove_file(&p);
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Filesystem(format!("invalid path {}", p.display())))?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(Error::Filesystem(format!("cannot create {}: {}", p.display(), std::io::Error::last_os_error())));
    }
    Ok(p)
}

/// Deletes a paused sandbox's saved state (after it resumed, or when it cannot).
pub(super) fn forget_pause(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(PAUSED_STATE));
    let _ = std::fs::remove_file(dir.join(PAUSED_META));
}

/// How `Sandbox.start` brings up the sandbox in `dir`: resumed when it was paused and the
/// saved state is complete and of this runtime, else cold — with why, for the log, when a
/// saved state had to be dropped.
pub(super) fn resume_from(dir: &Path, rt: &Runtime) -> (Start, Option<String>) {
    let state = dir.join(PAUSED_STATE);
    if !state.exists() {
        return (Start::Cold, None);
    }
    let why = (|| {
        let bytes = std::fs::read(dir.join(PAUSED_META)).map_err(|_| "its record is missing".to_string())?;
        if bytes.len() > 1 << 20 {
            return Err("its record is too large".into());
        }
        let meta: PausedMeta = serde_json::from_slice(&bytes).map_err(|e| format!("its record is unreadable: {e}"))?;
        let qemu = vmm::qemu::binary().map_err(|e| e.to_string())?;
        if meta.runtime != template::runtime_fingerprint(rt, &qemu) {
            return Err("the runtime (kernel, agent or QEMU) changed since".into());
        }
        let len = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
        if len != meta.state_bytes {
            return Err(format!("the state file has {len} bytes, {} were saved", meta.state_bytes));
        }
        Ok(meta.qemu_args)
    })();
    match why {
        Ok(qemu_args) => (Start::Resume { state, qemu_args, forked: false, disk_ready: None }, None),
        Err(why) => {
            forget_pause(dir);
            (Start::Cold, Some(format!("the paused state cannot be resumed ({why}); booted cold, its processes are lost")))
        }
    }
}

/// Placeholder for per-sandbox paths in a template key.
const ANY: &str = "/per-sandbox";

/// The QEMU machine of `cfg`, with the given per-sandbox paths. `cmd_hostname` is the
/// hostname on the kernel command line (a template's is neutral, see
/// [`template::TEMPLATE_HOSTNAME`]).
pub(super) fn vm_spec(
    rt: &Runtime,
    cfg: &SandboxConfig,
    accel: Accel,
    cmd_hostname: &str,
    root_disk: PathBuf,
    root_format: &'static str,
    agent_socket: PathBuf,
    console_log: PathBuf,
    transfer_disk: PathBuf,
    nic: Option<&microsandbox_network::NetworkConfig>,
) -> Result<VmSpec> {
    let mut cmdline = vmm::qemu::cmdline(cmd_hostname, config::kernel_loglevel(cfg.log_level.as_deref())?, accel, cfg.cpus as u32);
    // TCG guests get the host's TSC rate instead of calibrating it under load (see vmm::tsc).
    if let (Accel::Tcg, Some(khz)) = (accel, vmm::tsc::host_khz()) {
        cmdline.push_str(&format!(" {}={khz}", vmm::tsc::PARAM));
    }
    if let Some(n) = nic {
        cmdline.push(' ');
        cmdline.push_str(&n.kernel_param());
    }
    if let Some(init) = &cfg.init {
        cmdline.push(' ');
        cmdline.push_str(&init.to_param());
    }
    Ok(VmSpec {
        accel,
        cpus: cfg.cpus as u32,
        memory_mib: cfg.memory_mib as u32,
        kernel: rt.kernel.clone(),
        initramfs: rt.initramfs.clone(),
        cmdline,
        root_disk,
        root_format,
        agent_socket,
        console_log,
        transfer_disk: Some(transfer_disk),
        nic: nic.map(|n| vmm::Nic { mac: n.guest_mac_string(), mtu: n.mtu }),
        // `volumes:` devices are added by the caller (never in a template).
        shares: Vec::new(),
        drives: Vec::new(),
        // Set by the template paths (build, key, restore).
        ram_file: None,
    })
}

/// The template key of a sandbox of `cfg` whose disk is `disk_bytes` over `image_root`.
fn key(rt: &Runtime, cfg: &SandboxConfig, accel: Accel, qemu: &Path, image_root: &Path, disk_bytes: u64) -> Result<Key> {
    let nic = network::nic(cfg)?;
    let p = PathBuf::from(ANY);
    let mut vm = vm_spec(rt, cfg, accel, template::TEMPLATE_HOSTNAME, p.clone(), "qcow2", p.clone(), p.clone(), p.clone(), nic.as_ref())?;
    vm.ram_file = Some(vmm::RamFile { path: p, shared: false });
    // The measured TSC rate varies a little from process to process; a restored guest
    // keeps its template's (refined) calibration anyway.
    vm.cmdline = vmm::tsc::for_key(&vm.cmdline);
    Ok(Key {
        qemu_args: vmm::qemu::args(&vm),
        runtime: template::runtime_fingerprint(rt, qemu),
        image_root: std::fs::canonicalize(image_root).unwrap_or_else(|_| image_root.to_path_buf()),
        disk_bytes,
    })
}

/// The template a create of `cfg` restores from: found, or built now (the first create
/// of a configuration pays one boot and a save). `None` when templates are off for this
/// create, or when the template cannot be had — the create then boots cold; why is in the
/// returned message, for the sandbox's `system` log.
pub(super) async fn template_for(
    home: &Home,
    rt: &Runtime,
    cfg: &SandboxConfig,
    supervisor_bin: &Path,
    image_root: &Path,
    disk_bytes: u64,
) -> (Option<Template>, Option<String>) {
    if !TemplateOptions::resolve(cfg.template).enabled {
        return (None, None);
    }
    // A template's saved VM has no volume devices (virtio-fs daemons, volume disks) and
    // its kernel command line no mount list: a sandbox with `volumes:` boots cold.
    if !cfg.volumes.is_empty() {
        return (None, None);
    }
    // `init:` hands PID 1 over during the boot itself (see the agent's init.rs): a
    // restored VM would have done that in the template, so such sandboxes boot cold.
    if cfg.init.is_some() {
        return (None, None);
    }
    let attempt = async {
        let accel = Accel::resolve(cfg.accel.as_deref())?;
        let qemu = vmm::qemu::binary()?;
        let key = key(rt, cfg, accel, &qemu, image_root, disk_bytes)?;
        // Templates of a runtime that is no longer installed can never be used again.
        template::prune(home, Some(&key.runtime));
        let id = key.id();
        template::ensure(home, &key, |dir| build(home, rt, cfg, accel, qemu.clone(), supervisor_bin.to_path_buf(), image_root.to_path_buf(), disk_bytes, id.clone(), dir)).await
    };
    match attempt.await {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(format!("no template for this configuration, booted cold: {e}"))),
    }
}

/// Boots a template VM in `dir` and has its supervisor save it. Returns the time taken.
#[allow(clippy::too_many_arguments)]
async fn build(
    home: &Home,
    rt: &Runtime,
    cfg: &SandboxConfig,
    accel: Accel,
    qemu: PathBuf,
    supervisor_bin: PathBuf,
    image_root: PathBuf,
    disk_bytes: u64,
    id: String,
    dir: PathBuf,
) -> Result<u64> {
    let started = Instant::now();
    let disk = dir.join(template::DISK_FILE);
    crate::image::create_overlay(&image_root, &disk, Some(disk_bytes))?;
    let transfer = transfer::prepare(&dir)?;
    let sock_name = format!("template {id}");
    let agent_socket = home.socket_path(&sock_name, "agent")?;
    let control = home.socket_path(&sock_name, "ctl")?;
    let qmp = home.socket_path(&sock_name, "qmp")?;
    std::fs::create_dir_all(home.run_dir()).context(|| format!("creating {}", home.run_dir().display()))?;
    let mut nic = network::nic(cfg)?;
    // A template VM publishes nothing: its host ports belong to the sandbox restored
    // from it (bound by that sandbox's supervisor), never to the build.
    if let Some(n) = nic.as_mut() {
        n.ports.clear();
    }
    let mut vm = vm_spec(rt, cfg, accel, template::TEMPLATE_HOSTNAME, disk, "qcow2", agent_socket.clone(), dir.join("console.log"), transfer.path.clone(), nic.as_ref())?;
    // The guest's RAM goes into the template's file (not into the saved state).
    vm.ram_file = Some(vmm::RamFile { path: dir.join(template::RAM_FILE), shared: true });
    let mut qemu_args = vmm::qemu::args(&vm);
    qemu_args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())]);
    let spec = spec::SupervisorSpec {
        name: format!("template-{}", &id[..12]),
        sandbox_dir: dir.clone(),
        qemu,
        qemu_args,
        accel: accel.as_str().into(),
        agent_socket,
        control_socket: control,
        console_log: vm.console_log.clone(),
        boot_timeout_ms: cfg.boot_timeout().as_millis() as u64,
        kernel_release: rt.manifest.kernel_release.clone(),
        remove_dir_on_exit: false,
        ephemeral: false,
        quiet_logs: true,
        warm_up: None,
        max_duration_ms: None,
        idle_timeout_ms: None,
        main: None,
        patches_file: None,
        transfer: Some(transfer.clone()),
        network: nic,
        // No secrets and no interception: nothing of any sandbox is in a template.
        tls: None,
        trust_host_cas: false,
        qmp_socket: None,
        template: Some(TemplateRun::Save { state: template::STATE_FILE.into(), qmp }),
        volumes: None,
        root_build: None,
    };
    let spec_path = dir.join(spec::SPEC_FILE);
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).context(|| format!("writing {}", spec_path.display()))?;
    // Owned: a template build dies with this process like any VM it starts.
    let (mut child, _liveness, _) = owner::spawn_supervisor(&supervisor_bin, &spec_path, &dir, true, false)?;
    let within = cfg.boot_timeout() + SAVE_TIMEOUT;
    let report = owner::read_startup(&mut child, within).await;
    let saved = match report {
        Ok(spec::StartupReport::Ready(_)) => Ok(()),
        Ok(spec::StartupReport::Failed { code, message }) => Err(owner::error_from_code(&code, format!("building a template: {message}"))),
        Err(e) => Err(e),
    };
    if saved.is_err() {
        let _ = child.kill().await;
    }
    // The supervisor exits right after reporting; QEMU has quit by then.
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = child.kill().await;
    saved?;
    // Only the state and the disk layer are the template.
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let n = e.file_name();
        if n != template::STATE_FILE && n != template::DISK_FILE && n != template::RAM_FILE {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(started.elapsed().as_millis() as u64)
}

/// Bound on saving the booted template VM (the stream is a few tens of MB).
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// A sandbox's overlay on its template's disk layer (same virtual size as the template's).
pub(super) fn overlay_on(t: &Template, overlay: &Path) -> Result<()> {
    crate::image::disk::create_overlay_with_format(&t.disk_path(), "qcow2", overlay, Some(t.meta.disk_bytes))
}

/// Appends a `system` entry to the sandbox log of `dir` (before its supervisor starts).
pub(super) fn system_log(dir: &Path, text: &str) {
    use std::io::Write;
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let line = super::logs::text_line(at, "system", text);
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("logs.jsonl")) {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The `Restore` part of a supervisor spec and the extra QEMU arguments of a restore.
pub(super) fn restore_run(t: &Template, hostname: String) -> (TemplateRun, [String; 2]) {
    (
        TemplateRun::Restore { state: t.state_path(), template: t.id.clone(), hostname, resumed: false, forked: false, disk_ready: None },
        // The supervisor starts the load through QMP (see its `template::incoming`).
        ["-incoming".into(), "defer".into()],
    )
}

/// Errors of the restore path that the cold boot would raise too, so falling back is
/// pointless (and would throw the paused processes away for nothing): a configuration the
/// user must fix, or a published host port another program holds right now.
pub(super) fn worth_cold_boot(e: &Error) -> bool {
    !matches!(e, Error::InvalidConfig(_) | Error::PortInUse(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_or_a_bad_config_is_no_reason_to_throw_a_pause_away() {
        assert!(!worth_cold_boot(&Error::InvalidConfig("x".into())));
        assert!(!worth_cold_boot(&Error::PortInUse("x".into())));
        assert!(worth_cold_boot(&Error::Runtime("the saved state does not load".into())));
    }

    fn parent_spec(ram: &str) -> spec::SupervisorSpec {
        let json = serde_json::json!({
            "name": "p", "sandbox_dir": "/h/sandboxes/p", "qemu": "/usr/bin/qemu-system-x86_64",
            "qemu_args": ["-m", "512M", "-drive", "file=/h/sandboxes/p/root.qcow2,if=none,id=root",
                          "-chardev", "socket,id=agent,path=/h/run/pa.sock",
                          "-object", ram, "-machine", "memory-backend=msbram",
                          "-qmp", "unix:/h/run/pa.qmp,server=on,wait=off", "-incoming", "defer"],
            "accel": "tcg", "agent_socket": "/h/run/pa.sock", "control_socket": "/h/run/pc.sock",
            "console_log": "/h/sandboxes/p/console.log", "boot_timeout_ms": 1000, "kernel_release": "6.1",
            "remove_dir_on_exit": false
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn fork_args_over_a_ram_file() {
        let p = parent_spec("memory-backend-file,id=msbram,size=512M,mem-path=/h/templates/k/ram,share=off");
        let child = Path::new("/h/sandboxes/c");
        let ram = child.join("fork.ram");
        let a = fork_args(&p, child, Path::new("/h/run/ca.sock"), Some(&ram));
        let j = a.join(" ");
        assert!(j.contains("memory-backend-file,id=msbram,size=512M,mem-path=/h/sandboxes/c/fork.ram,share=off"), "{j}");
        assert!(j.contains("file=/h/sandboxes/c/root.qcow2") && j.contains("path=/h/run/ca.sock"), "{j}");
        assert!(j.ends_with("-global migration.send-configuration=off"), "{j}");
        assert!(!j.contains("-qmp") && !j.contains("-incoming") && !j.contains("/h/templates"), "{j}");
        // A fork of that fork keeps one such flag and moves the RAM to its own file.
        let mut c = p.clone();
        c.qemu_args = a;
        c.sandbox_dir = child.into();
        c.agent_socket = "/h/run/ca.sock".into();
        let g = fork_args(&c, Path::new("/h/sandboxes/g"), Path::new("/h/run/ga.sock"), Some(Path::new("/h/sandboxes/g/fork.ram")));
        assert_eq!(g.iter().filter(|x| *x == "migration.send-configuration=off").count(), 1);
        assert!(g.join(" ").contains("mem-path=/h/sandboxes/g/fork.ram,share=off"));
        // Through the stream: anonymous RAM, no flag.
        let s = fork_args(&p, child, Path::new("/h/run/ca.sock"), None).join(" ");
        assert!(s.contains("memory-backend-ram,id=msbram,size=512M") && !s.contains("send-configuration"), "{s}");
    }
}
