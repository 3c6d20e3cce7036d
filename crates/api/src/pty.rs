//! Interactive terminals: the Runloop PTY protocol, served by devboxd itself.
//!
//! `POST /v1/devboxes/{id}/create_pty_tunnel` (API key) answers `{tunnel_key, auth_token}`.
//! The `/pty/…` routes take that token instead of the API key (`Authorization: Bearer`,
//! `X-Runloop-Tunnel-Authorization: Bearer`, `?token=`, or the WebSocket subprotocol as rl-cli
//! sends it). The box is named by the Host header `13-{tunnel_key}.tunnel.<domain>` (the
//! Runloop tunnel origin) or, for clients that cannot set Host, by the token alone: a token
//! opens its own box and no other.
//!
//! Tunnels live in this process's memory: after a restart clients ask for a new one. The
//! sessions themselves live in the box's agent and survive a server restart.
//!
//! The WebSocket carries raw terminal bytes as binary frames both ways. When the session's
//! process ends, the server sends the last output, then a close frame with code 1000 and the
//! reason `{"status":"exited","exit_code":N}` (N = 128 + signal for a killed shell).

use crate::error::ApiError;
use crate::extract::{Json, Query};
use crate::{AppState, Tenant};
use axum::extract::rejection::PathRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use devbox_core::CoreError;
use devbox_protocol::pty::{self as proto, PtyAttachQuery, PtyControl, PtyOpen};
use devbox_protocol::{BodyError, ErrorKind, Exit, FrameKind};
use devbox_runtime::{ExecStream, RuntimeError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type R = Result<Response, ApiError>;
type Input = tokio::sync::mpsc::Sender<Result<Bytes, BodyError>>;

/// The port label of PTY tunnel hosts (Runloop's in-box PTY server listens on port 13).
const TUNNEL_PORT_LABEL: &str = "13-";
/// How long a closing WebSocket waits for the client's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

struct Tunnel {
    key: String,
    token: String,
    tenant: String,
    devbox_id: String,
}

/// One tunnel per box, made on first request; bounded by the number of boxes.
#[derive(Default)]
struct Tunnels {
    by_box: HashMap<String, Arc<Tunnel>>,
    by_key: HashMap<String, Arc<Tunnel>>,
    by_token: HashMap<String, Arc<Tunnel>>,
}

#[derive(Clone)]
struct PtyState {
    app: AppState,
    tunnels: Arc<Mutex<Tunnels>>,
}

/// What the tunnel-token middleware established.
#[derive(Clone)]
struct Authed {
    tunnel: Arc<Tunnel>,
    /// The token came as a WebSocket subprotocol: the upgrade must echo it.
    subprotocol: Option<String>,
}

pub fn router(app: AppState) -> Router {
    let st = PtyState { app: app.clone(), tunnels: Arc::default() };
    let create = Router::new()
        .route("/v1/devboxes/{id}/create_pty_tunnel", post(create_tunnel))
        .route_layer(axum::middleware::from_fn_with_state(app, crate::auth));
    Router::new()
        .route("/pty/{name}", get(connect))
        .route("/pty/{name}/attach", get(attach))
        .route("/pty/{name}/control", post(control))
        .route_layer(axum::middleware::from_fn_with_state(st.clone(), tunnel_auth))
        .merge(create)
        .with_state(st)
}

fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).map_err(|e| ApiError::Internal(format!("random: {e}")))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

async fn create_tunnel(
    State(st): State<PtyState>,
    Extension(t): Extension<Tenant>,
    id: Result<Path<String>, PathRejection>,
) -> R {
    let id = path_param(id)?;
    st.app.manager.get(&t.0, &id)?;
    let mut g = st.tunnels.lock().unwrap();
    let tunnel = match g.by_box.get(&id) {
        Some(tun) => tun.clone(),
        None => {
            let tun = Arc::new(Tunnel {
                // A DNS label: lowercase letters and digits.
                key: format!("tk{}", random_hex(8)?),
                token: format!("pty_{}", random_hex(24)?),
                tenant: t.0.clone(),
                devbox_id: id.clone(),
            });
            g.by_box.insert(id, tun.clone());
            g.by_key.insert(tun.key.clone(), tun.clone());
            g.by_token.insert(tun.token.clone(), tun.clone());
            tun
        }
    };
    Ok(axum::Json(json!({ "tunnel_key": tunnel.key, "auth_token": tunnel.token })).into_response())
}

fn bearer(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<String> {
    let v = h.get(name)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

/// The tunnel key of a `13-{key}.tunnel.<domain>` host, if the request names one.
fn host_tunnel_key(headers: &HeaderMap, uri: &Uri) -> Option<String> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| uri.host())?;
    let host = host.trim().to_ascii_lowercase();
    let mut labels = host.split('.');
    let key = labels.next()?.strip_prefix(TUNNEL_PORT_LABEL)?;
    (labels.next()? == "tunnel" && !key.is_empty()).then(|| key.to_string())
}

/// Equal strings, in time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl PtyState {
    fn authenticate(&self, headers: &HeaderMap, uri: &Uri) -> Result<Authed, ApiError> {
        let mut candidates: Vec<(String, bool)> = Vec::new();
        for h in ["x-runloop-tunnel-authorization", "authorization"] {
            candidates.extend(bearer(headers, h).map(|t| (t, false)));
        }
        if let Some(q) = uri.query() {
            candidates.extend(
                serde_urlencoded::from_str::<Vec<(String, String)>>(q)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(k, v)| k == "token" && !v.is_empty())
                    .map(|(_, v)| (v, false)),
            );
        }
        for v in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
            candidates.extend(
                v.to_str().unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()).map(|p| (p.into(), true)),
            );
        }
        if candidates.is_empty() {
            return Err(ApiError::Unauthorized(
                "missing tunnel token: send Authorization: Bearer <auth_token from create_pty_tunnel>".into(),
            ));
        }
        let g = self.tunnels.lock().unwrap();
        let found = match host_tunnel_key(headers, uri) {
            Some(key) => {
                let tunnel = g.by_key.get(&key).ok_or_else(|| ApiError::NotFound(format!("no tunnel {key}")))?;
                candidates.into_iter().find(|(t, _)| same_secret(t, &tunnel.token)).map(|c| (tunnel.clone(), c))
            }
            None => candidates.into_iter().find_map(|c| g.by_token.get(&c.0).map(|t| (t.clone(), c))),
        };
        let (tunnel, (token, via_subprotocol)) =
            found.ok_or_else(|| ApiError::Unauthorized("invalid tunnel token for this devbox".into()))?;
        Ok(Authed { tunnel, subprotocol: via_subprotocol.then_some(token) })
    }
}

/// Authenticate before any extractor runs, so a bad token is a 401 whatever else is wrong.
async fn tunnel_auth(State(st): State<PtyState>, mut req: Request, next: Next) -> Response {
    match st.authenticate(req.headers(), req.uri()) {
        Ok(a) => {
            req.extensions_mut().insert(a);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// A path parameter, with a JSON 400 instead of axum's plain-text one (bad percent-encoding).
fn path_param(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(v)| v).map_err(|e| ApiError::BadRequest(format!("invalid path: {e}")))
}

fn session_name(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let name = path_param(p)?;
    if proto::valid_session_name(&name) {
        Ok(name)
    } else {
        Err(ApiError::BadRequest("session_name must be 1-256 letters, digits, '-' or '_'".into()))
    }
}

/// A terminal dimension from a query string or JSON (numbers or numeric strings).
fn dim(v: Option<&Value>, what: &str, max: u16) -> Result<Option<u16>, ApiError> {
    let n = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(_) => None,
    };
    match n {
        Some(n) if (1..=u64::from(max)).contains(&n) => Ok(Some(n as u16)),
        _ => Err(ApiError::BadRequest(format!("{what} must be a whole number from 1 to {max}"))),
    }
}

/// Linux signal numbers by name (`SIGINT` or `INT`, any case).
fn signal_number(v: Option<&Value>) -> Result<i32, ApiError> {
    const SIGNALS: [(&str, i32); 13] = [
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("KILL", 9),
        ("USR1", 10),
        ("USR2", 12),
        ("ALRM", 14),
        ("TERM", 15),
        ("CONT", 18),
        ("STOP", 19),
        ("TSTP", 20),
        ("WINCH", 28),
        ("ABRT", 6),
    ];
    let name = match v {
        Some(Value::String(s)) => s.trim().to_ascii_uppercase(),
        _ => return Err(ApiError::BadRequest("signal must be a signal name such as \"SIGINT\"".into())),
    };
    let bare = name.strip_prefix("SIG").unwrap_or(&name);
    SIGNALS
        .iter()
        .find(|(n, _)| *n == bare)
        .map(|(_, s)| *s)
        .ok_or_else(|| ApiError::BadRequest(format!("unknown signal {name:?}")))
}

fn agent_error(e: RuntimeError) -> ApiError {
    match e {
        // An agent from before terminals existed (a box created by an older devboxd).
        RuntimeError::Agent(a) if a.kind == ErrorKind::NotFound && a.message.starts_with("no route") => {
            ApiError::Conflict("this devbox's agent has no terminal support: create a new devbox".into())
        }
        RuntimeError::Agent(a) => match a.kind {
            ErrorKind::NotFound => ApiError::NotFound(a.message),
            ErrorKind::BadRequest => ApiError::BadRequest(a.message),
            ErrorKind::Conflict => ApiError::Conflict(a.message),
            _ => ApiError::Internal(a.message),
        },
        other => ApiError::from(CoreError::Runtime(other)),
    }
}

#[derive(Deserialize)]
struct SizeQuery {
    cols: Option<String>,
    rows: Option<String>,
    /// devboxd extension: run this command (`bash -lc`) instead of a login shell.
    command: Option<String>,
}

impl SizeQuery {
    fn size(&self) -> Result<(Option<u16>, Option<u16>), ApiError> {
        let v = |s: &Option<String>| s.clone().map(Value::String);
        Ok((
            dim(v(&self.cols).as_ref(), "cols", proto::PTY_MAX_COLS)?,
            dim(v(&self.rows).as_ref(), "rows", proto::PTY_MAX_ROWS)?,
        ))
    }
}

/// `GET /pty/{session_name}`: create the session (a login shell as the box's user) or report it.
async fn connect(
    State(st): State<PtyState>,
    Extension(a): Extension<Authed>,
    name: Result<Path<String>, PathRejection>,
    Query(q): Query<SizeQuery>,
) -> R {
    let name = session_name(name)?;
    let (cols, rows) = q.size()?;
    if q.command.as_deref().is_some_and(|c| c.trim().is_empty() || c.contains('\0')) {
        return Err(ApiError::BadRequest("command must be a non-empty string without NUL bytes".into()));
    }
    let (agent, user, env) = st.app.manager.agent_for(&a.tunnel.tenant, &a.tunnel.devbox_id)?;
    let open = PtyOpen {
        name,
        cols: cols.unwrap_or(proto::PTY_DEFAULT_COLS),
        rows: rows.unwrap_or(proto::PTY_DEFAULT_ROWS),
        user,
        env,
        command: q.command,
        idle_ttl_seconds: None,
    };
    let info = agent.pty_open(&open).await.map_err(agent_error)?;
    // The attaching client's size wins over the session's current one.
    let (c, r) = (cols.unwrap_or(info.cols), rows.unwrap_or(info.rows));
    let mut v = json!({
        "session_name": info.name,
        "status": info.status.as_str(),
        "protocol_version": "1",
        "connect_url": format!("/pty/{}/attach?cols={c}&rows={r}", info.name),
        "created": info.created,
        "attached": info.attached,
        "cols": info.cols,
        "rows": info.rows,
        "idle_ttl_seconds": info.idle_ttl_seconds,
    });
    if let Some(exit) = info.exit {
        v["exit_code"] = json!(exit.status());
    }
    Ok(axum::Json(v).into_response())
}

/// `GET /pty/{session_name}/attach`: the WebSocket. The agent attach happens before the
/// upgrade, so a missing session (404) or a second client (409) is refused with a status.
async fn attach(
    State(st): State<PtyState>,
    Extension(a): Extension<Authed>,
    name: Result<Path<String>, PathRejection>,
    Query(q): Query<SizeQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> R {
    let name = session_name(name)?;
    let (cols, rows) = q.size()?;
    let mut ws = ws.map_err(|e| ApiError::BadRequest(format!("this endpoint takes a WebSocket upgrade: {e}")))?;
    let (agent, _, _) = st.app.manager.agent_for(&a.tunnel.tenant, &a.tunnel.devbox_id)?;
    let (input, output) = agent.pty_attach(&name, PtyAttachQuery { cols, rows }).await.map_err(agent_error)?;
    if let Some(p) = a.subprotocol {
        ws = ws.protocols([p]);
    }
    Ok(ws.on_upgrade(move |socket| bridge(socket, input, output)).into_response())
}

#[derive(Deserialize)]
struct ControlBody {
    action: Option<String>,
    cols: Option<Value>,
    rows: Option<Value>,
    signal: Option<Value>,
}

/// `POST /pty/{session_name}/control`: resize, signal or close.
async fn control(
    State(st): State<PtyState>,
    Extension(a): Extension<Authed>,
    name: Result<Path<String>, PathRejection>,
    Json(b): Json<ControlBody>,
) -> R {
    let name = session_name(name)?;
    let c = match b.action.as_deref() {
        Some("resize") => {
            let cols = dim(b.cols.as_ref(), "cols", proto::PTY_MAX_COLS)?;
            let rows = dim(b.rows.as_ref(), "rows", proto::PTY_MAX_ROWS)?;
            match (cols, rows) {
                (Some(cols), Some(rows)) => PtyControl::Resize { cols, rows },
                _ => return Err(ApiError::BadRequest("resize needs cols and rows".into())),
            }
        }
        Some("signal") => PtyControl::Signal { signal: signal_number(b.signal.as_ref())? },
        Some("close") => PtyControl::Close,
        Some(other) => {
            return Err(ApiError::BadRequest(format!("unknown action {other:?}: use resize, signal or close")))
        }
        None => return Err(ApiError::BadRequest("action is required: resize, signal or close".into())),
    };
    let (agent, _, _) = st.app.manager.agent_for(&a.tunnel.tenant, &a.tunnel.devbox_id)?;
    let info = agent.pty_control(&name, &c).await.map_err(agent_error)?;
    Ok(axum::Json(json!({ "session_name": info.name, "status": info.status.as_str() })).into_response())
}

fn close_frame(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

/// Pump bytes between the WebSocket and the agent's attach stream. The client leaving
/// (close, error) drops both halves, which detaches at the agent; the session lives on.
async fn bridge(mut ws: WebSocket, input: Input, mut output: ExecStream) {
    let close = loop {
        tokio::select! {
            f = output.next() => match f {
                Ok(Some(f)) => match f.kind {
                    FrameKind::Stdout | FrameKind::Stderr => {
                        let sent = ws.send(Message::Binary(f.payload)).await;
                        if sent.is_err() {
                            return;
                        }
                    }
                    FrameKind::Exit => {
                        let code = serde_json::from_slice::<Exit>(&f.payload).map(|e| e.status()).unwrap_or(-1);
                        break close_frame(1000, json!({ "status": "exited", "exit_code": code }).to_string());
                    }
                    FrameKind::Error => break close_frame(1011, "terminal error".into()),
                    _ => {}
                },
                // The agent went away (box stopped) without an exit status.
                Ok(None) | Err(_) => break close_frame(1011, "lost the terminal: the devbox stopped".into()),
            },
            m = ws.recv() => match m {
                Some(Ok(Message::Binary(b))) => {
                    let _ = input.send(Ok(b)).await;
                }
                Some(Ok(Message::Text(t))) => {
                    let _ = input.send(Ok(Bytes::copy_from_slice(t.as_str().as_bytes()))).await;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
            },
        }
    };
    drop(input);
    if ws.send(close).await.is_ok() {
        // Let the client answer the close handshake, so it sees a clean close.
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while let Some(Ok(m)) = ws.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn tunnel_hosts() {
        let uri: Uri = "/pty/x".parse().unwrap();
        let key = |host: &str| host_tunnel_key(&headers(&[("host", host)]), &uri);
        assert_eq!(key("13-tkabc.tunnel.example.com"), Some("tkabc".into()));
        assert_eq!(key("13-TKabc.Tunnel.localhost:8080"), Some("tkabc".into()));
        assert_eq!(key("8080-tkabc.tunnel.example.com"), None);
        assert_eq!(key("13-tkabc.example.com"), None);
        assert_eq!(key("127.0.0.1:8080"), None);
        assert_eq!(key("13-.tunnel.x"), None);
    }

    #[test]
    fn bearer_tokens() {
        let h = headers(&[("authorization", "Bearer  abc "), ("x-runloop-tunnel-authorization", "bearer xyz")]);
        assert_eq!(bearer(&h, "authorization"), Some("abc".into()));
        assert_eq!(bearer(&h, "x-runloop-tunnel-authorization"), Some("xyz".into()));
        assert_eq!(bearer(&headers(&[("authorization", "Basic abc")]), "authorization"), None);
        assert_eq!(bearer(&headers(&[("authorization", "Bearer ")]), "authorization"), None);
        assert!(same_secret("abc", "abc") && !same_secret("abc", "abd") && !same_secret("abc", "ab"));
    }

    #[test]
    fn sizes_and_signals() {
        assert_eq!(dim(Some(&json!(80)), "cols", 1000).unwrap(), Some(80));
        assert_eq!(dim(Some(&json!("24")), "rows", 500).unwrap(), Some(24));
        assert_eq!(dim(None, "rows", 500).unwrap(), None);
        for bad in [json!(0), json!(1001), json!(-1), json!(2.5), json!("x"), json!([1])] {
            assert!(dim(Some(&bad), "cols", 1000).is_err(), "{bad}");
        }
        assert_eq!(signal_number(Some(&json!("SIGINT"))).unwrap(), 2);
        assert_eq!(signal_number(Some(&json!("term"))).unwrap(), 15);
        assert!(signal_number(Some(&json!("SIGFOO"))).is_err());
        assert!(signal_number(Some(&json!(2))).is_err());
        assert!(signal_number(None).is_err());
    }
}
