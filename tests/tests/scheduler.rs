//! The refresher as a per-share scheduler, through the binaries: real S3 events from
//! moto, the compiled `aggregator` and `refresher`, and the Storage Gateway stand-in in
//! strict mode (a call sooner than the interval after the previous one, or a third in
//! flight, is rejected) whose refresh-complete events reach the action queue through
//! moto's EventBridge, as the gateway's reach it through the stack's rule.

use integration_tests::aws::BoxError;
use integration_tests::sgw_standin::{BucketSource, RefreshRecord, ShareKind};
use integration_tests::stack::{Stack, StackOptions};
use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

/// `MIN_REFRESH_INTERVAL_SECONDS`, shortened from 60 for the test.
const INTERVAL_SECONDS: u64 = 3;

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

async fn share_item(
    stack: &Stack,
    share: &str,
) -> Result<
    Option<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>,
    BoxError,
> {
    stack
        .clients
        .bucket_item(&stack.table, &format!("share#{share}"))
        .await
}

/// Pending listings and taken slots of the share's item.
async fn share_backlog(stack: &Stack, share: &str) -> Result<(usize, usize), BoxError> {
    let Some(item) = share_item(stack, share).await? else {
        return Ok((0, 0));
    };
    let pending = item
        .get("Pending")
        .and_then(|v| v.as_ss().ok())
        .map_or(0, Vec::len);
    let slots = item
        .get("Slots")
        .and_then(|v| v.as_l().ok())
        .map_or(0, Vec::len);
    Ok((pending, slots))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_writes_are_paced_never_throttled_and_all_refreshed() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        min_refresh_interval_seconds: INTERVAL_SECONDS as u32,
        ..Default::default()
    })
    .await?;
    // Refreshes take long enough to overlap, so both slots get used.
    stack
        .gateway
        .set_strict_limits(Some(Duration::from_secs(INTERVAL_SECONDS)));
    stack
        .gateway
        .set_refresh_duration(Duration::from_millis(2_500));
    let bucket = stack.create_bucket("paced").await?;
    let events = stack.collect_s3_events(1).await?;
    assert_eq!(events[0]["Event"], "s3:TestEvent", "{events:?}");
    stack
        .gateway
        .set_bucket_source(&bucket, BucketSource::S3(stack.clients.s3.clone()));
    let gateway = stack.gateway.add_gateway("paced");
    let share =
        stack
            .gateway
            .add_share(&gateway, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}"));

    // Steady writes for about 12 s: a new object every iteration, in changing folders,
    // with the event source mapping draining the action queue in between.
    let mut writes: Vec<(String, SystemTime)> = Vec::new();
    let writing_until = Instant::now() + Duration::from_secs(12);
    let mut i = 0;
    while Instant::now() < writing_until {
        let key = format!("f{}/s{}/obj-{i:03}.dat", i % 4, i % 3);
        let at = SystemTime::now();
        stack.clients.put_object(&bucket, &key).await?;
        writes.push((key, at));
        let fed = stack.feed_s3_events(1).await?;
        assert!(fed.errors.is_empty(), "{:?}", fed.errors);
        let run = stack
            .run_refresher(usize::MAX, Duration::from_millis(300))
            .await?;
        assert!(run.errors.is_empty(), "{:?}", run.errors);
        i += 1;
    }
    // Then until the share has nothing pending and nothing in flight.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let run = stack
            .run_refresher(usize::MAX, Duration::from_secs(2))
            .await?;
        assert!(run.errors.is_empty(), "{:?}", run.errors);
        let (pending, slots) = share_backlog(&stack, &share).await?;
        // Delayed messages may remain: each call's wake-up for its lease end, which
        // finds nothing to do once the completion event freed the slot.
        let left = stack.work_left().await?;
        if pending == 0 && slots == 0 && left.is_done() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "share still has {pending} pending and {slots} in flight, left {left:?}"
        );
    }

    let records: Vec<RefreshRecord> = stack
        .gateway
        .refreshes()
        .into_iter()
        .filter(|r| r.share_arn == share)
        .collect();
    let windows = stack
        .clients
        .bucket_item(&stack.table, &bucket)
        .await?
        .and_then(|item| item.get("Generation").and_then(|g| g.as_n().ok()).cloned())
        .and_then(|g| g.parse::<usize>().ok())
        .unwrap_or(0);
    println!(
        "{} writes, {windows} windows, {} RefreshCache calls",
        writes.len(),
        records.len()
    );
    assert!(writes.len() >= 8, "only {} writes", writes.len());
    assert!(
        records.len() < windows,
        "pacing merges windows: {} calls for {windows} windows",
        records.len()
    );

    // Calls on the share at least the interval apart, and nothing throttled.
    let mut starts: Vec<SystemTime> = records.iter().map(|r| r.started_at).collect();
    starts.sort();
    for pair in starts.windows(2) {
        let gap = pair[1].duration_since(pair[0]).unwrap_or_default();
        assert!(
            gap >= Duration::from_secs(INTERVAL_SECONDS),
            "two calls {gap:?} apart"
        );
    }
    assert_eq!(stack.gateway.interval_violations(), 0);
    assert_eq!(
        stack.gateway.rejected_refreshes(),
        0,
        "a call was throttled"
    );

    // Every write is covered by refreshes that started after it: its folder and each
    // ancestor (the folders are new, so each must show in its parent's listing).
    for (key, at) in &writes {
        for folder in folder_chain(key) {
            assert!(
                records
                    .iter()
                    .any(|r| r.started_at > *at && lists(r, &folder)),
                "{folder} of {key} (written {at:?}) not refreshed after the write; refreshes: {:?}",
                records
                    .iter()
                    .map(|r| (&r.folder_list, r.started_at))
                    .collect::<Vec<_>>()
            );
        }
    }
    let keys: BTreeSet<String> = writes.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        stack.gateway.share_view(&share),
        keys,
        "the share shows every write"
    );

    // Every completion event was consumed: each freed its slot (the lease is hours),
    // and the action queue is empty.
    let completions = stack.gateway.completion_events();
    assert_eq!(completions.len(), records.len());
    assert!(
        completions
            .iter()
            .all(|c| c.copies == 1 && c.errors.is_empty()),
        "{completions:?}"
    );
    assert_eq!(share_backlog(&stack, &share).await?, (0, 0));
    let item = share_item(&stack, &share).await?.ok_or("no share item")?;
    assert!(
        item.contains_key("LastStalenessMs"),
        "a completion recorded its staleness: {item:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_completion_event_leaves_the_other_slot_working() -> Result<(), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 1,
        ..Default::default()
    })
    .await?;
    stack.gateway.set_strict_limits(None);
    let bucket = stack.create_bucket("lost").await?;
    stack.collect_s3_events(1).await?;
    let gateway = stack.gateway.add_gateway("lost");
    let share =
        stack
            .gateway
            .add_share(&gateway, ShareKind::Nfs, &format!("arn:aws:s3:::{bucket}"));
    stack.gateway.drop_next_completion_events(1);
    for n in 0..3 {
        stack
            .clients
            .put_object(&bucket, &format!("d{n}/x.dat"))
            .await?;
        stack.feed_s3_events(1).await?;
        // The window ends, its message comes, and its refresh completes.
        let run = stack
            .run_refresher(usize::MAX, Duration::from_secs(4))
            .await?;
        assert!(run.errors.is_empty(), "{:?}", run.errors);
    }
    let records: Vec<RefreshRecord> = stack
        .gateway
        .refreshes()
        .into_iter()
        .filter(|r| r.share_arn == share)
        .collect();
    // The first event was lost: its slot waits for its lease, the other slot carried
    // the second and third windows.
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(share_backlog(&stack, &share).await?, (0, 1));
    assert_eq!(stack.gateway.rejected_refreshes(), 0);
    Ok(())
}
