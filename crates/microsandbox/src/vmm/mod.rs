//! VMM drivers. QEMU is the one that runs everywhere (KVM, HVF or TCG); the driver
//! turns a [`VmSpec`] into a command line and knows nothing about sandboxes.

pub mod accel;
pub mod qemu;
pub mod tsc;

use std::path::PathBuf;

pub use accel::Accel;

/// Everything a VMM needs to boot one sandbox VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub accel: Accel,
    pub cpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub root_disk: PathBuf,
    /// QEMU format of `root_disk`: `raw` (private ext4) or `qcow2` (overlay on a shared image root).
    pub root_format: &'static str,
    pub agent_socket: PathBuf,
    pub console_log: PathBuf,
    /// Raw sparse file attached as the bulk-transfer virtio-blk disk (serial
    /// [`microsandbox_protocol::TRANSFER_DISK_SERIAL`]), if any.
    pub transfer_disk: Option<PathBuf>,
    /// The guest NIC, if any: QEMU finds its end of the stream socketpair at
    /// [`qemu::NET_FD`] (the supervisor puts it there).
    pub nic: Option<Nic>,
    /// `volumes:` devices: virtio-fs shares (vhost-user sockets) and block drives.
    pub shares: Vec<crate::volume::mount::VirtiofsShare>,
    pub drives: Vec<crate::volume::mount::BlockDrive>,
    /// Guest RAM in a file (templates, see [`RamFile`]); `None`: anonymous memory. Not
    /// with `shares` (virtio-fs needs its own shared memory).
    pub ram_file: Option<RamFile>,
}

/// Guest RAM backed by a file, for templates: the template's VM writes its RAM into the
/// file (`shared`); a sandbox restored from it maps the file privately, so the pages it
/// only reads stay one copy in the host's page cache for every sandbox of the template,
/// and a page it writes becomes its own (copy-on-write). Every migration runs with QEMU's
/// capability `x-ignore-shared` (set by the supervisor through QMP), so the template's
/// saved state leaves the shared RAM out; a private mapping is migrated in full (pause or
/// fork of a restored sandbox).
#[derive(Debug, Clone)]
pub struct RamFile {
    pub path: PathBuf,
    pub shared: bool,
}

/// The virtio-net device of a sandbox with a network.
#[derive(Debug, Clone)]
pub struct Nic {
    pub mac: String,
    pub mtu: u32,
}
