//! What a request's headers ask of the daemon: `X-Conversation-Id`, the
//! caller's identity, and the `X-ContextPilot-*` settings of inferred mode
//! and block dedup. No client header is forwarded to llama-server.

use crate::reorder::extract::{self, InterceptConfig, Mode, Scope};

const CONTROL_PREFIX: &str = "x-contextpilot-";

/// Per-request options from the HTTP headers.
#[derive(Debug, Clone)]
pub(super) struct RequestOptions {
    /// `X-Conversation-Id`.
    pub conversation: Option<String>,
    /// The `X-ContextPilot-*` settings; with `X-ContextPilot-Enabled: false`
    /// (or 0, no) the payload is left alone.
    pub intercept: InterceptConfig,
    /// Who is calling (a hash of its credentials), so sessions never mix
    /// callers.
    pub client: String,
}

impl RequestOptions {
    pub(super) fn from_headers(headers: &hyper::HeaderMap) -> RequestOptions {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let intercept = intercept_config(
            headers
                .iter()
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?))),
        );
        let client = header("authorization")
            .map(|auth| format!("{:016x}", crate::reorder::text_hash(auth)))
            .unwrap_or_default();
        RequestOptions {
            conversation: header("x-conversation-id").map(str::to_string),
            intercept,
            client,
        }
    }
}

/// The settings from `(name, value)` header pairs, names in any case.
/// Unusable values fall back to the defaults rather than failing the
/// request: a typo in an optional tuning header should not cost the client
/// its answer. `X-ContextPilot-Alpha` and `-Linkage` (ContextPilot's
/// clustering knobs) are accepted and ignored.
pub fn intercept_config<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> InterceptConfig {
    let mut config = InterceptConfig::default();
    for (name, value) in headers {
        let Some(key) = control_suffix(name) else {
            continue;
        };
        let value = value.trim();
        match key.to_ascii_lowercase().as_str() {
            "enabled" => {
                config.enabled =
                    !matches!(value.to_ascii_lowercase().as_str(), "false" | "0" | "no");
            }
            "mode" => config.mode = Mode::parse(value),
            "tag" => {
                config.tag = if extract::is_valid_tag(value) {
                    value.to_string()
                } else {
                    extract::DEFAULT_TAG.to_string()
                };
            }
            "separator" => {
                config.separator = if value.is_empty() {
                    extract::DEFAULT_SEPARATOR.to_string()
                } else {
                    value.to_string()
                };
            }
            "scope" => config.scope = Scope::parse(value),
            _ => {}
        }
    }
    config
}

fn control_suffix(name: &str) -> Option<&str> {
    let head = name.get(..CONTROL_PREFIX.len())?;
    if head.eq_ignore_ascii_case(CONTROL_PREFIX) {
        name.get(CONTROL_PREFIX.len()..)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_headers_give_defaults() {
        let config = intercept_config([]);
        assert_eq!(config, InterceptConfig::default());
        assert!(config.enabled);
        assert_eq!(config.mode, Mode::Auto);
        assert_eq!(config.tag, "document");
        assert_eq!(config.separator, "---");
        assert_eq!(config.scope, Scope::All);
    }

    #[test]
    fn enabled_header_disables_on_false_values() {
        for value in ["false", "0", "no", "False", "NO", " no "] {
            let config = intercept_config([("X-ContextPilot-Enabled", value)]);
            assert!(!config.enabled, "{value:?} should disable");
        }
        for value in ["true", "1", "yes", "whatever"] {
            let config = intercept_config([("X-ContextPilot-Enabled", value)]);
            assert!(config.enabled, "{value:?} should keep enabled");
        }
    }

    #[test]
    fn header_values_are_parsed_and_invalid_ones_fall_back() {
        let config = intercept_config([
            ("x-contextpilot-mode", "JSON_RESULTS"),
            ("X-CONTEXTPILOT-TAG", "chunk"),
            ("X-ContextPilot-Separator", "==="),
            ("x-ContextPilot-Alpha", "0.5"),
            ("X-ContextPilot-Linkage", "Complete"),
            ("X-ContextPilot-Scope", "tool_results"),
            ("Content-Type", "application/json"),
        ]);
        assert_eq!(config.mode, Mode::JsonResults);
        assert_eq!(config.tag, "chunk");
        assert_eq!(config.separator, "===");
        assert_eq!(config.scope, Scope::ToolResults);

        let config = intercept_config([
            ("X-ContextPilot-Mode", "fancy"),
            ("X-ContextPilot-Scope", "everything"),
            ("X-ContextPilot-Tag", "bad tag>"),
        ]);
        assert_eq!(config.mode, Mode::Auto);
        assert_eq!(config.scope, Scope::All);
        assert_eq!(config.tag, "document");

        let config = intercept_config([("X-ContextPilot-Scope", "SYSTEM")]);
        assert_eq!(config.scope, Scope::System);
        let config = intercept_config([("x-contextpilot-mode", "Markdown_Header")]);
        assert_eq!(config.mode, Mode::MarkdownHeader);
    }

    #[test]
    fn control_headers_are_recognised_in_any_case() {
        assert!(control_suffix("X-ContextPilot-Mode").is_some());
        assert!(control_suffix("x-contextpilot-anything-new").is_some());
        assert!(control_suffix("X-CONTEXTPILOT-").is_some());
        assert!(control_suffix("X-ContextPilot").is_none());
        assert!(control_suffix("x-contextpilotmode").is_none());
        assert!(control_suffix("content-type").is_none());
        assert!(control_suffix("").is_none());
        assert!(control_suffix("é-contextpilot-éé").is_none());
    }
}
