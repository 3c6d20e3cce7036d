//! Extractors with JSON errors: axum's defaults answer 422 or plain text, the SDKs and our
//! contract want 400/413 with a JSON body.

use crate::error::ApiError;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

/// Largest JSON body accepted (write_file_contents carries whole files as strings).
pub const MAX_JSON_BODY: usize = 32 << 20;
/// An oversized body is read and discarded up to this size before answering 413, so the
/// client gets the answer instead of a reset connection.
const MAX_DRAIN: usize = 512 << 20;

pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let mut body = req.into_body();
        let mut buf = Vec::new();
        let mut too_large = false;
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                seen += data.len();
                if seen > MAX_JSON_BODY {
                    too_large = true;
                    buf = Vec::new();
                    if seen > MAX_DRAIN {
                        break;
                    }
                } else {
                    buf.extend_from_slice(&data);
                }
            }
        }
        if too_large {
            return Err(ApiError::TooLarge(format!(
                "request body exceeds {} MiB: use upload_file for large files",
                MAX_JSON_BODY >> 20
            )));
        }
        let bytes: &[u8] = if buf.iter().all(|b| b.is_ascii_whitespace()) { b"{}" } else { &buf };
        serde_json::from_slice(bytes).map(Json).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

/// Query string parsed with serde; bad values are a 400 naming the problem.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let q = parts.uri.query().unwrap_or("");
        serde_urlencoded::from_str(q).map(Query).map_err(|e| ApiError::BadRequest(format!("invalid query string: {e}")))
    }
}
