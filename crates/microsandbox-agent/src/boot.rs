//! Early boot of PID 1: pseudo filesystems, kernel modules, waiting for devices, switching
//! into the root disk (grown to fill it). Every step returns a message naming what failed;
//! the caller turns it into a console line and a reboot (PID 1 must never exit).

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};
use nix::unistd::{chdir, chroot, sethostname};

use crate::{port, procfs};

/// Kernel modules to load, one path per line relative to [`MODULE_DIR`], in load order.
const MODULE_LIST: &str = "/lib/modules.order";
/// Modules of the guest NIC (same format), loaded only when the sandbox has one.
const NET_MODULE_LIST: &str = "/lib/modules.net.order";
/// Modules of virtio-fs volumes (same format), loaded only when a mount needs them.
const FS_MODULE_LIST: &str = "/lib/modules.fs.order";
const MODULE_DIR: &str = "/lib/modules";
/// The root disk: the first virtio-blk device.
const ROOT_DEV: &str = "/dev/vda";
/// Size of the root disk in 512-byte sectors.
const ROOT_SECTORS: &str = "/sys/block/vda/size";
const NEW_ROOT: &str = "/newroot";
const DEVICE_WAIT: Duration = Duration::from_secs(15);
const DEVICE_POLL: Duration = Duration::from_millis(5);
/// Read-ahead of the root disk. The kernel's 128 KiB default makes the first exec of a
/// binary fault it in over many small virtio requests, each an emulated round trip under
/// TCG; the disk is a host file (usually in the host's page cache), so larger reads are
/// cheap. Measured: the first `exec("true")` after boot ~10-20% faster.
const ROOT_READ_AHEAD_KB: &str = "4096";

type Step<T = ()> = Result<T, String>;

/// Guest uptime (`CLOCK_BOOTTIME`, the clock of `/proc/uptime`) in microseconds.
pub fn uptime_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid local.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The end of each boot step in guest uptime, for the `Ready` frame (`phases_us`): how a
/// cold create's time divides inside the guest (bench/boot_exec.rb prints it).
#[derive(Default)]
pub struct Phases(Vec<(String, u64)>);

impl Phases {
    /// Starts the record with `init`: now, i.e. when the kernel started the agent.
    pub fn start() -> Phases {
        let mut p = Phases::default();
        p.mark("init");
        p
    }

    pub fn mark(&mut self, step: &str) {
        self.0.push((step.to_string(), uptime_us()));
    }

    pub fn into_vec(self) -> Vec<(String, u64)> {
        self.0
    }
}

/// Runs boot steps 1–4 and returns the open agent port (see [`port::open`]).
pub fn boot(phases: &mut Phases) -> Step<File> {
    mount_pseudo_fs()?;
    ensure_std_fds();
    phases.mark("pseudo_fs");
    load_modules(MODULE_LIST)?;
    if has_nic()? {
        load_modules(NET_MODULE_LIST)?;
    }
    // Modules live in the initramfs, so they load before the switch into the root disk.
    let mounts = crate::volumes::from_cmdline()?;
    if crate::volumes::needs_virtiofs(&mounts) {
        load_modules(FS_MODULE_LIST)?;
    }
    phases.mark("modules");
    let dev = wait_for_devices()?;
    let port = port::open(&dev).map_err(|e| format!("cannot open /dev/{dev}: {e}"))?;
    phases.mark("devices");
    // Best effort: only a tuning knob.
    let _ = fs::write("/sys/block/vda/queue/read_ahead_kb", ROOT_READ_AHEAD_KB);
    mount_root()?;
    switch_root()?;
    phases.mark("root");
    // The overlay of a registry image is larger than its filesystem by oci_upper_size.
    crate::growfs::grow_to_device(ROOT_DEV, ROOT_SECTORS, "/")?;
    phases.mark("grow");
    // volumes: before anything runs, so no process sees the root where a volume belongs.
    crate::volumes::mount_all(&mounts)?;
    phases.mark("volumes");
    let hostname = set_hostname()?;
    crate::net::loopback_up()?;
    phases.mark("lo");
    network(&hostname)?;
    phases.mark("net");
    Ok(port)
}

fn mkdir(path: &str, mode: u32) -> Step {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(format!("cannot create {path}: {e}"))
        }
        _ => Ok(()),
    }
}

/// Mounts `fstype` on `target`; EBUSY means it is already mounted (e.g. the kernel's
/// CONFIG_DEVTMPFS_MOUNT), which is what we wanted.
fn mount_fs(fstype: &str, target: &str, flags: MsFlags, data: Option<&str>) -> Step {
    mkdir(target, 0o755)?;
    match mount(Some(fstype), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(e) => Err(format!("cannot mount {fstype} on {target}: {e}")),
    }
}

fn mount_pseudo_fs() -> Step {
    let hard = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("proc", "/proc", hard, None)?;
    mount_fs("sysfs", "/sys", hard, None)
}

/// Makes sure fds 0–2 are open. Without `/dev/console` in the initramfs the kernel starts
/// us with them closed; then a pipe could land on fd 1 and `dup2(1, 1)` in the child would
/// keep its close-on-exec flag, silently losing the session's stdout.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console")
            .or_else(|_| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            });
        if let Ok(f) = file {
            // SAFETY: dup2 onto a closed standard descriptor; `f` is closed on drop.
            unsafe { libc::dup2(f.as_raw_fd(), fd) };
        }
    }
}

/// Module file names from the list: blank lines and `#` comments skipped.
pub fn module_list(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

/// True when the kernel command line configures a NIC (`msb.net=`).
fn has_nic() -> Step<bool> {
    let cmdline = fs::read_to_string("/proc/cmdline").map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    Ok(procfs::net(&cmdline).is_some())
}

fn load_modules(list: &str) -> Step {
    let text = match fs::read_to_string(list) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {list}: {e}")),
    };
    for name in module_list(&text) {
        let path = Path::new(MODULE_DIR).join(name);
        let file =
            File::open(&path).map_err(|e| format!("cannot open module {}: {e}", path.display()))?;
        match finit_module(&file, c"", ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(format!("cannot load module {}: {e}", path.display())),
        }
    }
    Ok(())
}

/// Polls until the root disk and the agent port exist; returns the port device name.
fn wait_for_devices() -> Step<String> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        let root = Path::new(ROOT_DEV).exists();
        let port = port::find(
            Path::new(port::SYSFS_PORTS),
            microsandbox_protocol::AGENT_PORT_NAME,
        )
        .filter(|dev| Path::new("/dev").join(dev).exists());
        if let (true, Some(dev)) = (root, &port) {
            return Ok(dev.clone());
        }
        if Instant::now() >= deadline {
            let missing = if root {
                format!("virtio port {}", microsandbox_protocol::AGENT_PORT_NAME)
            } else {
                ROOT_DEV.to_string()
            };
            return Err(format!(
                "{missing} did not appear within {}s",
                DEVICE_WAIT.as_secs()
            ));
        }
        sleep(DEVICE_POLL);
    }
}

fn mount_root() -> Step {
    mkdir(NEW_ROOT, 0o755)?;
    mount(
        Some(ROOT_DEV),
        NEW_ROOT,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(|e| format!("cannot mount {ROOT_DEV}: {e}"))?;
    for (dir, mode) in [
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("tmp", 0o1777),
    ] {
        mkdir(&format!("{NEW_ROOT}/{dir}"), mode)?;
    }
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{dir}");
        mount(
            Some(dir),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(|e| format!("cannot move {dir} to {target}: {e}"))?;
    }
    // A pty-less sandbox still works, so devpts is best effort.
    let pts = format!("{NEW_ROOT}/dev/pts");
    if mkdir(&pts, 0o755).is_ok() {
        let _ = mount(
            Some("devpts"),
            pts.as_str(),
            Some("devpts"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0620,ptmxmode=0666"),
        );
    }
    Ok(())
}

/// Makes `/newroot` the root. The initramfs cannot be unmounted (it is the rootfs), so it
/// simply stays underneath; it holds only this binary and a few modules.
fn switch_root() -> Step {
    let fail = |what: &str, e: Errno| format!("cannot switch root ({what}): {e}");
    chdir(NEW_ROOT).map_err(|e| fail("chdir", e))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| fail("move mount", e))?;
    chroot(".").map_err(|e| fail("chroot", e))?;
    chdir("/").map_err(|e| fail("chdir /", e))
}

fn set_hostname() -> Step<String> {
    let cmdline = fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let name = procfs::hostname(&cmdline);
    // sethostname takes bytes; a NUL would silently truncate, so refuse it.
    CString::new(name).map_err(|_| format!("invalid hostname {name:?}"))?;
    sethostname(name).map_err(|e| format!("cannot set hostname {name:?}: {e}"))?;
    Ok(name.to_string())
}

/// Configures `eth0` when the host gave the sandbox a NIC (`msb.net=` on the command
/// line; the host loaded `virtio_net` through the module list then). A NIC that does not
/// appear or cannot be configured fails the boot: the user asked for a network. The name
/// files are best effort (an odd root only loses name resolution; the console says why).
fn network(hostname: &str) -> Step {
    let cmdline = fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    let Some(cfg) = procfs::net(&cmdline) else { return Ok(()) };
    let deadline = Instant::now() + DEVICE_WAIT;
    while !Path::new("/sys/class/net/eth0").exists() {
        if Instant::now() >= deadline {
            return Err(format!("the network interface eth0 did not appear within {}s", DEVICE_WAIT.as_secs()));
        }
        sleep(DEVICE_POLL);
    }
    // IPv6 (dual stack): the kernel settings before eth0 goes up, the address after. A
    // kernel without IPv6 or a failure here costs IPv6 only; the console says why.
    let v6 = procfs::net6(&cmdline);
    let v6_ready = match v6.map(|_| crate::net::prepare_ipv6()) {
        Some(Ok(true)) => true,
        Some(Ok(false)) => {
            eprintln!("msb-agent: the kernel has no IPv6: eth0 gets IPv4 only");
            false
        }
        Some(Err(e)) => {
            eprintln!("msb-agent: {e}; eth0 gets IPv4 only");
            false
        }
        None => false,
    };
    crate::net::configure_eth0(&cfg)?;
    if let (Some(v6), true) = (v6, v6_ready) {
        if let Err(e) = crate::net::configure_eth0_v6(&v6) {
            eprintln!("msb-agent: {e}");
        }
    }
    if let Err(e) = crate::net::write_name_files(&cfg, hostname) {
        eprintln!("msb-agent: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_list_skips_blanks_and_comments() {
        let text = "virtio_ring.ko\n\n# comment\n  virtio.ko  \nvirtio_blk.ko";
        assert_eq!(
            module_list(text),
            ["virtio_ring.ko", "virtio.ko", "virtio_blk.ko"]
        );
        assert!(module_list("").is_empty());
    }
}
