//! Output of one stream of one execution. Every byte goes to a file in the data dir (created on
//! the first byte), so output survives a server restart and is bounded by disk, not memory;
//! the last [`OUTPUT_MEMORY_CAP`] bytes also stay in memory for `last_n` and live readers.
//! Offsets are positions in what the host received.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokio::sync::watch;

/// Tail kept in memory per stream.
pub const OUTPUT_MEMORY_CAP: usize = 4 << 20;
/// Tail kept in memory once a file-backed stream is finished.
pub const FINISHED_TAIL: usize = 64 << 10;
/// Bytes kept on disk per stream; beyond it output is dropped and reported truncated.
pub const OUTPUT_DISK_CAP: u64 = 1 << 30;

pub struct OutputBuf {
    inner: Mutex<Inner>,
    /// Total bytes received, and whether the stream is finished.
    tick: watch::Sender<(u64, bool)>,
}

struct Inner {
    /// Offset of `data[0]` in the stream.
    base: u64,
    data: Vec<u8>,
    cap: usize,
    path: Option<PathBuf>,
    file: Option<File>,
    /// Bytes in the file (== total unless the disk cap was hit).
    file_len: u64,
    /// Some output never reached us (agent buffer overflow, disk cap).
    lossy: bool,
}

/// A view of the output for an API answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSlice {
    pub text: String,
    pub truncated: bool,
}

impl Default for OutputBuf {
    fn default() -> Self {
        Self::with_cap(OUTPUT_MEMORY_CAP)
    }
}

impl OutputBuf {
    pub fn with_cap(cap: usize) -> Self {
        OutputBuf {
            inner: Mutex::new(Inner {
                base: 0,
                data: Vec::new(),
                cap,
                path: None,
                file: None,
                file_len: 0,
                lossy: false,
            }),
            tick: watch::channel((0, false)).0,
        }
    }

    /// Output backed by `path`; existing content (after a restart) is loaded.
    pub fn at(path: &Path) -> Self {
        let b = Self::default();
        {
            let mut g = b.inner.lock().unwrap();
            g.path = Some(path.to_path_buf());
            if let Ok(f) = std::fs::OpenOptions::new().read(true).append(true).open(path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let keep = len.min(g.cap as u64);
                let mut tail = vec![0u8; keep as usize];
                if f.read_exact_at(&mut tail, len - keep).is_ok() {
                    g.base = len - keep;
                    g.data = tail;
                } else {
                    g.base = len;
                }
                g.file_len = len;
                g.file = Some(f);
            }
            let total = g.base + g.data.len() as u64;
            drop(g);
            b.tick.send_modify(|t| t.0 = total);
        }
        b
    }

    pub fn push(&self, bytes: &[u8]) {
        let mut g = self.inner.lock().unwrap();
        if g.file.is_none() {
            if let Some(p) = g.path.clone() {
                match std::fs::OpenOptions::new().create(true).read(true).append(true).open(&p) {
                    Ok(f) => g.file = Some(f),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "cannot spill output to disk");
                        g.path = None;
                    }
                }
            }
        }
        let room = OUTPUT_DISK_CAP.saturating_sub(g.file_len) as usize;
        if let Some(f) = g.file.as_mut() {
            let n = bytes.len().min(room);
            let _ = f.write_all(&bytes[..n]);
            g.file_len += n as u64;
            if n < bytes.len() {
                g.lossy = true;
            }
        }
        g.data.extend_from_slice(bytes);
        if g.data.len() > g.cap {
            let drop = g.data.len() - g.cap / 2;
            g.data.drain(..drop);
            g.base += drop as u64;
        }
        let total = g.base + g.data.len() as u64;
        drop(g);
        self.tick.send_modify(|t| t.0 = total);
    }

    /// Mark that output was lost before it reached the host.
    pub fn mark_lossy(&self) {
        self.inner.lock().unwrap().lossy = true;
    }

    /// The stream is complete. A file-backed stream then keeps only a small tail in memory:
    /// finished executions pile up, and everything is on disk anyway.
    pub fn finish(&self) {
        {
            let mut g = self.inner.lock().unwrap();
            if g.file.is_some() && g.data.len() > FINISHED_TAIL {
                let drop = g.data.len() - FINISHED_TAIL;
                g.data.drain(..drop);
                g.base += drop as u64;
                g.data.shrink_to_fit();
            }
        }
        self.tick.send_modify(|t| t.1 = true);
    }

    pub fn total(&self) -> u64 {
        self.tick.borrow().0
    }

    pub fn subscribe(&self) -> watch::Receiver<(u64, bool)> {
        self.tick.subscribe()
    }

    /// Bytes from `offset` on (at most `max`), and the offset they start at (later than
    /// `offset` only if that part is kept nowhere).
    pub fn read_from(&self, offset: u64, max: usize) -> (u64, Vec<u8>) {
        let g = self.inner.lock().unwrap();
        if offset < g.base {
            // The file holds everything up to file_len: read across the memory boundary so a
            // read does not end mid-character just because the tail starts there.
            if let Some(f) = g.file.as_ref().filter(|_| offset < g.file_len) {
                let n = ((g.file_len - offset) as usize).min(max);
                let mut buf = vec![0u8; n];
                if f.read_exact_at(&mut buf, offset).is_ok() {
                    return (offset, buf);
                }
            }
        }
        let start = offset.max(g.base);
        let idx = (start - g.base) as usize;
        if idx >= g.data.len() {
            return (start, Vec::new());
        }
        let end = (idx + max).min(g.data.len());
        (start, g.data[idx..end].to_vec())
    }

    /// The in-memory tail, as text (everything for outputs under the memory cap).
    pub fn all(&self) -> OutputSlice {
        let g = self.inner.lock().unwrap();
        OutputSlice { text: String::from_utf8_lossy(&g.data).into_owned(), truncated: g.base > 0 || g.lossy }
    }

    /// Bytes kept on disk (for reattaching after a restart).
    pub fn disk_len(&self) -> Option<u64> {
        let g = self.inner.lock().unwrap();
        g.path.as_ref().map(|_| g.file_len)
    }

    /// Flush to disk.
    pub fn sync(&self) {
        if let Some(f) = self.inner.lock().unwrap().file.as_ref() {
            let _ = f.sync_data();
        }
    }

    /// The last `n` lines (a trailing newline does not start a new line).
    pub fn last_lines(&self, n: usize) -> OutputSlice {
        let g = self.inner.lock().unwrap();
        let data = &g.data;
        let mut end = data.len();
        if end > 0 && data[end - 1] == b'\n' {
            end -= 1;
        }
        let mut start = 0;
        let mut seen = 0;
        if n == 0 {
            start = data.len();
        } else {
            for i in (0..end).rev() {
                if data[i] == b'\n' {
                    seen += 1;
                    if seen == n {
                        start = i + 1;
                        break;
                    }
                }
            }
        }
        OutputSlice {
            text: String::from_utf8_lossy(&data[start..]).into_owned(),
            truncated: start > 0 || g.base > 0 || g.lossy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_and_truncation() {
        let b = OutputBuf::default();
        b.push(b"a\nb\nc\n");
        assert_eq!(b.last_lines(2), OutputSlice { text: "b\nc\n".into(), truncated: true });
        assert_eq!(b.last_lines(3), OutputSlice { text: "a\nb\nc\n".into(), truncated: false });
        assert!(!b.last_lines(100).truncated);
        b.push(b"d");
        assert_eq!(b.last_lines(1).text, "d");
        assert_eq!(b.last_lines(0).text, "");
    }

    #[test]
    fn memory_only_cap_drops_oldest_and_offsets_stay_absolute() {
        let b = OutputBuf::with_cap(8);
        b.push(b"0123456789");
        assert_eq!(b.total(), 10);
        let (start, bytes) = b.read_from(0, 100);
        assert_eq!(start, 6);
        assert_eq!(bytes, b"6789");
        assert!(b.all().truncated);
    }

    #[test]
    fn file_backed_output_keeps_everything_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.stdout");
        let b = OutputBuf::at(&path);
        assert!(!path.exists(), "file created lazily");
        let big: Vec<u8> = (0..(OUTPUT_MEMORY_CAP * 2)).map(|i| (i % 251) as u8).collect();
        b.push(&big);
        let (start, bytes) = b.read_from(10, 100);
        assert_eq!((start, bytes.as_slice()), (10, &big[10..110]));
        assert_eq!(b.disk_len(), Some(big.len() as u64));
        drop(b);
        let again = OutputBuf::at(&path);
        assert_eq!(again.total(), big.len() as u64);
        let (start, bytes) = again.read_from(5, 5);
        assert_eq!((start, bytes.as_slice()), (5, &big[5..10]));
        again.push(b"more");
        assert_eq!(again.read_from(big.len() as u64, 10).1, b"more");
    }
}
