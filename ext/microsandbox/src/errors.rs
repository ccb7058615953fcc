//! Engine errors → Ruby exceptions. The Ruby side owns the class hierarchy
//! (`Microsandbox::Error.build(code, message)`); this file only passes the stable code.

use magnus::{exception::ExceptionClass, prelude::*, Error, Exception, RModule, Ruby};

/// Converts an engine error into a Ruby exception. For a cancelled call, the pending
/// Ruby interrupt (Thread#kill, Timeout, Ctrl-C) is raised instead.
pub fn to_ruby(ruby: &Ruby, err: microsandbox::Error) -> Error {
    if matches!(err, microsandbox::Error::Cancelled) {
        if let Some(interrupt) = crate::gvl::take_pending_interrupt() {
            return interrupt;
        }
        if let Err(interrupt) = ruby.thread_check_ints() {
            return interrupt;
        }
    }
    build(ruby, err.code(), err.to_string())
}

/// The `Microsandbox::Error` subclass for `code`, carrying `message`.
pub fn build(ruby: &Ruby, code: &str, message: String) -> Error {
    let built = ruby
        .define_module("Microsandbox")
        .and_then(|m: RModule| m.const_get::<_, ExceptionClass>("Error"))
        .and_then(|class| class.funcall::<_, _, Exception>("build", (code, message.clone())));
    match built {
        Ok(exc) => Error::from(exc),
        Err(_) => Error::new(ruby.exception_runtime_error(), format!("{code}: {message}")),
    }
}
