//! The per-share scheduling items in DynamoDB: one item per share in the windows'
//! table, keyed `share#<share ARN>` ([`crate::scheduler::share_key`]), written whole
//! with a condition on its `Version`.

use super::sdk::{n, store_error, DynamoWindowStore};
use crate::error::StoreError;
use crate::ports::ShareStore;
use crate::scheduler::{
    share_key, slot_lease_ms, EarlyCompletion, Listing, ShareState, Slot, CLAIM_TIMEOUT_MS,
};
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;

/// Attribute names of a share item.
pub mod attr {
    pub const KEY: &str = "BucketName";
    pub const SHARE: &str = "ShareARN";
    pub const BUCKET: &str = "Bucket";
    pub const PREFIX: &str = "Prefix";
    pub const VERSION: &str = "Version";
    /// A string set of [`crate::scheduler::Listing::encode`]d listings.
    pub const PENDING: &str = "Pending";
    /// A number set: the places, in `Pending` sorted, of the listings that arrived
    /// after the last claim (see `ShareState::arrived`). Places, not names, so that
    /// the item does not hold a long name twice.
    pub const ARRIVED: &str = "Arrived";
    pub const PENDING_SINCE: &str = "PendingSince";
    pub const LAST_CALL_AT: &str = "LastCallAt";
    pub const WAKE_AT: &str = "WakeAt";
    pub const BUSY_UNTIL: &str = "BusyUntil";
    /// A list of maps: `ClaimId`, `ClaimedAt`, `NotificationId` (once started),
    /// `FolderList`, `Recursive`, `OldestEventAt`, `Returned`, `ClaimExpiresAt`,
    /// `LeaseEndsAt`.
    pub const SLOTS: &str = "Slots";
    /// A list of maps: `NotificationId`, `CompletedAt`.
    pub const EARLY_COMPLETIONS: &str = "EarlyCompletions";
    pub const LAST_COMPLETED_AT: &str = "LastCompletedAt";
    pub const LAST_STALENESS: &str = "LastStalenessMs";
    /// Failed or refused calls in a row (the back-off's exponent).
    pub const FAILURES: &str = "Failures";
    /// How long the share's refreshes took lately (sets the lease).
    pub const REFRESH_MS: &str = "RefreshMs";
}

type Item = HashMap<String, AttributeValue>;

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_string())
}

fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn get_n(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn encode_slot(slot: &Slot) -> AttributeValue {
    let mut m = Item::new();
    m.insert("ClaimId".into(), s(&slot.claim_id));
    m.insert("ClaimedAt".into(), n(slot.claimed_at_ms));
    if let Some(id) = &slot.notification_id {
        m.insert("NotificationId".into(), s(id));
    }
    m.insert(
        "FolderList".into(),
        AttributeValue::L(slot.listings.iter().map(|l| s(&l.path)).collect()),
    );
    m.insert("Recursive".into(), AttributeValue::Bool(slot.recursive()));
    m.insert("OldestEventAt".into(), n(slot.oldest_event_ms));
    m.insert("Returned".into(), AttributeValue::Bool(slot.returned));
    m.insert("ClaimExpiresAt".into(), n(slot.claim_expires_at_ms));
    m.insert("LeaseEndsAt".into(), n(slot.lease_ends_at_ms));
    AttributeValue::M(m)
}

fn decode_slot(m: &Item) -> Option<Slot> {
    let recursive = m
        .get("Recursive")
        .and_then(|v| v.as_bool().ok())
        .copied()
        .unwrap_or(false);
    let claimed_at_ms = get_n(m, "ClaimedAt")?;
    Some(Slot {
        claim_id: get_s(m, "ClaimId")?.to_string(),
        claimed_at_ms,
        // Items written before these were stored: the defaults of that time's rules.
        claim_expires_at_ms: get_n(m, "ClaimExpiresAt")
            .unwrap_or(claimed_at_ms.saturating_add(CLAIM_TIMEOUT_MS)),
        lease_ends_at_ms: get_n(m, "LeaseEndsAt")
            .unwrap_or(claimed_at_ms.saturating_add(slot_lease_ms(None))),
        notification_id: get_s(m, "NotificationId").map(str::to_string),
        listings: m
            .get("FolderList")
            .and_then(|v| v.as_l().ok())
            .map(|l| {
                l.iter()
                    .filter_map(|v| v.as_s().ok())
                    .map(|path| Listing {
                        path: path.clone(),
                        recursive,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        oldest_event_ms: get_n(m, "OldestEventAt").unwrap_or(0),
        returned: m
            .get("Returned")
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false),
    })
}

/// The item that stores `state` as its next version.
pub fn encode_share(state: &ShareState) -> Item {
    let mut item = Item::new();
    item.insert(attr::KEY.into(), s(&share_key(&state.share_arn)));
    item.insert(attr::SHARE.into(), s(&state.share_arn));
    item.insert(attr::BUCKET.into(), s(&state.bucket));
    item.insert(attr::PREFIX.into(), s(&state.prefix));
    item.insert(attr::VERSION.into(), n(state.version + 1));
    if !state.pending.is_empty() {
        item.insert(
            attr::PENDING.into(),
            AttributeValue::Ss(state.pending.iter().map(Listing::encode).collect()),
        );
        let arrived: Vec<String> = state
            .pending
            .iter()
            .enumerate()
            .filter(|(_, l)| state.arrived.contains(*l))
            .map(|(place, _)| place.to_string())
            .collect();
        if !arrived.is_empty() {
            item.insert(attr::ARRIVED.into(), AttributeValue::Ns(arrived));
        }
    }
    if let Some(t) = state.pending_since_ms {
        item.insert(attr::PENDING_SINCE.into(), n(t));
    }
    if let Some(t) = state.last_call_at_ms {
        item.insert(attr::LAST_CALL_AT.into(), n(t));
    }
    if let Some(t) = state.wake_at_ms {
        item.insert(attr::WAKE_AT.into(), n(t));
    }
    if let Some(t) = state.busy_until_ms {
        item.insert(attr::BUSY_UNTIL.into(), n(t));
    }
    if let Some(t) = state.last_completed_at_ms {
        item.insert(attr::LAST_COMPLETED_AT.into(), n(t));
    }
    if let Some(t) = state.last_staleness_ms {
        item.insert(attr::LAST_STALENESS.into(), n(t));
    }
    if state.failures > 0 {
        item.insert(attr::FAILURES.into(), n(i64::from(state.failures)));
    }
    if let Some(t) = state.refresh_ms {
        item.insert(attr::REFRESH_MS.into(), n(t));
    }
    item.insert(
        attr::SLOTS.into(),
        AttributeValue::L(state.slots.iter().map(encode_slot).collect()),
    );
    item.insert(
        attr::EARLY_COMPLETIONS.into(),
        AttributeValue::L(
            state
                .early_completions
                .iter()
                .map(|c| {
                    AttributeValue::M(Item::from([
                        ("NotificationId".to_string(), s(&c.notification_id)),
                        ("CompletedAt".to_string(), n(c.completed_at_ms)),
                    ]))
                })
                .collect(),
        ),
    );
    item
}

/// The state a share item holds. A pending entry that is not a listing (written by
/// something else) is a change of unknown place: the whole share.
pub fn decode_share(share_arn: &str, item: &Item) -> ShareState {
    let mut state = ShareState::new(share_arn, get_s(item, attr::BUCKET).unwrap_or_default());
    state.prefix = get_s(item, attr::PREFIX).unwrap_or_default().to_string();
    state.version = get_n(item, attr::VERSION)
        .and_then(|v| u64::try_from(v).ok())
        .unwrap_or(0);
    if let Some(stored) = item.get(attr::PENDING).and_then(|v| v.as_ss().ok()) {
        state.pending = stored
            .iter()
            .map(|e| Listing::decode(e).unwrap_or_else(|| Listing::subtree("/")))
            .collect();
        if let Some(places) = item.get(attr::ARRIVED).and_then(|v| v.as_ns().ok()) {
            let places: std::collections::BTreeSet<usize> =
                places.iter().filter_map(|p| p.parse().ok()).collect();
            state.arrived = state
                .pending
                .iter()
                .enumerate()
                .filter(|(place, _)| places.contains(place))
                .map(|(_, l)| l.clone())
                .collect();
        }
    }
    state.pending_since_ms = get_n(item, attr::PENDING_SINCE);
    if !state.pending.is_empty() && state.pending_since_ms.is_none() {
        state.pending_since_ms = Some(0);
    }
    state.last_call_at_ms = get_n(item, attr::LAST_CALL_AT);
    state.wake_at_ms = get_n(item, attr::WAKE_AT);
    state.busy_until_ms = get_n(item, attr::BUSY_UNTIL);
    state.last_completed_at_ms = get_n(item, attr::LAST_COMPLETED_AT);
    state.last_staleness_ms = get_n(item, attr::LAST_STALENESS);
    state.failures = get_n(item, attr::FAILURES)
        .and_then(|f| u32::try_from(f).ok())
        .unwrap_or(0);
    state.refresh_ms = get_n(item, attr::REFRESH_MS);
    let maps = |name: &str| -> Vec<Item> {
        item.get(name)
            .and_then(|v| v.as_l().ok())
            .map(|l| l.iter().filter_map(|v| v.as_m().ok()).cloned().collect())
            .unwrap_or_default()
    };
    state.slots = maps(attr::SLOTS).iter().filter_map(decode_slot).collect();
    state.early_completions = maps(attr::EARLY_COMPLETIONS)
        .iter()
        .filter_map(|m| {
            Some(EarlyCompletion {
                notification_id: get_s(m, "NotificationId")?.to_string(),
                completed_at_ms: get_n(m, "CompletedAt")?,
            })
        })
        .collect();
    state
}

impl ShareStore for DynamoWindowStore {
    async fn read_share(&self, share_arn: &str) -> Result<Option<ShareState>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(attr::KEY, s(&share_key(share_arn)))
            .consistent_read(true)
            .send()
            .await
            .map_err(store_error)?;
        Ok(out.item().map(|item| decode_share(share_arn, item)))
    }

    async fn write_share(&self, state: &ShareState) -> Result<bool, StoreError> {
        let request = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode_share(state)));
        let request = if state.version == 0 {
            request.condition_expression("attribute_not_exists(BucketName)")
        } else {
            request
                .condition_expression("Version = :v")
                .expression_attribute_values(":v", n(state.version))
        };
        match request.send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(ctx))
                if ctx.err().is_conditional_check_failed_exception() =>
            {
                Ok(false)
            }
            Err(err) => Err(store_error(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let mut state = ShareState::new("arn:aws:storagegateway:us-east-1:1:share/share-1", "b");
        state.prefix = "p/".into();
        state.add_pending([Listing::folder("/a"), Listing::subtree("/c")], 5);
        // One listing that waited through a claim, one that arrived since.
        state.arrived.remove(&Listing::folder("/a"));
        assert_eq!(state.arrived.len(), 1);
        state.last_call_at_ms = Some(9);
        state.wake_at_ms = Some(11);
        state.busy_until_ms = Some(14);
        state.last_completed_at_ms = Some(12);
        state.last_staleness_ms = Some(13);
        state.slots.push(Slot {
            claim_id: "c".into(),
            claimed_at_ms: 3,
            notification_id: Some("n".into()),
            listings: vec![Listing::subtree("/x"), Listing::subtree("/y")],
            oldest_event_ms: 2,
            returned: false,
            claim_expires_at_ms: 8,
            lease_ends_at_ms: 10,
        });
        state.failures = 3;
        state.refresh_ms = Some(15);
        state.early_completions.push(EarlyCompletion {
            notification_id: "e".into(),
            completed_at_ms: 4,
        });
        state.version = 6;
        let item = encode_share(&state);
        let back = decode_share(&state.share_arn, &item);
        assert_eq!(
            back,
            ShareState {
                version: 7,
                ..state
            }
        );
    }
}
