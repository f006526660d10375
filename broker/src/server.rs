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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
/// permit, to `serve`, whose future runs as the connection's task. Runs until
/// the task is dropped.
///
/// The future is spawned as it is, not wrapped in another `async` block: a
/// future captured by an `async` block and awaited there is stored twice
/// (rustc keeps captured values apart from the awaited state), and this one
/// is held for as long as the connection lives.
async fn accept_loop<F, Fut>(listener: TcpListener, limits: Limits, serve: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
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
        tokio::spawn(serve(tcp, remote, permit));
    }
}

/// Serves the jail listener until the task is dropped.
pub async fn serve_jail(
    listener: TcpListener,
    tls: TlsAcceptor,
    broker: Arc<Broker>,
    limits: Limits,
) {
    accept_loop(listener, limits, move |tcp, remote, permit| {
        jail_connection(tcp, remote, permit, tls.clone(), broker.clone(), limits)
    })
    .await;
}

/// One jail connection: the TLS handshake under its deadline, then HTTP.
async fn jail_connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
    tls: TlsAcceptor,
    broker: Arc<Broker>,
    limits: Limits,
) {
    // The stream is borrowed to read the peer's certificate: in a block of
    // its own, so its storage ends there and is not kept beside the
    // connection (which holds the stream itself) for the connection's life.
    let (io, peer) = {
        let Ok(Ok(stream)) = tokio::time::timeout(limits.handshake_timeout, tls.accept(tcp)).await
        else {
            return;
        };
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(crate::ca::client_identity);
        (TokioIo::new(stream), peer)
    };
    let conn = Conn {
        listener: Listener::Jail,
        remote,
        peer,
        limits,
    };
    let _ = serve_http(io, conn, broker).await;
}

/// Serves the admin listener (plain HTTP, loopback only) until dropped.
pub async fn serve_admin(listener: TcpListener, broker: Arc<Broker>, limits: Limits) {
    accept_loop(listener, limits, move |tcp, remote, permit| {
        let broker = broker.clone();
        async move {
            let _permit = permit;
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
            let _ = serve_http(TokioIo::new(tcp), conn, broker).await;
        }
    })
    .await;
}

/// HTTP/1.1 on one connection. A plain function returning hyper's
/// connection future (not an `async fn`, which would keep `io`, the TLS
/// stream, once as its argument and again inside the connection).
fn serve_http<I>(
    io: I,
    conn: Conn,
    broker: Arc<Broker>,
) -> impl std::future::Future<Output = Result<(), hyper::Error>> + Send
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
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(64)
        .keep_alive(true)
        .serve_connection(io, service)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, R, F: FnOnce(A) -> R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// A jail connection's future is its task for as long as the connection
    /// lives (1,000 open streams hold 1,000 of them): the TLS stream and
    /// hyper's connection once each, not again as captured copies (it was
    /// 9.5 KiB when an `async` wrapper and an `async fn` argument each kept
    /// a second copy).
    #[test]
    fn a_jail_connection_holds_its_stream_once() {
        type Tls = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
        let stream = std::mem::size_of::<Tls>();
        let http =
            future_size(&|(io, c, b): (TokioIo<Tls>, Conn, Arc<Broker>)| serve_http(io, c, b));
        let conn = future_size(&|(t, r, p, a, b, l): (
            tokio::net::TcpStream,
            SocketAddr,
            OwnedSemaphorePermit,
            TlsAcceptor,
            Arc<Broker>,
            Limits,
        )| jail_connection(t, r, p, a, b, l));
        assert!(
            http < 2 * stream,
            "serve_http {http} B, the stream {stream} B"
        );
        assert!(
            conn < http + stream / 2,
            "a jail connection {conn} B, serve_http {http} B, the stream {stream} B"
        );
    }
}
