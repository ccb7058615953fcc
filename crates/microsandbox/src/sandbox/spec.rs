//! What the engine tells a supervisor to run: written as JSON into the sandbox
//! directory, read by the `msb` supervisor binary at start.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Name of the file in the sandbox directory.
pub const SPEC_FILE: &str = "supervisor.json";

/// Environment variable naming the fd whose EOF means "the owner process died".
pub const LIVENESS_FD_ENV: &str = "MSB_LIVENESS_FD";

/// The supervisor's instructions for one sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupervisorSpec {
    pub name: String,
    pub sandbox_dir: PathBuf,
    pub qemu: PathBuf,
    pub qemu_args: Vec<String>,
    pub accel: String,
    pub agent_socket: PathBuf,
    pub control_socket: PathBuf,
    pub console_log: PathBuf,
    pub boot_timeout_ms: u64,
    pub kernel_release: String,
    /// Delete `sandbox_dir` when the supervisor exits.
    pub remove_dir_on_exit: bool,
    /// `ephemeral: true`: at exit, delete everything in `sandbox_dir` but the stop record
    /// (see `sandbox::ephemeral`).
    #[serde(default)]
    pub ephemeral: bool,
    /// Do not record command and main-process output in the logs (`quiet_logs:`).
    #[serde(default)]
    pub quiet_logs: bool,
    /// Stop the sandbox by itself this long after boot.
    #[serde(default)]
    pub max_duration_ms: Option<u64>,
    /// Stop the sandbox by itself after this long with no session and no client traffic.
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
    /// The sandbox's main process (image Entrypoint + Cmd or `entrypoint:`), started once
    /// the guest is ready; its output goes to the sandbox log.
    #[serde(default)]
    pub main: Option<microsandbox_protocol::ExecRequest>,
    /// `warm_up:`: a command run once before the ready report, after the patches and
    /// before the main process, whose session the user never sees (its output is not
    /// logged, its session id is given out again).
    #[serde(default)]
    pub warm_up: Option<microsandbox_protocol::ExecRequest>,
    /// JSON list of [`PatchStep`](super::patch::PatchStep)s to apply before the main
    /// process and before reporting ready (create only). The supervisor deletes it.
    #[serde(default)]
    pub patches_file: Option<PathBuf>,
    /// The bulk-transfer disk QEMU attaches, whose windows the supervisor lends to
    /// filesystem sessions; `None`: every transfer moves as frames.
    #[serde(default)]
    pub transfer: Option<super::transfer::TransferSpec>,
    /// The guest NIC's stack; `None`: no NIC.
    #[serde(default)]
    pub network: Option<microsandbox_network::NetworkConfig>,
    /// TLS interception settings (public parts only) when the sandbox has secrets; the
    /// secret values and a user CA key arrive on the `MSB_SECRETS_FD` socket instead.
    #[serde(default)]
    pub tls: Option<microsandbox_network::tls::TlsConfig>,
    /// QEMU's QMP socket (pause, templates); `None` for supervisors of older specs.
    #[serde(default)]
    pub qmp_socket: Option<PathBuf>,
    /// Save this VM as a template, or restore it from one (`None`: an ordinary boot).
    #[serde(default)]
    pub template: Option<crate::template::TemplateRun>,
    /// Volume locks to hold and `virtiofsd`s to run for `volumes:`; `None`: no volumes.
    #[serde(default)]
    pub volumes: Option<crate::volume::mount::VolumeRuntime>,
    /// Copy the host's CA roots into the guest's trust store at boot (`trust_host_cas:`).
    #[serde(default)]
    pub trust_host_cas: bool,
    /// A create from a directory image: the root disk to format while QEMU starts paused
    /// (`None`: the disk is ready).
    #[serde(default)]
    pub root_build: Option<RootBuild>,
}

/// The private root disk of a directory image, formatted by the supervisor (see
/// [`crate::rootfs::format_disk`]): the engine allocated `disk` at `size_mib` MiB, the
/// supervisor starts QEMU with `-S`, runs `mke2fs -d image_dir` into the file meanwhile
/// and lets the VM run (QMP `cont`) only once it succeeded, so the guest never reads a
/// disk that is still being written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootBuild {
    pub image_dir: PathBuf,
    pub disk: PathBuf,
    pub size_mib: u64,
}

/// First line the supervisor prints on stdout: it booted, or why it did not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartupReport {
    Ready(microsandbox_protocol::Info),
    Failed { code: String, message: String },
}
