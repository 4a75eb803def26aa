//! Logging set-up: `LOG_LEVEL` for our crates, `RUST_LOG` for fine-grained filters,
//! JSON lines when Lambda's log format is JSON.
//!
//! The level of our crates: `RUST_LOG` when set (it replaces the whole filter), else
//! `LOG_LEVEL`, else `AWS_LAMBDA_LOG_LEVEL` (Lambda's logging configuration,
//! `ApplicationLogLevel`), else INFO; see [`crate::config::CommonConfig::from_env`]
//! for why the function's own variable wins. In JSON mode Lambda also drops, by
//! itself, every line below `ApplicationLogLevel`, whatever we print.

use crate::config::{ConfigError, LogLevel};
use tracing_subscriber::EnvFilter;

/// Our crates log at `level`; everything else (SDK, HTTP) only at WARN and above,
/// unless `RUST_LOG` says otherwise. The runtime's per-invocation span (with the
/// request id) is kept at INFO so every line carries it.
fn default_filter(level: LogLevel) -> String {
    let l = level.directive();
    format!("warn,lambda_runtime=info,shared={l},aggregator={l},refresher={l}")
}

fn json_format(lookup: &dyn Fn(&str) -> Option<String>) -> bool {
    lookup("AWS_LAMBDA_LOG_FORMAT").is_some_and(|v| v.eq_ignore_ascii_case("JSON"))
}

/// Installs the global subscriber. Call once, first thing in `main`.
///
/// Returns an error line if `RUST_LOG` is set but not a valid filter.
pub fn init(level: LogLevel) -> Result<(), ConfigError> {
    init_with(level, &crate::config::from_process_env)
}

pub fn init_with(
    level: LogLevel,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let filter = match lookup("RUST_LOG").filter(|v| !v.trim().is_empty()) {
        Some(directives) => {
            EnvFilter::try_new(&directives).map_err(|_| ConfigError::Invalid {
                name: "RUST_LOG",
                value: directives.clone(),
                accepted: "accepted: tracing filter directives such as 'info' or 'shared=debug,aws_smithy_runtime=info'",
            })?
        }
        None => EnvFilter::new(default_filter(level)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stdout);
    // A second init (tests) keeps the first subscriber; that is not an error worth failing on.
    if json_format(lookup) {
        let _ = builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .flatten_event(true)
            .try_init();
    } else {
        let _ = builder.without_time().try_init();
    }
    if let Some(line) = metrics_dropped_warning(lookup) {
        tracing::error!("{line}");
    }
    Ok(())
}

/// In JSON mode Lambda gives a line without a `"level"` the level INFO, so an
/// application log level above INFO drops the EMF metric lines, and with them every
/// metric and alarm. Said once per cold start, at ERROR so that it passes that filter.
fn metrics_dropped_warning(lookup: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let value = lookup("AWS_LAMBDA_LOG_LEVEL")?;
    let level = LogLevel::parse_lambda(&value).ok()?;
    (json_format(lookup) && level > LogLevel::Info).then(|| {
        format!(
            "AWS_LAMBDA_LOG_LEVEL={} (the function's ApplicationLogLevel) drops the EMF metric lines, which Lambda counts as INFO: no metrics and no alarms; set ApplicationLogLevel to INFO and LOG_LEVEL={} instead",
            value.trim(),
            level.directive().to_ascii_uppercase()
        )
    })
}

/// Prints a configuration error as the function's one init line and exits.
///
/// Lambda then reports `Runtime.ExitError` with this line in the function's log.
pub fn fail_init(error: &ConfigError) -> ! {
    let line = error.to_string();
    if json_format(&crate::config::from_process_env) {
        let json = serde_json::json!({"level": "ERROR", "message": line});
        eprintln!("{json}");
    } else {
        eprintln!("ERROR {line}");
    }
    std::process::exit(2)
}

/// The first `max` bytes of `text` at most, cut at a character boundary: payloads
/// and bodies are logged, but never whole when they are huge.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }

    use super::*;

    #[test]
    fn default_filter_scopes_level_to_our_crates() {
        let f = default_filter(LogLevel::Debug);
        assert!(f.starts_with("warn,"));
        assert!(f.contains("shared=debug") && f.contains("refresher=debug"));
    }

    #[test]
    fn application_log_level_above_info_in_json_mode_is_called_out() {
        let lookup = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let json_warn = lookup(&[
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            ("AWS_LAMBDA_LOG_LEVEL", "WARN"),
        ]);
        let line = metrics_dropped_warning(&json_warn).unwrap();
        assert!(line.contains("AWS_LAMBDA_LOG_LEVEL=WARN") && line.contains("LOG_LEVEL=WARN"));
        let json_fatal = lookup(&[
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
            ("AWS_LAMBDA_LOG_LEVEL", "FATAL"),
        ]);
        assert!(metrics_dropped_warning(&json_fatal).is_some());
        for quiet in [
            lookup(&[
                ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
                ("AWS_LAMBDA_LOG_LEVEL", "INFO"),
            ]),
            lookup(&[
                ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
                ("AWS_LAMBDA_LOG_LEVEL", "DEBUG"),
            ]),
            lookup(&[
                ("AWS_LAMBDA_LOG_FORMAT", "Text"),
                ("AWS_LAMBDA_LOG_LEVEL", "WARN"),
            ]),
            lookup(&[("AWS_LAMBDA_LOG_FORMAT", "JSON")]),
        ] {
            assert_eq!(metrics_dropped_warning(&quiet), None);
        }
    }

    #[test]
    fn bad_rust_log_is_named() {
        let lookup = |name: &str| (name == "RUST_LOG").then(|| "shared=notalevel".to_string());
        let err = init_with(LogLevel::Info, &lookup).unwrap_err();
        assert!(err.to_string().contains("RUST_LOG"));
    }
}
