//! `Microsandbox::Native::Sandbox#metrics_json` and `Native.all_metrics_json`.

use magnus::{Error, Ruby};
use microsandbox::sandbox::SandboxStatus;
use microsandbox::Sandbox;

use crate::errors::to_ruby;
use crate::sandbox::RbSandbox;

pub fn metrics_json(ruby: &Ruby, rb_self: &RbSandbox) -> Result<String, Error> {
    let sb = rb_self.handle();
    let m = crate::gvl::run(async move { sb.metrics().await }).map_err(|e| to_ruby(ruby, e))?;
    Ok(serde_json::to_string(&m).unwrap())
}

/// `{name => metrics}` for every running sandbox, sampled concurrently.
pub fn all_metrics_json(ruby: &Ruby, home: Option<String>) -> Result<String, Error> {
    let res = crate::gvl::run(async move {
        let home = home.as_deref().map(std::path::Path::new);
        let mut set = tokio::task::JoinSet::new();
        for rec in Sandbox::list(home)? {
            if rec.status != SandboxStatus::Running {
                continue;
            }
            let Ok(sb) = Sandbox::get(home, &rec.name) else { continue };
            set.spawn(async move { (rec.name, sb.metrics().await) });
        }
        let mut out = serde_json::Map::new();
        while let Some(done) = set.join_next().await {
            // A sandbox that stopped meanwhile is simply left out.
            if let Ok((name, Ok(m))) = done {
                out.insert(name, serde_json::to_value(m).unwrap());
            }
        }
        Ok(serde_json::Value::Object(out).to_string())
    });
    res.map_err(|e| to_ruby(ruby, e))
}
