//! Small helpers shared by every module: poison-free locking, named threads, console logging.

use std::io;
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

/// Locks `m`, ignoring poison: a panicked worker thread must not take PID 1 down with it,
/// and every structure we guard stays consistent across a panic (single-step updates).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Worker threads only move bytes; a small stack keeps hundreds of sessions cheap.
const STACK: usize = 256 * 1024;

/// Spawns a named worker thread.
pub fn spawn<F: FnOnce() + Send + 'static>(name: &str, f: F) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name.to_string())
        .stack_size(STACK)
        .spawn(f)
}

/// Prints one line to the console (PID 1's stderr is `/dev/console`).
macro_rules! log {
    ($($arg:tt)*) => { eprintln!("msb-agent: {}", format_args!($($arg)*)) };
}
pub(crate) use log;
