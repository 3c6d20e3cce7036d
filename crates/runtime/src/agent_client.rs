//! Host side of the agent protocol: one HTTP/2 connection per box, shared by every execution
//! and transfer, re-established transparently if it drops.

use crate::{Result, RuntimeError};
use bytes::Bytes;
use devbox_protocol::pty::{self, PtyAttachQuery, PtyControl, PtyInfo, PtyOpen};
use devbox_protocol::ChannelBody;
use devbox_protocol::{
    paths, AgentError, BodyError, ErrorKind, ExecRequest, FileQuery, Frame, FrameDecoder, Hello, SetupRequest,
    SignalRequest, PROTOCOL_VERSION,
};
use futures_util::{Stream, StreamExt, TryStreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyDataStream, BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Body = UnsyncBoxBody<Bytes, BodyError>;
/// Largest JSON answer or error body read from an agent (the box controls its agent's memory
/// in the worst case, so nothing it sends is trusted to be small).
const MAX_ANSWER: usize = 1 << 20;
/// Control calls (signal, stdin, release) answer at once; a wedged agent must not hang us.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

struct Inner {
    socket: PathBuf,
    conn: tokio::sync::Mutex<Option<SendRequest<Body>>>,
}

fn transport(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Transport(e.to_string())
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|never| match never {}).boxed_unsync()
}

fn json_body<T: serde::Serialize>(v: &T) -> Body {
    Full::new(Bytes::from(serde_json::to_vec(v).expect("protocol types serialize")))
        .map_err(|never| match never {})
        .boxed_unsync()
}

impl AgentClient {
    /// A client that connects on first use, without a handshake (for a frozen box, whose
    /// agent cannot answer until it is thawed).
    pub fn lazy(socket: &Path) -> AgentClient {
        AgentClient { inner: Arc::new(Inner { socket: socket.to_path_buf(), conn: tokio::sync::Mutex::new(None) }) }
    }

    /// Connect and complete the readiness handshake, retrying until `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<AgentClient> {
        let client = AgentClient::lazy(socket);
        let start = Instant::now();
        let mut delay = Duration::from_micros(200);
        loop {
            // Bound each attempt too: a frozen or wedged agent accepts but never answers.
            let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(50));
            let attempt = match tokio::time::timeout(left, client.hello()).await {
                Ok(r) => r,
                Err(_) => {
                    *client.inner.conn.lock().await = None;
                    Err(RuntimeError::AgentNotReady("no answer to the handshake".into()))
                }
            };
            match attempt {
                Ok(h) if h.protocol_version == PROTOCOL_VERSION => return Ok(client),
                Ok(h) => {
                    return Err(RuntimeError::ProtocolMismatch { agent: h.protocol_version, host: PROTOCOL_VERSION })
                }
                Err(e) if start.elapsed() >= timeout => return Err(RuntimeError::AgentNotReady(e.to_string())),
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(2));
                }
            }
        }
    }

    async fn sender(&self) -> Result<SendRequest<Body>> {
        let mut g = self.inner.conn.lock().await;
        if let Some(s) = g.as_ref() {
            if !s.is_closed() {
                return Ok(s.clone());
            }
        }
        let stream = tokio::net::UnixStream::connect(&self.inner.socket).await.map_err(transport)?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(transport)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *g = Some(sender.clone());
        Ok(sender)
    }

    async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>> {
        let mut s = self.sender().await?;
        s.ready().await.map_err(transport)?;
        let resp = s.send_request(req).await.map_err(transport)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        // Box-controlled data: read a bounded amount.
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER).collect().await.map_err(transport)?.to_bytes();
        let err = serde_json::from_slice::<AgentError>(&bytes).unwrap_or_else(|_| AgentError {
            kind: ErrorKind::Io,
            message: format!("agent answered {status}: {}", String::from_utf8_lossy(&bytes)),
        });
        Err(RuntimeError::Agent(err))
    }

    fn request(method: Method, uri: &str, body: Body) -> Request<Body> {
        Request::builder().method(method).uri(format!("http://agent{uri}")).body(body).expect("valid request")
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, req: Request<Body>) -> Result<T> {
        let resp = self.send(req).await?;
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER).collect().await.map_err(transport)?.to_bytes();
        serde_json::from_slice(&bytes).map_err(transport)
    }

    pub async fn hello(&self) -> Result<Hello> {
        self.json(Self::request(Method::GET, paths::HELLO, empty())).await
    }

    pub async fn setup(&self, req: &SetupRequest) -> Result<()> {
        let _: serde_json::Value = self.json(Self::request(Method::POST, paths::SETUP, json_body(req))).await?;
        Ok(())
    }

    /// Start a process; frames arrive on the returned stream.
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecStream> {
        let resp = self.send(Self::request(Method::POST, paths::EXEC, json_body(req))).await?;
        Ok(ExecStream { body: resp.into_body(), decoder: FrameDecoder::default(), done: false })
    }

    /// Reattach to an execution: its output from the given offsets, then live, then its exit.
    pub async fn attach(&self, exec_id: &str, stdout: u64, stderr: u64) -> Result<ExecStream> {
        let uri = format!("{}?stdout={stdout}&stderr={stderr}", paths::exec_path(exec_id, "attach"));
        let resp = self.send(Self::request(Method::GET, &uri, empty())).await?;
        Ok(ExecStream { body: resp.into_body(), decoder: FrameDecoder::default(), done: false })
    }

    /// Tell the agent the host has stored everything of a completed execution.
    pub async fn release(&self, exec_id: &str) -> Result<()> {
        let call =
            self.json::<serde_json::Value>(Self::request(Method::POST, &paths::exec_path(exec_id, "release"), empty()));
        tokio::time::timeout(CONTROL_TIMEOUT, call)
            .await
            .map_err(|_| transport("agent did not answer a release"))??;
        Ok(())
    }

    pub async fn signal(&self, exec_id: &str, signal: i32, group: bool) -> Result<()> {
        let body = json_body(&SignalRequest { signal, group });
        let call =
            self.json::<serde_json::Value>(Self::request(Method::POST, &paths::exec_path(exec_id, "signal"), body));
        tokio::time::timeout(CONTROL_TIMEOUT, call).await.map_err(|_| transport("agent did not answer a signal"))??;
        Ok(())
    }

    pub async fn stdin(&self, exec_id: &str, data: Bytes, close: bool) -> Result<()> {
        let uri = format!("{}?close={close}", paths::exec_path(exec_id, "stdin"));
        let body = Full::new(data).map_err(|never| match never {}).boxed_unsync();
        let call = self.json::<serde_json::Value>(Self::request(Method::POST, &uri, body));
        tokio::time::timeout(CONTROL_TIMEOUT, call).await.map_err(|_| transport("agent did not take stdin"))??;
        Ok(())
    }

    /// Stream a file out of the box: its size and its bytes.
    pub async fn read_file(&self, path: &str) -> Result<(u64, ByteStream)> {
        let q = serde_urlencoded::to_string(FileQuery { path: path.into(), uid: 0, gid: 0 }).map_err(transport)?;
        let resp = self.send(Self::request(Method::GET, &format!("{}?{q}", paths::FILES), empty())).await?;
        let size = resp
            .headers()
            .get("x-devbox-file-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let stream = BodyDataStream::new(resp.into_body()).map_err(std::io::Error::other);
        Ok((size, Box::pin(stream)))
    }

    /// Stream a file into the box; returns the bytes written.
    pub async fn write_file(&self, path: &str, uid: u32, gid: u32, data: ByteStream) -> Result<u64> {
        let q = serde_urlencoded::to_string(FileQuery { path: path.into(), uid, gid }).map_err(transport)?;
        let frames = data.map(|r| r.map(hyper::body::Frame::data).map_err(|e| Box::new(e) as BodyError));
        let body = BodyExt::boxed_unsync(StreamBody::new(frames));
        #[derive(serde::Deserialize)]
        struct Written {
            bytes: u64,
        }
        let w: Written = self.json(Self::request(Method::PUT, &format!("{}?{q}", paths::FILES), body)).await?;
        Ok(w.bytes)
    }

    /// Create a terminal session, or report the existing one of that name.
    pub async fn pty_open(&self, req: &PtyOpen) -> Result<PtyInfo> {
        self.json(Self::request(Method::POST, pty::PATH, json_body(req))).await
    }

    /// Attach to a terminal session. Keystrokes go into the returned sender (dropping it
    /// detaches); the stream carries `Stdout` frames (first a redraw of the screen), then one
    /// `Exit` if the session's process ends while attached. Full duplex on one HTTP/2 stream.
    pub async fn pty_attach(
        &self,
        name: &str,
        q: PtyAttachQuery,
    ) -> Result<(tokio::sync::mpsc::Sender<Result<Bytes, BodyError>>, ExecStream)> {
        let uri = format!("{}?{}", pty::path(name, "attach"), serde_urlencoded::to_string(q).map_err(transport)?);
        let (tx, body) = ChannelBody::new(16);
        let resp = self.send(Self::request(Method::POST, &uri, BodyExt::boxed_unsync(body))).await?;
        Ok((tx, ExecStream { body: resp.into_body(), decoder: FrameDecoder::default(), done: false }))
    }

    pub async fn pty_control(&self, name: &str, c: &PtyControl) -> Result<PtyInfo> {
        self.json(Self::request(Method::POST, &pty::path(name, "control"), json_body(c))).await
    }
}

/// Frames of one execution, in order.
pub struct ExecStream {
    body: Incoming,
    decoder: FrameDecoder,
    done: bool,
}

impl ExecStream {
    /// The next frame; `None` once the agent closed the stream.
    pub async fn next(&mut self) -> Result<Option<Frame>> {
        loop {
            if let Some(f) = self.decoder.next_frame().map_err(transport)? {
                return Ok(Some(f));
            }
            if self.done {
                if self.decoder.pending() > 0 {
                    return Err(transport("agent stream ended inside a frame"));
                }
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => return Err(transport(e)),
                None => self.done = true,
            }
        }
    }
}
