//! The admin HTTP API: `/register`, `/leave`, `/nodes`, `/mapping`,
//! `/cluster`, `/cluster/key`, `/ui`, `/healthz`, `/metrics`. Every error is JSON `{"error": ...}` saying what was wrong and
//! what to do; bad input is always a 4xx, never a 500 or a dropped
//! connection.

use crate::membership::{LeaveError, NodeView, RegisterError, Registration};
use crate::state::Shared;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kv_service::ApiError;
use kv_wire::auth::Signed;
use kv_wire::nodes::{Mapping, NodeInfo, Nodes};
use kv_wire::register::{LeaveReply, LeaveRequest, RegisterReply};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// Largest request body: registrations are tiny.
pub const MAX_BODY: usize = 64 * 1024;

/// A body that could not be read, as the caller should hear it.
fn body_error(r: BytesRejection) -> ApiError {
    ApiError::body(r, &format!("request body is larger than {MAX_BODY} bytes"))
}

/// The routes, with the JSON 404 and 405 fallbacks and the body limit.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/register", post(register))
        .route("/leave", post(leave))
        .route("/nodes", get(nodes))
        .route("/mapping", get(mapping))
        .route("/cluster", get(cluster))
        .route("/cluster/key", get(cluster_key))
        .route("/ui", get(ui))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// Checks the proof of the cluster secret a `what` request carries (with a
/// secret; without one there is nothing to check). The proof comes first:
/// a stranger learns nothing, not even whether its request was valid.
fn check_proof(
    shared: &Shared,
    what: Signed,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ApiError> {
    let authorization = headers.get(header::AUTHORIZATION).map(|h| h.as_bytes());
    let now = kv_wire::version::unix_ms(SystemTime::now());
    shared
        .guard
        .check(what, authorization, body, now)
        .map_err(|e| {
            let route = match what {
                Signed::Register => "register",
                Signed::Leave => "leave",
            };
            shared.refused(peer.ip(), route, e.kind(), &e.to_string());
            ApiError(StatusCode::UNAUTHORIZED, e.to_string())
        })
}

async fn register(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<RegisterReply>, ApiError> {
    let body = body.map_err(body_error)?;
    check_proof(&shared, Signed::Register, peer, &headers, &body)?;
    let body: Registration = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid registration ({e}); send {{\"id\",\"host\",\"port\",\"wire_port\"}}"
        ))
    })?;
    let id = body.id.clone();
    let registered = shared.register(body).map_err(|e| match e {
        RegisterError::Invalid(_) => ApiError::bad_request(format!("invalid registration: {e}")),
        RegisterError::Full => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    })?;
    Ok(Json(RegisterReply {
        id,
        member: registered.member,
        generation: registered.generation,
        epoch: registered.epoch,
        heartbeat_port: shared.heartbeat_port,
        heartbeat_interval_ms: shared.heartbeat_interval.as_millis() as u64,
        incarnation: shared.incarnation,
    }))
}

async fn leave(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<LeaveReply>, ApiError> {
    let body = body.map_err(body_error)?;
    check_proof(&shared, Signed::Leave, peer, &headers, &body)?;
    let leave: LeaveRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "invalid leave ({e}); send {{\"id\",\"generation\",\"done\"}}"
        ))
    })?;
    let (status, epoch) = shared.leave(&leave).map_err(|e| match e {
        LeaveError::Unknown(_) => ApiError(StatusCode::NOT_FOUND, format!("{e}: register first")),
        LeaveError::Stale { .. } => ApiError(StatusCode::CONFLICT, e.to_string()),
    })?;
    Ok(Json(LeaveReply {
        id: leave.id,
        status,
        epoch,
    }))
}

/// A worker as `/nodes` and `/mapping` show it.
pub(crate) fn node_info(node: &NodeView<'_>) -> NodeInfo {
    let w = &node.worker.member;
    NodeInfo {
        id: w.id.clone(),
        host: w.host.clone(),
        port: w.port,
        wire_port: w.wire_port,
        generation: w.generation,
        status: node.status,
        last_heartbeat: rfc3339(node.worker.last_heartbeat),
        last_heartbeat_ms_ago: node.silent_for.as_millis() as u64,
        reason: node.reason,
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

async fn nodes(State(shared): State<Arc<Shared>>) -> Json<Nodes> {
    let m = shared.membership();
    let now = std::time::Instant::now();
    Json(Nodes {
        epoch: m.epoch(),
        nodes: m.nodes(now).iter().map(node_info).collect(),
    })
}

#[derive(Deserialize)]
struct KeyQuery {
    key: Option<String>,
}

/// The valid `?key=` of a request to `route`.
fn key_of(query: Result<Query<KeyQuery>, QueryRejection>, route: &str) -> Result<String, ApiError> {
    let Query(query) = query?;
    let key = query.key.ok_or_else(|| {
        ApiError::bad_request(format!(
            "missing query parameter \"key\": use {route}?key=K"
        ))
    })?;
    kv_wire::validate_key(&key).map_err(|e| ApiError::bad_request(format!("invalid key: {e}")))?;
    Ok(key)
}

async fn mapping(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Json<Mapping>, ApiError> {
    let key = key_of(query, "/mapping")?;
    let published = shared.published();
    if published.topology.epoch == 0 {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no topology yet: no worker has registered (a restarted controller also waits its grace period for them); start workers and retry".into(),
        ));
    }
    let owners = published
        .ring()
        .owners(key.as_bytes(), kv_wire::REPLICATION_FACTOR);
    if owners.is_empty() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no worker is live: start workers or wait for them to register".into(),
        ));
    }
    let m = shared.membership();
    let views = m.nodes(std::time::Instant::now());
    let info = |id: &&str| {
        views
            .binary_search_by(|v| v.worker.member.id.as_str().cmp(id))
            .ok()
            .map(|i| node_info(&views[i]))
    };
    // The ring is the published one and the workers' details are read
    // now: an owner the controller forgot in between (or the primary
    // missing) is a topology on the move.
    let mut nodes = owners.iter().filter_map(info);
    let primary = nodes.next().filter(|p| p.id == owners[0]).ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the topology is changing: retry".into(),
        )
    })?;
    Ok(Json(Mapping {
        key,
        epoch: published.topology.epoch,
        primary,
        replicas: nodes.collect(),
        workers: owners.into_iter().map(str::to_string).collect(),
    }))
}

/// The cluster, gathered from the workers (at most once a second).
async fn cluster(State(shared): State<Arc<Shared>>) -> Response {
    Json(shared.gatherer.cluster(&shared).await).into_response()
}

/// A key's owners, primary first, each with the version it holds.
async fn cluster_key(
    State(shared): State<Arc<Shared>>,
    query: Result<Query<KeyQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let key = key_of(query, "/cluster/key")?;
    if shared.published().ring().is_empty() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no worker is live: start workers or wait for them to register".into(),
        ));
    }
    Ok(Json(shared.gatherer.lookup(&shared, &key).await))
}

/// The dashboard: one page, everything embedded, fed by `/cluster`.
async fn ui() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(include_str!("ui.html")),
    )
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let epoch = shared.membership().epoch();
    Json(json!({ "status": "ok", "epoch": epoch, "incarnation": shared.incarnation }))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::no_route(&uri, "the controller serves /register, /leave, /nodes, /mapping?key=K, /cluster, /cluster/key?key=K, /ui, /healthz, /metrics")
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_allowed(&method, &uri, "POST /register, /leave; GET /nodes, /mapping, /cluster, /cluster/key, /ui, /healthz, /metrics")
}
