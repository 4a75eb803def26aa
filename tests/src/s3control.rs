//! S3 Control on loopback, for the real `aws-sdk-s3control` client and moto.
//!
//! Two things stand between the Rust SDK and moto's S3 Control:
//!
//! * The SDK puts the account in the host name of every S3 Control call. With an
//!   endpoint URL it calls `{AccountId}.{authority}` (the endpoint rules' custom
//!   endpoint case), so `http://127.0.0.1:PORT` becomes
//!   `http://123456789012.127.0.0.1:PORT`, which names no host. The endpoint is
//!   therefore `http://localhost:PORT`: `123456789012.localhost` resolves to loopback
//!   through nss-myhostname (Debian's `libnss-myhostname`, which scripts/install-deps.sh
//!   installs). moto does not care about the host: it picks S3 Control by the SigV4
//!   signing name `s3` and the `/v20180820/` path.
//! * moto (5.2) names the root element of every S3 Control answer `{Operation}Response`
//!   (`<GetAccessPointResponse>`), where S3 Control says `{Operation}Result`, as in its
//!   API reference and model. botocore does not look at the root's name; the Rust SDK
//!   does, and fails ("expected GetAccessPointResult"). Error answers
//!   (`<ErrorResponse>`) are right as they are.
//!
//! [`S3ControlForwarder`] listens on loopback and forwards every request as it is to
//! moto (or to a [`crate::counting_proxy::CountingProxy`] in front of it), and renames
//! that one element in successful answers. Everything else, the product's adapter
//! included, is the real thing.

use crate::runtime_api::http_request;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Forwards S3 Control calls to moto, fixing the root element of its answers.
pub struct S3ControlForwarder {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for S3ControlForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl S3ControlForwarder {
    /// Listens on `127.0.0.1:0` and forwards to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> std::io::Result<S3ControlForwarder> {
        let authority = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let authority = authority.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| forward(req, authority.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(S3ControlForwarder { addr, task })
    }

    /// `http://localhost:PORT`: the S3 Control endpoint (`AWS_ENDPOINT_URL_S3_CONTROL`).
    pub fn endpoint(&self) -> String {
        format!("http://localhost:{}", self.addr.port())
    }
}

async fn forward(
    req: Request<Incoming>,
    authority: String,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
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
            let body = if upstream.status / 100 == 2 {
                result_root(&upstream.body).unwrap_or(upstream.body)
            } else {
                upstream.body
            };
            let mut response = Response::builder().status(upstream.status);
            for (name, value) in &upstream.headers {
                if !matches!(
                    name.to_ascii_lowercase().as_str(),
                    "connection" | "content-length" | "transfer-encoding"
                ) {
                    response = response.header(name.as_str(), value.as_str());
                }
            }
            Ok(response
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|e| error(StatusCode::BAD_GATEWAY, &e.to_string())))
        }
        Err(e) => Ok(error(StatusCode::BAD_GATEWAY, &e.to_string())),
    }
}

/// `<?xml …?><GetAccessPointResponse xmlns="…">…</GetAccessPointResponse>` with its
/// root renamed `GetAccessPointResult`; `None` when the body has no such root.
pub fn result_root(body: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(body).ok()?;
    let mut start = text.find('<')?;
    if text[start..].starts_with("<?") {
        start += text[start..].find("?>")? + 2;
        start += text[start..].find('<')?;
    }
    let open = &text[start + 1..];
    let name_len = open.find(|c: char| c == '>' || c == '/' || c.is_whitespace())?;
    let name = &open[..name_len];
    let operation = name.strip_suffix("Response")?;
    if operation.is_empty() || operation == "Error" {
        return None;
    }
    let close = format!("</{name}>");
    let close_at = text.rfind(&close)?;
    let result = format!("{operation}Result");
    let mut fixed = String::with_capacity(text.len());
    fixed.push_str(&text[..start + 1]);
    fixed.push_str(&result);
    fixed.push_str(&text[start + 1 + name_len..close_at]);
    fixed.push_str(&format!("</{result}>"));
    fixed.push_str(&text[close_at + close.len()..]);
    Some(fixed.into_bytes())
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
    fn the_root_element_is_renamed_and_nothing_else() {
        let body =
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<GetAccessPointResponse xmlns=\"ns\">\
                    <Name>GetAccessPointResponse</Name></GetAccessPointResponse>";
        assert_eq!(
            String::from_utf8(result_root(body.as_bytes()).unwrap()).unwrap(),
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<GetAccessPointResult xmlns=\"ns\">\
             <Name>GetAccessPointResponse</Name></GetAccessPointResult>"
        );
        assert_eq!(
            String::from_utf8(
                result_root(
                    b"<ListAccessPointsResponse><AccessPointList/></ListAccessPointsResponse>"
                )
                .unwrap()
            )
            .unwrap(),
            "<ListAccessPointsResult><AccessPointList/></ListAccessPointsResult>"
        );
        assert_eq!(
            result_root(b"<ErrorResponse><Error/></ErrorResponse>"),
            None
        );
        assert_eq!(result_root(b"<GetAccessPointResult/>"), None);
        assert_eq!(result_root(b""), None);
        assert_eq!(result_root(b"not xml"), None);
    }
}
