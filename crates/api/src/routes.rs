//! `/v1/devboxes…` handlers.

use crate::error::ApiError;
use crate::extract::{Json, Query};
use crate::views;
use crate::{AppState, Tenant};
use axum::body::Body;
use axum::extract::{Multipart, Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use devbox_core::{
    CreateDevbox, ExecParams, ExecStatus, Execution, MetadataFilter, SnapshotParams, SnapshotStatus, Status,
    CREATE_HOLD,
};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

type R = Result<Response, ApiError>;

const DEVBOX_HOLD_MAX: f64 = 30.0;
const EXEC_HOLD_MAX: f64 = 25.0;
/// execute_sync answers by then (the SDK's read timeout for it is 600 s).
const EXECUTE_SYNC_MAX: Duration = Duration::from_secs(590);
/// How long one SSE connection is held before it ends with a 408 event (clients reconnect).
const STREAM_HOLD: Duration = Duration::from_secs(25);

pub fn v1() -> Router<AppState> {
    Router::new()
        .route("/v1/devboxes", post(create).get(list))
        .route("/v1/devboxes/create_and_await_running", post(create_and_await))
        .route("/v1/devboxes/{id}", get(get_devbox).post(update))
        .route("/v1/devboxes/{id}/wait_for_status", post(wait_for_status))
        .route("/v1/devboxes/{id}/shutdown", post(shutdown))
        .route("/v1/devboxes/{id}/suspend", post(suspend))
        .route("/v1/devboxes/{id}/resume", post(resume))
        .route("/v1/devboxes/{id}/hibernate", post(hibernate))
        .route("/v1/devboxes/{id}/keep_alive", post(keep_alive))
        .route("/v1/devboxes/{id}/usage", get(usage))
        .route("/v1/devboxes/{id}/logs", get(logs))
        .route("/v1/devboxes/{id}/snapshot_disk", post(snapshot_disk))
        .route("/v1/devboxes/{id}/snapshot_disk_async", post(snapshot_disk_async))
        .route("/v1/devboxes/disk_snapshots", get(list_snapshots))
        .route("/v1/devboxes/disk_snapshots/{sid}", post(update_snapshot))
        .route("/v1/devboxes/disk_snapshots/{sid}/delete", post(delete_snapshot))
        .route("/v1/devboxes/disk_snapshots/{sid}/status", get(snapshot_status))
        .route("/v1/devboxes/{id}/execute_sync", post(execute_sync))
        .route("/v1/devboxes/{id}/execute_async", post(execute_async))
        .route("/v1/devboxes/{id}/execute", post(execute))
        .route("/v1/devboxes/{id}/executions/{eid}", get(get_execution))
        .route("/v1/devboxes/{id}/executions/{eid}/wait_for_status", post(wait_execution))
        .route("/v1/devboxes/{id}/executions/{eid}/kill", post(kill))
        .route("/v1/devboxes/{id}/executions/{eid}/send_std_in", post(send_std_in))
        .route("/v1/devboxes/{id}/executions/{eid}/stream_stdout_updates", get(stream_stdout))
        .route("/v1/devboxes/{id}/executions/{eid}/stream_stderr_updates", get(stream_stderr))
        .route("/v1/devboxes/{id}/read_file_contents", post(read_file_contents))
        .route("/v1/devboxes/{id}/write_file_contents", post(write_file_contents))
        .route("/v1/devboxes/{id}/upload_file", post(upload_file))
        .route("/v1/devboxes/{id}/download_file", post(download_file))
}

fn ok(v: Value) -> R {
    Ok(axum::Json(v).into_response())
}

fn request_id(h: &HeaderMap) -> Option<String> {
    h.get("x-request-id").and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map(String::from)
}

/// `timeout_seconds` as the SDKs send it (float, int, absent or null), clamped to `max`.
fn hold(timeout: Option<f64>, max: f64) -> Result<Duration, ApiError> {
    match timeout {
        None => Ok(Duration::from_secs_f64(max)),
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Duration::from_secs_f64(t.min(max))),
        Some(_) => Err(ApiError::BadRequest("timeout_seconds must be a non-negative number".into())),
    }
}

// ---- devboxes ---------------------------------------------------------------------------------

async fn create(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    headers: HeaderMap,
    Json(req): Json<CreateDevbox>,
) -> R {
    let d = st.manager.create(&t.0, req, request_id(&headers))?;
    ok(views::devbox(&d))
}

async fn create_and_await(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    headers: HeaderMap,
    Json(req): Json<CreateDevbox>,
) -> R {
    let d = st.manager.create(&t.0, req, request_id(&headers))?;
    let settled =
        [Status::Running, Status::Failure, Status::Shutdown, Status::Suspended, Status::Suspending, Status::Resuming];
    let d = st.manager.wait_for_status(&t.0, &d.id, &settled, CREATE_HOLD).await?.unwrap_or(d);
    ok(views::devbox(&d))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    starting_after: Option<String>,
    include_total_count: Option<bool>,
    status: Option<String>,
}

async fn list(State(st): State<AppState>, Extension(t): Extension<Tenant>, Query(q): Query<ListQuery>) -> R {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}")))?),
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 5000);
    let page = st.manager.list(&t.0, status, limit, q.starting_after.as_deref().filter(|s| !s.is_empty()))?;
    let total = if q.include_total_count.unwrap_or(true) { json!(page.total_count) } else { Value::Null };
    ok(json!({
        "devboxes": page.items.iter().map(views::devbox).collect::<Vec<_>>(),
        "has_more": page.has_more,
        "total_count": total,
    }))
}

async fn get_devbox(State(st): State<AppState>, Extension(t): Extension<Tenant>, Path(id): Path<String>) -> R {
    ok(views::devbox(&st.manager.get(&t.0, &id)?))
}

#[derive(Deserialize)]
struct UpdateBody {
    name: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

async fn update(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(b): Json<UpdateBody>,
) -> R {
    ok(views::devbox(&st.manager.update(&t.0, &id, b.name, b.metadata)?))
}

#[derive(Deserialize)]
struct WaitBody {
    statuses: Vec<String>,
    timeout_seconds: Option<f64>,
}

async fn wait_for_status(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(b): Json<WaitBody>,
) -> R {
    if b.statuses.is_empty() {
        return Err(ApiError::BadRequest("statuses must name at least one status".into()));
    }
    let statuses = b
        .statuses
        .iter()
        .map(|s| Status::parse(s).ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = hold(b.timeout_seconds, DEVBOX_HOLD_MAX)?;
    match st.manager.wait_for_status(&t.0, &id, &statuses, timeout).await? {
        Some(d) => ok(views::devbox(&d)),
        None => Err(ApiError::TimedOut(format!("devbox {id} did not reach {:?} in time: poll again", b.statuses))),
    }
}

#[derive(Deserialize)]
struct ForceQuery {
    force: Option<String>,
}

async fn shutdown(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Query(q): Query<ForceQuery>,
) -> R {
    let force = matches!(q.force.as_deref(), Some("true") | Some("1"));
    ok(views::devbox(&st.manager.shutdown(&t.0, &id, "api_shutdown", force).await?))
}

// ---- snapshots --------------------------------------------------------------------------------

async fn snapshot_disk(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(p): Json<SnapshotParams>,
) -> R {
    let s = st.manager.snapshot_disk(&t.0, &id, p, true).await?;
    if s.status == SnapshotStatus::Error {
        return Err(ApiError::Conflict(format!("snapshot {} failed: {}", s.id, s.error_message.unwrap_or_default())));
    }
    ok(views::snapshot(&s))
}

async fn snapshot_disk_async(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(p): Json<SnapshotParams>,
) -> R {
    ok(views::snapshot(&st.manager.snapshot_disk(&t.0, &id, p, false).await?))
}

async fn snapshot_status(State(st): State<AppState>, Extension(t): Extension<Tenant>, Path(sid): Path<String>) -> R {
    ok(views::snapshot_status(&st.manager.snapshot_status(&t.0, &sid)?))
}

async fn update_snapshot(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(sid): Path<String>,
    Json(p): Json<SnapshotParams>,
) -> R {
    ok(views::snapshot(&st.manager.update_snapshot(&t.0, &sid, p)?))
}

async fn delete_snapshot(State(st): State<AppState>, Extension(t): Extension<Tenant>, Path(sid): Path<String>) -> R {
    st.manager.delete_snapshot(&t.0, &sid)?;
    ok(json!({}))
}

/// Snapshot list: `devbox_id`, pagination, and `metadata[key]=value` / `metadata[key][in]=a,b`.
async fn list_snapshots(State(st): State<AppState>, Extension(t): Extension<Tenant>, RawQuery(raw): RawQuery) -> R {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))?;
    let mut filter = MetadataFilter::default();
    let (mut devbox_id, mut limit, mut after, mut with_total) = (None, 20usize, None, true);
    for (k, v) in pairs {
        match k.as_str() {
            "devbox_id" if !v.is_empty() => devbox_id = Some(v),
            "limit" => {
                limit = v.parse().map_err(|_| ApiError::BadRequest(format!("limit must be a number, got {v:?}")))?
            }
            "starting_after" if !v.is_empty() => after = Some(v),
            "include_total_count" => with_total = v != "false",
            "source_blueprint_id" => {}
            _ => {
                if let Some(key) = k.strip_prefix("metadata[").and_then(|r| r.strip_suffix("][in]")) {
                    filter.any_of.push((key.to_string(), v.split(',').map(String::from).collect()));
                } else if let Some(key) = k.strip_prefix("metadata[").and_then(|r| r.strip_suffix(']')) {
                    filter.equals.push((key.to_string(), v));
                }
            }
        }
    }
    let page =
        st.manager.list_snapshots(&t.0, devbox_id.as_deref(), &filter, limit.clamp(1, 5000), after.as_deref())?;
    ok(json!({
        "snapshots": page.items.iter().map(views::snapshot).collect::<Vec<_>>(),
        "has_more": page.has_more,
        "total_count": if with_total { json!(page.total_count) } else { Value::Null },
    }))
}

async fn suspend(State(st): State<AppState>, Extension(t): Extension<Tenant>, Path(id): Path<String>) -> R {
    ok(views::devbox(&st.manager.suspend(&t.0, &id).await?))
}

async fn resume(State(st): State<AppState>, Extension(t): Extension<Tenant>, Path(id): Path<String>) -> R {
    ok(views::devbox(&st.manager.resume(&t.0, &id).await?))
}

/// devboxd extension: release a box's memory now, keeping its disk.
async fn hibernate(State(st): State<AppState>, Extension(t): Extension<Tenant>, Path(id): Path<String>) -> R {
    ok(views::devbox(&st.manager.hibernate_now(&t.0, &id).await?))
}

async fn keep_alive(State(st): State<AppState>, Extension(t): Extension<Tenant>, Path(id): Path<String>) -> R {
    st.manager.keep_alive(&t.0, &id)?;
    ok(json!({}))
}

async fn usage(State(st): State<AppState>, Extension(t): Extension<Tenant>, Path(id): Path<String>) -> R {
    let (d, live) = st.manager.usage(&t.0, &id)?;
    let end = d.end_time_ms.unwrap_or_else(devbox_core::now_ms);
    let u = d.usage;
    ok(json!({
        "id": d.id,
        "status": d.status.as_str(),
        "start_time_ms": d.create_time_ms,
        "end_time_ms": d.end_time_ms,
        "total_elapsed_seconds": (end - d.create_time_ms).max(0) / 1000,
        "total_active_seconds": u.active_ms / 1000,
        "vcpu_seconds": u.vcpu_seconds.round() as u64,
        "memory_gb_seconds": u.memory_gb_seconds.round() as u64,
        "disk_gb_seconds": u.disk_gb_seconds.round() as u64,
        "memory_bytes": live.memory_bytes,
        "disk_bytes": u.disk_bytes,
        "oom_kills": u.oom_kills.max(live.oom_kills),
    }))
}

#[derive(Deserialize)]
struct LogsQuery {
    execution_id: Option<String>,
    shell_name: Option<String>,
}

async fn logs(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> R {
    let logs = st.manager.logs(
        &t.0,
        &id,
        q.execution_id.as_deref().filter(|s| !s.is_empty()),
        q.shell_name.as_deref().filter(|s| !s.is_empty()),
    )?;
    ok(json!({ "logs": logs }))
}

// ---- executions -------------------------------------------------------------------------------

#[derive(Deserialize)]
struct ExecBody {
    command: String,
    #[serde(default)]
    shell_name: Option<String>,
    #[serde(default)]
    attach_stdin: Option<bool>,
    #[serde(default)]
    command_id: Option<String>,
    #[serde(default)]
    optimistic_timeout: Option<f64>,
}

#[derive(Deserialize)]
struct LastN {
    last_n: Option<String>,
}

impl LastN {
    fn get(&self) -> Result<Option<usize>, ApiError> {
        match self.last_n.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| ApiError::BadRequest(format!("last_n must be a whole number, got {s:?}"))),
        }
    }
}

fn params(b: &ExecBody) -> Result<ExecParams, ApiError> {
    if b.command.trim().is_empty() {
        return Err(ApiError::BadRequest("command must not be empty".into()));
    }
    Ok(ExecParams {
        command: b.command.clone(),
        shell_name: b.shell_name.clone().filter(|s| !s.is_empty()),
        attach_stdin: b.attach_stdin.unwrap_or(false),
        command_id: b.command_id.clone().filter(|s| !s.is_empty()),
    })
}

async fn execute_sync(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(b): Json<ExecBody>,
) -> R {
    let mut p = params(&b)?;
    p.attach_stdin = false;
    let exec = st.manager.exec(&t.0, &id, p)?;
    if !exec.wait_for(&[ExecStatus::Completed], EXECUTE_SYNC_MAX).await {
        return Err(ApiError::TimedOut(format!(
            "execution {} is still running after {} s: follow it with GET …/executions/{}, or use execute_async",
            exec.id,
            EXECUTE_SYNC_MAX.as_secs(),
            exec.id
        )));
    }
    let mut v = json!({
        "devbox_id": id,
        "exit_status": exec.exit_status(),
        "stdout": exec.stdout.all().text,
        "stderr": exec.stderr.all().text,
    });
    if let Some(s) = &exec.shell_name {
        v["shell_name"] = json!(s);
    }
    ok(v)
}

async fn execute_async(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(b): Json<ExecBody>,
) -> R {
    let exec = st.manager.exec(&t.0, &id, params(&b)?)?;
    ok(views::execution(&exec.view(None)))
}

async fn execute(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Query(q): Query<LastN>,
    Json(b): Json<ExecBody>,
) -> R {
    let hold = hold(b.optimistic_timeout, EXEC_HOLD_MAX)?;
    let exec = st.manager.exec(&t.0, &id, params(&b)?)?;
    exec.wait_for(&[ExecStatus::Completed], hold).await;
    ok(views::execution(&exec.view(q.get()?)))
}

async fn get_execution(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path((id, eid)): Path<(String, String)>,
    Query(q): Query<LastN>,
) -> R {
    let exec = st.manager.execution(&t.0, &id, &eid)?;
    ok(views::execution(&exec.view(q.get()?)))
}

#[derive(Deserialize)]
struct ExecWaitBody {
    statuses: Vec<String>,
    timeout_seconds: Option<f64>,
}

async fn wait_execution(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path((id, eid)): Path<(String, String)>,
    Query(q): Query<LastN>,
    Json(b): Json<ExecWaitBody>,
) -> R {
    let last_n = q.get()?;
    if b.statuses.is_empty() {
        return Err(ApiError::BadRequest("statuses must name at least one status".into()));
    }
    let statuses = b
        .statuses
        .iter()
        .map(|s| ExecStatus::parse(s).ok_or_else(|| ApiError::BadRequest(format!("unknown execution status {s:?}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = hold(b.timeout_seconds, EXEC_HOLD_MAX)?;
    let exec = st.manager.execution(&t.0, &id, &eid)?;
    if exec.wait_for(&statuses, timeout).await {
        ok(views::execution(&exec.view(last_n)))
    } else {
        Err(ApiError::TimedOut(format!("execution {eid} did not reach {:?} in time: poll again", b.statuses)))
    }
}

#[derive(Deserialize)]
struct KillBody {
    kill_process_group: Option<bool>,
}

async fn kill(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path((id, eid)): Path<(String, String)>,
    Query(q): Query<LastN>,
    Json(b): Json<KillBody>,
) -> R {
    let exec = st.manager.kill(&t.0, &id, &eid, b.kill_process_group.unwrap_or(true)).await?;
    ok(views::execution(&exec.view(q.get()?)))
}

#[derive(Deserialize)]
struct StdinBody {
    text: Option<String>,
    signal: Option<String>,
}

async fn send_std_in(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path((id, eid)): Path<(String, String)>,
    Json(b): Json<StdinBody>,
) -> R {
    match (&b.text, &b.signal) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ApiError::BadRequest("send exactly one of text or signal".into()));
        }
        (Some(t), None) if t.is_empty() => return Err(ApiError::BadRequest("text must not be empty".into())),
        _ => {}
    }
    st.manager.send_stdin(&t.0, &id, &eid, b.text, b.signal.as_deref()).await?;
    ok(json!({ "devbox_id": id, "execution_id": eid, "success": true }))
}

#[derive(Deserialize)]
struct OffsetQuery {
    offset: Option<String>,
}

async fn stream_stdout(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path((id, eid)): Path<(String, String)>,
    Query(q): Query<OffsetQuery>,
) -> R {
    let exec = st.manager.execution(&t.0, &id, &eid)?;
    sse(exec, q, true)
}

async fn stream_stderr(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path((id, eid)): Path<(String, String)>,
    Query(q): Query<OffsetQuery>,
) -> R {
    let exec = st.manager.execution(&t.0, &id, &eid)?;
    sse(exec, q, false)
}

/// Largest prefix of `b` that does not end inside a UTF-8 sequence.
fn utf8_prefix(b: &[u8]) -> usize {
    match std::str::from_utf8(b) {
        Ok(_) => b.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => b.len(), // invalid bytes in the middle: send as-is (lossy)
    }
}

/// Server-sent events of one output stream from `offset`: each event carries the bytes and
/// the offset after them, so a reconnect with that offset neither loses nor repeats output.
fn sse(exec: Arc<Execution>, q: OffsetQuery, stdout: bool) -> R {
    let offset: u64 = match q.offset.as_deref() {
        None | Some("") => 0,
        Some(s) => {
            s.trim().parse().map_err(|_| ApiError::BadRequest(format!("offset must be a byte offset, got {s:?}")))?
        }
    };
    let stream = futures_util::stream::unfold(
        (exec, offset, tokio::time::Instant::now() + STREAM_HOLD, false),
        move |(exec, mut offset, deadline, done)| async move {
            if done {
                return None;
            }
            let buf = if stdout { &exec.stdout } else { &exec.stderr };
            let mut rx = buf.subscribe();
            loop {
                let (start, bytes) = buf.read_from(offset, 256 * 1024);
                let finished = rx.borrow_and_update().1;
                // Never split a character across events; only bytes that can never complete
                // (output ended, or garbage) go out as they are.
                let mut take = utf8_prefix(&bytes);
                let at_end = start + bytes.len() as u64 >= buf.total();
                if take == 0 && ((finished && at_end) || bytes.len() >= 4) {
                    take = bytes.len();
                }
                if take > 0 {
                    offset = start + take as u64;
                    let data = json!({ "output": String::from_utf8_lossy(&bytes[..take]), "offset": offset });
                    let ev = Bytes::from(format!("data: {data}\n\n"));
                    return Some((Ok::<_, std::io::Error>(ev), (exec, offset, deadline, false)));
                }
                if finished {
                    return None;
                }
                match tokio::time::timeout_at(deadline, rx.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => return None,
                    Err(_) => {
                        let ev = Bytes::from(format!(
                            "event: error\ndata: {}\n\n",
                            json!({ "code": 408, "message": "stream hold expired: reconnect with the last offset" })
                        ));
                        return Some((Ok(ev), (exec, offset, deadline, true)));
                    }
                }
            }
        },
    );
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

// ---- files ------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct ReadBody {
    file_path: String,
}

async fn read_file_contents(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(b): Json<ReadBody>,
) -> R {
    file_response(st.manager.read_file(&t.0, &id, &b.file_path).await?, "text/plain; charset=utf-8")
}

/// A file streamed out of a box, without a Content-Length (see `Manager::read_file`).
fn file_response(stream: devbox_runtime::ByteStream, content_type: &'static str) -> R {
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(stream))
        .expect("valid response"))
}

#[derive(Deserialize)]
struct WriteBody {
    file_path: String,
    contents: String,
}

async fn write_file_contents(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(b): Json<WriteBody>,
) -> R {
    let data = futures_util::stream::once(async move { Ok(Bytes::from(b.contents)) }).boxed();
    st.manager.write_file(&t.0, &id, &b.file_path, data).await?;
    ok(json!({ "devbox_id": id, "exit_status": 0, "stdout": "", "stderr": "" }))
}

#[derive(Deserialize)]
struct DownloadBody {
    path: String,
}

async fn download_file(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    Json(b): Json<DownloadBody>,
) -> R {
    file_response(st.manager.read_file(&t.0, &id, &b.path).await?, "application/octet-stream")
}

/// Multipart `path` then `file`; the file part is streamed into the box, never buffered whole.
async fn upload_file(
    State(st): State<AppState>,
    Extension(t): Extension<Tenant>,
    Path(id): Path<String>,
    mut mp: Multipart,
) -> R {
    let bad =
        |e: axum::extract::multipart::MultipartError| ApiError::BadRequest(format!("invalid multipart body: {e}"));
    let mut path: Option<String> = None;
    let mut written = None;
    while let Some(field) = mp.next_field().await.map_err(bad)? {
        match field.name() {
            Some("path") => path = Some(field.text().await.map_err(bad)?),
            Some("file") => {
                let Some(p) = path.clone() else {
                    return Err(ApiError::BadRequest("multipart field `path` must come before `file`".into()));
                };
                // The field borrows the multipart reader, so chunks cross to the writer
                // task through a small channel (bounded memory, back-pressure intact).
                let mut field = field;
                let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
                let stream =
                    futures_util::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|x| (x, rx)) }).boxed();
                let (mgr, tenant, idc) = (st.manager.clone(), t.0.clone(), id.clone());
                let writer = tokio::spawn(async move { mgr.write_file(&tenant, &idc, &p, stream).await });
                loop {
                    match field.chunk().await {
                        Ok(Some(c)) => {
                            if tx.send(Ok(c)).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                            drop(tx);
                            let _ = writer.await;
                            return Err(ApiError::BadRequest(format!("upload interrupted: {e}")));
                        }
                    }
                }
                drop(tx);
                let n = writer.await.map_err(|e| ApiError::Internal(e.to_string()))??;
                written = Some(n);
            }
            _ => {}
        }
    }
    match (path, written) {
        (None, _) => Err(ApiError::BadRequest("multipart field `path` is required".into())),
        (Some(_), None) => Err(ApiError::BadRequest("multipart field `file` is required".into())),
        (Some(_), Some(_)) => ok(json!({})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_clamps_and_rejects_bad_values() {
        assert_eq!(hold(None, 30.0).unwrap(), Duration::from_secs(30));
        assert_eq!(hold(Some(99.0), 25.0).unwrap(), Duration::from_secs(25));
        assert_eq!(hold(Some(1.5), 25.0).unwrap(), Duration::from_millis(1500));
        assert!(hold(Some(-1.0), 25.0).is_err());
        assert!(hold(Some(f64::NAN), 25.0).is_err());
    }

    #[test]
    fn utf8_prefix_never_ends_inside_a_character() {
        let s = "a€b".as_bytes(); // € is three bytes
        assert_eq!(utf8_prefix(s), s.len());
        assert_eq!(utf8_prefix(&s[..2]), 1);
        assert_eq!(utf8_prefix(&s[..3]), 1);
        assert_eq!(utf8_prefix(&s[..4]), 4);
        assert_eq!(utf8_prefix(b"\xff\xfeab"), 4, "invalid bytes pass through");
    }

    #[test]
    fn last_n_parses_whole_numbers_only() {
        assert_eq!(LastN { last_n: None }.get().unwrap(), None);
        assert_eq!(LastN { last_n: Some("".into()) }.get().unwrap(), None);
        assert_eq!(LastN { last_n: Some(" 5 ".into()) }.get().unwrap(), Some(5));
        assert!(LastN { last_n: Some("-1".into()) }.get().is_err());
        assert!(LastN { last_n: Some("ten".into()) }.get().is_err());
    }

    #[test]
    fn exec_params_reject_empty_commands() {
        let b = |c: &str| ExecBody {
            command: c.into(),
            shell_name: Some(String::new()),
            attach_stdin: None,
            command_id: Some(String::new()),
            optimistic_timeout: None,
        };
        assert!(params(&b("  ")).is_err());
        let p = params(&b("ls")).unwrap();
        assert_eq!((p.shell_name, p.command_id, p.attach_stdin), (None, None, false));
    }
}
