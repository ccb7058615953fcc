//! `Microsandbox::Native::Sandbox#logs_json`.

use magnus::{Error, Ruby};

use crate::errors::to_ruby;
use crate::sandbox::RbSandbox;

pub fn logs_json(ruby: &Ruby, rb_self: &RbSandbox, tail: usize, sources: Vec<String>) -> Result<String, Error> {
    let entries = rb_self.handle().logs(tail, &sources).map_err(|e| to_ruby(ruby, e))?;
    Ok(serde_json::to_string(&entries).unwrap())
}
