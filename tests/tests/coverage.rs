//! Coverage on the real stack: changes written through one gateway reach the shares of
//! every other gateway, and lifecycle expirations leave the shares' listings.
//!
//! moto's S3 sends no `userIdentity`, so a test gives the real event the principal that
//! a write through a file share carries on AWS (`...:StorageGateway-sgw-XXXXXXXX`).
//! The stand-in's `share_view` shows what a client of each share sees.

use integration_tests::aws::BoxError;
use integration_tests::sgw_standin::{BucketSource, ShareKind};
use integration_tests::stack::{Stack, StackOptions};
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn s3_arn(bucket: &str) -> String {
    format!("arn:aws:s3:::{bucket}")
}

/// `arn:...:gateway/sgw-12A3456B` → `sgw-12A3456B`.
fn gateway_id(gateway_arn: &str) -> &str {
    gateway_arn.rsplit('/').next().unwrap_or(gateway_arn)
}

/// Starts a stack with short windows and a bucket holding `existing`, whose test
/// event is consumed.
async fn stack_with_bucket(prefix: &str, existing: &[&str]) -> Result<(Stack, String), BoxError> {
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 2,
        ..Default::default()
    })
    .await?;
    let keys: Vec<String> = existing.iter().map(|k| k.to_string()).collect();
    let bucket = stack.create_bucket_with_objects(prefix, &keys).await?;
    let test_event = stack.collect_s3_events(1).await?;
    assert_eq!(test_event[0]["Event"], "s3:TestEvent", "{test_event:?}");
    stack
        .gateway
        .set_bucket_source(&bucket, BucketSource::S3(stack.clients.s3.clone()));
    Ok((stack, bucket))
}

/// Gives every record of `events` the principal `principal`.
fn written_by(events: &mut [Value], principal: &str) {
    for event in events.iter_mut() {
        if let Some(records) = event["Records"].as_array_mut() {
            for record in records {
                record["userIdentity"] = json!({ "principalId": principal });
            }
        }
    }
}

fn refreshed_shares(stack: &Stack) -> BTreeSet<String> {
    stack
        .gateway
        .refreshes()
        .into_iter()
        .map(|r| r.share_arn)
        .collect()
}

#[tokio::test]
async fn a_write_through_one_gateway_reaches_the_other_gateways_share() -> Result<(), BoxError> {
    let (stack, bucket) = stack_with_bucket("two-sites", &["shared/old.txt"]).await?;
    let site_a = stack.gateway.add_gateway("site-a");
    let site_b = stack.gateway.add_gateway("site-b");
    let share_a = stack
        .gateway
        .add_share(&site_a, ShareKind::Nfs, &s3_arn(&bucket));
    let share_b = stack
        .gateway
        .add_share(&site_b, ShareKind::Smb, &s3_arn(&bucket));
    for share in [&share_a, &share_b] {
        stack.gateway.prime_share_cache(share).await?;
    }

    // A client of site A writes two files through its share.
    for key in ["shared/from-a.txt", "new-folder/from-a.txt"] {
        stack.clients.put_object(&bucket, key).await?;
    }
    let mut events = stack.collect_s3_events(2).await?;
    // The id in the principal is matched case-insensitively.
    let principal = format!(
        "AWS:AROAEXAMPLE:StorageGateway-{}",
        gateway_id(&site_a).to_ascii_lowercase()
    );
    written_by(&mut events, &principal);
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("gatewayWrites"), 2);
    assert_eq!(feed.total("messagesSent"), 1);

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    assert_eq!(refreshed_shares(&stack), BTreeSet::from([share_b.clone()]));
    let bucket_now = stack.clients.list_keys(&bucket, "").await?;
    assert_eq!(stack.gateway.share_view(&share_b), bucket_now);
    Ok(())
}

#[tokio::test]
async fn a_write_through_the_only_gateway_costs_one_window_and_no_refresh() -> Result<(), BoxError>
{
    let (stack, bucket) = stack_with_bucket("one-site", &[]).await?;
    let site = stack.gateway.add_gateway("site");
    stack
        .gateway
        .add_share(&site, ShareKind::Nfs, &s3_arn(&bucket));
    stack
        .gateway
        .add_share(&site, ShareKind::Smb, &format!("{}/docs/", s3_arn(&bucket)));
    // Another bucket's share on another gateway does not make this bucket two-site.
    let elsewhere = stack.create_bucket("elsewhere").await?;
    let its_test_event = stack.collect_s3_events(1).await?;
    assert_eq!(its_test_event[0]["Event"], "s3:TestEvent");
    let other_site = stack.gateway.add_gateway("other-site");
    stack
        .gateway
        .add_share(&other_site, ShareKind::Nfs, &s3_arn(&elsewhere));

    let keys: Vec<String> = (0..20).map(|i| format!("docs/f{}/k{i}", i % 4)).collect();
    for key in &keys {
        stack.clients.put_object(&bucket, key).await?;
    }
    let mut events = stack.collect_s3_events(keys.len()).await?;
    // Half name the gateway, half only say StorageGateway: all on one gateway, so
    // neither needs a refresh.
    let half = events.len() / 2;
    let (named, unnamed) = events.split_at_mut(half);
    written_by(
        named,
        &format!("AWS:AROAEXAMPLE:StorageGateway-{}", gateway_id(&site)),
    );
    written_by(unnamed, "AWS:AROAEXAMPLE:StorageGateway");
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("gatewayWrites"), keys.len() as u64);
    assert_eq!(feed.total("windowsOpened"), 1);
    assert_eq!(feed.total("messagesSent"), 1);

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    assert_eq!(stack.gateway.calls_to("RefreshCache"), 0);
    // The refresher did look: the window was closed, and found only the writer's shares.
    assert_eq!(stack.gateway.calls_to("ListFileShares"), 1);
    Ok(())
}

#[tokio::test]
async fn an_unnamed_gateway_write_refreshes_every_share_of_a_two_site_bucket(
) -> Result<(), BoxError> {
    let (stack, bucket) = stack_with_bucket("unnamed", &[]).await?;
    let site_a = stack.gateway.add_gateway("site-a");
    let site_b = stack.gateway.add_gateway("site-b");
    let shares = BTreeSet::from([
        stack
            .gateway
            .add_share(&site_a, ShareKind::Nfs, &s3_arn(&bucket)),
        stack
            .gateway
            .add_share(&site_b, ShareKind::Nfs, &s3_arn(&bucket)),
    ]);
    stack.clients.put_object(&bucket, "x/y.txt").await?;
    let mut events = stack.collect_s3_events(1).await?;
    written_by(&mut events, "AWS:AROAEXAMPLE:StorageGateway");
    let feed = stack.invoke_aggregator(&events).await?;
    assert_eq!(feed.total("gatewayWrites"), 1);
    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    assert_eq!(refreshed_shares(&stack), shares);
    Ok(())
}

/// An S3 Lifecycle expiration as AWS sends it: its own event name, the S3 service as
/// the principal, and an object with no size and no eTag.
fn as_lifecycle_expiration(event: &mut Value, event_name: &str) {
    for record in event["Records"].as_array_mut().into_iter().flatten() {
        record["eventName"] = json!(event_name);
        record["userIdentity"] = json!({"principalId": "s3.amazonaws.com"});
        let key = record["s3"]["object"]["key"].clone();
        record["s3"]["object"] = json!({"key": key, "sequencer": "0055AED6DCD90281E5"});
    }
}

#[tokio::test]
async fn an_expired_object_leaves_the_share() -> Result<(), BoxError> {
    let existing = ["logs/2025/old.txt", "logs/2025/older.txt", "keep/me.txt"];
    let (stack, bucket) = stack_with_bucket("lifecycle", &existing).await?;
    let site = stack.gateway.add_gateway("site");
    let share = stack
        .gateway
        .add_share(&site, ShareKind::Nfs, &s3_arn(&bucket));
    stack.gateway.prime_share_cache(&share).await?;
    assert!(stack
        .gateway
        .share_view(&share)
        .contains("logs/2025/old.txt"));

    // A lifecycle rule expires two objects. moto does not run lifecycle rules, so the
    // objects are deleted here and their events given the expiration's shape.
    for key in &existing[..2] {
        stack.clients.delete_object(&bucket, key).await?;
    }
    let mut events = stack.collect_s3_events(2).await?;
    as_lifecycle_expiration(&mut events[0], "LifecycleExpiration:Delete");
    as_lifecycle_expiration(&mut events[1], "LifecycleExpiration:DeleteMarkerCreated");
    let feed = stack.invoke_aggregator(&events).await?;
    assert!(feed.errors.is_empty(), "{:?}", feed.errors);
    assert_eq!(feed.total("changes"), 2);
    assert_eq!(feed.total("gatewayWrites"), 0);

    let run = stack.run_refresher(1, stack.window_wait()).await?;
    assert_eq!(run.batch_item_failures, 0);
    let view = stack.gateway.share_view(&share);
    assert_eq!(view, BTreeSet::from(["keep/me.txt".to_string()]));
    Ok(())
}
