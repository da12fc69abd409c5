//! `contextpilotd status`: asks the running daemon.

use std::time::Duration;

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK};
use crate::config::{Config, ConfigSource};
use crate::http_client::{HttpClient, HttpError};
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
    let url = format!("http://{listen}/status");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            report(&format!("cannot start the async runtime: {e}"));
            return EXIT_FAILURE;
        }
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
            return EXIT_NOT_RUNNING;
        }
        Err(e) => {
            report(&format!("{url}: {e}"));
            return EXIT_FAILURE;
        }
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return EXIT_OK;
    }
    match serde_json::from_slice::<Status>(&body) {
        Ok(status) => {
            print!("{}", render(&status));
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
