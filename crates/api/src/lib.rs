//! The Runloop-compatible HTTP API. Requests enter here, are authenticated to a tenant, parsed
//! into typed core calls and answered with Runloop's JSON shapes.

mod error;
mod extract;
mod metrics;
mod pty;
mod routes;
mod views;

pub use error::ApiError;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use devbox_core::Manager;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<Manager>,
    /// API key -> tenant id.
    pub keys: Arc<HashMap<String, String>>,
    /// For host disk metrics.
    pub data_dir: Option<std::path::PathBuf>,
}

/// The tenant a request was authenticated as.
#[derive(Clone, Debug)]
pub struct Tenant(pub String);

async fn auth(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty());
    let Some(key) = key else {
        return ApiError::Unauthorized("missing API key: send Authorization: Bearer <key>".into()).into_response();
    };
    let Some(tenant) = st.keys.get(key) else {
        return ApiError::Unauthorized("invalid API key".into()).into_response();
    };
    req.extensions_mut().insert(Tenant(tenant.clone()));
    next.run(req).await
}

pub fn router(state: AppState) -> Router {
    let metrics_state = state.clone();
    let pty = pty::router(state.clone());
    let v1 = routes::v1().route_layer(axum::middleware::from_fn_with_state(state.clone(), auth)).with_state(state);
    Router::new()
        .route("/healthz", axum::routing::get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }))
        .route("/metrics", axum::routing::get(move || metrics::render(metrics_state.clone())))
        .merge(v1)
        .merge(pty)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async {
            (
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(serde_json::json!({
                    "error": { "code": "method_not_allowed", "message": "method not allowed on this route" }
                })),
            )
        })
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// Safety net: axum's own rejections (a path segment that is not UTF-8, a malformed
/// multipart or WebSocket request...) answer in plain text; the API promises JSON errors.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 10).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    let code = if status.is_server_error() { "internal" } else { "bad_request" };
    let mut out =
        (status, axum::Json(serde_json::json!({ "error": { "code": code, "message": message } }))).into_response();
    for (k, v) in parts.headers.iter() {
        if k != axum::http::header::CONTENT_TYPE && k != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}
