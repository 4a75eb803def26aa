//! Section 4 of the benchmark: the CloudWatch Logs bytes per S3 event in each logging
//! mode (`--only logs`).
//!
//! A burst of direct S3 events (one invocation each, as S3 invokes the aggregator)
//! into one bucket with one share, then the refresher on the windows' messages, with
//! the real binaries. What the functions print is counted, line by line, as Lambda
//! would send it to CloudWatch Logs: in JSON mode without the lines below the
//! application log level (a line without a `level` counts as INFO, as Lambda does).
//! Lambda's own START, END and REPORT lines are not printed by the functions; in text
//! mode they are added with their real size, three per invocation (the first REPORT
//! of each process with its `Init Duration`); in JSON mode with the system log level
//! WARN there are none.
//!
//! The aggregator's metric lines are added up in the warm container
//! (`METRICS_INTERVAL_SECONDS`, 60 by default) and written when Lambda shuts the
//! container down: the measurement ends with that shutdown (SIGTERM, as Lambda sends
//! it to a runtime with an extension). One more mode writes every invocation's lines,
//! as before the buffer.

use integration_tests::aws::BoxError;
use integration_tests::sgw_standin::ShareKind;
use integration_tests::stack::{Stack, StackOptions};
use serde_json::Value;
use std::fmt::Write;

/// CloudWatch Logs ingestion, us-east-1 list price (standard log class), per GB (2^30 bytes).
pub const INGESTION_USD_PER_GB: f64 = 0.50;
const EVENTS: usize = 200;
const FOLDERS: usize = 10;

/// Lambda's platform lines of one invocation in text mode, as Lambda writes them for
/// a custom runtime (request ids are 36 characters).
fn platform_lines(cold: bool) -> [String; 3] {
    let id = "c0ffee00-1234-4abc-9def-0123456789ab";
    let init = if cold {
        "Init Duration: 28.61 ms\t"
    } else {
        ""
    };
    [
        format!("START RequestId: {id} Version: $LATEST"),
        format!("END RequestId: {id}"),
        format!(
            "REPORT RequestId: {id}\tDuration: 12.41 ms\tBilled Duration: 13 ms\tMemory Size: 128 MB\tMax Memory Used: 19 MB\t{init}"
        ),
    ]
}

pub struct LogMode {
    pub name: &'static str,
    /// How a deployment gets it.
    pub how: &'static str,
    env: &'static [(&'static str, &'static str)],
    /// JSON: Lambda drops lines below this (`AWS_LAMBDA_LOG_LEVEL`); no platform lines.
    json_application_level: Option<&'static str>,
}

pub fn modes() -> Vec<LogMode> {
    vec![
        LogMode {
            name: "text, INFO",
            how: "the default (`--log-format text`, `LOG_LEVEL=INFO`)",
            env: &[("LOG_LEVEL", "INFO"), ("METRICS_INTERVAL_SECONDS", "60")],
            json_application_level: None,
        },
        LogMode {
            name: "text, INFO, every invocation's metrics",
            how: "the default with `METRICS_INTERVAL_SECONDS=0` on the aggregator",
            env: &[("LOG_LEVEL", "INFO"), ("METRICS_INTERVAL_SECONDS", "0")],
            json_application_level: None,
        },
        LogMode {
            name: "text, WARN",
            how: "`--log-format text --log-level warn`",
            env: &[("LOG_LEVEL", "WARN"), ("METRICS_INTERVAL_SECONDS", "60")],
            json_application_level: None,
        },
        LogMode {
            name: "JSON, INFO",
            how: "`--log-format json` (`ApplicationLogLevel=INFO`, `SystemLogLevel=WARN`, `LOG_LEVEL=INFO`)",
            env: &[
                ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
                ("AWS_LAMBDA_LOG_LEVEL", "INFO"),
                ("LOG_LEVEL", "INFO"),
                ("METRICS_INTERVAL_SECONDS", "60"),
            ],
            json_application_level: Some("INFO"),
        },
        LogMode {
            name: "JSON, WARN",
            how: "`--log-format json --log-level warn` (`ApplicationLogLevel=INFO`, `SystemLogLevel=WARN`, `LOG_LEVEL=WARN`)",
            env: &[
                ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
                ("AWS_LAMBDA_LOG_LEVEL", "INFO"),
                ("LOG_LEVEL", "WARN"),
                ("METRICS_INTERVAL_SECONDS", "60"),
            ],
            json_application_level: Some("INFO"),
        },
    ]
}

#[derive(Debug, Default, Clone)]
pub struct LogRow {
    pub mode: String,
    pub how: String,
    pub events: usize,
    pub aggregator_invocations: usize,
    pub refresher_invocations: usize,
    pub our_lines: usize,
    pub our_bytes: usize,
    pub emf_lines: usize,
    pub emf_bytes: usize,
    pub platform_lines: usize,
    pub platform_bytes: usize,
}

impl LogRow {
    pub fn total_bytes(&self) -> usize {
        self.our_bytes + self.emf_bytes + self.platform_bytes
    }
    pub fn per_event(&self, bytes: usize) -> f64 {
        bytes as f64 / self.events as f64
    }
    pub fn usd_per_million(&self) -> f64 {
        self.per_event(self.total_bytes()) * 1e6 / f64::from(1u32 << 30) * INGESTION_USD_PER_GB
    }
}

fn rank(level: &str) -> u8 {
    match level.to_ascii_uppercase().as_str() {
        "TRACE" => 0,
        "DEBUG" => 1,
        "WARN" => 3,
        "ERROR" => 4,
        "FATAL" => 5,
        _ => 2, // INFO, and what Lambda reads as INFO: no or an unknown level
    }
}

/// Adds one function's output to `row`, as CloudWatch Logs would receive it.
fn count(row: &mut LogRow, lines: &[String], mode: &LogMode) {
    for line in lines {
        if let Some(min) = mode.json_application_level {
            let level = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v.get("level").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default();
            if rank(&level) < rank(min) {
                continue;
            }
        }
        // The event's message: the line without its newline.
        if line.starts_with("{\"_aws\"") {
            row.emf_lines += 1;
            row.emf_bytes += line.len();
        } else {
            row.our_lines += 1;
            row.our_bytes += line.len();
        }
    }
}

pub async fn measure_mode(mode: &LogMode) -> Result<LogRow, BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 3,
        log_level: String::new(),
        extra_env: mode
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        prefix: None,
        ..Default::default()
    })
    .await?;
    let bucket = stack.create_bucket("logbytes").await?;
    let gw = stack.gateway.add_gateway("gw-logs");
    stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}"));
    let keys: Vec<String> = (0..EVENTS)
        .map(|i| format!("folder-{}/object-{i}.bin", i % FOLDERS))
        .collect();
    for key in &keys {
        stack.clients.put_object(&bucket, key).await?;
    }
    // The bucket's s3:TestEvent comes first; it is an invocation too.
    let events = stack.collect_s3_events(EVENTS + 1).await?;
    let feed = stack.invoke_aggregator(&events).await?;
    if !feed.errors.is_empty() {
        return Err(format!("{}: aggregator errors: {:?}", mode.name, feed.errors).into());
    }
    let windows = feed.total("windowsOpened").max(1) as usize;
    let run = stack.run_refresher(windows, stack.window_wait()).await?;
    if !run.errors.is_empty() {
        return Err(format!("{}: refresher errors: {:?}", mode.name, run.errors).into());
    }
    // Lambda shuts the idle container down; the aggregator writes what it added up.
    stack.aggregator.shutdown_as_lambda().await?;
    let mut row = LogRow {
        mode: mode.name.to_string(),
        how: mode.how.to_string(),
        events: EVENTS,
        aggregator_invocations: feed.invocations,
        refresher_invocations: run.invocations,
        ..Default::default()
    };
    count(&mut row, &stack.aggregator.output_lines(), mode);
    count(&mut row, &stack.refresher.output_lines(), mode);
    if mode.json_application_level.is_none() {
        for (invocations, _) in [
            (row.aggregator_invocations, "aggregator"),
            (row.refresher_invocations, "refresher"),
        ] {
            for i in 0..invocations {
                for line in platform_lines(i == 0) {
                    row.platform_lines += 1;
                    row.platform_bytes += line.len();
                }
            }
        }
    }
    Ok(row)
}

pub async fn measure() -> Result<Vec<LogRow>, BoxError> {
    println!("\n==> Section 4: log bytes per S3 event ({EVENTS} direct events into {FOLDERS} folders of one bucket, then the refresher)");
    let mut rows = Vec::new();
    for mode in modes() {
        let row = measure_mode(&mode).await?;
        println!(
            "    {:<11} {:>6.0} B/event (ours {:.0}, EMF {:.0}, Lambda {:.0}) = ${:.3} per million events",
            row.mode,
            row.per_event(row.total_bytes()),
            row.per_event(row.our_bytes),
            row.per_event(row.emf_bytes),
            row.per_event(row.platform_bytes),
            row.usd_per_million()
        );
        rows.push(row);
    }
    Ok(rows)
}

pub fn render(md: &mut String, command: &str, rows: &[LogRow]) {
    let _ = writeln!(md, "## 4. Log bytes per S3 event\n");
    let _ = writeln!(
        md,
        "{EVENTS} direct S3 events (one invocation each, plus the bucket's `s3:TestEvent`) into {FOLDERS} folders of \
         one bucket with one share, then the refresher on the windows' messages; both release binaries, each \
         process started once (one cold start). Bytes are the log events' messages as Lambda sends them to \
         CloudWatch Logs, summed over both functions and divided by the S3 events. **ours**: the functions' log \
         lines; **EMF**: the metric lines; **Lambda**: START, END and REPORT, three per invocation in text mode, \
         modelled with their real size (the functions do not print them); none in JSON mode, whose system log level \
         is WARN. In JSON mode Lambda drops the lines below the application log level (INFO here; a line without a \
         `level`, such as an EMF line, counts as INFO). The aggregator adds its metrics up in the warm \
         container and writes them at most once per `METRICS_INTERVAL_SECONDS` (60 by default), at once when \
         an alarm watches what changed, and when Lambda shuts the container down, where this measurement ends; \
         this burst takes less than the interval, so its metrics are one function line and one bucket line. \
         A container that takes one event a minute or less still writes both lines for each. Cost: ingestion at \
         ${INGESTION_USD_PER_GB:.2} per GB (2^30 bytes). Reproduce: `{command}`.\n"
    );
    let _ = writeln!(
        md,
        "| mode | set with | invocations (aggregator + refresher) | ours | EMF | Lambda | **total per event** | ingestion per million events |\n|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} + {} | {:.0} B ({} lines) | {:.0} B ({} lines) | {:.0} B ({} lines) | **{:.0} B** | ${:.3} |",
            r.mode,
            r.how,
            r.aggregator_invocations,
            r.refresher_invocations,
            r.per_event(r.our_bytes),
            r.our_lines,
            r.per_event(r.emf_bytes),
            r.emf_lines,
            r.per_event(r.platform_bytes),
            r.platform_lines,
            r.per_event(r.total_bytes()),
            r.usd_per_million()
        );
    }
    let _ = writeln!(md);
}
