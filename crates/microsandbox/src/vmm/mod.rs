//! VMM drivers. QEMU is the one that runs everywhere (KVM, HVF or TCG); the driver
//! turns a [`VmSpec`] into a command line and knows nothing about sandboxes.

pub mod accel;
pub mod qemu;

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
}

/// The virtio-net device of a sandbox with a network.
#[derive(Debug, Clone)]
pub struct Nic {
    pub mac: String,
    pub mtu: u32,
}
