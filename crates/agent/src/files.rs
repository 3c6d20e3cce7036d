//! Streamed file transfer. Nothing is held in memory beyond one chunk; an upload lands in a
//! temporary file beside the target and is renamed into place only when complete, so a broken
//! transfer never leaves a truncated file behind.

use bytes::Bytes;
use devbox_protocol::{AgentError, BodyError, ErrorKind, FileQuery};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn err(e: std::io::Error, what: &str) -> AgentError {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        std::io::ErrorKind::IsADirectory => ErrorKind::IsADirectory,
        _ if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) => ErrorKind::NoSpace,
        _ if matches!(
            e.raw_os_error(),
            Some(
                libc::ENOTDIR
                    | libc::EROFS
                    | libc::ELOOP
                    | libc::ENAMETOOLONG
                    | libc::EINVAL
                    | libc::ETXTBSY
                    | libc::EEXIST
                    | libc::EISDIR
                    | libc::EACCES
                    | libc::EPERM
            )
        ) =>
        {
            ErrorKind::BadRequest
        }
        _ => ErrorKind::Io,
    };
    AgentError { kind, message: format!("{what}: {e}") }
}

fn check_abs(path: &str) -> Result<PathBuf, AgentError> {
    let p = PathBuf::from(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(AgentError { kind: ErrorKind::BadRequest, message: format!("path must be absolute: {path:?}") });
    }
    Ok(p)
}

/// Open a file for reading; the returned receiver yields its chunks.
pub async fn read(q: &FileQuery, tx: mpsc::Sender<Result<Bytes, BodyError>>) -> Result<u64, AgentError> {
    let path = check_abs(&q.path)?;
    let mut f = tokio::fs::File::open(&path).await.map_err(|e| err(e, &q.path))?;
    let meta = f.metadata().await.map_err(|e| err(e, &q.path))?;
    if meta.is_dir() {
        return Err(AgentError { kind: ErrorKind::IsADirectory, message: format!("{} is a directory", q.path) });
    }
    let len = meta.len();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match f.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Box::new(e))).await;
                    return;
                }
            }
        }
    });
    Ok(len)
}

/// Create missing parent directories, owned by the user like `mkdir -p` run as that user.
fn make_parents(dir: &Path, uid: u32, gid: u32) -> Result<(), AgentError> {
    let mut missing = vec![];
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        cur = d.parent();
    }
    for d in missing.iter().rev() {
        std::fs::create_dir(d).map_err(|e| err(e, &d.display().to_string()))?;
        let _ = chown(d, Some(uid), Some(gid));
    }
    Ok(())
}

pub async fn write(q: &FileQuery, mut body: Incoming) -> Result<u64, AgentError> {
    let path = check_abs(&q.path)?;
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Err(AgentError { kind: ErrorKind::BadRequest, message: "cannot write to /".into() });
    };
    if path.is_dir() {
        return Err(AgentError { kind: ErrorKind::IsADirectory, message: format!("{} is a directory", q.path) });
    }
    make_parents(parent, q.uid, q.gid)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = parent.join(format!(".{name}.devbox-upload-{}", std::process::id() as u64 ^ rand_suffix()));
    let result = async {
        let mut f = tokio::fs::File::create(&tmp).await.map_err(|e| err(e, &q.path))?;
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| AgentError { kind: ErrorKind::Io, message: format!("upload interrupted: {e}") })?;
            if let Ok(data) = frame.into_data() {
                total += data.len() as u64;
                f.write_all(&data).await.map_err(|e| err(e, &q.path))?;
            }
        }
        f.flush().await.map_err(|e| err(e, &q.path))?;
        // Keep the mode and owner of a file being replaced.
        match std::fs::metadata(&path) {
            Ok(old) => {
                use std::os::unix::fs::MetadataExt;
                let _ = std::fs::set_permissions(&tmp, old.permissions());
                let _ = chown(&tmp, Some(old.uid()), Some(old.gid()));
            }
            Err(_) => {
                let _ = chown(&tmp, Some(q.uid), Some(q.gid));
            }
        }
        tokio::fs::rename(&tmp, &path).await.map_err(|e| err(e, &q.path))?;
        Ok(total)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}
