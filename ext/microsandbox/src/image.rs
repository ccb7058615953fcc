//! `Microsandbox::Native::Image*`: the local image store and pulls with progress.

use std::sync::Arc;

use magnus::{prelude::*, Error, RArray, Ruby, Value};
use microsandbox::image::{self, LayerProgress};
use microsandbox::paths::Home;
use microsandbox::SandboxConfig;
use tokio::sync::{mpsc, Mutex};

use crate::errors::to_ruby;
use crate::fork::ProcessLocal;

fn home(ruby: &Ruby, dir: Option<String>) -> Result<Home, Error> {
    Home::resolve(dir.as_deref().map(std::path::Path::new)).map_err(|e| to_ruby(ruby, e))
}

pub fn list_json(ruby: &Ruby, dir: Option<String>) -> Result<String, Error> {
    let h = home(ruby, dir)?;
    let list = image::list(&h).map_err(|e| to_ruby(ruby, e))?;
    Ok(serde_json::to_string(&list).unwrap())
}

pub fn inspect_json(ruby: &Ruby, dir: Option<String>, reference: String) -> Result<String, Error> {
    let h = home(ruby, dir)?;
    let details = image::inspect(&h, &reference).map_err(|e| to_ruby(ruby, e))?;
    Ok(serde_json::to_string(&details).unwrap())
}

pub fn remove(ruby: &Ruby, dir: Option<String>, reference: String, force: bool) -> Result<Value, Error> {
    let h = home(ruby, dir)?;
    crate::gvl::run(async move { image::remove(&h, &reference, force).await }).map_err(|e| to_ruby(ruby, e))?;
    Ok(ruby.qnil().as_value())
}

/// `image_prune(home)`: what was deleted, as the JSON of an `image::PruneReport`.
pub fn prune(ruby: &Ruby, dir: Option<String>) -> Result<String, Error> {
    let h = home(ruby, dir)?;
    let report = crate::gvl::run(async move { image::prune(&h).await }).map_err(|e| to_ruby(ruby, e))?;
    Ok(serde_json::to_string(&report).unwrap())
}

enum PullEvent {
    Progress(LayerProgress),
    Done(Result<String, microsandbox::Error>),
}

/// A pull running on the engine runtime; Ruby polls it for progress without the GVL.
#[magnus::wrap(class = "Microsandbox::Native::PullSession", free_immediately, size)]
pub struct RbPullSession {
    /// Both are the parent's in a forked child: never used or dropped there (fork.rs).
    events: ProcessLocal<Arc<Mutex<mpsc::UnboundedReceiver<PullEvent>>>>,
    task: ProcessLocal<tokio::task::JoinHandle<()>>,
}

impl Drop for RbPullSession {
    fn drop(&mut self) {
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }
}

impl RbPullSession {
    /// `start(home, reference, options_json)`: options are the registry keys of the
    /// sandbox options (`pull_policy`, `registry_auth`, `registry_insecure`, `registry_ca_certs`).
    pub fn start(ruby: &Ruby, dir: Option<String>, reference: String, options_json: String) -> Result<RbPullSession, Error> {
        let h = home(ruby, dir)?;
        let mut probe: serde_json::Value = serde_json::from_str(&options_json)
            .map_err(|e| to_ruby(ruby, microsandbox::Error::InvalidConfig(format!("invalid pull options: {e}"))))?;
        probe["name"] = "pull".into();
        probe["image"] = reference.clone().into();
        let cfg: SandboxConfig = serde_json::from_value(probe)
            .map_err(|e| to_ruby(ruby, microsandbox::Error::InvalidConfig(format!("invalid pull options: {e}"))))?;
        let opts = cfg.pull_options().map_err(|e| to_ruby(ruby, e))?;
        // Progress is unbounded but small: one event per layer chunk the puller reports.
        let (tx, rx) = mpsc::unbounded_channel();
        let task = crate::runtime::get().spawn(async move {
            let progress_tx = tx.clone();
            let mut report = move |p: LayerProgress| {
                let _ = progress_tx.send(PullEvent::Progress(p));
            };
            let res = image::ensure_image(&h, &reference, &opts, &mut report)
                .await
                .map(|img| serde_json::json!({"reference": img.reference, "manifest_digest": img.manifest_digest}).to_string());
            let _ = tx.send(PullEvent::Done(res));
        });
        Ok(RbPullSession { events: ProcessLocal::new(Arc::new(Mutex::new(rx))), task: ProcessLocal::new(task) })
    }

    /// `[digest, done, total]` for progress, `[:done, json]` at the end (raises on failure).
    pub fn next_event(ruby: &Ruby, rb_self: &Self) -> Result<RArray, Error> {
        let events = rb_self
            .events
            .get()
            .cloned()
            .ok_or_else(|| to_ruby(ruby, crate::fork::inherited_error("image pull")))?;
        let ev = crate::gvl::run(async move {
            Ok(events.lock().await.recv().await)
        })
        .map_err(|e| to_ruby(ruby, e))?;
        let out = ruby.ary_new_capa(3);
        match ev {
            Some(PullEvent::Progress(p)) => {
                out.push(p.digest)?;
                out.push(p.done)?;
                out.push(p.total)?;
            }
            Some(PullEvent::Done(Ok(json))) => {
                out.push(ruby.to_symbol("done"))?;
                out.push(json)?;
            }
            Some(PullEvent::Done(Err(e))) => return Err(to_ruby(ruby, e)),
            None => return Err(to_ruby(ruby, microsandbox::Error::Runtime("the pull ended without a result".into()))),
        }
        Ok(out)
    }
}
