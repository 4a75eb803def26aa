//! `scripts/status.sh` against moto, after a real run of the pipeline.

use integration_tests::aws::{lambda_aws_env, unique_name, BoxError};
use integration_tests::sgw_standin::ShareKind;
use integration_tests::stack::{Stack, StackOptions};
use std::path::PathBuf;
use std::process::Output;

async fn status(stack: &Stack, prefix: &str, args: &[&str]) -> Result<Output, BoxError> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/status.sh");
    let mut command = tokio::process::Command::new("bash");
    command.arg(script).arg("--prefix").arg(prefix).args(args);
    for (k, v) in lambda_aws_env(stack.moto.endpoint(), &stack.gateway.endpoint()) {
        command.env(k, v);
    }
    command.env("AWS_ACCOUNT_ID", integration_tests::aws::ACCOUNT_ID);
    Ok(command.output().await?)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn status_shows_windows_refreshes_and_queues() -> Result<(), BoxError> {
    let prefix = unique_name("S3EAstatus").replace('-', "_");
    let stack = Stack::start(StackOptions {
        refresh_delay_seconds: 600,
        prefix: Some(prefix.clone()),
        ..Default::default()
    })
    .await?;
    let gw = stack.gateway.add_gateway("gw-1");
    let refreshed_bucket = stack.create_bucket("refreshed").await?;
    let share = stack.gateway.add_share(
        &gw,
        ShareKind::Nfs,
        &format!("arn:aws:s3:::{refreshed_bucket}"),
    );
    let open_bucket = stack.create_bucket("open").await?;

    // One bucket whose window ran and was refreshed (the message is handed to the
    // refresher without waiting for its 600 s delay), one whose window is still open.
    stack
        .clients
        .put_object(&refreshed_bucket, "docs/a.txt")
        .await?;
    let events = stack.collect_s3_events(2).await?;
    stack.invoke_aggregator(&events).await?;
    let sent = stack
        .clients
        .receive(&stack.action_queue_url, 10, 0)
        .await?;
    assert!(sent.is_empty(), "the message is delayed");
    stack.clients.put_object(&open_bucket, "x/y.txt").await?;
    let events = stack.collect_s3_events(1).await?;
    stack.invoke_aggregator(&events).await?;

    // Deliver the first bucket's message now, as if its window had ended: move the
    // window's end into the past (the refresher closes no window before its end).
    stack
        .clients
        .dynamodb
        .update_item()
        .table_name(&stack.table)
        .key(
            "BucketName",
            aws_sdk_dynamodb::types::AttributeValue::S(refreshed_bucket.clone()),
        )
        .update_expression("SET WindowEndsAt = :past")
        .expression_attribute_values(
            ":past",
            aws_sdk_dynamodb::types::AttributeValue::N("0".into()),
        )
        .send()
        .await?;
    let item = stack
        .clients
        .bucket_item(&stack.table, &refreshed_bucket)
        .await?
        .ok_or("no item")?;
    let generation: u64 = item["Generation"]
        .as_n()
        .map_err(|_| "Generation")?
        .parse()?;
    let body = serde_json::json!({"version": 1, "bucket": refreshed_bucket, "generation": generation,
        "windowOpenedAtMs": 0, "windowEndsAtMs": 0, "timestampMs": 0});
    let invocation = stack
        .refresher
        .invoke(serde_json::json!({"Records": [{
            "messageId": "status-test",
            // As SQS names it: the refresher sends the share's wake-up back there.
            "eventSourceARN": stack.action_queue_arn,
            "body": body.to_string(),
            "messageAttributes": {"bucket-name": {"stringValue": refreshed_bucket, "dataType": "String"}}
        }]}))
        .await?;
    assert!(!invocation.is_error());
    let notification = stack
        .gateway
        .refreshes()
        .first()
        .ok_or("no refresh")?
        .notification_id
        .clone();

    let output = status(&stack, &prefix, &[]).await?;
    let out = text(&output);
    println!("{out}");
    assert!(output.status.success(), "{out}");
    assert!(out.contains(&format!("Bucket {refreshed_bucket}")), "{out}");
    assert!(out.contains(&format!("Bucket {open_bucket}")), "{out}");
    assert!(out.contains("closed (window 1)"), "{out}");
    assert!(out.contains("open until"), "{out}");
    assert!(out.contains(&share), "{out}");
    assert!(out.contains(&notification), "{out}");
    assert!(out.contains("folders /"), "{out}");
    assert!(
        out.contains("/x/"),
        "the open window's changed folder: {out}"
    );
    let action_line = out
        .lines()
        .find(|l| l.contains(&format!("{prefix}ActionQueue")))
        .ok_or("no action queue line")?;
    // The open window's message and the refreshed share's wake-up for its call's
    // lease end.
    assert!(action_line.contains("3 delayed"), "{action_line}");
    assert!(out.contains(&format!("{prefix}ActionDLQ")), "{out}");
    assert!(out.contains("start-message-move-task"), "{out}");

    // One named bucket only.
    let output = status(&stack, &prefix, &[&open_bucket]).await?;
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    assert!(
        !out.contains(&format!("Bucket {refreshed_bucket}")),
        "{out}"
    );

    // Usage errors exit 2.
    let output = status(&stack, &prefix, &["--bogus"]).await?;
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    Ok(())
}
