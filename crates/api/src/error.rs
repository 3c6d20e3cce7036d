//! Every failure leaves the server as JSON `{"error": {"code", "message"}}` with a status
//! that tells the SDK what happened; client mistakes are never 5xx.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use devbox_core::CoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TimedOut(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TimedOut(_) => (StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::NoSpace(_) => (StatusCode::INSUFFICIENT_STORAGE, "out_of_disk"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        match e {
            CoreError::NotFound(m) => ApiError::NotFound(m),
            CoreError::BadRequest(m) => ApiError::BadRequest(m),
            CoreError::Conflict(m) => ApiError::Conflict(m),
            CoreError::Timeout(m) => ApiError::TimedOut(m),
            CoreError::NoSpace(m) => ApiError::NoSpace(m),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = %self, "internal error");
        }
        let body = serde_json::json!({ "error": { "code": code, "message": self.to_string() } });
        let mut resp = (status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        match status {
            // Long-poll expiry: the SDK retries on 408; say so explicitly.
            StatusCode::REQUEST_TIMEOUT => {
                h.insert("x-should-retry", HeaderValue::from_static("true"));
            }
            // A state conflict will not resolve by retrying the same request at once.
            StatusCode::CONFLICT | StatusCode::INSUFFICIENT_STORAGE => {
                h.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        resp
    }
}
