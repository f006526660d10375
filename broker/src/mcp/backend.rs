//! Tool backends: the MCP servers of `broker.tools`, supervised.
//!
//! Each backend is a child process in a process group of its own, started
//! with the broker, spoken to over MCP streamable HTTP on its loopback
//! `backend` address (`transport: http`, `-backend ADDR` appended to its
//! command) or over stdin/stdout (`transport: stdio`). The broker is its one
//! client: it initializes it, reads its tool list, and forwards the calls
//! agents are allowed to make. When the process dies, the calls in flight
//! get an error at once and it is restarted with backoff; when the broker
//! stops, the whole process group is killed.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lever_policy::config::{Tool, ToolTransport};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{oneshot, watch};

/// Largest response accepted from a backend (one JSON-RPC message).
pub const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// The protocol version the broker asks its backends for.
const BACKEND_VERSION: &str = "2025-11-25";
/// Time for a started backend to answer `initialize`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Restart backoff: doubles from the first to the last, and starts over
/// once a backend has stayed up for `STABLE`.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const STABLE: Duration = Duration::from_secs(10);
/// How long a call waits for a backend that is (re)starting.
const WAIT_FOR_START: Duration = Duration::from_secs(3);

/// Why a call did not produce a backend answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// Not running (starting, restarting, or failing to start).
    Unavailable,
    /// It stopped while the call was in flight.
    Died,
    Timeout(Duration),
    TooLarge,
    /// It answered something that is not a JSON-RPC response.
    Protocol(String),
}

impl CallError {
    pub fn code(&self) -> &'static str {
        match self {
            CallError::Unavailable => "backend_unavailable",
            CallError::Died => "backend_died",
            CallError::Timeout(_) => "backend_timeout",
            CallError::TooLarge => "backend_response_too_large",
            CallError::Protocol(_) => "backend_protocol_error",
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unavailable => {
                f.write_str("the tool backend is not running (it is being restarted)")
            }
            CallError::Died => f.write_str("the tool backend stopped during the call"),
            CallError::Timeout(d) => {
                write!(f, "the tool did not answer within {} ms", d.as_millis())
            }
            CallError::TooLarge => {
                write!(f, "the tool's response is larger than {MAX_RESPONSE} bytes")
            }
            CallError::Protocol(why) => write!(f, "the tool backend broke the protocol: {why}"),
        }
    }
}

/// All backends of an instance, by tool name.
#[derive(Debug, Default)]
pub struct Backends {
    by_name: HashMap<String, Arc<Backend>>,
}

impl Backends {
    /// The backends of `tools`, run in `root` (the instance root, so
    /// relative paths in their commands mean what they mean in lever.yaml).
    pub fn new(tools: &[Tool], root: &std::path::Path) -> Backends {
        Backends {
            by_name: tools
                .iter()
                .map(|t| (t.name.to_string(), Arc::new(Backend::new(t, root))))
                .collect(),
        }
    }

    pub fn get(&self, tool: &str) -> Option<&Arc<Backend>> {
        self.by_name.get(tool)
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.by_name.values()
    }

    /// Starts a supervisor per backend; they run until `stop` turns true,
    /// then kill their process groups.
    pub fn start(&self, stop: &watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        self.by_name
            .values()
            .map(|b| tokio::spawn(b.clone().supervise(stop.clone())))
            .collect()
    }
}

/// One supervised backend.
pub struct Backend {
    pub name: String,
    root: std::path::PathBuf,
    spec: ToolTransport,
    pub timeout: Duration,
    live: watch::Sender<Option<Arc<Live>>>,
    /// The tools it listed when last started (kept across restarts).
    tools: Mutex<Vec<Value>>,
    pub restarts: AtomicU64,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Backend {
    fn new(t: &Tool, root: &std::path::Path) -> Backend {
        Backend {
            name: t.name.to_string(),
            root: root.to_path_buf(),
            spec: t.transport.clone(),
            timeout: t.timeout,
            live: watch::channel(None).0,
            tools: Mutex::new(Vec::new()),
            restarts: AtomicU64::new(0),
        }
    }

    /// The backend's tool named `op`, as it last listed it.
    pub fn tool(&self, op: &str) -> Option<Value> {
        let tools = self.tools.lock().ok()?;
        tools
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some(op))
            .cloned()
    }

    /// The pid of the running process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.live.borrow().as_ref().map(|l| l.pid)
    }

    /// Sends one request and waits for its response (the whole JSON-RPC
    /// response object), within the tool's timeout. Dropping the future
    /// cancels the request at the backend.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, CallError> {
        let started = Instant::now();
        let live = self.running(WAIT_FOR_START.min(self.timeout)).await?;
        let left = self.timeout.saturating_sub(started.elapsed());
        let mut dead = live.dead.subscribe();
        tokio::select! {
            r = tokio::time::timeout(left, live.request(method, params)) => match r {
                Err(_) => Err(CallError::Timeout(self.timeout)),
                Ok(r) => r,
            },
            _ = dead.wait_for(|d| *d) => Err(CallError::Died),
        }
    }

    /// The live connection, waiting up to `wait` for one.
    async fn running(&self, wait: Duration) -> Result<Arc<Live>, CallError> {
        let mut rx = self.live.subscribe();
        let found = tokio::time::timeout(wait, rx.wait_for(|l| l.is_some())).await;
        match found {
            Ok(Ok(l)) => l.clone().ok_or(CallError::Unavailable),
            _ => Err(CallError::Unavailable),
        }
    }

    async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff = BACKOFF_FIRST;
        loop {
            if *stop.borrow() {
                return;
            }
            let started = Instant::now();
            match self.start().await {
                Ok((mut child, live)) => {
                    self.live.send_replace(Some(live.clone()));
                    let exited = tokio::select! {
                        s = child.wait() => Some(s.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())),
                        _ = stop.wait_for(|s| *s) => None,
                    };
                    let Some(status) = exited else {
                        self.live.send_replace(None);
                        live.kill();
                        let _ = child.wait().await;
                        return;
                    };
                    self.live.send_replace(None);
                    // Whatever it left behind goes with it.
                    live.kill();
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "lever broker: tool `{}` exited ({status}); restarting",
                        self.name
                    );
                }
                Err(e) => eprintln!("lever broker: tool `{}` did not start: {e}", self.name),
            }
            if started.elapsed() >= STABLE {
                backoff = BACKOFF_FIRST;
            }
            let stopped = tokio::select! {
                _ = tokio::time::sleep(backoff) => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            if stopped {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Starts the process and initializes it.
    async fn start(&self) -> Result<(Child, Arc<Live>), String> {
        let argv = self.spec.command();
        let Some((program, args)) = argv.split_first() else {
            return Err("empty command".into());
        };
        let mut cmd = Command::new(resolve(program));
        cmd.args(args)
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| {
                matches!(
                    k.to_str(),
                    Some("PATH" | "HOME" | "LANG" | "LC_ALL" | "TMPDIR" | "USER" | "TZ")
                )
            }))
            .current_dir(&self.root)
            .process_group(0)
            .kill_on_drop(true)
            .stderr(Stdio::inherit());
        match &self.spec {
            ToolTransport::Http { backend, .. } => {
                // A stale process on the address would answer in its place.
                if tokio::net::TcpStream::connect(backend).await.is_ok() {
                    return Err(format!("something already listens on {backend}"));
                }
                cmd.arg("-backend")
                    .arg(backend.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null());
            }
            ToolTransport::Stdio { .. } => {
                cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
            }
        }
        let mut child = cmd.spawn().map_err(|e| format!("{program}: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let (dead, _) = watch::channel(false);
        let conn = match &self.spec {
            ToolTransport::Http { backend, .. } => {
                let deadline = Instant::now() + READY_TIMEOUT;
                loop {
                    if let Ok(Some(s)) = child.try_wait() {
                        return Err(format!("exited before listening ({s})"));
                    }
                    if tokio::net::TcpStream::connect(backend).await.is_ok() {
                        break;
                    }
                    if Instant::now() >= deadline {
                        kill_group(pid);
                        return Err(format!("did not listen on {backend} in time"));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Conn::Http(Box::new(HttpConn::new(&format!("http://{backend}/mcp"))))
            }
            ToolTransport::Stdio { .. } => {
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err("no stdio pipes".into());
                };
                Conn::Stdio(StdioConn::new(stdin, stdout, dead.clone(), pid))
            }
        };
        let live = Arc::new(Live {
            pid,
            conn,
            next_id: AtomicU64::new(first_id()),
            dead,
        });
        let ready = tokio::time::timeout(READY_TIMEOUT, self.initialize(&live)).await;
        match ready {
            Ok(Ok(())) => Ok((child, live)),
            Ok(Err(e)) => {
                live.kill();
                Err(e)
            }
            Err(_) => {
                live.kill();
                Err("did not answer `initialize` in time".into())
            }
        }
    }

    async fn initialize(&self, live: &Arc<Live>) -> Result<(), String> {
        let init = live
            .request(
                "initialize",
                json!({
                    "protocolVersion": BACKEND_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "lever-broker", "version": env!("CARGO_PKG_VERSION")},
                }),
            )
            .await
            .map_err(|e| format!("initialize: {e}"))?;
        let result = init.get("result").ok_or_else(|| {
            format!(
                "initialize failed: {}",
                init.get("error").unwrap_or(&Value::Null)
            )
        })?;
        if let (Conn::Http(h), Some(v)) = (
            &live.conn,
            result.get("protocolVersion").and_then(Value::as_str),
        ) && let Ok(v) = HeaderValue::from_str(v)
            && let Ok(mut slot) = h.version.lock()
        {
            *slot = Some(v);
        }
        live.notify("notifications/initialized", json!({})).await;
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..32 {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let page = live
                .request("tools/list", params)
                .await
                .map_err(|e| format!("tools/list: {e}"))?;
            let result = page.get("result").ok_or("tools/list failed")?;
            if let Some(list) = result.get("tools").and_then(Value::as_array) {
                tools.extend(list.iter().cloned());
            }
            cursor = result
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        if let Ok(mut t) = self.tools.lock() {
            *t = tools;
        }
        Ok(())
    }
}

/// A command without a `/` is looked up next to the running executable
/// first (where `lever-tool-db` is installed beside `lever`), then on PATH.
fn resolve(program: &str) -> std::ffi::OsString {
    if !program.contains('/')
        && let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
        && dir.join(program).is_file()
    {
        return dir.join(program).into_os_string();
    }
    program.into()
}

fn kill_group(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// A started, initialized backend process.
struct Live {
    pid: u32,
    conn: Conn,
    next_id: AtomicU64,
    /// Turns true when the process is gone.
    dead: watch::Sender<bool>,
}

enum Conn {
    Http(Box<HttpConn>),
    Stdio(StdioConn),
}

impl Live {
    fn kill(&self) {
        self.dead.send_replace(true);
        kill_group(self.pid);
    }

    async fn request(self: &Arc<Self>, method: &str, params: Value) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        // If the caller goes away first, tell the backend to stop working.
        let mut guard = CancelOnDrop {
            live: Some(self.clone()),
            id,
        };
        let r = match &self.conn {
            Conn::Http(h) => h.request(&msg, id).await,
            Conn::Stdio(s) => s.request(&msg, id).await,
        };
        guard.live = None;
        if let (Conn::Http(h), Err(CallError::Protocol(why))) = (&self.conn, &r)
            && why.starts_with("HTTP 404")
            && h.session.lock().is_ok_and(|s| s.is_some())
        {
            // The backend forgot our session: a restart initializes anew.
            self.kill();
        }
        r
    }

    async fn notify(&self, method: &str, params: Value) {
        let msg = json!({"jsonrpc": "2.0", "method": method, "params": params});
        match &self.conn {
            Conn::Http(h) => h.notify(&msg).await,
            Conn::Stdio(s) => s.send(&msg).await,
        }
    }
}

struct CancelOnDrop {
    live: Option<Arc<Live>>,
    id: u64,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(live) = self.live.take() else { return };
        if let Conn::Stdio(s) = &live.conn
            && let Ok(mut p) = s.pending.lock()
        {
            p.remove(&self.id);
        }
        let id = self.id;
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                live.notify(
                    "notifications/cancelled",
                    json!({"requestId": id, "reason": "the call was cancelled: by the agent, by the agent going away, or by a revocation"}),
                )
                .await;
            });
        }
    }
}

/// A backend's first request id: random (below 2^52, so a backend that
/// reads JSON numbers as doubles keeps them exact). Ids are internal to
/// the broker; an agent that makes a backend print a line cannot guess the
/// id of another agent's pending call.
fn first_id() -> u64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 1;
    }
    (u64::from_le_bytes(b) >> 12).max(1)
}

/// Whether `msg` is the response to request `id`.
fn is_response_to(msg: &Value, id: u64) -> bool {
    msg.get("method").is_none()
        && msg.get("id").and_then(Value::as_u64) == Some(id)
        && (msg.get("result").is_some() || msg.get("error").is_some())
}

/// MCP streamable HTTP to a loopback backend.
struct HttpConn {
    /// One pool per jail worker.
    client: crate::server::PerWorker<Client<HttpConnector, Full<Bytes>>>,
    url: http::Uri,
    session: Mutex<Option<HeaderValue>>,
    version: Mutex<Option<HeaderValue>>,
}

impl HttpConn {
    fn new(url: &str) -> HttpConn {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        HttpConn {
            client: crate::server::PerWorker::new(|| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(http.clone())
            }),
            url: url.parse().unwrap_or_default(),
            session: Mutex::new(None),
            version: Mutex::new(None),
        }
    }

    fn post(&self, msg: &Value) -> Result<Request<Full<Bytes>>, CallError> {
        let mut b = Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream");
        if let Some(s) = self.session.lock().ok().and_then(|s| s.clone()) {
            b = b.header("mcp-session-id", s);
        }
        if let Some(v) = self.version.lock().ok().and_then(|v| v.clone()) {
            b = b.header("mcp-protocol-version", v);
        }
        b.body(Full::new(Bytes::from(msg.to_string())))
            .map_err(|e| CallError::Protocol(e.to_string()))
    }

    async fn notify(&self, msg: &Value) {
        if let Ok(req) = self.post(msg)
            && let Ok(resp) = self.client.get().request(req).await
        {
            let _ = resp.into_body().collect().await;
        }
    }

    async fn request(&self, msg: &Value, id: u64) -> Result<Value, CallError> {
        let resp = self
            .client
            .get()
            .request(self.post(msg)?)
            .await
            .map_err(|_| CallError::Died)?;
        if resp.status() != StatusCode::OK {
            return Err(CallError::Protocol(format!("HTTP {}", resp.status())));
        }
        if let Some(s) = resp.headers().get("mcp-session-id")
            && let Ok(mut slot) = self.session.lock()
        {
            *slot = Some(s.clone());
        }
        let sse = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut body = resp.into_body();
        if !sse {
            let bytes = http_body_util::Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        CallError::TooLarge
                    } else {
                        CallError::Died
                    }
                })?
                .to_bytes();
            let v: Value = serde_json::from_slice(&bytes)
                .map_err(|e| CallError::Protocol(format!("not JSON: {e}")))?;
            return if is_response_to(&v, id) {
                Ok(v)
            } else {
                Err(CallError::Protocol(
                    "not the response to the request".into(),
                ))
            };
        }
        // An SSE stream: events until the one that answers `id`.
        let mut seen = 0usize;
        let mut line: Vec<u8> = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| CallError::Died)?;
            let Some(chunk) = frame.data_ref() else {
                continue;
            };
            seen += chunk.len();
            if seen > MAX_RESPONSE {
                return Err(CallError::TooLarge);
            }
            for &b in chunk.iter() {
                if b != b'\n' {
                    line.push(b);
                    continue;
                }
                let l = std::mem::take(&mut line);
                let l = l.strip_suffix(b"\r").unwrap_or(&l);
                if l.is_empty() {
                    // End of an event.
                    if !data.is_empty() {
                        let ev = std::mem::take(&mut data);
                        if let Ok(v) = serde_json::from_slice::<Value>(&ev)
                            && is_response_to(&v, id)
                        {
                            return Ok(v);
                        }
                    }
                } else if let Some(d) = l.strip_prefix(b"data:") {
                    if !data.is_empty() {
                        data.push(b'\n');
                    }
                    data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
                }
            }
        }
        Err(CallError::Died)
    }
}

/// Calls waiting for their response, by request id.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, CallError>>>>>;

/// MCP over a child's stdin/stdout: one JSON message per line.
struct StdioConn {
    /// Whole lines for the writer task: a caller that goes away mid-send
    /// never leaves half a line in the pipe.
    lines: tokio::sync::mpsc::Sender<Vec<u8>>,
    pending: Pending,
}

impl StdioConn {
    fn new(
        stdin: ChildStdin,
        stdout: ChildStdout,
        dead: watch::Sender<bool>,
        pid: u32,
    ) -> StdioConn {
        let pending: Pending = Arc::default();
        let (lines, mut lines_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        let replies = lines.clone();
        let reader_pending = pending.clone();
        tokio::spawn(async move {
            let mut out = BufReader::new(stdout);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match read_line(&mut out, &mut buf).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(Oversize::Answer(id)) => {
                        // An answer over the cap, read to its end and
                        // dropped: only its call fails, the others go on.
                        if let Some(tx) = reader_pending.lock().ok().and_then(|mut p| p.remove(&id))
                        {
                            let _ = tx.send(Err(CallError::TooLarge));
                        }
                        continue;
                    }
                    Err(Oversize::NotAnAnswer(id)) => {
                        // A request of the backend's, as for one in bounds.
                        if let Some(id) = id {
                            let _ = replies.try_send(line_of(&not_supported(id)));
                        }
                        continue;
                    }
                    Err(Oversize::Unknown) => {
                        // A message over the cap that cannot be told apart:
                        // the stream can no longer be trusted. The calls
                        // waiting fail as the backend stops (one of them
                        // may have been answered by it: none can tell).
                        break;
                    }
                }
                let Ok(msg) = serde_json::from_slice::<Value>(&buf) else {
                    continue;
                };
                if let (Some(_), Some(id)) = (msg.get("method"), msg.get("id")) {
                    // A request from the backend (sampling, roots...): the
                    // broker offers none of these.
                    let _ = replies.try_send(line_of(&not_supported(id.clone())));
                    continue;
                }
                // Only a response (a result or an error, no method) answers
                // a call: a line that merely carries a pending id does not.
                if let Some(id) = msg.get("id").and_then(Value::as_u64)
                    && is_response_to(&msg, id)
                    && let Some(tx) = reader_pending.lock().ok().and_then(|mut p| p.remove(&id))
                {
                    let _ = tx.send(Ok(msg));
                }
            }
            // Output closed, or a message over the cap: the process is gone
            // or can no longer be trusted; the supervisor restarts it.
            dead.send_replace(true);
            kill_group(pid);
            if let Ok(mut p) = reader_pending.lock() {
                p.clear();
            }
        });
        // One writer: calls, notifications and replies to the backend's
        // own requests, each line whole, in order.
        tokio::spawn(async move {
            let mut stdin = stdin;
            while let Some(l) = lines_rx.recv().await {
                if stdin.write_all(&l).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
        });
        StdioConn { lines, pending }
    }

    async fn send(&self, msg: &Value) {
        let _ = self.lines.send(line_of(msg)).await;
    }

    async fn request(&self, msg: &Value, id: u64) -> Result<Value, CallError> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = self.pending.lock() {
            p.insert(id, tx);
        }
        self.send(msg).await;
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(CallError::Died),
        }
    }
}

/// The answer to a request of the backend's (sampling, roots...): the
/// broker offers none of these.
fn not_supported(id: impl Into<Value>) -> Value {
    json!({
        "jsonrpc": "2.0", "id": id.into(),
        "error": {"code": -32601, "message": "not supported through the Lever broker"},
    })
}

/// `msg` as one line of the stdio transport.
fn line_of(msg: &Value) -> Vec<u8> {
    let mut line = msg.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// A line over [`MAX_RESPONSE`], read to its end and dropped.
#[derive(Debug, PartialEq, Eq)]
enum Oversize {
    /// The response to call `id`.
    Answer(u64),
    /// A message that is no response (it has a `method`), with its id.
    NotAnAnswer(Option<u64>),
    /// Its id could not be told (or it ran on past [`MAX_DISCARD`]): the
    /// stream can no longer be trusted.
    Unknown,
}

/// How much of one oversized line is read and dropped before the backend
/// is given up on.
const MAX_DISCARD: usize = 64 * MAX_RESPONSE;

/// Reads one line (without its `\n`) into `buf`. `Ok(false)` at the end of
/// the stream. A line longer than [`MAX_RESPONSE`] is read to its end and
/// dropped, and told by its id where it names one plainly: at the top
/// level of its start (as most JSON-RPC writers put it) or among the
/// scalar members that end it (as the official TypeScript SDK does).
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, Oversize> {
    loop {
        let chunk = match r.fill_buf().await {
            Ok(c) => c,
            Err(_) => return Ok(false),
        };
        if chunk.is_empty() {
            return Ok(false);
        }
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take > MAX_RESPONSE {
            break;
        }
        buf.extend_from_slice(&chunk[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(true);
        }
    }
    let head = top_level(buf);
    // The rest of the line, dropped, its last bytes kept (from what was
    // read already too: the line may end just past the cap).
    let mut tail: Vec<u8> = Vec::with_capacity(2 * TAIL);
    tail.extend_from_slice(&buf[buf.len().saturating_sub(TAIL)..]);
    let mut dropped = buf.len();
    let ended = loop {
        let chunk = match r.fill_buf().await {
            Ok(c) if !c.is_empty() => c,
            _ => break false,
        };
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        tail.extend_from_slice(&chunk[take.saturating_sub(TAIL)..take]);
        if tail.len() > TAIL {
            tail.drain(..tail.len() - TAIL);
        }
        dropped += take;
        r.consume(if done { take + 1 } else { take });
        if done {
            break true;
        }
        if dropped > MAX_DISCARD {
            break false;
        }
    };
    if !ended {
        return Err(Oversize::Unknown);
    }
    if head.method {
        return Err(Oversize::NotAnAnswer(head.id));
    }
    match head.id.or_else(|| last_member_id(&tail)) {
        Some(id) if head.answer => Err(Oversize::Answer(id)),
        _ => Err(Oversize::Unknown),
    }
}

/// The end of an oversized line kept to find its id.
const TAIL: usize = 256;

/// What the start of an oversized line says of the JSON object it begins.
#[derive(Debug, Default, PartialEq, Eq)]
struct Head {
    /// Its top-level `"id"`, an unsigned integer, where `head` holds it whole.
    id: Option<u64>,
    /// A top-level `"result"` or `"error"` key: an answer.
    answer: bool,
    /// A top-level `"method"` key: a request or notification.
    method: bool,
}

/// Reads the top-level keys of the JSON object `head` begins. Strings are
/// skipped whole and nested values passed over, so nothing inside a value
/// (a row of the tool's output) is taken for a key.
fn top_level(head: &[u8]) -> Head {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    // At depth 1, whether the next string is a key, where the key being
    // read started, and the last key read (awaiting its `:`).
    let (mut expect_key, mut key_start, mut key) = (false, None, None::<&[u8]>);
    let mut out = Head::default();
    for (i, &b) in head.iter().enumerate() {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
                if let Some(s) = key_start.take() {
                    key = Some(&head[s..i]);
                }
            }
            continue;
        }
        match b {
            b'"' => {
                in_str = true;
                if depth == 1 && expect_key {
                    key_start = Some(i + 1);
                    expect_key = false;
                }
            }
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1 && b == b'{';
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => expect_key = true,
            b':' if depth == 1 => match key.take() {
                Some(b"method") => out.method = true,
                Some(b"result" | b"error") => out.answer = true,
                Some(b"id") => out.id = integer_at(&head[i + 1..]),
                _ => {}
            },
            _ => {}
        }
    }
    out
}

/// The unsigned integer `s` starts with (after blanks), if it ends within
/// `s` (a value cut short is no id).
fn integer_at(s: &[u8]) -> Option<u64> {
    let s = s.trim_ascii_start();
    let n = s.iter().take_while(|b| b.is_ascii_digit()).count();
    match s.get(n) {
        Some(b' ' | b'\t' | b'\r' | b'\n' | b',' | b'}') if n > 0 => {
            std::str::from_utf8(&s[..n]).ok()?.parse().ok()
        }
        _ => None,
    }
}

/// The `"id"` (an unsigned integer) among the last members of the JSON
/// object that `tail` ends, read backwards over members whose values are
/// numbers or strings: those sit at the top level, right before the
/// object's last `}`. `None` if a nested value comes first.
fn last_member_id(tail: &[u8]) -> Option<u64> {
    let t = tail.trim_ascii_end();
    let mut end = t.len().checked_sub(1).filter(|&i| t[i] == b'}')?;
    for _ in 0..4 {
        let v = t[..end].trim_ascii_end();
        let (value, before) = match v.last()? {
            b'"' => {
                let open = string_start(v, v.len() - 1)?;
                (None, &v[..open])
            }
            b if b.is_ascii_digit() => {
                let n = v.iter().rev().take_while(|b| b.is_ascii_digit()).count();
                (Some(&v[v.len() - n..]), &v[..v.len() - n])
            }
            _ => return None,
        };
        let before = before.trim_ascii_end().strip_suffix(b":")?.trim_ascii_end();
        if before.last() != Some(&b'"') {
            return None;
        }
        let open = string_start(before, before.len() - 1)?;
        let name = &before[open + 1..before.len() - 1];
        let rest = before[..open].trim_ascii_end();
        if name == b"id" {
            return std::str::from_utf8(value?).ok()?.parse().ok();
        }
        match rest.last()? {
            b',' => end = rest.len() - 1,
            _ => return None,
        }
    }
    None
}

/// Where the JSON string whose closing quote is at `close` opens: the
/// quote before it that no backslash escapes.
fn string_start(s: &[u8], close: usize) -> Option<usize> {
    let mut i = close;
    while i > 0 {
        i -= 1;
        if s[i] == b'"' {
            let slashes = s[..i].iter().rev().take_while(|&&b| b == b'\\').count();
            if slashes % 2 == 0 {
                return Some(i);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_of_an_oversized_answer_is_read_where_it_stands_plainly() {
        // At the start, as most writers put it (the rest cut off).
        let head = |id, answer, method| Head { id, answer, method };
        let line = br#"{"jsonrpc":"2.0","id":42,"result":{"content":[{"type":"text","text":"xxxx"#;
        assert_eq!(top_level(line), head(Some(42), true, false));
        let line = br#"{ "id" : 7 , "error": "#;
        assert_eq!(top_level(line), head(Some(7), true, false));
        // Cut inside the number: not an id.
        assert_eq!(
            top_level(br#"{"result":1,"id":12"#),
            head(None, true, false)
        );
        // Nested ids, ids inside strings, escaped keys: not the message's.
        let line = br#"{"result":{"rows":[{"id":9}],"text":"\"id\":3, {\"id\":4"},"jsonrpc":"#;
        assert_eq!(top_level(line), head(None, true, false));
        let line = br#"{"result":{"id":9},"x":"a\\","id":5}"#;
        assert_eq!(top_level(line), head(Some(5), true, false));
        // A request from the backend, its id first.
        let line = br#"{"jsonrpc":"2.0","id":3,"method":"sampling/createMessage","params":"#;
        assert_eq!(top_level(line), head(Some(3), false, true));
        // A string id is not one of the broker's.
        assert_eq!(
            top_level(br#"{"id":"7","result":"#),
            head(None, true, false)
        );

        // At the end, as the TypeScript SDK writes it.
        assert_eq!(
            last_member_id(br#"xxxx"}]},"jsonrpc":"2.0","id":42}"#),
            Some(42)
        );
        assert_eq!(
            last_member_id(br#"xx"}]},"id":42,"jsonrpc":"2.0"}  "#),
            Some(42)
        );
        assert_eq!(last_member_id(br#"text \"quoted\\" ,"id": 8 }"#), Some(8));
        // The last member nested, or the id inside a string: not found.
        assert_eq!(last_member_id(br#"xx"rows":[{"id":9}]}}"#), None);
        assert_eq!(last_member_id(br#"xx","note":"\",\"id\":9"}"#), None);
        assert_eq!(last_member_id(br#"xx","id":"9"}"#), None);
        assert_eq!(last_member_id(br#"xx","id":9"#), None);
        assert_eq!(last_member_id(b""), None);
    }

    /// `read_line` over `data`, read in chunks of `chunk` bytes: what each
    /// call gave, up to the end.
    fn lines_of(data: &[u8], chunk: usize) -> Vec<Result<Vec<u8>, Oversize>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = tokio::io::BufReader::with_capacity(chunk, data);
            let mut out = Vec::new();
            loop {
                let mut buf = Vec::new();
                match read_line(&mut r, &mut buf).await {
                    Ok(true) => out.push(Ok(buf)),
                    Ok(false) => return out,
                    Err(e) => out.push(Err(e)),
                }
            }
        })
    }

    #[test]
    fn an_oversized_line_is_read_to_its_end_and_told_by_its_id() {
        // A line `over` bytes longer than the cap, ending with `end`.
        let big = |over: usize, end: &str| {
            let mut l = br#"{"result":{"text":""#.to_vec();
            l.resize(MAX_RESPONSE + over - end.len(), b'x');
            l.extend_from_slice(end.as_bytes());
            l.push(b'\n');
            l
        };
        // The id last, the line ending a few bytes past the cap: read in
        // chunks that divide the cap, the chunk that goes over it holds
        // only those bytes.
        for over in [1, 5, 12, 300, 9000] {
            let mut data = big(over, r#""}},"jsonrpc":"2.0","id":42}"#);
            data.extend_from_slice(b"{\"id\":1}\n");
            let got = lines_of(&data, 8192);
            assert_eq!(got[0], Err(Oversize::Answer(42)), "{over} over");
            // The next line is read whole, from its start.
            assert_eq!(got[1], Ok(b"{\"id\":1}".to_vec()));
            assert_eq!(got.len(), 2);
        }
        // No id anywhere, or a nested one only: not told.
        let data = big(10, r#""},"rows":[{"id":3}]}"#);
        assert_eq!(lines_of(&data, 8192), [Err(Oversize::Unknown)]);
        // A request of the backend's, its id first.
        let mut data = br#"{"jsonrpc":"2.0","id":3,"method":"x","params":{"p":""#.to_vec();
        data.resize(MAX_RESPONSE + 100, b'y');
        data.extend_from_slice(b"\"}}\n");
        assert_eq!(
            lines_of(&data, 65536),
            [Err(Oversize::NotAnAnswer(Some(3)))]
        );
        // A line that never ends: given up on, once, at the end of the
        // stream.
        let data = vec![b'z'; MAX_RESPONSE + 10];
        assert_eq!(lines_of(&data, 65536), [Err(Oversize::Unknown)]);
    }
}
