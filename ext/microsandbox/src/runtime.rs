//! The tokio runtime shared by all calls of this process, rebuilt after `fork`.
//!
//! A runtime's worker threads do not survive `fork`; a child that touched the parent's
//! runtime would hang. So the runtime is keyed by pid: a forked child builds its own and
//! leaks (never drops) the inherited one, whose threads only existed in the parent.
//!
//! No lock: [`get`] runs without the GVL on any Ruby thread, and a lock held by one of
//! them at the moment another `fork`s would stay held forever in the child. The current
//! runtime sits behind an atomic pointer to a leaked entry (one per process lifetime).

use std::sync::atomic::{AtomicPtr, Ordering};

use tokio::runtime::Runtime;

struct Entry {
    pid: u32,
    rt: Runtime,
}

static CURRENT: AtomicPtr<Entry> = AtomicPtr::new(std::ptr::null_mut());

/// The runtime for the current process.
pub fn get() -> &'static Runtime {
    let pid = std::process::id();
    loop {
        let cur = CURRENT.load(Ordering::Acquire);
        // SAFETY: entries are leaked, never freed, so a loaded pointer stays valid.
        if let Some(e) = unsafe { cur.as_ref() } {
            if e.pid == pid {
                return &e.rt;
            }
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("microsandbox")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime");
        let fresh = Box::into_raw(Box::new(Entry { pid, rt }));
        match CURRENT.compare_exchange(cur, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // The replaced entry (the parent's, if any) is leaked on purpose.
            Ok(_) => return unsafe { &(*fresh).rt },
            Err(_) => {
                // Another thread of this process installed one first: use that one.
                // SAFETY: `fresh` was never shared.
                let Entry { rt, .. } = *unsafe { Box::from_raw(fresh) };
                rt.shutdown_background();
            }
        }
    }
}
