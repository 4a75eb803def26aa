//! AWS resources on moto for the tests and the demo: clients, the table, queues,
//! buckets whose notifications go to a queue (real S3 event JSON), and a small
//! SQS event source mapping that turns queue messages into a Lambda SQS event.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use aws_sdk_s3::types::{Event, NotificationConfiguration, QueueConfiguration};
use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const REGION: &str = "us-east-1";
pub const ACCOUNT_ID: &str = "123456789012";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// SDK configuration for moto: fixed test credentials, one region, one endpoint.
pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// An S3 Control client for `endpoint`: an [`crate::s3control::S3ControlForwarder`]'s
/// (see there why moto cannot be called directly).
pub async fn s3control_client(endpoint: &str) -> aws_sdk_s3control::Client {
    aws_sdk_s3control::Client::new(&sdk_config(endpoint).await)
}

/// The environment a Lambda binary needs to reach moto and the stand-in.
pub fn lambda_aws_env(moto_endpoint: &str, gateway_endpoint: &str) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", moto_endpoint),
        ("AWS_ENDPOINT_URL_STORAGE_GATEWAY", gateway_endpoint),
        ("AWS_REGION", REGION),
        ("AWS_DEFAULT_REGION", REGION),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A name no other test in this run uses: moto is shared by every test.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos:x}", std::process::id())
}

/// Clients for the services the tests drive on moto.
#[derive(Clone, Debug)]
pub struct Clients {
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub s3: aws_sdk_s3::Client,
}

impl Clients {
    pub fn new(config: &SdkConfig) -> Self {
        let s3_config = aws_sdk_s3::config::Builder::from(config)
            .force_path_style(true)
            .build();
        Clients {
            dynamodb: aws_sdk_dynamodb::Client::new(config),
            sqs: aws_sdk_sqs::Client::new(config),
            s3: aws_sdk_s3::Client::from_conf(s3_config),
        }
    }

    /// The aggregator's table: hash key `BucketName` (S), on-demand.
    pub async fn create_table(&self, name: &str) -> Result<(), BoxError> {
        self.dynamodb
            .create_table()
            .table_name(name)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("BucketName")
                    .attribute_type(ScalarAttributeType::S)
                    .build()?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("BucketName")
                    .key_type(KeyType::Hash)
                    .build()?,
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await?;
        Ok(())
    }

    pub async fn create_queue(&self, name: &str) -> Result<String, BoxError> {
        let out = self.sqs.create_queue().queue_name(name).send().await?;
        out.queue_url()
            .map(str::to_string)
            .ok_or_else(|| "create_queue returned no URL".into())
    }

    pub async fn queue_arn(&self, url: &str) -> Result<String, BoxError> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await?;
        out.attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .ok_or_else(|| "queue has no QueueArn".into())
    }

    /// A bucket whose object created/removed notifications go to `events_queue_url`.
    pub async fn create_bucket_with_events(
        &self,
        bucket: &str,
        events_queue_url: &str,
    ) -> Result<(), BoxError> {
        self.s3.create_bucket().bucket(bucket).send().await?;
        self.send_events_to(bucket, events_queue_url).await
    }

    /// Sends the object created/removed notifications of an existing bucket to
    /// `events_queue_url` (moto then queues an `s3:TestEvent` there).
    pub async fn send_events_to(
        &self,
        bucket: &str,
        events_queue_url: &str,
    ) -> Result<(), BoxError> {
        let queue_arn = self.queue_arn(events_queue_url).await?;
        let config = NotificationConfiguration::builder()
            .queue_configurations(
                QueueConfiguration::builder()
                    .id("s3-event-aggregator-test")
                    .queue_arn(queue_arn)
                    .events(Event::from("s3:ObjectCreated:*"))
                    .events(Event::from("s3:ObjectRemoved:*"))
                    .build()?,
            )
            .build();
        self.s3
            .put_bucket_notification_configuration()
            .bucket(bucket)
            .notification_configuration(config)
            .send()
            .await?;
        Ok(())
    }

    pub async fn put_object(&self, bucket: &str, key: &str) -> Result<(), BoxError> {
        self.s3
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(aws_sdk_s3::primitives::ByteStream::from_static(b"hello"))
            .send()
            .await?;
        Ok(())
    }

    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), BoxError> {
        self.s3
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await?;
        Ok(())
    }

    /// Every key of `bucket` that starts with `prefix`, all pages of `ListObjectsV2`.
    pub async fn list_keys(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<std::collections::BTreeSet<String>, BoxError> {
        let mut keys = std::collections::BTreeSet::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .s3
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await?;
            keys.extend(
                out.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(str::to_string),
            );
            match out.next_continuation_token() {
                Some(next) if out.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => return Ok(keys),
            }
        }
    }

    /// Receives until `expected` messages arrived or `timeout` passed, deleting them.
    /// Returns the messages in arrival order.
    pub async fn drain(
        &self,
        url: &str,
        expected: usize,
        timeout: Duration,
    ) -> Result<Vec<Message>, BoxError> {
        let deadline = Instant::now() + timeout;
        let mut all = Vec::new();
        while all.len() < expected && Instant::now() < deadline {
            let batch = self.receive(url, 10, 1).await?;
            for m in &batch {
                if let Some(handle) = m.receipt_handle() {
                    self.sqs
                        .delete_message()
                        .queue_url(url)
                        .receipt_handle(handle)
                        .send()
                        .await?;
                }
            }
            all.extend(batch);
        }
        Ok(all)
    }

    /// Receives up to `max` messages (no delete), with all attributes.
    pub async fn receive(
        &self,
        url: &str,
        max: i32,
        wait_seconds: i32,
    ) -> Result<Vec<Message>, BoxError> {
        let out = self
            .sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(max)
            .wait_time_seconds(wait_seconds)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .send()
            .await?;
        Ok(out.messages().to_vec())
    }

    /// Messages currently on the queue, visible or delayed.
    pub async fn queue_depth(&self, url: &str) -> Result<(u64, u64), BoxError> {
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await?;
        let get = |name: QueueAttributeName| -> u64 {
            out.attributes()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok((
            get(QueueAttributeName::ApproximateNumberOfMessages),
            get(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
        ))
    }

    /// What is left to do on a stack whose table is `table` and action queue
    /// `queue_url`: visible messages, windows not refreshed yet, and share items with
    /// pending listings or taken slots. Delayed messages are counted apart: every
    /// `RefreshCache` call leaves its share a wake-up for the call's lease end
    /// (docs/protocol.md, "Per-share scheduling"), up to 900 s ahead, which finds
    /// nothing to do once the completion event came.
    pub async fn work_left(&self, table: &str, queue_url: &str) -> Result<WorkLeft, BoxError> {
        let (visible, delayed) = self.queue_depth(queue_url).await?;
        let mut left = WorkLeft {
            visible,
            delayed,
            ..WorkLeft::default()
        };
        let mut start: Option<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> = None;
        loop {
            let out = self
                .dynamodb
                .scan()
                .table_name(table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await?;
            for item in out.items() {
                let key = item
                    .get("BucketName")
                    .and_then(|v| v.as_s().ok())
                    .cloned()
                    .unwrap_or_default();
                let number = |name: &str| {
                    item.get(name)
                        .and_then(|v| v.as_n().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if let Some(share) = key.strip_prefix("share#") {
                    let pending = item
                        .get("Pending")
                        .and_then(|v| v.as_ss().ok())
                        .map_or(0, Vec::len);
                    let slots = item
                        .get("Slots")
                        .and_then(|v| v.as_l().ok())
                        .map_or(0, Vec::len);
                    if pending > 0 {
                        left.shares_pending.push(share.to_string());
                    }
                    if slots > 0 {
                        left.shares_in_flight.push(share.to_string());
                    }
                } else if number("Generation") > number("RefreshedGeneration") {
                    left.windows_open.push(key);
                }
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        Ok(left)
    }

    pub async fn bucket_item(
        &self,
        table: &str,
        bucket: &str,
    ) -> Result<Option<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>, BoxError> {
        let out = self
            .dynamodb
            .get_item()
            .table_name(table)
            .key(
                "BucketName",
                aws_sdk_dynamodb::types::AttributeValue::S(bucket.to_string()),
            )
            .consistent_read(true)
            .send()
            .await?;
        Ok(out.item().cloned())
    }
}

/// What [`Clients::work_left`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkLeft {
    pub visible: u64,
    pub delayed: u64,
    /// Buckets whose latest window is not refreshed yet.
    pub windows_open: Vec<String>,
    /// Shares with pending listings, and shares with a slot taken.
    pub shares_pending: Vec<String>,
    pub shares_in_flight: Vec<String>,
}

impl WorkLeft {
    /// Nothing visible on the queue, every window refreshed, nothing pending on any
    /// share. Delayed messages and slots in flight may remain: a slot's wake-up, and
    /// refreshes whose completion event is not routed (or not here yet).
    pub fn is_done(&self) -> bool {
        self.visible == 0 && self.windows_open.is_empty() && self.shares_pending.is_empty()
    }
}

/// The S3 event notifications inside messages of an S3-to-SQS queue, in order.
pub fn s3_events_of(messages: &[Message]) -> Vec<Value> {
    messages
        .iter()
        .filter_map(|m| m.body())
        .filter_map(|b| serde_json::from_str(b).ok())
        .collect()
}

/// A Lambda SQS event for `messages`, as the event source mapping builds it.
pub fn lambda_sqs_event(messages: &[Message], queue_arn: &str) -> Value {
    let records: Vec<Value> = messages
        .iter()
        .map(|m| {
            let attributes: serde_json::Map<String, Value> = m
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.as_str().to_string(), json!(v)))
                        .collect()
                })
                .unwrap_or_default();
            let message_attributes: serde_json::Map<String, Value> = m
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                json!({
                                    "stringValue": v.string_value(),
                                    "stringListValues": [],
                                    "binaryListValues": [],
                                    "dataType": v.data_type(),
                                }),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "messageId": m.message_id(),
                "receiptHandle": m.receipt_handle(),
                "body": m.body(),
                "attributes": attributes,
                "messageAttributes": message_attributes,
                "md5OfBody": m.md5_of_body(),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": REGION,
            })
        })
        .collect();
    json!({ "Records": records })
}
