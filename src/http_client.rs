//! A small HTTP/1 client over hyper for loopback calls: the supervisor's
//! probes of the child and the `status` command's call to the daemon.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Empty<Bytes>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing accepted the connection.
    #[error("connection refused or failed: {0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Other(String),
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

/// A pooled HTTP/1 client for loopback peers. llama-server's HTTP library
/// closes idle connections after 5 s, so an idle connection is dropped
/// before that rather than reused while the server closes it.
pub fn loopback_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(4))
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(connector)
}

impl HttpClient {
    pub fn new() -> HttpClient {
        HttpClient {
            inner: loopback_client(),
        }
    }

    /// GETs `url` and reads the whole body, all within `timeout`.
    pub async fn get(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        self.get_with_headers(url, &[], timeout).await
    }

    pub async fn get_with_headers(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let mut builder = Request::get(url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Empty::new())
            .map_err(|e| HttpError::Other(e.to_string()))?;
        let call = async {
            let response = self.inner.request(request).await.map_err(|e| {
                if e.is_connect() {
                    HttpError::Connect(e.to_string())
                } else {
                    HttpError::Other(e.to_string())
                }
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Other(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| HttpError::Timeout(timeout))?
    }

    /// POSTs a JSON `body` to `url` and reads the whole answer, within
    /// `timeout`.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let mut builder = Request::post(url).header("content-type", "application/json");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .map_err(|e| HttpError::Other(e.to_string()))?;
        let client = loopback_client::<http_body_util::Full<Bytes>>();
        let call = async {
            let response = client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    HttpError::Connect(e.to_string())
                } else {
                    HttpError::Other(e.to_string())
                }
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Other(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| HttpError::Timeout(timeout))?
    }
}
