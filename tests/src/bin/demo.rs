//! The local demo: moto plus the Storage Gateway stand-in, two buckets with shares,
//! a few hundred real S3 events through the aggregator, the window's wait, the
//! messages through the refresher, and a report of what reached each service.
//!
//! Run it with `scripts/demo.sh`, which installs moto and builds the binaries first.

use integration_tests::aws::BoxError;
use integration_tests::sgw_standin::ShareKind;
use integration_tests::stack::{Stack, StackOptions};
use std::collections::BTreeMap;
use std::time::Instant;

const DELAY_SECONDS: u32 = 5;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), BoxError> {
    let started = Instant::now();
    println!("Starting moto, the Storage Gateway stand-in, and the aggregator and refresher under a Lambda Runtime API...");
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: DELAY_SECONDS,
        log_level: "WARN".to_string(),
        ..Default::default()
    })
    .await?;
    println!("  moto:              {}", stack.moto.endpoint());
    println!("  Storage Gateway:   {}", stack.gateway.endpoint());
    println!("  table:             {}", stack.table);
    println!("  action queue:      {}", stack.action_queue_url);

    let photos = stack.create_bucket("demo-photos").await?;
    let logs = stack.create_bucket("demo-logs").await?;
    let office = stack.gateway.add_gateway("office-gateway");
    let branch = stack.gateway.add_gateway("branch-gateway");
    let mut share_names = BTreeMap::new();
    for (gateway, kind, bucket, prefix, label) in [
        (&office, ShareKind::Nfs, &photos, "", "photos (NFS, office)"),
        (
            &branch,
            ShareKind::Smb,
            &photos,
            "2026/",
            "photos/2026 (SMB, branch)",
        ),
        (
            &office,
            ShareKind::Smb,
            &photos,
            "archive/",
            "photos/archive (SMB, office)",
        ),
        (&office, ShareKind::Nfs, &logs, "", "logs (NFS, office)"),
    ] {
        let location = if prefix.is_empty() {
            format!("arn:aws:s3:::{bucket}")
        } else {
            format!("arn:aws:s3:::{bucket}/{prefix}")
        };
        let arn = stack.gateway.add_share(gateway, kind, &location);
        share_names.insert(arn, label);
    }
    println!("  buckets:           {photos}, {logs}");
    println!(
        "  file shares:       {}",
        share_names.values().copied().collect::<Vec<_>>().join("; ")
    );

    println!("\nPutting objects: 200 in {photos} (2026/...), 100 in {logs}...");
    for i in 0..200 {
        stack
            .clients
            .put_object(&photos, &format!("2026/11/img-{i:04}.jpg"))
            .await?;
    }
    for i in 0..100 {
        stack
            .clients
            .put_object(&logs, &format!("app/{}/log-{i}.txt", i % 4))
            .await?;
    }
    // Each bucket's notification set-up also sent one s3:TestEvent.
    let events = stack.collect_s3_events(302).await?;
    let mut per_bucket: BTreeMap<String, usize> = BTreeMap::new();
    for event in &events {
        for record in event
            .get("Records")
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
        {
            let bucket = record["s3"]["bucket"]["name"]
                .as_str()
                .unwrap_or("?")
                .to_string();
            *per_bucket.entry(bucket).or_default() += 1;
        }
    }

    println!(
        "Driving {} S3 notifications through the aggregator...",
        events.len()
    );
    let feed = stack.invoke_aggregator(&events).await?;
    println!("Waiting for the {DELAY_SECONDS} s window, then driving the action queue through the refresher...");
    let refresh = stack.run_refresher(2, stack.window_wait()).await?;

    println!("\n=== Report ===");
    println!("Events in:");
    for (bucket, count) in &per_bucket {
        println!("  {bucket}: {count} object events");
    }
    println!(
        "  s3:TestEvent notifications skipped: {}",
        feed.total("skippedTestEvents")
    );
    println!(
        "Aggregator ({} invocations, {} failed):",
        feed.invocations,
        feed.errors.len()
    );
    println!(
        "  windows opened:              {}",
        feed.total("windowsOpened")
    );
    println!(
        "  events coalesced into them:  {}",
        feed.total("windowsJoined")
    );
    println!(
        "  refresh messages sent:       {}",
        feed.total("messagesSent")
    );
    println!(
        "Refresher: {} messages in {} invocations, {} left for redelivery",
        refresh.messages, refresh.invocations, refresh.batch_item_failures
    );
    let refreshes = stack.gateway.refreshes();
    println!("RefreshCache calls: {}", refreshes.len());
    for r in &refreshes {
        let name = share_names.get(&r.share_arn).copied().unwrap_or("?");
        println!(
            "  {name}: {} folders {:?} recursive={} notification {}",
            r.share_arn, r.folder_list, r.recursive, r.notification_id
        );
    }
    let untouched: Vec<&str> = share_names
        .iter()
        .filter(|(arn, _)| !refreshes.iter().any(|r| &r.share_arn == *arn))
        .map(|(_, name)| *name)
        .collect();
    if !untouched.is_empty() {
        println!(
            "Not refreshed (no change under their prefix): {}",
            untouched.join("; ")
        );
    }
    println!(
        "Storage Gateway API calls: {} ListFileShares, {} Describe, {} RefreshCache",
        stack.gateway.calls_to("ListFileShares"),
        stack.gateway.calls_to("DescribeNFSFileShares")
            + stack.gateway.calls_to("DescribeSMBFileShares"),
        stack.gateway.calls_to("RefreshCache")
    );
    println!(
        "Done in {:.1} s; everything it started stops now.",
        started.elapsed().as_secs_f64()
    );
    if !feed.errors.is_empty() || refresh.messages != 2 || refreshes.len() != 3 {
        return Err(format!(
            "unexpected result: {} aggregator errors, {} messages, {} refreshes (expected 0, 2, 3)",
            feed.errors.len(),
            refresh.messages,
            refreshes.len()
        )
        .into());
    }
    Ok(())
}
