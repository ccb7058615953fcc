//! `Microsandbox::Native::Sandbox`: owns one engine sandbox.

use std::sync::Arc;
use std::time::Duration;

use magnus::{prelude::*, Error, RArray, RString, Ruby, Value};
use microsandbox::{ExecCall, Sandbox, SandboxConfig};

use crate::errors::to_ruby;

#[magnus::wrap(class = "Microsandbox::Native::Sandbox", free_immediately, size)]
pub struct RbSandbox {
    inner: Arc<Sandbox>,
}

fn secs(t: f64) -> Duration {
    Duration::from_secs_f64(t.max(0.0))
}

impl RbSandbox {
    /// `create(config_json)`: boots a sandbox. The Ruby layer has validated types.
    pub fn create(ruby: &Ruby, config_json: String) -> Result<RbSandbox, Error> {
        let cfg: SandboxConfig = serde_json::from_str(&config_json).map_err(|e| {
            to_ruby(ruby, microsandbox::Error::InvalidConfig(format!("invalid sandbox options: {e}")))
        })?;
        let sb = crate::gvl::run(Sandbox::create(cfg)).map_err(|e| to_ruby(ruby, e))?;
        Ok(RbSandbox { inner: Arc::new(sb) })
    }

    pub fn name(&self) -> String {
        self.inner.name().to_string()
    }

    pub fn info_json(&self) -> String {
        serde_json::to_string(self.inner.info()).unwrap()
    }

    pub fn is_running(&self) -> bool {
        self.inner.is_running()
    }

    /// `exec(program, args, env_pairs, cwd, timeout_secs, stdin)` →
    /// `[exit_code, signal, stdout, stderr]` with binary strings.
    pub fn exec(
        ruby: &Ruby,
        rb_self: &Self,
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout: Option<f64>,
        stdin: Option<RString>,
    ) -> Result<RArray, Error> {
        // Copy Ruby bytes out before the GVL is released: GC may move them.
        let stdin = stdin.map(|s| unsafe { s.as_slice() }.to_vec());
        let call = ExecCall { program, args, env, cwd, timeout: timeout.map(secs), stdin };
        let sb = rb_self.inner.clone();
        let res = crate::gvl::run(async move { sb.exec(call).await }).map_err(|e| to_ruby(ruby, e))?;
        let out = ruby.ary_new_capa(4);
        out.push(res.code)?;
        out.push(res.signal)?;
        out.push(ruby.str_from_slice(&res.stdout))?;
        out.push(ruby.str_from_slice(&res.stderr))?;
        Ok(out)
    }

    /// `exec_stream(program, args, env_pairs, cwd, timeout_secs, stdin, stdin_pipe)` →
    /// `Native::ExecStream`.
    #[allow(clippy::too_many_arguments)]
    pub fn exec_stream(
        ruby: &Ruby,
        rb_self: &Self,
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout: Option<f64>,
        stdin: Option<RString>,
        stdin_pipe: bool,
    ) -> Result<crate::exec_stream::RbExecStream, Error> {
        let stdin = stdin.map(|s| unsafe { s.as_slice() }.to_vec());
        let call = ExecCall { program, args, env, cwd, timeout: timeout.map(secs), stdin };
        let sb = rb_self.inner.clone();
        let stream = crate::gvl::run(async move { sb.exec_stream(call, stdin_pipe).await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(crate::exec_stream::RbExecStream::new(stream))
    }

    /// `stop(timeout_secs)` → true when the guest shut down cleanly.
    pub fn stop(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<bool, Error> {
        let sb = rb_self.inner.clone();
        crate::gvl::run(async move { sb.stop(secs(timeout)).await }).map_err(|e| to_ruby(ruby, e))
    }

    pub fn kill(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        let sb = rb_self.inner.clone();
        crate::gvl::run(async move { sb.kill().await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }
}
