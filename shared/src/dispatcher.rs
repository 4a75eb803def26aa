//! The refresher's side of per-share scheduling: it hands a closed window's listings
//! to the shares, calls `RefreshCache` when [`crate::scheduler`] allows it, sends
//! wake-ups for what must wait, and frees slots on completion events.
//!
//! Every change of a share's state is a read, the scheduler's rule, and a write that
//! succeeds only if nobody wrote the item in between (else it starts over). Ordering
//! for crashes: a slot is claimed (written) before its call, so a crash after the call
//! leaves a slot that counts as in flight; a wake-up is sent before the write that
//! records it, so a recorded wake-up always exists.

use crate::clock::Clock;
use crate::error::{GatewayError, StoreError};
use crate::metrics::{name, InvocationMetrics};
use crate::ports::{AccessPoints, FileGateway, Requeue, ShareStore, WindowStore};
use crate::refresh_message::{CompletionEvent, IncomingWake, WakeMessage, MAX_SQS_DELAY_SECONDS};
use crate::refresher::{RecordError, Refresher};
use crate::scheduler::{
    CompletedRefresh, Completion, Dispatch, Listing, Owed, ShareState, Slot, CLAIM_TIMEOUT_MS,
};
use crate::shares::{plan_share_listings, RefreshPlan};
use crate::window::StartedRefresh;
use tracing::{info, warn};

/// How often a read-modify-write of one share item is tried when other writers keep
/// coming first.
const SHARE_WRITE_ROUNDS: usize = 20;

/// What driving one share came to.
#[derive(Debug, Default)]
pub(crate) struct Driven {
    /// The calls that started.
    pub started: Vec<StartedRefresh>,
    /// The share is gone (the gateway said so), owing this to the bucket's other shares.
    pub orphaned: Option<Owed>,
}

/// The least time before the invocation's deadline in which a call is still started:
/// the call, and the write that records it, must both fit (the SDK's attempt timeout).
const RECORD_RESERVE_MS: i64 = 10_000;

/// How many times what a gone share owed is handed on when the shares it goes to turn
/// out to be gone too.
const REHOME_ROUNDS: usize = 3;

impl<S, G, Q, C, A> Refresher<S, G, Q, C, A>
where
    S: WindowStore + ShareStore,
    G: FileGateway,
    Q: Requeue,
    C: Clock,
    A: AccessPoints,
{
    /// Applies `change` to the share's state (a new state when `bucket` is given and
    /// there is none) and stores it; `Ok(None)` when the share has no state and none
    /// is to be made.
    async fn update_share<R>(
        &self,
        share_arn: &str,
        create_for_bucket: Option<&str>,
        mut change: impl FnMut(&mut ShareState) -> R,
    ) -> Result<Option<(ShareState, R)>, RecordError> {
        for _ in 0..SHARE_WRITE_ROUNDS {
            let mut state = match (self.store.read_share(share_arn).await?, create_for_bucket) {
                (Some(state), _) => state,
                (None, Some(bucket)) => ShareState::new(share_arn, bucket),
                (None, None) => return Ok(None),
            };
            if state.bucket.is_empty() {
                if let Some(bucket) = create_for_bucket {
                    state.bucket = bucket.to_string();
                }
            }
            let before = state.clone();
            let result = change(&mut state);
            if state == before {
                return Ok(Some((state, result)));
            }
            if self.store.write_share(&state).await? {
                state.version += 1;
                return Ok(Some((state, result)));
            }
        }
        Err(StoreError {
            retry: crate::error::Retry::Later,
            message: format!("share item of {share_arn} kept changing under this write"),
        }
        .into())
    }

    /// Adds a closed window's listings to the share (whose prefix is `prefix`) and
    /// drives it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn hand_off(
        &self,
        share_arn: &str,
        bucket: &str,
        prefix: &str,
        listings: Vec<Listing>,
        oldest_event_ms: i64,
        source_arn: Option<&str>,
        metrics: &mut InvocationMetrics,
    ) -> Result<Driven, RecordError> {
        let add = move |state: &mut ShareState| {
            if state.prefix != prefix {
                state.prefix = prefix.to_string();
            }
            let mut added = listings.clone();
            if self.trusts_in_flight {
                // The fault the simulation must catch: a listing that an in-flight
                // refresh lists is taken as refreshed, though that refresh started
                // before this change.
                added.retain(|l| {
                    !state
                        .slots
                        .iter()
                        .any(|s| s.listings.iter().any(|x| x.covers(l)))
                });
            }
            state.add_pending(added, oldest_event_ms);
        };
        self.drive(share_arn, Some(bucket), source_arn, None, add, metrics)
            .await
    }

    /// A wake-up: the share may be callable now.
    pub(crate) async fn on_wake(
        &self,
        wake: &IncomingWake,
        metrics: &mut InvocationMetrics,
    ) -> Result<Driven, RecordError> {
        let w = &wake.wake;
        let consumed = w.visible_at_ms;
        let clear = move |state: &mut ShareState| {
            if state.wake_at_ms == Some(consumed) {
                state.wake_at_ms = None;
            }
        };
        let driven = self
            .drive(
                &w.share_arn,
                None,
                wake.source_arn.as_deref(),
                Some(consumed),
                clear,
                metrics,
            )
            .await?;
        self.rehome(&w.share_arn, driven, wake.source_arn.as_deref(), metrics)
            .await
    }

    /// A refresh-complete event: frees its slot and drives the share. An event for a
    /// share without state (one we never called), a duplicate, or one without a share
    /// changes nothing.
    pub(crate) async fn on_completion(
        &self,
        event: &CompletionEvent,
        source_arn: Option<&str>,
        metrics: &mut InvocationMetrics,
    ) -> Result<Driven, RecordError> {
        let share_arn = if self.faults.share_is_the_first_resource {
            event.resources.first().map(String::as_str)
        } else {
            event.share_arn.as_deref()
        };
        let Some(share_arn) = share_arn else {
            warn!(notification_id = %event.notification_id, "Refresh-complete event names no share; ignored");
            return Ok(Driven::default());
        };
        let now = self.clock.now_ms();
        let completed = CompletedRefresh {
            notification_id: event.notification_id.clone(),
            folders: event.folders.clone(),
            started_at_ms: event.started_at_ms,
            completed_at_ms: event.completed_at_ms.unwrap_or(now),
        };
        let mut freed: Option<Slot> = None;
        let complete = |state: &mut ShareState| {
            freed = match state.complete_refresh(&completed) {
                Completion::Freed(slot) => Some(slot),
                Completion::Unknown => None,
            };
        };
        let Some((state, ())) = self.update_share(share_arn, None, complete).await? else {
            info!(share = %share_arn, notification_id = %event.notification_id,
                "Refresh-complete event for a share this deployment never called; ignored");
            return Ok(Driven::default());
        };
        match &freed {
            Some(slot) => {
                let staleness_ms = state.last_staleness_ms.unwrap_or_default();
                info!(share = %share_arn, bucket = %state.bucket, notification_id = %event.notification_id,
                    folders = ?slot.folders(), recursive = slot.recursive(), staleness_ms,
                    "Refresh of share {share_arn} completed");
                metrics.count(Some(&state.bucket), name::REFRESHES_COMPLETED, 1);
                metrics.max_ms(Some(&state.bucket), name::STALENESS, staleness_ms);
            }
            None => {
                info!(share = %share_arn, notification_id = %event.notification_id,
                    "Refresh-complete event matches no refresh in flight (a duplicate, late, or not ours)");
            }
        }
        let driven = self
            .drive(
                share_arn,
                None,
                source_arn,
                None,
                |_: &mut ShareState| {},
                metrics,
            )
            .await?;
        self.rehome(share_arn, driven, source_arn, metrics).await
    }

    /// Applies `prepare`, then calls the share for as long as the rules allow, and
    /// leaves a wake-up for what still waits.
    ///
    /// A call that fails is this share's alone: its listings go back to pending, the
    /// share backs off ([`crate::scheduler::backoff_ms`]) with a wake-up of its own, and
    /// the message goes on, since the share's item now holds the work. Only a failure
    /// to record that (DynamoDB, SQS) fails the message.
    async fn drive(
        &self,
        share_arn: &str,
        create_for_bucket: Option<&str>,
        source_arn: Option<&str>,
        mut consumed_wake: Option<i64>,
        prepare: impl FnMut(&mut ShareState),
        metrics: &mut InvocationMetrics,
    ) -> Result<Driven, RecordError> {
        let mut driven = Driven::default();
        let mut prepare = Some(prepare);
        loop {
            let now = self.clock.now_ms();
            let claim_id = self.next_claim_id();
            // A claim lives until this invocation's deadline; none is made when too
            // little time is left to make the call and record it.
            let (claim_expires_at, time_to_call) = match self.deadline() {
                Some(deadline) => (
                    deadline.saturating_add(self.pace.clock_margin_ms),
                    deadline.saturating_sub(now) >= RECORD_RESERVE_MS,
                ),
                None => (now.saturating_add(CLAIM_TIMEOUT_MS), true),
            };
            let mut leases_ended = 0;
            let step = |state: &mut ShareState| {
                if let Some(prepare) = prepare.as_mut() {
                    prepare(state);
                }
                let expiring: Vec<Listing> = if self.faults.lease_drops_its_folders {
                    state
                        .slots
                        .iter()
                        .filter(|s| now >= s.lease_ends_at_ms && !s.returned)
                        .flat_map(|s| s.listings.clone())
                        .collect()
                } else {
                    Vec::new()
                };
                leases_ended = state.housekeep(now);
                for listing in &expiring {
                    state.pending.remove(listing);
                }
                if time_to_call {
                    return state.dispatch_until(now, self.pace, &claim_id, claim_expires_at);
                }
                match state.next_call_at(now, self.pace) {
                    None => Dispatch::Idle,
                    Some(at) => Dispatch::WaitUntil(at.max(now.saturating_add(1_000))),
                }
            };
            let Some((state, decided)) = self
                .update_share(share_arn, create_for_bucket, step)
                .await?
            else {
                return Ok(driven);
            };
            prepare = None;
            if leases_ended > 0 {
                warn!(share = %share_arn, bucket = %state.bucket, leases_ended,
                    "No completion event came for {leases_ended} refresh(es) of share {share_arn} by the end of the lease; their folders will be listed again");
                metrics.count(Some(&state.bucket), name::LEASES_ENDED, leases_ended);
            }
            match decided {
                Dispatch::Idle => return Ok(driven),
                Dispatch::WaitUntil(at) => {
                    if !time_to_call {
                        metrics.count(Some(&state.bucket), name::CALLS_LEFT_FOR_DEADLINE, 1);
                    }
                    if state.needs_wake(at, now, consumed_wake) {
                        self.send_wake(&state, at, now, source_arn, metrics).await?;
                    }
                    if !state.pending.is_empty() {
                        metrics.count(Some(&state.bucket), name::REFRESHES_DEFERRED, 1);
                    }
                    return Ok(driven);
                }
                Dispatch::Call(slot) => {
                    consumed_wake = None;
                    let plan = RefreshPlan {
                        share_arn: share_arn.to_string(),
                        folders: slot.folders(),
                        recursive: slot.recursive(),
                    };
                    let claim = slot.claim_id.clone();
                    let error = match self.gateway.refresh_cache(&plan).await {
                        Ok(notification_id) => {
                            let id = notification_id.clone();
                            self.update_share(share_arn, None, |s: &mut ShareState| {
                                s.started(&claim, &id)
                            })
                            .await?;
                            info!(bucket = %state.bucket, share = %share_arn, folders = ?plan.folders, recursive = plan.recursive,
                                notification_id = %notification_id, pending = state.pending.len(), in_flight = state.in_flight(),
                                "Refreshing cache of share {share_arn} for bucket: {}", state.bucket);
                            metrics.count(Some(&state.bucket), name::REFRESHES_REQUESTED, 1);
                            let age = now.saturating_sub(slot.oldest_event_ms);
                            metrics.max_ms(Some(&state.bucket), name::OLDEST_EVENT_AGE, age);
                            driven.started.push(StartedRefresh {
                                share_arn: share_arn.to_string(),
                                notification_id,
                                folders: plan.folders,
                                recursive: plan.recursive,
                            });
                            continue;
                        }
                        Err(error) => error,
                    };
                    if let GatewayError::Busy { message } = &error {
                        // Back to pending; the next round waits for the back-off and
                        // leaves a wake-up.
                        warn!(share = %share_arn, %message, "Refresh throttled; the folders wait for the next allowed call");
                        metrics.count(Some(&state.bucket), name::REFRESHES_THROTTLED, 1);
                        self.update_share(share_arn, None, |s: &mut ShareState| {
                            s.refused(&claim, now)
                        })
                        .await?;
                        continue;
                    }
                    // Back to pending with the back-off first, so that whatever comes
                    // next (a gone share's hand-on, a failure) finds the listings there.
                    let refused = self
                        .update_share(share_arn, None, |s: &mut ShareState| s.refused(&claim, now))
                        .await?;
                    if let GatewayError::ShareNotFound { message, .. } = &error {
                        // Gone only if a map resolved now no longer lists it: the
                        // gateway's text may be about a folder, or a share in another
                        // region that a mis-routed call did not find.
                        self.forget_share_map().await;
                        // Boxed: the resolve's future is large, and this one is nested
                        // in every message's.
                        let (shares, _) = Box::pin(self.shares(true)).await?;
                        if !shares.iter().any(|s| s.arn == share_arn) {
                            warn!(share = %share_arn, %message, "File share is gone; handing what it waited for to the bucket's other shares");
                            metrics.count(Some(&state.bucket), name::SHARES_NOT_FOUND, 1);
                            // What it owes, read now but forgotten only once it has
                            // been handed on (see `rehome`): a failure in between
                            // leaves it here for the redelivery.
                            let owed = self
                                .store
                                .read_share(share_arn)
                                .await?
                                .map(|mut current| current.forget());
                            driven.orphaned = Some(owed.unwrap_or(Owed {
                                bucket: state.bucket.clone(),
                                changes: Default::default(),
                                oldest_event_ms: now,
                            }));
                            return Ok(driven);
                        }
                        warn!(share = %share_arn, %message,
                            "The gateway answered \"not found\" for share {share_arn}, which the share map still lists; treated as a failed call");
                    }
                    metrics.count(Some(&state.bucket), name::REFRESHES_FAILED, 1);
                    let Some((state, ())) = refused else {
                        return Ok(driven);
                    };
                    if self.faults.failing_share_fails_the_message {
                        let due = state.busy_until_ms.unwrap_or(now);
                        self.send_wake(&state, due, now, source_arn, metrics)
                            .await?;
                        return Err(error.into());
                    }
                    let due = state.busy_until_ms.unwrap_or(now);
                    warn!(share = %share_arn, bucket = %state.bucket, error = %error, failures = state.failures,
                        retry_in_ms = due.saturating_sub(now), retry = ?error.retry(),
                        "RefreshCache failed on share {share_arn}; its folders wait in its own item for the next try");
                    // A wake-up of its own: no other message may come to this share.
                    if state.needs_wake(due, now, consumed_wake) {
                        self.send_wake(&state, due, now, source_arn, metrics)
                            .await?;
                    }
                    return Ok(driven);
                }
            }
        }
    }

    /// Hands what a gone share owed to the bucket's other shares, on a share map
    /// resolved anew (a share recreated under a new ARN is in it), then clears the gone
    /// share's item. Conservative: a share that already had these changes lists them
    /// again, which costs some listing only when a share disappears; a share that a
    /// cached map did not know at the hand-off gets them.
    pub(crate) async fn rehome(
        &self,
        gone_arn: &str,
        mut driven: Driven,
        source_arn: Option<&str>,
        metrics: &mut InvocationMetrics,
    ) -> Result<Driven, RecordError> {
        let mut work: Vec<(String, Owed)> = driven
            .orphaned
            .take()
            .map(|owed| (gone_arn.to_string(), owed))
            .into_iter()
            .collect();
        for _ in 0..REHOME_ROUNDS {
            let Some((gone, owed)) = work.pop() else {
                return Ok(driven);
            };
            self.forget_share_map().await;
            if owed.is_empty() {
                self.update_share(&gone, None, |s: &mut ShareState| {
                    s.forget();
                })
                .await?;
                continue;
            }
            let (shares, _) = self.shares(true).await?;
            for share in plan_share_listings(&shares, &owed.bucket, &owed.changes)
                .into_iter()
                .filter(|s| s.share_arn != gone)
            {
                info!(gone = %gone, share = %share.share_arn, bucket = %owed.bucket,
                    "Handing the changes of a gone share to share {}", share.share_arn);
                let handed = self
                    .hand_off(
                        &share.share_arn,
                        &owed.bucket,
                        &share.prefix,
                        share.listings,
                        owed.oldest_event_ms,
                        source_arn,
                        metrics,
                    )
                    .await?;
                driven.started.extend(handed.started);
                if let Some(next) = handed.orphaned {
                    work.push((share.share_arn, next));
                }
            }
            // Handed on: now the gone share's item may let go of it.
            self.update_share(&gone, None, |s: &mut ShareState| {
                s.forget();
            })
            .await?;
        }
        if work.is_empty() {
            Ok(driven)
        } else {
            Err(RecordError::SharesUnstable(gone_arn.to_string()))
        }
    }

    /// Sends a wake-up for `due_at` (at most SQS's 900 s ahead; a later one is sent
    /// again when it arrives), then records it.
    async fn send_wake(
        &self,
        state: &ShareState,
        due_at: i64,
        now: i64,
        source_arn: Option<&str>,
        metrics: &mut InvocationMetrics,
    ) -> Result<(), RecordError> {
        let delay_seconds =
            crate::refresher::remaining_delay_seconds(now, due_at).clamp(1, MAX_SQS_DELAY_SECONDS);
        let visible_at = now.saturating_add(i64::from(delay_seconds) * 1000);
        let message = WakeMessage::new(&state.share_arn, &state.bucket, visible_at, due_at);
        self.requeue
            .wake(source_arn, &message, delay_seconds)
            .await?;
        metrics.count(Some(&state.bucket), name::WAKE_UPS_SENT, 1);
        self.update_share(&state.share_arn, None, |s: &mut ShareState| {
            s.woke_at(visible_at, now)
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::adapters::memory::{MemoryGateway, MemoryQueue, MemoryWindowStore};
    use crate::clock::Clock;
    use crate::clock::ManualClock;
    use crate::error::{GatewayError, Retry};
    use crate::refresh_message::REFRESH_COMPLETE_DETAIL_TYPE;
    use crate::refresher::Refresher;
    use crate::scheduler::{Listing, MIN_SLOT_LEASE_MS};
    use crate::shares::ShareKind;
    use serde_json::{json, Value};

    type TestRefresher = Refresher<MemoryWindowStore, MemoryGateway, MemoryQueue, ManualClock>;

    const SHARE: &str = "arn:aws:storagegateway:us-east-1:123456789012:share/share-1";

    fn refresher(interval_seconds: u32) -> (TestRefresher, ManualClock) {
        let clock = ManualClock::at(1_000_000);
        let r = Refresher::new(
            MemoryWindowStore::default(),
            MemoryGateway::new(100),
            MemoryQueue::default(),
            clock.clone(),
        )
        .with_pace(interval_seconds, 0)
        .with_claim_prefix("t");
        r.gateway()
            .add_share(SHARE, ShareKind::Nfs, "arn:aws:s3:::b1");
        (r, clock)
    }

    /// A 2018-style message (no body of ours): the whole bucket changed.
    fn whole_bucket(id: &str) -> Value {
        json!({"Records": [{"messageId": id, "body": "{}", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
               "messageAttributes": {"bucket-name": {"stringValue": "b1", "dataType": "String"}}}]})
    }

    fn record(id: &str, body: String) -> Value {
        json!({"Records": [{"messageId": id, "body": body, "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q"}]})
    }

    fn completion(id: &str, share: &str, notification_id: &str) -> Value {
        record(
            id,
            json!({"version": "0", "id": "e", "source": "aws.storagegateway",
                   "detail-type": REFRESH_COMPLETE_DETAIL_TYPE, "resources": [share],
                   "detail": {"event-type": "refresh-complete", "notification-id": notification_id,
                              "started": "2026-12-02T06:00:00.000Z", "completed": "2026-12-02T06:00:05.000Z",
                              "folderList": ["/"]}})
            .to_string(),
        )
    }

    #[tokio::test]
    async fn changes_within_the_interval_wait_for_one_wake_up_and_go_together() {
        let (r, clock) = refresher(60);
        assert!(r
            .handle(&whole_bucket("m1"))
            .await
            .unwrap()
            .batch_item_failures
            .is_empty());
        assert_eq!(r.gateway().refreshes().len(), 1);
        // Two more windows within the interval: no call, one wake-up.
        clock.advance(10_000);
        r.handle(&whole_bucket("m2")).await.unwrap();
        clock.advance(10_000);
        r.handle(&whole_bucket("m3")).await.unwrap();
        assert_eq!(r.gateway().refreshes().len(), 1);
        let wakes = r.requeue().wakes();
        // One for the first call's lease (in case its completion event never comes,
        // chained 900 s at a time), and one for the interval.
        assert_eq!(wakes.len(), 2, "{wakes:?}");
        let lease_ends = clock.now_ms() - 20_000 + MIN_SLOT_LEASE_MS;
        assert_eq!((wakes[0].0.due_at_ms, wakes[0].1), (lease_ends, 900));
        let (wake, delay) = &wakes[1];
        assert_eq!(*delay, 50, "the rest of the 60 s after the first call");
        assert_eq!(wake.share_arn, SHARE);
        let state = r.store().share(SHARE).unwrap();
        assert_eq!(state.pending.len(), 1);
        assert_eq!(state.wake_at_ms, Some(wake.visible_at_ms));
        // The wake-up comes: one call for both windows.
        clock.advance(50_000);
        r.handle(&record("w1", wake.body())).await.unwrap();
        let refreshes = r.gateway().refreshes();
        assert_eq!(refreshes.len(), 2);
        assert_eq!(refreshes[1].folders, ["/"]);
        assert!(refreshes[1].recursive);
        assert!(r.store().share(SHARE).unwrap().pending.is_empty());
        // Nothing pending: the wake-up now waits for the first lease. The item keeps
        // only its earliest wake-up, so the first one's chain is not known any more and
        // a second chain is sent (harmless; the completion normally comes first).
        let wakes = r.requeue().wakes();
        assert_eq!(wakes.len(), 3);
        assert_eq!(wakes[2].0.due_at_ms, lease_ends);
        // The same wake-up delivered again does nothing.
        r.handle(&record("w1", wake.body())).await.unwrap();
        assert_eq!(r.gateway().refreshes().len(), 2);
        assert_eq!(r.requeue().wakes().len(), 3);
    }

    #[tokio::test]
    async fn a_third_refresh_waits_for_a_completion_event() {
        let (r, _clock) = refresher(0);
        for m in ["m1", "m2", "m3"] {
            r.handle(&whole_bucket(m)).await.unwrap();
        }
        assert_eq!(r.gateway().refreshes().len(), 2, "two in flight at most");
        let state = r.store().share(SHARE).unwrap();
        assert_eq!(state.in_flight(), 2);
        let (wake, delay) = r.requeue().wakes().pop().unwrap();
        assert_eq!(
            delay, 900,
            "the lease is hours away: chained 900-s wake-ups"
        );
        assert_eq!(
            wake.due_at_ms,
            state.slots[0].claimed_at_ms + MIN_SLOT_LEASE_MS
        );
        // The completion of the first call frees its slot and dispatches what waits.
        let first = state.slots[0].notification_id.clone().unwrap();
        let out = r.handle(&completion("c1", SHARE, &first)).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert_eq!(r.gateway().refreshes().len(), 3);
        // Duplicate, unknown and foreign events change nothing.
        for event in [
            completion("c2", SHARE, &first),
            completion("c3", SHARE, "someone-else"),
            completion(
                "c4",
                "arn:aws:storagegateway:us-east-1:123456789012:share/share-OTHER",
                "x",
            ),
        ] {
            assert!(r
                .handle(&event)
                .await
                .unwrap()
                .batch_item_failures
                .is_empty());
        }
        assert_eq!(r.gateway().refreshes().len(), 3);
        assert_eq!(r.store().share(SHARE).unwrap().in_flight(), 2);
        assert!(r
            .store()
            .share("arn:aws:storagegateway:us-east-1:123456789012:share/share-OTHER")
            .is_none());
    }

    #[tokio::test]
    async fn a_change_while_its_folder_is_in_flight_gets_its_own_later_call() {
        let (r, clock) = refresher(1);
        r.handle(&whole_bucket("m1")).await.unwrap();
        clock.advance(100);
        r.handle(&whole_bucket("m2")).await.unwrap();
        let state = r.store().share(SHARE).unwrap();
        assert!(
            state.pending.contains(&Listing::subtree("/")),
            "not covered by the call in flight"
        );
        let (wake, _) = r.requeue().wakes().pop().unwrap();
        clock.advance(1_000);
        r.handle(&record("w", wake.body())).await.unwrap();
        assert_eq!(r.gateway().refreshes().len(), 2);
    }

    const SIBLING: &str = "arn:aws:storagegateway:us-east-1:123456789012:share/share-9";

    fn failure() -> GatewayError {
        GatewayError::Other {
            retry: Retry::Later,
            message: "InternalServerError".into(),
        }
    }

    #[tokio::test]
    async fn a_failing_share_backs_off_alone_and_the_message_succeeds() {
        let (r, clock) = refresher(0);
        r.gateway()
            .add_share(SIBLING, ShareKind::Nfs, "arn:aws:s3:::b1");
        r.gateway().fail_share(SHARE, failure());
        let out = r.handle(&whole_bucket("m1")).await.unwrap();
        assert!(
            out.batch_item_failures.is_empty(),
            "the work is in the share's item"
        );
        assert_eq!(r.gateway().refreshes().len(), 1);
        assert_eq!(r.gateway().refreshes()[0].share_arn, SIBLING);
        assert_eq!(r.gateway().failed_calls().len(), 1);
        let state = r.store().share(SHARE).unwrap();
        assert!(state.pending.contains(&Listing::subtree("/")));
        assert_eq!(state.failures, 1);
        let wake_of = |share: &str| {
            r.requeue()
                .wakes()
                .into_iter()
                .rev()
                .find(|(w, _)| w.share_arn == share)
                .unwrap_or_else(|| panic!("no wake-up for {share}"))
        };
        let (wake, delay) = wake_of(SHARE);
        assert_eq!(delay, 10);
        // More windows within the back-off: the sibling is called (until both its slots
        // are in flight), the failing share not.
        for (m, sibling_calls) in [("m2", 2), ("m3", 2)] {
            clock.advance(3_000);
            assert!(r
                .handle(&whole_bucket(m))
                .await
                .unwrap()
                .batch_item_failures
                .is_empty());
            assert_eq!(r.gateway().refreshes().len(), sibling_calls);
        }
        assert_eq!(
            r.gateway().failed_calls().len(),
            1,
            "once per back-off step"
        );
        // Its wake-up: one call, which fails again and doubles the step.
        clock.advance(4_000);
        r.handle(&record("w1", wake.body())).await.unwrap();
        assert_eq!(r.gateway().failed_calls().len(), 2);
        let state = r.store().share(SHARE).unwrap();
        assert_eq!(state.failures, 2);
        assert_eq!(state.busy_until_ms, Some(clock.now_ms() + 20_000));
        // The gateway recovers: the next step's wake-up refreshes it, and resets the count.
        r.gateway().heal(SHARE);
        let (wake, delay) = wake_of(SHARE);
        assert_eq!(delay, 20);
        clock.advance(20_000);
        r.handle(&record("w2", wake.body())).await.unwrap();
        let last = r.gateway().refreshes().pop().unwrap();
        assert_eq!(
            (last.share_arn.as_str(), last.folders),
            (SHARE, vec!["/".to_string()])
        );
        let state = r.store().share(SHARE).unwrap();
        assert_eq!(state.failures, 0);
        assert!(state.pending.is_empty());
    }

    #[tokio::test]
    async fn not_found_for_a_share_that_the_map_still_lists_is_a_failed_call() {
        let (r, _clock) = refresher(0);
        r.gateway()
            .add_share(SIBLING, ShareKind::Nfs, "arn:aws:s3:::b1");
        r.gateway().fail_share(
            SHARE,
            GatewayError::ShareNotFound {
                share_arn: SHARE.into(),
                message: "The specified folder was not found".into(),
            },
        );
        let out = r.handle(&whole_bucket("m1")).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        // Not forgotten: its changes wait in its item, and none went to the sibling twice.
        let state = r.store().share(SHARE).unwrap();
        assert!(state.pending.contains(&Listing::subtree("/")));
        assert_eq!(state.failures, 1);
        assert_eq!(r.gateway().refreshes().len(), 1);
    }

    #[tokio::test]
    async fn no_call_is_started_too_near_the_deadline() {
        let (r, clock) = refresher(0);
        let out = r
            .handle_until(&whole_bucket("m1"), clock.now_ms() + 5_000)
            .await
            .unwrap();
        assert!(out.batch_item_failures.is_empty());
        assert!(r.gateway().refreshes().is_empty());
        let (wake, delay) = r.requeue().wakes().pop().unwrap();
        assert_eq!(delay, 1, "back at once, in an invocation with time");
        clock.advance(1_000);
        r.handle_until(&record("w", wake.body()), clock.now_ms() + 60_000)
            .await
            .unwrap();
        assert_eq!(r.gateway().refreshes().len(), 1);
        let state = r.store().share(SHARE).unwrap();
        assert_eq!(state.slots[0].claim_expires_at_ms, clock.now_ms() + 60_000);
    }

    #[tokio::test]
    async fn a_lease_that_ends_lists_its_folders_again() {
        let (r, clock) = refresher(0);
        r.handle(&whole_bucket("m1")).await.unwrap();
        let state = r.store().share(SHARE).unwrap();
        let lease_ends = state.slots[0].lease_ends_at_ms;
        assert_eq!(lease_ends, clock.now_ms() + MIN_SLOT_LEASE_MS);
        // No completion event ever comes; at the lease's end the folders are listed again.
        clock.advance(MIN_SLOT_LEASE_MS);
        r.handle(&record("w", {
            let (wake, _) = r
                .requeue()
                .wakes()
                .pop()
                .unwrap_or_else(|| panic!("a wake-up for the claim or the lease"));
            wake.body()
        }))
        .await
        .unwrap();
        let refreshes = r.gateway().refreshes();
        assert_eq!(refreshes.len(), 2);
        assert_eq!(refreshes[1].folders, refreshes[0].folders);
    }

    #[tokio::test]
    async fn a_gone_share_hands_its_pending_changes_to_its_successor() {
        let (r, clock) = refresher(60);
        r.handle(&whole_bucket("m1")).await.unwrap();
        clock.advance(1_000);
        r.handle(&whole_bucket("m2")).await.unwrap();
        let (wake, _) = r.requeue().wakes().pop().unwrap();
        // The share is deleted and recreated under a new ARN before the wake-up.
        r.gateway().remove_share(SHARE);
        let successor = "arn:aws:storagegateway:us-east-1:123456789012:share/share-2";
        r.gateway()
            .add_share(successor, ShareKind::Nfs, "arn:aws:s3:::b1");
        clock.advance(60_000);
        let out = r.handle(&record("w", wake.body())).await.unwrap();
        assert!(out.batch_item_failures.is_empty());
        let refreshes = r.gateway().refreshes();
        assert_eq!(
            refreshes.last().map(|p| p.share_arn.as_str()),
            Some(successor)
        );
        assert!(r.store().share(SHARE).unwrap().pending.is_empty());
    }
}
