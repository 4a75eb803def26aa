//! The whole product on this machine: moto (DynamoDB, SQS, S3), the Storage Gateway
//! stand-in, and the compiled `aggregator` and `refresher` binaries under the Lambda
//! Runtime API harness. S3 notifications go to an events queue, so the events the
//! aggregator sees are moto's real event JSON; a small event source mapping feeds the
//! action queue's messages to the refresher, as Lambda's SQS poller does.

use crate::aws::{
    lambda_aws_env, lambda_sqs_event, s3_events_of, sdk_config, unique_name, BoxError, Clients,
    ACCOUNT_ID, REGION,
};
use crate::moto::Moto;
use crate::runtime_api::{Invocation, LambdaProcess, LambdaSpawn};
use crate::s3control::S3ControlForwarder;
use crate::sgw_standin::{
    eventbridge_call, CompletionEvents, SgwStandIn, REFRESH_EVENT_DETAIL_TYPE, REFRESH_EVENT_SOURCE,
};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the compiled Lambda binaries are: `S3EA_BIN_DIR`, or the workspace's
/// `target/debug` (the test script builds them first).
pub fn binary(name: &str) -> Result<PathBuf, BoxError> {
    let dir = match std::env::var_os("S3EA_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"),
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not found: build the Lambda binaries first (cargo build --bins), or set S3EA_BIN_DIR",
            path.display()
        )
        .into())
    }
}

#[derive(Debug, Clone)]
pub struct StackOptions {
    pub refresh_delay_seconds: u32,
    /// `LOG_LEVEL` of both functions; empty: not set.
    pub log_level: String,
    /// Extra environment for both functions.
    pub extra_env: Vec<(String, String)>,
    /// Name the table and queues as the deployment scripts do for this prefix
    /// (`PREFIX`, `PREFIXActionQueue`, `PREFIXActionDLQ`, `PREFIXAggregatorDLQ`), so
    /// the scripts can be run against this stack. Unique names when `None`.
    pub prefix: Option<String>,
    /// The gateway's refresh-complete events: an EventBridge rule in moto
    /// (`PREFIXRefreshCompleted`, or a unique name) sends `aws.storagegateway` "Storage
    /// Gateway Refresh Cache Event"s to the action queue, and the stand-in puts one on
    /// the bus per completed refresh. The event source mapping then feeds them to the
    /// refresher with the refresh messages (their bodies are EventBridge events; they
    /// have no message attributes). The rule and the stand-in use an event bus of the
    /// stack's own (named like the rule), not the default bus, because tests share
    /// one moto server: a rule on the default bus would also take the events of the
    /// other tests' stand-ins. Gateways in other regions than [`REGION`] put their
    /// events on that region's bus, where the stack has no rule. On by default: the
    /// refresher frees a share's refresh slots only on these events.
    pub completion_events: bool,
    /// The refresher's `MIN_REFRESH_INTERVAL_SECONDS`. 0 by default, so that tests
    /// that are not about pacing see each window's call at once (still at most two in
    /// flight per share); `extra_env` can name it too.
    pub min_refresh_interval_seconds: u32,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            refresh_delay_seconds: 2,
            log_level: "INFO".to_string(),
            extra_env: Vec::new(),
            prefix: None,
            completion_events: true,
            min_refresh_interval_seconds: 0,
        }
    }
}

pub struct Stack {
    pub moto: Moto,
    pub gateway: SgwStandIn,
    /// moto's S3 Control as the SDK can reach it (`AWS_ENDPOINT_URL_S3_CONTROL` of
    /// both functions, unless `options.extra_env` names another).
    pub s3control: S3ControlForwarder,
    pub clients: Clients,
    pub table: String,
    pub action_queue_url: String,
    pub action_queue_arn: String,
    /// S3 notifications of the stack's buckets land here.
    pub events_queue_url: String,
    /// The EventBridge rule for the refresh-complete events, on the event bus of the
    /// same name in [`REGION`], when `options.completion_events`.
    pub completion_rule: Option<String>,
    pub aggregator: LambdaProcess,
    pub refresher: LambdaProcess,
    pub options: StackOptions,
}

/// What feeding events to the aggregator did.
#[derive(Debug, Default, Clone)]
pub struct FeedReport {
    pub invocations: usize,
    pub errors: Vec<String>,
    /// The aggregator's per-invocation reports.
    pub responses: Vec<Value>,
}

impl FeedReport {
    /// Sum of one numeric field of the aggregator's reports.
    pub fn total(&self, field: &str) -> u64 {
        self.responses
            .iter()
            .filter_map(|r| r.get(field))
            .filter_map(Value::as_u64)
            .sum()
    }
}

/// What a message on the action queue is, by its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionMessageKind {
    Refresh,
    WakeUp,
    CompletionEvent,
}

pub fn action_message_kind(body: &str) -> ActionMessageKind {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if parsed.get("kind").and_then(Value::as_str) == Some("wake") {
        ActionMessageKind::WakeUp
    } else if parsed.get("source").and_then(Value::as_str) == Some("aws.storagegateway") {
        ActionMessageKind::CompletionEvent
    } else {
        ActionMessageKind::Refresh
    }
}

/// What the event source mapping did with the action queue.
#[derive(Debug, Default, Clone)]
pub struct RefreshRun {
    /// Refresh messages (windows, and 2018-style messages) handled.
    pub messages: usize,
    /// The scheduler's wake-ups and the gateway's refresh-complete events handled;
    /// they do not count towards `expected`.
    pub wake_ups: usize,
    pub completion_events: usize,
    pub invocations: usize,
    pub batch_item_failures: usize,
    pub errors: Vec<String>,
}

impl Stack {
    pub async fn start(options: StackOptions) -> Result<Stack, BoxError> {
        Stack::start_with_moto(Moto::start().await?, options).await
    }

    /// [`Stack::start`] on a moto server the caller started, so that something that
    /// needs moto's endpoint (a [`crate::counting_proxy::CountingProxy`] named in
    /// `options.extra_env`) can be set up before the functions start.
    pub async fn start_with_moto(moto: Moto, options: StackOptions) -> Result<Stack, BoxError> {
        let gateway = SgwStandIn::start().await?;
        let s3control = S3ControlForwarder::start(moto.endpoint()).await?;
        let clients = Clients::new(&sdk_config(moto.endpoint()).await);
        let (table, action_queue) = match &options.prefix {
            Some(prefix) => {
                for dlq in ["ActionDLQ", "AggregatorDLQ"] {
                    clients.create_queue(&format!("{prefix}{dlq}")).await?;
                }
                (prefix.clone(), format!("{prefix}ActionQueue"))
            }
            None => (
                unique_name("S3EventAggregator"),
                unique_name("S3EventAggregatorActionQueue"),
            ),
        };
        clients.create_table(&table).await?;
        let action_queue_url = clients.create_queue(&action_queue).await?;
        let action_queue_arn = clients.queue_arn(&action_queue_url).await?;
        let events_queue_url = clients.create_queue(&unique_name("s3-events")).await?;
        let completion_rule = if options.completion_events {
            let rule = match &options.prefix {
                Some(prefix) => format!("{prefix}RefreshCompleted"),
                None => unique_name("RefreshCompleted"),
            };
            route_completion_events(moto.endpoint(), &rule, &action_queue_arn).await?;
            gateway
                .set_completion_events(Some(CompletionEvents::to(moto.endpoint()).on_bus(&rule)));
            Some(rule)
        } else {
            None
        };

        let mut env = lambda_aws_env(moto.endpoint(), &gateway.endpoint());
        env.push(("AWS_ENDPOINT_URL_S3_CONTROL".into(), s3control.endpoint()));
        env.push(("TABLE_NAME".into(), table.clone()));
        if !options.log_level.is_empty() {
            env.push(("LOG_LEVEL".into(), options.log_level.clone()));
        }
        env.extend(options.extra_env.iter().cloned());
        let aggregator_bin = binary("aggregator")?;
        let mut spec = LambdaSpawn::new(&aggregator_bin, "S3EventAggregator");
        // The tests read each invocation's metric lines; `extra_env` can ask for the
        // container's buffer (the deployed default, 60 s).
        spec.env = vec![("METRICS_INTERVAL_SECONDS".into(), "0".into())];
        spec.env.extend(env.iter().cloned());
        spec.env
            .push(("QUEUE_URL".into(), action_queue_url.clone()));
        spec.env.push((
            "REFRESH_DELAY_SECONDS".into(),
            options.refresh_delay_seconds.to_string(),
        ));
        let aggregator = LambdaProcess::spawn(spec).await?;
        let refresher_bin = binary("refresher")?;
        let mut spec = LambdaSpawn::new(&refresher_bin, "S3StorageGatewayRefresh");
        spec.env = vec![
            (
                "MIN_REFRESH_INTERVAL_SECONDS".into(),
                options.min_refresh_interval_seconds.to_string(),
            ),
            // The tests shorten the interval, which the function takes only with the
            // acknowledgement.
            ("ALLOW_SHORT_REFRESH_INTERVAL".into(), "true".into()),
        ];
        spec.env.extend(env);
        let refresher = LambdaProcess::spawn(spec).await?;
        Ok(Stack {
            moto,
            gateway,
            s3control,
            clients,
            table,
            action_queue_url,
            action_queue_arn,
            events_queue_url,
            completion_rule,
            aggregator,
            refresher,
            options,
        })
    }

    /// A new bucket whose notifications go to the stack's events queue.
    pub async fn create_bucket(&self, prefix: &str) -> Result<String, BoxError> {
        let name = bucket_name(prefix);
        self.clients
            .create_bucket_with_events(&name, &self.events_queue_url)
            .await?;
        Ok(name)
    }

    /// A new bucket that holds `keys` before its notifications go to the stack's events
    /// queue, so that these objects make no events (the set-up's `s3:TestEvent` still
    /// arrives).
    pub async fn create_bucket_with_objects(
        &self,
        prefix: &str,
        keys: &[String],
    ) -> Result<String, BoxError> {
        let name = bucket_name(prefix);
        self.clients.s3.create_bucket().bucket(&name).send().await?;
        for key in keys {
            self.clients.put_object(&name, key).await?;
        }
        self.clients
            .send_events_to(&name, &self.events_queue_url)
            .await?;
        Ok(name)
    }

    /// The ARN of the events queue, for a Lambda SQS event built from its messages.
    pub async fn events_queue_arn(&self) -> Result<String, BoxError> {
        self.clients.queue_arn(&self.events_queue_url).await
    }

    /// Reads the S3 notifications moto queued (at least `expected`), without
    /// invoking anything.
    pub async fn collect_s3_events(&self, expected: usize) -> Result<Vec<Value>, BoxError> {
        let timeout = Duration::from_secs(10 + expected as u64 / 20);
        let messages = self
            .clients
            .drain(&self.events_queue_url, expected, timeout)
            .await?;
        let events = s3_events_of(&messages);
        if events.len() < expected {
            return Err(
                format!("expected {expected} S3 notifications, got {}", events.len()).into(),
            );
        }
        Ok(events)
    }

    /// Invokes the aggregator once per notification, in order, as S3 does.
    pub async fn invoke_aggregator(&self, events: &[Value]) -> Result<FeedReport, BoxError> {
        let mut report = FeedReport::default();
        for event in events {
            report.invocations += 1;
            match self.aggregator.invoke(event.clone()).await? {
                Invocation::Response(value) => report.responses.push(value),
                Invocation::Error {
                    error_type,
                    error_message,
                } => report.errors.push(format!("{error_type}: {error_message}")),
            }
        }
        Ok(report)
    }

    /// Collects `expected` S3 notifications and feeds them to the aggregator.
    pub async fn feed_s3_events(&self, expected: usize) -> Result<FeedReport, BoxError> {
        let events = self.collect_s3_events(expected).await?;
        self.invoke_aggregator(&events).await
    }

    /// The event source mapping: polls the action queue (messages appear once their
    /// delay has passed) until `expected` refresh messages (not counting wake-ups and
    /// completion events, which it handles too) were handled or `timeout` passed,
    /// invokes the refresher with batches of up to 10, and deletes every message not
    /// reported in `batchItemFailures`. Failed messages stay and come back after
    /// their visibility timeout.
    pub async fn run_refresher(
        &self,
        expected: usize,
        timeout: Duration,
    ) -> Result<RefreshRun, BoxError> {
        let deadline = Instant::now() + timeout;
        let mut run = RefreshRun::default();
        while run.messages < expected && Instant::now() < deadline {
            let messages = self.clients.receive(&self.action_queue_url, 10, 1).await?;
            if messages.is_empty() {
                continue;
            }
            for m in &messages {
                match action_message_kind(m.body().unwrap_or_default()) {
                    ActionMessageKind::WakeUp => run.wake_ups += 1,
                    ActionMessageKind::CompletionEvent => run.completion_events += 1,
                    ActionMessageKind::Refresh => run.messages += 1,
                }
            }
            run.invocations += 1;
            let event = lambda_sqs_event(&messages, &self.action_queue_arn);
            let failed: Vec<String> = match self.refresher.invoke(event).await? {
                Invocation::Response(value) => value
                    .get("batchItemFailures")
                    .and_then(Value::as_array)
                    .map(|f| {
                        f.iter()
                            .filter_map(|i| {
                                i.get("itemIdentifier")
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                Invocation::Error {
                    error_type,
                    error_message,
                } => {
                    run.errors.push(format!("{error_type}: {error_message}"));
                    messages
                        .iter()
                        .filter_map(|m| m.message_id().map(str::to_string))
                        .collect()
                }
            };
            run.batch_item_failures += failed.len();
            for m in &messages {
                if m.message_id()
                    .is_some_and(|id| failed.iter().any(|f| f == id))
                {
                    continue;
                }
                if let Some(handle) = m.receipt_handle() {
                    self.clients
                        .sqs
                        .delete_message()
                        .queue_url(&self.action_queue_url)
                        .receipt_handle(handle)
                        .send()
                        .await?;
                }
            }
        }
        Ok(run)
    }

    /// What is left to do ([`crate::aws::Clients::work_left`]).
    pub async fn work_left(&self) -> Result<crate::aws::WorkLeft, BoxError> {
        self.clients
            .work_left(&self.table, &self.action_queue_url)
            .await
    }

    /// Lets every refresh that the gateway accepted complete, and hands their
    /// completion events (and any wake-ups that are due) to the refresher, until the
    /// action queue is empty or `timeout` passed. After this, no slot is taken.
    pub async fn settle(&self, timeout: Duration) -> Result<RefreshRun, BoxError> {
        let deadline = Instant::now() + timeout;
        let mut total = RefreshRun::default();
        loop {
            let accepted = self.gateway.refreshes().len();
            let events = self.gateway.completion_events();
            let all_completed = events.len() >= accepted && events.iter().all(|e| e.is_settled());
            let left = self.work_left().await?;
            // Delayed messages may remain: each call's lease wake-up, which finds
            // nothing to do once its completion event freed the slot.
            if all_completed && left.is_done() && left.shares_in_flight.is_empty() {
                return Ok(total);
            }
            let depth = (left.visible, left.delayed);
            if Instant::now() >= deadline {
                return Err(format!(
                    "not settled after {timeout:?}: {accepted} refreshes accepted, {} completed, action queue {depth:?}",
                    events.len()
                )
                .into());
            }
            let run = self
                .run_refresher(usize::MAX, Duration::from_millis(500))
                .await?;
            total.messages += run.messages;
            total.wake_ups += run.wake_ups;
            total.completion_events += run.completion_events;
            total.invocations += run.invocations;
            total.batch_item_failures += run.batch_item_failures;
            total.errors.extend(run.errors);
        }
    }

    /// How long to wait for a window's message: the delay plus moto's and our slack.
    pub fn window_wait(&self) -> Duration {
        Duration::from_secs(u64::from(self.options.refresh_delay_seconds) + 10)
    }
}

/// Creates the event bus `rule` in moto, in [`REGION`], and on it the rule `rule` that
/// sends the gateway's refresh-complete events to `queue_arn`.
pub async fn route_completion_events(
    moto_endpoint: &str,
    rule: &str,
    queue_arn: &str,
) -> Result<(), BoxError> {
    let pattern = serde_json::json!({
        "source": [REFRESH_EVENT_SOURCE],
        "detail-type": [REFRESH_EVENT_DETAIL_TYPE],
    });
    let call = |operation: &'static str, input: Value| async move {
        eventbridge_call(moto_endpoint, REGION, ACCOUNT_ID, operation, &input).await
    };
    call("CreateEventBus", serde_json::json!({ "Name": rule })).await?;
    call(
        "PutRule",
        serde_json::json!({
            "Name": rule,
            "EventBusName": rule,
            "EventPattern": pattern.to_string(),
            "State": "ENABLED",
        }),
    )
    .await?;
    let out = call(
        "PutTargets",
        serde_json::json!({
            "Rule": rule,
            "EventBusName": rule,
            "Targets": [{"Id": "ActionQueue", "Arn": queue_arn}],
        }),
    )
    .await?;
    match out.get("FailedEntryCount").and_then(Value::as_u64) {
        Some(0) | None => Ok(()),
        Some(_) => Err(format!("PutTargets on {rule} failed: {out}").into()),
    }
}

/// A unique bucket name: lowercase, at most 63 characters.
fn bucket_name(prefix: &str) -> String {
    let mut name = unique_name(prefix).to_ascii_lowercase();
    name.truncate(63);
    name.trim_end_matches('-').to_string()
}
