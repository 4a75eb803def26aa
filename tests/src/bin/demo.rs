//! The local demo: moto plus the Storage Gateway stand-in, two buckets with shares,
//! a few hundred real S3 events through the aggregator, the window's wait, the
//! messages through the refresher, and a report of what reached each service.
//!
//! Run it with `scripts/demo.sh`, which installs moto and builds the binaries first.
//! The functions' stdout and stderr (their EMF metrics and logs) go to a log file,
//! `.demo/functions.log` unless `--log-file` names another; the terminal gets one line
//! per stage and the report. `--verbose` also shows the functions' lines there.

use integration_tests::aws::BoxError;
use integration_tests::counting_proxy::CountingProxy;
use integration_tests::moto::Moto;
use integration_tests::runtime_api::{set_default_child_output, ChildOutput};
use integration_tests::sgw_standin::{BucketSource, ShareKind};
use integration_tests::stack::{Stack, StackOptions};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const DELAY_SECONDS: u32 = 5;
const DEFAULT_LOG_FILE: &str = ".demo/functions.log";
const USAGE: &str = "usage: demo [--verbose] [--log-file PATH]
  --verbose        also show the functions' stdout and stderr on this terminal
  --log-file PATH  where the functions' stdout and stderr go (default .demo/functions.log)";

#[tokio::main]
async fn main() {
    let mut verbose = false;
    let mut log_file = PathBuf::from(DEFAULT_LOG_FILE);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-v" | "--verbose" => verbose = true,
            "--log-file" => match args.next() {
                Some(path) => log_file = PathBuf::from(path),
                None => usage_error("--log-file needs a path"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => usage_error(&format!("unknown argument {other}")),
        }
    }
    let log_file = std::path::absolute(&log_file).unwrap_or(log_file);
    match ChildOutput::file(&log_file) {
        Ok(output) => set_default_child_output(output.with_stderr(verbose)),
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::exit(1);
        }
    }
    if verbose {
        println!("Function logs: here and in {}", log_file.display());
    } else {
        println!(
            "Function logs: {} (--verbose also shows them here)",
            log_file.display()
        );
    }
    if let Err(e) = run().await {
        eprintln!("demo failed: {e}");
        eprintln!("The functions' output is in {}", log_file.display());
        std::process::exit(1);
    }
}

fn usage_error(message: &str) -> ! {
    eprintln!("demo: {message}\n{USAGE}");
    std::process::exit(2);
}

/// Seconds since `since`, for the progress lines.
fn secs(since: Instant) -> String {
    format!("{:.1} s", since.elapsed().as_secs_f64())
}

async fn run() -> Result<(), BoxError> {
    let started = Instant::now();
    println!("Starting moto, the Storage Gateway stand-in, and the aggregator and refresher under a Lambda Runtime API...");
    // The functions reach DynamoDB and SQS through a counting proxy, so the report
    // shows the requests that really reached them.
    let moto = Moto::start().await?;
    let proxy = CountingProxy::start(moto.endpoint()).await?;
    let stack = Stack::start_with_moto(
        moto,
        StackOptions {
            refresh_delay_seconds: DELAY_SECONDS,
            log_level: "WARN".to_string(),
            extra_env: vec![
                ("AWS_ENDPOINT_URL_DYNAMODB".to_string(), proxy.endpoint()),
                ("AWS_ENDPOINT_URL_SQS".to_string(), proxy.endpoint()),
            ],
            ..Default::default()
        },
    )
    .await?;
    println!("  moto:              {}", stack.moto.endpoint());
    println!("  Storage Gateway:   {}", stack.gateway.endpoint());
    println!("  table:             {}", stack.table);
    println!("  action queue:      {}", stack.action_queue_url);

    let photos = stack.create_bucket("demo-photos").await?;
    let logs = stack.create_bucket("demo-logs").await?;
    // The stand-in's shares list moto's S3 when they are refreshed.
    for bucket in [&photos, &logs] {
        stack
            .gateway
            .set_bucket_source(bucket, BucketSource::S3(stack.clients.s3.clone()));
    }
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
        stack.gateway.prime_share_cache(&arn).await?;
        share_names.insert(arn, (label, bucket.to_string(), prefix));
    }
    println!("  buckets:           {photos}, {logs}");
    println!(
        "  file shares:       {}",
        share_names
            .values()
            .map(|(label, _, _)| *label)
            .collect::<Vec<_>>()
            .join("; ")
    );

    println!();
    let stage = Instant::now();
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
        "[1/4] Objects put:    200 in {photos} (2026/11/...), 100 in {logs} (app/...); \
         moto queued {} S3 notifications ({})",
        events.len(),
        secs(stage)
    );

    let stage = Instant::now();
    let feed = stack.invoke_aggregator(&events).await?;
    let aggregator_requests = proxy.counts();
    println!(
        "[2/4] Events driven:  {} notifications, one aggregator invocation each, {} failed ({})",
        feed.invocations,
        feed.errors.len(),
        secs(stage)
    );
    println!(
        "[3/4] Windows:        {} opened, {} events coalesced into them, {} refresh messages \
         sent; waiting out the {DELAY_SECONDS} s window...",
        feed.total("windowsOpened"),
        feed.total("windowsJoined"),
        feed.total("messagesSent")
    );

    let stage = Instant::now();
    let refresh = stack.run_refresher(2, stack.window_wait()).await?;
    // The gateway's refresh-complete events come back on the action queue (through
    // moto's EventBridge) and free each share's refresh slots.
    let settled = stack.settle(Duration::from_secs(30)).await?;
    println!(
        "[4/4] Refreshes:      {} messages through the refresher in {} invocations, \
         {} RefreshCache calls, {} refresh-complete events consumed ({})",
        refresh.messages,
        refresh.invocations + settled.invocations,
        stack.gateway.refreshes().len(),
        refresh.completion_events + settled.completion_events,
        secs(stage)
    );

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
    let count = |counts: &BTreeMap<String, u64>, operation: &str| -> u64 {
        counts
            .iter()
            .filter(|(target, _)| target.ends_with(&format!(".{operation}")))
            .map(|(_, n)| n)
            .sum()
    };
    println!(
        "  requests that reached moto:  {} DynamoDB UpdateItem, {} GetItem, {} SQS SendMessage \
         (the 2018 design: one conditional write per event, {})",
        count(&aggregator_requests, "UpdateItem"),
        count(&aggregator_requests, "GetItem"),
        count(&aggregator_requests, "SendMessage"),
        per_bucket.values().sum::<usize>()
    );
    println!(
        "Refresher: {} messages in {} invocations, {} left for redelivery",
        refresh.messages, refresh.invocations, refresh.batch_item_failures
    );
    let refreshes = stack.gateway.refreshes();
    println!("RefreshCache calls: {}", refreshes.len());
    for r in &refreshes {
        let name = share_names
            .get(&r.share_arn)
            .map_or("?", |(label, _, _)| *label);
        println!(
            "  {name}: {} folders {:?} recursive={} notification {}",
            r.share_arn, r.folder_list, r.recursive, r.notification_id
        );
        println!(
            "    listed {} objects and {} prefixes in {} LIST requests",
            r.work.objects_listed, r.work.prefixes_listed, r.work.list_requests
        );
    }
    // What a client of each share sees now, against the bucket itself.
    let mut stale = Vec::new();
    for (arn, (label, bucket, prefix)) in &share_names {
        let bucket_keys = stack.clients.list_keys(bucket, prefix).await?;
        if stack.gateway.share_view(arn) != bucket_keys {
            stale.push(*label);
        }
    }
    if stale.is_empty() {
        println!("Every share now shows exactly what its bucket holds.");
    } else {
        println!("Shares that do not show their bucket: {}", stale.join("; "));
    }
    let untouched: Vec<&str> = share_names
        .iter()
        .filter(|(arn, _)| !refreshes.iter().any(|r| &r.share_arn == *arn))
        .map(|(_, (label, _, _))| *label)
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
    if !feed.errors.is_empty() || refresh.messages != 2 || refreshes.len() != 3 || !stale.is_empty()
    {
        return Err(format!(
            "unexpected result: {} aggregator errors, {} messages, {} refreshes, {} stale shares (expected 0, 2, 3, 0)",
            feed.errors.len(),
            refresh.messages,
            refreshes.len(),
            stale.len()
        )
        .into());
    }
    Ok(())
}
