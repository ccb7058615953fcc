//! `Microsandbox::Native::Sandbox#logs_json`.

use magnus::{Error, Ruby};
use microsandbox::sandbox::logs::{Cursor, LogQuery};

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
