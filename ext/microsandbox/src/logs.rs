//! `Microsandbox::Native::Sandbox#logs_json`, `#log_follow` and
//! `Microsandbox::Native::LogFollower`.

use std::sync::{Arc, Mutex};

use magnus::{Error, RArray, Ruby};
use microsandbox::sandbox::logs::{Cursor, LogFollower, LogQuery};

use crate::errors::to_ruby;
use crate::sandbox::RbSandbox;

/// `logs_json(tail, since_ms, until_ms, after_cursor, sources)`: each of the first four may
/// be nil. Ruby has checked the types and signs.
pub fn logs_json(
    ruby: &Ruby,
    rb_self: &RbSandbox,
    tail: Option<usize>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    after: Option<String>,
    sources: Vec<String>,
) -> Result<String, Error> {
    let after = after.map(|c| Cursor::parse(&c)).transpose().map_err(|e| to_ruby(ruby, e))?;
    let q = LogQuery { tail, since_ms, until_ms, after, sources };
    let sb = rb_self.handle();
    // Reading and decoding up to three bounded files: done without the GVL.
    let entries = crate::gvl::run(async move { sb.logs_query(&q) }).map_err(|e| to_ruby(ruby, e))?;
    serde_json::to_string(&entries).map_err(|e| Error::new(ruby.exception_runtime_error(), e.to_string()))
}

/// A follower reading only what a sandbox logs after its history (`LogStream` with
/// `follow: true`). It reads files only, so it works in a forked child too.
#[magnus::wrap(class = "Microsandbox::Native::LogFollower", free_immediately, size)]
pub struct RbLogFollower {
    inner: Arc<Mutex<LogFollower>>,
}

impl RbLogFollower {
    /// `poll_json` → a JSON array of the entries logged since the last call.
    pub fn poll_json(ruby: &Ruby, rb_self: &Self) -> Result<String, Error> {
        let inner = rb_self.inner.clone();
        // Bounded file reads, done without the GVL.
        let entries = crate::gvl::run(async move { Ok(inner.lock().unwrap_or_else(|e| e.into_inner()).poll()) })
            .map_err(|e| to_ruby(ruby, e))?;
        serde_json::to_string(&entries).map_err(|e| Error::new(ruby.exception_runtime_error(), e.to_string()))
    }
}

/// `log_follow(since_ms, until_ms, after_cursor, sources)` → `[LogFollower, history_json]`.
pub fn log_follow(
    ruby: &Ruby,
    rb_self: &RbSandbox,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
    after: Option<String>,
    sources: Vec<String>,
) -> Result<RArray, Error> {
    let after = after.map(|c| Cursor::parse(&c)).transpose().map_err(|e| to_ruby(ruby, e))?;
    let q = LogQuery { tail: None, since_ms, until_ms, after, sources };
    let sb = rb_self.handle();
    let (follower, history) = crate::gvl::run(async move { sb.log_follower(&q) }).map_err(|e| to_ruby(ruby, e))?;
    let json = serde_json::to_string(&history).map_err(|e| Error::new(ruby.exception_runtime_error(), e.to_string()))?;
    let out = ruby.ary_new_capa(2);
    out.push(RbLogFollower { inner: Arc::new(Mutex::new(follower)) })?;
    out.push(json)?;
    Ok(out)
}
