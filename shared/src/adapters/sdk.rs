//! Adapters over the AWS SDK: DynamoDB for windows, SQS for refresh messages, and
//! (feature `storagegateway`, in [`super::sdk_gateway`]) Storage Gateway for shares
//! and refreshes.

use crate::error::{QueueError, Retry, StoreError};
use crate::ports::{RefreshQueue, Requeue, WindowStore};
use crate::refresh_message::{RefreshMessage, WakeMessage, ATTR_BUCKET, ATTR_TIMESTAMP};
use crate::window::{
    self, CarriedWindow, ChangeSet, CloseOutcome, GatewayChange, OpenExpectation, RefreshLog,
    StartedRefresh, WindowItem,
};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use std::collections::HashMap;
use std::fmt::Debug;

/// Error codes that mean "try again later", across the three services.
const RETRYABLE_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "TransactionConflictException",
    "InternalServerError",
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestThrottled",
    "KMS.ThrottlingException",
];

/// Classifies any SDK failure: transport problems, timeouts, throttling and 5xx are
/// worth retrying; everything else (access, validation, missing resources) is not.
pub fn classify<E: ProvideErrorMetadata, R: Debug>(err: &SdkError<E, R>) -> Retry {
    match err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or_default();
            if RETRYABLE_CODES.contains(&code) || code.contains("Throttl") {
                Retry::Later
            } else {
                Retry::Never
            }
        }
        SdkError::ConstructionFailure(_) => Retry::Never,
        // Timeouts, dispatch (connection) failures and unreadable responses.
        _ => Retry::Later,
    }
}

pub(crate) fn describe<E: std::error::Error + 'static>(err: &E) -> String {
    DisplayErrorContext(err).to_string()
}

pub(crate) fn store_error<E, R>(err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: Debug + 'static,
{
    StoreError {
        retry: classify(&err),
        message: describe(&err),
    }
}

#[cfg(feature = "storagegateway")]
pub use super::sdk_gateway::SdkFileGateway;
#[cfg(feature = "storagegateway")]
pub use super::sdk_s3control::SdkAccessPoints;

/// Attribute names of the bucket item. `BucketName` is the hash key (docs/spec.md).
pub mod attr {
    pub const BUCKET: &str = "BucketName";
    pub const GENERATION: &str = "Generation";
    pub const OPENED_AT: &str = "OpenedAt";
    pub const ENDS_AT: &str = "WindowEndsAt";
    pub const SENT: &str = "SentGeneration";
    pub const CLOSED: &str = "ClosedGeneration";
    pub const CLOSED_AT: &str = "ClosedAt";
    pub const REFRESHED: &str = "RefreshedGeneration";
    pub const REFRESHED_AT: &str = "LastRefreshAt";
    pub const FOLDERS: &str = "Folders";
    pub const WHOLE_BUCKET: &str = "WholeBucket";
    pub const LAST_EVENT_AT: &str = "LastEventAt";
    /// The carried window (`window::CarriedWindow`): its generation, its entries in the
    /// form of `Folders`, and its whole-bucket flag.
    pub const CARRIED_GENERATION: &str = "CarriedGeneration";
    pub const CARRIED_FOLDERS: &str = "CarriedFolders";
    pub const CARRIED_WHOLE: &str = "CarriedWhole";
    /// A map: `Generation`, `StartedAt`, `Refreshes` (a list of maps with `ShareARN`,
    /// `NotificationId`, `FolderList`, `Recursive`).
    pub const LAST_REFRESH: &str = "LastRefresh";
}

// The conditions of `crate::window`, as DynamoDB expressions. `:stale_before` is
// `now - STALE_WINDOW_GRACE_MS`: a window that ended before it takes no more joins.
const COND_JOINABLE: &str = "Generation = :g \
     AND (attribute_not_exists(ClosedGeneration) OR ClosedGeneration < :g) \
     AND WindowEndsAt > :stale_before";
const COND_ROOM: &str = "(attribute_not_exists(Folders) OR size(Folders) <= :room)";
const COND_FIRST_WINDOW: &str = "attribute_not_exists(Generation)";
const COND_NEXT_WINDOW: &str =
    "Generation = :g AND (ClosedGeneration >= :g OR WindowEndsAt <= :stale_before)";
const COND_REFRESHED: &str = "RefreshedGeneration >= :g";
/// The carried window's entries fit the joiner's `:room`: a carried window is only
/// ever dropped, so a joiner that saw it (or saw none) never over-counts the room.
const COND_UNCHANGED_OWN_EMPTY: &str =
    "attribute_not_exists(Folders) AND (attribute_not_exists(WholeBucket) OR WholeBucket = :false)";
const COND_UNCHANGED_OWN: &str =
    "size(Folders) = :seen_entries AND (attribute_not_exists(WholeBucket) OR WholeBucket = :false)";
const COND_MARKABLE: &str = "(ClosedGeneration >= :g OR Generation > :g) \
     AND (attribute_not_exists(RefreshedGeneration) OR RefreshedGeneration < :g)";
const COND_CARRIED_COVERED: &str =
    "(attribute_not_exists(CarriedGeneration) OR CarriedGeneration <= :g)";
const COND_CLOSABLE: &str = "Generation = :g \
     AND (attribute_not_exists(RefreshedGeneration) OR RefreshedGeneration < :g) \
     AND WindowEndsAt <= :now";
/// How many times a close is attempted when the item changes between the failed
/// conditional write and the read that explains it.
const CLOSE_ROUNDS: usize = 3;
/// The refresh log on the item is for operators; these bounds keep it (with at most
/// [`window::MAX_WINDOW_FOLDERS`] folders) under DynamoDB's 400 KB item limit.
const LOGGED_SHARES: usize = 100;
const LOGGED_FOLDERS: usize = 64;
/// And at most this many bytes of folder names (S3 keys reach 1,024 bytes).
const LOGGED_FOLDER_BYTES: usize = 8 * 1024;

/// Folders are stored with a leading '/', so the bucket root is "/" rather than an
/// empty string (which a string set cannot hold). A gateway's changes share the set,
/// as `sgw-12a3456b:/folder/` ([`GatewayChange::encode`]), so that one `size()` bounds
/// both and one `ADD` records both.
fn encode_folders(changes: &ChangeSet) -> Option<AttributeValue> {
    let stored: Vec<String> = changes
        .folders
        .iter()
        .map(|f| format!("/{f}"))
        .chain(changes.gateway_writes.iter().map(GatewayChange::encode))
        .collect();
    (!stored.is_empty()).then_some(AttributeValue::Ss(stored))
}

/// The inverse of [`encode_folders`]. An entry that is neither form (written by
/// something else) cannot be placed: the window then refreshes the whole bucket.
fn decode_folders(stored: &[String], whole_bucket: bool) -> ChangeSet {
    let mut changes = ChangeSet {
        whole_bucket,
        ..Default::default()
    };
    for entry in stored {
        if let Some(folder) = entry.strip_prefix('/') {
            changes.folders.insert(folder.to_string());
        } else if let Some(change) = GatewayChange::decode(entry) {
            changes.gateway_writes.insert(change);
        } else {
            changes.whole_bucket = true;
        }
    }
    if changes.whole_bucket {
        changes.set_whole_bucket();
    }
    changes
}

pub(crate) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn decode_item(bucket: &str, item: &HashMap<String, AttributeValue>) -> WindowItem {
    let num = |name: &str| -> i64 {
        item.get(name)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let gen = |name: &str| -> u64 { u64::try_from(num(name)).unwrap_or(0) };
    let flag = |name: &str| {
        item.get(name)
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false)
    };
    let whole_bucket = flag(attr::WHOLE_BUCKET);
    let set = |name: &str| {
        item.get(name)
            .and_then(|v| v.as_ss().ok())
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    let stored = set(attr::FOLDERS);
    let carried = item
        .contains_key(attr::CARRIED_GENERATION)
        .then(|| CarriedWindow {
            generation: gen(attr::CARRIED_GENERATION),
            changes: decode_folders(set(attr::CARRIED_FOLDERS), flag(attr::CARRIED_WHOLE)),
        });
    WindowItem {
        bucket: bucket.to_string(),
        generation: gen(attr::GENERATION),
        opened_at_ms: num(attr::OPENED_AT),
        ends_at_ms: num(attr::ENDS_AT),
        sent_generation: gen(attr::SENT),
        closed_generation: gen(attr::CLOSED),
        refreshed_generation: gen(attr::REFRESHED),
        changes: decode_folders(stored, whole_bucket),
        carried,
        last_event_at_ms: num(attr::LAST_EVENT_AT),
        last_refresh: item
            .get(attr::LAST_REFRESH)
            .and_then(|v| v.as_m().ok())
            .map(decode_refresh_log),
    }
}

fn encode_refresh_log(log: &RefreshLog) -> AttributeValue {
    let mut folder_budget = LOGGED_FOLDERS;
    let mut byte_budget = LOGGED_FOLDER_BYTES;
    let mut cut = false;
    let refreshes = log
        .refreshes
        .iter()
        .take(LOGGED_SHARES)
        .map(|r| {
            let mut logged = 0;
            for folder in r.folders.iter().take(folder_budget) {
                if folder.len() > byte_budget {
                    break;
                }
                byte_budget -= folder.len();
                logged += 1;
            }
            cut |= logged < r.folders.len();
            folder_budget -= logged;
            AttributeValue::M(HashMap::from([
                (
                    "ShareARN".to_string(),
                    AttributeValue::S(r.share_arn.clone()),
                ),
                (
                    "NotificationId".to_string(),
                    AttributeValue::S(r.notification_id.clone()),
                ),
                (
                    "FolderList".to_string(),
                    AttributeValue::L(
                        r.folders
                            .iter()
                            .take(logged)
                            .map(|f| AttributeValue::S(f.clone()))
                            .collect(),
                    ),
                ),
                ("Recursive".to_string(), AttributeValue::Bool(r.recursive)),
            ]))
        })
        .collect();
    let mut map = HashMap::from([
        ("StartedAt".to_string(), n(log.started_at_ms)),
        ("Refreshes".to_string(), AttributeValue::L(refreshes)),
    ]);
    if let Some(g) = log.generation {
        map.insert("Generation".to_string(), n(g));
    }
    let truncated = log.refreshes.len() > LOGGED_SHARES || cut;
    if truncated {
        map.insert("Truncated".to_string(), AttributeValue::Bool(true));
    }
    AttributeValue::M(map)
}

fn decode_refresh_log(map: &HashMap<String, AttributeValue>) -> RefreshLog {
    let text = |m: &HashMap<String, AttributeValue>, k: &str| {
        m.get(k)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default()
    };
    let number = |k: &str| {
        map.get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<i64>().ok())
    };
    RefreshLog {
        generation: number("Generation").and_then(|g| u64::try_from(g).ok()),
        started_at_ms: number("StartedAt").unwrap_or(0),
        refreshes: map
            .get("Refreshes")
            .and_then(|v| v.as_l().ok())
            .map(|list| {
                list.iter()
                    .filter_map(|r| r.as_m().ok())
                    .map(|r| StartedRefresh {
                        share_arn: text(r, "ShareARN"),
                        notification_id: text(r, "NotificationId"),
                        folders: r
                            .get("FolderList")
                            .and_then(|v| v.as_l().ok())
                            .map(|l| l.iter().filter_map(|f| f.as_s().ok().cloned()).collect())
                            .unwrap_or_default(),
                        recursive: r
                            .get("Recursive")
                            .and_then(|v| v.as_bool().ok())
                            .copied()
                            .unwrap_or(true),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Window items in a DynamoDB table keyed by `BucketName`.
#[derive(Debug, Clone)]
pub struct DynamoWindowStore {
    pub(crate) client: aws_sdk_dynamodb::Client,
    pub(crate) table: String,
}

impl DynamoWindowStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: impl Into<String>) -> Self {
        DynamoWindowStore {
            client,
            table: table.into(),
        }
    }

    fn update(
        &self,
        bucket: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key(attr::BUCKET, AttributeValue::S(bucket.to_string()))
    }

    /// Sends a conditional update; `Ok(None)` when the condition failed.
    async fn conditional(
        &self,
        bucket: &str,
        request: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder,
    ) -> Result<Option<WindowItem>, StoreError> {
        match request.return_values(ReturnValue::AllNew).send().await {
            Ok(out) => Ok(Some(decode_item(
                bucket,
                out.attributes().unwrap_or(&HashMap::new()),
            ))),
            Err(SdkError::ServiceError(ctx))
                if ctx.err().is_conditional_check_failed_exception() =>
            {
                Ok(None)
            }
            Err(err) => Err(store_error(err)),
        }
    }

    async fn read(&self, bucket: &str) -> Result<Option<WindowItem>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(attr::BUCKET, AttributeValue::S(bucket.to_string()))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_error)?;
        Ok(out.item().map(|item| decode_item(bucket, item)))
    }
}

impl WindowStore for DynamoWindowStore {
    async fn read(&self, bucket: &str) -> Result<Option<WindowItem>, StoreError> {
        DynamoWindowStore::read(self, bucket).await
    }

    async fn join(
        &self,
        bucket: &str,
        seen: &WindowItem,
        changes: &ChangeSet,
        now_ms: i64,
    ) -> Result<Option<WindowItem>, StoreError> {
        let generation = seen.generation;
        let mut condition = COND_JOINABLE.to_string();
        let mut request = self
            .update(bucket)
            .expression_attribute_values(":g", n(generation))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(
                ":stale_before",
                n(now_ms.saturating_sub(window::STALE_WINDOW_GRACE_MS)),
            );
        let mut expression = format!("SET {} = :now", attr::LAST_EVENT_AT);
        if changes.whole_bucket {
            expression.push_str(&format!(", {} = :true", attr::WHOLE_BUCKET));
            request = request.expression_attribute_values(":true", AttributeValue::Bool(true));
        }
        if let Some(folders) = encode_folders(changes) {
            expression.push_str(&format!(" ADD {} :folders", attr::FOLDERS));
            request = request.expression_attribute_values(":folders", folders);
            if changes.needs_room() {
                condition = format!("{condition} AND {COND_ROOM}");
                let room = window::MAX_WINDOW_FOLDERS
                    .saturating_sub(changes.entries() + seen.carried_entries());
                request = request.expression_attribute_values(":room", n(room));
            }
        }
        self.conditional(
            bucket,
            request
                .condition_expression(condition)
                .update_expression(expression),
        )
        .await
    }

    async fn open(
        &self,
        bucket: &str,
        expected: OpenExpectation,
        changes: &ChangeSet,
        now_ms: i64,
        window_ms: i64,
    ) -> Result<Option<WindowItem>, StoreError> {
        let mut set = vec![
            format!("{} = :next", attr::GENERATION),
            format!("{} = :next", attr::SENT),
            format!("{} = :now", attr::OPENED_AT),
            format!("{} = :ends", attr::ENDS_AT),
            format!("{} = :now", attr::LAST_EVENT_AT),
        ];
        let mut request = self
            .update(bucket)
            .expression_attribute_values(":next", n(expected.next_generation()))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":ends", n(now_ms.saturating_add(window_ms)));
        let mut condition = if expected.generation == 0 {
            COND_FIRST_WINDOW.to_string()
        } else {
            request = request
                .expression_attribute_values(":g", n(expected.generation))
                .expression_attribute_values(
                    ":stale_before",
                    n(now_ms.saturating_sub(window::STALE_WINDOW_GRACE_MS)),
                );
            COND_NEXT_WINDOW.to_string()
        };
        let mut remove = Vec::new();
        match &expected.carry {
            Some(carried) => {
                // The current window (with what it carries) is kept beside the new one,
                // as the opener read it: nothing may have joined it since (a joiner
                // whose clock lags could still join a stale window).
                // A whole-bucket window covers whatever joined it.
                if !expected.seen_whole {
                    let pin = if expected.seen_entries == 0 {
                        COND_UNCHANGED_OWN_EMPTY
                    } else {
                        request = request
                            .expression_attribute_values(":seen_entries", n(expected.seen_entries));
                        COND_UNCHANGED_OWN
                    };
                    condition = format!("{condition} AND {pin}");
                    request =
                        request.expression_attribute_values(":false", AttributeValue::Bool(false));
                }
                set.push(format!("{} = :carried_g", attr::CARRIED_GENERATION));
                set.push(format!("{} = :carried_whole", attr::CARRIED_WHOLE));
                request = request
                    .expression_attribute_values(":carried_g", n(carried.generation))
                    .expression_attribute_values(
                        ":carried_whole",
                        AttributeValue::Bool(carried.changes.whole_bucket),
                    );
                match encode_folders(&carried.changes) {
                    Some(folders) => {
                        set.push(format!("{} = :carried", attr::CARRIED_FOLDERS));
                        request = request.expression_attribute_values(":carried", folders);
                    }
                    None => remove.push(attr::CARRIED_FOLDERS),
                }
            }
            None => {
                if expected.generation > 0 {
                    condition = format!("{condition} AND {COND_REFRESHED}");
                }
                remove.extend([
                    attr::CARRIED_GENERATION,
                    attr::CARRIED_FOLDERS,
                    attr::CARRIED_WHOLE,
                ]);
            }
        }
        set.push(format!("{} = :whole", attr::WHOLE_BUCKET));
        request = request
            .expression_attribute_values(":whole", AttributeValue::Bool(changes.whole_bucket));
        match encode_folders(changes) {
            Some(folders) => {
                set.push(format!("{} = :folders", attr::FOLDERS));
                request = request.expression_attribute_values(":folders", folders);
            }
            None => remove.push(attr::FOLDERS),
        }
        let tail = if remove.is_empty() {
            String::new()
        } else {
            format!(" REMOVE {}", remove.join(", "))
        };
        let expression = format!("SET {}{tail}", set.join(", "));
        self.conditional(
            bucket,
            request
                .condition_expression(condition)
                .update_expression(expression),
        )
        .await
    }

    async fn close(
        &self,
        bucket: &str,
        generation: u64,
        now_ms: i64,
    ) -> Result<CloseOutcome, StoreError> {
        for _ in 0..CLOSE_ROUNDS {
            let request = self
                .update(bucket)
                .update_expression(format!(
                    "SET {} = :g, {} = :now",
                    attr::CLOSED,
                    attr::CLOSED_AT
                ))
                .condition_expression(COND_CLOSABLE)
                .expression_attribute_values(":g", n(generation))
                .expression_attribute_values(":now", n(now_ms));
            if let Some(item) = self.conditional(bucket, request).await? {
                return Ok(CloseOutcome::Refresh(item.changes_to_refresh()));
            }
            // The rule explains the failed condition from the item. If the item
            // changed in between so that it now says "refresh", close for real first.
            let mut item = self.read(bucket).await?;
            match window::close(&mut item, generation, now_ms) {
                CloseOutcome::Refresh(_) => continue,
                other => return Ok(other),
            }
        }
        Err(StoreError {
            retry: Retry::Later,
            message: format!("bucket {bucket}: window {generation} kept changing while closing it"),
        })
    }

    async fn record_refresh(&self, bucket: &str, log: &RefreshLog) -> Result<(), StoreError> {
        let request = self
            .update(bucket)
            .expression_attribute_values(":log", encode_refresh_log(log))
            .expression_attribute_values(":now", n(log.started_at_ms));
        let Some(generation) = log.generation else {
            let request = request.update_expression(format!(
                "SET {} = :now, {} = :log",
                attr::REFRESHED_AT,
                attr::LAST_REFRESH
            ));
            return self.conditional(bucket, request).await.map(|_| ());
        };
        let mark = format!(
            "SET {} = :g, {} = :now, {} = :log",
            attr::REFRESHED,
            attr::REFRESHED_AT,
            attr::LAST_REFRESH
        );
        let request = request.expression_attribute_values(":g", n(generation));
        // The mark drops a carried window that it covers (the usual case, one write);
        // a carried window of a later generation stays, with a mark alone.
        let dropping = request
            .clone()
            .update_expression(format!(
                "{mark} REMOVE {}, {}, {}",
                attr::CARRIED_GENERATION,
                attr::CARRIED_FOLDERS,
                attr::CARRIED_WHOLE
            ))
            .condition_expression(format!("{COND_MARKABLE} AND {COND_CARRIED_COVERED}"));
        if self.conditional(bucket, dropping).await?.is_some() {
            return Ok(());
        }
        // A failed condition here: a duplicate delivery already recorded this window.
        let marking = request
            .update_expression(mark)
            .condition_expression(COND_MARKABLE);
        self.conditional(bucket, marking).await.map(|_| ())
    }
}

/// The action queue.
#[derive(Debug, Clone)]
pub struct SqsRefreshQueue {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsRefreshQueue {
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        SqsRefreshQueue {
            client,
            queue_url: queue_url.into(),
        }
    }
}

impl RefreshQueue for SqsRefreshQueue {
    async fn send(
        &self,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        send_refresh_message(&self.client, &self.queue_url, message, delay_seconds).await
    }
}

fn queue_error<E, R>(err: SdkError<E, R>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: Debug + 'static,
{
    QueueError {
        retry: classify(&err),
        message: describe(&err),
    }
}

async fn send_refresh_message(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    message: &RefreshMessage,
    delay_seconds: u32,
) -> Result<String, QueueError> {
    send_action_message(
        client,
        queue_url,
        &message.body(),
        &message.bucket,
        message.timestamp_ms,
        delay_seconds,
    )
    .await
}

/// Sends `body` with the contract's attributes `bucket-name` and `timestamp`.
async fn send_action_message(
    client: &aws_sdk_sqs::Client,
    queue_url: &str,
    body: &str,
    bucket: &str,
    timestamp_ms: i64,
    delay_seconds: u32,
) -> Result<String, QueueError> {
    use aws_sdk_sqs::types::MessageAttributeValue;
    let attribute = |data_type: &str, value: String| {
        MessageAttributeValue::builder()
            .data_type(data_type)
            .string_value(value)
            .build()
            .map_err(|e| QueueError {
                retry: Retry::Never,
                message: e.to_string(),
            })
    };
    let out = client
        .send_message()
        .queue_url(queue_url)
        .message_body(body)
        .delay_seconds(i32::try_from(delay_seconds).unwrap_or(i32::MAX))
        .message_attributes(ATTR_BUCKET, attribute("String", bucket.to_string())?)
        .message_attributes(
            ATTR_TIMESTAMP,
            attribute("Number", timestamp_ms.to_string())?,
        )
        .send()
        .await
        .map_err(queue_error)?;
    Ok(out.message_id().unwrap_or_default().to_string())
}

/// The refresher's way back onto the action queue: the queue a message came from,
/// whose URL is looked up once per queue from the record's `eventSourceARN`.
#[derive(Debug)]
pub struct SqsRequeue {
    client: aws_sdk_sqs::Client,
    urls: tokio::sync::Mutex<HashMap<String, String>>,
}

impl SqsRequeue {
    pub fn new(client: aws_sdk_sqs::Client) -> Self {
        SqsRequeue {
            client,
            urls: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn from_config(config: &aws_config::SdkConfig) -> Self {
        Self::new(aws_sdk_sqs::Client::new(config))
    }

    async fn url_for(&self, arn: &str) -> Result<String, QueueError> {
        let mut urls = self.urls.lock().await;
        if let Some(url) = urls.get(arn) {
            return Ok(url.clone());
        }
        // arn:PARTITION:sqs:REGION:ACCOUNT:NAME
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let [_, _, "sqs", _, account, name] = parts.as_slice() else {
            return Err(QueueError {
                retry: Retry::Never,
                message: format!("eventSourceARN {arn:?} is not an SQS queue ARN"),
            });
        };
        let out = self
            .client
            .get_queue_url()
            .queue_name(*name)
            .queue_owner_aws_account_id(*account)
            .send()
            .await
            .map_err(queue_error)?;
        let url = out.queue_url().unwrap_or_default().to_string();
        urls.insert(arn.to_string(), url.clone());
        Ok(url)
    }
}

impl Requeue for SqsRequeue {
    async fn requeue(
        &self,
        source_arn: Option<&str>,
        message: &RefreshMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        let Some(arn) = source_arn else {
            return Err(QueueError {
                retry: Retry::Never,
                message: "the SQS record names no eventSourceARN to send the message back to"
                    .to_string(),
            });
        };
        let url = self.url_for(arn).await?;
        send_refresh_message(&self.client, &url, message, delay_seconds).await
    }

    async fn wake(
        &self,
        source_arn: Option<&str>,
        message: &WakeMessage,
        delay_seconds: u32,
    ) -> Result<String, QueueError> {
        let Some(arn) = source_arn else {
            return Err(QueueError {
                retry: Retry::Never,
                message: "the SQS record names no eventSourceARN to send the wake-up to"
                    .to_string(),
            });
        };
        let url = self.url_for(arn).await?;
        send_action_message(
            &self.client,
            &url,
            &message.body(),
            &message.bucket,
            message.visible_at_ms,
            delay_seconds,
        )
        .await
    }
}

/// Loads the shared AWS configuration from the standard environment (region,
/// credentials, `AWS_ENDPOINT_URL` and the per-service endpoint variables).
pub async fn load_aws_config() -> aws_config::SdkConfig {
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

impl DynamoWindowStore {
    pub fn from_config(config: &aws_config::SdkConfig, table: impl Into<String>) -> Self {
        Self::new(aws_sdk_dynamodb::Client::new(config), table)
    }
}

impl SqsRefreshQueue {
    pub fn from_config(config: &aws_config::SdkConfig, queue_url: impl Into<String>) -> Self {
        Self::new(aws_sdk_sqs::Client::new(config), queue_url)
    }
}
