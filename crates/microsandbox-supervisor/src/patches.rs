//! Applies a create's scripts and patches ([`PatchStep`]s from the engine) through the
//! agent's filesystem operations, after the guest is ready and before the main process
//! starts or anyone else can connect.
//!
//! Each operation is one `FsRequest` session on a route the supervisor owns, exactly as a
//! client's `sb.fs` call would be. Steps run in order, one operation at a time: the agent
//! runs every session on its own thread, so only waiting for each answer keeps a file
//! behind the directory it goes into. The first failure stops everything; the caller
//! fails the create (and the engine removes the sandbox).

use std::path::Path;
use std::sync::Arc;

use microsandbox::sandbox::patch::{Patch, PatchStep};
use microsandbox_protocol::{ErrorMsg, Frame, FsDone, FsOp, FsRequest, Kind, MAX_CHUNK};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::flow::{session_channel, SessionRx};
use crate::router::Router;

/// A failed operation: the agent's message and errno, or a host-side reason.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub errno: Option<i32>,
}

impl Failure {
    fn host(message: String) -> Failure {
        Failure { message, errno: None }
    }
}

/// What an operation uploads.
enum Upload<'a> {
    Nothing,
    Bytes(&'a [u8]),
    HostFile(&'a Path),
}

/// The agent, reached through the router like a client would.
pub struct Guest {
    pub router: Arc<Router>,
    pub to_agent: mpsc::Sender<Frame>,
}

fn req(op: FsOp, path: &str) -> FsRequest {
    FsRequest { op, path: path.into(), path2: None, recursive: false, parents: false, mode: None, bulk: false, window: None }
}

fn vm_gone() -> Failure {
    Failure::host("the agent channel closed".into())
}

impl Guest {
    /// Runs one filesystem session to its answer.
    async fn op(&self, request: FsRequest, upload: Upload<'_>) -> Result<FsDone, Failure> {
        let (route, mut rx) = session_channel(0, self.to_agent.clone());
        let id = self
            .router
            .open_background(route)
            .ok_or_else(|| Failure::host("the sandbox is draining".into()))?;
        let res = self.session(id, &request, upload, &mut rx).await;
        self.router.close(id);
        res
    }

    async fn session(
        &self,
        id: u32,
        request: &FsRequest,
        upload: Upload<'_>,
        rx: &mut SessionRx,
    ) -> Result<FsDone, Failure> {
        let send = |f: Frame| async { self.to_agent.send(f).await.map_err(|_| vm_gone()) };
        send(Frame::json(id, Kind::FsRequest, request)).await?;
        match upload {
            Upload::Nothing => {}
            Upload::Bytes(b) => {
                for chunk in b.chunks(MAX_CHUNK) {
                    // An early answer (e.g. ENOENT on open) ends the upload.
                    if !rx.is_empty() {
                        break;
                    }
                    send(Frame::data(id, Kind::FsData, chunk.to_vec())).await?;
                }
                send(Frame::data(id, Kind::FsEof, Vec::new())).await?;
            }
            Upload::HostFile(p) => {
                let mut f = tokio::fs::File::open(p)
                    .await
                    .map_err(|e| Failure::host(format!("cannot open host file {}: {e}", p.display())))?;
                let mut buf = vec![0u8; MAX_CHUNK];
                loop {
                    if !rx.is_empty() {
                        break;
                    }
                    let n = f
                        .read(&mut buf)
                        .await
                        .map_err(|e| Failure::host(format!("cannot read host file {}: {e}", p.display())))?;
                    if n == 0 {
                        break;
                    }
                    send(Frame::data(id, Kind::FsData, buf[..n].to_vec())).await?;
                }
                send(Frame::data(id, Kind::FsEof, Vec::new())).await?;
            }
        }
        loop {
            let f = rx.recv().await.ok_or_else(vm_gone)?;
            match f.kind {
                Kind::FsDone => return f.parse::<FsDone>().map_err(|e| Failure::host(e.to_string())),
                Kind::Error => {
                    let e: ErrorMsg = f.parse().map_err(|e| Failure::host(e.to_string()))?;
                    return Err(Failure { message: e.message, errno: e.errno });
                }
                _ => continue,
            }
        }
    }

    async fn mkdir_p(&self, path: &str, mode: Option<u32>) -> Result<(), Failure> {
        self.op(FsRequest { parents: true, mode, ..req(FsOp::Mkdir, path) }, Upload::Nothing).await.map(drop)
    }

    /// Creates the parent directories of `path` (0755) when missing.
    async fn parents(&self, path: &str) -> Result<(), Failure> {
        match Path::new(path).parent().and_then(Path::to_str) {
            Some(p) if p != "/" && !p.is_empty() => self.mkdir_p(p, None).await,
            _ => Ok(()),
        }
    }

    /// Writes `bytes` to `path` (mode `mode`), creating missing parent directories.
    pub async fn write_file(&self, path: &str, mode: u32, bytes: &[u8]) -> Result<(), Failure> {
        self.write(path, mode, Upload::Bytes(bytes)).await
    }

    async fn write(&self, path: &str, mode: u32, upload: Upload<'_>) -> Result<(), Failure> {
        self.parents(path).await?;
        self.op(FsRequest { mode: Some(mode), ..req(FsOp::Write, path) }, upload).await.map(drop)
    }

    /// Without `replace`, fails with EEXIST when `path` exists (a patch must not shadow what
    /// the image or an earlier patch put there unless asked to).
    async fn refuse_existing(&self, path: &str, replace: bool) -> Result<(), Failure> {
        if replace {
            return Ok(());
        }
        match self.op(req(FsOp::Stat, path), Upload::Nothing).await {
            Ok(_) => Err(Failure {
                message: format!("{path} already exists in the root filesystem; pass replace: true to replace it"),
                errno: Some(libc::EEXIST),
            }),
            Err(f) if matches!(f.errno, Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(()),
            Err(f) => Err(f),
        }
    }

    /// `rm -rf path`.
    async fn remove(&self, path: &str) -> Result<(), Failure> {
        match self.op(FsRequest { recursive: true, ..req(FsOp::Remove, path) }, Upload::Nothing).await {
            Err(f) if f.errno == Some(libc::ENOENT) => Ok(()),
            r => r.map(drop),
        }
    }

    async fn symlink(&self, target: &str, link: &str, replace: bool) -> Result<(), Failure> {
        self.parents(link).await?;
        // Replace a file or symlink when asked, never a directory (that would take its
        // contents along).
        match self.op(req(FsOp::Stat, link), Upload::Nothing).await {
            Ok(done) if done.stat.as_ref().is_some_and(|s| s.kind == microsandbox_protocol::FsKind::Directory) => {
                return Err(Failure { message: format!("symlink {link}: a directory is in the way"), errno: Some(libc::EISDIR) });
            }
            Ok(_) if !replace => {
                return Err(Failure {
                    message: format!("{link} already exists in the root filesystem; pass replace: true to replace it"),
                    errno: Some(libc::EEXIST),
                });
            }
            Ok(_) => self.op(req(FsOp::Remove, link), Upload::Nothing).await.map(drop)?,
            Err(f) if f.errno == Some(libc::ENOENT) => {}
            Err(f) => return Err(f),
        }
        self.op(FsRequest { path2: Some(target.into()), ..req(FsOp::Symlink, link) }, Upload::Nothing).await.map(drop)
    }

    /// Copies a host tree into `dst`: directories first, then their entries, in order.
    async fn copy_dir(&self, src: &Path, dst: &str, replace: bool) -> Result<(), Failure> {
        use std::os::unix::fs::PermissionsExt;
        let host_err = |p: &Path, e: std::io::Error| Failure::host(format!("cannot read host path {}: {e}", p.display()));
        let top = std::fs::metadata(src).map_err(|e| host_err(src, e))?;
        self.mkdir_p(dst, Some(top.permissions().mode() & 0o7777)).await?;
        // Iterative walk: (host dir, guest dir).
        let mut pending = vec![(src.to_path_buf(), dst.trim_end_matches('/').to_string())];
        while let Some((hdir, gdir)) = pending.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&hdir)
                .map_err(|e| host_err(&hdir, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| host_err(&hdir, e))?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let hpath = e.path();
                let Some(name) = e.file_name().to_str().map(str::to_string) else {
                    return Err(Failure::host(format!("host file name {} is not UTF-8", hpath.display())));
                };
                let gpath = format!("{gdir}/{name}");
                let meta = std::fs::symlink_metadata(&hpath).map_err(|e| host_err(&hpath, e))?;
                let mode = meta.permissions().mode() & 0o7777;
                let ft = meta.file_type();
                if ft.is_dir() {
                    self.op(FsRequest { parents: true, mode: Some(mode), ..req(FsOp::Mkdir, &gpath) }, Upload::Nothing)
                        .await?;
                    pending.push((hpath, gpath));
                } else if ft.is_file() {
                    self.refuse_existing(&gpath, replace).await?;
                    self.op(FsRequest { mode: Some(mode), ..req(FsOp::Write, &gpath) }, Upload::HostFile(&hpath)).await?;
                } else if ft.is_symlink() {
                    let target = std::fs::read_link(&hpath).map_err(|e| host_err(&hpath, e))?;
                    let target = target
                        .to_str()
                        .ok_or_else(|| Failure::host(format!("symlink target of {} is not UTF-8", hpath.display())))?;
                    self.symlink(target, &gpath, replace).await?;
                } else {
                    return Err(Failure::host(format!(
                        "{} is not a regular file, directory or symlink (cannot copy it)",
                        hpath.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Applies one patch.
    pub async fn apply(&self, patch: &Patch) -> Result<(), Failure> {
        use std::os::unix::fs::PermissionsExt;
        match patch {
            Patch::Text { path, content, mode, replace } => {
                self.refuse_existing(path, *replace).await?;
                self.write(path, mode.unwrap_or(0o644), Upload::Bytes(&content.0)).await
            }
            Patch::Mkdir { path, mode } => self.mkdir_p(path, Some(mode.unwrap_or(0o755))).await,
            Patch::Append { path, content } => {
                self.op(req(FsOp::Append, path), Upload::Bytes(&content.0)).await.map(drop)
            }
            Patch::CopyFile { src, dst, mode, replace } => {
                self.refuse_existing(dst, *replace).await?;
                let mode = match mode {
                    Some(m) => *m,
                    None => std::fs::metadata(src)
                        .map_err(|e| Failure::host(format!("cannot read host file {}: {e}", src.display())))?
                        .permissions()
                        .mode()
                        & 0o7777,
                };
                self.write(dst, mode, Upload::HostFile(src)).await
            }
            Patch::CopyDir { src, dst, replace } => self.copy_dir(src, dst, *replace).await,
            Patch::Symlink { target, link, replace } => self.symlink(target, link, *replace).await,
            Patch::Remove { path } => self.remove(path).await,
        }
    }
}

/// Reads (and deletes) the steps file, then applies every step in order. The error
/// names the step that failed.
pub async fn apply_file(guest: &Guest, file: &Path) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read the patch list {}: {e}", file.display()))?;
    let _ = std::fs::remove_file(file);
    let steps: Vec<PatchStep> =
        serde_json::from_slice(&bytes).map_err(|e| format!("the patch list {} is unreadable: {e}", file.display()))?;
    for step in &steps {
        guest.apply(&step.patch).await.map_err(|f| format!("{} failed: {}", step.label, f.message))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! A fake agent answers FsRequests, so the sequencing is tested without a VM.
    use super::*;
    use microsandbox::sandbox::patch::Bytes;
    use microsandbox_protocol::FsStat;

    /// Runs `patch` against a fake agent that records requests and fails `fail_op`.
    async fn run(patch: Patch, fail: Option<(FsOp, i32)>) -> (Result<(), Failure>, Vec<(FsOp, microsandbox_protocol::PathBytes, Option<u32>, usize)>) {
        let router = Arc::new(Router::default());
        let (to_agent, mut agent_rx) = mpsc::channel::<Frame>(64);
        let guest = Guest { router: router.clone(), to_agent };
        let agent = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut current: Option<(u32, FsRequest, usize)> = None;
            while let Some(f) = agent_rx.recv().await {
                let answer = match f.kind {
                    Kind::FsRequest => {
                        let r: FsRequest = f.parse().unwrap();
                        if matches!(r.op, FsOp::Write | FsOp::Append) {
                            current = Some((f.id, r, 0));
                            None
                        } else {
                            Some((f.id, r, 0))
                        }
                    }
                    Kind::FsData => {
                        if let Some(c) = current.as_mut() {
                            c.2 += f.payload.len();
                        }
                        None
                    }
                    Kind::FsEof => current.take(),
                    _ => None,
                };
                let Some((id, r, n)) = answer else { continue };
                seen.push((r.op, r.path.clone(), r.mode, n));
                let frame = match fail {
                    Some((op, errno)) if op == r.op => Frame::json(
                        id,
                        Kind::Error,
                        &ErrorMsg { code: "fs-error".into(), message: format!("{:?} {}: errno {errno}", r.op, r.path), errno: Some(errno) },
                    ),
                    _ if r.op == FsOp::Stat => Frame::json(
                        id,
                        Kind::FsDone,
                        &FsDone {
                            stat: Some(FsStat { kind: microsandbox_protocol::FsKind::File, size: 0, mode: 0o644, uid: 0, gid: 0, mtime_sec: 0, mtime_nsec: 0, btime_sec: None, btime_nsec: None }),
                            ..Default::default()
                        },
                    ),
                    _ => Frame::json(id, Kind::FsDone, &FsDone::default()),
                };
                let route = router.get(id).unwrap();
                router.close(id);
                let routed = crate::router::Routed { frame, global: id, cost: 0, flow: route.flow.clone() };
                route.client.send(routed).unwrap();
            }
            seen
        });
        let res = guest.apply(&patch).await;
        drop(guest);
        (res, agent.await.unwrap())
    }

    #[tokio::test]
    async fn text_creates_parents_then_writes_with_exact_mode() {
        let text = |replace| Patch::Text { path: "/etc/app/conf".into(), content: Bytes(vec![1; 70_000]), mode: None, replace };
        // Not there yet (the fake agent's stat fails with ENOENT): checked, then written.
        let (res, seen) = run(text(false), Some((FsOp::Stat, libc::ENOENT))).await;
        res.unwrap();
        assert_eq!(seen[0], (FsOp::Stat, "/etc/app/conf".into(), None, 0));
        assert_eq!(seen[1], (FsOp::Mkdir, "/etc/app".into(), None, 0));
        assert_eq!(seen[2], (FsOp::Write, "/etc/app/conf".into(), Some(0o644), 70_000));
        // There already (stat succeeds): refused without replace, written with it.
        let (res, seen) = run(text(false), None).await;
        let f = res.unwrap_err();
        assert_eq!(f.errno, Some(libc::EEXIST));
        assert!(f.message.contains("replace: true"), "{}", f.message);
        assert!(!seen.iter().any(|s| s.0 == FsOp::Write));
        let (res, seen) = run(text(true), None).await;
        res.unwrap();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [FsOp::Mkdir, FsOp::Write]);
    }

    #[tokio::test]
    async fn remove_of_a_missing_path_is_fine_but_other_failures_are_not() {
        let (res, _) = run(Patch::Remove { path: "/gone".into() }, Some((FsOp::Remove, libc::ENOENT))).await;
        res.unwrap();
        let (res, _) = run(Patch::Remove { path: "/busy".into() }, Some((FsOp::Remove, libc::EBUSY))).await;
        assert_eq!(res.unwrap_err().errno, Some(libc::EBUSY));
    }

    #[tokio::test]
    async fn symlink_replaces_a_file_only_when_asked() {
        let link = |replace| Patch::Symlink { target: "busybox".into(), link: "/bin/x".into(), replace };
        let (res, seen) = run(link(true), None).await;
        res.unwrap();
        let ops: Vec<FsOp> = seen.iter().map(|s| s.0).collect();
        assert_eq!(ops, [FsOp::Mkdir, FsOp::Stat, FsOp::Remove, FsOp::Symlink]);
        let (res, seen) = run(link(false), None).await;
        assert_eq!(res.unwrap_err().errno, Some(libc::EEXIST));
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [FsOp::Mkdir, FsOp::Stat]);
    }

    #[tokio::test]
    async fn copy_dir_walks_the_host_tree_in_order() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), b"hello").unwrap();
        std::fs::set_permissions(d.path().join("sub/f"), std::fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("sub/f", d.path().join("link")).unwrap();
        let (res, seen) =
            run(Patch::CopyDir { src: d.path().into(), dst: "/opt/t".into(), replace: false }, Some((FsOp::Stat, libc::ENOENT))).await;
        res.unwrap();
        let paths: Vec<(FsOp, &str)> = seen.iter().map(|s| (s.0, std::str::from_utf8(s.1.as_bytes()).unwrap())).collect();
        assert_eq!(paths[0], (FsOp::Mkdir, "/opt/t"));
        assert!(paths.contains(&(FsOp::Symlink, "/opt/t/link")));
        let mk = paths.iter().position(|p| *p == (FsOp::Mkdir, "/opt/t/sub")).unwrap();
        let wr = seen.iter().position(|s| s.0 == FsOp::Write && s.1.as_bytes() == b"/opt/t/sub/f").unwrap();
        assert!(mk < wr);
        assert_eq!((seen[wr].2, seen[wr].3), (Some(0o750), 5));
    }

    #[tokio::test]
    async fn failures_carry_the_agent_message() {
        let (res, _) = run(Patch::Append { path: "/nope".into(), content: Bytes(b"x".to_vec()) }, Some((FsOp::Append, libc::ENOENT))).await;
        let f = res.unwrap_err();
        assert_eq!(f.errno, Some(libc::ENOENT));
        assert!(f.message.contains("/nope"), "{}", f.message);
    }
}
