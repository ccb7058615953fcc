//! `msb-agent`: PID 1 of a sandbox VM. Boots the guest (mounts, modules, root switch),
//! then serves sessions over the `msb.agent` virtio-serial port until told to shut down.
//!
//! PID 1 must never exit or panic out of `main` (the kernel would panic), so every failure
//! path ends in a console message and a reboot, which stops the VM.

mod boot;
mod bulk;
mod command;
mod flow;
mod fs;
mod growfs;
mod identity;
mod init;
mod machine_id;
mod net;
mod port;
mod procfs;
mod reaper;
mod restore;
mod server;
mod session;
mod shutdown;
mod spawn;
mod util;
mod volumes;
mod wire;

use std::convert::Infallible;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use microsandbox_protocol::{Frame, Kind, Ready, PROTOCOL_VERSION};

use crate::reaper::Reaper;
use crate::session::Sessions;
use crate::wire::Sink;

fn main() {
    // Trampoline mode (see identity.rs): a child about to become another user's program.
    let args: Vec<std::ffi::CString> = std::env::args_os()
        .filter_map(|a| std::ffi::CString::new(a.into_encoded_bytes()).ok())
        .collect();
    if args.get(1).map(|a| a.as_bytes()) == Some(identity::TRAMPOLINE_FLAG.as_bytes()) {
        identity::trampoline(&args);
    }
    // Mounting over /dev and rebooting are only sane inside the VM: refuse anywhere else.
    if std::process::id() != 1 {
        eprintln!("msb-agent: must run as PID 1 (the init of a sandbox VM)");
        std::process::exit(2);
    }
    let msg = match catch_unwind(run) {
        Ok(Err(msg)) => msg,
        Ok(Ok(never)) => match never {},
        Err(_) => "the agent panicked".to_string(),
    };
    shutdown::fatal(&msg)
}

fn run() -> Result<Infallible, String> {
    let mut phases = boot::Phases::start();
    let port = boot::boot(&mut phases)?;
    // `init:`: PID 1 becomes the init, this process goes on in a child (before any thread).
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    // Before any command of the sandbox (and before an `init:`, which then owns the file).
    machine_id::ensure_at_boot(&cmdline);
    init::handoff(&cmdline)?;
    phases.mark("machine_id");
    let writer = port
        .try_clone()
        .map_err(|e| format!("cannot dup the agent port: {e}"))?;
    let sink = Sink::new(writer);

    let reaper = Arc::new(Reaper::default());
    let r = reaper.clone();
    util::spawn("reaper", move || {
        // Without a reaper no session could ever end: treat its death as fatal.
        let _ = catch_unwind(AssertUnwindSafe(|| r.run()));
        shutdown::fatal("the reaper thread panicked")
    })
    .map_err(|e| format!("cannot start the reaper thread: {e}"))?;

    // Blocks until a host is connected (virtio-serial holds writes until then).
    phases.mark("ready");
    sink.send(&Frame::json(0, Kind::Ready, &ready(phases.into_vec())));
    let sessions = Sessions::new(sink.clone(), reaper);
    server::serve(port, sink, sessions)
}

/// The `Ready` frame; `phases_us` only from a boot (see [`boot::Phases`]).
pub(crate) fn ready(phases_us: Vec<(String, u64)>) -> Ready {
    let read = |p| std::fs::read_to_string(p).unwrap_or_default();
    Ready {
        protocol: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        uptime_ms: procfs::uptime_ms(&read("/proc/uptime")).unwrap_or(0),
        phases_us,
    }
}
