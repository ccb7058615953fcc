//! `msb`: the per-sandbox supervisor.
//!
//! Started by the engine with the path of a `supervisor.json` ([`SupervisorSpec`]). It
//! boots QEMU, waits for the guest agent, prints one [`StartupReport`] line on stdout,
//! then relays client sessions (control socket) to the agent until the sandbox stops,
//! its VM exits, or its owner process dies (EOF on the liveness fd).

mod agent_link;
mod control;
mod flow;
mod guest_ca;
mod interception;
mod liveness;
mod logbook;
mod main_process;
mod net;
mod patches;
mod router;
mod template;
mod transfer;
mod vm;
mod volumes;
mod warm_up;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use microsandbox::sandbox::spec::{StartupReport, SupervisorSpec};

fn report(r: &StartupReport) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap());
    let _ = out.flush();
}

fn main() -> ExitCode {
    fixed_mmap_threshold();
    let Some(spec_path) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: msb <supervisor.json>  (started by the microsandbox engine, not by hand)");
        return ExitCode::from(2);
    };
    let spec: SupervisorSpec = match std::fs::read(&spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            report(&StartupReport::Failed { code: "runtime-error".into(), message: format!("cannot read {}: {e}", spec_path.display()) });
            return ExitCode::from(1);
        }
    };
    // Secrets (if any) are read before anything starts, so a bad handover fails the start.
    if let Err((code, message)) = interception::load(&spec) {
        report(&StartupReport::Failed { code, message });
        return ExitCode::from(1);
    }
    // Single-threaded runtime: QEMU is spawned from this (main) thread, which is what
    // PR_SET_PDEATHSIG tracks, so QEMU dies exactly when this process does.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let code = rt.block_on(vm::supervise(spec, report));
    ExitCode::from(code)
}

/// Allocations of 128 KiB and more always get their own mapping, returned to the kernel
/// when freed. glibc's default raises this threshold after the first such free, which
/// moved each guest TCP connection's 2 × 256 KiB smoltcp buffers onto the network
/// thread's malloc arena, where freed memory stays resident: the supervisor's RSS grew by
/// 13 MiB over 10,000 sequential guest connections and never came back (bench/net.rb).
/// A fresh mapping also needs no zeroing, so a buffer costs RSS only for the pages its
/// connection really uses.
///
/// Turning the dynamic threshold off also froze glibc's trim threshold at 128 KiB, so
/// every burst of smaller blocks — the network thread's Ethernet frames, up to 64 KiB
/// each and a few MiB in flight during a bulk transfer — was handed back to the kernel
/// as soon as it was freed and faulted in again by the next burst: 2,300–16,500 page
/// faults per 64 MiB download, every download, now ~1,000–2,100 and a third less of the
/// thread's CPU (DESIGN.md, "Downloads at MTU 65520"). Up to 8 MiB free at the top of an
/// arena now stay mapped (more than a bulk transfer's frames in flight); the
/// per-connection buffers above are mappings of their own and unaffected.
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only changes allocator parameters; called before any other thread
    // exists. Setting M_MMAP_THRESHOLD also turns the dynamic thresholds off.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 * 1024 * 1024);
    }
}
