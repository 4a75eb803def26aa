//! Folder-targeted refreshes on the real stack: moto's S3 (real objects, real event
//! JSON), the compiled `aggregator` and `refresher`, and the Storage Gateway stand-in
//! with its cache model listing moto's S3 (`BucketSource::S3`).
//!
//! What a share shows is the stand-in's `share_view`: the keys a client reaches by
//! walking the share's cached listings from its root. Before a refresh it is stale;
//! after the refresh that the product plans from the window's folders, it must equal
//! the bucket under the share's prefix, at a small fraction of the listing work of a
//! recursive refresh of the whole share.
//!
//! The last test counts, at the wire, the DynamoDB and SQS requests that a warm
//! aggregator container makes for a burst of events.

use integration_tests::aws::BoxError;
use integration_tests::bucket_model::BucketModel;
use integration_tests::counting_proxy::CountingProxy;
use integration_tests::moto::Moto;
use integration_tests::sgw_standin::{BucketSource, ListingWork, RefreshRecord, ShareKind};
use integration_tests::stack::{Stack, StackOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

fn s3_arn(bucket: &str, prefix: &str) -> String {
    if prefix.is_empty() {
        format!("arn:aws:s3:::{bucket}")
    } else {
        format!("arn:aws:s3:::{bucket}/{prefix}")
    }
}

/// The bucket's `s3:TestEvent` (from turning notifications on) is consumed here, so
/// later collections hold only object events.
async fn consume_test_event(stack: &Stack) -> Result<(), BoxError> {
    let events = stack.collect_s3_events(1).await?;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["Event"], "s3:TestEvent", "{events:?}");
    Ok(())
}

fn under(keys: &BTreeSet<String>, prefix: &str) -> BTreeSet<String> {
    keys.iter()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect()
}

fn sorted(list: &[String]) -> Vec<String> {
    let mut list = list.to_vec();
    list.sort();
    list
}

fn strings(list: &[&str]) -> Vec<String> {
    sorted(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
}

fn refreshes_of(stack: &Stack, share: &str) -> Vec<RefreshRecord> {
    stack
        .gateway
        .refreshes()
        .into_iter()
        .filter(|r| r.share_arn == share)
        .collect()
}

/// The `Folders` string set of the bucket's item, sorted.
async fn item_folders(stack: &Stack, bucket: &str) -> Result<Vec<String>, BoxError> {
    let item = stack
        .clients
        .bucket_item(&stack.table, bucket)
        .await?
        .ok_or_else(|| format!("no window item for {bucket}"))?;
    Ok(sorted(item["Folders"].as_ss().map_err(|_| "no Folders")?))
}

/// The listing work the refreshes in `records` must cost, computed independently from
/// the bucket's final contents (an in-memory `ListObjectsV2` of each folder).
fn expected_work(
    keys: &BTreeSet<String>,
    share_prefix: &str,
    records: &[RefreshRecord],
) -> ListingWork {
    let model = BucketModel::new();
    for key in keys {
        model.put(key.clone());
    }
    let mut work = ListingWork::default();
    for record in records {
        for folder in &record.folder_list {
            let rel = folder.trim_start_matches('/');
            let prefix = if rel.is_empty() {
                share_prefix.to_string()
            } else {
                format!("{share_prefix}{rel}/")
            };
            let listing = model.list(&prefix, !record.recursive);
            work.objects_listed += listing.objects.len() as u64;
            work.prefixes_listed += listing.prefixes.len() as u64;
            work.list_requests += listing.requests;
        }
    }
    work
}

/// What one recursive refresh of the whole share would cost.
fn full_work(keys: &BTreeSet<String>, share_prefix: &str) -> ListingWork {
    let objects = under(keys, share_prefix).len();
    ListingWork {
        objects_listed: objects as u64,
        prefixes_listed: 0,
        list_requests: objects.div_ceil(1000).max(1) as u64,
    }
}

fn entries(work: ListingWork) -> u64 {
    work.objects_listed + work.prefixes_listed
}

/// The bucket before the test's changes: a few top folders, subfolders, and most of
/// the objects in folders that no change touches.
fn existing_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "readme.txt",
        "data/a/1.txt",
        "data/a/2.txt",
        "data/a/sub/3.txt",
        "data/b/4.txt",
        "data/b/deep/er/5.txt",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    keys.extend((0..40).map(|i| format!("data/c/{i:02}.csv")));
    for month in 1..=12 {
        keys.extend((0..10).map(|i| format!("logs/2026/{month:02}/app-{i}.log")));
    }
    keys.extend((0..20).map(|i| format!("media/img/{i:02}.png")));
    keys
}

#[tokio::test]
async fn each_share_refreshes_only_the_changed_folders_and_their_ancestors() -> Result<(), BoxError>
{
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 2,
        ..Default::default()
    })
    .await?;
    let existing = existing_keys();
    let bucket = stack
        .create_bucket_with_objects("targeted", &existing)
        .await?;
    consume_test_event(&stack).await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let root = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let data = stack
        .gateway
        .add_share(&gw, ShareKind::Smb, &s3_arn(&bucket, "data/"));
    let media = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, "media/"));
    stack
        .gateway
        .set_bucket_source(&bucket, BucketSource::S3(stack.clients.s3.clone()));
    for share in [&root, &data, &media] {
        stack.gateway.prime_share_cache(share).await?;
    }
    let before = stack.clients.list_keys(&bucket, "").await?;
    assert_eq!(before, existing.iter().cloned().collect::<BTreeSet<_>>());
    assert_eq!(stack.gateway.share_view(&root), before);
    assert_eq!(stack.gateway.share_view(&data), under(&before, "data/"));
    assert_eq!(stack.gateway.share_view(&media), under(&before, "media/"));

    // Other writers change the bucket: an object in a folder that did not exist, one
    // in an existing folder, and the delete of the only object of a folder chain.
    let changed_at = SystemTime::now();
    stack
        .clients
        .put_object(&bucket, "data/new/deeper/x.txt")
        .await?;
    stack
        .clients
        .put_object(&bucket, "data/a/new-file.txt")
        .await?;
    stack
        .clients
        .delete_object(&bucket, "data/b/deep/er/5.txt")
        .await?;
    let after = stack.clients.list_keys(&bucket, "").await?;
    assert_eq!(after.len(), before.len() + 1);
    // The shares do not know yet.
    assert_eq!(stack.gateway.share_view(&root), before);
    assert_eq!(stack.gateway.share_view(&data), under(&before, "data/"));
    assert_ne!(under(&before, "data/"), under(&after, "data/"));

    let events = stack.collect_s3_events(3).await?;
    assert_eq!(events.len(), 3, "{events:?}");
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(
        (
            feed.total("windowsOpened"),
            feed.total("windowsJoined"),
            feed.total("messagesSent")
        ),
        (1, 2, 1),
        "{:?}",
        feed.responses
    );
    assert_eq!(
        item_folders(&stack, &bucket).await?,
        strings(&["/data/a/", "/data/b/deep/er/", "/data/new/deeper/"])
    );

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");
    assert!(run.errors.is_empty(), "{:?}", run.errors);

    // One non-recursive call per concerned share: every changed folder and each of
    // its ancestors up to the share root, relative to the share.
    let root_calls = refreshes_of(&stack, &root);
    assert_eq!(root_calls.len(), 1, "{root_calls:?}");
    assert_eq!(
        sorted(&root_calls[0].folder_list),
        strings(&[
            "/",
            "/data",
            "/data/a",
            "/data/b",
            "/data/b/deep",
            "/data/b/deep/er",
            "/data/new",
            "/data/new/deeper",
        ])
    );
    let data_calls = refreshes_of(&stack, &data);
    assert_eq!(data_calls.len(), 1, "{data_calls:?}");
    assert_eq!(
        sorted(&data_calls[0].folder_list),
        strings(&[
            "/",
            "/a",
            "/b",
            "/b/deep",
            "/b/deep/er",
            "/new",
            "/new/deeper"
        ])
    );
    for call in root_calls.iter().chain(&data_calls) {
        assert!(!call.recursive, "{call:?}");
        assert_eq!(call.listing_error, None, "{call:?}");
        assert!(call.started_at > changed_at, "{call:?}");
    }
    // No change lies under media/: that share is neither refreshed nor asked to be.
    assert!(refreshes_of(&stack, &media).is_empty());
    assert!(!stack
        .gateway
        .calls()
        .iter()
        .any(|c| c.operation == "RefreshCache" && c.body["FileShareARN"] == media.as_str()));
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 2);

    // Every share now shows the bucket as it is.
    assert_eq!(stack.gateway.share_view(&root), after);
    assert_eq!(stack.gateway.share_view(&data), under(&after, "data/"));
    assert_eq!(stack.gateway.share_view(&media), under(&after, "media/"));
    assert!(stack
        .gateway
        .share_view(&root)
        .contains("data/new/deeper/x.txt"));
    assert!(!stack
        .gateway
        .share_folders_view(&root)
        .contains("data/b/deep/"));

    // And it cost a fraction of re-listing the shares recursively.
    let root_work = stack.gateway.listing_work(&root);
    let data_work = stack.gateway.listing_work(&data);
    assert_eq!(root_work, expected_work(&after, "", &root_calls));
    assert_eq!(data_work, expected_work(&after, "data/", &data_calls));
    assert_eq!(stack.gateway.listing_work(&media), ListingWork::default());
    assert_eq!(stack.gateway.total_listing_work(), root_work + data_work);
    let (root_full, data_full) = (full_work(&after, ""), full_work(&after, "data/"));
    assert!(
        entries(root_work) * 10 <= root_full.objects_listed,
        "root: {root_work:?} against a full listing of {root_full:?}"
    );
    assert!(
        entries(data_work) * 4 <= data_full.objects_listed,
        "data/: {data_work:?} against a full listing of {data_full:?}"
    );
    Ok(())
}

#[tokio::test]
async fn more_than_50_changed_folders_go_in_calls_of_50_without_collapsing() -> Result<(), BoxError>
{
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 3,
        ..Default::default()
    })
    .await?;
    let existing: Vec<String> = [
        "data/x/old.txt",
        "data/y/old.txt",
        "data/z/keep.txt",
        "other/o.txt",
        "top.txt",
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    let bucket = stack
        .create_bucket_with_objects("collapse", &existing)
        .await?;
    consume_test_event(&stack).await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let root = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, ""));
    let data = stack
        .gateway
        .add_share(&gw, ShareKind::Smb, &s3_arn(&bucket, "data/"));
    let other = stack
        .gateway
        .add_share(&gw, ShareKind::Nfs, &s3_arn(&bucket, "other/"));
    stack
        .gateway
        .set_bucket_source(&bucket, BucketSource::S3(stack.clients.s3.clone()));
    for share in [&root, &data, &other] {
        stack.gateway.prime_share_cache(share).await?;
    }
    let before = stack.clients.list_keys(&bucket, "").await?;
    assert_eq!(stack.gateway.share_view(&root), before);

    // 60 new folders in one window: with their ancestors, 63 > 50 folders.
    let mut new_keys: Vec<String> = (0..30).map(|i| format!("data/x/f{i:02}/n.txt")).collect();
    new_keys.extend((0..30).map(|i| format!("data/y/g{i:02}/n.txt")));
    for key in &new_keys {
        stack.clients.put_object(&bucket, key).await?;
    }
    let after = stack.clients.list_keys(&bucket, "").await?;
    assert_eq!(after.len(), before.len() + 60);
    assert_eq!(stack.gateway.share_view(&root), before, "stale before");

    let events = stack.collect_s3_events(60).await?;
    assert_eq!(events.len(), 60);
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("windowsOpened"), 1, "{:?}", feed.responses);
    assert_eq!(feed.total("messagesSent"), 1);
    assert_eq!(item_folders(&stack, &bucket).await?.len(), 60);

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!((run.messages, run.batch_item_failures), (1, 0), "{run:?}");

    // Chunked, not collapsed: every changed folder and its ancestors, non-recursive, in
    // calls of at most 50 (the second one after the first one's slot is taken: two in
    // flight). Nothing else is listed: the physical limit.
    let settled = stack.settle(Duration::from_secs(30)).await?;
    assert_eq!(settled.batch_item_failures, 0);
    let chain = |prefix: &str| -> Vec<String> {
        let mut all: Vec<String> = vec!["/".into()];
        let rel = |p: &str| {
            if prefix.is_empty() {
                p.to_string()
            } else {
                p.trim_start_matches(prefix).to_string()
            }
        };
        if prefix.is_empty() {
            all.push("/data".into());
        }
        all.push(rel("/data/x"));
        all.push(rel("/data/y"));
        all.extend((0..30).map(|i| rel(&format!("/data/x/f{i:02}"))));
        all.extend((0..30).map(|i| rel(&format!("/data/y/g{i:02}"))));
        sorted(&all)
    };
    let in_calls = |all: Vec<String>| -> Vec<(bool, Vec<String>)> {
        all.chunks(50).map(|c| (false, c.to_vec())).collect()
    };
    let expected_root = in_calls(chain(""));
    let expected_data = in_calls(chain("/data"));
    for (share, expected) in [(&root, expected_root), (&data, expected_data)] {
        let mut calls: Vec<(bool, Vec<String>)> = refreshes_of(&stack, share)
            .iter()
            .map(|r| {
                assert!(
                    (1..=50).contains(&r.folder_list.len()),
                    "FolderList takes 1 to 50 folders: {r:?}"
                );
                assert_eq!(r.listing_error, None, "{r:?}");
                (r.recursive, sorted(&r.folder_list))
            })
            .collect();
        calls.sort();
        assert_eq!(calls, expected, "share {share}");
    }
    assert!(refreshes_of(&stack, &other).is_empty());
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 4);
    assert_eq!(stack.gateway.rejected_refreshes(), 0);

    assert_eq!(stack.gateway.share_view(&root), after);
    assert_eq!(stack.gateway.share_view(&data), under(&after, "data/"));
    assert_eq!(stack.gateway.share_view(&other), under(&after, "other/"));
    // data/z was not re-listed: neither refresh covers it.
    for record in stack.gateway.refreshes() {
        assert!(
            !record.folder_list.iter().any(|f| f.contains("/z")),
            "{record:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_warm_container_makes_one_read_three_writes_and_one_send_for_300_events(
) -> Result<(), BoxError> {
    let moto = Moto::start().await?;
    let dynamodb = CountingProxy::start(moto.endpoint()).await?;
    let sqs = CountingProxy::start(moto.endpoint()).await?;
    let stack = Stack::start_with_moto(
        moto,
        StackOptions {
            // Long enough that the whole burst lies well before the window's end.
            refresh_delay_seconds: 300,
            extra_env: vec![
                ("AWS_ENDPOINT_URL_DYNAMODB".into(), dynamodb.endpoint()),
                ("AWS_ENDPOINT_URL_SQS".into(), sqs.endpoint()),
            ],
            ..Default::default()
        },
    )
    .await?;
    let bucket = stack.create_bucket("warm").await?;
    consume_test_event(&stack).await?;
    let keys: Vec<String> = (0..300)
        .map(|i| format!("warm/f{}/obj-{i:03}.bin", i % 3))
        .collect();
    for key in &keys {
        stack.clients.put_object(&bucket, key).await?;
    }
    let events = stack.collect_s3_events(300).await?;
    assert_eq!(events.len(), 300);
    assert!(events
        .iter()
        .all(|e| e["Records"].as_array().is_some_and(|r| r.len() == 1)));
    dynamodb.reset();
    sqs.reset();

    // One event per invocation, all in one process: a warm container.
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.invocations, 300);
    assert_eq!(feed.total("windowsOpened"), 1);
    assert_eq!(feed.total("windowsJoined"), 299);
    assert_eq!(feed.total("messagesSent"), 1);
    assert_eq!(feed.total("windowWrites"), 3);
    assert_eq!(feed.total("coalescedInContainer"), 297);

    // What really reached moto: one consistent read when cold, the open, two joins
    // (one per new folder), and one message.
    assert_eq!(
        dynamodb.counts(),
        BTreeMap::from([
            ("DynamoDB_20120810.GetItem".to_string(), 1),
            ("DynamoDB_20120810.UpdateItem".to_string(), 3),
        ])
    );
    assert_eq!(sqs.count("SendMessage"), 1, "{:?}", sqs.counts());
    assert_eq!(sqs.counts().values().sum::<u64>(), 1, "{:?}", sqs.counts());
    assert_eq!(
        stack.clients.queue_depth(&stack.action_queue_url).await?,
        (0, 1)
    );
    assert_eq!(
        item_folders(&stack, &bucket).await?,
        strings(&["/warm/f0/", "/warm/f1/", "/warm/f2/"])
    );
    let item = stack
        .clients
        .bucket_item(&stack.table, &bucket)
        .await?
        .ok_or("no item")?;
    let number = |name: &str| -> Option<&String> { item.get(name).and_then(|v| v.as_n().ok()) };
    assert_eq!(number("Generation").map(String::as_str), Some("1"));
    assert_eq!(number("ClosedGeneration"), None);
    Ok(())
}
