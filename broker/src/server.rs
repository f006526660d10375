//! Listeners: accepting connections under a cap, the TLS handshake with a
//! deadline, and HTTP/1.1 with bounded headers and read timeouts. What a
//! request then goes through is in `stack.rs`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Removes every header the `Connection` header names: hop-by-hop by
/// declaration (RFC 9110 §7.6.1), so a sender cannot pass one past a
/// proxy's fixed list. The caller removes `connection` itself with the
/// rest of its list.
pub fn strip_connection_nominated(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
}

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
/// permit, to `handle`, which spawns the connection's task (on this runtime
/// or a jail worker's). Runs until the task is dropped.
///
/// A connection's future is spawned as it is, not wrapped in another
/// `async` block: a future captured by an `async` block and awaited there is
/// stored twice (rustc keeps captured values apart from the awaited state),
/// and this one is held for as long as the connection lives.
async fn accept_loop<F>(listener: TcpListener, limits: Limits, mut handle: F)
where
    F: FnMut(tokio::net::TcpStream, SocketAddr, OwnedSemaphorePermit),
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
        handle(tcp, remote, permit);
    }
}

/// How many jail workers serve connections: `TOKIO_WORKER_THREADS` when
/// set (the variable that also sizes the broker's main runtime), else one
/// per core. Read once per process, so the workers and the pools sized by
/// [`PerWorker`] agree.
pub fn jail_workers() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("TOKIO_WORKER_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

thread_local! {
    /// The jail worker this thread runs (1-based), or 0 on any other thread.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One of a thing (a connection pool) per jail worker, and one more for any
/// other thread: each worker's requests use its own, so the connections
/// they open run on the worker's thread too (a pool's connection task runs
/// on the runtime that opened it).
pub(crate) struct PerWorker<T>(Vec<T>);

impl<T> PerWorker<T> {
    pub(crate) fn new(mut make: impl FnMut() -> T) -> PerWorker<T> {
        PerWorker((0..=jail_workers()).map(|_| make()).collect())
    }

    /// The current thread's.
    pub(crate) fn get(&self) -> &T {
        let w = WORKER.with(std::cell::Cell::get);
        self.0.get(w).unwrap_or(&self.0[0])
    }
}

/// A connection handed to a worker: the stream, its peer, its permit, and
/// its place in the worker's count.
type Handoff = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit, Open);

/// One jail worker: a runtime of its own (one thread), the channel that
/// brings it connections, and how many it holds.
struct Worker {
    runtime: Option<tokio::runtime::Runtime>,
    tx: tokio::sync::mpsc::UnboundedSender<Handoff>,
    open: Arc<AtomicUsize>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Ends its connections; allowed from within another runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The jail listener's workers. Each is a runtime with one thread that
/// runs its connections whole: the TLS session, the request, and the
/// upstream call through the worker's own pool (`llm::Upstream`). A
/// request's work then stays on one thread, with none of the wake-ups
/// and work stealing of one runtime shared by all connections, which cost
/// more here than they bring (docs/performance.md). One accept loop hands
/// each new connection to the worker holding the fewest.
pub struct JailWorkers {
    workers: Vec<Worker>,
    /// Where the next search for the least loaded starts, so ties (an idle
    /// broker, short connections one after another) take turns.
    next: AtomicUsize,
    limits: Limits,
}

impl std::fmt::Debug for JailWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JailWorkers")
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// The runtime of jail worker `i` of `n`: one thread, named `lever-jail-i`
/// like the blocking threads it starts, each knowing it serves worker `i`
/// (so `PerWorker::get` finds its pools). Its blocking threads are capped
/// at its share of tokio's usual 512 (at least 16), so the workers
/// together start about as many as one runtime would.
fn worker_runtime(i: usize, n: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads((512 / n.max(1)).max(16))
        .thread_name(format!("lever-jail-{i}"))
        .on_thread_start(move || WORKER.with(|w| w.set(i)))
        // Ended `/llm` calls are finished once their responses are out.
        .on_thread_park(crate::llm::finish_ended)
        .on_thread_stop(crate::llm::finish_ended_and_stop)
        .enable_all()
        .build()
}

impl JailWorkers {
    /// Starts the jail workers, [`jail_workers`] of them.
    pub fn start(
        tls: TlsAcceptor,
        broker: Arc<Broker>,
        limits: Limits,
    ) -> std::io::Result<JailWorkers> {
        let n = jail_workers();
        let mut workers = Vec::with_capacity(n);
        for i in 1..=n {
            let runtime = worker_runtime(i, n)?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
            let (tls, broker) = (tls.clone(), broker.clone());
            runtime.spawn(async move {
                while let Some((tcp, remote, permit, open)) = rx.recv().await {
                    let Ok(tcp) = tokio::net::TcpStream::from_std(tcp) else {
                        continue;
                    };
                    // Spawned as it is (see `accept_loop`).
                    tokio::spawn(jail_connection(
                        tcp,
                        remote,
                        (permit, open),
                        tls.clone(),
                        broker.clone(),
                        limits,
                    ));
                }
            });
            workers.push(Worker {
                runtime: Some(runtime),
                tx,
                open: Arc::default(),
            });
        }
        Ok(JailWorkers {
            workers,
            next: AtomicUsize::new(0),
            limits,
        })
    }

    /// Accepts on the jail listener until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let limits = self.limits;
        accept_loop(listener, limits, move |tcp, remote, permit| {
            self.hand_off(tcp, remote, permit);
        })
        .await;
    }

    /// Ends the workers and the connections they hold, waiting up to
    /// `grace` for their threads (dropped connections write their audit
    /// records meanwhile). Blocking: call it off the runtime's threads.
    pub fn shutdown(mut self, grace: Duration) {
        for w in &mut self.workers {
            if let Some(rt) = w.runtime.take() {
                rt.shutdown_timeout(grace);
            }
        }
    }

    /// Gives a connection to the worker holding the fewest.
    fn hand_off(
        &self,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let w = &self.workers[least_loaded(&self.workers, start)];
        let open = Open::new(&w.open);
        if let Ok(tcp) = tcp.into_std() {
            let _ = w.tx.send((tcp, remote, permit, open));
        }
    }
}

/// The index of the worker holding the fewest connections; of those tied,
/// the first at or after `start` (modulo their number).
/// `workers` is never empty.
fn least_loaded(workers: &[Worker], start: usize) -> usize {
    let n = workers.len();
    (0..n)
        .map(|k| (start % n + k) % n)
        .min_by_key(|&i| workers[i].open.load(Ordering::Relaxed))
        .unwrap_or(0)
}

/// Counts one of a worker's connections until dropped.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Open {
        count.fetch_add(1, Ordering::Relaxed);
        Open(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One jail connection: the TLS handshake under its deadline, then HTTP.
/// `_held` (its place under the listener's cap and in its worker's count)
/// is let go when the connection ends.
async fn jail_connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    _held: (OwnedSemaphorePermit, Open),
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
        tokio::spawn(admin_connection(
            tcp,
            remote,
            permit,
            broker.clone(),
            limits,
        ));
    })
    .await;
}

/// One admin connection: plain HTTP from loopback.
async fn admin_connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    _permit: OwnedSemaphorePermit,
    broker: Arc<Broker>,
    limits: Limits,
) {
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

    #[test]
    fn headers_named_in_connection_are_removed_in_any_case() {
        let mut h = http::HeaderMap::new();
        h.append("connection", "keep-alive, X-A".parse().unwrap());
        h.append("connection", " x-b ,,bad header".parse().unwrap());
        for n in ["x-a", "x-b", "x-c"] {
            h.insert(n, "1".parse().unwrap());
        }
        strip_connection_nominated(&mut h);
        assert!(h.get("x-a").is_none() && h.get("x-b").is_none());
        assert!(h.get("x-c").is_some());
    }

    #[test]
    fn a_retry_after_is_rounded_up_to_whole_seconds() {
        use std::time::Duration;
        for (wait, secs) in [
            (Duration::from_millis(1), 1),
            (Duration::from_secs(1), 1),
            (Duration::from_millis(1900), 2),
            (Duration::from_millis(2001), 3),
            (Duration::ZERO, 1),
        ] {
            assert_eq!(crate::stack::retry_secs(wait), secs, "{wait:?}");
        }
    }

    fn idle_workers(n: usize) -> Vec<Worker> {
        (0..n)
            .map(|_| Worker {
                runtime: None,
                tx: tokio::sync::mpsc::unbounded_channel().0,
                open: Arc::default(),
            })
            .collect()
    }

    /// New connections go to the worker holding the fewest; ties take
    /// turns; a connection that ends is counted out.
    #[test]
    fn connections_go_to_the_least_loaded_worker_ties_taking_turns() {
        let w = idle_workers(3);
        assert_eq!(
            (0..6).map(|s| least_loaded(&w, s)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2]
        );
        let a = Open::new(&w[0].open);
        let b = Open::new(&w[1].open);
        let c = Open::new(&w[1].open);
        for s in 0..3 {
            assert_eq!(least_loaded(&w, s), 2);
        }
        let d = Open::new(&w[2].open);
        // 0 and 2 hold one each, 1 two: the first of 0 and 2 from `start`.
        assert_eq!(least_loaded(&w, 0), 0);
        assert_eq!(least_loaded(&w, 1), 2);
        assert_eq!(least_loaded(&w, 2), 2);
        assert_eq!(least_loaded(&w, usize::MAX), 0, "usize::MAX % 3 == 0");
        drop((b, c));
        assert_eq!(w[1].open.load(Ordering::Relaxed), 0);
        assert_eq!(least_loaded(&w, 0), 1);
        drop((a, d));
        assert!(w.iter().all(|w| w.open.load(Ordering::Relaxed) == 0));
    }

    /// A task on worker `i`'s runtime, and the blocking threads it starts,
    /// take worker `i`'s pool; any other thread takes the shared one.
    #[test]
    fn each_worker_runtime_uses_its_own_pool() {
        let pools = PerWorker(vec![0usize, 1, 2]);
        let pools = Arc::new(pools);
        assert_eq!(*pools.get(), 0, "outside the workers");
        for i in [1, 2] {
            let rt = worker_runtime(i, 2).unwrap();
            let p = pools.clone();
            let on_worker = rt.block_on(rt.spawn(async move { *p.get() })).unwrap();
            let p = pools.clone();
            let blocking = rt.block_on(rt.spawn_blocking(move || *p.get())).unwrap();
            assert_eq!((on_worker, blocking), (i, i));
            rt.shutdown_background();
        }
    }

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
            (OwnedSemaphorePermit, Open),
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
