//! A small JSON-over-HTTP client for the controller's and workers' admin
//! APIs (hyper's pooled client; no TLS: kv speaks plain HTTP inside a
//! cluster network).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
pub use hyper::Method;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;
use thiserror::Error;

/// How long one admin request may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an HTTP call failed.
#[derive(Debug, Error, Clone)]
pub enum HttpError {
    /// No connection or no answer.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The server answered with an error status.
    #[error("{url} answered {status}: {message}")]
    Status {
        /// The URL.
        url: String,
        /// The status code.
        status: u16,
        /// The server's `error` field, or its body.
        message: String,
    },
    /// The answer was not the JSON expected.
    #[error("unreadable answer from {url}: {reason}")]
    Body {
        /// The URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// A pooled HTTP/1 client.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient::new()
    }
}

impl HttpClient {
    /// A client with its own connection pool.
    pub fn new() -> HttpClient {
        HttpClient {
            inner: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// One request; the status and body of any answer.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), HttpError> {
        self.request_authorized(method, url, body, None).await
    }

    /// One request with an `Authorization` header, if given; the status and
    /// body of any answer.
    pub async fn request_authorized(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
        authorization: Option<&str>,
    ) -> Result<(u16, Bytes), HttpError> {
        let unreachable = |reason: String| HttpError::Unreachable {
            url: url.to_string(),
            reason,
        };
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json");
        if let Some(authorization) = authorization {
            request = request.header("authorization", authorization);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| unreachable(e.to_string()))?;
        let exchange = async {
            let response = self
                .inner
                .request(request)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(HTTP_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable("timed out".into()))?
    }

    /// GET, expecting a 2xx with JSON.
    pub async fn get_json<T: DeserializeOwned>(&self, url: &str) -> Result<T, HttpError> {
        let (status, body) = self.request(Method::GET, url, Bytes::new()).await?;
        decode(url, status, &body)
    }

    /// POST `body` as JSON, expecting a 2xx with JSON.
    pub async fn post_json<B: Serialize, T: DeserializeOwned>(
        &self,
        url: &str,
        body: &B,
    ) -> Result<T, HttpError> {
        let body = serde_json::to_vec(body).map_err(|e| HttpError::Body {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        let (status, reply) = self.request(Method::POST, url, Bytes::from(body)).await?;
        decode(url, status, &reply)
    }

    /// POST `body`, JSON already encoded, with an `Authorization` header
    /// (made from those exact bytes, say), expecting a 2xx with JSON.
    pub async fn post_authorized<T: DeserializeOwned>(
        &self,
        url: &str,
        body: Vec<u8>,
        authorization: Option<&str>,
    ) -> Result<T, HttpError> {
        let (status, reply) = self
            .request_authorized(Method::POST, url, Bytes::from(body), authorization)
            .await?;
        decode(url, status, &reply)
    }
}

fn decode<T: DeserializeOwned>(url: &str, status: u16, body: &[u8]) -> Result<T, HttpError> {
    if !(200..300).contains(&status) {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
        return Err(HttpError::Status {
            url: url.to_string(),
            status,
            message,
        });
    }
    serde_json::from_slice(body).map_err(|e| HttpError::Body {
        url: url.to_string(),
        reason: e.to_string(),
    })
}
