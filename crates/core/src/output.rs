//! Output of one stream of one execution: bytes with absolute offsets, bounded in memory, with
//! a change signal for streaming readers.

use std::sync::Mutex;
use tokio::sync::watch;

/// Bytes kept per stream. Beyond this the oldest half is dropped and counted as truncated
/// (readers asking for dropped offsets resume at the oldest kept byte).
pub const OUTPUT_MEMORY_CAP: usize = 64 << 20;

pub struct OutputBuf {
    inner: Mutex<Inner>,
    /// Total bytes ever written, and whether the stream is finished.
    tick: watch::Sender<(u64, bool)>,
}

struct Inner {
    /// Offset of `data[0]` in the stream.
    base: u64,
    data: Vec<u8>,
    cap: usize,
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
        OutputBuf { inner: Mutex::new(Inner { base: 0, data: Vec::new(), cap }), tick: watch::channel((0, false)).0 }
    }

    pub fn push(&self, bytes: &[u8]) {
        let mut g = self.inner.lock().unwrap();
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

    pub fn finish(&self) {
        self.tick.send_modify(|t| t.1 = true);
    }

    pub fn total(&self) -> u64 {
        self.tick.borrow().0
    }

    pub fn subscribe(&self) -> watch::Receiver<(u64, bool)> {
        self.tick.subscribe()
    }

    /// Bytes from `offset` on (at most `max`), and the offset they start at (later than
    /// `offset` if that part was dropped).
    pub fn read_from(&self, offset: u64, max: usize) -> (u64, Vec<u8>) {
        let g = self.inner.lock().unwrap();
        let start = offset.max(g.base);
        let idx = (start - g.base) as usize;
        if idx >= g.data.len() {
            return (start, Vec::new());
        }
        let end = (idx + max).min(g.data.len());
        (start, g.data[idx..end].to_vec())
    }

    /// Everything kept, as text.
    pub fn all(&self) -> OutputSlice {
        let g = self.inner.lock().unwrap();
        OutputSlice { text: String::from_utf8_lossy(&g.data).into_owned(), truncated: g.base > 0 }
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
        OutputSlice { text: String::from_utf8_lossy(&data[start..]).into_owned(), truncated: start > 0 || g.base > 0 }
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
    fn cap_drops_oldest_and_offsets_stay_absolute() {
        let b = OutputBuf::with_cap(8);
        b.push(b"0123456789");
        assert_eq!(b.total(), 10);
        let (start, bytes) = b.read_from(0, 100);
        assert_eq!(start, 6);
        assert_eq!(bytes, b"6789");
        assert!(b.all().truncated);
        let (start, bytes) = b.read_from(8, 1);
        assert_eq!((start, bytes.as_slice()), (8, &b"8"[..]));
    }
}
