//! The gateway's outer layer (a tower `Layer`), in front of routing and the
//! API key: who may talk to the daemon at all.
//!
//! - **Host.** A request whose `Host` is not an IP address, `localhost` (or a
//!   name under it) or a name in `[server] allowed_hosts` gets 403. A web page
//!   on a domain that rebinds to 127.0.0.1 sends its own domain as `Host`, so
//!   this is what keeps it out (DNS rebinding).
//! - **Origin.** Browsers name the page's origin on cross-origin requests and
//!   on every POST. A page from an origin in `[server] allowed_origins` (or the
//!   daemon's own origin) gets CORS headers and preflight answers; any other
//!   origin gets 403 on POST (a "simple" cross-origin POST would run without a
//!   preflight) and no CORS headers on GET, so the browser keeps the answer
//!   from the page.
//!
//! The decision is a pure function of the method and headers ([`Policy::check`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::error::ApiError;
use super::Body;

/// Who may call: the configured hosts and origins.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Host names allowed besides IP addresses and `localhost` (lowercase).
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may call from a browser; `"*"` allows any.
    pub allowed_origins: Vec<String>,
}

/// What to do with a request.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// Refuse with this error.
    Refuse(ApiError),
    /// A CORS preflight from an allowed origin: answer it here.
    Preflight(HeaderValue),
    /// Serve it; add CORS headers for this origin, if any.
    Pass(Option<HeaderValue>),
}

impl Policy {
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Verdict {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        if let Some(host) = host {
            if !self.host_allowed(host) {
                return Verdict::Refuse(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "permission_error",
                    format!(
                        "Host {host:?} is not allowed; add it to [server] allowed_hosts to serve it"
                    ),
                ));
            }
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Verdict::Pass(None);
        };
        let allowed = origin.to_str().is_ok_and(|o| self.origin_allowed(o, host));
        match (allowed, method) {
            (true, &Method::OPTIONS)
                if headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) =>
            {
                Verdict::Preflight(origin.clone())
            }
            (true, _) => Verdict::Pass(Some(origin.clone())),
            (false, &Method::GET | &Method::HEAD) => Verdict::Pass(None),
            (false, _) => Verdict::Refuse(ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                format!(
                    "requests from the web origin {:?} are not allowed; add it to [server] allowed_origins to allow them",
                    origin.to_str().unwrap_or("?")
                ),
            )),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let name = strip_port(host).to_ascii_lowercase();
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(&name))
    }

    /// Allowed: listed, `"*"` listed, or the daemon's own origin (a page it
    /// served itself, `http://<the Host it was reached at>`).
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
            || host.is_some_and(|h| origin.eq_ignore_ascii_case(&format!("http://{h}")))
    }
}

/// `host[:port]` without the port (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Headers a browser page may send (the preflight's allow list).
const ALLOW_HEADERS: &str =
    "authorization, content-type, x-conversation-id, x-contextpilot-enabled, \
x-contextpilot-mode, x-contextpilot-scope, x-contextpilot-tag, x-contextpilot-separator, \
x-contextpilot-alpha, x-contextpilot-linkage";

fn add_cors(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-contextpilot-result, retry-after"),
    );
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

fn preflight(origin: HeaderValue) -> Response<Body> {
    let mut response = Response::new(super::full(bytes::Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    add_cors(headers, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

/// The tower layer that applies a [`Policy`].
#[derive(Clone)]
pub struct GuardLayer(Arc<Policy>);

impl GuardLayer {
    pub fn new(policy: Policy) -> GuardLayer {
        GuardLayer(Arc::new(policy))
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            policy: self.0.clone(),
            inner,
        }
    }
}

/// A service behind the guard.
#[derive(Clone)]
pub struct Guard<S> {
    policy: Arc<Policy>,
    inner: S,
}

impl<S, B> tower::Service<Request<B>> for Guard<S>
where
    S: tower::Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.policy.check(request.method(), request.headers()) {
            Verdict::Refuse(error) => Box::pin(std::future::ready(Ok(error.into_response()))),
            Verdict::Preflight(origin) => Box::pin(std::future::ready(Ok(preflight(origin)))),
            Verdict::Pass(cors) => {
                let answer = self.inner.call(request);
                Box::pin(async move {
                    let mut response = answer.await?;
                    if let Some(origin) = cors {
                        add_cors(response.headers_mut(), origin);
                    }
                    Ok(response)
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn refused(verdict: Verdict) -> bool {
        matches!(verdict, Verdict::Refuse(e) if e.status == StatusCode::FORBIDDEN)
    }

    #[test]
    fn only_loopback_names_addresses_and_listed_hosts_pass() {
        let policy = Policy {
            allowed_hosts: vec!["mybox.lan".into()],
            ..Policy::default()
        };
        let get = |host: &str| policy.check(&Method::GET, &headers(&[("host", host)]));
        for host in [
            "127.0.0.1:8765",
            "localhost:8765",
            "LOCALHOST",
            "app.localhost:1",
            "[::1]:8765",
            "192.168.1.20:8765",
            "mybox.lan:8765",
            "MyBox.LAN",
        ] {
            assert_eq!(get(host), Verdict::Pass(None), "{host}");
        }
        for host in [
            "attacker.example:8765",
            "localhost.attacker.example",
            "mybox.lan.evil",
        ] {
            assert!(refused(get(host)), "{host}");
        }
        // No Host at all (HTTP/1.0 tools): no browser sends that.
        assert_eq!(
            policy.check(&Method::GET, &HeaderMap::new()),
            Verdict::Pass(None)
        );
    }

    #[test]
    fn origins_get_cors_only_when_allowed() {
        let policy = Policy {
            allowed_origins: vec!["http://localhost:3000".into()],
            ..Policy::default()
        };
        let allowed = headers(&[
            ("host", "127.0.0.1:8765"),
            ("origin", "http://localhost:3000"),
        ]);
        assert!(matches!(
            policy.check(&Method::POST, &allowed),
            Verdict::Pass(Some(_))
        ));
        let mut preflight = allowed.clone();
        preflight.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        assert!(matches!(
            policy.check(&Method::OPTIONS, &preflight),
            Verdict::Preflight(_)
        ));
        let other = headers(&[
            ("host", "127.0.0.1:8765"),
            ("origin", "https://evil.example"),
        ]);
        assert!(refused(policy.check(&Method::POST, &other)));
        assert!(refused(policy.check(&Method::OPTIONS, &other)));
        assert_eq!(policy.check(&Method::GET, &other), Verdict::Pass(None));
        let null = headers(&[("host", "127.0.0.1:8765"), ("origin", "null")]);
        assert!(refused(policy.check(&Method::POST, &null)));
        // The daemon's own pages are same-origin.
        let own = headers(&[
            ("host", "127.0.0.1:8765"),
            ("origin", "http://127.0.0.1:8765"),
        ]);
        assert!(matches!(
            policy.check(&Method::POST, &own),
            Verdict::Pass(Some(_))
        ));
        let any = Policy {
            allowed_origins: vec!["*".into()],
            ..Policy::default()
        };
        assert!(matches!(
            any.check(&Method::POST, &other),
            Verdict::Pass(Some(_))
        ));
    }
}
