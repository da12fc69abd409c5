//! Health of an `[[upstream]]`: a probe every [`PROBE_EVERY`], published on
//! the same `watch` channel a supervised child's view travels on, so the
//! gateway waits for and routes around an upstream exactly as it does for a
//! child. A backend that answers its probe slowly, or a request with a
//! connection error, is out until a probe answers in time again.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::UpstreamKind;
use crate::http_client::{HttpClient, HttpError};
use crate::supervisor::{State, SupervisorView};

/// How often each upstream is asked whether it is up.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// A probe answered later than this counts as a failure: a backend this
/// slow to answer `/health` would make a request wait longer than another
/// backend's prefill.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What one probe found.
#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Up,
    Down(String),
}

/// The path each kind of backend is probed on: llama-server and
/// contextpilotd answer `/health` (200 only when a model is ready), any
/// OpenAI-compatible server `/v1/models`.
pub fn probe_path(kind: UpstreamKind) -> &'static str {
    match kind {
        UpstreamKind::LlamaServer | UpstreamKind::Contextpilotd => "/health",
        UpstreamKind::Openai => "/v1/models",
    }
}

/// What an answer to [`probe_path`] means. Pure, so each kind's answers are
/// tested on samples.
pub fn interpret(kind: UpstreamKind, status: u16, body: &[u8]) -> Health {
    if status == 200 {
        return Health::Up;
    }
    let text = String::from_utf8_lossy(body);
    let detail = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v["error"]["message"]
                .as_str()
                .or(v["status"].as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| text.chars().take(120).collect());
    let why = match (kind, status) {
        (_, 401 | 403) => format!("refused the api_key (HTTP {status})"),
        (UpstreamKind::LlamaServer | UpstreamKind::Contextpilotd, 503) => {
            format!("not ready (HTTP 503: {detail})")
        }
        _ => format!("HTTP {status}: {detail}"),
    };
    Health::Down(why)
}

/// Slots when the configuration gives none, for a kind that says: a
/// llama-server's `/props` `total_slots`, another contextpilotd's `/status`
/// (its admission, `plan.concurrency`). `None` for other kinds.
pub fn slots_path(kind: UpstreamKind) -> Option<&'static str> {
    match kind {
        UpstreamKind::LlamaServer => Some("/props"),
        UpstreamKind::Contextpilotd => Some("/status"),
        UpstreamKind::Openai => None,
    }
}

/// What an answer to [`slots_path`] says. Pure, tested on samples.
pub fn slots_in(kind: UpstreamKind, body: &[u8]) -> Option<u32> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let slots = match kind {
        UpstreamKind::LlamaServer => value["total_slots"].as_u64(),
        UpstreamKind::Contextpilotd => value["plan"]["concurrency"]
            .as_u64()
            .or(value["plan"]["slots"].as_u64()),
        UpstreamKind::Openai => None,
    }?;
    u32::try_from(slots).ok().filter(|&n| n > 0)
}

/// Asks an upstream how many slots it has, every [`PROBE_EVERY`] until it
/// answers (a llama-server loading its model does not), or `stop` is told.
pub async fn wait_for_slots(
    base: &str,
    auth: Option<&str>,
    kind: UpstreamKind,
    stop: &mut watch::Receiver<bool>,
) -> Option<u32> {
    let path = slots_path(kind)?;
    let client = HttpClient::new();
    let url = format!("{base}{path}");
    let headers: Vec<(&str, &str)> = auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
    loop {
        if let Ok((status, body)) = client.get_with_headers(&url, &headers, PROBE_TIMEOUT).await {
            if status.as_u16() == 200 {
                if let Some(slots) = slots_in(kind, &body) {
                    return Some(slots);
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.changed() => return None,
        }
    }
}

/// The base URL requests go to: the configured one without a trailing
/// `/` or `/v1` (request paths start with `/v1/…` or `/…`).
pub fn base_of(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    url.strip_suffix("/v1").unwrap_or(url).to_string()
}

/// The view an upstream shows with `health`; `number` stands in for a pid
/// (a slot table resets when it changes, which it never does here).
pub fn view_of(previous: &SupervisorView, number: u32, health: &Health) -> SupervisorView {
    let mut view = previous.clone();
    match health {
        Health::Up => {
            if view.state != State::Ready {
                view.started_at =
                    Some(crate::supervisor::rfc3339_utc(std::time::SystemTime::now()));
                view.spawned = Some(Instant::now());
            }
            view.state = State::Ready;
            view.pid = Some(number);
        }
        Health::Down(why) => {
            if view.state == State::Ready {
                view.restarts += 1;
            }
            view.state = State::Restarting;
            view.last_exit = Some(why.clone());
        }
    }
    view
}

/// Probes one upstream until `stop` is told, publishing what it finds on
/// `view` (only changes wake the readers).
pub async fn run(
    base: String,
    auth: Option<String>,
    kind: UpstreamKind,
    number: u32,
    view: watch::Sender<SupervisorView>,
    mut stop: watch::Receiver<bool>,
) {
    let client = HttpClient::new();
    let url = format!("{base}{}", probe_path(kind));
    loop {
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let health = match client.get_with_headers(&url, &headers, PROBE_TIMEOUT).await {
            Ok((status, body)) => interpret(kind, status.as_u16(), &body),
            Err(HttpError::Connect(e)) => Health::Down(format!("unreachable: {e}")),
            Err(HttpError::Timeout(t)) => Health::Down(format!("no answer within {t:?}")),
            Err(HttpError::Other(e)) => Health::Down(e),
        };
        view.send_if_modified(|current| {
            let next = view_of(current, number, &health);
            let changed = next.state != current.state || next.last_exit != current.last_exit;
            if changed {
                match &health {
                    Health::Up => tracing::info!(upstream = %base, "upstream is up"),
                    Health::Down(why) => {
                        tracing::warn!(upstream = %base, why = %why, "upstream is down")
                    }
                }
                *current = next;
            }
            changed
        });
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_probed_where_it_says_it_is_ready() {
        assert_eq!(probe_path(UpstreamKind::LlamaServer), "/health");
        assert_eq!(probe_path(UpstreamKind::Contextpilotd), "/health");
        assert_eq!(probe_path(UpstreamKind::Openai), "/v1/models");
        assert_eq!(
            interpret(UpstreamKind::LlamaServer, 200, br#"{"status":"ok"}"#),
            Health::Up
        );
        // llama-server while it loads the model.
        let loading =
            br#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#;
        assert_eq!(
            interpret(UpstreamKind::LlamaServer, 503, loading),
            Health::Down("not ready (HTTP 503: Loading model)".into())
        );
        assert_eq!(
            interpret(UpstreamKind::Openai, 401, b"{}"),
            Health::Down("refused the api_key (HTTP 401)".into())
        );
        let Health::Down(why) = interpret(UpstreamKind::Openai, 502, b"<html>bad gateway</html>")
        else {
            panic!("502 is down");
        };
        assert!(why.starts_with("HTTP 502: <html>"), "{why}");
    }

    #[test]
    fn slots_come_from_props_or_status() {
        let props = br#"{"total_slots":4,"model_path":"/m.gguf","default_generation_settings":{"n_ctx":8192}}"#;
        assert_eq!(slots_in(UpstreamKind::LlamaServer, props), Some(4));
        assert_eq!(
            slots_in(UpstreamKind::LlamaServer, br#"{"total_slots":0}"#),
            None
        );
        assert_eq!(slots_in(UpstreamKind::LlamaServer, b"Loading model"), None);
        let status = br#"{"state":"ready","plan":{"slots":16,"concurrency":8}}"#;
        assert_eq!(slots_in(UpstreamKind::Contextpilotd, status), Some(8));
        assert_eq!(slots_in(UpstreamKind::Openai, props), None);
        assert_eq!(slots_path(UpstreamKind::Openai), None);
    }

    #[test]
    fn the_base_url_drops_a_trailing_v1() {
        assert_eq!(base_of("http://10.0.0.2:8080/v1/"), "http://10.0.0.2:8080");
        assert_eq!(base_of("http://10.0.0.2:8080"), "http://10.0.0.2:8080");
        assert_eq!(base_of(" http://h:1/ "), "http://h:1");
    }

    #[test]
    fn a_backend_going_down_counts_once_and_comes_back_ready() {
        let start = SupervisorView::unloaded();
        let up = view_of(&start, 7, &Health::Up);
        assert_eq!((up.state, up.pid, up.restarts), (State::Ready, Some(7), 0));
        let down = view_of(&up, 7, &Health::Down("unreachable".into()));
        assert_eq!((down.state, down.restarts), (State::Restarting, 1));
        let still = view_of(&down, 7, &Health::Down("unreachable".into()));
        assert_eq!(still.restarts, 1);
        let back = view_of(&still, 7, &Health::Up);
        assert_eq!(back.state, State::Ready);
        assert_eq!(back.last_exit.as_deref(), Some("unreachable"));
    }
}
