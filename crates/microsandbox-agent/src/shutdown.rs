//! Ending the VM. PID 1 must never exit (the kernel would panic), so every way out —
//! orderly shutdown, boot failure, panic — ends in `reboot(RB_AUTOBOOT)`; QEMU runs with
//! `-no-reboot`, so a reboot stops the VM, and it needs no ACPI.

use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use crate::session::{kill_group, Sessions};
use crate::util::log;

/// How long sessions get to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(1);

/// Host-requested shutdown: SIGTERM every session, SIGKILL what is left after
/// [`TERM_GRACE`], flush the disk, power off.
pub fn shutdown(sessions: &Sessions) -> ! {
    let groups = sessions.pgids();
    for &g in &groups {
        kill_group(g, libc::SIGTERM);
    }
    let deadline = Instant::now() + TERM_GRACE;
    // kill(-g, 0) succeeds while any member of the group exists.
    // SAFETY: signal 0 only probes.
    while Instant::now() < deadline && groups.iter().any(|&g| unsafe { libc::kill(-g, 0) } == 0) {
        sleep(Duration::from_millis(10));
    }
    for &g in &groups {
        kill_group(g, libc::SIGKILL);
    }
    // Anything that escaped its session's group (daemons) must not write during sync.
    // SAFETY: kill(-1) signals every process but PID 1 itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    nix::unistd::sync();
    // Volumes first: a disk volume's next user (maybe another sandbox) finds it clean.
    crate::volumes::unmount_all();
    // A read-only root is clean on next boot (no journal replay); EBUSY is harmless.
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    power_off()
}

/// Boot failure or panic: say why on the console, then stop the VM instead of hanging.
pub fn fatal(msg: &str) -> ! {
    log!("{msg}");
    power_off()
}

/// Flushes console and disks and reboots (= VM exit). Never returns.
pub fn power_off() -> ! {
    // The console is a tty: wait until our last line has actually left the UART.
    let _ = nix::sys::termios::tcdrain(std::io::stderr());
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_AUTOBOOT).unwrap_err();
    log!("reboot failed: {err}");
    loop {
        sleep(Duration::from_secs(3600));
    }
}
