//! The worker's HTTP API: `PUT/GET/DELETE /kv`, `/healthz`, `/readyz`,
//! `/metrics`.
//! Errors are JSON `{"error": ...}`: 4xx for the caller's fault, 503 when
//! the cluster cannot do it now (retry), never a 500 for bad input.

use crate::node::{Node, OpError};
use crate::store::Stored;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use kv_service::ApiError;
use kv_wire::Version;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        let status = match e {
            OpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OpError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            OpError::WriteQuorum { .. }
            | OpError::ReadQuorum { .. }
            | OpError::NotOwner { .. }
            | OpError::Unavailable
            | OpError::OwnersDown(_)
            | OpError::Storage(_)
            | OpError::Primary(_)
            | OpError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, e.to_string())
    }
}

/// A body that could not be read, as the caller should hear it.
fn body_error(r: BytesRejection) -> ApiError {
    ApiError::body(
        r,
        "request body is too large: values are limited (see --max-value-size)",
    )
}

/// The routes. `max_value` sizes the body limit: a JSON string may escape
/// each byte of a value into up to six.
/// With `test_hooks`, also `POST /test/forget`.
pub fn router(node: Arc<Node>, test_hooks: bool) -> Router {
    let body_limit = node
        .limits
        .max_value
        .saturating_mul(6)
        .saturating_add(64 * 1024);
    let router = if test_hooks {
        Router::new().route("/test/forget", axum::routing::post(forget))
    } else {
        Router::new()
    };
    router
        .route("/kv", get(get_kv).put(put_kv).delete(delete_kv))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(node)
}

#[derive(Deserialize)]
struct PutBody {
    key: String,
    value: String,
}

/// The answer to a write, its fields in SPEC's order.
#[derive(Serialize)]
struct WrittenBody {
    key: String,
    #[serde(serialize_with = "as_text")]
    version: Version,
    acks: u8,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
}

/// The answer to a read.
#[derive(Serialize)]
struct ValueBody {
    key: String,
    value: String,
    #[serde(serialize_with = "as_text")]
    version: Version,
}

/// A version as the text SPEC shows (`millis.logical@node`).
fn as_text<S: serde::Serializer>(version: &Version, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(version)
}

async fn put_kv(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<WrittenBody>, ApiError> {
    let body: PutBody = serde_json::from_slice(&body.map_err(body_error)?).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid body ({e}); send {{\"key\":\"...\",\"value\":\"...\"}}"),
        )
    })?;
    let result = node
        .write(body.key.clone(), Some(Bytes::from(body.value)))
        .await;
    node.metrics
        .count("put", result.as_ref().map_or_else(OpError::label, |_| "ok"));
    let written = result?;
    Ok(Json(WrittenBody {
        key: body.key,
        version: written.version,
        acks: written.acks,
        deleted: false,
    }))
}

#[derive(Deserialize)]
struct KeyQuery {
    key: Option<String>,
    consistency: Option<String>,
}

impl KeyQuery {
    fn key(self) -> Result<(String, Option<String>), ApiError> {
        match self.key {
            Some(key) => Ok((key, self.consistency)),
            None => Err(ApiError(
                StatusCode::BAD_REQUEST,
                "missing query parameter \"key\": use /kv?key=K".into(),
            )),
        }
    }
}

async fn get_kv(
    State(node): State<Arc<Node>>,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Json<ValueBody>, ApiError> {
    let (key, consistency) = query?.0.key()?;
    node.validate(&key, None)?;
    let (op, copy) = match consistency.as_deref() {
        None | Some("local") => ("get", node.get_local(&key)),
        Some("quorum") => {
            let result = node.get_quorum(&key).await;
            node.metrics.count(
                "get_quorum",
                result.as_ref().map_or_else(OpError::label, |_| "ok"),
            );
            ("get_quorum", result?)
        }
        Some(other) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("consistency {other:?} is not one of \"local\", \"quorum\""),
            ));
        }
    };
    match copy {
        Some(Stored {
            version,
            value: Some(value),
        }) => {
            node.metrics.count(op, "ok");
            let value = String::from_utf8(value.to_vec()).map_err(|_| {
                ApiError(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "the value is binary, not UTF-8 text: read it with kvctl get".into(),
                )
            })?;
            Ok(Json(ValueBody {
                key,
                value,
                version,
            }))
        }
        _ => {
            node.metrics.count(op, "not_found");
            Err(ApiError(StatusCode::NOT_FOUND, "key not found".into()))
        }
    }
}

async fn delete_kv(
    State(node): State<Arc<Node>>,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Json<WrittenBody>, ApiError> {
    let (key, _) = query?.0.key()?;
    let result = node.write(key.clone(), None).await;
    node.metrics.count(
        "delete",
        result.as_ref().map_or_else(OpError::label, |_| "ok"),
    );
    let written = result?;
    Ok(Json(WrittenBody {
        key,
        version: written.version,
        acks: written.acks,
        deleted: true,
    }))
}

/// Test hook: drops this worker's copies of the keys in the body (a JSON
/// array of strings) as a lost disk block would, telling no one; answers
/// how many it held. Anti-entropy is what brings them back.
async fn forget(
    State(node): State<Arc<Node>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let keys: Vec<String> = serde_json::from_slice(&body.map_err(body_error)?).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid body ({e}); send a JSON array of keys"),
        )
    })?;
    let forgotten = keys
        .iter()
        .filter(|key| {
            node.store
                .get(key)
                .is_some_and(|copy| node.store.remove_if(key, copy.version))
        })
        .count();
    Ok(Json(json!({ "forgotten": forgotten })))
}

async fn healthz(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    let view = node.topologies.current();
    let (keys, bytes) = node.store.stats();
    Json(json!({
        "status": "ok",
        "id": node.id,
        "epoch": view.epoch(),
        "in_ring": view.member(&node.id).is_some(),
        "keys": keys,
        "bytes": bytes,
    }))
}

async fn metrics(State(node): State<Arc<Node>>) -> impl IntoResponse {
    let (keys, bytes) = node.store.stats();
    node.metrics.keys.set(keys as i64);
    node.metrics.bytes.set(bytes as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        node.metrics.render(),
    )
}

/// 200 only when this worker is in the current topology and holds what it
/// assigns it; 503 saying why not (joining, rebalancing in, leaving).
async fn readyz(State(node): State<Arc<Node>>) -> Result<Json<serde_json::Value>, ApiError> {
    match node.readiness() {
        Ok(epoch) => Ok(Json(
            json!({ "status": "ready", "id": node.id, "epoch": epoch }),
        )),
        Err(why) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, why.to_string())),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::no_route(&uri, "a worker serves /kv, /healthz, /readyz, /metrics")
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::not_allowed(
        &method,
        &uri,
        "PUT, GET and DELETE /kv; GET /healthz, /readyz, /metrics",
    )
}
