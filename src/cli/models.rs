//! `contextpilotd models`: the models the daemon can serve by name, found
//! where the config and other tools keep them.

use std::fmt::Write;

use super::{report, ConfigArg, EXIT_CONFIG, EXIT_OK};
use crate::config::{Config, ConfigSource};
use crate::models::discover::{self, Found, Places, Summary};
use crate::status::human_bytes;

pub fn run(arg: ConfigArg, json: bool) -> i32 {
    let source = ConfigSource::locate(arg.config.as_deref());
    let config = match Config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            report(&e);
            return EXIT_CONFIG;
        }
    };
    let models = discover::servable(&config);
    if json {
        let summaries: Vec<Summary> = models.iter().map(Found::summary).collect();
        match serde_json::to_string_pretty(&summaries) {
            Ok(text) => println!("{text}"),
            Err(e) => report(&e),
        }
    } else if models.is_empty() {
        println!("{}", nothing_found(&Places::from_env(&config.models)));
    } else {
        print!("{}", render(&models));
    }
    EXIT_OK
}

/// Where it looked, and how to get a model.
fn nothing_found(places: &Places) -> String {
    let searched: Vec<String> = places
        .searched()
        .iter()
        .map(|(_, path)| path.display().to_string())
        .collect();
    let looked = if searched.is_empty() {
        "no [llama] model, and no places to look ([models] dirs is empty and discover is off)"
            .to_string()
    } else {
        format!(
            "no [llama] model or GGUF files found in {}",
            searched.join(", ")
        )
    };
    format!("{looked}; `contextpilotd pull <repo>` fetches one from Hugging Face.")
}

/// One row per model, its path (and any error) indented below it.
fn render(models: &[Found]) -> String {
    const HEADINGS: [&str; 7] = [
        "NAME", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "SOURCE",
    ];
    let dash = || "-".to_string();
    let rows: Vec<[String; 7]> = models
        .iter()
        .map(|m| {
            let s = m.summary();
            [
                s.name,
                s.architecture.unwrap_or_else(dash),
                s.parameters.unwrap_or_else(dash),
                s.quantization.map(str::to_string).unwrap_or_else(dash),
                s.context_length.map(tokens).unwrap_or_else(dash),
                s.size_bytes.map(human_bytes).unwrap_or_else(dash),
                s.source.to_string(),
            ]
        })
        .collect();
    let mut widths = HEADINGS.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &[&str]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ", width = widths[i]);
            }
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    let mut out = String::new();
    line(&mut out, &HEADINGS);
    for (model, row) in models.iter().zip(&rows) {
        line(&mut out, &row.each_ref().map(String::as_str));
        let _ = writeln!(out, "    {}", model.path.display());
        if let Err(e) = &model.facts {
            let _ = writeln!(out, "    cannot serve it: {e}");
        }
    }
    out
}

/// A context length the way model cards write it: "8K", "128K".
fn tokens(n: u64) -> String {
    if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}K", n / 1024)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::discover::Source;
    use std::path::PathBuf;

    #[test]
    fn rows_line_up_and_errors_are_shown() {
        let facts = crate::gguf::read_model_facts(std::path::Path::new("/nowhere.gguf"))
            .map_err(|e| e.to_string());
        let models = [Found {
            name: "a-long-model-name:Q4_K_M".into(),
            aliases: Vec::new(),
            path: PathBuf::from("/nowhere.gguf"),
            source: Source::Dir,
            facts,
        }];
        let text = render(&models);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("NAME                      ARCH"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("a-long-model-name:Q4_K_M  -"),
            "{text}"
        );
        assert!(lines[1].ends_with("dir"), "{text}");
        assert_eq!(lines[2], "    /nowhere.gguf");
        assert!(lines[3].contains("cannot open model file"), "{text}");
    }

    #[test]
    fn context_lengths_read_like_model_cards() {
        assert_eq!(tokens(8192), "8K");
        assert_eq!(tokens(131_072), "128K");
        assert_eq!(tokens(2000), "2000");
    }

    #[test]
    fn nothing_found_says_where_it_looked() {
        let places = Places {
            hf_hub: Some(PathBuf::from("/hf")),
            dirs: vec![PathBuf::from("/mine")],
            ..Places::default()
        };
        let text = nothing_found(&places);
        assert!(text.contains("/mine, /hf"), "{text}");
        assert!(text.contains("contextpilotd pull <repo>"), "{text}");
        assert!(nothing_found(&Places::default()).contains("discover is off"));
    }
}
