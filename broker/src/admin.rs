//! The admin listener's routes: loopback only, unauthenticated by design
//! (whoever can reach 127.0.0.1 on the host is the operator). Every state
//! change is durable before the `200`.

use std::time::SystemTime;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use lever_policy::config::Name;
use lever_policy::timefmt::rfc3339;
use lever_policy::token::{TokenId, unix_secs};
use serde::Deserialize;
use serde_json::json;

use crate::audit::Record;
use crate::error::ApiError;
use crate::server::Body;
use crate::stack::{Ctx, expect_method, ok, read_json};

const BODY: usize = 4 * 1024;

pub async fn route(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/healthz" => {
            expect_method(&req, Method::GET)?;
            ok(json!({"status": "ok"}))
        }
        "/metrics" => {
            expect_method(&req, Method::GET)?;
            let b = ctx.broker;
            let restarts: u64 = b
                .tools
                .all()
                .map(|t| t.restarts.load(std::sync::atomic::Ordering::Relaxed))
                .sum();
            let (exported, dropped) = b.audit.otel.get().map_or((0, 0), |o| {
                let c = &o.counters;
                (
                    c.exported.load(std::sync::atomic::Ordering::Relaxed),
                    c.dropped.load(std::sync::atomic::Ordering::Relaxed),
                )
            });
            let text = b.stats.render(&[
                (
                    "lever_tool_backend_restarts_total",
                    "counter",
                    "Tool backends restarted after they stopped.",
                    restarts as f64,
                ),
                (
                    "lever_otel_exported_total",
                    "counter",
                    "Telemetry items (logs, spans) the collector accepted.",
                    exported as f64,
                ),
                (
                    "lever_otel_dropped_total",
                    "counter",
                    "Telemetry items dropped: queue full, or the collector failed or was too slow.",
                    dropped as f64,
                ),
                (
                    "lever_epoch",
                    "gauge",
                    "The current token epoch.",
                    b.epoch() as f64,
                ),
            ]);
            let mut r = Response::new(crate::server::full(text));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(r)
        }
        "/epoch" => {
            expect_method(&req, Method::GET)?;
            ok(json!({"epoch": ctx.broker.epoch()}))
        }
        "/register" => {
            expect_method(&req, Method::POST)?;
            let body: RegisterBody = read_json(ctx, req, BODY).await?;
            register(ctx, &body.identity).await
        }
        "/bootstrap" => {
            expect_method(&req, Method::POST)?;
            let manager = ctx.broker.config.broker.manager_identity.to_string();
            register(ctx, &manager).await
        }
        "/revoke" => {
            expect_method(&req, Method::POST)?;
            let body: RevokeBody = read_json(ctx, req, BODY).await?;
            revoke(ctx, body).await
        }
        "/bump-epoch" => {
            expect_method(&req, Method::POST)?;
            bump_epoch(ctx).await
        }
        _ => Err(ApiError::NotFound(path)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    identity: String,
}

async fn register(ctx: &Ctx<'_>, identity: &str) -> Result<Response<Body>, ApiError> {
    let broker = ctx.broker;
    if broker.config.agent(identity).is_none() {
        return Err(ApiError::UnknownAgent(identity.to_owned()));
    }
    let (ticket, expires_at) = crate::blocking(|| broker.issue_ticket(identity))?;
    broker
        .audit
        .log(
            Record::new("ticket_issue")
                .allow()
                .identity(identity)
                .request(ctx)
                .detail("by", "admin")
                .detail("expires_at", rfc3339(expires_at)),
        )
        .await;
    ok(json!({"ticket": ticket, "expires_at": rfc3339(expires_at), "ca": broker.ca.cert_pem()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    identity: Option<String>,
    token_id: Option<String>,
}

async fn revoke(ctx: &Ctx<'_>, body: RevokeBody) -> Result<Response<Body>, ApiError> {
    let broker = ctx.broker;
    let now = unix_secs(SystemTime::now());
    match (body.identity, body.token_id) {
        (Some(identity), None) => {
            Name::parse(&identity).map_err(ApiError::BadRequest)?;
            crate::blocking(|| {
                broker.state.update(|s| {
                    s.revoked_identities.entry(identity.clone()).or_insert(now);
                    Ok::<_, ApiError>(())
                })
            })?;
            broker
                .record_revocation(
                    Record::new("revoke")
                        .allow()
                        .identity(&identity)
                        .request(ctx),
                )
                .await;
            ok(json!({"revoked": {"identity": identity}}))
        }
        (None, Some(token_id)) => {
            let id = TokenId::parse(&token_id).ok_or_else(|| {
                ApiError::BadRequest("token_id must be the hex id returned at mint".into())
            })?;
            let revoked = crate::blocking(|| {
                broker.state.update(|s| {
                    Ok::<_, ApiError>(crate::state::revoke_token_tree(s, id.as_str(), now))
                })
            })?;
            broker
                .record_revocation(
                    Record::new("revoke")
                        .allow()
                        .token(id.as_str())
                        .request(ctx)
                        .detail(
                            "also_revoked",
                            revoked.iter().skip(1).cloned().collect::<Vec<_>>(),
                        ),
                )
                .await;
            ok(json!({"revoked": {"token_id": id.as_str(), "tokens": revoked}}))
        }
        _ => Err(ApiError::BadRequest(
            "give exactly one of {\"identity\": ...} or {\"token_id\": ...}".into(),
        )),
    }
}

async fn bump_epoch(ctx: &Ctx<'_>) -> Result<Response<Body>, ApiError> {
    let broker = ctx.broker;
    let epoch = crate::blocking(|| {
        broker.state.update(|s| {
            s.epoch += 1;
            Ok::<_, ApiError>(s.epoch)
        })
    })?;
    broker
        .record_revocation(
            Record::new("bump_epoch")
                .allow()
                .request(ctx)
                .detail("epoch", epoch),
        )
        .await;
    ok(json!({"epoch": epoch}))
}
