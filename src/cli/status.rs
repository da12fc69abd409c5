//! `contextpilotd status`: asks the running daemon, and the service manager
//! about the login service, and says what to do next when something is off.

use std::path::PathBuf;
use std::time::Duration;

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK};
use crate::config::{Config, ConfigSource};
use crate::http_client::{HttpClient, HttpError};
use crate::service::{self, Platform, ServiceReport};
use crate::status::{render, Status};

pub fn run(arg: ConfigArg, json: bool) -> i32 {
    let source = ConfigSource::locate(arg.config.as_deref());
    let config = match Config::load(&source) {
        Ok(c) => c,
        Err(e) => {
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
    let body = match result {
        Ok((code, body)) if code.is_success() => body,
        Ok((code, body)) => {
            report(&format!(
                "{url} answered {code}: {}",
                String::from_utf8_lossy(&body)
            ));
            return EXIT_FAILURE;
        }
        Err(HttpError::Connect(_)) => {
            eprintln!("contextpilotd is not running: nothing is listening on {listen} (configuration: {source})");
            // On stdout: stderr stays the one line scripts already match.
            if let Some((found, logs)) = join(service_query) {
                println!("service       {}", service::describe_report(&found));
                if let Some(step) = service::next_step(&found, false, &logs) {
                    println!("next step     {step}");
                }
            }
            return EXIT_NOT_RUNNING;
        }
        Err(e) => {
            report(&format!("{url}: {e}"));
            return EXIT_FAILURE;
        }
    };
    let found = join(service_query);
    if json {
        println!("{}", with_service(&body, found.as_ref().map(|(f, _)| f)));
        return EXIT_OK;
    }
    match serde_json::from_slice::<Status>(&body) {
        Ok(status) => {
            print!("{}", render(&status));
            if let Some((found, logs)) = found {
                println!("  service       {}", service::describe_report(&found));
                if let Some(step) = service::next_step(&found, true, &logs) {
                    println!("  next step     {step}");
                }
            }
            EXIT_OK
        }
        Err(e) => {
            report(&format!(
                "{url} answered something that is not a contextpilotd status: {e}"
            ));
            EXIT_FAILURE
        }
    }
}

/// The service report and where its logs are; `None` without a home directory.
fn query_service() -> Option<(ServiceReport, String)> {
    let home: PathBuf = directories::BaseDirs::new()?.home_dir().to_path_buf();
    let platform = Platform::current();
    let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from);
    let unit_path = service::unit_path(platform, &home, xdg.as_deref());
    let uid = nix::unistd::getuid().as_raw();
    Some((
        service::query(platform, uid, &unit_path),
        platform.logs_hint(&home),
    ))
}

fn join(
    query: std::thread::JoinHandle<Option<(ServiceReport, String)>>,
) -> Option<(ServiceReport, String)> {
    query.join().ok().flatten()
}

/// The daemon's status document with a `service` object added; the body as
/// it came when it is not a JSON object.
fn with_service(body: &[u8], found: Option<&ServiceReport>) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut document)) => {
            document.insert(
                "service".to_string(),
                serde_json::to_value(found).unwrap_or(serde_json::Value::Null),
            );
            serde_json::Value::Object(document).to_string()
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_object_is_added_and_nothing_else_changes() {
        let found = ServiceReport {
            manager: "systemd".into(),
            unit_path: "/home/ada/.config/systemd/user/contextpilotd.service".into(),
            installed: false,
            manager_state: None,
            unknown_reason: Some("cannot run systemctl".into()),
        };
        let out: serde_json::Value =
            serde_json::from_str(&with_service(br#"{"state":"ready","pid":7}"#, Some(&found)))
                .unwrap();
        assert_eq!(out["state"], "ready");
        assert_eq!(out["pid"], 7);
        assert_eq!(out["service"]["installed"], false);
        assert_eq!(out["service"]["manager"], "systemd");
        assert_eq!(with_service(b"not json", Some(&found)), "not json");
    }
}
