//! Drives the sandbox's network stack (`microsandbox_network::stack`) on its own thread.
//!
//! The thread ends by itself when QEMU closes its end of the NIC socketpair (the VM
//! ended), so the supervisor never has to stop it.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use microsandbox_network::stack::ports::Listeners;
use microsandbox_network::stack::{Counters, LogFn, Stack};
use microsandbox_network::NetworkConfig;

/// Starts the stack for `link`; failures are reported on stderr (the supervisor log).
/// Refusals and other notes of the stack go to the sandbox log as `system` entries —
/// unless `log` is `None` (`quiet_logs: true`: the reference gem's "no runtime logs").
/// `listeners` are the published ports, already bound (`ports::bind`); the thread owns
/// them from here on, so they close when the stack ends.
pub fn start(link: UnixStream, cfg: NetworkConfig, listeners: Listeners, log: Option<crate::logbook::LogSink>) -> Arc<Counters> {
    let counters = Arc::new(Counters::default());
    let c = counters.clone();
    let log: LogFn = match log {
        Some(log) => Box::new(move |line: &str| log.record("system", None, line.as_bytes())),
        None => Box::new(|_: &str| {}),
    };
    let spawned = std::thread::Builder::new().name("msb-net".into()).spawn(move || {
        let result = Stack::new(link, cfg, c, log)
            .map(|stack| match crate::interception::get() {
                Some(i) => stack.with_interception(i, Box::new(crate::interception::terminate)),
                None => stack,
            })
            .map(|stack| stack.with_listeners(listeners))
            .and_then(Stack::run);
        if let Err(e) = result {
            eprintln!("msb: the network stack stopped: {e}");
        }
    });
    if let Err(e) = spawned {
        eprintln!("msb: cannot start the network stack thread: {e}");
    }
    counters
}
