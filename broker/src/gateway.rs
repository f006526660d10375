//! `lever agent gateway`: the in-jail loopback gateway. Plain HTTP on
//! `127.0.0.1:8462` for clients that cannot do mTLS themselves (Claude Code
//! reads a client certificate once and caches it; certificates rotate),
//! forwarded to the broker over mTLS. The agent's certificate and key are
//! read again for every new broker connection, so a renewal is picked up
//! on the next request. Bodies stream both ways, frame by frame.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use crate::client::{ClientTls, Target};
use crate::server::{Body, full};

/// Headers not passed on, either way (hop-by-hop, and any the `Connection`
/// header names; the gateway sets `host`).
const DROP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Where the gateway forwards, and where the agent's identity lives.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub broker: Target,
    pub dir: PathBuf,
}

/// Refuses anything but a loopback address.
pub fn check_listen(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "the gateway speaks plain HTTP and must listen on loopback, not {addr}"
        ))
    }
}

/// The agent's current identity, read from its directory.
fn load_tls(dir: &Path) -> Result<ClientTls, String> {
    let read = |n: &str| {
        std::fs::read_to_string(dir.join(n)).map_err(|e| format!("{}: {e}", dir.join(n).display()))
    };
    let (ca, cert, key) = (read("ca.pem")?, read("cert.pem")?, read("key.pem")?);
    ClientTls::new(&ca, Some((&cert, &key))).map_err(|e| e.to_string())
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>) {
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if !remote.ip().is_loopback() {
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let gw = gw.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(forward(&gw, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn failure(status: StatusCode, message: &str, path: &str) -> Response<Body> {
    // Answer in the protocol of the route, as the broker would.
    let body = if path.starts_with("/llm/") {
        serde_json::json!({"type": "error", "error": {"type": "api_error", "message": message}})
    } else {
        serde_json::json!({"error": {"code": "gateway_error", "message": message}})
    };
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn forward(gw: &Gateway, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let tls = match load_tls(&gw.dir) {
        Ok(t) => t,
        Err(e) => {
            return failure(
                StatusCode::BAD_GATEWAY,
                &format!("no agent identity: {e}"),
                &path,
            );
        }
    };
    let addr = format!("{}:{}", gw.broker.host, gw.broker.port);
    let tcp = match TcpStream::connect(&addr).await {
        Ok(t) => t,
        Err(e) => {
            return failure(
                StatusCode::BAD_GATEWAY,
                &format!("the broker is unreachable: {e}"),
                &path,
            );
        }
    };
    let _ = tcp.set_nodelay(true);
    let Ok(name) = ServerName::try_from(gw.broker.host.clone()) else {
        return failure(StatusCode::BAD_GATEWAY, "bad broker host name", &path);
    };
    let stream = match tls.connector().connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => {
            return failure(
                StatusCode::BAD_GATEWAY,
                &format!("TLS to the broker failed: {e}"),
                &path,
            );
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(v) => v,
        Err(e) => {
            return failure(
                StatusCode::BAD_GATEWAY,
                &format!("HTTP to the broker failed: {e}"),
                &path,
            );
        }
    };
    // The connection task lives until the response body is done.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (mut parts, body) = req.into_parts();
    crate::server::strip_connection_nominated(&mut parts.headers);
    for h in DROP {
        parts.headers.remove(*h);
    }
    if let Ok(v) = HeaderValue::from_str(&addr) {
        parts.headers.insert(http::header::HOST, v);
    }
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    parts.uri = match pq.parse() {
        Ok(u) => u,
        Err(_) => return failure(StatusCode::BAD_REQUEST, "bad request target", &path),
    };
    let out = Request::from_parts(
        parts,
        body.map_err(|e| -> crate::server::BoxError { Box::new(e) })
            .boxed(),
    );
    match sender.send_request(out).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            crate::server::strip_connection_nominated(&mut parts.headers);
            for h in DROP.iter().filter(|h| **h != "host") {
                parts.headers.remove(*h);
            }
            Response::from_parts(
                parts,
                body.map_err(|e| -> crate::server::BoxError { Box::new(e) })
                    .boxed(),
            )
        }
        Err(e) => failure(
            StatusCode::BAD_GATEWAY,
            &format!("the broker connection failed: {e}"),
            &path,
        ),
    }
}
