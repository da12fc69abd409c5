//! `contextpilotd status`: asks the running daemon, and the service manager
//! about the login service, and says what to do next when something is off.

use std::path::PathBuf;
use std::time::Duration;

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK};
use crate::config::{Config, ConfigSource};
use crate::http_client::{HttpClient, HttpError};
use crate::service::{self, Platform, ServiceReport};
use crate::status::{render, Status};
use bytes::Bytes;
use hyper::StatusCode;

/// Exit codes of `status`: 0 the daemon answers and is not in a crash loop;
/// 1 a crash loop, an error answer, or another program on the port; 2 a
/// configuration error; 3 nothing listening. `--json` prints a JSON object in
/// every one of these cases (its `state` says which).
pub fn run(arg: ConfigArg, json: bool) -> i32 {
    let source = ConfigSource::locate(arg.config.as_deref());
    let config = match Config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"state": "config_error", "error": e.to_string()})
                );
            }
            report(&e);
            return EXIT_CONFIG;
        }
    };
    let listen = config.server.listen;
    // Asked alongside the daemon, within its own short timeout, so a slow or
    // absent service manager never makes `status` slow or fail.
    let service_query = std::thread::spawn(query_service);
    let url = format!("http://{listen}/status");
    let runtime = match super::runtime(false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let auth = config
        .server
        .api_key
        .as_ref()
        .map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let result = runtime.block_on(HttpClient::new().get_with_headers(
        &url,
        &headers,
        Duration::from_secs(5),
    ));
    let answer = classify(result);
    let found = join(service_query);
    let service = found.as_ref().map(|(f, _)| f);
    let daemon_answers = matches!(answer, Answer::Status(..));
    let next = found
        .as_ref()
        .and_then(|(f, logs)| service::next_step(f, daemon_answers, logs));
    let listen_text = listen.to_string();
    match answer {
        Answer::Status(status, document) => {
            let code = exit_code(&status);
            if json {
                println!("{}", with_service(document, service));
                return code;
            }
            print!("{}", render(&status));
            if let Some(found) = service {
                println!("  service       {}", service::describe_report(found));
            }
            if let Some(step) = next {
                println!("  next step     {step}");
            }
            code
        }
        Answer::NotRunning(why) => {
            if json {
                let document = serde_json::json!({
                    "state": "not_running",
                    "listen": listen_text,
                    "configuration": source.to_string(),
                    "error": why,
                    "next_step": next,
                });
                println!("{}", with_service(document, service));
                return EXIT_NOT_RUNNING;
            }
            eprintln!("contextpilotd is not running: nothing is listening on {listen} (configuration: {source})");
            // On stdout: stderr stays the one line scripts already match.
            if let Some(found) = service {
                println!("service       {}", service::describe_report(found));
            }
            if let Some(step) = next {
                println!("next step     {step}");
            }
            EXIT_NOT_RUNNING
        }
        Answer::Foreign(what) => {
            let message = format!(
                "{listen} is held by another program, not contextpilotd: it {what}; stop that program or set [server] listen in {source} to a free address"
            );
            if json {
                let document = serde_json::json!({
                    "state": "not_contextpilotd",
                    "listen": listen_text,
                    "error": message,
                });
                println!("{}", with_service(document, service));
            }
            report(&message);
            EXIT_FAILURE
        }
        Answer::Refused { code, message } => {
            let message = format!("{url} answered {code}: {message}");
            if json {
                let document = serde_json::json!({
                    "state": "error",
                    "listen": listen_text,
                    "http_status": code,
                    "error": message,
                });
                println!("{}", with_service(document, service));
            }
            report(&message);
            EXIT_FAILURE
        }
        Answer::Failed(why) => {
            let message = format!("{url}: {why}");
            if json {
                let document = serde_json::json!({
                    "state": "no_answer",
                    "listen": listen_text,
                    "error": message,
                });
                println!("{}", with_service(document, service));
            }
            report(&message);
            EXIT_FAILURE
        }
    }
}

/// 1 in a crash loop (scripts and service checks see that something is
/// wrong), else 0.
pub fn exit_code(status: &Status) -> i32 {
    if status.state == "crashloop" {
        EXIT_FAILURE
    } else {
        EXIT_OK
    }
}

/// What asking `/status` gave.
#[derive(Debug)]
pub enum Answer {
    /// contextpilotd's status, parsed and as the JSON it came as.
    Status(Box<Status>, serde_json::Value),
    /// contextpilotd refused (a missing or wrong API key).
    Refused { code: u16, message: String },
    /// Something else answered; what it did, in words.
    Foreign(String),
    /// Nothing accepted the connection.
    NotRunning(String),
    /// Accepted, then no answer in time, or another failure.
    Failed(String),
}

/// Sorts the answer out: contextpilotd's own status, its error, or another
/// program's page, which is described, never printed.
pub fn classify(result: Result<(StatusCode, Bytes), HttpError>) -> Answer {
    let (code, body) = match result {
        Ok(answer) => answer,
        Err(HttpError::Connect(e)) => return Answer::NotRunning(e),
        Err(HttpError::Timeout(t)) => {
            return Answer::Failed(format!(
                "no answer within {t:?} (contextpilotd may be overloaded, or another program holds the port)"
            ))
        }
        Err(HttpError::Other(e)) => {
            return Answer::Foreign(format!("does not speak HTTP as contextpilotd does ({e})"))
        }
    };
    let document = serde_json::from_slice::<serde_json::Value>(&body).ok();
    if code.is_success() {
        if let Some(document) = document {
            if let Ok(status) = serde_json::from_value::<Status>(document.clone()) {
                return Answer::Status(Box::new(status), document);
            }
        }
    } else if code == StatusCode::UNAUTHORIZED {
        // contextpilotd's own refusal has the OpenAI error shape.
        if let Some(message) = document
            .as_ref()
            .and_then(|d| d["error"]["message"].as_str())
            .filter(|m| m.contains("API key"))
        {
            return Answer::Refused {
                code: code.as_u16(),
                message: format!(
                    "{message} (status sends [server] api_key from the configuration)"
                ),
            };
        }
    }
    Answer::Foreign(format!(
        "answered HTTP {} with {}",
        code.as_u16(),
        describe_page(&body)
    ))
}

/// Another program's answer in a few words: its HTML title, or its kind and
/// size; never the page itself.
fn describe_page(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(64 << 10)]);
    // ASCII lowercase keeps byte offsets, so `text` can be sliced by them.
    let lower = text.to_ascii_lowercase();
    if let Some(start) = lower.find("<title>") {
        let rest = &text[start + 7..];
        let title: String = rest[..rest
            .to_ascii_lowercase()
            .find("</title>")
            .unwrap_or(rest.len())]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .filter(|c| !c.is_control())
            .take(80)
            .collect();
        return format!("an HTML page titled {title:?}");
    }
    if lower.trim_start().starts_with('<') {
        return format!("an HTML page of {} bytes", body.len());
    }
    if serde_json::from_slice::<serde_json::Value>(body).is_ok() {
        return format!(
            "{} bytes of JSON that is not a contextpilotd status",
            body.len()
        );
    }
    if body.is_empty() {
        return "an empty body".to_string();
    }
    format!("{} bytes that are not a contextpilotd status", body.len())
}

/// The service report and where its logs are; `None` without a home directory.
fn query_service() -> Option<(ServiceReport, String)> {
    let home: PathBuf = directories::BaseDirs::new()?.home_dir().to_path_buf();
    let platform = Platform::current();
    let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from);
    let unit_path = service::unit_path(platform, &home, xdg.as_deref());
    let uid = nix::unistd::getuid().as_raw();
    let mut found = service::query(platform, uid, &unit_path);
    if platform == Platform::Macos {
        found = service::prefer_homebrew(found, service::query_homebrew(uid, &home));
    }
    Some((found, platform.logs_hint(&home)))
}

fn join(
    query: std::thread::JoinHandle<Option<(ServiceReport, String)>>,
) -> Option<(ServiceReport, String)> {
    query.join().ok().flatten()
}

/// A status document with the `service` object added (unchanged when it is
/// not a JSON object).
fn with_service(mut document: serde_json::Value, found: Option<&ServiceReport>) -> String {
    if let serde_json::Value::Object(map) = &mut document {
        map.insert(
            "service".to_string(),
            serde_json::to_value(found).unwrap_or(serde_json::Value::Null),
        );
    }
    document.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn systemd_report() -> ServiceReport {
        ServiceReport {
            manager: "systemd".into(),
            unit_path: "/home/ada/.config/systemd/user/contextpilotd.service".into(),
            installed: false,
            manager_state: None,
            unknown_reason: Some("cannot run systemctl".into()),
            homebrew: false,
        }
    }

    #[test]
    fn the_service_object_is_added_and_nothing_else_changes() {
        let found = systemd_report();
        let document = serde_json::json!({"state": "ready", "pid": 7});
        let out: serde_json::Value =
            serde_json::from_str(&with_service(document, Some(&found))).unwrap();
        assert_eq!(out["state"], "ready");
        assert_eq!(out["pid"], 7);
        assert_eq!(out["service"]["installed"], false);
        assert_eq!(out["service"]["manager"], "systemd");
        assert_eq!(out["service"]["homebrew"], false);
        assert_eq!(with_service(serde_json::json!(3), Some(&found)), "3");
    }

    fn answered(code: u16, body: &str) -> Answer {
        classify(Ok((
            StatusCode::from_u16(code).unwrap(),
            Bytes::from(body.to_string()),
        )))
    }

    #[test]
    fn another_programs_page_is_described_not_printed() {
        let page = "<!DOCTYPE html><html><head><title>  Grafana \n Login </title></head><body>secret page text</body></html>";
        let Answer::Foreign(what) = answered(200, page) else {
            panic!("an HTML page is another program");
        };
        assert_eq!(
            what,
            r#"answered HTTP 200 with an HTML page titled "Grafana Login""#
        );
        assert!(!what.contains("secret"));
        let Answer::Foreign(what) = answered(
            404,
            r#"{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}"#,
        ) else {
            panic!("llama-server's 404 is another program");
        };
        assert!(
            what.contains("HTTP 404") && what.contains("JSON that is not a contextpilotd status"),
            "{what}"
        );
        let Answer::Foreign(what) = answered(200, r#"{"state":"ready"}"#) else {
            panic!("JSON of another shape is another program");
        };
        assert!(what.contains("not a contextpilotd status"), "{what}");
        assert!(matches!(answered(500, ""), Answer::Foreign(w) if w.contains("an empty body")));
        assert!(matches!(
            classify(Err(HttpError::Other("invalid HTTP version parsed".into()))),
            Answer::Foreign(w) if w.contains("does not speak HTTP")
        ));
        // Non-ASCII before the title must not break the slicing.
        let Answer::Foreign(what) = answered(200, "<p>Ünïcödé</p><TITLE>Ça va</TITLE>") else {
            panic!("HTML");
        };
        assert!(what.contains(r#""Ça va""#), "{what}");
    }

    #[test]
    fn our_own_answers_are_recognised() {
        let refused = answered(
            401,
            r#"{"error":{"message":"missing or wrong API key: send \"Authorization: Bearer <key>\"","type":"authentication_error"}}"#,
        );
        assert!(
            matches!(refused, Answer::Refused { code: 401, ref message } if message.contains("[server] api_key")),
            "{refused:?}"
        );
        assert!(matches!(
            classify(Err(HttpError::Connect("refused".into()))),
            Answer::NotRunning(_)
        ));
        assert!(matches!(
            classify(Err(HttpError::Timeout(Duration::from_secs(5)))),
            Answer::Failed(_)
        ));
    }
}
