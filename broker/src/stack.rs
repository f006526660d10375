//! What every request goes through, outermost first. Each step sits where
//! it is for a reason:
//!
//! 1. **request id**: first, so every record and response can name it.
//! 2. **rescue**: wraps everything below; the one place an [`ApiError`]
//!    becomes a response (`{"error":{"code","message"}}`) and a `deny` audit
//!    record. Nothing below writes an error response itself.
//! 3. **admin guard** (admin listener): loopback `Host`, no `Origin`, JSON
//!    bodies only: the admin API is unauthenticated, so a browser on the
//!    host must not be able to drive it (DNS rebinding, cross-site POST).
//! 4. **authenticate the peer** (jail listener): the client certificate's
//!    CN, which must be a configured agent and not revoked. Only
//!    `/v1/enrol` and `/healthz` skip it. No body is read before this.
//! 5. **route**: the handlers in `jail.rs` / `admin.rs`, which verify
//!    capability tokens where a route takes one, then read the body with a
//!    size cap and a deadline.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::de::DeserializeOwned;

use crate::audit::Record;
use crate::error::ApiError;
use crate::server::{Body, Conn, Listener, full};
use crate::{Broker, admin, jail};

/// The context a handler gets.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// Shared: what outlives the handler (a response body) keeps a clone.
    pub broker: &'a std::sync::Arc<Broker>,
    pub conn: &'a Conn,
    pub request_id: String,
    /// The authenticated peer identity (jail routes behind step 4).
    pub peer: Option<String>,
    /// Set when a handler recorded its own, richer denial: the rescue
    /// layer then does not record it again.
    audited: AtomicBool,
    /// A refusal answered inside a successful response (an MCP JSON-RPC
    /// error), for the request's span.
    pub denied_inside: std::sync::OnceLock<&'static str>,
    /// The request's trace ids, derived once when telemetry asks.
    trace: std::sync::OnceLock<crate::otel::Ids>,
}

impl Ctx<'_> {
    /// The caller's CN: the authenticated peer, else the identity of the
    /// certificate the connection presented, if it verified.
    pub fn cn(&self) -> Option<&str> {
        match (&self.peer, &self.conn.peer) {
            (Some(cn), _) | (None, Some(Ok(cn))) => Some(cn),
            _ => None,
        }
    }

    /// The request's trace and span ids.
    pub fn trace_ids(&self, o: &crate::otel::Otel) -> crate::otel::Ids {
        *self.trace.get_or_init(|| o.ids(&self.request_id))
    }

    /// The trace ids, if telemetry has derived them already.
    pub fn known_trace_ids(&self) -> Option<crate::otel::Ids> {
        self.trace.get().copied()
    }

    /// Records a denial the handler is about to return.
    pub async fn audit_deny(&self, rec: Record) {
        self.audited.store(true, Ordering::Relaxed);
        self.broker.audit.log(rec).await;
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

fn request_id(broker: &Broker) -> String {
    use std::fmt::Write;
    let mut id = String::with_capacity(broker.instance_tag.len() + 12);
    let _ = write!(
        id,
        "{}-{:06}",
        broker.instance_tag,
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    );
    id
}

pub async fn handle(
    broker: &std::sync::Arc<Broker>,
    conn: &Conn,
    req: Request<Incoming>,
) -> Response<Body> {
    let mut ctx = Ctx {
        broker,
        conn,
        request_id: request_id(broker),
        peer: None,
        audited: AtomicBool::new(false),
        denied_inside: std::sync::OnceLock::new(),
        trace: std::sync::OnceLock::new(),
    };
    // Kept for the rescue layer; formatted only when a request fails.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let started = std::time::Instant::now();
    // The clock is read for the request's span alone.
    let wall = broker
        .audit
        .otel
        .get()
        .map(|_| std::time::SystemTime::now());
    let mut denied: Option<&'static str> = None;
    let kind = crate::metrics::route_kind(conn.listener == Listener::Admin, uri.path());
    let result = match conn.listener {
        Listener::Admin => match admin_guard(&req) {
            Ok(()) => Box::pin(admin::route(&ctx, req)).await,
            Err(e) => Err(e),
        },
        Listener::Jail => match authenticate(&mut ctx, &req) {
            Ok(()) => jail::route(&ctx, req).await,
            Err(e) => Err(e),
        },
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            denied = Some(e.code());
            broker.stats.denial(kind, e.code(), e.rate_limited_lane());
            Box::pin(rescue(&ctx, &format!("{method} {}", uri.path()), e)).await
        }
    };
    broker.stats.inc(
        "lever_requests_total",
        &[("route", kind), ("status", resp.status().as_str())],
        1,
    );
    broker.stats.observe(
        "lever_request_duration_seconds",
        &[("route", kind)],
        started.elapsed(),
    );
    if let (Some(o), Some(wall)) = (broker.audit.otel.get(), wall) {
        let status = resp.status().as_u16();
        let denied = denied.or_else(|| ctx.denied_inside.get().copied());
        request_span(o, &ctx, &method, kind, status, denied, wall);
    }
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        resp.headers_mut().insert(X_REQUEST_ID.clone(), v);
    }
    resp
}

/// The request's server span (HTTP server conventions, plus `lever.*`).
fn request_span(
    o: &crate::otel::Otel,
    ctx: &Ctx<'_>,
    method: &Method,
    kind: &str,
    status: u16,
    denied: Option<&'static str>,
    start: std::time::SystemTime,
) {
    let route = route_template(kind);
    let ids = ctx.trace_ids(o);
    let Some(mut sp) = o.span(
        &ids,
        None,
        &[method.as_str(), " ", route],
        crate::otel::SERVER,
        start,
    ) else {
        return;
    };
    sp.str("http.request.method", method.as_str())
        .str("http.route", route)
        .int("http.response.status_code", i64::from(status))
        .str("lever.request_id", &ctx.request_id)
        .str(
            "lever.decision",
            if denied.is_some() { "deny" } else { "allow" },
        );
    if let Some(reason) = denied {
        sp.str("lever.deny_reason", reason);
    }
    if let Some(p) = &ctx.peer {
        sp.str("lever.identity", p);
    }
    if kind == "llm" || kind == "mcp" || kind == "capabilities" || kind == "delegate" {
        sp.int("lever.epoch", ctx.broker.epoch() as i64);
    }
    sp.end((status >= 500).then_some(""));
}

/// The route template of a route kind (never the request's own path).
fn route_template(kind: &str) -> &'static str {
    match kind {
        "healthz" | "admin_healthz" => "/healthz",
        "enrol" => "/v1/enrol",
        "renew" => "/v1/renew",
        "capabilities" => "/v1/capabilities",
        "delegate" => "/v1/capabilities/delegate",
        "tools" => "/v1/tools",
        "provision" => "/v1/provision",
        "mcp" => "/mcp",
        "llm" => "/llm/{path}",
        "admin_epoch" => "/epoch",
        "admin_register" => "/register",
        "admin_bootstrap" => "/bootstrap",
        "admin_revoke" => "/revoke",
        "admin_bump_epoch" => "/bump-epoch",
        "admin_metrics" => "/metrics",
        _ => "(other)",
    }
}

async fn rescue(ctx: &Ctx<'_>, route: &str, e: ApiError) -> Response<Body> {
    let status = e.status();
    let message = match &e {
        // Internal details go to the log, not to the peer.
        ApiError::Internal(detail) => {
            eprintln!(
                "lever broker: {} {route}: internal error: {detail}",
                ctx.request_id
            );
            "internal error".to_owned()
        }
        other => other.to_string(),
    };
    let mut rec = Record::new("deny")
        .deny(e.code())
        .request(ctx)
        .detail("route", route.to_owned())
        .detail("status", status.as_u16())
        .detail("message", message.clone());
    if let Some(cn) = ctx.cn() {
        rec = rec.identity(cn);
    }
    if !ctx.audited.load(Ordering::Relaxed) {
        ctx.broker.audit.log(rec).await;
    }
    // Denials are answered in the caller's protocol.
    let path = route.split_whitespace().nth(1).unwrap_or("");
    let body = if path.starts_with("/llm/") {
        serde_json::json!({"type": "error", "error": {"type": e.anthropic_type(), "message": message}})
    } else if path == "/mcp" {
        crate::mcp::rpc_error(
            &serde_json::Value::Null,
            crate::mcp::code_of(&e),
            &message,
            Some(serde_json::json!({"reason": e.code()})),
        )
    } else {
        serde_json::json!({"error": {"code": e.code(), "message": message}})
    };
    let mut resp = json(status, &body);
    if let ApiError::RateLimited(_, _, wait) = &e
        && let Ok(v) = HeaderValue::from_str(&retry_secs(*wait).to_string())
    {
        resp.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    resp
}

/// The whole seconds a client told to wait must wait, rounded up (a
/// client that comes back after a rounded-down wait is refused again).
pub fn retry_secs(wait: std::time::Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// Step 3.
fn admin_guard(req: &Request<Incoming>) -> Result<(), ApiError> {
    if req.headers().contains_key(http::header::ORIGIN) {
        return Err(ApiError::Forbidden(
            "the admin API does not serve browsers (Origin header present)".into(),
        ));
    }
    // Fetch metadata: what a browser sends even where it leaves Origin
    // out; only a request the user typed in (`none`) is not cross-site.
    if req
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() != b"none")
    {
        return Err(ApiError::Forbidden(
            "the admin API does not serve browsers (Sec-Fetch-Site header present)".into(),
        ));
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let hostname = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let loopback = hostname == "localhost"
        || hostname
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(ApiError::Forbidden(format!(
            "Host {host:?} is not a loopback name"
        )));
    }
    if req.method() == Method::POST {
        require_json(req)?;
    }
    Ok(())
}

/// Step 4.
fn authenticate(ctx: &mut Ctx<'_>, req: &Request<Incoming>) -> Result<(), ApiError> {
    let path = req.uri().path();
    if path == "/healthz" || path == "/v1/enrol" {
        return Ok(());
    }
    let cn = match &ctx.conn.peer {
        None => return Err(ApiError::NoClientCert),
        Some(Err(why)) => return Err(ApiError::BadClientCert(why.clone())),
        Some(Ok(cn)) => cn,
    };
    ctx.peer = Some(cn.clone());
    if ctx.broker.state.is_identity_revoked(cn) {
        return Err(ApiError::IdentityRevoked(cn.clone()));
    }
    if ctx.broker.config.agent(cn).is_none() {
        return Err(ApiError::UnknownAgent(cn.clone()));
    }
    Ok(())
}

/// A body is JSON when it says so or says nothing: any other declared
/// type is refused, which also keeps out the form and `text/plain` posts a
/// browser can make without a preflight.
pub fn require_json<B>(req: &Request<B>) -> Result<(), ApiError> {
    let Some(ct) = req.headers().get(http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = ct
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Reads a body of at most `limit` bytes within the listener's body
/// deadline. Call only after the caller is authenticated.
pub async fn read_body(ctx: &Ctx<'_>, body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    let body = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(ctx.conn.limits.body_timeout, body.collect()).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::BodyTooLarge(limit))
        }
        Ok(Err(_)) => Err(ApiError::BadRequest(
            "the request body could not be read".into(),
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Reads a JSON body of at most `limit` bytes within the listener's body
/// deadline. Call only after the caller is authenticated.
pub async fn read_json<T: DeserializeOwned>(
    ctx: &Ctx<'_>,
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, ApiError> {
    require_json(&req)?;
    if let Some(len) = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::BodyTooLarge(limit));
    }
    let bytes = read_body(ctx, req.into_body(), limit).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::BadRequest(format!("invalid JSON body: {}", unquote(&e.to_string())))
    })
}

/// serde's messages quote the values they choke on; a value may be a
/// token or a ticket sent in the wrong field, so quoted text is elided
/// before the message reaches a response or the audit log.
fn unquote(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quoted = false;
    for c in msg.chars() {
        match c {
            '"' if quoted => {
                out.push_str("...\"");
                quoted = false;
            }
            '"' => {
                out.push('"');
                quoted = true;
            }
            c if !quoted => out.push(c),
            _ => {}
        }
    }
    out
}

pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

pub fn ok(v: serde_json::Value) -> Result<Response<Body>, ApiError> {
    Ok(json(StatusCode::OK, &v))
}

/// Dispatches on method for one path.
pub fn expect_method(req: &Request<Incoming>, m: Method) -> Result<(), ApiError> {
    if req.method() == m {
        Ok(())
    } else {
        Err(ApiError::MethodNotAllowed)
    }
}
