//! Output framing inside one HTTP/2 response body. The layout is Docker's attach-stream
//! multiplexing header (1 byte kind, 3 zero bytes, big-endian u32 length), extended with
//! control kinds, so stdout and stderr stay separate and in order on one stream.

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const FRAME_HEADER_LEN: usize = 8;
/// Larger payloads are refused: a corrupt length must not make the host allocate gigabytes.
pub const MAX_FRAME_PAYLOAD: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// JSON [`crate::Started`].
    Started = 0,
    Stdout = 1,
    Stderr = 2,
    /// JSON [`crate::Exit`]; always the last frame.
    Exit = 3,
    /// JSON [`crate::AgentError`]; the process could not be started.
    Error = 4,
    /// JSON [`crate::Skipped`]: a gap in one output stream.
    Skipped = 5,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Started,
            1 => Self::Stdout,
            2 => Self::Stderr,
            3 => Self::Exit,
            4 => Self::Error,
            5 => Self::Skipped,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

impl Frame {
    pub fn new(kind: FrameKind, payload: impl Into<Bytes>) -> Self {
        Frame { kind, payload: payload.into() }
    }

    pub fn json<T: serde::Serialize>(kind: FrameKind, value: &T) -> Self {
        Frame::new(kind, serde_json::to_vec(value).expect("protocol types serialize"))
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(FRAME_HEADER_LEN + self.payload.len());
        b.put_u8(self.kind as u8);
        b.put_slice(&[0, 0, 0]);
        b.put_u32(self.payload.len() as u32);
        b.put_slice(&self.payload);
        b.freeze()
    }
}

/// Incremental decoder: feed body chunks, pull complete frames.
#[derive(Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let kind = self.buf[0];
        let kind = FrameKind::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
        let len = u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        if self.buf.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(FRAME_HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Frame { kind, payload }))
    }

    /// Bytes of an incomplete frame still buffered.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_split_anywhere() {
        let frames = vec![
            Frame::new(FrameKind::Stdout, &b"hello"[..]),
            Frame::new(FrameKind::Stderr, &b""[..]),
            Frame::new(FrameKind::Exit, &br#"{"code":0,"signal":null}"#[..]),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(|f| f.encode().to_vec()).collect();
        for split in 0..wire.len() {
            let mut d = FrameDecoder::default();
            let mut out = vec![];
            d.push(&wire[..split]);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
            d.push(&wire[split..]);
            while let Some(f) = d.next_frame().unwrap() {
                out.push(f);
            }
            assert_eq!(out, frames);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn rejects_garbage() {
        let mut d = FrameDecoder::default();
        d.push(&[9, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownKind(9)));
        let mut d = FrameDecoder::default();
        d.push(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
    }
}
