//! Listeners: accepting connections under a cap, the TLS handshake with a
//! deadline, and HTTP/1.1 with bounded headers and read timeouts. What a
//! request then goes through is in `stack.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::Broker;
use crate::stack;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body: buffered JSON today, streams later.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; further ones wait in the kernel's queue.
    pub max_connections: usize,
    /// Time to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to receive a request's headers (also the keep-alive idle limit).
    pub header_timeout: Duration,
    /// Largest request head (request line and headers).
    pub max_header_bytes: usize,
    /// Time to receive a request's body.
    pub body_timeout: Duration,
}

pub const JAIL_LIMITS: Limits = Limits {
    max_connections: 1024,
    handshake_timeout: Duration::from_secs(10),
    header_timeout: Duration::from_secs(15),
    max_header_bytes: 32 * 1024,
    body_timeout: Duration::from_secs(30),
};

pub const ADMIN_LIMITS: Limits = Limits {
    max_connections: 64,
    handshake_timeout: Duration::from_secs(10),
    header_timeout: Duration::from_secs(15),
    max_header_bytes: 16 * 1024,
    body_timeout: Duration::from_secs(15),
};

/// Which listener a connection arrived on, and who is on the other end.
#[derive(Debug, Clone)]
pub struct Conn {
    pub listener: Listener,
    pub remote: SocketAddr,
    /// The verified client certificate's identity: `None` without a
    /// certificate, `Err` when the certificate is unusable.
    pub peer: Option<Result<String, String>>,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Jail,
    Admin,
}

/// Accepts connections under the listener's cap and hands each, with its
/// permit, to `serve` on a task of its own. Runs until the task is dropped.
async fn accept_loop<F, Fut>(listener: TcpListener, limits: Limits, serve: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // EMFILE and friends: back off briefly rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let fut = serve(tcp, remote);
        tokio::spawn(async move {
            let _permit = permit;
            fut.await;
        });
    }
}

/// Serves the jail listener until the task is dropped.
pub async fn serve_jail(
    listener: TcpListener,
    tls: TlsAcceptor,
    broker: Arc<Broker>,
    limits: Limits,
) {
    accept_loop(listener, limits, move |tcp, remote| {
        let (tls, broker) = (tls.clone(), broker.clone());
        async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(limits.handshake_timeout, tls.accept(tcp)).await
            else {
                return;
            };
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(crate::ca::client_identity);
            let conn = Conn {
                listener: Listener::Jail,
                remote,
                peer,
                limits,
            };
            serve_http(TokioIo::new(stream), conn, broker).await;
        }
    })
    .await;
}

/// Serves the admin listener (plain HTTP, loopback only) until dropped.
pub async fn serve_admin(listener: TcpListener, broker: Arc<Broker>, limits: Limits) {
    accept_loop(listener, limits, move |tcp, remote| {
        let broker = broker.clone();
        async move {
            if !remote.ip().is_loopback() {
                // Unreachable with a loopback bind; refuse anyway.
                return;
            }
            let conn = Conn {
                listener: Listener::Admin,
                remote,
                peer: None,
                limits,
            };
            serve_http(TokioIo::new(tcp), conn, broker).await;
        }
    })
    .await;
}

async fn serve_http<I>(io: I, conn: Conn, broker: Arc<Broker>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let limits = conn.limits;
    let conn = Arc::new(conn);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let broker = broker.clone();
        let conn = conn.clone();
        async move { Ok::<Response<Body>, Infallible>(stack::handle(&broker, &conn, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(64)
        .keep_alive(true)
        .serve_connection(io, service)
        .await;
}
