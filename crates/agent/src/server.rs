//! The agent's HTTP/2 service: many executions and transfers share the host's one connection.

use crate::exec::Procs;
use bytes::Bytes;
use devbox_protocol::{
    paths, AgentError, AttachQuery, BodyError, ChannelBody, ErrorKind, ExecRequest, FileQuery, Frame, FrameKind, Hello,
    SetupRequest, SignalRequest, StdinQuery, PROTOCOL_VERSION,
};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::os::unix::net::UnixListener as StdUnixListener;

type Body = BoxBody<Bytes, BodyError>;
/// Control requests are small; a bigger body is a bug on the host side.
const MAX_CONTROL_BODY: usize = 1 << 20;

pub fn run(listener: StdUnixListener) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
        let procs = Procs::default();
        procs.start_reaper().map_err(|e| format!("SIGCHLD handler: {e}"))?;
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("devbox-agent: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let procs = procs.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let procs = procs.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(req, procs).await) }
                });
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.initial_stream_window_size(4 << 20)
                    .initial_connection_window_size(16 << 20)
                    .max_concurrent_streams(4096);
                if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
                    eprintln!("devbox-agent: connection ended: {e}");
                }
            });
        }
    })
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()).map_err(|never| match never {}).boxed())
        .expect("valid response")
}

fn json<T: serde::Serialize>(v: &T) -> Response<Body> {
    full(StatusCode::OK, serde_json::to_vec(v).expect("serializable"))
}

fn error(e: AgentError) -> Response<Body> {
    let status = StatusCode::from_u16(e.kind.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    full(status, serde_json::to_vec(&e).expect("serializable"))
}

fn bad(msg: impl Into<String>) -> AgentError {
    AgentError { kind: ErrorKind::BadRequest, message: msg.into() }
}

async fn body_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, AgentError> {
    let bytes = Limited::new(req.into_body(), MAX_CONTROL_BODY)
        .collect()
        .await
        .map_err(|e| bad(format!("read body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("bad json: {e}")))
}

fn query<T: serde::de::DeserializeOwned>(req: &Request<Incoming>) -> Result<T, AgentError> {
    serde_urlencoded::from_str(req.uri().query().unwrap_or("")).map_err(|e| bad(format!("bad query: {e}")))
}

async fn route(req: Request<Incoming>, procs: Procs) -> Response<Body> {
    let path = req.uri().path().to_string();
    let result = match (req.method().clone(), path.as_str()) {
        (Method::GET, paths::HELLO) => Ok(json(&Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
        })),
        (Method::POST, paths::SETUP) => match body_json::<SetupRequest>(req).await {
            Ok(s) => crate::setup::setup(&s).map(|()| json(&serde_json::json!({}))),
            Err(e) => Err(e),
        },
        (Method::POST, paths::EXEC) => exec(req, procs).await,
        (Method::GET, paths::FILES) => get_file(&req).await,
        (Method::PUT, paths::FILES) => match query::<FileQuery>(&req) {
            Ok(q) => crate::files::write(&q, req.into_body()).await.map(|n| json(&serde_json::json!({ "bytes": n }))),
            Err(e) => Err(e),
        },
        (_, p) if p.starts_with("/v1/exec/") => exec_action(req, procs).await,
        (_, p) if p == devbox_protocol::pty::PATH || p.starts_with("/v1/pty/") => crate::pty::route(req, &procs).await,
        _ => Err(AgentError { kind: ErrorKind::NotFound, message: format!("no route {path}") }),
    };
    result.unwrap_or_else(error)
}

async fn exec(req: Request<Incoming>, procs: Procs) -> Result<Response<Body>, AgentError> {
    let er: ExecRequest = body_json(req).await?;
    let (tx, body) = ChannelBody::new(8);
    match procs.spawn(er) {
        Ok(id) => procs.attach(&id, 0, 0, tx)?,
        // Reported in-band so the host handles every exec outcome on one path.
        Err(e) => {
            let _ = tx.send(Ok(Frame::json(FrameKind::Error, &e).encode())).await;
        }
    }
    Ok(Response::builder()
        .header("content-type", "application/vnd.devbox.frames")
        .body(body.boxed())
        .expect("valid response"))
}

async fn exec_action(req: Request<Incoming>, procs: Procs) -> Result<Response<Body>, AgentError> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches("/v1/exec/").splitn(2, '/');
    let (id, action) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or(""));
    match (req.method().clone(), action) {
        (Method::GET, "attach") => {
            let q: AttachQuery = query(&req)?;
            let (tx, body) = ChannelBody::new(8);
            procs.attach(&id, q.stdout, q.stderr, tx)?;
            return Ok(Response::builder()
                .header("content-type", "application/vnd.devbox.frames")
                .body(body.boxed())
                .expect("valid response"));
        }
        (Method::POST, "release") => procs.release(&id)?,
        (Method::POST, "signal") => {
            let s: SignalRequest = body_json(req).await?;
            procs.signal(&id, s.signal, s.group)?;
        }
        (Method::POST, "stdin") => {
            let q: StdinQuery = query(&req)?;
            let data = Limited::new(req.into_body(), 16 << 20)
                .collect()
                .await
                .map_err(|e| bad(format!("read stdin body: {e}")))?
                .to_bytes();
            procs.write_stdin(&id, data, q.close).await?;
        }
        _ => return Err(AgentError { kind: ErrorKind::NotFound, message: format!("no route {path}") }),
    }
    Ok(json(&serde_json::json!({})))
}

async fn get_file(req: &Request<Incoming>) -> Result<Response<Body>, AgentError> {
    let q: FileQuery = query(req)?;
    let (tx, body) = ChannelBody::new(8);
    let len = crate::files::read(&q, tx).await?;
    Ok(Response::builder()
        .header("content-type", "application/octet-stream")
        .header("x-devbox-file-size", len)
        .body(body.boxed())
        .expect("valid response"))
}
