//! `contextpilotd pull <REPO[:QUANT]>`: a GGUF from the Hugging Face hub into
//! the hub cache (see [`crate::models::pull`]). Progress goes to stderr, the
//! model's path alone to stdout, so that scripts can use it.

use super::{report, EXIT_CONFIG, EXIT_FAILURE, EXIT_OK};
use crate::models::pull::{self, HubSettings, PullError, PullRequest};

pub fn run(spec: &str, revision: String) -> i32 {
    let request = match pull::parse_spec(spec) {
        Ok((repo, quant)) => PullRequest {
            repo,
            quant,
            revision,
        },
        Err(e) => {
            report(&e);
            return EXIT_CONFIG;
        }
    };
    let settings = match HubSettings::from_env() {
        Ok(settings) => settings,
        Err(e) => {
            report(&e);
            return EXIT_CONFIG;
        }
    };
    match pull::pull(&settings, &request) {
        Ok(pulled) => {
            let parts = match pulled.files.len() {
                1 => String::new(),
                n => format!(" (the first of {n} parts)"),
            };
            eprintln!(
                "pulled {} at {}{parts}: {}",
                request.repo,
                pulled.commit,
                pulled.path.display()
            );
            eprintln!(
                "serve it: contextpilotd run --model {}",
                crate::plan::shell_quote(&[pulled.path.display().to_string()])
            );
            println!("{}", pulled.path.display());
            EXIT_OK
        }
        Err(e @ PullError::BadArgument(_)) => {
            report(&e);
            EXIT_CONFIG
        }
        Err(e) => {
            report(&e);
            EXIT_FAILURE
        }
    }
}
