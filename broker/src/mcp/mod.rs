//! `/mcp`: one MCP endpoint (streamable HTTP) in front of every tool
//! backend, showing each caller only what its capability token allows.
//!
//! The broker is the MCP server agents see: it answers `initialize`, `ping`
//! and `tools/list` itself and authorizes every `tools/call` against the
//! caller's token (tool, operation, and every pinned constraint equal to the
//! call's argument of that name) before anything reaches a backend. Tools
//! are listed as `TOOL_OP` (`db_read`): tool names never contain `_`, so the
//! first `_` splits them.
//!
//! HTTP-level problems (no session, unknown session, wrong content type,
//! oversized body, token refused) get their HTTP status with a JSON-RPC
//! error body; what goes wrong with one call (not granted, a constraint,
//! a rate limit, the backend) is a JSON-RPC error in a `200`, which every
//! MCP client hands to the agent.

pub mod backend;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use lever_policy::token::{Denial, MAX_ARG_LEN, Verified};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;

use crate::HeldToken;
use crate::audit::Record;
use crate::error::ApiError;
use crate::server::{Body, full};
use crate::stack::Ctx;

pub use backend::Backends;

/// Largest JSON-RPC message accepted from an agent.
pub const MAX_REQUEST: usize = 1024 * 1024;
/// Protocol versions spoken, newest first.
pub const VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26"];
/// A session unused this long is forgotten (the client re-initializes).
const SESSION_IDLE: Duration = Duration::from_secs(3600);
/// Sessions kept per identity; the least recently used goes first.
const SESSIONS_PER_IDENTITY: usize = 32;

/// JSON-RPC error codes.
pub mod code {
    pub const PARSE: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    /// The capability token does not allow this call.
    pub const DENIED: i64 = -32001;
    /// The caller's rate limit for tool calls is spent.
    pub const RATE_LIMITED: i64 = -32002;
    /// The tool backend failed (down, died, timed out, too large).
    pub const BACKEND: i64 = -32003;
    /// The call was cancelled by the caller.
    pub const CANCELLED: i64 = -32800;
}

/// MCP sessions, each bound to the identity that opened it.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

#[derive(Debug)]
struct Session {
    identity: String,
    version: &'static str,
    last_seen: Instant,
    /// Calls in flight, by the caller's request id (JSON text).
    in_flight: HashMap<String, oneshot::Sender<()>>,
}

impl Sessions {
    fn open(&self, identity: &str, version: &'static str) -> String {
        let mut raw = [0u8; 16];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw);
        let id = lever_policy::hex::encode(&raw);
        if let Ok(mut m) = self.map.lock() {
            let now = Instant::now();
            m.retain(|_, s| now.duration_since(s.last_seen) < SESSION_IDLE);
            let mut mine: Vec<(Instant, String)> = m
                .iter()
                .filter(|(_, s)| s.identity == identity)
                .map(|(k, s)| (s.last_seen, k.clone()))
                .collect();
            if mine.len() >= SESSIONS_PER_IDENTITY {
                mine.sort();
                for (_, k) in &mine[..=mine.len() - SESSIONS_PER_IDENTITY] {
                    m.remove(k);
                }
            }
            m.insert(
                id.clone(),
                Session {
                    identity: identity.to_owned(),
                    version,
                    last_seen: now,
                    in_flight: HashMap::new(),
                },
            );
        }
        id
    }

    /// The session `id` of `identity`: another identity's session is as
    /// unknown as one that never existed.
    fn touch(&self, id: &str, identity: &str) -> Option<&'static str> {
        let mut m = self.map.lock().ok()?;
        let s = m.get_mut(id)?;
        if s.identity != identity || s.last_seen.elapsed() >= SESSION_IDLE {
            return None;
        }
        s.last_seen = Instant::now();
        Some(s.version)
    }

    fn close(&self, id: &str, identity: &str) -> bool {
        let Ok(mut m) = self.map.lock() else {
            return false;
        };
        if m.get(id).is_some_and(|s| s.identity == identity) {
            m.remove(id);
            true
        } else {
            false
        }
    }

    fn track(&self, id: &str, request: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut m) = self.map.lock()
            && let Some(s) = m.get_mut(id)
        {
            s.in_flight.insert(request.to_owned(), tx);
        }
        rx
    }

    fn untrack(&self, id: &str, request: &str) {
        if let Ok(mut m) = self.map.lock()
            && let Some(s) = m.get_mut(id)
        {
            s.in_flight.remove(request);
        }
    }

    fn cancel(&self, id: &str, request: &str) {
        if let Ok(mut m) = self.map.lock()
            && let Some(s) = m.get_mut(id)
            && let Some(tx) = s.in_flight.remove(request)
        {
            let _ = tx.send(());
        }
    }
}

fn rpc_body(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn rpc_result(id: &Value, result: Value) -> Response<Body> {
    rpc_body(
        StatusCode::OK,
        &json!({"jsonrpc": "2.0", "id": id, "result": result}),
    )
}

/// A JSON-RPC error object.
pub fn rpc_error(id: &Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut e = json!({"code": code, "message": message});
    if let Some(d) = data {
        e["data"] = d;
    }
    json!({"jsonrpc": "2.0", "id": id, "error": e})
}

fn accepted() -> Response<Body> {
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::ACCEPTED;
    r
}

/// The JSON-RPC error code an HTTP-level refusal is reported with.
pub fn code_of(e: &ApiError) -> i64 {
    match e {
        ApiError::BadRequest(_) | ApiError::UnsupportedMediaType | ApiError::BodyTooLarge(_) => {
            code::INVALID_REQUEST
        }
        ApiError::RateLimited(..) => code::RATE_LIMITED,
        ApiError::Token(_) | ApiError::NoToken | ApiError::Forbidden(_) => code::DENIED,
        _ => -32000,
    }
}

pub async fn handle(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let peer = ctx.peer.clone().ok_or(ApiError::NoClientCert)?;
    if req.headers().contains_key(http::header::ORIGIN) {
        // Agents are not browsers: a page must never reach the tools.
        return Err(ApiError::Forbidden(
            "/mcp does not serve browsers (Origin header present)".into(),
        ));
    }
    let session = match req.headers().get("mcp-session-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::BadRequest("malformed Mcp-Session-Id".into()))?
                .to_owned(),
        ),
    };
    // The token is judged on every message, DELETE included, before any
    // body is read: an agent whose token is revoked or expired keeps
    // nothing, not even the say over its sessions.
    let token = crate::jail::bearer_of(req.headers())?
        .map(str::to_owned)
        .ok_or(ApiError::NoToken)?;
    let held = ctx
        .broker
        .hold_token(&token, &peer)
        .map_err(ApiError::from)?;
    let verified = held.verified().clone();
    match *req.method() {
        Method::POST => {}
        Method::DELETE => {
            let Some(id) = session else {
                return Err(ApiError::SessionRequired);
            };
            return if ctx.broker.mcp_sessions.close(&id, &peer) {
                Ok(rpc_body(StatusCode::OK, &json!({})))
            } else {
                Err(ApiError::SessionUnknown)
            };
        }
        // No server-initiated messages: the spec lets a server say 405.
        _ => return Err(ApiError::MethodNotAllowed),
    }
    crate::stack::require_json(&req)?;
    let version_header = req
        .headers()
        .get("mcp-protocol-version")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let body = crate::stack::read_body(ctx, req.into_body(), MAX_REQUEST).await?;
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Ok(rpc_body(
                StatusCode::BAD_REQUEST,
                &rpc_error(
                    &Value::Null,
                    code::PARSE,
                    &format!("parse error: {e}"),
                    None,
                ),
            ));
        }
    };
    let Value::Object(msg) = msg else {
        let why = if msg.is_array() {
            "JSON-RPC batches are not supported: send one message per request"
        } else {
            "a JSON-RPC message must be an object"
        };
        return Ok(rpc_body(
            StatusCode::BAD_REQUEST,
            &rpc_error(&Value::Null, code::INVALID_REQUEST, why, None),
        ));
    };
    let id = msg.get("id").cloned();
    let id_or_null = id.clone().unwrap_or(Value::Null);
    if msg.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Ok(rpc_body(
            StatusCode::BAD_REQUEST,
            &rpc_error(
                &id_or_null,
                code::INVALID_REQUEST,
                "not JSON-RPC 2.0 (`jsonrpc` must be \"2.0\")",
                None,
            ),
        ));
    }
    if id.as_ref().is_some_and(|i| {
        !(i.is_string() || i.is_i64() || i.is_u64())
            || i.as_str().is_some_and(|s| s.len() > MAX_ID_LEN)
    }) {
        return Ok(rpc_body(
            StatusCode::BAD_REQUEST,
            &rpc_error(
                &Value::Null,
                code::INVALID_REQUEST,
                "a request id must be an integer or a string of at most 256 bytes",
                None,
            ),
        ));
    }
    let method = msg.get("method").and_then(Value::as_str).map(str::to_owned);
    let Some(method) = method else {
        // A response to a server request (the broker sends none): accepted.
        return Ok(accepted());
    };
    let params = msg.get("params").cloned().unwrap_or(Value::Null);

    if method == "initialize" {
        let Some(id) = id else {
            return Ok(rpc_body(
                StatusCode::BAD_REQUEST,
                &rpc_error(
                    &Value::Null,
                    code::INVALID_REQUEST,
                    "initialize needs an id",
                    None,
                ),
            ));
        };
        let asked = params.get("protocolVersion").and_then(Value::as_str);
        let version = VERSIONS
            .iter()
            .copied()
            .find(|v| Some(*v) == asked)
            .unwrap_or(VERSIONS[0]);
        let sid = ctx.broker.mcp_sessions.open(&peer, version);
        ctx.broker
            .audit
            .log(
                Record::new("mcp_session")
                    .allow()
                    .identity(&peer)
                    .token(verified.token_id.as_str())
                    .request(ctx)
                    .detail("session", sid.clone())
                    .detail("protocol_version", version),
            )
            .await;
        let mut resp = rpc_result(
            &id,
            json!({
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "lever-broker", "version": env!("CARGO_PKG_VERSION")},
                "instructions": "Tools brokered by Lever: you see only what your capability token allows.",
            }),
        );
        if let Ok(v) = HeaderValue::from_str(&sid) {
            resp.headers_mut().insert("mcp-session-id", v);
        }
        return Ok(resp);
    }

    let Some(sid) = session else {
        return Err(ApiError::SessionRequired);
    };
    let Some(version) = ctx.broker.mcp_sessions.touch(&sid, &peer) else {
        return Err(ApiError::SessionUnknown);
    };
    if let Some(v) = &version_header
        && v != version
        && !VERSIONS.contains(&v.as_str())
    {
        return Err(ApiError::BadRequest(format!(
            "unsupported MCP-Protocol-Version {v:?} (this session speaks {version})"
        )));
    }

    let Some(id) = id else {
        // Notifications.
        if method == "notifications/cancelled"
            && let Some(r) = params.get("requestId")
        {
            ctx.broker.mcp_sessions.cancel(&sid, &r.to_string());
        }
        return Ok(accepted());
    };
    match method.as_str() {
        "ping" => Ok(rpc_result(&id, json!({}))),
        "tools/list" => Ok(match list(ctx, &peer, &held) {
            Ok(tools) => rpc_result(&id, json!({ "tools": tools })),
            Err(e) => rate_limited(&id, &e),
        }),
        "tools/call" => Ok(call(ctx, &peer, &held, &sid, &id, &params).await),
        other => Ok(rpc_body(
            StatusCode::OK,
            &rpc_error(
                &id,
                code::METHOD_NOT_FOUND,
                &format!("method `{other}` is not supported by the Lever broker (it serves tools)"),
                None,
            ),
        )),
    }
}

/// A JSON-RPC answer to a message over the caller's tool rate: the wait in
/// its `data`, and in a `retry-after` header as on every other route's
/// rate limit.
fn rate_limited(id: &Value, e: &ApiError) -> Response<Body> {
    let wait = match e {
        ApiError::RateLimited(_, _, w) => crate::stack::retry_secs(*w),
        _ => 1,
    };
    let mut r = rpc_body(
        StatusCode::OK,
        &rpc_error(
            id,
            code::RATE_LIMITED,
            &e.to_string(),
            Some(json!({"reason": "rate_limited", "retry_after_secs": wait})),
        ),
    );
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(wait));
    r
}

/// The tools `verified` allows, as their backends describe them, named
/// `TOOL_OP`. A token with blocks beyond the broker's (checks its holder
/// appended offline, or a delegated token's inherited ones) lists a grant
/// only if a call with the grant's own pinned values would pass those
/// checks: an attenuated token never advertises what it cannot call. Such
/// a list runs a Datalog evaluation per grant, so it counts against the
/// caller's tool-call rate like a call.
fn list(ctx: &Ctx<'_>, peer: &str, held: &HeldToken) -> Result<Vec<Value>, ApiError> {
    let verified = held.verified();
    let facts_only = !verified.carries_checks;
    let _admitted = if facts_only {
        None
    } else {
        Some(ctx.broker.limits.tools.admit(peer)?)
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for g in &verified.grants {
        if !seen.insert((g.tool.clone(), g.op.clone())) {
            continue;
        }
        if !facts_only
            && ctx
                .broker
                .authorize_held(held, peer, &g.tool, &g.op, &g.constraints)
                .is_err()
        {
            continue;
        }
        let Some(tool) = ctx.broker.config.broker.tool(&g.tool) else {
            continue;
        };
        if tool.operation(&g.op).is_none() {
            continue;
        }
        let Some(b) = ctx.broker.tools.get(&g.tool) else {
            continue;
        };
        let Some(mut t) = b.tool(&g.op) else {
            continue;
        };
        t["name"] = Value::String(format!("{}_{}", g.tool, g.op));
        if !g.constraints.is_empty() {
            let pins: Vec<String> = g
                .constraints
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let d = t.get("description").and_then(Value::as_str).unwrap_or("");
            t["description"] = Value::String(
                format!("{d} [Lever: your capability pins {}]", pins.join(", "))
                    .trim()
                    .to_owned(),
            );
        }
        out.push(t);
    }
    Ok(out)
}

/// Longest request id (a string id is kept while its call is in flight).
const MAX_ID_LEN: usize = 256;

/// Longest text taken from a request into a record, a span or an error:
/// what an agent sends never grows the audit trail without bound.
const MAX_RECORDED: usize = 256;

/// `s`, cut to at most [`MAX_RECORDED`] bytes (at a character boundary)
/// and marked when cut.
fn clip(s: &str) -> String {
    if s.len() <= MAX_RECORDED {
        return s.to_owned();
    }
    let mut end = MAX_RECORDED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// A call handed to its backend. If the request goes away before the
/// answer (the agent disconnected, and hyper dropped the handler), the
/// call still leaves its record, as `abandoned`, and its session forgets
/// it.
struct InFlight<'a> {
    broker: &'a crate::Broker,
    sid: &'a str,
    key: String,
    /// Makes the record to write if the call is abandoned (built only
    /// then: not on every call); taken once answered.
    abandoned: Option<&'a (dyn Fn() -> Record + Sync)>,
    tool: &'a str,
    started: Instant,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.broker.mcp_sessions.untrack(self.sid, &self.key);
        if let Some(abandoned) = self.abandoned.take() {
            let rec = abandoned();
            let ms = self.started.elapsed().as_secs_f64() * 1000.0;
            self.broker.stats.inc(
                "lever_tool_calls_total",
                &[("tool", self.tool), ("outcome", "abandoned")],
                1,
            );
            self.broker.audit.log_now(rec.detail("backend_ms", ms));
        }
    }
}

/// The arguments judged against the token: string values only (a non-string
/// can never satisfy a pin). A token without checks (facts only: one the
/// broker minted directly, or a delegate that inherited none) has only its
/// pins to meet, so overlong strings, which no pin can equal, are left out;
/// a token with holder-appended or inherited checks is judged on every
/// argument: an overlong one is refused rather than hidden from those
/// checks, and so is one that is not a string (`"id": 1` would slip past a
/// check written for `"1"`).
fn judged_args(
    args: &Map<String, Value>,
    verified: &Verified,
) -> Result<BTreeMap<String, String>, Denial> {
    let facts_only = !verified.carries_checks;
    if !facts_only && args.values().any(|v| !v.is_string()) {
        return Err(Denial::NonStringArgument);
    }
    Ok(args
        .iter()
        .filter_map(|(k, v)| Some((k, v.as_str()?)))
        .filter(|(k, v)| !facts_only || (k.len() <= MAX_ARG_LEN && v.len() <= MAX_ARG_LEN))
        .map(|(k, v)| (k.clone(), v.to_owned()))
        .collect())
}

fn digest(v: &Value) -> String {
    lever_policy::hex::encode(
        ring::digest::digest(&ring::digest::SHA256, v.to_string().as_bytes()).as_ref(),
    )
}

async fn call(
    ctx: &Ctx<'_>,
    peer: &str,
    held: &HeldToken,
    sid: &str,
    id: &Value,
    params: &Value,
) -> Response<Body> {
    let broker = ctx.broker;
    let verified: &Verified = held.verified();
    let reply = |e: Value| rpc_body(StatusCode::OK, &e);
    // The clock is read for the span alone.
    let wall = broker
        .audit
        .otel
        .get()
        .map(|_| std::time::SystemTime::now());
    let span = |name: &str, reason: Option<&str>, outcome: &str| {
        if let (Some(o), Some(wall)) = (broker.audit.otel.get(), wall) {
            tool_span(o, ctx, sid, name, verified, reason, outcome, wall);
        }
    };
    let Some(name) = params.get("name").and_then(Value::as_str) else {
        return reply(rpc_error(
            id,
            code::INVALID_PARAMS,
            "tools/call needs a `name`",
            None,
        ));
    };
    let args = match params.get("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return reply(rpc_error(
                id,
                code::INVALID_PARAMS,
                "`arguments` must be an object",
                None,
            ));
        }
    };
    let args_value = Value::Object(args.clone());
    let args_digest = digest(&args_value);
    let base = |rec: Record| {
        rec.identity(peer)
            .token(verified.token_id.as_str())
            .request(ctx)
            .detail("session", sid.to_owned())
            .detail("call", clip(name))
            .detail("args_sha256", args_digest.clone())
    };
    let known = name.split_once('_').filter(|(t, op)| {
        broker
            .config
            .broker
            .tool(t)
            .is_some_and(|tool| tool.operation(op).is_some())
    });
    let Some((tool, op)) = known else {
        broker.stats.denial("mcp", "unknown_tool", None);
        broker
            .audit
            .log(base(Record::new("tool").deny("unknown_tool")))
            .await;
        return reply(rpc_error(
            id,
            code::INVALID_PARAMS,
            &format!("unknown tool `{}` (see tools/list)", clip(name)),
            None,
        ));
    };
    // An operation that declares its arguments takes no others: what the
    // operator did not name never reaches the backend unjudged.
    let declared = broker
        .config
        .broker
        .tool(tool)
        .and_then(|t| t.operation(op))
        .and_then(|o| o.args.as_ref());
    if let Some(declared) = declared
        && let Some(k) = args.keys().find(|k| !declared.contains(k))
    {
        broker.stats.denial("mcp", "unknown_argument", None);
        broker
            .audit
            .log(
                base(Record::new("tool").right(tool.to_owned(), op.to_owned()))
                    .deny("unknown_argument"),
            )
            .await;
        return reply(rpc_error(
            id,
            code::INVALID_PARAMS,
            &format!(
                "`{}` is not an argument of {name} (it takes: {})",
                clip(k),
                declared.join(", ")
            ),
            Some(json!({"reason": "unknown_argument"})),
        ));
    }
    let judged = judged_args(&args, verified);
    // The constraint values this call is held to, for the record.
    let pinned: BTreeMap<String, String> = verified
        .grants
        .iter()
        .filter(|g| g.tool == tool && g.op == op)
        .flat_map(|g| g.constraints.keys())
        .map(|k| {
            let v = args.get(k).map_or_else(
                || "<missing>".to_owned(),
                |v| clip(&v.as_str().map_or_else(|| v.to_string(), str::to_owned)),
            );
            (k.clone(), v)
        })
        .collect();
    let base = |rec: Record| {
        base(rec)
            .right(tool.to_owned(), op.to_owned())
            .constraints(&pinned)
    };
    // The clock is read for the spans alone; the verification's end
    // starts the rate limit's step.
    let otel = broker.audit.otel.get();
    let mut t = otel.map(|_| std::time::SystemTime::now());
    // Subscribed before the token is judged: a revocation that lands from
    // here on is seen by the call, however far it got.
    let mut revocations = broker.revocations.subscribe();
    // From the token `handle` verified for this request.
    let authorized = judged.and_then(|j| broker.authorize_held(held, peer, tool, op, &j));
    if let (Some(o), Some(start)) = (otel, t) {
        t = o.step(
            &ctx.trace_ids(o),
            "verify capability",
            start,
            &[
                ("lever.right", &format!("{tool}/{op}")),
                ("lever.token_id", verified.token_id.as_str()),
            ],
            authorized.as_ref().err().map(|d| d.code()),
        );
    }
    if let Err(d) = authorized {
        broker.stats.denial("mcp", d.code(), None);
        span(name, Some(d.code()), "denied");
        let _ = ctx.denied_inside.set(d.code());
        broker
            .audit
            .log(base(Record::new("tool").deny(d.code())))
            .await;
        let why = match &d {
            Denial::NotGranted => format!("your capability token does not grant {tool}/{op}"),
            Denial::ConstraintMismatch => format!(
                "your capability token for {tool}/{op} pins {}; this call's arguments do not match",
                pins_of(verified, tool, op)
            ),
            other => format!("capability token refused: {other}"),
        };
        return reply(rpc_error(
            id,
            code::DENIED,
            &why,
            Some(json!({"reason": d.code()})),
        ));
    }
    let admitted = broker.limits.tools.admit(peer);
    if let (Some(o), Some(t)) = (otel, t) {
        o.step(
            &ctx.trace_ids(o),
            "rate limit",
            t,
            &[("lever.lane", "tool")],
            admitted.as_ref().err().map(|e| e.code()),
        );
    }
    let permit = match admitted {
        Ok(p) => p,
        Err(e) => {
            broker.stats.denial("mcp", e.code(), e.rate_limited_lane());
            span(name, Some(e.code()), "denied");
            let _ = ctx.denied_inside.set(e.code());
            broker
                .audit
                .log(base(Record::new("tool").deny(e.code())))
                .await;
            return rate_limited(id, &e);
        }
    };
    let Some(backend) = broker.tools.get(tool) else {
        return reply(rpc_error(
            id,
            code::BACKEND,
            "no backend for this tool",
            None,
        ));
    };
    // The name and the judged arguments, nothing else: no `_meta` or other
    // parameter the token never saw reaches the backend.
    let forwarded = json!({"name": op, "arguments": args_value});
    let request_key = id.to_string();
    let cancelled = broker.mcp_sessions.track(sid, &request_key);
    let started = Instant::now();
    let abandoned = || base(Record::new("tool").allow().detail("outcome", "abandoned"));
    let mut in_flight = InFlight {
        broker,
        sid,
        key: request_key,
        abandoned: Some(&abandoned),
        tool,
        started,
    };
    // A revocation or an epoch bump while the call runs: if this token no
    // longer stands, the call is cut (its backend told, as for a cancel).
    let outcome = {
        let call = backend.call("tools/call", forwarded);
        // A session that goes away without cancelling never cancels.
        let cancelled = async {
            if cancelled.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::pin!(call, cancelled);
        tokio::select! {
            biased;
            d = broker.revoked(&mut revocations, verified, peer) => Ended::Revoked(d),
            () = &mut cancelled => Ended::Cancelled,
            r = &mut call => Ended::Answered(r),
        }
        // The call's future ends here: a cut or cancelled call's backend is
        // told before the caller's answer and the record.
    };
    in_flight.abandoned = None;
    drop(in_flight);
    drop(permit);
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let (resp, rec) = match outcome {
        Ended::Cancelled => (
            rpc_error(id, code::CANCELLED, "cancelled", None),
            Record::new("tool").allow().detail("outcome", "cancelled"),
        ),
        Ended::Revoked(d) => (
            rpc_error(
                id,
                code::DENIED,
                &format!("the call was cut: capability token refused: {d}"),
                Some(json!({"reason": d.code()})),
            ),
            Record::new("tool")
                .allow()
                .detail("outcome", "revoked")
                .detail("failure", d.code()),
        ),
        Ended::Answered(Err(e)) => (
            rpc_error(
                id,
                code::BACKEND,
                &e.to_string(),
                Some(json!({"reason": e.code()})),
            ),
            Record::new("tool")
                .allow()
                .detail("outcome", e.code())
                .detail("failure", e.to_string()),
        ),
        Ended::Answered(Ok(mut answer)) => {
            let mut out = json!({"jsonrpc": "2.0", "id": id});
            let outcome = if let Some(r) = answer.get_mut("result") {
                let is_error = r.get("isError").and_then(Value::as_bool) == Some(true);
                out["result"] = r.take();
                if is_error { "tool_error" } else { "ok" }
            } else {
                out["error"] = answer
                    .get_mut("error")
                    .map(Value::take)
                    .unwrap_or(Value::Null);
                "rpc_error"
            };
            (out, Record::new("tool").allow().detail("outcome", outcome))
        }
    };
    let outcome = rec
        .detail_value("outcome")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("")
        .to_owned();
    broker.stats.inc(
        "lever_tool_calls_total",
        &[("tool", tool), ("outcome", &outcome)],
        1,
    );
    span(name, None, &outcome);
    broker.stats.observe(
        "lever_tool_backend_latency_seconds",
        &[("tool", tool)],
        started.elapsed(),
    );
    broker
        .audit
        .log(base(rec).detail("backend_ms", latency_ms))
        .await;
    reply(resp)
}

/// How a call handed to its backend ended.
enum Ended<T> {
    Answered(T),
    /// Cancelled by its caller (`notifications/cancelled`).
    Cancelled,
    /// Its token stopped standing while it ran.
    Revoked(Denial),
}

/// A `tools/call`'s span (MCP and gen_ai conventions), a child of the
/// request's span.
#[allow(clippy::too_many_arguments)]
fn tool_span(
    o: &crate::otel::Otel,
    ctx: &Ctx<'_>,
    sid: &str,
    name: &str,
    verified: &Verified,
    reason: Option<&str>,
    outcome: &str,
    start: std::time::SystemTime,
) {
    let ids = ctx.trace_ids(o);
    let name = &clip(name);
    let title = ["tools/call ", name];
    let Some(mut sp) = o.span(
        &ids,
        Some("tools/call"),
        &title,
        crate::otel::INTERNAL,
        start,
    ) else {
        return;
    };
    sp.str("mcp.method.name", "tools/call")
        .str("mcp.session.id", sid)
        .str("gen_ai.operation.name", "execute_tool")
        .str("gen_ai.tool.name", name)
        .str("lever.token_id", verified.token_id.as_str())
        .str("lever.identity", &verified.holder)
        .str(
            "lever.decision",
            if reason.is_some() { "deny" } else { "allow" },
        )
        .str("lever.outcome", outcome)
        .int("lever.epoch", verified.epoch as i64);
    if let Some(r) = reason {
        sp.str("lever.deny_reason", r);
    }
    let failed = reason.is_some() || !(outcome == "ok" || outcome == "tool_error");
    sp.end(failed.then(|| reason.unwrap_or(outcome)));
}

fn pins_of(verified: &Verified, tool: &str, op: &str) -> String {
    let pins: Vec<String> = verified
        .grants
        .iter()
        .filter(|g| g.tool == tool && g.op == op)
        .flat_map(|g| g.constraints.iter().map(|(k, v)| format!("{k}={v}")))
        .collect();
    if pins.is_empty() {
        "nothing".into()
    } else {
        pins.join(", ")
    }
}
