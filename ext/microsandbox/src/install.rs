//! `Microsandbox::Native.install` / `.installed?`.

use std::path::PathBuf;

use magnus::{Error, Ruby};
use microsandbox::paths::Home;
use microsandbox::runtime::{self, Bundle};

fn home(ruby: &Ruby, dir: Option<String>) -> Result<Home, Error> {
    Home::resolve(dir.as_deref().map(std::path::Path::new)).map_err(|e| crate::errors::to_ruby(ruby, e))
}

/// Installs the runtime; returns the manifest as JSON. Progress goes to stderr.
pub fn install(ruby: &Ruby, dir: Option<String>, agent: String, supervisor: String, force: bool) -> Result<String, Error> {
    let home = home(ruby, dir)?;
    let bundle = Bundle { agent: PathBuf::from(agent), supervisor: PathBuf::from(supervisor) };
    let res = crate::gvl::run(async move {
        tokio::task::spawn_blocking(move || {
            runtime::install(&home, &bundle, force, &mut |msg| eprintln!("[microsandbox] {msg}"))
        })
        .await
        .map_err(|e| microsandbox::Error::Runtime(format!("install task failed: {e}")))?
    });
    let rt = res.map_err(|e| crate::errors::to_ruby(ruby, e))?;
    Ok(serde_json::to_string(&rt.manifest).unwrap())
}

pub fn installed(ruby: &Ruby, dir: Option<String>, agent: String, supervisor: String) -> Result<bool, Error> {
    let home = home(ruby, dir)?;
    let bundle = Bundle { agent: PathBuf::from(agent), supervisor: PathBuf::from(supervisor) };
    Ok(runtime::is_installed(&home, &bundle))
}
