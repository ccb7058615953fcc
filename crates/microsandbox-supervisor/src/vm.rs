//! Boot, serve and tear down one sandbox VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use microsandbox::sandbox::spec::{RootBuild, StartupReport, SupervisorSpec};
use microsandbox::sandbox::stop_record::{self, source, StopRecord};
use microsandbox::template::TemplateRun;
use microsandbox_protocol::{Frame, Info, Kind, Stopped};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::control::{self, Ctx, StopTicket};
use crate::{agent_link, liveness, router::Router};
use crate::transfer::Windows;

const SUPERVISOR_PID_FILE: &str = "supervisor.pid";
/// How long a sandbox stopping by itself (max_duration, idle_timeout) waits for a clean shutdown.
const SELF_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a lost agent link waits to see whether QEMU is exiting (the actual cause).
const AGENT_LOST_VM_GRACE: Duration = Duration::from_millis(500);

/// Resolves when `max_duration` has passed or the sandbox has been idle for `idle_timeout`,
/// with which one ([`source`] name).
async fn self_stop_deadline(spec: &SupervisorSpec, router: Arc<Router>) -> &'static str {
    let max = spec.max_duration_ms.map(Duration::from_millis);
    let idle = spec.idle_timeout_ms.map(Duration::from_millis);
    if max.is_none() && idle.is_none() {
        return std::future::pending().await;
    }
    let started = Instant::now();
    loop {
        if max.is_some_and(|m| started.elapsed() >= m) {
            return source::MAX_DURATION;
        }
        if idle.is_some_and(|i| router.idle_for() >= i) {
            return source::IDLE_TIMEOUT;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A restored guest answers in well under a second; one that does not within
/// [`RESTORE_READY_TIMEOUT`] (a corrupt state that loaded but hangs the guest) is given up
/// on sooner than a boot, and the engine boots the sandbox cold.
const RESTORE_READY_TIMEOUT: Duration = Duration::from_secs(60);

fn ready_within(spec: &SupervisorSpec, boot_timeout: Duration) -> Duration {
    match spec.template {
        Some(TemplateRun::Restore { .. }) => boot_timeout.min(RESTORE_READY_TIMEOUT),
        _ => boot_timeout,
    }
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Spawns QEMU; with `nic`, QEMU inherits that socket at `qemu::NET_FD` (its NIC).
/// With `state` (a restore), QEMU inherits that file at `template::STATE_FD`.
fn spawn_qemu(spec: &SupervisorSpec, nic: Option<&std::os::unix::net::UnixStream>, state: Option<&std::fs::File>) -> std::io::Result<Child> {
    use std::os::fd::AsRawFd;
    let nic_fd = nic.map(|s| s.as_raw_fd());
    let state_fd = state.map(|f| f.as_raw_fd());
    let log = std::fs::File::create(spec.sandbox_dir.join("qemu.log"))?;
    let mut cmd = Command::new(&spec.qemu);
    cmd.args(&spec.qemu_args);
    // A root disk still to be formatted: the VM waits paused (`cont` once it is done).
    // Only here, never in `qemu_args`, which pause and fork reuse for a VM that must run.
    if spec.root_build.is_some() {
        cmd.arg("-S");
    }
    cmd.current_dir(&spec.sandbox_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    let parent = std::process::id() as i32;
    // SAFETY: prctl and getppid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1); // the supervisor already died
            }
            // Files QEMU creates — the console log, anything a monitor command writes —
            // are the owner's alone: a saved state holds the guest's whole memory.
            libc::umask(0o077);
            for (fd, target) in [(nic_fd, microsandbox::vmm::qemu::NET_FD), (state_fd, microsandbox::template::STATE_FD)] {
                let Some(fd) = fd else { continue };
                // dup2 onto the same number would keep close-on-exec: clear it instead.
                let r = if fd == target { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, target) };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The file a paused sandbox's VM is saved to, in its directory (relative: it is QEMU's
/// working directory); written under a temporary name and renamed once complete.
pub const PAUSED_STATE: &str = "paused.state";
const PAUSED_STATE_TMP: &str = "paused.state.tmp";
/// Bound on saving a paused VM (its whole memory at most).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(120);

/// Saves the running VM to [`PAUSED_STATE`] and waits for QEMU to quit. False (and no
/// state file) when anything fails; QEMU may still be running then.
async fn pause(spec: &SupervisorSpec, qmp: &Path, qemu: &mut Child) -> bool {
    let tmp = spec.sandbox_dir.join(PAUSED_STATE_TMP);
    let saved = match crate::template::save(qmp, &tmp, PAUSE_TIMEOUT).await {
        Ok(()) => matches!(tokio::time::timeout(PAUSE_TIMEOUT, qemu.wait()).await, Ok(Ok(st)) if st.success()),
        Err(e) => {
            eprintln!("msb: pause failed: {e}");
            false
        }
    };
    if saved && std::fs::rename(&tmp, spec.sandbox_dir.join(PAUSED_STATE)).is_ok() {
        return true;
    }
    let _ = std::fs::remove_file(&tmp);
    false
}

/// Last lines of the guest console, to explain a failed boot.
fn console_tail(spec: &SupervisorSpec) -> String {
    let mut text = String::new();
    for f in [spec.console_log.clone(), spec.sandbox_dir.join("qemu.log")] {
        if let Ok(s) = std::fs::read_to_string(&f) {
            let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            if !tail.is_empty() {
                text.push_str(&format!("\n--- {} ---\n{tail}", f.file_name().unwrap().to_string_lossy()));
            }
        }
    }
    text
}

/// Ends a start that failed once QEMU was spawned: QEMU killed and reaped, the run's
/// files removed, the failure reported to the engine; returns the supervisor's exit code.
/// With `console`, the guest console's last lines are appended to `message` (read after
/// QEMU is gone, so they are complete, and before `cleanup` may remove them).
async fn abort_start(qemu: &mut Child, spec: &SupervisorSpec, report: fn(&StartupReport), code: &str, message: String, console: bool) -> u8 {
    let _ = qemu.start_kill();
    let _ = qemu.wait().await;
    let tail = if console { console_tail(spec) } else { String::new() };
    cleanup(spec);
    report(&StartupReport::Failed { code: code.into(), message: format!("{message}{tail}") });
    1
}

/// Formats a directory image's root disk ([`RootBuild`]) into the file QEMU already opened,
/// then lets the paused VM run. The QMP handshake runs meanwhile, so `cont` follows the
/// format at once. Errors carry the code the engine maps to its error type
/// (`filesystem-error` for a tree `mke2fs` cannot copy).
async fn format_root_and_start(build: RootBuild, qmp: Option<PathBuf>, within: Duration) -> Result<(), (&'static str, String)> {
    let qmp = qmp.ok_or(("boot-failed", "a root disk formatted at boot needs the QMP socket".to_string()))?;
    let started = Instant::now();
    let format = async {
        let formatted = match tokio::task::spawn_blocking(move || microsandbox::rootfs::format_disk(&build.image_dir, &build.disk, build.size_mib)).await {
            Ok(r) => r.map_err(|e| (e.code(), e.to_string())),
            Err(e) => Err(("runtime-error", format!("the root disk task failed: {e}"))),
        };
        (formatted, started.elapsed())
    };
    let gate = async { (crate::template::StartGate::open(&qmp, within).await.map_err(|e| ("boot-failed", e)), started.elapsed()) };
    let ((formatted, format_took), (gate, qemu_up)) = tokio::join!(format, gate);
    formatted?;
    // Which of the two the VM waited for (the format is meant to hide behind QEMU's start).
    eprintln!("msb: root disk formatted in {} ms, QEMU ready for `cont` after {} ms", format_took.as_millis(), qemu_up.as_millis());
    gate?.cont().await.map_err(|e| ("boot-failed", e))
}

/// Records how the run ended: a crash when the VM or the agent link ended unasked.
fn write_stop_record(spec: &SupervisorSpec, why: &str, vm: Option<std::process::ExitStatus>) {
    use std::os::unix::process::ExitStatusExt;
    let status = if matches!(why, source::VM_EXITED | source::AGENT_LOST) { "crashed" } else { "stopped" };
    let rec = StopRecord::now(status, why, vm.and_then(|s| s.code()), vm.and_then(|s| s.signal()));
    // Not fatal: without a record the run is reported as crashed ("supervisor-gone").
    if let Err(e) = stop_record::write(&spec.sandbox_dir, &rec, false) {
        eprintln!("msb: cannot write the stop record: {e}");
    }
}

fn cleanup(spec: &SupervisorSpec) {
    // The run is over: other processes stop reporting it as draining.
    let _ = microsandbox::sandbox::drain_marker::clear(&spec.sandbox_dir);
    let _ = std::fs::remove_file(&spec.control_socket);
    let _ = std::fs::remove_file(&spec.agent_socket);
    if let Some(q) = &spec.qmp_socket {
        let _ = std::fs::remove_file(q);
    }
    // Scratch data of the VM that just ended; the engine creates it afresh at each boot.
    if let Some(t) = &spec.transfer {
        let _ = std::fs::remove_file(&t.path);
    }
    for share in spec.volumes.iter().flat_map(|v| &v.shares) {
        let _ = std::fs::remove_file(&share.socket);
    }
    if spec.remove_dir_on_exit {
        let _ = std::fs::remove_dir_all(&spec.sandbox_dir);
    } else if spec.ephemeral {
        microsandbox::sandbox::ephemeral::clear_run_data(&spec.sandbox_dir);
    } else {
        let _ = std::fs::remove_file(spec.sandbox_dir.join(SUPERVISOR_PID_FILE));
    }
}

/// Most guest boot steps kept from a `Ready` (the agent sends about a dozen).
const MAX_GUEST_PHASES: usize = 32;

/// `Info::boot_phases` of a cold boot: the supervisor's own marks (since its start) and
/// the agent's steps (guest uptime), in microseconds. The agent's
/// list comes from the guest: at most [`MAX_GUEST_PHASES`] entries are kept, and only
/// those with short lowercase names (anything else is dropped, not echoed).
pub fn boot_phases(qemu_spawned: Duration, disk_built: Option<Duration>, agent_connected: Duration, ready: Duration, guest_us: &[(String, u64)]) -> Vec<(String, u64)> {
    let us = |d: Duration| d.as_micros() as u64;
    let mut out = vec![("supervisor.qemu_spawned".to_string(), us(qemu_spawned))];
    // A directory image's disk, formatted while QEMU started paused, and the VM let run.
    out.extend(disk_built.map(|d| ("supervisor.disk_built".to_string(), us(d))));
    out.extend([
        ("supervisor.agent_connected".to_string(), us(agent_connected)),
        ("supervisor.ready".to_string(), us(ready)),
    ]);
    let name_ok = |n: &str| !n.is_empty() && n.len() <= 24 && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    out.extend(
        guest_us
            .iter()
            .take(MAX_GUEST_PHASES)
            .filter(|(n, _)| name_ok(n))
            .map(|(n, t)| (format!("guest.{n}"), *t)),
    );
    out
}

/// Boots the VM and serves it. Returns the process exit code.
pub async fn supervise(spec: SupervisorSpec, report: fn(&StartupReport)) -> u8 {
    let fail = |message: String| {
        report(&StartupReport::Failed { code: "boot-failed".into(), message });
        1
    };
    let _ = std::fs::write(spec.sandbox_dir.join(SUPERVISOR_PID_FILE), std::process::id().to_string());
    let owner = liveness::watch_owner();
    let agent_listener = match bind(&spec.agent_socket) {
        Ok(l) => l,
        Err(e) => {
            cleanup(&spec);
            return fail(format!("cannot listen on {}: {e}", spec.agent_socket.display()));
        }
    };
    let started = Instant::now();
    // Started before QEMU: the network stack logs its refusals from the first frame on.
    let log_sink = crate::logbook::LogSink::spawn(spec.sandbox_dir.clone());
    // The NIC: one end of a socketpair goes to QEMU, the other to the stack's thread.
    let nic = match spec.network.as_ref().map(|_| std::os::unix::net::UnixStream::pair()).transpose() {
        Ok(pair) => pair,
        Err(e) => {
            cleanup(&spec);
            return fail(format!("cannot create the NIC socketpair: {e}"));
        }
    };
    // Volume locks and virtiofsd daemons: before QEMU, which connects to their sockets.
    // Held (and the daemons kept alive) until this function returns.
    let _volumes = match spec.volumes.as_ref().map(|v| crate::volumes::start(v, &spec.sandbox_dir)).transpose() {
        Ok(v) => v,
        Err((code, message)) => {
            cleanup(&spec);
            report(&StartupReport::Failed { code: code.into(), message: format!("sandbox {:?}: {message}", spec.name) });
            return 1;
        }
    };
    // Published ports are bound before QEMU starts: a port in use fails the create with
    // a typed error and nothing running. They are close-on-exec (QEMU does not get them).
    let listeners = match spec.network.as_ref().map(|n| microsandbox_network::stack::ports::bind(&n.ports)).transpose() {
        Ok(l) => l,
        Err(e) => {
            cleanup(&spec);
            let code = if e.in_use() { "port-in-use" } else { "invalid-config" };
            report(&StartupReport::Failed { code: code.into(), message: format!("sandbox {:?}: {e}", spec.name) });
            return 1;
        }
    };
    // A restore: QEMU reads the template's saved state from this file (`migrate-incoming fd:`);
    // a fork: from the FIFO the parent's QEMU streams into.
    // A fork over a RAM file: QEMU starts once the disk copy is in place, while the
    // parent still copies its memory; the FIFO is polled for the state's first bytes
    // before the load (see `template::incoming`).
    let mut fork_fifo = None;
    let state = match &spec.template {
        Some(TemplateRun::Restore { state, forked: true, disk_ready: Some(disk), .. }) => {
            let within = ready_within(&spec, Duration::from_millis(spec.boot_timeout_ms));
            let opened = match crate::template::open_fork_fifo(state) {
                Ok(f) => crate::template::wait_for_file(disk, within).await.map(|_| f),
                Err(e) => Err(e),
            };
            match opened.and_then(|f| f.try_clone().map(|c| (f, c)).map_err(|e| e.to_string())) {
                Ok((f, poll)) => {
                    eprintln!("msb: fork: the parent's disk was there {} ms after start", started.elapsed().as_millis());
                    fork_fifo = Some(poll);
                    Some(f)
                }
                Err(e) => {
                    cleanup(&spec);
                    report(&StartupReport::Failed { code: "restore-failed".into(), message: format!("sandbox {:?}: {e}", spec.name) });
                    return 1;
                }
            }
        }
        Some(TemplateRun::Restore { state, forked: true, .. }) => {
            match crate::template::open_fork_stream(state, ready_within(&spec, Duration::from_millis(spec.boot_timeout_ms))).await {
                Ok(f) => {
                    eprintln!("msb: fork: the parent's stream began {} ms after start", started.elapsed().as_millis());
                    Some(f)
                }
                Err(e) => {
                    cleanup(&spec);
                    report(&StartupReport::Failed { code: "restore-failed".into(), message: format!("sandbox {:?}: {e}", spec.name) });
                    return 1;
                }
            }
        }
        Some(TemplateRun::Restore { state, .. }) => match std::fs::File::open(state) {
            Ok(f) => Some(f),
            Err(e) => {
                cleanup(&spec);
                report(&StartupReport::Failed { code: "restore-failed".into(), message: format!("cannot open the template state {}: {e}", state.display()) });
                return 1;
            }
        },
        _ => None,
    };
    let spawned = spawn_qemu(&spec, nic.as_ref().map(|(_, qemu_end)| qemu_end), state.as_ref());
    let qemu_spawned = started.elapsed();
    drop(state);
    let mut net_counters = None;
    if let (Some((stack_end, qemu_end)), Some(cfg)) = (nic, spec.network.clone()) {
        drop(qemu_end);
        if spawned.is_ok() {
            let net_log = (!spec.quiet_logs).then(|| log_sink.clone());
            net_counters = Some(crate::net::start(stack_end, cfg, listeners.unwrap_or_default(), net_log));
        }
    }
    let mut qemu = match spawned {
        Ok(c) => c,
        Err(e) => {
            cleanup(&spec);
            return fail(format!("cannot start {}: {e}", spec.qemu.display()));
        }
    };
    let boot_timeout = Duration::from_millis(spec.boot_timeout_ms);

    // A directory image's root disk: formatted now, while QEMU starts paused; the guest
    // runs only once the disk is complete.
    let mut disk_built = None;
    if let Some(build) = spec.root_build.clone() {
        let within = ready_within(&spec, boot_timeout);
        let built = tokio::select! {
            r = format_root_and_start(build, spec.qmp_socket.clone(), within) => r,
            status = qemu.wait() => Err(("boot-failed", format!("QEMU exited during start ({})", status.map(|s| s.to_string()).unwrap_or_default()))),
            _ = tokio::time::sleep(within) => Err(("boot-failed", format!("the root disk was not ready within {}s", within.as_secs()))),
            _ = liveness::owner_gone(owner.clone()) => Err(("boot-failed", "the owner process exited during boot".into())),
        };
        if let Err((code, why)) = built {
            let message = format!("sandbox {:?}: {why}", spec.name);
            return abort_start(&mut qemu, &spec, report, code, message, code == "boot-failed").await;
        }
        disk_built = Some(started.elapsed());
    }
    // `boot_timeout` bounds the format and the boot together, as the engine waits for
    // this report no longer than that (plus a margin).
    let boot_left = boot_timeout.saturating_sub(disk_built.unwrap_or_default());

    // Boot: the agent must connect (through QEMU) and say Ready before the deadline.
    let mut agent_connected = Duration::ZERO;
    let booted = tokio::select! {
        r = async {
            let (mut stream, _) = agent_listener.accept().await.map_err(|e| e.to_string())?;
            agent_connected = started.elapsed();
            if let Some(TemplateRun::Restore { forked, .. }) = &spec.template {
                // QEMU waits (`-incoming defer`) for the capabilities and the go.
                let qmp = spec.qmp_socket.as_ref().ok_or("a restore needs the QMP socket")?;
                crate::template::incoming(qmp, microsandbox::template::STATE_FD, *forked, ready_within(&spec, boot_left), fork_fifo.as_ref()).await?;
            }
            let ready = match &spec.template {
                // The restored agent already said Ready (to the template's supervisor).
                Some(TemplateRun::Restore { hostname, resumed, .. }) => crate::template::handshake(&mut stream, hostname, !*resumed).await?,
                _ => agent_link::wait_ready(&mut stream).await?,
            };
            Ok::<_, String>((stream, ready))
        } => r,
        status = qemu.wait() => Err(format!("QEMU exited during boot ({})", status.map(|s| s.to_string()).unwrap_or_default())),
        _ = tokio::time::sleep(ready_within(&spec, boot_left)) => Err(format!("the guest agent did not become ready within {}s", ready_within(&spec, boot_left).as_secs())),
        _ = liveness::owner_gone(owner.clone()) => Err("the owner process exited during boot".into()),
    };
    drop(fork_fifo);
    let (stream, ready) = match booted {
        Ok(v) => v,
        Err(why) => {
            // A failed restore: the engine boots this sandbox cold instead.
            let code = if let Some(TemplateRun::Restore { .. }) = &spec.template { "restore-failed" } else { "boot-failed" };
            let message = format!("sandbox {:?} failed to boot: {why}", spec.name);
            return abort_start(&mut qemu, &spec, report, code, message, true).await;
        }
    };
    drop(agent_listener);
    let _ = std::fs::remove_file(&spec.agent_socket);

    let info = Info {
        name: spec.name.clone(),
        vmm: "qemu".into(),
        accel: spec.accel.clone(),
        vmm_pid: qemu.id().unwrap_or(0),
        supervisor_pid: std::process::id(),
        kernel: ready.kernel.clone(),
        boot_ms: started.elapsed().as_millis() as u64,
        start: match &spec.template {
            Some(TemplateRun::Restore { forked: true, .. }) => "forked",
            Some(TemplateRun::Restore { resumed: true, .. }) => "resumed",
            Some(TemplateRun::Restore { .. }) => "restored",
            _ => "booted",
        }
        .into(),
        template: match &spec.template {
            Some(TemplateRun::Restore { template, resumed: false, forked: false, .. }) => Some(template.clone()),
            _ => None,
        },
        net: None,
        boot_phases: match &spec.template {
            Some(TemplateRun::Restore { .. }) => Vec::new(),
            _ => boot_phases(qemu_spawned, disk_built, agent_connected, started.elapsed(), &ready.phases_us),
        },
    };
    if !info.boot_phases.is_empty() {
        let line: Vec<String> = info.boot_phases.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!("msb: boot phases (µs): {}", line.join(" "));
    }
    if let Some(TemplateRun::Save { state, qmp }) = &spec.template {
        // A template build: save the VM as it is now (agent ready, nothing of any sandbox
        // inside), wait for QEMU to finish writing and quit, and report.
        let within = Duration::from_secs(60);
        let saved = match crate::template::save(qmp, &spec.sandbox_dir.join(state), within).await {
            Ok(()) => match tokio::time::timeout(within, qemu.wait()).await {
                Ok(Ok(st)) if st.success() => Ok(()),
                Ok(st) => Err(format!("QEMU ended badly after saving ({st:?})")),
                Err(_) => Err("QEMU did not quit after saving".to_string()),
            },
            Err(e) => Err(e),
        };
        let _ = qemu.start_kill();
        let _ = qemu.wait().await;
        drop(stream);
        let _ = std::fs::remove_file(qmp);
        cleanup(&spec);
        return match saved {
            Ok(()) => {
                report(&StartupReport::Ready(info));
                0
            }
            Err(why) => fail(format!("template {:?}: {why}{}", spec.name, console_tail(&spec))),
        };
    }
    let control_listener = match bind(&spec.control_socket) {
        Ok(l) => l,
        Err(e) => {
            let message = format!("cannot listen on {}: {e}", spec.control_socket.display());
            return abort_start(&mut qemu, &spec, report, "boot-failed", message, false).await;
        }
    };

    if let Some(qmp) = &spec.qmp_socket {
        crate::template::set_fork_source(qmp.clone(), spec.sandbox_dir.clone(), qemu.id(), &spec.qemu_args);
    }

    let router = Arc::new(Router::default());
    if matches!(spec.template, Some(TemplateRun::Restore { resumed: true, .. } | TemplateRun::Restore { forked: true, .. })) {
        router.start_ids_after(crate::template::random_u32() | 1 << 30);
    }
    // The log sink is set after the warm-up (below): nothing of it reaches the log.
    let (rd, wr) = stream.into_split();
    let to_agent = agent_link::spawn_writer(wr);
    let (stop_tx, mut stop_rx) = mpsc::channel::<StopTicket>(4);
    let (detached_tx, detached_rx) = tokio::sync::watch::channel(false);
    let windows = Arc::new(Windows::new(spec.transfer.clone()));
    let ctx = Ctx {
        router: router.clone(),
        windows: windows.clone(),
        to_agent: to_agent.clone(),
        info: info.clone(),
        stop: stop_tx,
        detached: detached_tx,
        net: net_counters,
    };
    let router_for_idle = router.clone();
    let mut pump = tokio::spawn(agent_link::pump_from_agent(rd, router.clone(), to_agent.clone(), windows));
    // Scripts and patches (create only) go in before anything else runs or connects.
    if let Some(file) = spec.patches_file.clone() {
        let guest = crate::patches::Guest { router: router.clone(), to_agent: to_agent.clone() };
        let within = boot_timeout.saturating_sub(started.elapsed());
        let applied = tokio::select! {
            r = crate::patches::apply_file(&guest, &file) => r.map_err(|why| ("patch-failed", why)),
            why = &mut pump => Err(("boot-failed", format!("the agent channel ended while patching: {}", why.unwrap_or_default()))),
            status = qemu.wait() => Err(("boot-failed", format!("QEMU exited while patching ({})", status.map(|s| s.to_string()).unwrap_or_default()))),
            _ = tokio::time::sleep(within) => Err(("boot-failed", format!("boot and patches did not finish within {}s (boot_timeout)", boot_timeout.as_secs()))),
            _ = liveness::owner_gone(owner.clone()) => Err(("boot-failed", "the owner process exited during boot".into())),
        };
        if let Err((code, why)) = applied {
            return abort_start(&mut qemu, &spec, report, code, format!("sandbox {:?}: {why}", spec.name), false).await;
        }
    }
    // The interception CA (and host roots, with trust_host_cas) into the guest's trust
    // store, at every boot: a restarted sandbox has a new CA.
    let mut trusted = crate::interception::get().map(|i| i.ca().cert_pem().to_string()).unwrap_or_default();
    if spec.trust_host_cas {
        match crate::guest_ca::host_roots_pem() {
            Some(roots) => trusted = format!("{roots}\n{trusted}"),
            None => eprintln!("msb: trust_host_cas: the host has no CA bundle to copy"),
        }
    }
    if !trusted.is_empty() {
        let guest = crate::patches::Guest { router: router.clone(), to_agent: to_agent.clone() };
        if let Err(why) = crate::guest_ca::install(&guest, &trusted).await {
            let message = format!(
                "sandbox {:?}: cannot install the CA certificates in the guest ({why}); secrets: and trust_host_cas: need a writable root filesystem",
                spec.name
            );
            return abort_start(&mut qemu, &spec, report, "boot-failed", message, false).await;
        }
    }
    if let Some(req) = &spec.warm_up {
        let t = Instant::now();
        // The engine waits boot_timeout + 10 s for the report: stay well inside that.
        let within = crate::warm_up::WITHIN.min(boot_timeout.saturating_sub(started.elapsed()) + Duration::from_secs(5));
        match crate::warm_up::run(&router, &to_agent, req, within).await {
            Ok(code) => eprintln!("msb: warm-up done in {} ms (exit {code:?})", t.elapsed().as_millis()),
            Err(why) => eprintln!("msb: warm-up failed after {} ms: {why}", t.elapsed().as_millis()),
        }
    }
    if !spec.quiet_logs {
        router.set_log(log_sink);
    }
    tokio::spawn(control::serve(control_listener, ctx));
    if let Some(req) = spec.main.clone() {
        crate::main_process::start(router, &to_agent, req).await;
    }

    report(&StartupReport::Ready(info));
    // Nothing more goes to the engine's pipe; keep fd 1 valid but detached from it.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    let self_stop = self_stop_deadline(&spec, router_for_idle);
    let mut stop_by_itself = false;
    // Why the run ends, for the stop record; `vm_status` is set when QEMU ended first.
    let mut why_stop = source::SIGTERM;
    let mut vm_status = None;
    let stop_ticket = tokio::select! {
        t = stop_rx.recv() => {
            why_stop = match &t { Some((req, _)) if req.drain => source::DRAIN, _ => source::STOP };
            t
        }
        reason = self_stop => { stop_by_itself = true; why_stop = reason; None }
        _ = crate::interception::terminated() => { why_stop = source::SECRET_VIOLATION; None }
        status = qemu.wait() => { why_stop = source::VM_EXITED; vm_status = status.ok(); None }
        _ = liveness::owner_gone_unless_detached(owner.clone(), detached_rx) => { why_stop = source::OWNER_EXITED; None }
        _ = sigterm.recv() => None,
        why = &mut pump => { eprintln!("msb: {}", why.unwrap_or_default()); why_stop = source::AGENT_LOST; None }
    };
    // The agent link runs through QEMU, so a dying VM often ends the link first: the
    // cause is the VM when it exits right after.
    if why_stop == source::AGENT_LOST {
        if let Ok(Ok(status)) = tokio::time::timeout(AGENT_LOST_VM_GRACE, qemu.wait()).await {
            why_stop = source::VM_EXITED;
            vm_status = Some(status);
        }
    }

    // A pause: save the running VM into the sandbox directory and let QEMU quit; when
    // that fails, the sandbox stops as for an ordinary stop request.
    let mut paused = false;
    if let (Some((req, _)), Some(qmp)) = (&stop_ticket, &spec.qmp_socket) {
        if req.pause {
            paused = pause(&spec, qmp, &mut qemu).await;
            if paused {
                why_stop = source::PAUSE;
            }
        }
    }
    let clean_within = match &stop_ticket {
        _ if paused => None,
        Some((req, _)) => Some(Duration::from_millis(req.timeout_ms)),
        None if stop_by_itself => Some(SELF_STOP_GRACE),
        None => None,
    };
    let graceful = match clean_within {
        Some(within) => {
            let _ = to_agent.send(Frame::data(0, Kind::Shutdown, Vec::new())).await;
            tokio::time::timeout(within, qemu.wait()).await.is_ok()
        }
        None => false,
    };
    let _ = qemu.start_kill();
    let waited = qemu.wait().await.ok();
    let vm_status = vm_status.or(waited);
    write_stop_record(&spec, why_stop, vm_status);
    cleanup(&spec);
    if let Some((_, done)) = stop_ticket {
        let _ = done.send(Stopped { graceful: graceful || paused, paused });
        // Let the control task flush the answer before the process ends.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_phases_keep_supervisor_marks_and_sane_guest_steps() {
        let guest = vec![
            ("init".to_string(), 2_345_678),
            ("modules".to_string(), 2_400_049),
            ("Bad Name".to_string(), 1),
            ("x".repeat(25), 1),
        ];
        let p = boot_phases(Duration::from_micros(12_345), None, Duration::from_millis(2_000), Duration::from_millis(2_600), &guest);
        assert_eq!(
            p,
            vec![
                ("supervisor.qemu_spawned".to_string(), 12_345),
                ("supervisor.agent_connected".to_string(), 2_000_000),
                ("supervisor.ready".to_string(), 2_600_000),
                ("guest.init".to_string(), 2_345_678),
                ("guest.modules".to_string(), 2_400_049),
            ]
        );
        let many: Vec<(String, u64)> = (0..100).map(|i| (format!("s{i}"), i)).collect();
        assert_eq!(boot_phases(Duration::ZERO, None, Duration::ZERO, Duration::ZERO, &many).len(), 3 + MAX_GUEST_PHASES);
        let built = boot_phases(Duration::from_micros(5), Some(Duration::from_micros(40)), Duration::from_micros(60), Duration::from_micros(90), &[]);
        assert_eq!(built[1], ("supervisor.disk_built".to_string(), 40));
        assert_eq!(built.len(), 4);
    }
}
