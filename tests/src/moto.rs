//! A moto server (PyPI `moto[server]`) for tests: DynamoDB, SQS, S3, ... on loopback.
//!
//! [`Moto::start`] reuses the server at `MOTO_ENDPOINT` when that variable is set
//! (after checking that it answers), and otherwise spawns `moto_server` on a free
//! port; a spawned server is killed when the [`Moto`] is dropped.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::process::{Child, Command};

use crate::runtime_api::{http_request_timeout, HarnessError, HttpResponse};

/// The environment variable naming an already running moto server.
pub const MOTO_ENDPOINT_VAR: &str = "MOTO_ENDPOINT";

/// How long a spawned `moto_server` gets to answer.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Timeout of each probe and of `reset`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Stderr lines of a spawned server kept for error messages.
const KEPT_LINES: usize = 50;

const INSTALL_HINT: &str = "`moto_server` was not found on PATH; install it with \
     `pip install 'moto[server]'`, or set MOTO_ENDPOINT (e.g. http://127.0.0.1:5000) \
     to use a running moto server";

/// A moto server: either spawned and owned by this value, or reused from
/// `MOTO_ENDPOINT`.
#[derive(Debug)]
pub struct Moto {
    endpoint: String,
    authority: String,
    child: Option<Child>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Moto {
    /// Uses `MOTO_ENDPOINT` when set and non-empty ([`Moto::connect`]), otherwise
    /// spawns a server ([`Moto::spawn`]).
    pub async fn start() -> Result<Moto, HarnessError> {
        match std::env::var(MOTO_ENDPOINT_VAR) {
            Ok(ep) if !ep.trim().is_empty() => Moto::connect(ep.trim()).await,
            _ => Moto::spawn().await,
        }
    }

    /// Uses an already running server at `endpoint` (`http://host:port`), after
    /// checking that it answers HTTP.
    pub async fn connect(endpoint: &str) -> Result<Moto, HarnessError> {
        let authority = authority_of(endpoint)?;
        probe(&authority).await.map_err(|e| {
            HarnessError::Moto(format!(
                "the moto server at {endpoint} does not answer ({e}); \
                 start it with `moto_server -H 127.0.0.1 -p <port>` or unset {MOTO_ENDPOINT_VAR}"
            ))
        })?;
        Ok(Moto {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            authority,
            child: None,
            stderr_tail: Arc::default(),
        })
    }

    /// Spawns `moto_server -H 127.0.0.1 -p <free port>` and waits up to 30 s for it to
    /// answer. The server is killed when the returned value is dropped.
    pub async fn spawn() -> Result<Moto, HarnessError> {
        let mut last_err = None;
        // A freshly freed port can be taken by someone else before moto binds it:
        // retry with another port when the server dies early.
        for _ in 0..3 {
            match Moto::spawn_once().await {
                Ok(m) => return Ok(m),
                Err(e @ HarnessError::MotoNotInstalled(_)) => return Err(e),
                Err(e @ HarnessError::Timeout { .. }) => return Err(e),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| HarnessError::Moto("could not start moto_server".into())))
    }

    async fn spawn_once() -> Result<Moto, HarnessError> {
        let port = free_port()?;
        let authority = format!("127.0.0.1:{port}");
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    HarnessError::MotoNotInstalled(INSTALL_HINT.to_owned())
                } else {
                    HarnessError::io("spawning moto_server", e)
                }
            })?;

        let stderr_tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(drain(stderr, stderr_tail.clone()));
        }

        let started = Instant::now();
        loop {
            if probe(&authority).await.is_ok() {
                break;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    // Let the drain task catch the last lines.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Err(HarnessError::ProcessExited {
                        what: "moto_server".into(),
                        during: format!("before answering on {authority}"),
                        status: Some(status),
                        last_lines: tail(&stderr_tail),
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(HarnessError::io("waiting for moto_server", e)),
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                return Err(HarnessError::Timeout {
                    waiting_for: format!("moto_server to answer on {authority}"),
                    after: STARTUP_TIMEOUT,
                    last_lines: tail(&stderr_tail),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        Ok(Moto {
            endpoint: format!("http://{authority}"),
            authority,
            child: Some(child),
            stderr_tail,
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash: use it as `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `127.0.0.1:PORT`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Whether this value spawned the server (and will kill it on drop).
    pub fn owns_server(&self) -> bool {
        self.child.is_some()
    }

    /// The spawned server's last stderr lines (empty for a reused server).
    pub fn server_log_tail(&self) -> Vec<String> {
        tail(&self.stderr_tail)
    }

    /// `POST /moto-api/reset`: drops all state in the server. Only for tests that own
    /// the server; a shared `MOTO_ENDPOINT` server is reset for everyone.
    pub async fn reset(&self) -> Result<(), HarnessError> {
        let resp = self.request("POST", "/moto-api/reset", &[], b"").await?;
        if resp.status / 100 == 2 {
            Ok(())
        } else {
            Err(HarnessError::Moto(format!(
                "POST /moto-api/reset returned {}: {}",
                resp.status,
                resp.text()
            )))
        }
    }

    /// One raw HTTP request to the server (10 s timeout).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpResponse, HarnessError> {
        http_request_timeout(
            &self.authority,
            method,
            path,
            headers,
            body,
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// Kills a spawned server and waits for it to exit; does nothing for a reused one.
    pub async fn shutdown(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }
}

/// Any HTTP answer means the server is up.
async fn probe(authority: &str) -> Result<(), HarnessError> {
    http_request_timeout(
        authority,
        "GET",
        "/moto-api/",
        &[],
        b"",
        Duration::from_secs(2),
    )
    .await
    .map(|_| ())
}

/// `http://host:port[/...]` → `host:port` (port 80 when absent).
fn authority_of(endpoint: &str) -> Result<String, HarnessError> {
    let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
        HarnessError::Moto(format!(
            "{MOTO_ENDPOINT_VAR} must be an http:// URL such as http://127.0.0.1:5000, got {endpoint:?}"
        ))
    })?;
    let host_port = rest.split('/').next().unwrap_or_default();
    if host_port.is_empty() {
        return Err(HarnessError::Moto(format!(
            "no host in moto endpoint {endpoint:?}"
        )));
    }
    let has_port = match host_port.rsplit_once(':') {
        Some((_, port)) => !port.is_empty() && !port.contains(']'),
        None => false,
    };
    Ok(if has_port {
        host_port.to_owned()
    } else {
        format!("{host_port}:80")
    })
}

fn free_port() -> Result<u16, HarnessError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| HarnessError::io("finding a free port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| HarnessError::io("finding a free port", e))?
        .port();
    drop(listener);
    Ok(port)
}

fn tail(lines: &Mutex<VecDeque<String>>) -> Vec<String> {
    lines
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect()
}

/// Reads the server's stderr so it never blocks on a full pipe; keeps the last lines.
async fn drain<R: AsyncRead + Unpin>(mut reader: R, keep: Arc<Mutex<VecDeque<String>>>) {
    let mut buf = vec![0u8; 8192];
    let mut partial = Vec::new();
    loop {
        let n = poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf[..]);
            match Pin::new(&mut reader).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err::<usize, io::Error>(e)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        match n {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                partial.extend_from_slice(&buf[..n]);
                while let Some(pos) = partial.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                    let mut keep = keep.lock().unwrap_or_else(|e| e.into_inner());
                    if keep.len() >= KEPT_LINES {
                        keep.pop_front();
                    }
                    keep.push_back(line);
                }
            }
        }
    }
}
