//! The dashboard at `GET /`: one page, its script and its style, compiled
//! into the binary (no CDN, works offline, no build chain), and the
//! `GET /requests/recent` feed it polls besides `/status` and `/stats`.
//!
//! The page and its assets hold no data, so they are served without the
//! API key (a browser cannot send one on navigation); the script asks for
//! the key when the data endpoints answer 401 and keeps it in the tab's
//! session storage. The `Host`/`Origin` guard applies as to every route,
//! and a content security policy lets the page load only its own script
//! and style and talk only to this daemon, and no site frame it.

use bytes::Bytes;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use super::{error, full, json, Body, Gateway};

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const SCRIPT: &str = include_str!("../../assets/dashboard/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard/dashboard.css");
const ICON: &str = include_str!("../../assets/dashboard/favicon.svg");

/// The paths of the page and its assets.
pub const ASSETS: [&str; 5] = [
    "/",
    "/dashboard.js",
    "/dashboard.css",
    "/favicon.svg",
    "/favicon.ico",
];

const POLICY: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One of [`ASSETS`].
pub(super) fn asset(path: &str) -> Response<Body> {
    let (text, kind) = match path {
        "/dashboard.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard.css" => (STYLE, "text/css; charset=utf-8"),
        "/favicon.svg" | "/favicon.ico" => (ICON, "image/svg+xml"),
        _ => (INDEX, "text/html; charset=utf-8"),
    };
    let mut response = Response::new(full(Bytes::from_static(text.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("content-security-policy", HeaderValue::from_static(POLICY));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

/// `GET /requests/recent?after=N&limit=M`: the requests recorded after
/// number `N` (default 0), at most `M` (default and most 500), without
/// prompt or completion text.
pub(super) async fn recent(gateway: &Gateway, query: Option<&str>) -> Response<Body> {
    let param = |name: &str| {
        query?
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| value.parse::<u64>().ok())
    };
    let after = param("after").unwrap_or(0);
    let limit = param("limit").map_or(crate::meter::recent::KEPT, |l| l as usize);
    match gateway.meter.recent(after, limit).await {
        Some(page) => json(StatusCode::OK, &page),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the meter is not running",
            "server_error",
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_loads_only_its_own_assets_and_writes_text_not_html() {
        for asset in ["/dashboard.js", "/dashboard.css"] {
            assert!(super::INDEX.contains(asset), "{asset} is not linked");
        }
        assert!(!super::INDEX.contains("<script>"), "no inline script");
        assert!(!super::INDEX.contains("style="), "no inline style");
        assert!(!super::INDEX.contains("http"), "nothing from elsewhere");
        assert!(super::INDEX.contains("/favicon.svg"));
        // Values from the daemon (model names, log lines) go in as text.
        assert!(!super::SCRIPT.contains("innerHTML"));
        assert!(!super::SCRIPT.contains("eval("));
    }
}
