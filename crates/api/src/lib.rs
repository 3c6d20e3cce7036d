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
        .layer(axum::extract::DefaultBodyLimit::disable())
}
