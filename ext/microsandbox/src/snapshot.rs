//! `Microsandbox::Native.snapshot(home, op, args_json)`: snapshots, JSON in and out. Every
//! call runs without the GVL (`gvl::run`): creating, verifying, exporting and importing
//! move and hash whole disks.

use magnus::{Error, Ruby};
use microsandbox::paths::Home;
use microsandbox::snapshot;
use serde_json::{json, Value};

use crate::errors::to_ruby;

fn arg<'a>(v: &'a Value, k: &str) -> microsandbox::Result<&'a str> {
    v.get(k).and_then(Value::as_str).ok_or_else(|| microsandbox::Error::InvalidConfig(format!("snapshot: missing {k}")))
}

pub fn call(ruby: &Ruby, dir: Option<String>, op: String, args_json: String) -> Result<String, Error> {
    let home = Home::resolve(dir.as_deref().map(std::path::Path::new)).map_err(|e| to_ruby(ruby, e))?;
    let args: Value = serde_json::from_str(&args_json)
        .map_err(|e| to_ruby(ruby, microsandbox::Error::InvalidConfig(format!("snapshot arguments: {e}"))))?;
    let out = crate::gvl::run(async move {
        let a = &args;
        Ok(match op.as_str() {
            "create" => {
                let opts: snapshot::CreateOptions = serde_json::from_value(a.get("options").cloned().unwrap_or(json!({})))
                    .map_err(|e| microsandbox::Error::InvalidConfig(format!("snapshot options: {e}")))?;
                json!(microsandbox::sandbox::snapshot_sandbox(Some(home.root()), arg(a, "sandbox")?, &opts)?)
            }
            "open" => json!(snapshot::open(&home, arg(a, "key")?)?),
            "get" => json!(snapshot::get(&home, arg(a, "key")?)?),
            "list" => json!(snapshot::list(&home)?),
            "reindex" => {
                let dir = a.get("dir").and_then(Value::as_str).map(std::path::Path::new);
                json!(snapshot::index::reindex(&home, dir)?)
            }
            "list_dir" => json!(snapshot::list_dir(std::path::Path::new(arg(a, "dir")?))?),
            "remove" => {
                snapshot::remove(&home, arg(a, "key")?, a.get("force").and_then(Value::as_bool).unwrap_or(false))?;
                Value::Null
            }
            "verify" => json!(snapshot::verify(&home, arg(a, "key")?)?),
            "export" => {
                snapshot::export(&home, arg(a, "key")?, std::path::Path::new(arg(a, "out")?))?;
                Value::Null
            }
            "import" => {
                let dest = a.get("dest").and_then(Value::as_str).map(std::path::Path::new);
                json!(snapshot::import(&home, std::path::Path::new(arg(a, "archive")?), dest)?)
            }
            other => return Err(microsandbox::Error::InvalidConfig(format!("unknown snapshot operation {other:?}"))),
        })
    })
    .map_err(|e| to_ruby(ruby, e))?;
    Ok(out.to_string())
}
