//! Lock files: an exclusive `flock` on a file created on demand, held as long as the
//! returned guard lives. The lock ends with the process (even on `kill -9`), so a crashed
//! holder never leaves a stale lock, only the file.

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};

/// Opens (creating it if needed) and exclusively locks `path`, waiting for the holder.
pub fn lock_exclusive(path: &Path) -> Result<Flock<File>> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .context(|| format!("opening lock {}", path.display()))?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, errno)| Error::Io { context: format!("locking {}", path.display()), source: errno.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_waits_for_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = lock_exclusive(&path).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err());
        drop(first);
        drop(lock_exclusive(&path).unwrap());
    }
}
