//! Errors of kv's HTTP APIs: every one is JSON `{"error": ...}` with its
//! status, saying what was wrong and what to do. Bad input is a 4xx, never
//! a 500 or a dropped connection.

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An HTTP error: a status and a message for the caller.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    /// A 400 saying `message`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, message.into())
    }

    /// A body that could not be read; `too_large` says what the limit is
    /// when that was why.
    pub fn body(rejection: BytesRejection, too_large: &str) -> ApiError {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError(StatusCode::PAYLOAD_TOO_LARGE, too_large.to_string())
            }
            status => ApiError(status, rejection.body_text()),
        }
    }

    /// A 404 for a route that does not exist; `routes` lists those that do.
    pub fn no_route(uri: &Uri, routes: &str) -> ApiError {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no route {}: {routes}", uri.path()),
        )
    }

    /// A 405; `allowed` says which methods go where.
    pub fn not_allowed(method: &Method, uri: &Uri, allowed: &str) -> ApiError {
        ApiError(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {}: {allowed}", uri.path()),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad_request(format!("invalid query string: {}", r.body_text()))
    }
}
