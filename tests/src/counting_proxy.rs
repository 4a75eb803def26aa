//! A counting HTTP proxy in front of moto, so tests and the benchmark can count the
//! requests that really reached a service (for example DynamoDB `UpdateItem` calls),
//! rather than trusting the function's own report.
//!
//! Point a function at it with `AWS_ENDPOINT_URL_DYNAMODB` (or `_SQS`): the AWS JSON
//! protocols name the operation in `X-Amz-Target` (`DynamoDB_20120810.UpdateItem`),
//! which is what gets counted. S3 Control (`AWS_ENDPOINT_URL_S3_CONTROL`, REST-XML) has
//! no such header: its access point calls count as `S3Control.GetAccessPoint`,
//! `S3Control.ListAccessPoints` and so on. Each request is forwarded as it is to the
//! upstream and its response returned as it is. [`CountingProxy::start_recording`] also
//! keeps each request and answer, so a test can read what a function sent (for example
//! a message delayed by 900 s, which it cannot receive in time).
//!
//! [`CountingProxy::fail_next_matching`] makes it answer some requests itself, with an
//! error, instead of forwarding them: a write that is lost (for example the refresher's
//! `PutItem` that records a call's `NotificationId`). Such requests are counted too.

use crate::runtime_api::http_request;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type Counts = Arc<Mutex<BTreeMap<String, u64>>>;

/// One request forwarded upstream and its answer (recording proxies only).
#[derive(Debug, Clone)]
pub struct Exchange {
    /// `X-Amz-Target`, e.g. `AmazonSQS.SendMessage`.
    pub target: String,
    pub request: Value,
    pub status: u16,
    pub response: Value,
}

/// `None` for a proxy that only counts.
type Log = Option<Arc<Mutex<Vec<Exchange>>>>;

/// The error answer that [`CountingProxy::fail_next_matching`] gives, in the AWS JSON
/// protocols' shape (`{"__type": ..., "message": ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedError {
    pub status: u16,
    /// `__type`, e.g. `com.amazon.coral.validate#ValidationException`.
    pub error_type: String,
    pub message: String,
}

impl InjectedError {
    /// HTTP 400 `ValidationException`: the SDKs do not retry it, so one injected
    /// answer fails one call.
    pub fn validation(message: &str) -> InjectedError {
        InjectedError {
            status: 400,
            error_type: "com.amazon.coral.validate#ValidationException".to_string(),
            message: message.to_string(),
        }
    }

    /// HTTP 500 `InternalServerError`: the SDKs retry it (up to 3 attempts by default),
    /// so failing one call takes as many injected answers as attempts.
    pub fn internal_server_error(message: &str) -> InjectedError {
        InjectedError {
            status: 500,
            error_type: "com.amazonaws.dynamodb.v20120810#InternalServerError".to_string(),
            message: message.to_string(),
        }
    }
}

/// A rule of [`CountingProxy::fail_next_matching`].
#[derive(Debug, Clone)]
struct FailureRule {
    operation: String,
    body_contains: String,
    remaining: u32,
    error: InjectedError,
}

#[derive(Debug, Default)]
struct Faults {
    rules: Vec<FailureRule>,
    /// The requests answered by a rule, in order.
    injected: Vec<Exchange>,
}

type SharedFaults = Arc<Mutex<Faults>>;

pub struct CountingProxy {
    addr: SocketAddr,
    counts: Counts,
    log: Log,
    faults: SharedFaults,
    task: JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CountingProxy {
    /// Starts a proxy on `127.0.0.1:0` that forwards to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<CountingProxy> {
        CountingProxy::start_with(upstream, None).await
    }

    /// A proxy that also keeps every exchange ([`CountingProxy::exchanges`]).
    pub async fn start_recording(upstream: &str) -> std::io::Result<CountingProxy> {
        CountingProxy::start_with(upstream, Some(Arc::default())).await
    }

    async fn start_with(upstream: &str, log: Log) -> std::io::Result<CountingProxy> {
        let authority = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let counts: Counts = Arc::default();
        let faults: SharedFaults = Arc::default();
        let task_counts = counts.clone();
        let task_log = log.clone();
        let task_faults = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counts = task_counts.clone();
                let log = task_log.clone();
                let faults = task_faults.clone();
                let authority = authority.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        forward(
                            req,
                            authority.clone(),
                            counts.clone(),
                            log.clone(),
                            faults.clone(),
                        )
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(CountingProxy {
            addr,
            counts,
            log,
            faults,
            task,
        })
    }

    /// The next `count` requests of `operation` (`X-Amz-Target` ending in
    /// `.{operation}`, e.g. "PutItem") whose body contains `body_contains` (e.g.
    /// `"NotificationId"`, with its quotes, for an attribute of that name) are answered
    /// with `error` and not forwarded: the upstream never sees them. Rules apply in
    /// the order they were added; repeated calls add rules.
    pub fn fail_next_matching(
        &self,
        operation: &str,
        body_contains: &str,
        count: u32,
        error: InjectedError,
    ) {
        lock(&self.faults).rules.push(FailureRule {
            operation: operation.to_string(),
            body_contains: body_contains.to_string(),
            remaining: count,
            error,
        });
    }

    /// The requests answered by [`CountingProxy::fail_next_matching`], in order, with
    /// the error they got (`response` is its JSON body).
    pub fn injected_failures(&self) -> Vec<Exchange> {
        lock(&self.faults).injected.clone()
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests whose `X-Amz-Target` ends with `.{operation}` (e.g. "UpdateItem").
    pub fn count(&self, operation: &str) -> u64 {
        let suffix = format!(".{operation}");
        lock(&self.counts)
            .iter()
            .filter(|(target, _)| target.ends_with(&suffix) || *target == operation)
            .map(|(_, n)| n)
            .sum()
    }

    /// Every operation seen so far, by `X-Amz-Target` ("(none)" without one).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        lock(&self.counts).clone()
    }

    pub fn reset(&self) {
        lock(&self.counts).clear();
    }

    /// The successful exchanges of `operation` (e.g. "SendMessage"), in order; empty
    /// for a proxy that does not record.
    pub fn exchanges(&self, operation: &str) -> Vec<Exchange> {
        let suffix = format!(".{operation}");
        self.all_exchanges()
            .into_iter()
            .filter(|e| e.target.ends_with(&suffix) && e.status == 200)
            .collect()
    }

    /// Every recorded exchange, in order.
    pub fn all_exchanges(&self) -> Vec<Exchange> {
        self.log
            .as_ref()
            .map(|l| lock(l).clone())
            .unwrap_or_default()
    }
}

/// The error of the first rule that `target` and `body` match, if any (and uses it up).
fn injected_answer(faults: &SharedFaults, target: &str, body: &[u8]) -> Option<InjectedError> {
    let mut faults = lock(faults);
    let rule = faults.rules.iter_mut().find(|rule| {
        rule.remaining > 0
            && target.ends_with(&format!(".{}", rule.operation))
            && contains(body, rule.body_contains.as_bytes())
    })?;
    rule.remaining -= 1;
    let error = rule.error.clone();
    faults.rules.retain(|rule| rule.remaining > 0);
    faults.injected.push(Exchange {
        target: target.to_string(),
        request: serde_json::from_slice(body).unwrap_or(Value::Null),
        status: error.status,
        response: error_body(&error),
    });
    Some(error)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn error_body(error: &InjectedError) -> Value {
    serde_json::json!({"__type": error.error_type, "message": error.message})
}

async fn forward(
    req: Request<Incoming>,
    authority: String,
    counts: Counts,
    log: Log,
    faults: SharedFaults,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let target = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| s3control_operation(req.method().as_str(), req.uri().path()))
        .unwrap_or_else(|| "(none)".to_string());
    *lock(&counts).entry(target.clone()).or_default() += 1;
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    // Hop-by-hop and framing headers are the forwarding client's own business.
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "host" | "connection" | "content-length" | "transfer-encoding"
            )
        })
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    let body = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, &e.to_string())),
    };
    if let Some(injected) = injected_answer(&faults, &target, &body) {
        let status = StatusCode::from_u16(injected.status).unwrap_or(StatusCode::BAD_REQUEST);
        let payload = error_body(&injected).to_string();
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amzn-requestid", "injected-by-counting-proxy")
            .body(Full::new(Bytes::from(payload)))
            .unwrap_or_else(|e| error(StatusCode::BAD_GATEWAY, &e.to_string())));
    }
    let header_refs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    match http_request(&authority, &method, &path, &header_refs, &body).await {
        Ok(upstream) => {
            if let Some(log) = &log {
                lock(log).push(Exchange {
                    target,
                    request: serde_json::from_slice(&body).unwrap_or(Value::Null),
                    status: upstream.status,
                    response: serde_json::from_slice(&upstream.body).unwrap_or(Value::Null),
                });
            }
            let mut response = Response::builder().status(upstream.status);
            for (name, value) in &upstream.headers {
                let lower = name.to_ascii_lowercase();
                if !matches!(
                    lower.as_str(),
                    "connection" | "content-length" | "transfer-encoding"
                ) {
                    response = response.header(name.as_str(), value.as_str());
                }
            }
            Ok(response
                .body(Full::new(Bytes::from(upstream.body)))
                .unwrap_or_else(|e| error(StatusCode::BAD_GATEWAY, &e.to_string())))
        }
        Err(e) => Ok(error(StatusCode::BAD_GATEWAY, &e.to_string())),
    }
}

/// S3 Control speaks REST-XML, without `X-Amz-Target`: its access point operations
/// are named from the method and the path, as `S3Control.GetAccessPoint`.
fn s3control_operation(method: &str, path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v20180820/")?;
    let operation = match (method, rest.split('/').collect::<Vec<_>>().as_slice()) {
        ("GET", ["accesspoint"]) => "ListAccessPoints".to_string(),
        ("GET", ["accesspoint", _]) => "GetAccessPoint".to_string(),
        ("PUT", ["accesspoint", _]) => "CreateAccessPoint".to_string(),
        ("DELETE", ["accesspoint", _]) => "DeleteAccessPoint".to_string(),
        _ => format!("{method} /v20180820/{rest}"),
    };
    Some(format!("S3Control.{operation}"))
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(message.to_string())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fail_only_matching_requests_and_run_out() {
        let faults: SharedFaults = Arc::default();
        lock(&faults).rules.push(FailureRule {
            operation: "PutItem".into(),
            body_contains: "\"NotificationId\"".into(),
            remaining: 2,
            error: InjectedError::validation("lost"),
        });
        let with_id = br#"{"Item": {"Slots": {"L": [{"M": {"NotificationId": {"S": "n"}}}]}}}"#;
        let without = br#"{"Item": {"Slots": {"L": []}}}"#;
        let put = "DynamoDB_20120810.PutItem";
        assert_eq!(injected_answer(&faults, put, without), None);
        assert_eq!(
            injected_answer(&faults, "DynamoDB_20120810.UpdateItem", with_id),
            None
        );
        assert_eq!(
            injected_answer(&faults, put, with_id).map(|e| e.status),
            Some(400)
        );
        assert!(injected_answer(&faults, put, with_id).is_some());
        assert_eq!(injected_answer(&faults, put, with_id), None, "used up");
        let injected = lock(&faults).injected.clone();
        assert_eq!(injected.len(), 2);
        assert_eq!(
            injected[0].response["__type"],
            "com.amazon.coral.validate#ValidationException"
        );
    }
}
