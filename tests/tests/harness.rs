//! Tests of the test harness itself: the Lambda Runtime API server
//! (`integration_tests::runtime_api`) and the moto helper (`integration_tests::moto`).
//!
//! The runtime side is played either by the test (raw HTTP requests) or by a small
//! `/bin/sh` + `curl` script that reads `AWS_LAMBDA_RUNTIME_API` like a real runtime.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_tests::moto::{Moto, MOTO_ENDPOINT_VAR};
use integration_tests::runtime_api::{
    http_request, http_request_timeout, HarnessError, Invocation, LambdaProcess, LambdaSpawn,
};
use serde_json::json;

const NEXT: &str = "/2018-06-01/runtime/invocation/next";

/// Writes an executable `/bin/sh` script under the cargo target tmp dir.
fn script(name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("harness-scripts");
    std::fs::create_dir_all(&dir).expect("create script dir");
    let path = dir.join(format!(
        "{name}-{}-{}.sh",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn have_curl() -> bool {
    std::process::Command::new("curl")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis()
}

/// A process that never polls: the test plays the runtime client.
async fn idle_process(name: &str, timeout: Duration) -> LambdaProcess {
    let bin = script(name, "exec sleep 120");
    LambdaProcess::spawn(LambdaSpawn::new(&bin, name).timeout(timeout))
        .await
        .expect("spawn idle process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_round_trip_with_raw_runtime_client() {
    let lp = idle_process("raw-client", Duration::from_secs(10)).await;
    let api = lp.runtime_api();
    assert!(api.starts_with("127.0.0.1:"), "{api}");
    assert!(lp.pid().is_some());
    assert!(lp.first_poll_latency().is_none());

    let client = tokio::spawn({
        let api = api.clone();
        async move {
            let next = http_request(&api, "GET", NEXT, &[], b"").await?;
            let id = next
                .header("Lambda-Runtime-Aws-Request-Id")
                .expect("request id header")
                .to_owned();
            let event = next.json()?;
            let body = json!({ "echo": event }).to_string();
            let post = http_request(
                &api,
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/response"),
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .await?;
            // A second result for the same request is refused.
            let again = http_request(
                &api,
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/response"),
                &[],
                b"{}",
            )
            .await?;
            Ok::<_, HarnessError>((next, post, again))
        }
    });

    let before = epoch_ms();
    let inv = lp
        .invoke(json!({"hello": "world", "n": 1}))
        .await
        .expect("invoke");
    assert_eq!(
        inv,
        Invocation::Response(json!({"echo": {"hello": "world", "n": 1}}))
    );

    let (next, post, again) = client.await.expect("join").expect("client");
    assert_eq!(next.status, 200);
    assert_eq!(next.header("content-type"), Some("application/json"));
    let deadline: u128 = next
        .header("Lambda-Runtime-Deadline-Ms")
        .expect("deadline header")
        .parse()
        .expect("deadline is epoch ms");
    assert!(
        deadline >= before + 9_000 && deadline <= epoch_ms() + 10_000,
        "deadline {deadline} vs now {before}"
    );
    let arn = next
        .header("Lambda-Runtime-Invoked-Function-Arn")
        .expect("arn header");
    assert_eq!(arn, lp.function_arn());
    assert_eq!(
        arn,
        "arn:aws:lambda:us-east-1:123456789012:function:raw-client"
    );
    let trace = next
        .header("Lambda-Runtime-Trace-Id")
        .expect("trace header");
    assert!(trace.starts_with("Root=1-"), "{trace}");
    let id = next.header("Lambda-Runtime-Aws-Request-Id").expect("id");
    assert_eq!(id.len(), 36, "{id}");

    assert_eq!(post.status, 202, "{}", post.text());
    assert_eq!(again.status, 400, "{}", again.text());
    assert_eq!(again.json().expect("json")["errorType"], "InvalidRequestID");

    assert!(lp.first_poll_latency().is_some());
    let status = lp.shutdown().await.expect("shutdown");
    assert!(status.is_some_and(|s| !s.success()), "killed: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_posts_are_reported() {
    let lp = idle_process("raw-error", Duration::from_secs(10)).await;
    let api = lp.runtime_api();

    // 1. The lambda_runtime shape: JSON diagnostic + error-type header.
    let client = tokio::spawn({
        let api = api.clone();
        async move {
            let next = http_request(&api, "GET", NEXT, &[], b"").await?;
            let id = next
                .header("lambda-runtime-aws-request-id")
                .unwrap_or_default()
                .to_owned();
            http_request(
                &api,
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/error"),
                &[("lambda-runtime-function-error-type", "unhandled")],
                br#"{"errorType":"MyError","errorMessage":"boom"}"#,
            )
            .await
        }
    });
    let inv = lp.invoke(json!({"fail": true})).await.expect("invoke");
    assert_eq!(
        inv,
        Invocation::Error {
            error_type: "MyError".into(),
            error_message: "boom".into()
        }
    );
    assert!(inv.is_error());
    let post = client.await.expect("join").expect("post");
    assert_eq!(post.status, 202);

    // 2. A body that is not a diagnostic: the header gives the type, the body the message.
    let client = tokio::spawn({
        let api = api.clone();
        async move {
            let next = http_request(&api, "GET", NEXT, &[], b"").await?;
            let id = next
                .header("lambda-runtime-aws-request-id")
                .unwrap_or_default()
                .to_owned();
            http_request(
                &api,
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/error"),
                &[("Lambda-Runtime-Function-Error-Type", "Runtime.Crash")],
                b"plain text",
            )
            .await
        }
    });
    let inv = lp.invoke(json!(null)).await.expect("invoke");
    assert_eq!(
        inv,
        Invocation::Error {
            error_type: "Runtime.Crash".into(),
            error_message: "plain text".into()
        }
    );
    assert_eq!(client.await.expect("join").expect("post").status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_requests_do_not_break_the_server() {
    let lp = idle_process("odd", Duration::from_secs(10)).await;
    let api = lp.runtime_api();

    let cases: &[(&str, &str, u16)] = &[
        ("GET", "/", 404),
        ("GET", "/2018-06-01/runtime/", 404),
        ("POST", NEXT, 405),
        ("GET", "/2018-06-01/runtime/init/error", 405),
        (
            "POST",
            "/2018-06-01/runtime/invocation/no-such-id/response",
            400,
        ),
        (
            "POST",
            "/2018-06-01/runtime/invocation/no-such-id/error",
            400,
        ),
        (
            "GET",
            "/2018-06-01/runtime/invocation/some-id/response",
            405,
        ),
        ("POST", "/2018-06-01/runtime/invocation//response", 404),
        ("POST", "/2018-06-01/runtime/invocation/a/b/response", 404),
        ("POST", "/2018-06-01/runtime/invocation/x/other", 404),
        ("DELETE", "/2018-06-01/runtime/restore/next", 404),
    ];
    for (method, path, want) in cases {
        let resp = http_request(&api, method, path, &[], b"not json")
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(resp.status, *want, "{method} {path}: {}", resp.text());
        assert!(
            resp.json().is_ok(),
            "{method} {path}: error bodies are JSON"
        );
    }

    // Garbage that is not HTTP at all.
    {
        let stream = tokio::net::TcpStream::connect(&api).await.expect("connect");
        stream.writable().await.expect("writable");
        let _ = stream.try_write(b"\x00\x01 NOT HTTP \r\n\r\n");
    }
    // A client that connects for the long poll and disconnects. (Give the server a
    // moment to see the disconnect: an event queued in the very instant a long poll
    // is abandoned can go to the dead connection. The lambda_runtime client never
    // abandons a poll, so this only matters to tests like this one.)
    {
        let r = http_request_timeout(&api, "GET", NEXT, &[], b"", Duration::from_millis(200)).await;
        assert!(matches!(r, Err(HarnessError::Timeout { .. })), "{r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The server still works.
    let client = tokio::spawn({
        let api = api.clone();
        async move {
            let next = http_request(&api, "GET", NEXT, &[], b"").await?;
            let id = next
                .header("lambda-runtime-aws-request-id")
                .unwrap_or_default()
                .to_owned();
            // A response that is not JSON is kept as a string.
            http_request(
                &api,
                "POST",
                &format!("/2018-06-01/runtime/invocation/{id}/response"),
                &[],
                b"not json",
            )
            .await
        }
    });
    let inv = lp
        .invoke(json!({"x": 1}))
        .await
        .expect("invoke after odd requests");
    assert_eq!(inv, Invocation::Response(json!("not json")));
    assert_eq!(client.await.expect("join").expect("post").status, 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_runtime_round_trip() {
    if !have_curl() {
        eprintln!("skipping: curl not found");
        return;
    }
    let bin = script(
        "curl-echo",
        r#"set -u
echo "echo lambda starting fn=$AWS_LAMBDA_FUNCTION_NAME mem=$AWS_LAMBDA_FUNCTION_MEMORY_SIZE"
echo "to stderr" >&2
base="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
hdrs=$(mktemp)
while true; do
  body=$(curl -sS -D "$hdrs" "$base/invocation/next") || exit 9
  id=$(grep -i '^lambda-runtime-aws-request-id:' "$hdrs" | cut -d: -f2 | tr -d ' \r')
  case "$body" in
    *fail*)
      curl -sS -o /dev/null -X POST -H 'Lambda-Runtime-Function-Error-Type: Unhandled' \
        -d '{"errorType":"EchoError","errorMessage":"asked to fail"}' "$base/invocation/$id/error" ;;
    *)
      curl -sS -o /dev/null -X POST \
        -d "{\"echo\":$body,\"fn\":\"$AWS_LAMBDA_FUNCTION_NAME\",\"mem\":\"$AWS_LAMBDA_FUNCTION_MEMORY_SIZE\",\"version\":\"$AWS_LAMBDA_FUNCTION_VERSION\",\"greeting\":\"${GREETING:-unset}\",\"home\":\"${HOME:-unset}\",\"group\":\"$AWS_LAMBDA_LOG_GROUP_NAME\"}" \
        "$base/invocation/$id/response" ;;
  esac
  echo "handled $id"
done"#,
    );
    let started = Instant::now();
    let lp = LambdaProcess::spawn(
        LambdaSpawn::new(&bin, "curl-echo")
            .timeout(Duration::from_secs(20))
            .env("GREETING", "hi")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
    )
    .await
    .expect("spawn");

    let inv = lp.invoke(json!({"k": [1, 2, 3]})).await.expect("invoke 1");
    assert_eq!(
        inv,
        Invocation::Response(json!({
            "echo": {"k": [1, 2, 3]},
            "fn": "curl-echo",
            "mem": "256",
            "version": "$LATEST",
            "greeting": "hi",
            "home": "unset",
            "group": "/aws/lambda/curl-echo",
        }))
    );
    let inv = lp.invoke(json!({"fail": 1})).await.expect("invoke 2");
    assert_eq!(
        inv,
        Invocation::Error {
            error_type: "EchoError".into(),
            error_message: "asked to fail".into()
        }
    );
    // Sequential invocations keep working.
    for i in 0..3 {
        let inv = lp.invoke(json!({"i": i})).await.expect("invoke n");
        assert_eq!(inv.response().expect("response")["echo"], json!({"i": i}));
    }

    let latency = lp.first_poll_latency().expect("polled");
    assert!(latency <= started.elapsed(), "{latency:?}");
    assert!(lp.output_contains("echo lambda starting fn=curl-echo mem=256"));
    assert!(lp.output_lines().iter().any(|l| l == "to stderr"));
    assert!(lp.output_lines().iter().any(|l| l.starts_with("handled ")));
    assert!(lp.pid().is_some());
    lp.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_exit_is_reported_with_status_and_output() {
    let bin = script("exit3", "echo to-stdout\necho to-stderr >&2\nexit 3");
    let lp = LambdaProcess::spawn(LambdaSpawn::new(&bin, "exit3").timeout(Duration::from_secs(10)))
        .await
        .expect("spawn");
    let err = lp.invoke(json!({})).await.expect_err("process exits");
    match &err {
        HarnessError::ProcessExited {
            status, last_lines, ..
        } => {
            assert_eq!(status.and_then(|s| s.code()), Some(3), "{err}");
            assert!(last_lines.iter().any(|l| l == "to-stdout"), "{err}");
            assert!(last_lines.iter().any(|l| l == "to-stderr"), "{err}");
        }
        other => panic!("expected ProcessExited, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("exit status: 3"), "{msg}");
    assert!(msg.contains("to-stderr"), "{msg}");
    assert_eq!(err.exit_status().and_then(|s| s.code()), Some(3));
    assert!(lp.has_exited());
    assert!(lp.pid().is_none());
    assert_eq!(lp.exit_status().and_then(|s| s.code()), Some(3));

    // The same process through the init-error path.
    let outcome = lp
        .wait_for_init_error(Duration::from_secs(5))
        .await
        .expect("outcome");
    assert!(outcome.init_error.is_none());
    assert_eq!(outcome.exit_status.and_then(|s| s.code()), Some(3));
    assert!(outcome.output_contains("to-stdout"));
    assert!(outcome.output_contains("to-stderr"));
    assert!(outcome.failed());
    assert!(lp.first_poll_latency().is_none());
    assert_eq!(
        lp.shutdown()
            .await
            .expect("shutdown")
            .and_then(|s| s.code()),
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_init_error_on_a_fresh_process() {
    // No invoke first: wait_for_init_error alone sees the exit and the output.
    let bin = script(
        "bad-config",
        "echo 'invalid LOG_LEVEL \"LOUD\": expected one of DEBUG, INFO, WARN, ERROR' >&2\nexit 1",
    );
    let lp = LambdaProcess::spawn(LambdaSpawn::new(&bin, "bad-config"))
        .await
        .expect("spawn");
    let outcome = lp
        .wait_for_init_error(Duration::from_secs(10))
        .await
        .expect("outcome");
    assert_eq!(outcome.exit_status.and_then(|s| s.code()), Some(1));
    assert!(outcome.output_contains("invalid LOG_LEVEL"), "{outcome:?}");
    assert!(outcome.failed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_error_post_is_captured() {
    if !have_curl() {
        eprintln!("skipping: curl not found");
        return;
    }
    let bin = script(
        "init-error",
        r#"echo "QUEUE_URL is required" >&2
curl -sS -o /dev/null -X POST -H 'Lambda-Runtime-Function-Error-Type: Runtime.InitError' \
  -d '{"errorType":"ConfigError","errorMessage":"QUEUE_URL is required"}' \
  "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/init/error"
exit 1"#,
    );
    let lp = LambdaProcess::spawn(LambdaSpawn::new(&bin, "init-error"))
        .await
        .expect("spawn");
    let outcome = lp
        .wait_for_init_error(Duration::from_secs(10))
        .await
        .expect("outcome");
    let init = outcome.init_error.clone().expect("init error posted");
    assert_eq!(init.error_type, "ConfigError");
    assert_eq!(init.error_message, "QUEUE_URL is required");
    assert_eq!(init.header_error_type.as_deref(), Some("Runtime.InitError"));
    assert_eq!(outcome.exit_status.and_then(|s| s.code()), Some(1));
    assert!(outcome.output_contains("QUEUE_URL is required"));
    assert_eq!(lp.init_error(), Some(init));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_times_out_and_the_stale_event_is_not_handed_out() {
    let lp = idle_process("slow", Duration::from_millis(300)).await;
    let started = Instant::now();
    let err = lp.invoke(json!({"late": true})).await.expect_err("timeout");
    assert!(matches!(err, HarnessError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("invocation/next"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The abandoned event is skipped: a poll now waits (and times out).
    let api = lp.runtime_api();
    let r = http_request_timeout(&api, "GET", NEXT, &[], b"", Duration::from_millis(300)).await;
    assert!(matches!(r, Err(HarnessError::Timeout { .. })), "{r:?}");
    // Let the server see that poll go away (see odd_requests_do_not_break_the_server).
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Picked up but never answered: the second phase times out too.
    let client = tokio::spawn({
        let api = api.clone();
        async move { http_request(&api, "GET", NEXT, &[], b"").await }
    });
    let err = lp.invoke(json!({"n": 2})).await.expect_err("timeout");
    assert!(
        err.to_string().contains("to post a response or error"),
        "{err}"
    );
    let next = client.await.expect("join").expect("poll");
    assert_eq!(next.json().expect("json"), json!({"n": 2}));

    let status = lp.shutdown().await.expect("shutdown");
    assert!(status.is_some_and(|s| !s.success()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_reports_a_missing_binary() {
    let err = LambdaProcess::spawn(LambdaSpawn::new(
        Path::new("/nonexistent/bootstrap"),
        "missing",
    ))
    .await
    .expect_err("missing binary");
    assert!(matches!(err, HarnessError::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/bootstrap"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_kills_the_child() {
    let lp = idle_process("dropped", Duration::from_secs(5)).await;
    let pid = lp.pid().expect("pid");
    drop(lp);
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Gone, or a zombie until reaped.
        let state = std::fs::read_to_string(proc_dir.join("stat")).unwrap_or_default();
        let zombie_or_gone = state.is_empty() || state.contains(") Z ");
        if zombie_or_gone {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} still running: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_start_reset_and_endpoint_reuse() {
    // Moto::start() gives a server that answers: its own, or MOTO_ENDPOINT's when the
    // environment sets one.
    let started = Moto::start().await.expect("Moto::start");
    let resp = started
        .request("GET", "/moto-api/", &[], b"")
        .await
        .expect("GET /moto-api/");
    assert!(resp.status < 500, "{}", resp.status);

    // An owned server (spawn explicitly if start() reused an external one).
    let moto = if started.owns_server() {
        started
    } else {
        drop(started);
        Moto::spawn().await.expect("moto_server starts")
    };
    assert!(moto.owns_server());
    let endpoint = moto.endpoint().to_owned();
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{endpoint}");
    let resp = moto
        .request("GET", "/moto-api/", &[], b"")
        .await
        .expect("GET /moto-api/");
    assert_eq!(resp.status, 200);
    moto.reset().await.expect("reset");

    // MOTO_ENDPOINT reuse: start() must not spawn. This is the only test in this
    // binary that reads MOTO_ENDPOINT, so setting it here is safe.
    let previous = std::env::var_os(MOTO_ENDPOINT_VAR);
    std::env::set_var(MOTO_ENDPOINT_VAR, format!("{endpoint}/"));
    let reused = Moto::start().await;
    match previous {
        Some(v) => std::env::set_var(MOTO_ENDPOINT_VAR, v),
        None => std::env::remove_var(MOTO_ENDPOINT_VAR),
    }
    let reused = reused.expect("reuse MOTO_ENDPOINT");
    assert!(!reused.owns_server());
    assert_eq!(reused.endpoint(), endpoint);
    reused
        .reset()
        .await
        .expect("reset through the reused handle");
    drop(reused);
    // Dropping the reused handle leaves the server running.
    Moto::connect(&endpoint)
        .await
        .expect("still up after dropping the reused handle");

    // Endpoints that do not answer or are not http:// are refused.
    let authority = moto.authority().to_owned();
    moto.shutdown().await;
    let err = Moto::connect(&endpoint).await.expect_err("server is gone");
    assert!(matches!(err, HarnessError::Moto(_)), "{err}");
    assert!(err.to_string().contains(&authority), "{err}");
    let err = Moto::connect("https://127.0.0.1:1")
        .await
        .expect_err("https");
    assert!(err.to_string().contains("http://"), "{err}");
}

#[tokio::test]
async fn counting_proxy_forwards_and_counts_each_operation(
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let moto = integration_tests::moto::Moto::start().await?;
    let proxy = integration_tests::counting_proxy::CountingProxy::start(moto.endpoint()).await?;
    let config = integration_tests::aws::sdk_config(&proxy.endpoint()).await;
    let clients = integration_tests::aws::Clients::new(&config);
    let table = integration_tests::aws::unique_name("proxy");
    clients.create_table(&table).await?;
    let item = clients.bucket_item(&table, "nothing").await?;
    assert!(item.is_none());
    clients.bucket_item(&table, "nothing").await?;
    assert_eq!(proxy.count("GetItem"), 2);
    assert_eq!(proxy.count("CreateTable"), 1);
    assert_eq!(proxy.count("UpdateItem"), 0);
    proxy.reset();
    assert!(proxy.counts().is_empty());
    Ok(())
}
