//! The microsandbox engine: everything between the Ruby extension and a running VM.
//!
//! - [`paths`]: where files live (`~/.microsandbox`).
//! - [`runtime`]: provisioning of the guest kernel, initramfs and supervisor.
//! - [`rootfs`]: root disks for sandboxes.
//! - [`image`]: OCI registry images: pull, verify, shared read-only root disks.
//! - [`vmm`]: VMM drivers (QEMU) and accelerator choice.
//! - [`template`]: booted VMs saved once per configuration, restored instead of booted.
//! - [`snapshot`]: stopped sandboxes' disks saved as artifacts to boot new sandboxes from.
//! - [`volume`]: named volumes (host storage shared with sandboxes) and host-side access to them.
//! - [`sandbox`]: create / exec / stop / kill, talking to the per-sandbox supervisor.
//!
//! Async (tokio) throughout; no Ruby here.

pub mod error;
pub mod image;
pub mod lockfile;
pub mod paths;
pub mod rootfs;
pub mod runtime;
pub mod sandbox;
pub mod snapshot;
pub mod state;
pub mod template;
pub mod vmm;
pub mod volume;

pub use error::{Error, Result};
pub use sandbox::{ExecCall, ExecEvent, ExecResult, ExecStream, Sandbox, SandboxConfig};
