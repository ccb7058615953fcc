//! Sandbox lifecycle on the host: create (root disk, supervisor, boot), exec, stop, kill.
//!
//! Process tree: the creating process → `msb` supervisor (own session) → QEMU.
//! The creator keeps the write end of a "liveness" pipe whose read end is the
//! supervisor's fd 3; when the creator dies, even by SIGKILL, the supervisor sees EOF
//! and kills the VM. QEMU gets `PR_SET_PDEATHSIG` from the supervisor, so it never
//! outlives it either.

pub mod config;
mod exec;
mod owner;
pub mod spec;
mod stream;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use microsandbox_protocol::{Frame, Info, Kind, StopRequest, Stopped};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

pub use config::SandboxConfig;
pub use exec::{ExecCall, ExecResult};
pub use stream::{ExecControl, ExecEvent, ExecStream};

use crate::error::{Error, IoContext, Result};
use crate::paths::Home;
use crate::runtime;
use crate::vmm::{self, Accel, VmSpec};
use spec::{StartupReport, SupervisorSpec};

/// A running sandbox owned by this process.
pub struct Sandbox {
    name: String,
    dir: PathBuf,
    control: PathBuf,
    env: Vec<(String, String)>,
    workdir: Option<String>,
    info: Info,
    supervisor: Mutex<Option<tokio::process::Child>>,
    /// Closing this (drop) tells the supervisor its owner is gone.
    liveness: std::sync::Mutex<Option<OwnedFd>>,
    stopped: AtomicBool,
}

/// Removes a half-created sandbox directory unless disarmed.
struct DirGuard(Option<PathBuf>);
impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Sandbox {
    /// Boots a sandbox and returns once its agent answers.
    pub async fn create(cfg: SandboxConfig) -> Result<Sandbox> {
        cfg.validate()?;
        let home = Home::resolve(cfg.home.as_deref())?;
        crate::rootfs::check_dir_image(&cfg.image)?;
        let accel = Accel::resolve(cfg.accel.as_deref())?;
        let qemu = vmm::qemu::binary()?;
        let rt = runtime::load(&home).ok_or_else(|| {
            Error::Runtime(format!(
                "the microsandbox runtime is not installed in {}; run Microsandbox.install",
                home.root().display()
            ))
        })?;
        let supervisor_bin = cfg.supervisor.clone().unwrap_or_else(|| rt.supervisor.clone());
        if !supervisor_bin.is_file() {
            return Err(Error::Runtime(format!(
                "supervisor binary {} does not exist; check Microsandbox.runtime_path / MSB_PATH",
                supervisor_bin.display()
            )));
        }
        let control = home.socket_path(&cfg.name, "ctl")?;
        let agent_socket = home.socket_path(&cfg.name, "agent")?;

        let dir = home.sandbox_dir(&cfg.name);
        owner::claim_dir(&dir, &cfg.name)?;
        let mut guard = DirGuard(Some(dir.clone()));
        std::fs::create_dir_all(home.run_dir()).context(|| format!("creating {}", home.run_dir().display()))?;

        let disk = dir.join("root.ext4");
        let image = PathBuf::from(&cfg.image);
        let disk2 = disk.clone();
        tokio::task::spawn_blocking(move || crate::rootfs::build_disk_from_dir(&image, &disk2))
            .await
            .map_err(|e| Error::Runtime(format!("root disk task failed: {e}")))??;

        let vm = VmSpec {
            accel,
            cpus: cfg.cpus as u32,
            memory_mib: cfg.memory_mib as u32,
            kernel: rt.kernel.clone(),
            initramfs: rt.initramfs.clone(),
            cmdline: vmm::qemu::cmdline(&cfg.name),
            root_disk: disk,
            agent_socket: agent_socket.clone(),
            console_log: dir.join("console.log"),
        };
        let spec = SupervisorSpec {
            name: cfg.name.clone(),
            sandbox_dir: dir.clone(),
            qemu,
            qemu_args: vmm::qemu::args(&vm),
            accel: accel.as_str().into(),
            agent_socket,
            control_socket: control.clone(),
            console_log: vm.console_log.clone(),
            boot_timeout_ms: cfg.boot_timeout().as_millis() as u64,
            kernel_release: rt.manifest.kernel_release.clone(),
            remove_dir_on_exit: true,
        };
        let spec_path = dir.join(spec::SPEC_FILE);
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap())
            .context(|| format!("writing {}", spec_path.display()))?;

        let (mut child, liveness) = owner::spawn_supervisor(&supervisor_bin, &spec_path, &dir)?;
        let report = owner::read_startup(&mut child, cfg.boot_timeout() + Duration::from_secs(10)).await;
        let info = match report {
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
        guard.0 = None;
        Ok(Sandbox {
            name: cfg.name,
            dir,
            control,
            env: cfg.env,
            workdir: cfg.workdir,
            info,
            supervisor: Mutex::new(Some(child)),
            liveness: std::sync::Mutex::new(Some(liveness)),
            stopped: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What runs this sandbox (VMM, accelerator, pids, kernel, boot time).
    pub fn info(&self) -> &Info {
        &self.info
    }

    /// False once `stop`/`kill` ran or the VM was found gone.
    pub fn is_running(&self) -> bool {
        !self.stopped.load(Ordering::SeqCst)
    }

    fn not_running(&self) -> Error {
        Error::SandboxNotRunning(format!(
            "sandbox {:?} is not running (stopped, killed or its VM exited); create it again",
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
    pub async fn exec(&self, call: ExecCall) -> Result<ExecResult> {
        let conn = self.connect().await?;
        let req = call.into_request(&self.env, self.workdir.as_deref())?;
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
    /// `call.stdin` (or empty).
    pub async fn exec_stream(&self, call: ExecCall, stdin_pipe: bool) -> Result<ExecStream> {
        let conn = self.connect().await?;
        let mut req = call.into_request(&self.env, self.workdir.as_deref())?;
        req.stdin = stdin_pipe || call.stdin.is_some();
        ExecStream::start(conn, req, if stdin_pipe { None } else { call.stdin.clone() }).await
    }

    /// Shuts the guest down, waiting up to `timeout` before killing it.
    pub async fn stop(&self, timeout: Duration) -> Result<bool> {
        if !self.is_running() {
            self.reap().await;
            return Ok(false);
        }
        let graceful = match UnixStream::connect(&self.control).await {
            Ok(mut conn) => {
                let req = Frame::json(0, Kind::Stop, &StopRequest { timeout_ms: timeout.as_millis() as u64 });
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

    /// Kills the VM at once (SIGKILL to supervisor and QEMU).
    pub async fn kill(&self) -> Result<()> {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.info.vmm_pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        self.reap().await;
        Ok(())
    }

    /// Makes sure the supervisor is gone and the sandbox directory removed.
    async fn reap(&self) {
        let mut guard = self.supervisor.lock().await;
        if let Some(mut child) = guard.take() {
            if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        self.liveness.lock().unwrap().take();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.control);
    }
}

fn call_stdin(call: &ExecCall) -> Option<Vec<u8>> {
    call.stdin.clone()
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Child has kill_on_drop; closing the liveness pipe makes the supervisor kill QEMU.
        if self.is_running() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.info.vmm_pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
