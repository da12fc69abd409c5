//! `contextpilotd logs [-f] [--requests]`: the running daemon's recent log
//! lines (`GET /logs`), and with `-f` every new one as it is logged, until
//! Ctrl-C or the daemon stops.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK};
use crate::config::{Config, ConfigSource};

/// How long the daemon has to start answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(arg: ConfigArg, follow: bool, requests: bool) -> i32 {
    let source = ConfigSource::locate(arg.config.as_deref());
    let config = match Config::load(&source) {
        Ok(config) => config,
        Err(e) => {
            report(&e);
            return EXIT_CONFIG;
        }
    };
    let listen = config.server.listen;
    let url = format!(
        "http://{listen}/logs?follow={}&requests={}",
        u8::from(follow),
        u8::from(requests)
    );
    let mut request = Request::get(&url);
    if let Some(key) = &config.server.api_key {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = match request.body(Empty::<Bytes>::new()) {
        Ok(request) => request,
        Err(e) => {
            report(&format!("{url}: {e}"));
            return EXIT_FAILURE;
        }
    };
    let runtime = match super::runtime(false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async {
        // Installed before anything waits, so Ctrl-C is an orderly end.
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let client = crate::http_client::loopback_client::<Empty<Bytes>>();
        let answer = tokio::select! {
            answer = tokio::time::timeout(ANSWER_TIMEOUT, client.request(request)) => answer,
            _ = &mut ctrl_c => return EXIT_OK,
        };
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) if e.is_connect() => {
                eprintln!(
                    "contextpilotd is not running: nothing is listening on {listen} (configuration: {source})"
                );
                return EXIT_NOT_RUNNING;
            }
            Ok(Err(e)) => {
                report(&format!("{url}: {e}"));
                return EXIT_FAILURE;
            }
            Err(_) => {
                report(&format!("{url}: no answer within {ANSWER_TIMEOUT:?}"));
                return EXIT_FAILURE;
            }
        };
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let bytes = tokio::time::timeout(ANSWER_TIMEOUT, body.collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            report(&format!("{url} answered {status}: {}", error_message(&bytes)));
            return EXIT_FAILURE;
        }
        let mut stdout = std::io::stdout();
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                _ = &mut ctrl_c => return EXIT_OK,
            };
            match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    // A closed stdout (`| head`) ends us quietly.
                    if stdout.write_all(&data).and_then(|()| stdout.flush()).is_err() {
                        return EXIT_OK;
                    }
                }
                None => break,
                Some(Err(e)) => {
                    // The daemon went away mid-stream (killed, or its
                    // connections cut at the end of shutdown).
                    if follow {
                        eprintln!("contextpilotd: the daemon closed the log stream ({e})");
                        return EXIT_OK;
                    }
                    report(&format!("{url}: {e}"));
                    return EXIT_FAILURE;
                }
            }
        }
        if follow {
            eprintln!("contextpilotd: the daemon stopped; no more lines");
        }
        EXIT_OK
    })
}

/// The message of the daemon's OpenAI-shaped error body, else the body.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.pointer("/error/message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::error_message;

    #[test]
    fn the_error_said_is_the_daemons_message() {
        assert_eq!(
            error_message(br#"{"error":{"message":"missing or wrong API key","type":"x"}}"#),
            "missing or wrong API key"
        );
        assert_eq!(error_message(b"plain words\n"), "plain words");
    }
}
