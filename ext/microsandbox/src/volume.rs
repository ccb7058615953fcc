//! `Microsandbox::Native.volume_*`: named volumes and their host-side files (`VolumeFs`).
//! Every call runs without the GVL (`gvl::run`); values cross as JSON or plain arrays.

use magnus::{prelude::*, Error, IntoValue, RString, Ruby, Value};
use microsandbox::paths::Home;
use microsandbox::volume::{self, CreateOptions, VolumeFs};

use crate::errors::to_ruby;
use crate::fs::{bytes, entry_row, stat_row};

fn home(ruby: &Ruby, dir: Option<String>) -> Result<Home, Error> {
    Home::resolve(dir.as_deref().map(std::path::Path::new)).map_err(|e| to_ruby(ruby, e))
}

fn run<T>(ruby: &Ruby, f: impl FnOnce() -> microsandbox::Result<T>) -> Result<T, Error> {
    crate::gvl::run(async move { f() }).map_err(|e| to_ruby(ruby, e))
}

/// `volume_create(home, name, options_json)` → the new volume's info as JSON.
pub fn create(ruby: &Ruby, dir: Option<String>, name: String, options_json: String) -> Result<String, Error> {
    let h = home(ruby, dir)?;
    let opts: CreateOptions = serde_json::from_str(&options_json)
        .map_err(|e| to_ruby(ruby, microsandbox::Error::InvalidConfig(format!("invalid volume options: {e}"))))?;
    let info = run(ruby, move || volume::create(&h, &name, &opts))?;
    Ok(serde_json::to_string(&info).unwrap())
}

pub fn get(ruby: &Ruby, dir: Option<String>, name: String) -> Result<String, Error> {
    let h = home(ruby, dir)?;
    let info = run(ruby, move || volume::get(&h, &name))?;
    Ok(serde_json::to_string(&info).unwrap())
}

pub fn list(ruby: &Ruby, dir: Option<String>) -> Result<String, Error> {
    let h = home(ruby, dir)?;
    let infos = run(ruby, move || volume::list(&h))?;
    Ok(serde_json::to_string(&infos).unwrap())
}

pub fn remove(ruby: &Ruby, dir: Option<String>, name: String) -> Result<Value, Error> {
    let h = home(ruby, dir)?;
    run(ruby, move || volume::remove(&h, &name))?;
    Ok(ruby.qnil().as_value())
}

/// `volume_fs(home, name, op, path, arg)`: one `VolumeFs` operation. `arg` is the data
/// of `write` and the destination of `copy`/`rename`. Returns what the op returns
/// (`list`: `[[name, kind, size, mode, mtime_sec, mtime_nsec], …]`; `stat`: `[kind,
/// size, mode, uid, gid, mtime_sec, mtime_nsec, btime_sec, btime_nsec]`).
pub fn fs(ruby: &Ruby, dir: Option<String>, name: String, op: String, path: RString, arg: Option<RString>) -> Result<Value, Error> {
    use microsandbox::Error as E;
    let h = home(ruby, dir)?;
    let path = bytes(path);
    let arg = arg.map(bytes);
    enum Out {
        Nil,
        Bytes(Vec<u8>),
        Int(u64),
        Bool(bool),
        List(Vec<microsandbox_protocol::FsEntry>),
        Stat(microsandbox_protocol::FsStat),
    }
    let out = run(ruby, move || {
        let vfs = VolumeFs::open(&h, &name)?;
        let arg = || arg.clone().ok_or_else(|| E::InvalidConfig(format!("volume fs {op}: missing argument")));
        Ok(match op.as_str() {
            "read" => Out::Bytes(vfs.read(&path)?),
            "write" => Out::Int(vfs.write(&path, &arg()?)?),
            "list" => Out::List(vfs.list(&path)?),
            "mkdir" => {
                vfs.mkdir(&path)?;
                Out::Nil
            }
            "remove_file" => {
                vfs.remove_file(&path)?;
                Out::Nil
            }
            "remove_dir" => {
                vfs.remove_dir(&path)?;
                Out::Nil
            }
            "exists" => Out::Bool(vfs.exists(&path)?),
            "copy" => Out::Int(vfs.copy(&path, &arg()?)?),
            "rename" => {
                vfs.rename(&path, &arg()?)?;
                Out::Nil
            }
            "stat" => Out::Stat(vfs.stat(&path)?),
            other => return Err(E::InvalidConfig(format!("unknown volume fs operation {other:?}"))),
        })
    })?;
    Ok(match out {
        Out::Nil => ruby.qnil().as_value(),
        Out::Bytes(b) => ruby.str_from_slice(&b).as_value(),
        Out::Int(n) => ruby.integer_from_u64(n).as_value(),
        Out::Bool(b) => b.into_value_with(ruby),
        Out::List(entries) => {
            let a = ruby.ary_new_capa(entries.len());
            for e in &entries {
                a.push(entry_row(ruby, e)?)?;
            }
            a.as_value()
        }
        Out::Stat(st) => stat_row(ruby, &st)?.as_value(),
    })
}

/// `set_virtiofsd_path(path)`: the gem's own `virtiofsd` (`libexec/virtiofsd`), used when
/// `MICROSANDBOX_VIRTIOFSD` is not set. Called once at load; later calls are ignored.
pub fn set_virtiofsd_path(path: String) {
    volume::set_default_virtiofsd(std::path::PathBuf::from(path));
}
