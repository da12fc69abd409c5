//! `contextpilotd ps`: the models the running daemon has loaded, and
//! `load` / `unload`, which change that.

use std::time::Duration;

use serde_json::{json, Value};

use super::{ask_daemon, ConfigArg, EXIT_OK};
use crate::models::LoadedModel;
use crate::status::human_bytes;

pub fn ps(arg: ConfigArg, json_out: bool) -> i32 {
    let body = match ask_daemon(&arg, "/models/loaded", None, Duration::from_secs(5)) {
        Ok(body) => body,
        Err(code) => return code,
    };
    if json_out {
        println!("{body}");
        return EXIT_OK;
    }
    let models: Vec<LoadedModel> = body
        .get("models")
        .cloned()
        .and_then(|m| serde_json::from_value(m).ok())
        .unwrap_or_default();
    let budget = body.get("memory_budget_bytes").and_then(Value::as_u64);
    print!("{}", render(&models, budget));
    EXIT_OK
}

/// The `ps` table.
pub fn render(models: &[LoadedModel], budget: Option<u64>) -> String {
    use std::fmt::Write;
    if models.is_empty() {
        return "no model is loaded; a request naming one loads it (`contextpilotd models` lists them)\n"
            .to_string();
    }
    let mut out = format!(
        "{:<28} {:<10} {:>9} {:>14} {:>5} {:>6}  {}\n",
        "NAME", "STATE", "MEMORY", "SLOTS", "BUSY", "QUEUED", "UNTIL"
    );
    for m in models {
        let until = match (m.unloads_in_s, m.in_use) {
            (_, n) if n > 0 => format!("in use by {n}"),
            (Some(s), _) => format!("unloads in {s:.0} s"),
            (None, _) => "stays loaded".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<28} {:<10} {:>9} {:>14} {:>5} {:>6}  {until}",
            m.name,
            m.state,
            human_bytes(m.size_bytes),
            format!("{} × {}", m.slots, m.ctx_per_slot),
            m.busy,
            m.queued
        );
    }
    if let Some(budget) = budget.filter(|b| *b < u64::MAX) {
        let used: u64 = models.iter().map(|m| m.size_bytes).sum();
        let _ = writeln!(
            out,
            "memory: {} of {} budget",
            human_bytes(used),
            human_bytes(budget)
        );
    }
    out
}

pub fn load(arg: ConfigArg, model: String, keep_alive: Option<String>) -> i32 {
    let mut body = json!({"model": model});
    if let Some(k) = keep_alive {
        body["keep_alive"] = Value::from(k);
    }
    match ask_daemon(&arg, "/models/load", Some(body), Duration::from_secs(600)) {
        Ok(answer) => {
            let loaded: Option<LoadedModel> = serde_json::from_value(answer).ok();
            match loaded {
                Some(m) => println!(
                    "{} is {} ({} × {} tokens, {})",
                    m.name,
                    m.state,
                    m.slots,
                    m.ctx_per_slot,
                    human_bytes(m.size_bytes)
                ),
                None => println!("{model} is loaded"),
            }
            EXIT_OK
        }
        Err(code) => code,
    }
}

pub fn unload(arg: ConfigArg, model: String) -> i32 {
    match ask_daemon(
        &arg,
        "/models/unload",
        Some(json!({"model": model})),
        Duration::from_secs(60),
    ) {
        Ok(answer) if answer["unloaded"] == Value::Bool(true) => {
            println!("{model} unloaded");
            EXIT_OK
        }
        Ok(_) => {
            println!("{model} was not loaded");
            EXIT_OK
        }
        Err(code) => code,
    }
}
