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

pub struct CountingProxy {
    addr: SocketAddr,
    counts: Counts,
    log: Log,
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
        let task_counts = counts.clone();
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counts = task_counts.clone();
                let log = task_log.clone();
                let authority = authority.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        forward(req, authority.clone(), counts.clone(), log.clone())
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
            task,
        })
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

async fn forward(
    req: Request<Incoming>,
    authority: String,
    counts: Counts,
    log: Log,
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
