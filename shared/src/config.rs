//! Configuration from environment variables, validated at init.
//!
//! Every error names the variable, the value it had and what is accepted, in one line,
//! so a misconfigured function says what to fix in its first log line.

use std::fmt;
use thiserror::Error;

pub const DEFAULT_TABLE_NAME: &str = "S3EventAggregator";
pub const DEFAULT_REFRESH_DELAY_SECONDS: u32 = 30;
/// 12 hours, SQS's longest visibility timeout. SQS delays a message at most 900 s;
/// the refresher sends a longer window's message back until the window ends.
pub const MAX_REFRESH_DELAY_SECONDS: u32 = 43_200;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("configuration error: {name} is required but not set; {accepted}")]
    Missing {
        name: &'static str,
        accepted: &'static str,
    },
    #[error("configuration error: {name}={value:?} is not valid; {accepted}")]
    Invalid {
        name: &'static str,
        value: String,
        accepted: &'static str,
    },
}

/// `LOG_LEVEL`: DEBUG, INFO, WARN/WARNING or ERROR, in any case. `Trace` only comes
/// from Lambda's `AWS_LAMBDA_LOG_LEVEL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

impl LogLevel {
    const ACCEPTED: &'static str = "accepted: DEBUG, INFO, WARN (or WARNING), ERROR, in any case";

    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        match value.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => Ok(LogLevel::Debug),
            "INFO" => Ok(LogLevel::Info),
            "WARN" | "WARNING" => Ok(LogLevel::Warn),
            "ERROR" => Ok(LogLevel::Error),
            _ => Err(ConfigError::Invalid {
                name: "LOG_LEVEL",
                value: value.to_string(),
                accepted: Self::ACCEPTED,
            }),
        }
    }

    const LAMBDA_ACCEPTED: &'static str =
        "accepted: TRACE, DEBUG, INFO, WARN, ERROR, FATAL (the application log level of the function's logging configuration)";

    /// `AWS_LAMBDA_LOG_LEVEL`, which Lambda sets from the function's logging
    /// configuration (`ApplicationLogLevel`). FATAL acts as ERROR: we have no fatal
    /// lines, and Lambda drops the ERROR lines itself at FATAL.
    pub fn parse_lambda(value: &str) -> Result<Self, ConfigError> {
        match value.trim().to_ascii_uppercase().as_str() {
            "TRACE" => Ok(LogLevel::Trace),
            "DEBUG" => Ok(LogLevel::Debug),
            "INFO" => Ok(LogLevel::Info),
            "WARN" => Ok(LogLevel::Warn),
            "ERROR" | "FATAL" => Ok(LogLevel::Error),
            _ => Err(ConfigError::Invalid {
                name: "AWS_LAMBDA_LOG_LEVEL",
                value: value.to_string(),
                accepted: Self::LAMBDA_ACCEPTED,
            }),
        }
    }

    /// The level as a `tracing` filter directive.
    pub fn directive(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.directive())
    }
}

/// Settings both functions share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonConfig {
    pub table_name: String,
    pub log_level: LogLevel,
}

/// The aggregator's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatorConfig {
    pub common: CommonConfig,
    pub queue_url: String,
    pub refresh_delay_seconds: u32,
    /// `METRICS_INTERVAL_SECONDS`: how long a warm container adds its metrics up
    /// before it writes them (0: every invocation's lines at once).
    pub metrics_interval_seconds: u32,
}

/// The default `METRICS_INTERVAL_SECONDS`: CloudWatch's finest standard resolution.
pub const DEFAULT_METRICS_INTERVAL_SECONDS: u32 = 60;
/// The alarms look at periods of 5 minutes and more.
pub const MAX_METRICS_INTERVAL_SECONDS: u32 = 300;

/// The refresher's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefresherConfig {
    pub common: CommonConfig,
    /// `GATEWAY_REGIONS`: the regions whose gateways' shares are refreshed, in the
    /// order given. `None` when unset: the function's own region (see
    /// [`RefresherConfig::gateway_regions_or`]).
    pub gateway_regions: Option<Vec<String>>,
    /// `MIN_REFRESH_INTERVAL_SECONDS`: the least time between two `RefreshCache` calls
    /// on one share.
    pub min_refresh_interval_seconds: u32,
}

/// The default `MIN_REFRESH_INTERVAL_SECONDS`: the API reference's 60 s.
pub const DEFAULT_MIN_REFRESH_INTERVAL_SECONDS: u32 = 60;
pub const MAX_MIN_REFRESH_INTERVAL_SECONDS: u32 = 3_600;

/// Reads one variable. Tests pass a closure over a map; the binaries use [`from_process_env`].
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> EnvSource for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// The process environment. A variable that is not valid Unicode is passed on as its
/// lossy form, so the error message can show it.
pub fn from_process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

impl CommonConfig {
    pub fn from_env(env: &impl EnvSource) -> Result<Self, ConfigError> {
        // Precedence (RUST_LOG, when set, overrides both; see `logging`): LOG_LEVEL,
        // then AWS_LAMBDA_LOG_LEVEL, then INFO. The explicit variable wins because
        // Lambda sets AWS_LAMBDA_LOG_LEVEL (INFO by default) on every function whose
        // log format is JSON, so it cannot tell a choice from a default; because Lambda
        // drops JSON lines below that level by itself anyway; and because a level
        // above INFO there also drops the EMF metric lines (no "level": INFO to
        // Lambda), so a quieter function keeps it at INFO and sets LOG_LEVEL. A bad
        // AWS_LAMBDA_LOG_LEVEL fails init even when LOG_LEVEL is set.
        let lambda_level = env
            .var("AWS_LAMBDA_LOG_LEVEL")
            .filter(|v| !v.trim().is_empty())
            .map(|v| LogLevel::parse_lambda(&v))
            .transpose()?;
        let log_level = match env.var("LOG_LEVEL") {
            Some(v) => LogLevel::parse(&v)?,
            None => lambda_level.unwrap_or_default(),
        };
        let table_name = match env.var("TABLE_NAME") {
            None => DEFAULT_TABLE_NAME.to_string(),
            Some(v) => parse_table_name(&v)?,
        };
        Ok(CommonConfig {
            table_name,
            log_level,
        })
    }
}

impl AggregatorConfig {
    pub fn from_env(env: &impl EnvSource) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env)?;
        let queue_url = parse_queue_url(env.var("QUEUE_URL"))?;
        let refresh_delay_seconds = match env.var("REFRESH_DELAY_SECONDS") {
            None => DEFAULT_REFRESH_DELAY_SECONDS,
            Some(v) => parse_delay(&v)?,
        };
        let metrics_interval_seconds = match env.var("METRICS_INTERVAL_SECONDS") {
            None => DEFAULT_METRICS_INTERVAL_SECONDS,
            Some(v) => parse_metrics_interval(&v)?,
        };
        Ok(AggregatorConfig {
            common,
            queue_url,
            refresh_delay_seconds,
            metrics_interval_seconds,
        })
    }
}

impl RefresherConfig {
    pub fn from_env(env: &impl EnvSource) -> Result<Self, ConfigError> {
        let common = CommonConfig::from_env(env)?;
        let gateway_regions = match env.var("GATEWAY_REGIONS") {
            None => None,
            Some(v) => Some(parse_gateway_regions(&v)?),
        };
        let min_refresh_interval_seconds = match env.var("MIN_REFRESH_INTERVAL_SECONDS") {
            None => DEFAULT_MIN_REFRESH_INTERVAL_SECONDS,
            Some(v) => parse_min_refresh_interval(&v)?,
        };
        let allow_short = match env.var("ALLOW_SHORT_REFRESH_INTERVAL") {
            None => false,
            Some(v) => parse_allow_short(&v)?,
        };
        if min_refresh_interval_seconds < DEFAULT_MIN_REFRESH_INTERVAL_SECONDS && !allow_short {
            return Err(ConfigError::Invalid {
                name: "MIN_REFRESH_INTERVAL_SECONDS",
                value: min_refresh_interval_seconds.to_string(),
                accepted: "accepted: 60 to 3600; below 60 only with ALLOW_SHORT_REFRESH_INTERVAL=true also set, since a RefreshCache call within 60 s of the previous one on a share may not evict cached entries (deletes may stay visible)",
            });
        }
        Ok(RefresherConfig {
            common,
            gateway_regions,
            min_refresh_interval_seconds,
        })
    }

    /// The configured gateway regions, or `[own_region]` (the region that the AWS
    /// configuration resolved, `AWS_REGION` in Lambda) when `GATEWAY_REGIONS` is
    /// unset. Without either there is no region to ask: `GATEWAY_REGIONS` is missing.
    pub fn gateway_regions_or(&self, own_region: Option<&str>) -> Result<Vec<String>, ConfigError> {
        match (&self.gateway_regions, own_region) {
            (Some(regions), _) => Ok(regions.clone()),
            (None, Some(own)) => Ok(vec![own.to_string()]),
            (None, None) => Err(ConfigError::Missing {
                name: "GATEWAY_REGIONS",
                accepted: GATEWAY_REGIONS_ACCEPTED,
            }),
        }
    }
}

const GATEWAY_REGIONS_ACCEPTED: &str = "accepted: a comma-separated list of distinct AWS region names such as us-east-1,eu-west-2 (default: the function's own region)";

/// Whether `name` looks like an AWS region name: `^[a-z]{2}(-[a-z]+)+-[0-9]+$`
/// (`us-east-1`, `us-gov-west-1`, `cn-north-1`, `ap-southeast-5`).
pub fn is_region_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('-').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return false;
    };
    first.len() == 2
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && !middle.is_empty()
        && middle
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_digit())
}

fn parse_gateway_regions(value: &str) -> Result<Vec<String>, ConfigError> {
    let invalid = || ConfigError::Invalid {
        name: "GATEWAY_REGIONS",
        value: value.to_string(),
        accepted: GATEWAY_REGIONS_ACCEPTED,
    };
    let mut regions: Vec<String> = Vec::new();
    for entry in value.split(',').map(str::trim) {
        if !is_region_name(entry) || regions.iter().any(|r| r == entry) {
            return Err(invalid());
        }
        regions.push(entry.to_string());
    }
    Ok(regions)
}

/// A whole number of seconds from 0 to `max` in the variable `name`.
fn parse_seconds(
    name: &'static str,
    value: &str,
    max: u32,
    accepted: &'static str,
) -> Result<u32, ConfigError> {
    let invalid = || ConfigError::Invalid {
        name,
        value: value.to_string(),
        accepted,
    };
    let seconds: u32 = value.trim().parse().map_err(|_| invalid())?;
    if seconds > max {
        return Err(invalid());
    }
    Ok(seconds)
}

fn parse_delay(value: &str) -> Result<u32, ConfigError> {
    parse_seconds(
        "REFRESH_DELAY_SECONDS",
        value,
        MAX_REFRESH_DELAY_SECONDS,
        "accepted: a whole number of seconds from 0 to 43200 (12 hours; default 30)",
    )
}

fn parse_metrics_interval(value: &str) -> Result<u32, ConfigError> {
    parse_seconds(
        "METRICS_INTERVAL_SECONDS",
        value,
        MAX_METRICS_INTERVAL_SECONDS,
        "accepted: a whole number of seconds from 0 to 300 (default 60; 0 writes every invocation's metric lines)",
    )
}

fn parse_min_refresh_interval(value: &str) -> Result<u32, ConfigError> {
    parse_seconds(
        "MIN_REFRESH_INTERVAL_SECONDS",
        value,
        MAX_MIN_REFRESH_INTERVAL_SECONDS,
        "accepted: a whole number of seconds from 0 to 3600 (default 60, the Storage Gateway API reference's least interval between RefreshCache calls on a share)",
    )
}

/// `ALLOW_SHORT_REFRESH_INTERVAL`: `true` or `false`, in any case.
fn parse_allow_short(value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" | "" => Ok(false),
        _ => Err(ConfigError::Invalid {
            name: "ALLOW_SHORT_REFRESH_INTERVAL",
            value: value.to_string(),
            accepted:
                "accepted: true or false (true lets MIN_REFRESH_INTERVAL_SECONDS go below 60)",
        }),
    }
}

fn parse_queue_url(value: Option<String>) -> Result<String, ConfigError> {
    const ACCEPTED: &str =
        "accepted: the action queue's URL, https://sqs.REGION.amazonaws.com/ACCOUNT_ID/QUEUE_NAME";
    let value = value.ok_or(ConfigError::Missing {
        name: "QUEUE_URL",
        accepted: ACCEPTED,
    })?;
    let trimmed = value.trim();
    let has_scheme = trimmed.starts_with("https://") || trimmed.starts_with("http://");
    let has_path = has_scheme
        && trimmed
            .split_once("://")
            .is_some_and(|(_, rest)| rest.contains('/') && !rest.starts_with('/'));
    if !has_path {
        return Err(ConfigError::Invalid {
            name: "QUEUE_URL",
            value,
            accepted: ACCEPTED,
        });
    }
    Ok(trimmed.to_string())
}

fn parse_table_name(value: &str) -> Result<String, ConfigError> {
    // DynamoDB's own rule for table names.
    const ACCEPTED: &str =
        "accepted: 3 to 255 characters of a-z, A-Z, 0-9, '_', '-' and '.' (default S3EventAggregator)";
    let valid = (3..=255).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid {
        Ok(value.to_string())
    } else {
        Err(ConfigError::Invalid {
            name: "TABLE_NAME",
            value: value.to_string(),
            accepted: ACCEPTED,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    const QUEUE: &str =
        "https://sqs.eu-west-1.amazonaws.com/123456789012/S3EventAggregatorActionQueue";

    #[test]
    fn aggregator_defaults() {
        let config = AggregatorConfig::from_env(&env(&[("QUEUE_URL", QUEUE)])).unwrap();
        assert_eq!(config.refresh_delay_seconds, 30);
        assert_eq!(config.common.table_name, "S3EventAggregator");
        assert_eq!(config.common.log_level, LogLevel::Info);
        assert_eq!(config.queue_url, QUEUE);
    }

    #[test]
    fn queue_url_is_required_and_named() {
        let err = AggregatorConfig::from_env(&env(&[])).unwrap_err();
        let line = err.to_string();
        assert!(line.contains("QUEUE_URL"), "{line}");
        assert!(line.contains("required"), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn queue_url_must_be_a_url() {
        for bad in ["", "S3EventAggregatorActionQueue", "https://", "https:///x"] {
            let err = AggregatorConfig::from_env(&env(&[("QUEUE_URL", bad)])).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        name: "QUEUE_URL",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn metrics_interval_bounds() {
        let default = AggregatorConfig::from_env(&env(&[("QUEUE_URL", QUEUE)])).unwrap();
        assert_eq!(default.metrics_interval_seconds, 60);
        for (value, expected) in [("0", 0), (" 300 ", 300), ("15", 15)] {
            let config = AggregatorConfig::from_env(&env(&[
                ("QUEUE_URL", QUEUE),
                ("METRICS_INTERVAL_SECONDS", value),
            ]))
            .unwrap();
            assert_eq!(config.metrics_interval_seconds, expected);
        }
        for bad in ["301", "-1", "1m", ""] {
            let line = AggregatorConfig::from_env(&env(&[
                ("QUEUE_URL", QUEUE),
                ("METRICS_INTERVAL_SECONDS", bad),
            ]))
            .unwrap_err()
            .to_string();
            assert!(line.contains("METRICS_INTERVAL_SECONDS"), "{line}");
            assert!(line.contains("0 to 300"), "{line}");
        }
    }

    #[test]
    fn delay_bounds() {
        for (value, expected) in [
            ("0", 0),
            ("900", 900),
            ("901", 901),
            (" 45 ", 45),
            ("43200", 43_200),
        ] {
            let config = AggregatorConfig::from_env(&env(&[
                ("QUEUE_URL", QUEUE),
                ("REFRESH_DELAY_SECONDS", value),
            ]))
            .unwrap();
            assert_eq!(config.refresh_delay_seconds, expected);
        }
        for bad in ["43201", "-1", "abc", "", "1.5", "99999999999"] {
            let err = AggregatorConfig::from_env(&env(&[
                ("QUEUE_URL", QUEUE),
                ("REFRESH_DELAY_SECONDS", bad),
            ]))
            .unwrap_err();
            let line = err.to_string();
            assert!(line.contains("REFRESH_DELAY_SECONDS"), "{line}");
            assert!(line.contains("0 to 43200"), "{line}");
        }
    }

    #[test]
    fn log_levels_in_any_case() {
        for (value, level) in [
            ("debug", LogLevel::Debug),
            ("Info", LogLevel::Info),
            ("WARN", LogLevel::Warn),
            ("warning", LogLevel::Warn),
            ("ERROR", LogLevel::Error),
        ] {
            assert_eq!(LogLevel::parse(value).unwrap(), level);
        }
        let err = RefresherConfig::from_env(&env(&[("LOG_LEVEL", "verbose")])).unwrap_err();
        let line = err.to_string();
        assert!(
            line.contains("LOG_LEVEL") && line.contains("\"verbose\"") && line.contains("WARNING"),
            "{line}"
        );
    }

    #[test]
    fn lambda_log_level_applies_when_log_level_is_not_set() {
        for (value, level) in [
            ("TRACE", LogLevel::Trace),
            ("DEBUG", LogLevel::Debug),
            ("INFO", LogLevel::Info),
            ("WARN", LogLevel::Warn),
            ("ERROR", LogLevel::Error),
            ("FATAL", LogLevel::Error),
            ("debug", LogLevel::Debug),
        ] {
            let config =
                RefresherConfig::from_env(&env(&[("AWS_LAMBDA_LOG_LEVEL", value)])).unwrap();
            assert_eq!(config.common.log_level, level, "{value}");
        }
        // LOG_LEVEL, when set, wins over the logging configuration's level.
        let config = RefresherConfig::from_env(&env(&[
            ("AWS_LAMBDA_LOG_LEVEL", "DEBUG"),
            ("LOG_LEVEL", "warn"),
        ]))
        .unwrap();
        assert_eq!(config.common.log_level, LogLevel::Warn);
        // LOG_LEVEL does not accept TRACE or FATAL: those are Lambda's names.
        assert!(LogLevel::parse("TRACE").is_err() && LogLevel::parse("FATAL").is_err());
        // Not set or empty: INFO.
        let config = RefresherConfig::from_env(&env(&[("AWS_LAMBDA_LOG_LEVEL", " ")])).unwrap();
        assert_eq!(config.common.log_level, LogLevel::Info);
    }

    #[test]
    fn bad_lambda_log_level_is_named_even_under_log_level() {
        for pairs in [
            vec![("AWS_LAMBDA_LOG_LEVEL", "WARNING")],
            vec![("AWS_LAMBDA_LOG_LEVEL", "WARNING"), ("LOG_LEVEL", "INFO")],
        ] {
            let err = RefresherConfig::from_env(&env(&pairs)).unwrap_err();
            let line = err.to_string();
            assert!(
                line.contains("AWS_LAMBDA_LOG_LEVEL=\"WARNING\"")
                    && line.contains("TRACE, DEBUG, INFO, WARN, ERROR, FATAL")
                    && !line.contains('\n'),
                "{line}"
            );
        }
    }

    #[test]
    fn min_refresh_interval_defaults_to_60_and_takes_0_to_3600_below_60_only_when_allowed() {
        let read = |value: Option<&str>, allow: Option<&str>| {
            RefresherConfig::from_env(&|name: &str| match name {
                "MIN_REFRESH_INTERVAL_SECONDS" => value.map(str::to_string),
                "ALLOW_SHORT_REFRESH_INTERVAL" => allow.map(str::to_string),
                _ => None,
            })
        };
        assert_eq!(
            read(None, None).map(|c| c.min_refresh_interval_seconds),
            Ok(60)
        );
        assert_eq!(
            read(Some("0"), Some("TRUE")).map(|c| c.min_refresh_interval_seconds),
            Ok(0)
        );
        assert_eq!(
            read(Some(" 3600 "), None).map(|c| c.min_refresh_interval_seconds),
            Ok(3600)
        );
        for bad in ["3601", "-1", "1.5", "", "soon"] {
            let line = read(Some(bad), Some("true"))
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                line.contains("MIN_REFRESH_INTERVAL_SECONDS") && line.contains("0 to 3600"),
                "{line}"
            );
        }
        for allow in [None, Some("false"), Some("")] {
            let line = read(Some("59"), allow).map(|_| ()).unwrap_err().to_string();
            assert!(
                line.contains("MIN_REFRESH_INTERVAL_SECONDS")
                    && line.contains("ALLOW_SHORT_REFRESH_INTERVAL=true"),
                "{line}"
            );
        }
        let line = read(Some("5"), Some("yes"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(line.contains("ALLOW_SHORT_REFRESH_INTERVAL"), "{line}");
    }

    #[test]
    fn gateway_regions_default_to_the_own_region() {
        let config = RefresherConfig::from_env(&env(&[])).unwrap();
        assert_eq!(config.gateway_regions, None);
        assert_eq!(
            config.gateway_regions_or(Some("eu-west-1")).unwrap(),
            ["eu-west-1"]
        );
        // No region anywhere: the line names GATEWAY_REGIONS.
        let line = config.gateway_regions_or(None).unwrap_err().to_string();
        assert!(
            line.contains("GATEWAY_REGIONS") && line.contains("required"),
            "{line}"
        );
    }

    #[test]
    fn gateway_regions_are_trimmed_and_kept_in_order() {
        let config = RefresherConfig::from_env(&env(&[(
            "GATEWAY_REGIONS",
            " us-east-1 ,eu-west-2,cn-north-1, us-gov-west-1,ap-southeast-5 ",
        )]))
        .unwrap();
        let expected = [
            "us-east-1",
            "eu-west-2",
            "cn-north-1",
            "us-gov-west-1",
            "ap-southeast-5",
        ];
        assert_eq!(
            config.gateway_regions.as_deref(),
            Some(&expected.map(String::from)[..])
        );
        // Configured regions replace the default; the own region is not added.
        assert_eq!(
            config.gateway_regions_or(Some("sa-east-1")).unwrap(),
            expected
        );
        assert_eq!(config.gateway_regions_or(None).unwrap(), expected);
        let one = RefresherConfig::from_env(&env(&[("GATEWAY_REGIONS", "eu-central-1")])).unwrap();
        assert_eq!(
            one.gateway_regions_or(Some("us-east-1")).unwrap(),
            ["eu-central-1"]
        );
    }

    #[test]
    fn gateway_regions_rejects_malformed_lists_in_one_line() {
        for bad in [
            "",
            " ",
            ",",
            "us-east-1,",
            ",us-east-1",
            "us-east-1,,eu-west-1",
            "us-east-1,us-east-1",
            "us-east-1, us-east-1 ",
            "US-EAST-1",
            "us-east",
            "useast1",
            "us-east-1a",
            "us--east-1",
            "u-east-1",
            "usa-east-1",
            "us-east-",
            "-us-east-1",
            "us-east-1 eu-west-1",
            "us-east-1;eu-west-1",
            "us-éast-1",
            "arn:aws:storagegateway:us-east-1",
        ] {
            let err = RefresherConfig::from_env(&env(&[("GATEWAY_REGIONS", bad)])).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        name: "GATEWAY_REGIONS",
                        ..
                    }
                ),
                "{bad:?}: {err}"
            );
            let line = err.to_string();
            assert!(
                line.contains("GATEWAY_REGIONS") && line.contains("us-east-1,eu-west-2"),
                "{line}"
            );
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn region_names() {
        for good in [
            "us-east-1",
            "eu-west-2",
            "cn-north-1",
            "us-gov-west-1",
            "ap-southeast-5",
            "us-isob-east-1",
            "il-central-1",
        ] {
            assert!(is_region_name(good), "{good}");
        }
        for bad in [
            "",
            "us",
            "us-1",
            "us-east",
            "us-east-x",
            "1s-east-1",
            "us-east-1-",
            "us-East-1",
        ] {
            assert!(!is_region_name(bad), "{bad}");
        }
    }

    #[test]
    fn table_name_rules() {
        let config = RefresherConfig::from_env(&env(&[("TABLE_NAME", "my.table-1")])).unwrap();
        assert_eq!(config.common.table_name, "my.table-1");
        for bad in ["", "ab", "has space", "ünï"] {
            let err = RefresherConfig::from_env(&env(&[("TABLE_NAME", bad)])).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        name: "TABLE_NAME",
                        ..
                    }
                ),
                "{bad}"
            );
        }
    }
}
