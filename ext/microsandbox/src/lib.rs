//! `microsandbox_rb`: the thin magnus layer between Ruby and the engine.
//!
//! Defines `Microsandbox::Native` (module functions) and `Microsandbox::Native::Sandbox`.
//! Conversions happen here with the GVL held; every engine call then runs in
//! [`gvl::run`], without the GVL and cancellable by Ruby interrupts. The idiomatic API
//! lives in `lib/microsandbox/*.rb`.

mod errors;
mod exec_stream;
mod fork;
mod fs;
mod gvl;
mod image;
mod install;
mod logs;
mod metrics;
mod network;
mod runtime;
mod sandbox;
mod snapshot;
mod volume;

use magnus::{function, method, prelude::*, Error, Ruby};

#[magnus::init]
fn init(ruby: &Ruby) -> Result<(), Error> {
    let top = ruby.define_module("Microsandbox")?;
    let native = top.define_module("Native")?;
    native.define_singleton_method("version", function!(native_version, 0))?;
    native.define_singleton_method("install", function!(install::install, 4))?;
    native.define_singleton_method("installed?", function!(install::installed, 3))?;
    native.define_singleton_method("check_network_policy", function!(network::check_network_policy, 1))?;
    native.define_singleton_method("check_dns_config", function!(network::check_dns_config, 1))?;

    let class = native.define_class("Sandbox", ruby.class_object())?;
    class.define_singleton_method("create", function!(sandbox::RbSandbox::create, 2))?;
    class.define_singleton_method("start", function!(sandbox::RbSandbox::start, 4))?;
    class.define_singleton_method("get", function!(sandbox::RbSandbox::get, 2))?;
    class.define_singleton_method("list_json", function!(sandbox::RbSandbox::list_json, 1))?;
    class.define_singleton_method("list_records_json", function!(sandbox::RbSandbox::list_records_json, 1))?;
    class.define_singleton_method("record_json", function!(sandbox::RbSandbox::record_json, 2))?;
    class.define_method("last_stop_json", method!(sandbox::RbSandbox::last_stop_json, 0))?;
    class.define_singleton_method("remove", function!(sandbox::RbSandbox::remove, 2))?;
    class.define_method("labels_json", method!(sandbox::RbSandbox::labels_json, 0))?;
    class.define_method("owns_lifecycle?", method!(sandbox::RbSandbox::owns_lifecycle, 0))?;
    class.define_method("detach", method!(sandbox::RbSandbox::detach, 0))?;
    class.define_method("metrics_json", method!(metrics::metrics_json, 0))?;
    class.define_method("logs_json", method!(logs::logs_json, 5))?;
    class.define_method("log_follow", method!(logs::log_follow, 4))?;
    class.define_method("name", method!(sandbox::RbSandbox::name, 0))?;
    class.define_method("shell", method!(sandbox::RbSandbox::shell, 0))?;
    class.define_method("info_json", method!(sandbox::RbSandbox::info_json, 0))?;
    class.define_method("running?", method!(sandbox::RbSandbox::is_running, 0))?;
    class.define_method("draining?", method!(sandbox::RbSandbox::is_draining, 0))?;
    class.define_method("exec", method!(sandbox::RbSandbox::exec, 9))?;
    class.define_method("exec_stream", method!(sandbox::RbSandbox::exec_stream, 10))?;
    class.define_method("stop", method!(sandbox::RbSandbox::stop, 1))?;
    class.define_method("kill", method!(sandbox::RbSandbox::kill, 0))?;
    class.define_method("pause", method!(sandbox::RbSandbox::pause, 1))?;
    class.define_method("fork_sandbox", method!(sandbox::RbSandbox::fork_sandbox, 1))?;
    class.define_method("request_stop", method!(sandbox::RbSandbox::request_stop, 1))?;
    class.define_method("request_drain", method!(sandbox::RbSandbox::request_drain, 2))?;
    class.define_method("request_kill", method!(sandbox::RbSandbox::request_kill, 0))?;
    class.define_method("wait_until_stopped", method!(sandbox::RbSandbox::wait_until_stopped, 1))?;

    native.define_singleton_method("all_metrics_json", function!(metrics::all_metrics_json, 1))?;
    native.define_singleton_method("image_list_json", function!(image::list_json, 1))?;
    native.define_singleton_method("image_inspect_json", function!(image::inspect_json, 2))?;
    native.define_singleton_method("image_remove", function!(image::remove, 3))?;
    native.define_singleton_method("image_prune", function!(image::prune, 1))?;
    native.define_singleton_method("volume_create", function!(volume::create, 3))?;
    native.define_singleton_method("volume_get", function!(volume::get, 2))?;
    native.define_singleton_method("volume_list", function!(volume::list, 1))?;
    native.define_singleton_method("volume_remove", function!(volume::remove, 2))?;
    native.define_singleton_method("volume_fs", function!(volume::fs, 5))?;
    native.define_singleton_method("snapshot", function!(snapshot::call, 3))?;
    native.define_singleton_method("set_virtiofsd_path", function!(volume::set_virtiofsd_path, 1))?;
    let pull = native.define_class("PullSession", ruby.class_object())?;
    pull.define_singleton_method("start", function!(image::RbPullSession::start, 3))?;
    pull.define_method("next_event", method!(image::RbPullSession::next_event, 0))?;

    // Guest filesystem (fs.rs).
    class.define_method("fs_read", method!(sandbox::RbSandbox::fs_read, 1))?;
    class.define_method("fs_write", method!(sandbox::RbSandbox::fs_write, 2))?;
    class.define_method("fs_exists", method!(sandbox::RbSandbox::fs_exists, 1))?;
    class.define_method("fs_mkdir", method!(sandbox::RbSandbox::fs_mkdir, 2))?;
    class.define_method("fs_remove", method!(sandbox::RbSandbox::fs_remove, 2))?;
    class.define_method("fs_copy", method!(sandbox::RbSandbox::fs_copy, 2))?;
    class.define_method("fs_rename", method!(sandbox::RbSandbox::fs_rename, 2))?;
    class.define_method("fs_list", method!(sandbox::RbSandbox::fs_list, 1))?;
    class.define_method("fs_stat", method!(sandbox::RbSandbox::fs_stat, 1))?;
    class.define_method("fs_copy_from_host", method!(sandbox::RbSandbox::fs_copy_from_host, 2))?;
    class.define_method("fs_copy_to_host", method!(sandbox::RbSandbox::fs_copy_to_host, 2))?;
    class.define_method("fs_read_stream", method!(sandbox::RbSandbox::fs_read_stream, 1))?;
    class.define_method("fs_write_stream", method!(sandbox::RbSandbox::fs_write_stream, 1))?;
    let fs_read = native.define_class("FsReadStream", ruby.class_object())?;
    fs_read.define_method("next_chunk", method!(fs::RbFsReadStream::next_chunk, 0))?;
    fs_read.define_method("close", method!(fs::RbFsReadStream::close, 0))?;
    let fs_write = native.define_class("FsWriteSink", ruby.class_object())?;
    fs_write.define_method("write", method!(fs::RbFsWriteSink::write, 1))?;
    fs_write.define_method("finish", method!(fs::RbFsWriteSink::finish, 0))?;
    fs_write.define_method("close", method!(fs::RbFsWriteSink::close, 0))?;

    let follower = native.define_class("LogFollower", ruby.class_object())?;
    follower.define_method("poll_json", method!(logs::RbLogFollower::poll_json, 0))?;

    let stream = native.define_class("ExecStream", ruby.class_object())?;
    stream.define_method("next_event", method!(exec_stream::RbExecStream::next_event, 0))?;
    stream.define_method("write_stdin", method!(exec_stream::RbExecStream::write_stdin, 1))?;
    stream.define_method("close_stdin", method!(exec_stream::RbExecStream::close_stdin, 0))?;
    stream.define_method("signal", method!(exec_stream::RbExecStream::signal, 1))?;
    stream.define_method("resize", method!(exec_stream::RbExecStream::resize, 2))?;
    stream.define_method("close", method!(exec_stream::RbExecStream::close, 0))?;
    Ok(())
}

fn native_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
