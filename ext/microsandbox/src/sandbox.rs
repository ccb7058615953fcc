//! `Microsandbox::Native::Sandbox`: owns one engine sandbox.

use std::sync::Arc;
use std::time::Duration;

use magnus::{prelude::*, Error, RArray, RString, Ruby, Value};
use std::path::Path;

use microsandbox::sandbox::Placement;
use microsandbox::paths::Home;
use microsandbox::{ExecCall, Sandbox, SandboxConfig};

use crate::errors::to_ruby;
use crate::fork::ProcessLocal;

#[magnus::wrap(class = "Microsandbox::Native::Sandbox", free_immediately, size)]
pub struct RbSandbox {
    /// The handle this process made. In a forked child it is never used or dropped.
    made: ProcessLocal<Arc<Sandbox>>,
    /// In a forked child: its own non-owning handle on the same sandbox
    /// ([`Sandbox::fork_view`]), made on first use. Itself process-local, so a
    /// grandchild makes its own. Locked only with the GVL held, so no thread can hold it
    /// at the moment of a Ruby `fork`.
    view: std::sync::Mutex<Option<ProcessLocal<Arc<Sandbox>>>>,
}

impl RbSandbox {
    fn wrap(sb: Sandbox) -> RbSandbox {
        RbSandbox { made: ProcessLocal::new(Arc::new(sb)), view: std::sync::Mutex::new(None) }
    }

    /// The engine handle for calls from this process: the one it made, or in a forked
    /// child a view that owns nothing of the parent's.
    pub(crate) fn handle(&self) -> Arc<Sandbox> {
        if let Some(sb) = self.made.get() {
            return sb.clone();
        }
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sb) = view.as_ref().and_then(ProcessLocal::get) {
            return sb.clone();
        }
        let fresh = Arc::new(self.made.inherited().fork_view());
        // An inherited view (from a parent that was itself a child) is leaked by
        // ProcessLocal when replaced here.
        *view = Some(ProcessLocal::new(fresh.clone()));
        fresh
    }

    /// True in a forked child on a sandbox its parent made or opened: lifecycle calls
    /// (stop, kill, request_*, detach) do nothing there; the VM is the parent's.
    pub(crate) fn is_inherited(&self) -> bool {
        self.made.is_inherited()
    }
}

/// A record as Ruby's `SandboxHandle` reads it: plus `last_stop`, and `draining` (a drain
/// was asked of the running sandbox, see `drain_marker`).
fn record_with_stop(
    home: &Home,
    rec: microsandbox::sandbox::SandboxRecord,
    stop: Option<microsandbox::sandbox::stop_record::StopRecord>,
) -> serde_json::Value {
    let draining = microsandbox::sandbox::drain_marker::of_record(home, &rec);
    let mut v = serde_json::to_value(&rec).expect("record serializes");
    v["last_stop"] = serde_json::to_value(stop).expect("stop record serializes");
    v["draining"] = draining.into();
    v
}

fn resolve_home(ruby: &Ruby, home: &Option<String>) -> Result<Home, Error> {
    Home::resolve(home.as_deref().map(Path::new)).map_err(|e| to_ruby(ruby, e))
}

#[allow(clippy::too_many_arguments)]
fn exec_call(
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    timeout: Option<f64>,
    stdin: Option<Vec<u8>>,
    user: Option<String>,
    rlimits: Vec<(String, u64, u64)>,
    tty: Option<(u16, u16)>,
) -> ExecCall {
    let rlimits = rlimits
        .into_iter()
        .map(|(resource, soft, hard)| microsandbox_protocol::Rlimit { resource, soft, hard })
        .collect();
    let tty = tty.map(|(rows, cols)| microsandbox_protocol::WinSize { rows, cols });
    ExecCall { program, args, env, cwd, timeout: timeout.map(secs), stdin, user, rlimits, tty }
}

/// Seconds from Ruby as a Duration. Ruby validates them, but this must not panic on any
/// f64: NaN and negatives are 0, values too large for a Duration (infinity) are ~136 years.
fn secs(t: f64) -> Duration {
    Duration::try_from_secs_f64(t.max(0.0)).unwrap_or(Duration::from_secs(u64::from(u32::MAX)))
}

impl RbSandbox {
    /// `create(config_json, placement_json)`: boots a sandbox. Ruby has validated types.
    pub fn create(ruby: &Ruby, config_json: String, placement_json: String) -> Result<RbSandbox, Error> {
        let bad = |e: serde_json::Error| {
            to_ruby(ruby, microsandbox::Error::InvalidConfig(format!("invalid sandbox options: {e}")))
        };
        let cfg: SandboxConfig = serde_json::from_str(&config_json).map_err(bad)?;
        let place: Placement = serde_json::from_str(&placement_json).map_err(bad)?;
        let sb = crate::gvl::run(Sandbox::create(cfg, place)).map_err(|e| to_ruby(ruby, e))?;
        Ok(RbSandbox::wrap(sb))
    }

    /// `start(home, name, detached, again_json)`: boots a stopped sandbox again;
    /// `again_json` = `{"secrets": [...], "intercept_ca_key": ...}`, the values that are
    /// never stored and must be given again.
    pub fn start(ruby: &Ruby, home: Option<String>, name: String, detached: bool, again_json: String) -> Result<RbSandbox, Error> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Again {
            #[serde(default)]
            secrets: Vec<microsandbox::sandbox::secrets::SecretEntry>,
            #[serde(default)]
            intercept_ca_key: Option<microsandbox::sandbox::secrets::SecretText>,
        }
        let again: Again = serde_json::from_str(&again_json).map_err(|e| {
            to_ruby(ruby, microsandbox::Error::InvalidConfig(format!("invalid start options (line {}, column {})", e.line(), e.column())))
        })?;
        let sb = crate::gvl::run(async move {
            Sandbox::start(home.as_deref().map(Path::new), &name, detached, again.secrets, again.intercept_ca_key).await
        })
            .map_err(|e| to_ruby(ruby, e))?;
        Ok(RbSandbox::wrap(sb))
    }

    /// `get(home, name)`: a handle on an existing sandbox.
    pub fn get(ruby: &Ruby, home: Option<String>, name: String) -> Result<RbSandbox, Error> {
        let sb = Sandbox::get(home.as_deref().map(Path::new), &name).map_err(|e| to_ruby(ruby, e))?;
        Ok(RbSandbox::wrap(sb))
    }

    /// `record_json(home, name)`: one sandbox record, with `last_stop` (how its last run
    /// ended, null while it runs).
    pub fn record_json(ruby: &Ruby, home: Option<String>, name: String) -> Result<String, Error> {
        let (rec, stop) = Sandbox::record(home.as_deref().map(Path::new), &name).map_err(|e| to_ruby(ruby, e))?;
        Ok(record_with_stop(&resolve_home(ruby, &home)?, rec, stop).to_string())
    }

    /// `list_records_json(home)`: every sandbox record, each with `last_stop`.
    pub fn list_records_json(ruby: &Ruby, home: Option<String>) -> Result<String, Error> {
        let recs = Sandbox::list_with_stops(home.as_deref().map(Path::new)).map_err(|e| to_ruby(ruby, e))?;
        let h = resolve_home(ruby, &home)?;
        Ok(serde_json::Value::Array(recs.into_iter().map(|(r, s)| record_with_stop(&h, r, s)).collect()).to_string())
    }

    /// `last_stop_json`: how the last run ended, as JSON, or nil while running.
    pub fn last_stop_json(&self) -> Option<String> {
        self.handle().last_stop().map(|s| serde_json::to_string(&s).unwrap())
    }

    /// `list_json(home)`: every sandbox record as JSON.
    pub fn list_json(ruby: &Ruby, home: Option<String>) -> Result<String, Error> {
        let recs = Sandbox::list(home.as_deref().map(Path::new)).map_err(|e| to_ruby(ruby, e))?;
        Ok(serde_json::to_string(&recs).unwrap())
    }

    /// `remove(home, name)`: deletes a stopped sandbox.
    pub fn remove(ruby: &Ruby, home: Option<String>, name: String) -> Result<Value, Error> {
        Sandbox::remove(home.as_deref().map(Path::new), &name).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    pub fn labels_json(&self) -> String {
        serde_json::to_string(self.handle().labels()).unwrap()
    }

    pub fn owns_lifecycle(&self) -> bool {
        self.handle().owns_lifecycle()
    }

    pub fn detach(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        if rb_self.is_inherited() {
            return Ok(ruby.qnil().as_value());
        }
        let sb = rb_self.handle();
        crate::gvl::run(async move { sb.detach().await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    pub fn name(&self) -> String {
        self.handle().name().to_string()
    }

    pub fn shell(&self) -> String {
        self.handle().shell().to_string()
    }

    pub fn info_json(&self) -> String {
        serde_json::to_string(self.handle().info()).unwrap()
    }

    pub fn is_running(&self) -> bool {
        self.handle().is_running()
    }

    /// `draining?`: running, and a drain was asked of it (by any process).
    pub fn is_draining(&self) -> bool {
        self.handle().is_draining()
    }

    /// `exec(program, args, env_pairs, cwd, timeout_secs, stdin, user, rlimits, tty)` →
    /// `[exit_code, signal, stdout, stderr, stdin_error]` with binary strings (the last nil
    /// or a message); `tty` is nil or `[rows, cols]`.
    #[allow(clippy::too_many_arguments)]
    pub fn exec(
        ruby: &Ruby,
        rb_self: &Self,
        program: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout: Option<f64>,
        stdin: Option<RString>,
        user: Option<String>,
        rlimits: Vec<(String, u64, u64)>,
        tty: Option<(u16, u16)>,
    ) -> Result<RArray, Error> {
        // Copy Ruby bytes out before the GVL is released: GC may move them.
        let stdin = stdin.map(|s| unsafe { s.as_slice() }.to_vec());
        let call = exec_call(program, args, env, cwd, timeout, stdin, user, rlimits, tty);
        let sb = rb_self.handle();
        let res = crate::gvl::run(async move { sb.exec(call).await }).map_err(|e| to_ruby(ruby, e))?;
        let out = ruby.ary_new_capa(5);
        out.push(res.code)?;
        out.push(res.signal)?;
        out.push(ruby.str_from_slice(&res.stdout))?;
        out.push(ruby.str_from_slice(&res.stderr))?;
        out.push(res.stdin_error.as_deref().map(|m| ruby.str_new(m)))?;
        Ok(out)
    }

    /// `exec_stream(program, args, env_pairs, cwd, timeout_secs, stdin, stdin_pipe, user,
    /// rlimits, tty)` → `Native::ExecStream`.
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
        user: Option<String>,
        rlimits: Vec<(String, u64, u64)>,
        tty: Option<(u16, u16)>,
    ) -> Result<crate::exec_stream::RbExecStream, Error> {
        let stdin = stdin.map(|s| unsafe { s.as_slice() }.to_vec());
        let call = exec_call(program, args, env, cwd, timeout, stdin, user, rlimits, tty);
        let sb = rb_self.handle();
        let stream = crate::gvl::run(async move { sb.exec_stream(call, stdin_pipe).await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(crate::exec_stream::RbExecStream::new(stream))
    }

    // Lifecycle calls (stop, kill, request_*, detach) do nothing in a forked child on a
    // sandbox its parent made or opened: the VM belongs to the parent.

    /// `stop(timeout_secs)` → true when the guest shut down cleanly.
    pub fn stop(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<bool, Error> {
        if rb_self.is_inherited() {
            return Ok(false);
        }
        let sb = rb_self.handle();
        crate::gvl::run(async move { sb.stop(secs(timeout)).await }).map_err(|e| to_ruby(ruby, e))
    }

    pub fn request_stop(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<Value, Error> {
        if rb_self.is_inherited() {
            return Ok(ruby.qnil().as_value());
        }
        let sb = rb_self.handle();
        crate::gvl::run(async move { sb.request_stop(secs(timeout)).await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    /// `request_drain(drain_timeout_secs_or_nil, stop_timeout_secs)`.
    pub fn request_drain(ruby: &Ruby, rb_self: &Self, drain_timeout: Option<f64>, stop_timeout: f64) -> Result<Value, Error> {
        if rb_self.is_inherited() {
            return Ok(ruby.qnil().as_value());
        }
        let sb = rb_self.handle();
        crate::gvl::run(async move { sb.request_drain(drain_timeout.map(secs), secs(stop_timeout)).await })
            .map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    pub fn request_kill(ruby: &Ruby, rb_self: &Self) -> Value {
        if !rb_self.is_inherited() {
            rb_self.handle().request_kill();
        }
        ruby.qnil().as_value()
    }

    /// `wait_until_stopped(timeout_secs_or_nil)` → true once stopped, false on timeout.
    pub fn wait_until_stopped(ruby: &Ruby, rb_self: &Self, timeout: Option<f64>) -> Result<bool, Error> {
        let sb = rb_self.handle();
        crate::gvl::run(async move { sb.wait_until_stopped(timeout.map(secs)).await }).map_err(|e| to_ruby(ruby, e))
    }

    /// `pause(timeout_secs)`: save the VM to disk and end it (see `Sandbox::pause`).
    pub fn pause(ruby: &Ruby, rb_self: &Self, timeout: f64) -> Result<Value, Error> {
        if rb_self.is_inherited() {
            return Ok(ruby.qnil().as_value());
        }
        let sb = rb_self.handle();
        crate::gvl::run(async move { sb.pause(secs(timeout)).await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }

    /// `fork_sandbox(name)`: a running copy of this running sandbox (see `Sandbox::fork`).
    pub fn fork_sandbox(ruby: &Ruby, rb_self: &Self, name: String) -> Result<RbSandbox, Error> {
        if rb_self.is_inherited() {
            return Err(to_ruby(ruby, microsandbox::Error::InvalidConfig(
                "a forked child process cannot fork its parent's sandbox; create or fork sandboxes of its own".into(),
            )));
        }
        let sb = rb_self.handle();
        let child = crate::gvl::run(async move { sb.fork(&name).await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(RbSandbox::wrap(child))
    }

    pub fn kill(ruby: &Ruby, rb_self: &Self) -> Result<Value, Error> {
        if rb_self.is_inherited() {
            return Ok(ruby.qnil().as_value());
        }
        let sb = rb_self.handle();
        crate::gvl::run(async move { sb.kill().await }).map_err(|e| to_ruby(ruby, e))?;
        Ok(ruby.qnil().as_value())
    }
}
