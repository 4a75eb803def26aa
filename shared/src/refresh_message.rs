//! The refresh request the aggregator puts on the action queue, and its decoding.
//!
//! Contract (docs/spec.md): message attributes `bucket-name` (String) and `timestamp`
//! (Number, epoch ms, the first event of the window); the body is ours, JSON.

use aws_lambda_events::event::sqs::SqsMessage;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

use crate::s3_event::parse_event_time;

pub const ATTR_BUCKET: &str = "bucket-name";
pub const ATTR_TIMESTAMP: &str = "timestamp";
pub const BODY_VERSION: u32 = 1;

/// The JSON body of a refresh message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefreshMessage {
    pub version: u32,
    pub bucket: String,
    /// The window this message refreshes.
    pub generation: u64,
    pub window_opened_at_ms: i64,
    pub window_ends_at_ms: i64,
    /// The earliest `eventTime` among the events that opened the window (or the
    /// window's opening time when they carried none): the `timestamp` attribute.
    pub timestamp_ms: i64,
}

impl RefreshMessage {
    pub fn body(&self) -> String {
        // Serialising a struct of strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A refresh request as read back from an SQS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingRefresh {
    pub message_id: String,
    pub bucket: String,
    /// The window, when the body is ours; `None` means "refresh the whole bucket".
    pub generation: Option<u64>,
    pub timestamp_ms: Option<i64>,
    /// A body that was present but not our JSON, for the log.
    pub unreadable_body: Option<String>,
    /// The queue the message came from (`eventSourceARN`).
    pub source_arn: Option<String>,
    /// Our body, when it is ours: sent back as it is when the window ends later.
    pub body: Option<RefreshMessage>,
}

/// A record that can never be processed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BadMessage {
    #[error("SQS record is not a message: {0}")]
    NotAMessage(String),
    #[error("message {message_id} names no bucket (no '{ATTR_BUCKET}' attribute and no bucket in the body); body: {body:?}")]
    NoBucket {
        message_id: String,
        body: Option<String>,
    },
}

/// The body of a wake-up: the scheduler of `share_arn` asks to be looked at again
/// (its next call is allowed then, or a lease ends). Sent with the same attributes as a
/// refresh message, `bucket-name` being the share's bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WakeMessage {
    pub version: u32,
    /// Always [`WAKE_KIND`]: tells a wake-up from a refresh message.
    pub kind: String,
    pub share_arn: String,
    pub bucket: String,
    /// When the message becomes visible (the send time plus its delay), as recorded in
    /// the share's `WakeAt`.
    pub visible_at_ms: i64,
    /// When the scheduler may call the share (later than `visible_at_ms` when it is
    /// more than SQS's 900 s away: the wake-up is then sent again).
    pub due_at_ms: i64,
}

pub const WAKE_KIND: &str = "wake";

impl WakeMessage {
    pub fn new(share_arn: &str, bucket: &str, visible_at_ms: i64, due_at_ms: i64) -> Self {
        WakeMessage {
            version: BODY_VERSION,
            kind: WAKE_KIND.to_string(),
            share_arn: share_arn.to_string(),
            bucket: bucket.to_string(),
            visible_at_ms,
            due_at_ms,
        }
    }

    pub fn body(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The `detail-type` of Storage Gateway's refresh-complete event.
pub const REFRESH_COMPLETE_DETAIL_TYPE: &str = "Storage Gateway Refresh Cache Event";
pub const STORAGE_GATEWAY_SOURCE: &str = "aws.storagegateway";

/// A "Storage Gateway Refresh Cache Event", as EventBridge delivers it to the action
/// queue (the message body is the event):
/// `{"source": "aws.storagegateway", "detail-type": "Storage Gateway Refresh Cache
/// Event", "resources": ["<share ARN>"], "detail": {"event-type": "refresh-complete",
/// "notification-id": "...", "started": "<ISO 8601>", "completed": "<ISO 8601>",
/// "folderList": ["/"]}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletionEvent {
    pub message_id: String,
    /// The share ARN among `resources` (found by its form, `...:share/share-...`, in
    /// whatever order the event lists the share and its gateway); `None` when the
    /// event names no share.
    pub share_arn: Option<String>,
    /// `resources`, as the event lists them.
    pub resources: Vec<String>,
    pub notification_id: String,
    pub started_at_ms: Option<i64>,
    pub completed_at_ms: Option<i64>,
    pub folders: Vec<String>,
}

/// Whether `arn` names a Storage Gateway file share
/// (`arn:PARTITION:storagegateway:REGION:ACCOUNT:share/ID`), not its gateway.
pub fn is_file_share_arn(arn: &str) -> bool {
    let mut parts = arn.splitn(6, ':');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.nth(2)),
        (Some("arn"), Some(_), Some("storagegateway"), Some(resource))
            if resource.strip_prefix("share/").is_some_and(|id| !id.is_empty())
    )
}

/// A wake-up as read back from an SQS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingWake {
    pub message_id: String,
    pub source_arn: Option<String>,
    pub wake: WakeMessage,
}

/// Anything that reaches the refresher on the action queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionMessage {
    /// A window's refresh message (or a 2018 message: the whole bucket).
    Refresh(IncomingRefresh),
    Wake(IncomingWake),
    Completion(CompletionEvent),
}

/// Reads one record of the action queue: a completion event, a wake-up, or a refresh
/// message ([`decode_sqs_record`]).
pub fn decode_action_record(record: &Value) -> Result<ActionMessage, BadMessage> {
    let body: Option<Value> = record
        .get("body")
        .and_then(Value::as_str)
        .and_then(|b| serde_json::from_str(b).ok());
    let message_id = || {
        record
            .get("messageId")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .map(str::to_string)
            .ok_or_else(|| BadMessage::NotAMessage(format!("no messageId: {record}")))
    };
    if let Some(body) = &body {
        if body.get("source").and_then(Value::as_str) == Some(STORAGE_GATEWAY_SOURCE)
            && body.get("detail-type").and_then(Value::as_str) == Some(REFRESH_COMPLETE_DETAIL_TYPE)
        {
            let message_id = message_id()?;
            let detail = body.get("detail").cloned().unwrap_or(Value::Null);
            let text = |name: &str| detail.get(name).and_then(Value::as_str).map(str::to_string);
            let notification_id = text("notification-id")
                .filter(|id| !id.is_empty())
                .ok_or_else(|| {
                    BadMessage::NotAMessage(format!(
                        "refresh-complete event without a notification-id: {body}"
                    ))
                })?;
            let resources: Vec<String> = body
                .get("resources")
                .and_then(Value::as_array)
                .map(|r| {
                    r.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            return Ok(ActionMessage::Completion(CompletionEvent {
                message_id,
                share_arn: resources.iter().find(|arn| is_file_share_arn(arn)).cloned(),
                resources,
                notification_id,
                started_at_ms: text("started").as_deref().and_then(parse_event_time),
                completed_at_ms: text("completed").as_deref().and_then(parse_event_time),
                folders: detail
                    .get("folderList")
                    .and_then(Value::as_array)
                    .map(|f| {
                        f.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
            }));
        }
        if body.get("kind").and_then(Value::as_str) == Some(WAKE_KIND) {
            if let Ok(wake) = serde_json::from_value::<WakeMessage>(body.clone()) {
                return Ok(ActionMessage::Wake(IncomingWake {
                    message_id: message_id()?,
                    source_arn: record
                        .get("eventSourceARN")
                        .and_then(Value::as_str)
                        .filter(|a| !a.is_empty())
                        .map(str::to_string),
                    wake,
                }));
            }
        }
    }
    decode_sqs_record(record).map(ActionMessage::Refresh)
}

/// SQS caps `DelaySeconds` at 900: a longer window's message is sent again by the
/// refresher until the window ends.
pub const MAX_SQS_DELAY_SECONDS: u32 = 900;

/// Reads one SQS record of the refresher's event.
pub fn decode_sqs_record(record: &Value) -> Result<IncomingRefresh, BadMessage> {
    let message: SqsMessage = serde_json::from_value(record.clone())
        .map_err(|e| BadMessage::NotAMessage(format!("{e}: {record}")))?;
    let message_id = message
        .message_id
        .clone()
        .filter(|id| !id.is_empty())
        .ok_or_else(|| BadMessage::NotAMessage(format!("no messageId: {record}")))?;
    let attribute = |name: &str| {
        message
            .message_attributes
            .get(name)
            .and_then(|a| a.string_value.clone())
            .filter(|v| !v.is_empty())
    };
    let parsed_body: Option<RefreshMessage> = message
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok());
    let unreadable_body = match (&parsed_body, &message.body) {
        (None, Some(body)) => Some(body.clone()),
        _ => None,
    };
    let bucket = attribute(ATTR_BUCKET)
        .or_else(|| parsed_body.as_ref().map(|m| m.bucket.clone()))
        .ok_or_else(|| BadMessage::NoBucket {
            message_id: message_id.clone(),
            body: message.body.clone(),
        })?;
    // A body for another bucket than the attribute says is not ours to trust.
    let body_for_bucket = parsed_body.filter(|m| m.bucket == bucket);
    let timestamp_ms = attribute(ATTR_TIMESTAMP)
        .and_then(|t| t.parse::<i64>().ok())
        .or(body_for_bucket.as_ref().map(|m| m.timestamp_ms));
    Ok(IncomingRefresh {
        message_id,
        bucket,
        generation: body_for_bucket.as_ref().map(|m| m.generation),
        timestamp_ms,
        unreadable_body,
        source_arn: message.event_source_arn.clone().filter(|a| !a.is_empty()),
        body: body_for_bucket,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(attributes: Value, body: &str) -> Value {
        json!({
            "messageId": "m-1",
            "receiptHandle": "rh",
            "body": body,
            "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": attributes,
            "md5OfBody": "x",
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
            "awsRegion": "us-east-1"
        })
    }

    fn attrs(bucket: &str) -> Value {
        json!({
            "bucket-name": {"stringValue": bucket, "dataType": "String", "stringListValues": [], "binaryListValues": []},
            "timestamp": {"stringValue": "1534097642149", "dataType": "Number", "stringListValues": [], "binaryListValues": []}
        })
    }

    fn body(bucket: &str, generation: u64) -> String {
        RefreshMessage {
            version: BODY_VERSION,
            bucket: bucket.to_string(),
            generation,
            window_opened_at_ms: 1,
            window_ends_at_ms: 2,
            timestamp_ms: 1_534_097_642_149,
        }
        .body()
    }

    #[test]
    fn round_trip() {
        let got = decode_sqs_record(&record(attrs("b1"), &body("b1", 7))).unwrap();
        assert_eq!(got.bucket, "b1");
        assert_eq!(got.generation, Some(7));
        assert_eq!(got.timestamp_ms, Some(1_534_097_642_149));
        assert_eq!(got.message_id, "m-1");
        assert_eq!(
            got.source_arn.as_deref(),
            Some("arn:aws:sqs:us-east-1:123456789012:q")
        );
        assert_eq!(got.body.map(|b| b.window_ends_at_ms), Some(2));
    }

    #[test]
    fn the_2018_message_shape_refreshes_the_whole_bucket() {
        let got = decode_sqs_record(&record(attrs("b1"), "{}")).unwrap();
        assert_eq!(got.bucket, "b1");
        assert_eq!(got.generation, None);
        assert_eq!(got.unreadable_body.as_deref(), Some("{}"));
    }

    #[test]
    fn bucket_from_body_when_attributes_are_missing() {
        let got = decode_sqs_record(&record(json!({}), &body("b2", 3))).unwrap();
        assert_eq!((got.bucket.as_str(), got.generation), ("b2", Some(3)));
    }

    #[test]
    fn conflicting_body_is_not_trusted() {
        let got = decode_sqs_record(&record(attrs("b1"), &body("b2", 3))).unwrap();
        assert_eq!((got.bucket.as_str(), got.generation), ("b1", None));
    }

    #[test]
    fn no_bucket_anywhere_is_bad() {
        let err = decode_sqs_record(&record(json!({}), "not json")).unwrap_err();
        assert!(matches!(err, BadMessage::NoBucket { .. }));
        assert!(err.to_string().contains("not json"));
        assert!(matches!(
            decode_sqs_record(&json!("x")),
            Err(BadMessage::NotAMessage(_))
        ));
        assert!(matches!(
            decode_sqs_record(&json!({"body": "x"})),
            Err(BadMessage::NotAMessage(_))
        ));
    }

    #[test]
    fn the_share_of_a_completion_event_is_found_by_its_form_in_any_order() {
        let share = "arn:aws:storagegateway:eu-west-1:123456789012:share/share-ABC12345";
        let gateway = "arn:aws:storagegateway:eu-west-1:123456789012:gateway/sgw-12A3456B";
        for resources in [json!([share, gateway]), json!([gateway, share])] {
            let event = json!({"source": STORAGE_GATEWAY_SOURCE, "detail-type": REFRESH_COMPLETE_DETAIL_TYPE,
                "region": "eu-west-1", "resources": resources,
                "detail": {"event-type": "refresh-complete", "notification-id": "n-1",
                           "started": "2026-12-02T06:00:00.000Z", "completed": "2026-12-02T06:00:05.000Z",
                           "folderList": ["/a", "/"]}});
            let record = json!({"messageId": "m", "body": event.to_string()});
            let Ok(ActionMessage::Completion(c)) = decode_action_record(&record) else {
                panic!("not a completion: {record}");
            };
            assert_eq!(c.share_arn.as_deref(), Some(share));
            assert_eq!(c.resources.len(), 2);
            assert_eq!(c.folders, ["/a", "/"]);
            assert!(c.started_at_ms.is_some());
        }
        assert!(!is_file_share_arn(gateway));
        assert!(!is_file_share_arn(
            "arn:aws:storagegateway:eu-west-1:1:share/"
        ));
        assert!(!is_file_share_arn("arn:aws:s3:::share/x"));
        assert!(is_file_share_arn(
            "arn:aws-cn:storagegateway:cn-north-1:1:share/share-1"
        ));
    }
}
