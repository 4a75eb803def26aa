//! Adapters over the AWS SDK: DynamoDB for windows, SQS for refresh messages,
//! Storage Gateway for shares and refreshes.

use crate::error::{GatewayError, QueueError, Retry, StoreError};
use crate::ports::{
    DescribedShare, FileGateway, RefreshQueue, SharePage, ShareSummary, WindowStore,
};
use crate::refresh_message::{RefreshMessage, ATTR_BUCKET, ATTR_TIMESTAMP};
use crate::shares::{RefreshPlan, ShareKind};
use crate::window::{
    self, ChangeSet, CloseOutcome, RefreshLog, StartedRefresh, WindowItem, WindowView,
};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use aws_sdk_storagegateway::types::FileShareType;
use std::collections::{BTreeSet, HashMap};
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

fn describe<E: std::error::Error + 'static>(err: &E) -> String {
    DisplayErrorContext(err).to_string()
}

fn store_error<E, R>(err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: Debug + 'static,
{
    StoreError {
        retry: classify(&err),
        message: describe(&err),
    }
}

/// Attribute names of the bucket item. `BucketName` is the hash key (SPEC.md).
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
    /// A map: `Generation`, `StartedAt`, `Refreshes` (a list of maps with `ShareARN`,
    /// `NotificationId`, `FolderList`, `Recursive`).
    pub const LAST_REFRESH: &str = "LastRefresh";
}

// The conditions of `crate::window`, as DynamoDB expressions.
const COND_OPEN_WINDOW: &str = "Generation > :zero AND WindowEndsAt > :now \
     AND (attribute_not_exists(ClosedGeneration) OR ClosedGeneration < Generation)";
const COND_NO_OPEN_WINDOW: &str = "attribute_not_exists(Generation) OR WindowEndsAt <= :now \
     OR ClosedGeneration >= Generation";

/// Folders are stored with a leading '/', so the bucket root is "/" rather than an
/// empty string (which a string set cannot hold).
fn encode_folders(folders: &BTreeSet<String>) -> Option<AttributeValue> {
    (!folders.is_empty())
        .then(|| AttributeValue::Ss(folders.iter().map(|f| format!("/{f}")).collect()))
}

fn n(value: impl ToString) -> AttributeValue {
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
    let folders = item
        .get(attr::FOLDERS)
        .and_then(|v| v.as_ss().ok())
        .map(|ss| {
            ss.iter()
                .map(|f| f.strip_prefix('/').unwrap_or(f).to_string())
                .collect()
        })
        .unwrap_or_default();
    WindowItem {
        bucket: bucket.to_string(),
        generation: gen(attr::GENERATION),
        opened_at_ms: num(attr::OPENED_AT),
        ends_at_ms: num(attr::ENDS_AT),
        sent_generation: gen(attr::SENT),
        closed_generation: gen(attr::CLOSED),
        refreshed_generation: gen(attr::REFRESHED),
        folders,
        whole_bucket: item
            .get(attr::WHOLE_BUCKET)
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
        last_event_at_ms: num(attr::LAST_EVENT_AT),
        last_refresh: item
            .get(attr::LAST_REFRESH)
            .and_then(|v| v.as_m().ok())
            .map(decode_refresh_log),
    }
}

fn encode_refresh_log(log: &RefreshLog) -> AttributeValue {
    let refreshes = log
        .refreshes
        .iter()
        .map(|r| {
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
    client: aws_sdk_dynamodb::Client,
    table: String,
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
    async fn join(
        &self,
        bucket: &str,
        changes: &ChangeSet,
        now_ms: i64,
    ) -> Result<Option<WindowView>, StoreError> {
        let mut set = vec![format!("{} = :now", attr::LAST_EVENT_AT)];
        let mut request = self
            .update(bucket)
            .condition_expression(COND_OPEN_WINDOW)
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", n(now_ms));
        if changes.whole_bucket {
            set.push(format!("{} = :true", attr::WHOLE_BUCKET));
            request = request.expression_attribute_values(":true", AttributeValue::Bool(true));
        }
        let mut expression = format!("SET {}", set.join(", "));
        if let Some(folders) = encode_folders(&changes.folders) {
            expression.push_str(&format!(" ADD {} :folders", attr::FOLDERS));
            request = request.expression_attribute_values(":folders", folders);
        }
        let item = self
            .conditional(bucket, request.update_expression(expression))
            .await?;
        Ok(item.as_ref().map(WindowView::from))
    }

    async fn open(
        &self,
        bucket: &str,
        changes: &ChangeSet,
        now_ms: i64,
        window_ms: i64,
    ) -> Result<Option<WindowView>, StoreError> {
        let mut expression = format!(
            "SET {g} = if_not_exists({g}, :zero) + :one, {o} = :now, {e} = :ends, {l} = :now, {w} = :whole",
            g = attr::GENERATION,
            o = attr::OPENED_AT,
            e = attr::ENDS_AT,
            l = attr::LAST_EVENT_AT,
            w = attr::WHOLE_BUCKET,
        );
        let mut request = self
            .update(bucket)
            .condition_expression(COND_NO_OPEN_WINDOW)
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":ends", n(now_ms.saturating_add(window_ms)))
            .expression_attribute_values(":whole", AttributeValue::Bool(changes.whole_bucket));
        match encode_folders(&changes.folders) {
            Some(folders) => {
                expression.push_str(&format!(", {} = :folders", attr::FOLDERS));
                request = request.expression_attribute_values(":folders", folders);
            }
            None => expression.push_str(&format!(" REMOVE {}", attr::FOLDERS)),
        }
        let item = self
            .conditional(bucket, request.update_expression(expression))
            .await?;
        Ok(item.as_ref().map(WindowView::from))
    }

    async fn mark_sent(&self, bucket: &str, generation: u64) -> Result<(), StoreError> {
        let request = self
            .update(bucket)
            .update_expression(format!("SET {} = :g", attr::SENT))
            .condition_expression("Generation >= :g AND (attribute_not_exists(SentGeneration) OR SentGeneration < :g)")
            .expression_attribute_values(":g", n(generation));
        // A failed condition means a later or equal mark is already there.
        self.conditional(bucket, request).await.map(|_| ())
    }

    async fn close(
        &self,
        bucket: &str,
        generation: u64,
        now_ms: i64,
    ) -> Result<CloseOutcome, StoreError> {
        let request = self
            .update(bucket)
            .update_expression(format!("SET {} = :g, {} = :now", attr::CLOSED, attr::CLOSED_AT))
            .condition_expression(
                "Generation = :g AND (attribute_not_exists(RefreshedGeneration) OR RefreshedGeneration < :g)",
            )
            .expression_attribute_values(":g", n(generation))
            .expression_attribute_values(":now", n(now_ms));
        match self.conditional(bucket, request).await? {
            Some(item) => Ok(CloseOutcome::Refresh(item.scope())),
            // Already refreshed, superseded or gone: the rule decides from the item.
            None => {
                let mut item = self.read(bucket).await?;
                Ok(window::close(&mut item, generation))
            }
        }
    }

    async fn record_refresh(&self, bucket: &str, log: &RefreshLog) -> Result<(), StoreError> {
        let mut request = self
            .update(bucket)
            .expression_attribute_values(":log", encode_refresh_log(log))
            .expression_attribute_values(":now", n(log.started_at_ms));
        request = match log.generation {
            Some(generation) => request
                .update_expression(format!(
                    "SET {} = :g, {} = :now, {} = :log",
                    attr::REFRESHED,
                    attr::REFRESHED_AT,
                    attr::LAST_REFRESH
                ))
                .condition_expression(
                    "Generation >= :g AND (attribute_not_exists(RefreshedGeneration) OR RefreshedGeneration < :g)",
                )
                .expression_attribute_values(":g", n(generation)),
            None => request.update_expression(format!(
                "SET {} = :now, {} = :log",
                attr::REFRESHED_AT,
                attr::LAST_REFRESH
            )),
        };
        // A failed condition: a duplicate delivery already recorded this window.
        self.conditional(bucket, request).await.map(|_| ())
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
        let out = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(message.body())
            .delay_seconds(i32::try_from(delay_seconds).unwrap_or(i32::MAX))
            .message_attributes(ATTR_BUCKET, attribute("String", message.bucket.clone())?)
            .message_attributes(
                ATTR_TIMESTAMP,
                attribute("Number", message.timestamp_ms.to_string())?,
            )
            .send()
            .await
            .map_err(|err| QueueError {
                retry: classify(&err),
                message: describe(&err),
            })?;
        Ok(out.message_id().unwrap_or_default().to_string())
    }
}

/// Storage Gateway through its SDK client.
#[derive(Debug, Clone)]
pub struct SdkFileGateway {
    client: aws_sdk_storagegateway::Client,
}

impl SdkFileGateway {
    pub fn new(client: aws_sdk_storagegateway::Client) -> Self {
        SdkFileGateway { client }
    }
}

fn gateway_error<E, R>(err: SdkError<E, R>, share_arn: Option<&str>) -> GatewayError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: Debug + 'static,
{
    let message = describe(&err);
    if let SdkError::ServiceError(ctx) = &err {
        let e = ctx.err();
        if e.code() == Some("InvalidGatewayRequestException") {
            // The gateway says InvalidGatewayRequestException both for a share that is
            // gone and for "two refreshes already in flight"; only the text tells them apart.
            let text = e.message().unwrap_or_default().to_ascii_lowercase();
            if let Some(arn) = share_arn {
                if text.contains("not found")
                    || text.contains("does not exist")
                    || text.contains("no such")
                {
                    return GatewayError::ShareNotFound {
                        share_arn: arn.to_string(),
                        message,
                    };
                }
            }
            return GatewayError::Busy { message };
        }
    }
    GatewayError::Other {
        retry: classify(&err),
        message,
    }
}

impl FileGateway for SdkFileGateway {
    async fn list_file_shares(&self, marker: Option<&str>) -> Result<SharePage, GatewayError> {
        let out = self
            .client
            .list_file_shares()
            .set_marker(marker.map(str::to_string))
            .send()
            .await
            .map_err(|e| gateway_error(e, None))?;
        let shares = out
            .file_share_info_list()
            .iter()
            .filter_map(|info| {
                let kind = match info.file_share_type()? {
                    FileShareType::Nfs => ShareKind::Nfs,
                    FileShareType::Smb => ShareKind::Smb,
                    // A share type this build does not know cannot be described.
                    _ => return None,
                };
                Some(ShareSummary {
                    arn: info.file_share_arn()?.to_string(),
                    kind,
                })
            })
            .collect();
        Ok(SharePage {
            shares,
            next_marker: out
                .next_marker()
                .filter(|m| !m.is_empty())
                .map(str::to_string),
        })
    }

    async fn describe_file_shares(
        &self,
        kind: ShareKind,
        arns: &[String],
    ) -> Result<Vec<DescribedShare>, GatewayError> {
        let first = arns.first().map(String::as_str);
        let described = |arn: Option<&str>, gateway: Option<&str>, location: Option<&str>| {
            Some(DescribedShare {
                arn: arn?.to_string(),
                kind,
                gateway_arn: gateway.unwrap_or_default().to_string(),
                location_arn: location?.to_string(),
            })
        };
        match kind {
            ShareKind::Nfs => {
                let out = self
                    .client
                    .describe_nfs_file_shares()
                    .set_file_share_arn_list(Some(arns.to_vec()))
                    .send()
                    .await
                    .map_err(|e| gateway_error(e, first))?;
                Ok(out
                    .nfs_file_share_info_list()
                    .iter()
                    .filter_map(|s| {
                        described(s.file_share_arn(), s.gateway_arn(), s.location_arn())
                    })
                    .collect())
            }
            ShareKind::Smb => {
                let out = self
                    .client
                    .describe_smb_file_shares()
                    .set_file_share_arn_list(Some(arns.to_vec()))
                    .send()
                    .await
                    .map_err(|e| gateway_error(e, first))?;
                Ok(out
                    .smb_file_share_info_list()
                    .iter()
                    .filter_map(|s| {
                        described(s.file_share_arn(), s.gateway_arn(), s.location_arn())
                    })
                    .collect())
            }
        }
    }

    async fn refresh_cache(&self, plan: &RefreshPlan) -> Result<String, GatewayError> {
        let out = self
            .client
            .refresh_cache()
            .file_share_arn(&plan.share_arn)
            .set_folder_list(Some(plan.folders.clone()))
            .recursive(plan.recursive)
            .send()
            .await
            .map_err(|e| gateway_error(e, Some(&plan.share_arn)))?;
        Ok(out.notification_id().unwrap_or_default().to_string())
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

impl SdkFileGateway {
    pub fn from_config(config: &aws_config::SdkConfig) -> Self {
        Self::new(aws_sdk_storagegateway::Client::new(config))
    }
}
