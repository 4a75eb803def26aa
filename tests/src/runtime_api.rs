//! A Lambda Runtime API (2018-06-01) server that runs a real Lambda binary the way
//! the Lambda service does.
//!
//! [`LambdaProcess::spawn`] binds a Runtime API server on `127.0.0.1:0`, starts the
//! binary with `AWS_LAMBDA_RUNTIME_API` pointing at it, and captures the binary's
//! stdout and stderr line by line ([`ChildOutput`] says where they go besides: this
//! process's stderr unless told otherwise). [`LambdaProcess::invoke`] queues one event,
//! hands it out on the next `GET /runtime/invocation/next` and waits for the runtime to
//! post `/response` or `/error` for that request id.
//!
//! Endpoints served (paths and headers as the `lambda_runtime` crate's client uses
//! them):
//!
//! | request | reply |
//! |---|---|
//! | `GET /2018-06-01/runtime/invocation/next` | long-poll; `200`, body = event JSON, headers `Lambda-Runtime-Aws-Request-Id`, `Lambda-Runtime-Deadline-Ms`, `Lambda-Runtime-Invoked-Function-Arn`, `Lambda-Runtime-Trace-Id` |
//! | `POST /2018-06-01/runtime/invocation/{id}/response` | `202`; `400` for an unknown or finished request id |
//! | `POST /2018-06-01/runtime/invocation/{id}/error` | `202`; `400` for an unknown or finished request id |
//! | `POST /2018-06-01/runtime/init/error` | `202` |
//! | `POST /2020-01-01/extension/register` | `200`, header `Lambda-Extension-Identifier`: an internal extension (the aggregator's, which only makes Lambda send SIGTERM at shutdown; see [`LambdaProcess::shutdown_as_lambda`]) |
//! | `GET /2020-01-01/extension/event/next` | never answers: such an extension subscribes to no event |
//! | anything else | `404` (`405` for a known path with the wrong method) |
//!
//! The child gets a clean environment, as in Lambda: the `AWS_LAMBDA_*` variables,
//! `AWS_REGION`/`AWS_DEFAULT_REGION` (default `us-east-1`), `TZ`, `LANG`,
//! `AWS_LAMBDA_INITIALIZATION_TYPE=on-demand`, and from the test process only `PATH`,
//! `RUST_BACKTRACE` and `LLVM_PROFILE_FILE`. Everything else (credentials,
//! `AWS_ENDPOINT_URL`, `QUEUE_URL`, `LOG_LEVEL`, `RUST_LOG`, ...) must be passed in
//! [`LambdaSpawn::env`], which wins over the defaults.
//!
//! This module also holds the crate's shared error type, [`HarnessError`], and a
//! small HTTP/1.1 client on hyper's ([`http_request`]) used by [`crate::moto`], the
//! proxies and by tests that act as a runtime client themselves.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client_http1;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Default invocation timeout, as in [`LambdaSpawn::new`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest request body the server accepts (Lambda's 6 MB synchronous payload limit,
/// plus some slack).
const MAX_BODY_BYTES: usize = 6 * 1024 * 1024 + 64 * 1024;

/// How many of the last output lines go into error messages.
const TAIL_LINES: usize = 40;

/// Lines kept per process; beyond this the oldest are dropped.
const MAX_KEPT_LINES: usize = 200_000;

/// `ETXTBSY` on Linux ("Text file busy").
const ETXTBSY: i32 = 26;

/// After the process exits, how long to wait for its stdout/stderr to reach EOF.
const OUTPUT_SETTLE: Duration = Duration::from_secs(2);

// ------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------

/// The error type of the test harness (Runtime API server, moto helper, HTTP client).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A child process exited while we were waiting for something else.
    #[error("{what} exited ({}) {during}{}", describe_status(.status), format_tail(.last_lines))]
    ProcessExited {
        what: String,
        during: String,
        status: Option<ExitStatus>,
        last_lines: Vec<String>,
    },
    /// Something did not happen in time.
    #[error("timed out after {after:?} waiting for {waiting_for}{}", format_tail(.last_lines))]
    Timeout {
        waiting_for: String,
        after: Duration,
        last_lines: Vec<String>,
    },
    /// `moto_server` is not installed.
    #[error("{0}")]
    MotoNotInstalled(String),
    /// The moto server could not be started or reached.
    #[error("moto: {0}")]
    Moto(String),
    /// A malformed HTTP exchange or endpoint.
    #[error("HTTP: {0}")]
    Http(String),
}

impl HarnessError {
    /// An [`HarnessError::Io`] with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }

    /// The exit status, when this error reports a process that exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        match self {
            HarnessError::ProcessExited { status, .. } => *status,
            _ => None,
        }
    }

    /// The last captured output lines included in this error, if any.
    pub fn last_lines(&self) -> &[String] {
        match self {
            HarnessError::ProcessExited { last_lines, .. }
            | HarnessError::Timeout { last_lines, .. } => last_lines,
            _ => &[],
        }
    }
}

fn describe_status(status: &Option<ExitStatus>) -> String {
    match status {
        Some(s) => s.to_string(),
        None => "exit status unknown".to_owned(),
    }
}

fn format_tail(lines: &[String]) -> String {
    if lines.is_empty() {
        return "; no output captured".to_owned();
    }
    let mut out = format!("; last {} output line(s):", lines.len());
    for line in lines {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}

// ------------------------------------------------------------------------------------
// Public types
// ------------------------------------------------------------------------------------

/// How to start a Lambda binary under [`LambdaProcess::spawn`].
#[derive(Debug, Clone)]
pub struct LambdaSpawn<'a> {
    /// The executable (e.g. `target/debug/aggregator`).
    pub binary: &'a Path,
    /// Extra environment; wins over the variables the harness sets.
    pub env: Vec<(String, String)>,
    /// `AWS_LAMBDA_FUNCTION_NAME`, also used in the function ARN and log prefixes.
    pub function_name: String,
    /// Function timeout: sets `Lambda-Runtime-Deadline-Ms`, and bounds how long
    /// [`LambdaProcess::invoke`] waits for the event to be picked up and, again, for
    /// the result.
    pub timeout: Duration,
    /// Where the child's lines go besides [`LambdaProcess::output_lines`].
    pub output: ChildOutput,
}

impl<'a> LambdaSpawn<'a> {
    /// A spec with no extra environment and the default 30 s timeout.
    pub fn new(binary: &'a Path, function_name: impl Into<String>) -> Self {
        LambdaSpawn {
            binary,
            env: Vec::new(),
            function_name: function_name.into(),
            timeout: DEFAULT_TIMEOUT,
            output: ChildOutput::process_default(),
        }
    }

    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the function timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets where the child's lines go (the default is [`set_default_child_output`]'s).
    pub fn output(mut self, output: ChildOutput) -> Self {
        self.output = output;
        self
    }
}

/// The outcome of one invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// The runtime posted `/response`. A body that is not JSON is kept as a JSON string.
    Response(serde_json::Value),
    /// The runtime posted `/error`.
    Error {
        error_type: String,
        error_message: String,
    },
}

impl Invocation {
    /// The response payload, if the invocation succeeded.
    pub fn response(&self) -> Option<&serde_json::Value> {
        match self {
            Invocation::Response(v) => Some(v),
            Invocation::Error { .. } => None,
        }
    }

    /// Whether the runtime reported a function error.
    pub fn is_error(&self) -> bool {
        matches!(self, Invocation::Error { .. })
    }
}

/// What the runtime posted to `/runtime/init/error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitError {
    pub error_type: String,
    pub error_message: String,
    /// The `Lambda-Runtime-Function-Error-Type` header, if present.
    pub header_error_type: Option<String>,
}

/// Result of [`LambdaProcess::wait_for_init_error`].
#[derive(Debug, Clone)]
pub struct InitOutcome {
    /// The posted init error, if the runtime posted one.
    pub init_error: Option<InitError>,
    /// The exit status, if the process has exited (the harness waits up to 2 s for the
    /// exit after an init error is posted).
    pub exit_status: Option<ExitStatus>,
    /// All captured stdout+stderr lines.
    pub output: Vec<String>,
}

impl InitOutcome {
    /// Whether any captured line contains `needle`.
    pub fn output_contains(&self, needle: &str) -> bool {
        self.output.iter().any(|l| l.contains(needle))
    }

    /// True when the function failed its init: it posted an init error or exited with a
    /// non-success status.
    pub fn failed(&self) -> bool {
        self.init_error.is_some() || self.exit_status.is_some_and(|s| !s.success())
    }
}

// ------------------------------------------------------------------------------------
// Server state
// ------------------------------------------------------------------------------------

struct Queued {
    request_id: String,
    event: Bytes,
    /// Told when the event is handed out; closed when `invoke` gave up.
    picked: oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    first_poll: Option<Instant>,
    /// Invocations waiting for `/response` or `/error`, by request id.
    pending: HashMap<String, oneshot::Sender<Invocation>>,
    /// When each unfinished invocation was handed out on `/next`, by request id.
    handed_out: HashMap<String, Instant>,
    /// From hand-out on `/next` to the runtime's `/response` or `/error`, in
    /// completion order (at most [`MAX_KEPT_HANDLER_TIMES`]).
    handler_times: Vec<Duration>,
}

/// Handler times kept per process; beyond this the oldest are dropped.
const MAX_KEPT_HANDLER_TIMES: usize = 1_000_000;

struct Shared {
    function_name: String,
    function_arn: String,
    timeout: Duration,
    spawned_at: Instant,
    queue_tx: mpsc::UnboundedSender<Queued>,
    queue_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Queued>>,
    state: Mutex<State>,
    init_error: watch::Sender<Option<InitError>>,
    output: Mutex<Vec<String>>,
    echo: ChildOutput,
    /// [`LambdaProcess::kill`]: the monitor task SIGKILLs the child.
    kill_now: tokio::sync::Notify,
    /// The names of the extensions that the process registered (Extensions API): with
    /// one, Lambda sends the runtime SIGTERM before it shuts the container down.
    extensions: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn push_line(&self, stream: &str, line: String) {
        self.echo.write_line(&self.function_name, stream, &line);
        let mut out = lock(&self.output);
        if out.len() >= MAX_KEPT_LINES {
            out.drain(..MAX_KEPT_LINES / 10);
        }
        out.push(line);
    }

    fn tail(&self) -> Vec<String> {
        let out = lock(&self.output);
        let start = out.len().saturating_sub(TAIL_LINES);
        out[start..].to_vec()
    }
}

// ------------------------------------------------------------------------------------
// LambdaProcess
// ------------------------------------------------------------------------------------

/// A Lambda binary running under a local Runtime API server.
///
/// Dropping it kills the child (and the server).
pub struct LambdaProcess {
    shared: Arc<Shared>,
    addr: SocketAddr,
    pid: Option<u32>,
    exit_rx: watch::Receiver<Option<Option<ExitStatus>>>,
    output_closed_rx: watch::Receiver<u8>,
    kill_tx: Option<oneshot::Sender<()>>,
    server_task: JoinHandle<()>,
    monitor_task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LambdaProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LambdaProcess")
            .field("function_name", &self.shared.function_name)
            .field("runtime_api", &self.addr)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl LambdaProcess {
    /// Starts the Runtime API server and the binary. Returns as soon as the process is
    /// spawned; it has not necessarily polled yet.
    pub async fn spawn(spec: LambdaSpawn<'_>) -> Result<LambdaProcess, HarnessError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| HarnessError::io("binding the Runtime API server", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HarnessError::io("reading the Runtime API server address", e))?;

        let region = spec
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "AWS_REGION")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "us-east-1".to_owned());
        let function_arn = format!(
            "arn:aws:lambda:{region}:123456789012:function:{}",
            spec.function_name
        );

        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let (init_error, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            function_name: spec.function_name.clone(),
            function_arn,
            timeout: spec.timeout,
            spawned_at: Instant::now(),
            queue_tx,
            queue_rx: tokio::sync::Mutex::new(queue_rx),
            state: Mutex::new(State::default()),
            init_error,
            output: Mutex::new(Vec::new()),
            echo: spec.output.clone(),
            kill_now: tokio::sync::Notify::new(),
            extensions: Mutex::new(Vec::new()),
        });

        let server_task = tokio::spawn(serve(listener, shared.clone()));

        let mut cmd = Command::new(spec.binary);
        cmd.env_clear();
        for key in ["PATH", "RUST_BACKTRACE", "LLVM_PROFILE_FILE"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        let log_stream = format!("2018/06/01/[$LATEST]{}", &unique_hex()[..32]);
        let defaults = [
            ("AWS_LAMBDA_RUNTIME_API", addr.to_string()),
            ("AWS_LAMBDA_FUNCTION_NAME", spec.function_name.clone()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128".to_owned()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".to_owned()),
            ("AWS_LAMBDA_LOG_STREAM_NAME", log_stream),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", spec.function_name),
            ),
            ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".to_owned()),
            ("AWS_REGION", region.clone()),
            ("AWS_DEFAULT_REGION", region),
            ("TZ", ":UTC".to_owned()),
            ("LANG", "en_US.UTF-8".to_owned()),
        ];
        for (k, v) in defaults {
            cmd.env(k, v);
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);

        // ETXTBSY: the binary was written just now and another thread's fork still
        // holds it open for writing (tests that write scripts); it clears quickly.
        let mut attempts = 0;
        let mut child = loop {
            attempts += 1;
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(ETXTBSY) && attempts < 20 => {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(e) => {
                    server_task.abort();
                    return Err(HarnessError::io(
                        format!("spawning {}", spec.binary.display()),
                        e,
                    ));
                }
            }
        };
        let pid = child.id();

        let (closed_tx, output_closed_rx) = watch::channel(0u8);
        let closed_tx = Arc::new(closed_tx);
        let mut pumps = 0u8;
        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(out, "stdout", shared.clone(), closed_tx.clone()));
            pumps += 1;
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, "stderr", shared.clone(), closed_tx.clone()));
            pumps += 1;
        }
        // Count the missing pipes as closed already, so "both closed" is always 2.
        closed_tx.send_modify(|c| *c += 2 - pumps);

        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let killer = shared.clone();
        let monitor_task = tokio::spawn(async move {
            let status = tokio::select! {
                s = child.wait() => s,
                // Either an explicit kill or the handle was dropped.
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
                // `kill()`: SIGKILL while the handle lives on.
                _ = killer.kill_now.notified() => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            exit_tx.send_replace(Some(status.ok()));
        });

        Ok(LambdaProcess {
            shared,
            addr,
            pid,
            exit_rx,
            output_closed_rx,
            kill_tx: Some(kill_tx),
            server_task,
            monitor_task: Some(monitor_task),
        })
    }

    /// Queues `event` and waits for the runtime's `/response` or `/error` for it.
    ///
    /// Errors if the process exits first (with its exit status and last output lines),
    /// if the event is not picked up within the timeout, or if no result is posted
    /// within the timeout after it was picked up.
    pub async fn invoke(&self, event: serde_json::Value) -> Result<Invocation, HarnessError> {
        if self.exited().is_some() {
            return Err(self.exited_error("before the invocation was queued").await);
        }
        let body = serde_json::to_vec(&event).map_err(|e| {
            HarnessError::Http(format!("the event could not be serialised to JSON: {e}"))
        })?;
        let request_id = new_request_id();
        let (done_tx, mut done_rx) = oneshot::channel();
        let (picked_tx, picked_rx) = oneshot::channel();
        lock(&self.shared.state)
            .pending
            .insert(request_id.clone(), done_tx);
        let _remove_on_return = RemovePending {
            shared: &self.shared,
            request_id: &request_id,
        };
        if self
            .shared
            .queue_tx
            .send(Queued {
                request_id: request_id.clone(),
                event: Bytes::from(body),
                picked: picked_tx,
            })
            .is_err()
        {
            return Err(HarnessError::Http("the invocation queue is closed".into()));
        }

        let timeout = self.shared.timeout;
        let mut exit_rx = self.exit_rx.clone();

        // Phase 1: the runtime picks the event up.
        tokio::select! {
            biased;
            r = &mut done_rx => return self.finished(r, &request_id).await,
            _ = picked_rx => {}
            _ = exit_rx.wait_for(|s| s.is_some()) => {
                if let Ok(inv) = done_rx.try_recv() {
                    return Ok(inv);
                }
                return Err(self.exited_error(&format!(
                    "before polling for invocation {request_id}"
                )).await);
            }
            _ = tokio::time::sleep(timeout) => {
                return Err(HarnessError::Timeout {
                    waiting_for: format!(
                        "`{}` to poll /invocation/next for request {request_id}",
                        self.shared.function_name
                    ),
                    after: timeout,
                    last_lines: self.shared.tail(),
                });
            }
        }

        // Phase 2: the runtime posts the result.
        tokio::select! {
            biased;
            r = &mut done_rx => self.finished(r, &request_id).await,
            _ = exit_rx.wait_for(|s| s.is_some()) => {
                if let Ok(inv) = done_rx.try_recv() {
                    return Ok(inv);
                }
                Err(self.exited_error(&format!("during invocation {request_id}")).await)
            }
            _ = tokio::time::sleep(timeout) => Err(HarnessError::Timeout {
                waiting_for: format!(
                    "`{}` to post a response or error for request {request_id}",
                    self.shared.function_name
                ),
                after: timeout,
                last_lines: self.shared.tail(),
            }),
        }
    }

    async fn finished(
        &self,
        r: Result<Invocation, oneshot::error::RecvError>,
        request_id: &str,
    ) -> Result<Invocation, HarnessError> {
        match r {
            Ok(inv) => Ok(inv),
            Err(_) => Err(HarnessError::Http(format!(
                "invocation {request_id} was dropped by the server"
            ))),
        }
    }

    /// Waits until the process exits or posts `/runtime/init/error`, for config-error
    /// tests. After an init error is posted it waits up to 2 s more for the exit, and
    /// after the exit up to 2 s for the output pipes to drain.
    pub async fn wait_for_init_error(&self, within: Duration) -> Result<InitOutcome, HarnessError> {
        let mut exit_rx = self.exit_rx.clone();
        let mut init_rx = self.shared.init_error.subscribe();
        let init_posted = tokio::select! {
            biased;
            _ = exit_rx.wait_for(|s| s.is_some()) => false,
            _ = init_rx.wait_for(|e| e.is_some()) => true,
            _ = tokio::time::sleep(within) => {
                return Err(HarnessError::Timeout {
                    waiting_for: format!(
                        "`{}` to exit or post /runtime/init/error",
                        self.shared.function_name
                    ),
                    after: within,
                    last_lines: self.shared.tail(),
                });
            }
        };
        if init_posted {
            let _ = tokio::time::timeout(Duration::from_secs(2), exit_rx.wait_for(|s| s.is_some()))
                .await;
        }
        self.settle_output().await;
        Ok(InitOutcome {
            init_error: self.init_error(),
            exit_status: self.exit_status(),
            output: self.output_lines(),
        })
    }

    /// All captured stdout+stderr lines so far, in arrival order.
    pub fn output_lines(&self) -> Vec<String> {
        lock(&self.shared.output).clone()
    }

    /// Whether any captured line so far contains `needle`.
    pub fn output_contains(&self, needle: &str) -> bool {
        lock(&self.shared.output).iter().any(|l| l.contains(needle))
    }

    /// Time from spawn to the first `GET /invocation/next`.
    pub fn first_poll_latency(&self) -> Option<Duration> {
        lock(&self.shared.state)
            .first_poll
            .map(|t| t.saturating_duration_since(self.shared.spawned_at))
    }

    /// For each finished invocation, in completion order: the time from handing the
    /// event out on `GET /invocation/next` to receiving the runtime's `/response` or
    /// `/error` (the handler's time plus two loopback HTTP exchanges).
    pub fn handler_times(&self) -> Vec<Duration> {
        lock(&self.shared.state).handler_times.clone()
    }

    /// Forgets the handler times recorded so far.
    pub fn clear_handler_times(&self) {
        lock(&self.shared.state).handler_times.clear();
    }

    /// The child's pid while it runs; `None` once it has exited.
    pub fn pid(&self) -> Option<u32> {
        if self.exited().is_some() {
            None
        } else {
            self.pid
        }
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exited().flatten()
    }

    /// Whether the process has exited.
    pub fn has_exited(&self) -> bool {
        self.exited().is_some()
    }

    /// The init error the runtime posted, if any.
    pub fn init_error(&self) -> Option<InitError> {
        self.shared.init_error.borrow().clone()
    }

    /// The Runtime API address (`127.0.0.1:PORT`), as in `AWS_LAMBDA_RUNTIME_API`.
    pub fn runtime_api(&self) -> String {
        self.addr.to_string()
    }

    /// The Runtime API socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The function ARN sent in `Lambda-Runtime-Invoked-Function-Arn`.
    pub fn function_arn(&self) -> &str {
        &self.shared.function_arn
    }

    /// The extensions that the process registered.
    pub fn extensions(&self) -> Vec<String> {
        lock(&self.shared.extensions).clone()
    }

    /// Shuts the process down as Lambda shuts an idle container down: SIGTERM when it
    /// registered an extension, and SIGKILL 500 ms later if it still runs (the time
    /// Lambda gives a runtime with internal extensions only); else SIGKILL at once.
    /// Returns the exit status, once the output is read.
    pub async fn shutdown_as_lambda(&self) -> Result<Option<ExitStatus>, HarnessError> {
        if let Some(pid) = self.pid.filter(|_| !self.extensions().is_empty()) {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
            let mut exit_rx = self.exit_rx.clone();
            let _ = tokio::time::timeout(
                Duration::from_millis(500),
                exit_rx.wait_for(|s| s.is_some()),
            )
            .await;
        }
        if self.exited().is_none() {
            self.kill();
        }
        let status = self.wait_for_exit(Duration::from_secs(10)).await?;
        self.settle_output().await;
        Ok(status)
    }

    /// Kills the child (if it still runs), waits for it and stops the server. Returns
    /// the exit status.
    pub async fn shutdown(mut self) -> Result<Option<ExitStatus>, HarnessError> {
        if let Some(tx) = self.kill_tx.take() {
            let _ = tx.send(());
        }
        let mut exit_rx = self.exit_rx.clone();
        let waited =
            tokio::time::timeout(Duration::from_secs(10), exit_rx.wait_for(|s| s.is_some())).await;
        self.server_task.abort();
        if waited.is_err() {
            return Err(HarnessError::Timeout {
                waiting_for: format!("`{}` to exit after kill", self.shared.function_name),
                after: Duration::from_secs(10),
                last_lines: self.shared.tail(),
            });
        }
        if let Some(task) = self.monitor_task.take() {
            let _ = task.await;
        }
        self.settle_output().await;
        Ok(self.exit_status())
    }

    fn exited(&self) -> Option<Option<ExitStatus>> {
        *self.exit_rx.borrow()
    }

    async fn settle_output(&self) {
        if self.exited().is_none() {
            return;
        }
        let mut rx = self.output_closed_rx.clone();
        let _ = tokio::time::timeout(OUTPUT_SETTLE, rx.wait_for(|n| *n >= 2)).await;
    }

    async fn exited_error(&self, during: &str) -> HarnessError {
        self.settle_output().await;
        HarnessError::ProcessExited {
            what: format!("lambda process `{}`", self.shared.function_name),
            during: during.to_owned(),
            status: self.exit_status(),
            last_lines: self.shared.tail(),
        }
    }
}

impl Drop for LambdaProcess {
    fn drop(&mut self) {
        if let Some(tx) = self.kill_tx.take() {
            let _ = tx.send(());
        }
        self.server_task.abort();
    }
}

/// Removes a pending invocation when `invoke` returns (or its future is dropped).
struct RemovePending<'a> {
    shared: &'a Shared,
    request_id: &'a str,
}

impl Drop for RemovePending<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.pending.remove(self.request_id);
        state.handed_out.remove(self.request_id);
    }
}

// ------------------------------------------------------------------------------------
// Killing a function process, and starting it again
// ------------------------------------------------------------------------------------

impl LambdaProcess {
    /// Sends SIGKILL to the child now, as when Lambda's execution environment dies
    /// (an out-of-memory kill, a crashed host), without waiting for it. An invocation
    /// in flight ends in [`HarnessError::ProcessExited`], as Lambda ends it: no
    /// response. See [`LambdaProcess::wait_for_exit`] and [`RespawningLambda`].
    pub fn kill(&self) {
        self.shared.kill_now.notify_one();
    }

    /// Waits up to `within` for the child to exit; its exit status (a signal after
    /// [`LambdaProcess::kill`]), `None` when it could not be read.
    pub async fn wait_for_exit(
        &self,
        within: Duration,
    ) -> Result<Option<ExitStatus>, HarnessError> {
        let mut exit_rx = self.exit_rx.clone();
        if tokio::time::timeout(within, exit_rx.wait_for(|s| s.is_some()))
            .await
            .is_err()
        {
            return Err(HarnessError::Timeout {
                waiting_for: format!("`{}` to exit", self.shared.function_name),
                after: within,
                last_lines: self.shared.tail(),
            });
        }
        self.settle_output().await;
        Ok(self.exit_status())
    }

    /// Invocations handed out on `/next` whose result has not been posted yet.
    pub fn invocations_in_flight(&self) -> usize {
        lock(&self.shared.state).handed_out.len()
    }
}

/// A [`LambdaSpawn`] that owns its parts, to start the same function again.
#[derive(Debug, Clone)]
pub struct OwnedLambdaSpawn {
    pub binary: std::path::PathBuf,
    pub env: Vec<(String, String)>,
    pub function_name: String,
    pub timeout: Duration,
    pub output: ChildOutput,
}

impl LambdaSpawn<'_> {
    /// The same spec, owning its binary path.
    pub fn to_owned_spawn(&self) -> OwnedLambdaSpawn {
        OwnedLambdaSpawn {
            binary: self.binary.to_path_buf(),
            env: self.env.clone(),
            function_name: self.function_name.clone(),
            timeout: self.timeout,
            output: self.output.clone(),
        }
    }
}

impl OwnedLambdaSpawn {
    /// A [`LambdaSpawn`] borrowing this spec.
    pub fn as_spawn(&self) -> LambdaSpawn<'_> {
        LambdaSpawn {
            binary: &self.binary,
            env: self.env.clone(),
            function_name: self.function_name.clone(),
            timeout: self.timeout,
            output: self.output.clone(),
        }
    }
}

/// How long [`RespawningLambda`] waits for a killed process to exit.
const KILL_EXIT_WAIT: Duration = Duration::from_secs(10);

/// What [`RespawningLambda::invoke_and_kill`] saw.
#[derive(Debug)]
pub struct KilledInvocation {
    /// What the invocation returned: a [`HarnessError::ProcessExited`] when the kill
    /// came before the runtime posted the result (Lambda then retries an asynchronous
    /// event, and an SQS batch comes back after its visibility timeout), or the result
    /// itself when the runtime posted it first (the kill then hit an idle process).
    pub result: Result<Invocation, HarnessError>,
    /// The kill came while the invocation was in flight: it has no result.
    pub mid_invocation: bool,
    /// From queueing the event to the kill.
    pub killed_after: Duration,
    /// The killed process's exit status (SIGKILL).
    pub exit_status: Option<ExitStatus>,
}

/// A function whose process can be killed with SIGKILL at any point and replaced by a
/// fresh one started from the same spec (a cold start), as Lambda replaces an
/// execution environment that died. One process at a time; [`RespawningLambda::invoke`]
/// goes to the current one.
pub struct RespawningLambda {
    spec: OwnedLambdaSpawn,
    current: Mutex<Arc<LambdaProcess>>,
    spawns: AtomicU64,
}

impl std::fmt::Debug for RespawningLambda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RespawningLambda")
            .field("function_name", &self.spec.function_name)
            .field("spawns", &self.spawns())
            .finish_non_exhaustive()
    }
}

impl RespawningLambda {
    /// Starts the first process.
    pub async fn spawn(spec: LambdaSpawn<'_>) -> Result<RespawningLambda, HarnessError> {
        let spec = spec.to_owned_spawn();
        let process = LambdaProcess::spawn(spec.as_spawn()).await?;
        Ok(RespawningLambda {
            spec,
            current: Mutex::new(Arc::new(process)),
            spawns: AtomicU64::new(1),
        })
    }

    /// The process that takes invocations now.
    pub fn current(&self) -> Arc<LambdaProcess> {
        lock(&self.current).clone()
    }

    /// Processes started so far, the first included.
    pub fn spawns(&self) -> u64 {
        self.spawns.load(Ordering::Relaxed)
    }

    /// [`LambdaProcess::invoke`] on the current process.
    pub async fn invoke(&self, event: serde_json::Value) -> Result<Invocation, HarnessError> {
        self.current().invoke(event).await
    }

    /// Invokes the current process and SIGKILLs it `after` the event was queued (an
    /// idle runtime is polling `/next` and takes the event at once, so this is a point
    /// in the handler's run when `after` is shorter than the handler), then starts a
    /// fresh process for the next invocation. The kill lands between invocations when
    /// the runtime posted its result first.
    pub async fn invoke_and_kill(
        &self,
        event: serde_json::Value,
        after: Duration,
    ) -> Result<KilledInvocation, HarnessError> {
        let process = self.current();
        let started = Instant::now();
        let invocation = process.invoke(event);
        tokio::pin!(invocation);
        let (result, killed_after, mid_invocation) = tokio::select! {
            biased;
            r = &mut invocation => {
                let killed_after = started.elapsed();
                process.kill();
                (r, killed_after, false)
            }
            _ = tokio::time::sleep(after) => {
                let killed_after = started.elapsed();
                process.kill();
                let r = invocation.await;
                let mid = matches!(r, Err(HarnessError::ProcessExited { .. }));
                (r, killed_after, mid)
            }
        };
        let exit_status = process.wait_for_exit(KILL_EXIT_WAIT).await?;
        self.replace().await?;
        Ok(KilledInvocation {
            result,
            mid_invocation,
            killed_after,
            exit_status,
        })
    }

    /// SIGKILLs the current process (between invocations, when none is in flight),
    /// waits for its exit and starts a fresh one. Returns the killed one's exit status.
    pub async fn kill_and_respawn(&self) -> Result<Option<ExitStatus>, HarnessError> {
        let process = self.current();
        process.kill();
        let status = process.wait_for_exit(KILL_EXIT_WAIT).await?;
        self.replace().await?;
        Ok(status)
    }

    /// Starts a fresh process from the spec in place of the current one (which must
    /// have exited, or is killed when its last handle goes).
    async fn replace(&self) -> Result<(), HarnessError> {
        let fresh = LambdaProcess::spawn(self.spec.as_spawn()).await?;
        self.spawns.fetch_add(1, Ordering::Relaxed);
        *lock(&self.current) = Arc::new(fresh);
        Ok(())
    }

    /// Kills the current process and stops its server. Returns its exit status.
    pub async fn shutdown(self) -> Result<Option<ExitStatus>, HarnessError> {
        let process = self.current();
        process.kill();
        process.wait_for_exit(KILL_EXIT_WAIT).await
    }
}

// ------------------------------------------------------------------------------------
// Output capture
// ------------------------------------------------------------------------------------

/// Where a child's stdout and stderr lines go besides the buffer that
/// [`LambdaProcess::output_lines`] reads: this process's stderr, a log file, both or
/// neither. Each line is written as `[function stream] line`.
#[derive(Debug, Clone)]
pub struct ChildOutput {
    stderr: bool,
    file: Option<Arc<ChildLog>>,
}

#[derive(Debug)]
struct ChildLog {
    path: std::path::PathBuf,
    file: Mutex<std::fs::File>,
}

/// What [`LambdaSpawn::new`] uses; [`ChildOutput::stderr`] until set.
static DEFAULT_CHILD_OUTPUT: Mutex<Option<ChildOutput>> = Mutex::new(None);

/// Sets the output of every process spawned from a [`LambdaSpawn::new`] made after
/// this call (unless it sets its own with [`LambdaSpawn::output`]), e.g. a driver
/// that sends the functions' logs to a file before it starts a
/// [`crate::stack::Stack`].
pub fn set_default_child_output(output: ChildOutput) {
    *lock(&DEFAULT_CHILD_OUTPUT) = Some(output);
}

impl Default for ChildOutput {
    fn default() -> Self {
        ChildOutput::stderr()
    }
}

impl ChildOutput {
    /// Echo each line to this process's stderr (the default).
    pub fn stderr() -> Self {
        ChildOutput {
            stderr: true,
            file: None,
        }
    }

    /// Keep the lines in the buffer only.
    pub fn quiet() -> Self {
        ChildOutput {
            stderr: false,
            file: None,
        }
    }

    /// Append each line to `path` (created, or truncated, now; its directory too)
    /// instead of echoing it. Clones share the file, so several processes can write to
    /// one log; lines do not interleave.
    pub fn file(path: impl AsRef<Path>) -> Result<Self, HarnessError> {
        let path = path.as_ref();
        let context = || format!("creating the log file {}", path.display());
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(context(), e))?;
        }
        let file = std::fs::File::create(path).map_err(|e| HarnessError::io(context(), e))?;
        Ok(ChildOutput {
            stderr: false,
            file: Some(Arc::new(ChildLog {
                path: path.to_path_buf(),
                file: Mutex::new(file),
            })),
        })
    }

    /// Also (`true`) or no longer (`false`) echo each line to this process's stderr.
    pub fn with_stderr(mut self, stderr: bool) -> Self {
        self.stderr = stderr;
        self
    }

    /// The log file, if the lines go to one.
    pub fn log_path(&self) -> Option<&Path> {
        self.file.as_deref().map(|log| log.path.as_path())
    }

    fn process_default() -> Self {
        lock(&DEFAULT_CHILD_OUTPUT).clone().unwrap_or_default()
    }

    fn write_line(&self, function_name: &str, stream: &str, line: &str) {
        if self.stderr {
            eprintln!("[{function_name} {stream}] {line}");
        }
        if let Some(log) = &self.file {
            use std::io::Write as _;
            // A full disk must not fail the function under test; the line stays in
            // the buffer.
            let _ = writeln!(lock(&log.file), "[{function_name} {stream}] {line}");
        }
    }
}

async fn read_some<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut rb = ReadBuf::new(&mut buf[..]);
        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: &'static str,
    shared: Arc<Shared>,
    closed: Arc<watch::Sender<u8>>,
) {
    let mut buf = vec![0u8; 8192];
    let mut partial: Vec<u8> = Vec::new();
    loop {
        match read_some(&mut reader, &mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=pos).collect();
                    shared.push_line(stream, line_to_string(&line));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if !partial.is_empty() {
        shared.push_line(stream, line_to_string(&partial));
    }
    closed.send_modify(|n| *n += 1);
}

fn line_to_string(bytes: &[u8]) -> String {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    while s.ends_with('\n') || s.ends_with('\r') {
        s.pop();
    }
    s
}

// ------------------------------------------------------------------------------------
// Runtime API server
// ------------------------------------------------------------------------------------

type Body = Full<Bytes>;

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Connection tasks live in the set, so aborting this task closes them all.
    let mut conns = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // E.g. too many open files: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

const PREFIX: &str = "/2018-06-01/runtime/";
const EXTENSION_PREFIX: &str = "/2020-01-01/extension/";

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if let Some(rest) = path.strip_prefix(EXTENSION_PREFIX) {
        return extension_api(shared, &method, rest, &req).await;
    }
    let Some(rest) = path.strip_prefix(PREFIX) else {
        return api_error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
    };
    match rest {
        "invocation/next" => {
            if method != Method::GET {
                return method_not_allowed();
            }
            next_invocation(shared).await
        }
        "init/error" => {
            if method != Method::POST {
                return method_not_allowed();
            }
            let header_type = header_string(req.headers(), "lambda-runtime-function-error-type");
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let (error_type, error_message) = parse_diagnostic(&body, header_type.as_deref());
            shared.init_error.send_replace(Some(InitError {
                error_type,
                error_message,
                header_error_type: header_type,
            }));
            accepted()
        }
        _ => {
            let Some(tail) = rest.strip_prefix("invocation/") else {
                return api_error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
            };
            let (request_id, is_error) = if let Some(id) = tail.strip_suffix("/response") {
                (id, false)
            } else if let Some(id) = tail.strip_suffix("/error") {
                (id, true)
            } else {
                return api_error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
            };
            if request_id.is_empty() || request_id.contains('/') {
                return api_error(StatusCode::NOT_FOUND, "NotFound", "unknown path");
            }
            if method != Method::POST {
                return method_not_allowed();
            }
            let request_id = request_id.to_owned();
            let header_type = header_string(req.headers(), "lambda-runtime-function-error-type");
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let outcome = if is_error {
                let (error_type, error_message) = parse_diagnostic(&body, header_type.as_deref());
                Invocation::Error {
                    error_type,
                    error_message,
                }
            } else {
                Invocation::Response(parse_payload(&body))
            };
            complete(shared, &request_id, outcome)
        }
    }
}

/// The Extensions API (2020-01-01) as an internal extension that subscribes to no
/// event sees it: `register` answers with an identifier, and `event/next` never
/// answers (Lambda has no event to send it; the runtime gets SIGTERM at shutdown).
async fn extension_api(
    shared: &Shared,
    method: &Method,
    rest: &str,
    req: &Request<Incoming>,
) -> Response<Body> {
    match (rest, method) {
        ("register", &Method::POST) => {
            let Some(name) = header_string(req.headers(), "lambda-extension-name") else {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequest",
                    "no Lambda-Extension-Name header",
                );
            };
            let id = {
                let mut names = lock(&shared.extensions);
                names.push(name);
                format!("extension-{}", names.len())
            };
            let body = serde_json::json!({
                "functionName": shared.function_name,
                "functionVersion": "$LATEST",
                "handler": "bootstrap",
            });
            let mut response = json_response(StatusCode::OK, body);
            insert_header(response.headers_mut(), "lambda-extension-identifier", &id);
            response
        }
        ("event/next", &Method::GET) => std::future::pending().await,
        _ => api_error(StatusCode::NOT_FOUND, "NotFound", "unknown path"),
    }
}

async fn next_invocation(shared: &Shared) -> Response<Body> {
    {
        let mut state = lock(&shared.state);
        if state.first_poll.is_none() {
            state.first_poll = Some(Instant::now());
        }
    }
    let item = {
        let mut rx = shared.queue_rx.lock().await;
        loop {
            match rx.recv().await {
                // `invoke` gave up on this one (timed out or was cancelled): skip it.
                Some(q) if q.picked.is_closed() => continue,
                Some(q) => break q,
                None => {
                    return api_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "ServiceException",
                        "the invocation queue is closed",
                    )
                }
            }
        }
    };
    let Queued {
        request_id,
        event,
        picked,
    } = item;
    let _ = picked.send(());
    lock(&shared.state)
        .handed_out
        .insert(request_id.clone(), Instant::now());

    let deadline_ms = epoch_ms().saturating_add(shared.timeout.as_millis());
    let trace_id = new_trace_id();
    let mut resp = Response::new(Full::new(event));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    insert_header(headers, "lambda-runtime-aws-request-id", &request_id);
    insert_header(
        headers,
        "lambda-runtime-deadline-ms",
        &deadline_ms.to_string(),
    );
    insert_header(
        headers,
        "lambda-runtime-invoked-function-arn",
        &shared.function_arn,
    );
    insert_header(headers, "lambda-runtime-trace-id", &trace_id);
    resp
}

fn complete(shared: &Shared, request_id: &str, outcome: Invocation) -> Response<Body> {
    let waiter = {
        let mut state = lock(&shared.state);
        if let Some(at) = state.handed_out.remove(request_id) {
            if state.handler_times.len() >= MAX_KEPT_HANDLER_TIMES {
                state.handler_times.drain(..MAX_KEPT_HANDLER_TIMES / 10);
            }
            state.handler_times.push(at.elapsed());
        }
        state.pending.remove(request_id)
    };
    match waiter {
        Some(tx) => {
            let _ = tx.send(outcome);
            accepted()
        }
        None => {
            eprintln!(
                "[{} runtime-api] result for unknown or finished request id {request_id:?} rejected",
                shared.function_name
            );
            api_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestID",
                "unknown or already finished request id",
            )
        }
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            "payload too large",
        )),
        Err(_) => Err(api_error(
            StatusCode::BAD_REQUEST,
            "InvalidRequest",
            "could not read the request body",
        )),
    }
}

/// `{"errorType": ..., "errorMessage": ...}`; tolerates anything else.
fn parse_diagnostic(body: &[u8], header_type: Option<&str>) -> (String, String) {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| -> Option<String> {
        parsed
            .as_ref()
            .and_then(|v| v.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let error_type = field("errorType")
        .or_else(|| header_type.map(str::to_owned))
        .unwrap_or_else(|| "Unknown".to_owned());
    let error_message =
        field("errorMessage").unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    (error_type, error_message)
}

fn parse_payload(body: &[u8]) -> serde_json::Value {
    if body.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn insert_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn accepted() -> Response<Body> {
    json_response(StatusCode::ACCEPTED, serde_json::json!({"status": "OK"}))
}

fn method_not_allowed() -> Response<Body> {
    api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "method not allowed",
    )
}

fn api_error(status: StatusCode, error_type: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        serde_json::json!({"errorType": error_type, "errorMessage": message}),
    )
}

// ------------------------------------------------------------------------------------
// Ids and time
// ------------------------------------------------------------------------------------

fn epoch_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 32 hex digits, unique within the process and unlikely to repeat across processes.
fn unique_hex() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let seed = nanos ^ (u64::from(std::process::id()) << 32);
    let a = splitmix64(seed ^ n.rotate_left(17));
    let b = splitmix64(a ^ n);
    format!("{a:016x}{b:016x}")
}

/// A UUID-v4-shaped request id.
fn new_request_id() -> String {
    let h = unique_hex();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// An X-Ray trace header: `Root=1-<epoch s hex>-<24 hex>;Parent=<16 hex>;Sampled=0`.
fn new_trace_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let h = unique_hex();
    format!(
        "Root=1-{secs:08x}-{};Parent={};Sampled=0",
        &h[0..24],
        &h[16..32]
    )
}

// ------------------------------------------------------------------------------------
// HTTP/1.1 client (hyper's, one connection per request)
// ------------------------------------------------------------------------------------

/// Default timeout of [`http_request`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A response read by [`http_request`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Names in lower case (as hyper gives them), a repeated name's values together.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, HarnessError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| HarnessError::Http(format!("response body is not JSON: {e}")))
    }
}

/// One HTTP/1.1 request over a fresh TCP connection (closed after the response), with
/// the default 30 s timeout. `authority` is `host:port`; `path` includes any query.
pub async fn http_request(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, HarnessError> {
    http_request_timeout(authority, method, path, headers, body, HTTP_TIMEOUT).await
}

/// [`http_request`] with an explicit timeout for the whole exchange.
pub async fn http_request_timeout(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, HarnessError> {
    match tokio::time::timeout(
        timeout,
        http_exchange(authority, method, path, headers, body),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(HarnessError::Timeout {
            waiting_for: format!("HTTP {method} http://{authority}{path}"),
            after: timeout,
            last_lines: Vec::new(),
        }),
    }
}

/// The exchange on hyper's HTTP/1.1 client connection. The connection is driven
/// inside this future, so dropping it (on a timeout) closes the socket.
async fn http_exchange(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, HarnessError> {
    let ctx = |what: &str| format!("HTTP {method} http://{authority}{path}: {what}");
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, authority);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-length"))
    {
        // Also on an empty body, as before (hyper would send none).
        request = request.header(CONTENT_LENGTH, body.len());
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|e| HarnessError::Http(ctx(&format!("invalid request: {e}"))))?;

    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| HarnessError::io(ctx("connect"), e))?;
    // No `Connection: close`: a keep-alive connection lets hyper's server notice when
    // a long-polling client goes away (with `close`, it stops reading the socket and
    // never sees the disconnect).
    let (mut sender, conn) = client_http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| client_error(ctx("handshake"), &e))?;
    let exchange = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| client_error(ctx("request"), &e))?;
        let (head, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| client_error(ctx("body"), &e))?
            .to_bytes();
        Ok(HttpResponse {
            status: head.status.as_u16(),
            headers: head
                .headers
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.as_str().to_owned(), value)
                })
                .collect(),
            body: body.to_vec(),
        })
    };
    // The connection's own result is not needed: its errors reach the exchange.
    let mut conn = std::pin::pin!(conn);
    let mut exchange = std::pin::pin!(exchange);
    let mut conn_done = false;
    loop {
        tokio::select! {
            result = &mut exchange => return result,
            _ = &mut conn, if !conn_done => conn_done = true,
        }
    }
}

/// A hyper client error with its causes: [`HarnessError::Io`] when one is an I/O
/// error, else [`HarnessError::Http`].
fn client_error(context: String, error: &hyper::Error) -> HarnessError {
    let causes = std::iter::successors(Some(error as &dyn std::error::Error), |e| e.source());
    let message = causes
        .clone()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    match causes.clone().find_map(|e| e.downcast_ref::<io::Error>()) {
        Some(io_error) => HarnessError::io(context, io::Error::new(io_error.kind(), message)),
        None => HarnessError::Http(format!("{context}: {message}")),
    }
}
