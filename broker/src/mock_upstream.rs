//! An Anthropic-compatible mock upstream for tests, benches and `lever
//! demo`: the Messages API (plain and streaming SSE), `count_tokens` and
//! `models`, with behaviour chosen per request by directives in the last
//! user message (`mock:events=5 gap_ms=100 stamp error_after=2
//! reset_after=2 status=529 header_delay_ms=500 hang`; `echo_key` and
//! `echo_key_header` play an upstream that echoes the credential;
//! `hop_header` names a header in `Connection`). It records the
//! headers of every request it saw (`GET /_mock/requests`) so tests can
//! check what reached it, and with an expected key it answers 401 to
//! anything else, as the real API would.
//!
//! It is a test double of the *upstream* only; it is never used by the
//! broker itself.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::body::ChannelBody;
use crate::server::{Body, full};

const MAX_SEEN: usize = 10_000;

#[derive(Debug, Default)]
struct Seen {
    requests: Vec<Value>,
}

/// Serves until the task is dropped. `expect_key`: the only `x-api-key`
/// accepted.
pub async fn serve(listener: TcpListener, expect_key: Option<String>) {
    serve_with(listener, expect_key, None).await;
}

/// Like [`serve`]; with `tls`, speaks HTTPS and offers HTTP/2 and
/// HTTP/1.1 by ALPN (as the real API does).
pub async fn serve_with(
    listener: TcpListener,
    expect_key: Option<String>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let expect_key = Arc::new(expect_key);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (seen, expect_key, acceptor) = (seen.clone(), expect_key.clone(), acceptor.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (seen, expect_key) = (seen.clone(), expect_key.clone());
                async move { Ok::<_, Infallible>(handle(req, &seen, expect_key.as_deref()).await) }
            });
            let auto =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            match acceptor {
                Some(a) => {
                    if let Ok(stream) = a.accept(tcp).await {
                        let _ = auto.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                None => {
                    let _ = auto.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}

/// A TLS server configuration from PEM files, offering h2 and http/1.1.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let chain = crate::ca::pem_certs(cert_pem)?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert("request-id", http::HeaderValue::from_static("req_mock"));
    r
}

fn api_error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"type": "error", "error": {"type": kind, "message": message}}),
    )
}

/// Directives from the last user message: `mock:key=value key flag ...`.
#[derive(Debug, Default)]
struct Directives {
    events: usize,
    gap: Duration,
    stamp: bool,
    error_after: Option<usize>,
    reset_after: Option<usize>,
    status: Option<u16>,
    header_delay: Duration,
    hang: bool,
    echo_key: bool,
    echo_key_header: bool,
    hop_header: bool,
}

fn directives(body: &Value) -> Directives {
    let mut d = Directives {
        events: 3,
        ..Directives::default()
    };
    let text = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(" "),
            _ => String::new(),
        })
        .unwrap_or_default();
    let Some(rest) = text.split("mock:").nth(1) else {
        return d;
    };
    for word in rest.split_whitespace() {
        let (k, v) = word.split_once('=').unwrap_or((word, ""));
        let n = v.parse::<u64>().ok();
        match k {
            "events" => d.events = n.unwrap_or(3).min(10_000) as usize,
            "gap_ms" => d.gap = Duration::from_millis(n.unwrap_or(0)),
            "stamp" => d.stamp = true,
            "error_after" => d.error_after = n.map(|n| n as usize),
            "reset_after" => d.reset_after = n.map(|n| n as usize),
            "status" => d.status = n.and_then(|n| u16::try_from(n).ok()),
            "header_delay_ms" => d.header_delay = Duration::from_millis(n.unwrap_or(0)),
            "hang" => d.hang = true,
            "echo_key" => d.echo_key = true,
            "echo_key_header" => d.echo_key_header = true,
            "hop_header" => d.hop_header = true,
            _ => {}
        }
    }
    d
}

/// Where a stream reports how far it got (`sent`, `cancelled_after`).
struct Progress {
    seen: Arc<Mutex<Seen>>,
    index: usize,
}

impl Progress {
    fn mark(&self, key: &str, v: Value) {
        if let Ok(mut s) = self.seen.lock()
            && let Some(r) = s.requests.get_mut(self.index)
        {
            r[key] = v;
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: &Arc<Mutex<Seen>>,
    expect_key: Option<&str>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    if parts.uri.path() == "/_mock/requests" {
        let list = seen.lock().map(|s| s.requests.clone()).unwrap_or_default();
        return json_response(StatusCode::OK, &Value::from(list));
    }
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    // Keep the first requests only: under load the log must not grow
    // without bound (and past the cap nothing is built for it).
    let index = match seen.lock() {
        Ok(mut s) if s.requests.len() < MAX_SEEN => {
            let headers: serde_json::Map<String, Value> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()),
                    )
                })
                .collect();
            s.requests.push(json!({
                "version": format!("{:?}", parts.version),
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "query": parts.uri.query(),
                "headers": headers,
                "body_bytes": bytes.len(),
            }));
            s.requests.len() - 1
        }
        _ => MAX_SEEN,
    };
    if let Some(want) = expect_key {
        let got = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok());
        if got != Some(want) || parts.headers.contains_key(http::header::AUTHORIZATION) {
            return api_error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            );
        }
    }
    match (parts.method.as_str(), parts.uri.path()) {
        ("GET", "/v1/models") => json_response(
            StatusCode::OK,
            &json!({"data": [{"type": "model", "id": "claude-mock-1", "display_name": "Mock", "created_at": "2026-01-01T00:00:00Z"}], "has_more": false, "first_id": "claude-mock-1", "last_id": "claude-mock-1"}),
        ),
        ("POST", "/v1/messages/count_tokens") => {
            json_response(StatusCode::OK, &json!({"input_tokens": 12}))
        }
        ("POST", "/v1/messages") => {
            let Ok(body) = serde_json::from_slice::<Value>(&bytes) else {
                return api_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "body is not JSON",
                );
            };
            let key = parts
                .headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            // A misbehaving upstream that echoes the credential in a
            // response header, inside other text.
            let echo = directives(&body)
                .echo_key_header
                .then(|| http::HeaderValue::from_str(&format!("debug; auth={key}; end")));
            let mut r = messages(
                &body,
                Progress {
                    seen: seen.clone(),
                    index,
                },
                key,
            )
            .await;
            if let Some(Ok(v)) = echo {
                r.headers_mut().insert("x-upstream-debug", v);
            }
            if directives(&body).hop_header {
                // A header made hop-by-hop by naming it in `Connection`.
                let h = r.headers_mut();
                h.insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("keep-alive, X-Hop-Secret"),
                );
                h.insert("x-hop-secret", http::HeaderValue::from_static("hop"));
                h.insert("x-end-to-end", http::HeaderValue::from_static("kept"));
            }
            r
        }
        _ => api_error(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint"),
    }
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

fn sse(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

async fn messages(body: &Value, progress: Progress, key: String) -> Response<Body> {
    let d = directives(body);
    if d.hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if !d.header_delay.is_zero() {
        tokio::time::sleep(d.header_delay).await;
    }
    if let Some(code) = d.status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match code {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        return api_error(status, kind, "the mock was asked to fail");
    }
    let model = body["model"].as_str().unwrap_or("claude-mock-1").to_owned();
    let mut words: Vec<String> = (0..d.events).map(|i| format!("word{i} ")).collect();
    if d.echo_key
        && let Some(w) = words.last_mut()
    {
        // A misbehaving upstream that echoes the credential it was sent.
        *w = format!("{w}{key} ");
    }
    if !body["stream"].as_bool().unwrap_or(false) {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": words.concat()}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 12, "output_tokens": d.events},
            }),
        );
    }
    let (tx, rx) = ChannelBody::new(16);
    tokio::spawn(async move {
        let start = json!({"type": "message_start", "message": {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 12, "output_tokens": 1}}});
        let mut frames = vec![
            sse("message_start", &start),
            sse(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            sse("ping", &json!({"type": "ping"})),
        ];
        for f in frames.drain(..) {
            if tx.send(Ok(f)).await.is_err() {
                return;
            }
        }
        for (i, w) in words.iter().enumerate() {
            if d.error_after == Some(i) {
                let e = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
                let _ = tx.send(Ok(sse("error", &e))).await;
                return;
            }
            if d.reset_after == Some(i) {
                // Let what was sent reach the wire, then cut the connection.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err("reset by the mock".into())).await;
                return;
            }
            if i > 0 && !d.gap.is_zero() {
                tokio::time::sleep(d.gap).await;
            }
            let text = if d.stamp {
                format!("{w}[sent_us={}] ", now_us())
            } else {
                w.clone()
            };
            let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}});
            if tx
                .send(Ok(sse("content_block_delta", &delta)))
                .await
                .is_err()
            {
                progress.mark("cancelled_after", json!(i));
                return;
            }
            progress.mark("sent", json!(i + 1));
        }
        let tail = [
            sse(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ),
            sse(
                "message_delta",
                &json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": d.events}}),
            ),
            sse("message_stop", &json!({"type": "message_stop"})),
        ];
        for f in tail {
            if tx.send(Ok(f)).await.is_err() {
                return;
            }
        }
        progress.mark("completed", json!(true));
    });
    let mut r = Response::new(rx.boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}
