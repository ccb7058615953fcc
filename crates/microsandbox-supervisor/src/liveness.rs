//! Watches the owner's liveness pipe: EOF means the owning process is gone.

use std::os::fd::{FromRawFd, OwnedFd};

use microsandbox::sandbox::spec::LIVENESS_FD_ENV;
use tokio::sync::watch;

/// Becomes true once the owner is gone. Started once per process: the fd is taken here.
pub fn watch_owner() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let Some(fd) = std::env::var(LIVENESS_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok()) else {
        // Detached sandbox: no owner to watch. Keep the sender alive so the value never flips.
        std::mem::forget(tx);
        return rx;
    };
    // SAFETY: the engine hands us this fd; nothing else in this process uses it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    std::thread::spawn(move || {
        let mut file = std::fs::File::from(owned);
        let mut buf = [0u8; 64];
        loop {
            match std::io::Read::read(&mut file, &mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = tx.send(true);
    });
    rx
}

/// Resolves when `rx` says the owner is gone.
pub async fn owner_gone(mut rx: watch::Receiver<bool>) {
    if rx.wait_for(|gone| *gone).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves when the owner is gone, unless the sandbox was detached first (then never).
pub async fn owner_gone_unless_detached(owner: watch::Receiver<bool>, detached: watch::Receiver<bool>) {
    let mut watch_detach = detached.clone();
    tokio::select! {
        _ = owner_gone(owner) => {
            if *detached.borrow() {
                std::future::pending::<()>().await;
            }
        }
        _ = watch_detach.wait_for(|d| *d) => std::future::pending::<()>().await,
    }
}
