//! Objects this extension hands to Ruby, and `fork`.
//!
//! A forked child inherits every Ruby object, and with them the engine objects behind
//! them: a sandbox's supervisor handle (`kill_on_drop`), sockets registered with the
//! parent's tokio reactor — whose epoll instance the child *shares* — and tasks of the
//! parent's runtime, whose threads do not exist in the child. Dropping any of them in the
//! child (GC, finalizers, Ruby's teardown at exit) would act on the parent: kill its VM,
//! deregister its sockets from its epoll set, or take locks nobody will release.
//!
//! [`ProcessLocal`] makes that impossible by construction: it remembers the pid that
//! created the value and, dropped in any other process, leaks it. Memory of a leaked value
//! belongs to the child's copy of the heap and disappears with the child; file
//! descriptors are the kernel's copies and close at its exit (or `exec`, all being
//! `CLOEXEC`), which does not affect the parent's copies.

use std::mem::ManuallyDrop;

/// A value that is used and dropped only in the process that created it.
pub struct ProcessLocal<T> {
    pid: u32,
    value: ManuallyDrop<T>,
}

impl<T> ProcessLocal<T> {
    pub fn new(value: T) -> ProcessLocal<T> {
        ProcessLocal { pid: std::process::id(), value: ManuallyDrop::new(value) }
    }

    /// The value, or `None` in a process that inherited it through `fork`.
    pub fn get(&self) -> Option<&T> {
        (!self.is_inherited()).then_some(&*self.value)
    }

    /// The value even in a forked child: only for reading plain data that involves no
    /// lock, socket or task of the parent.
    pub fn inherited(&self) -> &T {
        &self.value
    }

    pub fn is_inherited(&self) -> bool {
        self.pid != std::process::id()
    }
}

impl<T> Drop for ProcessLocal<T> {
    fn drop(&mut self) {
        if !self.is_inherited() {
            // SAFETY: dropped exactly once, here; never used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.value) };
        }
    }
}

/// What a call on an object inherited through `fork` raises (streams, uploads, pulls:
/// their connection and task belong to the parent; reading them here would steal its data).
pub fn inherited_error(what: &str) -> microsandbox::Error {
    microsandbox::Error::InheritedHandle(format!(
        "this {what} was opened by another process (before fork); a forked child cannot use it. \
         Open a new one in this process"
    ))
}
