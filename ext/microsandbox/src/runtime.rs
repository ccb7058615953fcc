//! The tokio runtime shared by all calls of this process, rebuilt after `fork`.
//!
//! A runtime's worker threads do not survive `fork`; a child that touched the parent's
//! runtime would hang. So the runtime is keyed by pid: a forked child builds its own and
//! leaks (never drops) the inherited one, whose threads only existed in the parent.

use std::sync::{Arc, Mutex};

use tokio::runtime::Runtime;

static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// The runtime for the current process.
pub fn get() -> Arc<Runtime> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((owner, rt)) = slot.as_ref() {
        if *owner == pid {
            return rt.clone();
        }
    }
    if let Some(old) = slot.take() {
        std::mem::forget(old); // belongs to the parent process
    }
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("microsandbox")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime"),
    );
    *slot = Some((pid, rt.clone()));
    rt
}
