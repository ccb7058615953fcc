//! `Microsandbox::Native::ExecStream`: one streaming exec.
//!
//! The stream sits behind an async mutex so `next_event` (which waits without the GVL)
//! and `close` never race; stdin and signals go through a separate [`ExecControl`] so
//! they work while another thread waits for output.

use std::sync::Arc;

use magnus::{prelude::*, Error, RArray, RString, Ruby, Value};
use microsandbox::sandbox::ExecControl;
use microsandbox::sandbox::{ExecEvent, ExecStream};
use tokio::sync::Mutex;

use crate::errors::to_ruby;
use crate::fork::{inherited_error, ProcessLocal};

/// Both fields are the parent's in a forked child: never used or dropped there
/// (fork.rs); every call but `close` raises `InheritedHandleError`.
#[magnus::wrap(class = "Microsandbox::Native::ExecStream", free_immediately, size)]
pub struct RbExecStream {
    stream: ProcessLocal<Arc<Mutex<Option<ExecStream>>>>,
    control: ProcessLocal<ExecControl>,
}

impl RbExecStream {
    pub fn new(stream: ExecStream) -> RbExecStream {
        let control = stream.control();
        RbExecStream { stream: ProcessLocal::new(Arc::new(Mutex::new(Some(stream)))), control: ProcessLocal::new(control) }
    }

    fn control(&self, ruby: &Ruby) -> Result<ExecControl, Error> {
        self.control.get().cloned().ok_or_else(|| to_ruby(ruby, inherited_error("exec stream")))
    }

    /// `nil` at the end, else `[:started, pid]`, `[:stdout, bytes]`, `[:stderr, bytes]`,
    /// `[:stdin_error, message, errno]`, `[:exited, code, signal]` or
    /// `[:failed, message, errno]`.
    pub fn next_event(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        let stream = rb_self.stream.get().cloned().ok_or_else(|| to_ruby(ruby, inherited_error("exec stream")))?;
        let ev = crate::gvl::run(async move {
            let mut guard = stream.lock().await;
            match guard.as_mut() {
                Some(s) => s.next().await.transpose(),
                None => Ok(None),
            }
        })
        .map_err(|e| to_ruby(ruby, e))?;
        let Some(ev) = ev else { return Ok(ruby.qnil().as_value()) };
        let out: RArray = ruby.ary_new_capa(3);
        match ev {
            ExecEvent::Started { pid } => {
                out.push(ruby.to_symbol("started"))?;
                out.push(pid)?;
            }
            ExecEvent::Stdout(b) => {
                out.push(ruby.to_symbol("stdout"))?;
                out.push(ruby.str_from_slice(&b))?;
            }
            ExecEvent::Stderr(b) => {
                out.push(ruby.to_symbol("stderr"))?;
                out.push(ruby.str_from_slice(&b))?;
            }
            ExecEvent::StdinError { errno, message } => {
                out.push(ruby.to_symbol("stdin_error"))?;
                out.push(ruby.str_new(&message))?;
                out.push(errno)?;
            }
            ExecEvent::Exited { code, signal } => {
                out.push(ruby.to_symbol("exited"))?;
                out.push(code)?;
                out.push(signal)?;
            }
            ExecEvent::Failed { errno, message } => {
                out.push(ruby.to_symbol("failed"))?;
                out.push(ruby.str_new(&message))?;
                out.push(errno)?;
            }
        }
        Ok(out.as_value())
    }

    pub fn write_stdin(ruby: &Ruby, rb_self: &Self, data: RString) -> Result<Value, Error> {
        // Copy before the GVL is released.
        let bytes = unsafe { data.as_slice() }.to_vec();
        let control = rb_self.control(ruby)?;
        crate::gvl::run(async move { control.write_stdin(bytes).await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    pub fn close_stdin(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        let control = rb_self.control(ruby)?;
        crate::gvl::run(async move { control.close_stdin().await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    pub fn signal(ruby: &Ruby, rb_self: &Self, signal: i32) -> Result<Value, Error> {
        let control = rb_self.control(ruby)?;
        crate::gvl::run(async move { control.signal(signal).await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    /// Ruby has checked both are Integers in 1..=65535.
    pub fn resize(ruby: &Ruby, rb_self: &Self, rows: u16, cols: u16) -> Result<Value, Error> {
        let control = rb_self.control(ruby)?;
        crate::gvl::run(async move { control.resize(rows, cols).await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    /// Drops the stream: the command is killed if it still runs. Idempotent. In a forked
    /// child it does nothing (the stream is the parent's).
    pub fn close(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        let Some(stream) = rb_self.stream.get().cloned() else { return Ok(ruby.qnil().as_value()) };
        crate::gvl::run(async move {
            stream.lock().await.take();
            Ok(())
        })
        .map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }
}
