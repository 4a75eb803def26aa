//! The staleness bound on the real stack (moto, the Storage Gateway stand-in and the
//! compiled `aggregator` and `refresher`): docs/protocol.md, "Per-share scheduling" and
//! "The staleness bound". Each test injects one fault that the bound's table says adds
//! nothing (or only its own term) on the share it hits, and never anything on its
//! siblings, and checks what reached the stand-in and what the table holds afterwards:
//!
//! * a gateway that fails every `RefreshCache` of one share: that share backs off
//!   alone (one call per back-off step, its changes kept in its item), the message
//!   succeeds, and the sibling share is refreshed within the bound;
//! * the lost write of a call's `NotificationId`: the completion event frees the slot
//!   by its folders and start time;
//! * a completion event whose `resources` lists the gateway before the share;
//! * a refresh accepted and never finished: the lease's end puts its folders back;
//! * keys of 1,000 bytes in many folders: every item stays within its budget;
//! * a share created after the refresher cached its share map.

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::types::{Message, QueueAttributeName};
use integration_tests::aws::{lambda_sqs_event, BoxError};
use integration_tests::counting_proxy::{CountingProxy, InjectedError};
use integration_tests::moto::Moto;
use integration_tests::runtime_api::{Invocation, LambdaProcess};
use integration_tests::sgw_standin::{BucketSource, InjectedFailure, RefreshRecord, ShareKind};
use integration_tests::stack::{RefreshRun, Stack, StackOptions};
use serde_json::Value;
use shared::s3_event::decode_notification;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

type Item = HashMap<String, AttributeValue>;

/// The terms of docs/protocol.md's bound, `B = W + m + H·S + k·(max(P, D) + S)`.
#[derive(Debug, Clone, Copy)]
struct BoundTerms {
    /// `REFRESH_DELAY_SECONDS`.
    window: Duration,
    /// The clock margin.
    margin: Duration,
    /// `ceil(W / 900)`.
    hops: u32,
    /// The SQS margin: how late a due message is processed.
    sqs: Duration,
    /// `MIN_REFRESH_INTERVAL_SECONDS` + m, or 0 when the interval is 0.
    pace: Duration,
    /// The gateway's own time to finish a refresh when both slots are in flight.
    both_slots: Duration,
    /// Calls the backlog needs before the change's chunk.
    calls: u32,
}

impl BoundTerms {
    fn bound(&self) -> Duration {
        self.window
            + self.margin
            + self.sqs * self.hops
            + (self.pace.max(self.both_slots) + self.sqs) * self.calls
    }
}

/// The harness's SQS margin S. The test's event source mapping polls the action queue
/// with 1-s long polls, one batch after the other, and moto makes a delayed message
/// visible at whole seconds; 3 s covers both with room for a slow machine (the
/// deployed mapping's S is 60 s).
const HARNESS_SQS_MARGIN: Duration = Duration::from_secs(3);

/// The clock margin of the refresher (`DEFAULT_CLOCK_MARGIN_MS`).
const CLOCK_MARGIN: Duration = Duration::from_secs(1);

/// The bound for the stacks of these tests: a 1-s window, no interval, refreshes of
/// 50 ms (never both slots in flight) and one chunk of backlog.
fn one_second_window_bound() -> BoundTerms {
    BoundTerms {
        window: Duration::from_secs(1),
        margin: CLOCK_MARGIN,
        hops: 1,
        sqs: HARNESS_SQS_MARGIN,
        pace: Duration::ZERO,
        both_slots: Duration::ZERO,
        calls: 1,
    }
}

/// The back-off after `failures` failed calls in a row: 10 s doubled per failure, at
/// most 15 minutes (docs/protocol.md, "Why these times").
fn backoff(failures: u32) -> Duration {
    let doubled = Duration::from_secs(10) * 2u32.pow(failures.saturating_sub(1).min(10));
    doubled.min(Duration::from_secs(15 * 60))
}

fn s3_arn(bucket: &str) -> String {
    format!("arn:aws:s3:::{bucket}")
}

/// A bucket whose notifications go to the stack's events queue; its `s3:TestEvent` is
/// consumed here, so later collections hold only object events.
async fn new_bucket(stack: &Stack, prefix: &str) -> Result<String, BoxError> {
    let bucket = stack.create_bucket(prefix).await?;
    let events = stack.collect_s3_events(1).await?;
    assert_eq!(events[0]["Event"], "s3:TestEvent", "{events:?}");
    Ok(bucket)
}

/// Puts `key`, collects moto's notification and gives it to the aggregator. Returns
/// the time just before the aggregator processed it (the bound's `t`, a little early).
async fn put_and_aggregate(stack: &Stack, bucket: &str, key: &str) -> Result<SystemTime, BoxError> {
    stack.clients.put_object(bucket, key).await?;
    let events = stack.collect_s3_events(1).await?;
    let at = SystemTime::now();
    let fed = stack.invoke_aggregator(&events).await?;
    assert!(fed.errors.is_empty(), "{:?}", fed.errors);
    Ok(at)
}

fn add_run(total: &mut RefreshRun, run: RefreshRun) {
    total.messages += run.messages;
    total.wake_ups += run.wake_ups;
    total.completion_events += run.completion_events;
    total.invocations += run.invocations;
    total.batch_item_failures += run.batch_item_failures;
    total.errors.extend(run.errors);
}

/// Runs the event source mapping, about a second per round, until `done` holds or
/// `timeout` passes; whether `done` held.
async fn drive_until(
    stack: &Stack,
    timeout: Duration,
    total: &mut RefreshRun,
    mut done: impl FnMut(&RefreshRun) -> bool,
) -> Result<bool, BoxError> {
    let deadline = Instant::now() + timeout;
    loop {
        if done(total) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        let run = stack
            .run_refresher(usize::MAX, Duration::from_millis(200))
            .await?;
        add_run(total, run);
    }
}

async fn share_item(stack: &Stack, share: &str) -> Result<Item, BoxError> {
    Ok(stack
        .clients
        .bucket_item(&stack.table, &format!("share#{share}"))
        .await?
        .ok_or_else(|| format!("no item for share {share}"))?)
}

fn num(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
}

fn pending(item: &Item) -> BTreeSet<String> {
    item.get("Pending")
        .and_then(|v| v.as_ss().ok())
        .map(|set| set.iter().cloned().collect())
        .unwrap_or_default()
}

fn slots(item: &Item) -> Vec<Item> {
    item.get("Slots")
        .and_then(|v| v.as_l().ok())
        .map(|list| {
            list.iter()
                .filter_map(|slot| slot.as_m().ok().cloned())
                .collect()
        })
        .unwrap_or_default()
}

fn folder_list(slot: &Item) -> Vec<String> {
    slot.get("FolderList")
        .and_then(|v| v.as_l().ok())
        .map(|list| list.iter().filter_map(|f| f.as_s().ok().cloned()).collect())
        .unwrap_or_default()
}

/// Accepted refreshes of `share`, in order.
fn refreshes_of(stack: &Stack, share: &str) -> Vec<RefreshRecord> {
    stack
        .gateway
        .refreshes()
        .into_iter()
        .filter(|r| r.share_arn == share)
        .collect()
}

/// Whether `record` lists `folder` ("/" or "/a/b", relative to the share root).
fn lists(record: &RefreshRecord, folder: &str) -> bool {
    record.folder_list.iter().any(|listed| {
        listed == folder
            || (record.recursive && (listed == "/" || folder.starts_with(&format!("{listed}/"))))
    })
}

/// The folder of `key` and its ancestors, in `FolderList` form.
fn folder_chain(key: &str) -> Vec<String> {
    let mut chain = vec!["/".to_string()];
    let parts: Vec<&str> = key.split('/').collect();
    for depth in 1..parts.len() {
        chain.push(format!("/{}", parts[..depth].join("/")));
    }
    chain
}

/// The first refresh of `share` that started after `after` and lists `key`'s folder
/// and every ancestor (a new folder shows only in its parent's listing).
fn covering(stack: &Stack, share: &str, key: &str, after: SystemTime) -> Option<RefreshRecord> {
    let chain = folder_chain(key);
    refreshes_of(stack, share)
        .into_iter()
        .find(|r| r.started_at > after && chain.iter().all(|f| lists(r, f)))
}

fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

/// `later - earlier` in seconds, negative when `later` is earlier.
fn secs_between(later: SystemTime, earlier: SystemTime) -> f64 {
    match later.duration_since(earlier) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}

fn epoch_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn set_visibility_timeout(stack: &Stack, seconds: u32) -> Result<(), BoxError> {
    stack
        .clients
        .sqs
        .set_queue_attributes()
        .queue_url(&stack.action_queue_url)
        .attributes(QueueAttributeName::VisibilityTimeout, seconds.to_string())
        .send()
        .await?;
    Ok(())
}

/// The sum of the metric `name` over the function-level EMF lines of `process` (the
/// lines without a `Bucket` dimension, so that per-bucket lines are not counted twice).
fn emf_total(process: &LambdaProcess, name: &str) -> f64 {
    process
        .output_lines()
        .iter()
        .filter(|l| l.starts_with("{\"_aws\""))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l.get("Bucket").is_none())
        .filter_map(|l| l.get(name).and_then(Value::as_f64))
        .sum()
}

/// DynamoDB's size of an attribute value (Developer Guide, "Item sizes and formats"):
/// strings and binaries their bytes, numbers 1 byte per two significant digits plus 1,
/// a list or map 3 bytes plus its elements (1 byte more per element, an upper bound),
/// a map's keys like attribute names.
fn value_size(value: &AttributeValue) -> usize {
    let number = |n: &str| {
        let digits = n
            .trim_start_matches('-')
            .replace('.', "")
            .trim_start_matches('0')
            .trim_end_matches('0')
            .len();
        digits.div_ceil(2) + 1
    };
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => number(n),
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Ss(set) => set.iter().map(String::len).sum(),
        AttributeValue::Ns(set) => set.iter().map(|n| number(n)).sum(),
        AttributeValue::Bs(set) => set.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::L(list) => 3 + list.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(k, v)| k.len() + value_size(v) + 1)
                .sum::<usize>()
        }
        _ => 0,
    }
}

/// DynamoDB's size of an item: its attribute names plus their values.
fn item_size(item: &Item) -> usize {
    item.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

/// Every item of the table, by key.
async fn scan_table(stack: &Stack) -> Result<BTreeMap<String, Item>, BoxError> {
    let mut items = BTreeMap::new();
    let mut start: Option<Item> = None;
    loop {
        let out = stack
            .clients
            .dynamodb
            .scan()
            .table_name(&stack.table)
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await?;
        for item in out.items() {
            let key = item
                .get("BucketName")
                .and_then(|k| k.as_s().ok())
                .cloned()
                .unwrap_or_default();
            items.insert(key, item.clone());
        }
        match out.last_evaluated_key() {
            Some(last) if !last.is_empty() => start = Some(last.clone()),
            _ => return Ok(items),
        }
    }
}

// ---------------------------------------------------------------------------------
// A gateway that fails every call of one share
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_share_backs_off_alone_and_its_sibling_is_refreshed_within_the_bound(
) -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "sibling").await?;
    let failing_gateway = stack.gateway.add_gateway("failing");
    let healthy_gateway = stack.gateway.add_gateway("healthy");
    // Both NFS, the failing one created first: `ListFileShares` lists shares in
    // creation order and the refresher describes NFS shares before SMB ones, so it
    // hands the window to the failing share first, then to the healthy one.
    let failing = stack
        .gateway
        .add_share(&failing_gateway, ShareKind::Nfs, &s3_arn(&bucket));
    let healthy = stack
        .gateway
        .add_share(&healthy_gateway, ShareKind::Nfs, &s3_arn(&bucket));
    stack
        .gateway
        .fail_refreshes_of(&failing, InjectedFailure::InternalError);

    let key = "data/report.csv";
    let processed_at = put_and_aggregate(&stack, &bucket, key).await?;
    // W = 1 s, m = 1 s, H = 1, S = 3 s, P = 0 (no interval), D = 0, k = 1:
    // B = 1 + 1 + 1·3 + 1·(max(0, 0) + 3) = 8 s.
    let terms = one_second_window_bound();
    let bound = terms.bound();
    assert_eq!(bound, Duration::from_secs(8), "{terms:?}");

    let mut total = RefreshRun::default();
    drive_until(&stack, bound + Duration::from_secs(2), &mut total, |_| {
        covering(&stack, &healthy, key, processed_at).is_some()
    })
    .await?;
    let healthy_call =
        covering(&stack, &healthy, key, processed_at).unwrap_or_else(|| {
            panic!(
            "the healthy share got no RefreshCache covering {key} within {:?} of its processing \
             (bound {bound:?} for {terms:?}); its calls: {:?}; the failing share's calls: {:?}; \
             batch item failures so far: {}",
            bound + Duration::from_secs(2),
            refreshes_of(&stack, &healthy),
            stack.gateway.refresh_calls_on(&failing)
                .iter()
                .map(|c| (c.status, c.at))
                .collect::<Vec<_>>(),
            total.batch_item_failures
        )
        });
    let first_failure = stack
        .gateway
        .refresh_calls_on(&failing)
        .first()
        .map(|c| c.at)
        .ok_or("the failing share was never called")?;
    assert!(
        first_failure <= healthy_call.started_at,
        "the window is handed to the failing share first (the premise of this test)"
    );
    let staleness = since(healthy_call.started_at, processed_at);
    println!("the healthy share's covering call started {staleness:?} after t (bound {bound:?})");
    assert!(
        staleness <= bound,
        "the healthy share's call started {staleness:?} after t, past the bound {bound:?}"
    );
    assert!(total.messages >= 1, "the window's message was handled");
    assert_eq!(
        total.batch_item_failures, 0,
        "the window's message succeeds although a share's call failed: {total:?}"
    );
    assert!(total.errors.is_empty(), "{:?}", total.errors);

    // The failing share was called once, and holds the changes with its back-off.
    let first_calls = stack.gateway.refresh_calls_on(&failing);
    assert_eq!(
        first_calls.len(),
        1,
        "one attempt per back-off step (no SDK retries): {:?}",
        first_calls
            .iter()
            .map(|c| (c.status, c.at))
            .collect::<Vec<_>>()
    );
    assert_eq!(first_calls[0].status, 500);
    assert!(first_calls[0].injected);
    let item = share_item(&stack, &failing).await?;
    let held = pending(&item);
    for folder in folder_chain(key) {
        assert!(
            held.contains(&folder),
            "the failing share's item keeps {folder} pending: {held:?}"
        );
    }
    assert!(
        slots(&item).is_empty(),
        "no slot for a failed call: {item:?}"
    );
    assert_eq!(num(&item, "Failures"), Some(1), "{item:?}");
    let last_call = num(&item, "LastCallAt").ok_or("no LastCallAt")?;
    assert_eq!(
        num(&item, "BusyUntil"),
        Some(last_call + 10_000),
        "the first back-off step is 10 s: {item:?}"
    );

    // Over the next step, the share is called once more, when the step ends.
    let seen = drive_until(
        &stack,
        backoff(1) + HARNESS_SQS_MARGIN + Duration::from_secs(3),
        &mut total,
        |_| stack.gateway.refresh_calls_on(&failing).len() >= 2,
    )
    .await?;
    let calls = stack.gateway.refresh_calls_on(&failing);
    assert!(seen, "the failing share's wake-up brought no second call");
    assert_eq!(calls.len(), 2, "{calls:?}");
    let gap = secs_between(calls[1].at, calls[0].at);
    println!("the failing share's second call came {gap:.3} s after the first");
    assert!(
        gap >= backoff(1).as_secs_f64() - 0.5,
        "called again {gap:.3} s after a failure, before the 10-s back-off ended"
    );
    assert!(
        gap <= (backoff(1) + HARNESS_SQS_MARGIN).as_secs_f64(),
        "the back-off's wake-up came {gap:.3} s after the failure"
    );
    let item = share_item(&stack, &failing).await?;
    assert_eq!(num(&item, "Failures"), Some(2), "{item:?}");
    let last_call = num(&item, "LastCallAt").ok_or("no LastCallAt")?;
    assert_eq!(
        num(&item, "BusyUntil"),
        Some(last_call + 20_000),
        "the second step is 20 s: {item:?}"
    );
    assert!(pending(&item).contains("/data"), "{item:?}");

    // The gateway recovers: the share's refresh comes when the running step ends,
    // not before, and no later than one step (plus S).
    stack.gateway.clear_refresh_failures_of(&failing);
    let recovered = drive_until(
        &stack,
        backoff(2) + HARNESS_SQS_MARGIN + Duration::from_secs(3),
        &mut total,
        |_| covering(&stack, &failing, key, processed_at).is_some(),
    )
    .await?;
    let calls = stack.gateway.refresh_calls_on(&failing);
    assert!(
        recovered,
        "no refresh of the recovered share within one back-off step: {calls:?}"
    );
    let fixed = covering(&stack, &failing, key, processed_at).ok_or("no covering refresh")?;
    let wait = secs_between(fixed.started_at, calls[1].at);
    println!("the recovered share's refresh came {wait:.3} s after its last failed call");
    assert!(
        wait >= backoff(2).as_secs_f64() - 0.5,
        "called {wait:.3} s after the second failure, before the 20-s step ended"
    );
    assert!(
        wait <= (backoff(2) + HARNESS_SQS_MARGIN).as_secs_f64(),
        "the recovered share waited {wait:.3} s, more than one back-off step"
    );
    assert_eq!(
        calls.len(),
        3,
        "one call per back-off step over {:.1} s: {:?}",
        secs_between(fixed.started_at, calls[0].at),
        calls.iter().map(|c| (c.status, c.at)).collect::<Vec<_>>()
    );
    assert_eq!(
        refreshes_of(&stack, &healthy).len(),
        1,
        "the healthy share was refreshed once"
    );
    assert_eq!(total.batch_item_failures, 0, "{total:?}");
    assert!(
        total.wake_ups >= 2,
        "the back-off steps came as wake-ups: {total:?}"
    );
    let item = share_item(&stack, &failing).await?;
    assert!(pending(&item).is_empty(), "{item:?}");
    assert_eq!(
        num(&item, "Failures"),
        None,
        "a started call resets the back-off"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// The lost write of a call's NotificationId
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_events_free_the_slots_whose_notification_id_write_was_lost(
) -> Result<(), BoxError> {
    let moto = Moto::start().await?;
    let dynamodb = CountingProxy::start(moto.endpoint()).await?;
    let stack = Stack::start_with_moto(
        moto,
        StackOptions {
            refresh_delay_seconds: 1,
            extra_env: vec![("AWS_ENDPOINT_URL_DYNAMODB".into(), dynamodb.endpoint())],
            ..Default::default()
        },
    )
    .await?;
    // A failed message stays away for the rest of the test.
    set_visibility_timeout(&stack, 300).await?;
    let bucket = new_bucket(&stack, "lost-id").await?;
    let gateway = stack.gateway.add_gateway("gw");
    let share = stack
        .gateway
        .add_share(&gateway, ShareKind::Nfs, &s3_arn(&bucket));
    // Both calls are in flight before either completes.
    stack.gateway.hold_refreshes_of(&share, true);
    // The refresher's PutItem that records a call's notification id is lost, twice:
    // the only share-item writes that name a `NotificationId` before any completion.
    dynamodb.fail_next_matching(
        "PutItem",
        "\"NotificationId\"",
        2,
        InjectedError::validation("injected: the write that records the call is lost"),
    );

    for (n, key) in ["one/a.dat", "two/b.dat"].iter().enumerate() {
        put_and_aggregate(&stack, &bucket, key).await?;
        let run = stack.run_refresher(1, stack.window_wait()).await?;
        assert_eq!(run.messages, 1, "{run:?}");
        assert_eq!(refreshes_of(&stack, &share).len(), n + 1, "call {}", n + 1);
        assert_eq!(
            dynamodb.injected_failures().len(),
            n + 1,
            "the write of call {}'s id was refused",
            n + 1
        );
    }
    let item = share_item(&stack, &share).await?;
    let taken = slots(&item);
    assert_eq!(taken.len(), 2, "two claims: {item:?}");
    assert!(
        taken.iter().all(|s| !s.contains_key("NotificationId")),
        "neither call's id was recorded: {item:?}"
    );

    // Both refreshes complete and their events come.
    stack.gateway.hold_refreshes_of(&share, false);
    stack.gateway.complete_refreshes();
    let events = stack
        .gateway
        .wait_for_completion_events(2, Duration::from_secs(15))
        .await;
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|e| e.event_ids.len() == 1), "{events:?}");
    let mut total = RefreshRun::default();
    drive_until(&stack, Duration::from_secs(15), &mut total, |run| {
        run.completion_events >= 2
    })
    .await?;
    assert_eq!(total.completion_events, 2, "{total:?}");
    let item = share_item(&stack, &share).await?;
    assert!(
        slots(&item).is_empty(),
        "the completion events freed the claims by their folders and start times; still taken: {:?}",
        slots(&item)
    );

    // A later change is called at once, not after a lease.
    let third = "three/c.dat";
    let processed_at = put_and_aggregate(&stack, &bucket, third).await?;
    let bound = one_second_window_bound().bound();
    drive_until(&stack, bound + Duration::from_secs(2), &mut total, |_| {
        covering(&stack, &share, third, processed_at).is_some()
    })
    .await?;
    let call = covering(&stack, &share, third, processed_at).unwrap_or_else(|| {
        panic!(
            "no call covered {third} within {bound:?}: {:?}",
            refreshes_of(&stack, &share)
        )
    });
    assert!(since(call.started_at, processed_at) <= bound);
    assert_eq!(stack.gateway.rejected_refreshes(), 0);
    Ok(())
}

// ---------------------------------------------------------------------------------
// A completion event that lists the gateway before the share
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_event_listing_the_gateway_first_frees_its_slot() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "gw-first").await?;
    let gateway = stack.gateway.add_gateway("gw");
    let share = stack
        .gateway
        .add_share(&gateway, ShareKind::Nfs, &s3_arn(&bucket));
    stack.gateway.set_gateway_first_in_events(true);

    put_and_aggregate(&stack, &bucket, "x/a.dat").await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    let refreshes = refreshes_of(&stack, &share);
    assert_eq!(refreshes.len(), 1);
    let item = share_item(&stack, &share).await?;
    let taken = slots(&item);
    assert_eq!(taken.len(), 1, "{item:?}");
    assert_eq!(
        taken[0].get("NotificationId").and_then(|v| v.as_s().ok()),
        Some(&refreshes[0].notification_id)
    );

    let events = stack
        .gateway
        .wait_for_completion_events(1, Duration::from_secs(10))
        .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].resources,
        [gateway.clone(), share.clone()],
        "the event lists the gateway first"
    );
    assert_eq!(events[0].event_ids.len(), 1, "{events:?}");
    let mut total = RefreshRun::default();
    drive_until(&stack, Duration::from_secs(15), &mut total, |run| {
        run.completion_events >= 1
    })
    .await?;
    assert_eq!(total.completion_events, 1, "{total:?}");
    assert_eq!(total.batch_item_failures, 0, "{total:?}");
    let item = share_item(&stack, &share).await?;
    assert!(
        slots(&item).is_empty(),
        "the event freed the slot: {:?}",
        slots(&item)
    );
    assert!(
        item.contains_key("LastCompletedAt"),
        "the completion is recorded: {item:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// A refresh accepted and never finished
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ends_puts_its_folders_back_and_they_are_listed_again() -> Result<(), BoxError>
{
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "lease").await?;
    let gateway = stack.gateway.add_gateway("gw");
    let share = stack
        .gateway
        .add_share(&gateway, ShareKind::Nfs, &s3_arn(&bucket));
    // The gateway accepts the share's refreshes and never finishes them (it restarted
    // mid-refresh): no completion event comes.
    stack.gateway.hold_refreshes_of(&share, true);

    let first = "first/a.dat";
    put_and_aggregate(&stack, &bucket, first).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    let refreshes = refreshes_of(&stack, &share);
    assert_eq!(refreshes.len(), 1);
    assert!(folder_chain(first).iter().all(|f| lists(&refreshes[0], f)));
    let item = share_item(&stack, &share).await?;
    let taken = slots(&item);
    assert_eq!(taken.len(), 1, "{item:?}");
    let claimed_at = num(&taken[0], "ClaimedAt").ok_or("no ClaimedAt")?;
    let lease_ends_at = num(&taken[0], "LeaseEndsAt");
    let version = item.get("Version").cloned().ok_or("no Version")?;

    // The lease ends: LeaseEndsAt moves into the past, as the clock would move it
    // 20 minutes on (a write like the refresher's: conditional on the version, which
    // it increments).
    let past = epoch_ms(SystemTime::now()) - 1_000;
    stack
        .clients
        .dynamodb
        .update_item()
        .table_name(&stack.table)
        .key("BucketName", AttributeValue::S(format!("share#{share}")))
        .update_expression("SET Slots[0].LeaseEndsAt = :past, Version = Version + :one")
        .condition_expression("Version = :v AND Slots[0].NotificationId = :id")
        .expression_attribute_values(":past", AttributeValue::N(past.to_string()))
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .expression_attribute_values(":v", version)
        .expression_attribute_values(
            ":id",
            AttributeValue::S(refreshes[0].notification_id.clone()),
        )
        .send()
        .await?;

    // The next message that reaches the share (a window for another folder) finds the
    // lease ended: the folders of the refresh that never finished are listed again.
    let second = "second/b.dat";
    put_and_aggregate(&stack, &bucket, second).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    let refreshes = refreshes_of(&stack, &share);
    assert_eq!(refreshes.len(), 2, "{refreshes:?}");
    for folder in folder_chain(first).iter().chain(&folder_chain(second)) {
        assert!(
            lists(&refreshes[1], folder),
            "the call after the lease lists {folder} (again): {:?}",
            refreshes[1].folder_list
        );
    }
    let leases_ended = emf_total(&stack.refresher, "LeasesEnded");
    assert!(
        leases_ended >= 1.0,
        "the refresher counts the ended lease (LeasesEnded = {leases_ended})"
    );
    let item = share_item(&stack, &share).await?;
    let taken = slots(&item);
    assert_eq!(taken.len(), 1, "only the new call holds a slot: {item:?}");
    assert_eq!(
        taken[0].get("NotificationId").and_then(|v| v.as_s().ok()),
        Some(&refreshes[1].notification_id)
    );
    assert!(pending(&item).is_empty(), "{item:?}");
    // The lease the refresher gave the first call: at least 20 minutes (its
    // refreshes have no recorded duration yet).
    let lease = lease_ends_at.ok_or("the slot had no LeaseEndsAt")? - claimed_at;
    assert!(lease >= 20 * 60 * 1000, "a lease of {lease} ms");
    let again = folder_list(&taken[0]);
    assert!(again.contains(&"/first".to_string()), "{again:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// Keys of 1,000 bytes in many folders
// ---------------------------------------------------------------------------------

/// Folders per window: each is a window entry of about 1 KB, and a window of this many
/// keeps the bucket item under the 128-KB check below.
const LONG_FOLDERS_PER_WINDOW: usize = 100;
const LONG_WINDOWS: usize = 5;
/// `MIN_REFRESH_INTERVAL_SECONDS` of the size test: long enough that every window
/// is handed to the share before its second call (they take about 6 s).
const LONG_KEYS_INTERVAL_SECONDS: u32 = 20;
/// The largest item the test accepts (DynamoDB's limit is 400 KB).
const ITEM_SIZE_LIMIT: usize = 128 * 1024;

fn long_folder(i: usize) -> String {
    format!("{i:04}-{}", "f".repeat(995))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_stay_within_their_budgets_with_1000_byte_folder_names() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        min_refresh_interval_seconds: LONG_KEYS_INTERVAL_SECONDS,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "long-keys").await?;
    stack
        .gateway
        .set_bucket_source(&bucket, BucketSource::S3(stack.clients.s3.clone()));
    let gateway = stack.gateway.add_gateway("gw");
    let share = stack
        .gateway
        .add_share(&gateway, ShareKind::Nfs, &s3_arn(&bucket));

    // One object per folder. The first one's notification is moto's own; the others
    // are written with the notifications off (receiving 500 of them from moto takes
    // longer than the rest of the test) and get a copy of it with their key, which is
    // all the aggregator reads of an object event.
    let setup = Instant::now();
    let total_folders = LONG_FOLDERS_PER_WINDOW * LONG_WINDOWS;
    let key_of = |i: usize| format!("{}/o", long_folder(i));
    let mut writes: Vec<(String, SystemTime)> = vec![(key_of(0), SystemTime::now())];
    stack.clients.put_object(&bucket, &key_of(0)).await?;
    let template = stack.collect_s3_events(1).await?.remove(0);
    assert_eq!(
        decode_notification(&template)?.changes[0].key.as_deref(),
        Some(key_of(0).as_str())
    );
    stack
        .clients
        .s3
        .put_bucket_notification_configuration()
        .bucket(&bucket)
        .notification_configuration(aws_sdk_s3::types::NotificationConfiguration::builder().build())
        .send()
        .await?;
    let mut writers = tokio::task::JoinSet::new();
    for lane in 0..8 {
        let clients = stack.clients.clone();
        let bucket = bucket.clone();
        writers.spawn(async move {
            let mut written = Vec::new();
            for i in (1 + lane..total_folders).step_by(8) {
                let key = format!("{}/o", long_folder(i));
                let at = SystemTime::now();
                clients.put_object(&bucket, &key).await?;
                written.push((key, at));
            }
            Ok::<_, BoxError>(written)
        });
    }
    while let Some(done) = writers.join_next().await {
        writes.extend(done??);
    }
    assert_eq!(writes.len(), total_folders);
    assert!(writes.iter().all(|(k, _)| k.len() == 1002));
    println!("{total_folders} objects written in {:?}", setup.elapsed());
    // The notifications, window by window (folder i is in window i / 100).
    let mut by_window: Vec<Vec<Message>> = vec![Vec::new(); LONG_WINDOWS];
    for i in 0..total_folders {
        let mut event = template.clone();
        event["Records"][0]["s3"]["object"]["key"] = Value::String(key_of(i));
        let message = Message::builder()
            .message_id(format!("event-{i}"))
            .receipt_handle(format!("handle-{i}"))
            .body(event.to_string())
            .build();
        by_window[i / LONG_FOLDERS_PER_WINDOW].push(message);
    }
    let events_queue_arn = stack.events_queue_arn().await?;

    // One ingest batch per window, each window closed and handed to the share before
    // the next opens: with the 20-s interval, the share's first call takes the first
    // window at once and every later window waits in its item for the second call.
    let mut total = RefreshRun::default();
    let started = Instant::now();
    for (n, window) in by_window.iter().enumerate() {
        let event = lambda_sqs_event(window, &events_queue_arn);
        match stack.aggregator.invoke(event).await? {
            Invocation::Response(answer) => assert_eq!(
                answer["batchItemFailures"],
                serde_json::json!([]),
                "window {}",
                n + 1
            ),
            Invocation::Error {
                error_type,
                error_message,
            } => panic!("window {}: {error_type}: {error_message}", n + 1),
        }
        let run = stack.run_refresher(1, stack.window_wait()).await?;
        assert_eq!(run.messages, 1, "window {}: {run:?}", n + 1);
        add_run(&mut total, run);
        assert_eq!(
            total.batch_item_failures,
            0,
            "the message of window {} failed: {:?}; refresher output: {:?}",
            n + 1,
            total.errors,
            stack
                .refresher
                .output_lines()
                .iter()
                .filter_map(|l| l.split_once(" error="))
                .map(|(_, error)| error.chars().take(300).collect::<String>())
                .collect::<Vec<_>>()
        );
    }
    let handed_in = started.elapsed();
    println!("{LONG_WINDOWS} windows handed to the share in {handed_in:?}");
    assert!(
        handed_in < Duration::from_secs(u64::from(LONG_KEYS_INTERVAL_SECONDS)),
        "the windows must reach the share within one interval for the test to mean anything"
    );
    assert_eq!(
        refreshes_of(&stack, &share).len(),
        1,
        "one call before the interval passed"
    );
    let sizes_now = scan_table(&stack).await?;
    let largest_then = sizes_now.values().map(item_size).max().unwrap_or(0);

    // Then until the share has nothing pending and nothing in flight, and nothing on
    // the action queue is due (each call leaves a wake-up for its lease's end, 20
    // minutes on, which finds nothing to do once the completion freed the slot).
    let deadline = Instant::now() + Duration::from_secs(u64::from(LONG_KEYS_INTERVAL_SECONDS) + 30);
    loop {
        let run = stack
            .run_refresher(usize::MAX, Duration::from_millis(500))
            .await?;
        add_run(&mut total, run);
        let item = share_item(&stack, &share).await?;
        let (visible, _) = stack.clients.queue_depth(&stack.action_queue_url).await?;
        if pending(&item).is_empty() && slots(&item).is_empty() && visible == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "share still has {} pending and {} in flight, {visible} messages visible",
            pending(&item).len(),
            slots(&item).len()
        );
    }
    assert_eq!(total.batch_item_failures, 0, "{total:?}");
    assert!(total.errors.is_empty(), "{:?}", total.errors);

    // Every item is within budget.
    let items = scan_table(&stack).await?;
    for (key, item) in &items {
        let size = item_size(item);
        println!(
            "item {}: {size} bytes",
            key.chars().take(80).collect::<String>()
        );
        assert!(
            size < ITEM_SIZE_LIMIT,
            "item {key} is {size} bytes, over {ITEM_SIZE_LIMIT}"
        );
    }
    assert!(
        largest_then < ITEM_SIZE_LIMIT,
        "an item reached {largest_then} bytes"
    );
    assert!(items.contains_key(&format!("share#{share}")));

    // Every object's folder, and the root, listed by a call that started after the
    // write; and the share shows the bucket.
    let records = refreshes_of(&stack, &share);
    println!(
        "{} calls: {:?}",
        records.len(),
        records
            .iter()
            .map(|r| (
                r.folder_list
                    .iter()
                    .map(|f| f.chars().take(12).collect::<String>())
                    .collect::<Vec<_>>(),
                r.recursive
            ))
            .collect::<Vec<_>>()
    );
    for (key, at) in &writes {
        for folder in folder_chain(key) {
            assert!(
                records
                    .iter()
                    .any(|r| r.started_at > *at && lists(r, &folder)),
                "{} of {} not refreshed after the write",
                folder.chars().take(20).collect::<String>(),
                key.chars().take(20).collect::<String>()
            );
        }
    }
    let keys: BTreeSet<String> = writes.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        stack.gateway.share_view(&share),
        keys,
        "the share shows every object"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// A share created after the share map was cached
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_created_after_the_map_was_cached_is_refreshed() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    let bucket = new_bucket(&stack, "new-share").await?;
    let gateway = stack.gateway.add_gateway("gw-1");
    let old = stack
        .gateway
        .add_share(&gateway, ShareKind::Nfs, &s3_arn(&bucket));

    // A window warms the refresher: its share map is cached.
    put_and_aggregate(&stack, &bucket, "one/a.dat").await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    assert_eq!(refreshes_of(&stack, &old).len(), 1);
    let listed_before = stack.gateway.calls_to("ListFileShares");
    assert!(listed_before >= 1);

    // A share created now, on another gateway, then a change of the bucket.
    let other = stack.gateway.add_gateway("gw-2");
    let new = stack
        .gateway
        .add_share(&other, ShareKind::Smb, &s3_arn(&bucket));
    let key = "two/b.dat";
    let processed_at = put_and_aggregate(&stack, &bucket, key).await?;
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    let call = covering(&stack, &new, key, processed_at).unwrap_or_else(|| {
        panic!(
            "the new share got no RefreshCache covering {key}: {:?} (ListFileShares calls: {} before, {} after)",
            refreshes_of(&stack, &new),
            listed_before,
            stack.gateway.calls_to("ListFileShares")
        )
    });
    assert!(since(call.started_at, processed_at) <= one_second_window_bound().bound());
    assert!(covering(&stack, &old, key, processed_at).is_some());
    Ok(())
}
