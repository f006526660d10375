//! The jail listener's routes (DESIGN.md §5). The peer is already
//! authenticated (see `stack.rs`) for every route but `/v1/enrol` and
//! `/healthz`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use http::{Method, Request, Response};
use hyper::body::Incoming;
use lever_policy::config::{Agent, Config, LLM_OP, LLM_TOOL};
use lever_policy::timefmt::rfc3339;
use lever_policy::token::{self, Denial, Grant, MAX_GRANTS, Mint, TokenId};
use serde::Deserialize;
use serde_json::json;

use crate::audit::Record;
use crate::error::ApiError;
use crate::server::Body;
use crate::stack::{Ctx, expect_method, ok, read_json};
use crate::state::TicketRefusal;

/// Body caps per route.
const SMALL_BODY: usize = 16 * 1024;
/// Longest pinned value accepted in a grant.
const MAX_VALUE: usize = 256;

pub async fn route(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    // Each handler's future is boxed: the connection's task then holds a
    // small future, and a long-lived response stream (an LLM call) keeps
    // no room for a handler that has finished (4 KiB per connection
    // unboxed).
    let path = req.uri().path();
    if path.starts_with("/llm/") {
        return Box::pin(crate::llm::proxy(ctx, req)).await;
    }
    // The requests that sign something or write the state file take the
    // caller's place in the control lane first, whatever follows.
    let _slot = is_control(path).then(|| control(ctx)).transpose()?;
    match path {
        "/healthz" => {
            expect_method(&req, Method::GET)?;
            ok(json!({"status": "ok"}))
        }
        "/v1/enrol" => {
            expect_method(&req, Method::POST)?;
            Box::pin(enrol(ctx, req)).await
        }
        "/v1/renew" => {
            expect_method(&req, Method::POST)?;
            Box::pin(renew(ctx, req)).await
        }
        "/v1/capabilities" => {
            expect_method(&req, Method::POST)?;
            Box::pin(capabilities(ctx, req)).await
        }
        "/v1/capabilities/delegate" => {
            expect_method(&req, Method::POST)?;
            Box::pin(delegate(ctx, req)).await
        }
        "/v1/tools" => {
            expect_method(&req, Method::GET)?;
            tools(ctx)
        }
        "/v1/provision" => {
            expect_method(&req, Method::POST)?;
            Box::pin(provision(ctx, req)).await
        }
        "/mcp" => Box::pin(crate::mcp::handle(ctx, req)).await,
        "/v1/agents" => {
            expect_method(&req, Method::GET)?;
            agents(ctx)
        }
        other if other.starts_with("/v1/agents/") => {
            expect_method(&req, Method::POST)?;
            Box::pin(dispatch(ctx, other)).await
        }
        other => Err(ApiError::NotFound(other.to_owned())),
    }
}

/// Minting, delegation, renewal, provisioning and dispatch.
fn is_control(path: &str) -> bool {
    matches!(
        path,
        "/v1/capabilities" | "/v1/capabilities/delegate" | "/v1/renew" | "/v1/provision"
    ) || path.starts_with("/v1/agents/")
}

/// The caller's place in the control lane (`broker.rate_limits.control`),
/// held until its request is answered: taken before the body is read, so
/// an agent past its rate or with too many such requests in flight costs
/// the broker no signature and no state write.
fn control(ctx: &Ctx<'_>) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    ctx.broker.limits.control.admit(peer(ctx)?)
}

fn peer<'a>(ctx: &'a Ctx<'_>) -> Result<&'a str, ApiError> {
    ctx.peer.as_deref().ok_or(ApiError::NoClientCert)
}

fn agent<'a>(ctx: &'a Ctx<'_>) -> Result<&'a Agent, ApiError> {
    let p = peer(ctx)?;
    ctx.broker
        .config
        .agent(p)
        .ok_or_else(|| ApiError::UnknownAgent(p.to_owned()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolBody {
    ticket: String,
    csr: String,
}

async fn enrol(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body: EnrolBody = read_json(ctx, req, SMALL_BODY).await?;
    if !crate::is_ticket_shaped(&body.ticket) {
        return Err(ApiError::Ticket("not an enrolment ticket"));
    }
    let broker = ctx.broker;
    let hash = crate::ticket_hash(&body.ticket);
    let now = token::unix_secs(SystemTime::now());
    let state = &broker.state;
    // Anyone in the jail can call this route without a certificate. A
    // ticket that cannot be redeemed is refused from the in-memory state:
    // no CSR is parsed or verified for it and the writer lock is not
    // taken, so a guess costs a lookup (besides its body and its audit
    // record) and never waits for, or holds up, a state change.
    let judged = state.read(|s| redeemable(broker, s, &hash, now));
    if let Err(refused) = judged {
        return refuse_ticket(ctx, refused).await;
    }
    // Check the CSR before spending the ticket on it.
    crate::ca::check_csr(&body.csr)?;
    // Redeem: check again and consume under the state's writer lock,
    // durably. Of two concurrent redeems of one ticket, exactly one sees it
    // unconsumed.
    let outcome = crate::blocking(|| {
        state.update(|s| {
            // The clock read again: the CSR check and the wait for the
            // lock took time, and the ticket may have expired meanwhile.
            let now = token::unix_secs(SystemTime::now());
            let identity = match redeemable(broker, s, &hash, now) {
                Ok(identity) => identity,
                Err(refused) => return Ok::<_, ApiError>(Err(refused)),
            };
            let Some(t) = s.tickets.get_mut(&hash) else {
                return Ok(Err((TicketRefusal::Unknown, None)));
            };
            t.consumed_at = Some(now);
            s.serial += 1;
            Ok(Ok((identity, s.serial)))
        })
    })?;
    let (identity, serial) = match outcome {
        Ok(v) => v,
        Err(refused) => return refuse_ticket(ctx, refused).await,
    };
    issue_certificate(ctx, "enrol", &identity, &body.csr, serial).await
}

/// The identity a ticket (by hash) would enrol now, or why it cannot.
fn redeemable(
    broker: &crate::Broker,
    s: &crate::state::Persisted,
    hash: &str,
    now: u64,
) -> Result<String, (TicketRefusal, Option<String>)> {
    let Some(t) = s.tickets.get(hash) else {
        return Err((TicketRefusal::Unknown, None));
    };
    let identity = t.identity.clone();
    let why = if t.consumed_at.is_some() {
        TicketRefusal::Used
    } else if t.expires_at <= now {
        TicketRefusal::Expired
    } else if s.revoked_identities.contains_key(&identity) {
        TicketRefusal::IdentityRevoked
    } else if broker.config.agent(&identity).is_none() {
        // Tickets outlive restarts; the config may have changed since.
        // Left unspent: the name may come back.
        TicketRefusal::UnknownAgent
    } else {
        return Ok(identity);
    };
    Err((why, Some(identity)))
}

/// Audits and answers a ticket that was not redeemed.
async fn refuse_ticket(
    ctx: &Ctx<'_>,
    (why, identity): (TicketRefusal, Option<String>),
) -> Result<Response<Body>, ApiError> {
    let (code, msg) = match why {
        TicketRefusal::Unknown => ("ticket_unknown", "unknown ticket"),
        TicketRefusal::Used => ("ticket_used", "the ticket was already used"),
        TicketRefusal::Expired => ("ticket_expired", "the ticket has expired"),
        TicketRefusal::IdentityRevoked => ("identity_revoked", "the ticket's identity is revoked"),
        TicketRefusal::UnknownAgent => (
            "unknown_agent",
            "the ticket's identity is no longer an agent of the config",
        ),
    };
    let mut rec = Record::new("enrol").deny(code).request(ctx);
    if let Some(i) = identity {
        rec = rec.identity(i);
    }
    ctx.audit_deny(rec).await;
    Err(ApiError::Ticket(msg))
}

/// Signs a client certificate for `identity` from `csr`, records it, and
/// answers with the certificate and the CA to pin. An enrolment's record
/// is durable before the answer (the ticket is spent); a renewal's is not.
async fn issue_certificate(
    ctx: &Ctx<'_>,
    event: &'static str,
    identity: &str,
    csr: &str,
    serial: u64,
) -> Result<Response<Body>, ApiError> {
    let broker = ctx.broker;
    let (cert, not_after) = broker.ca.issue_client(identity, csr, serial)?;
    let rec = Record::new(event)
        .allow()
        .identity(identity)
        .request(ctx)
        .detail("serial", serial)
        .detail("not_after", rfc3339(not_after));
    if event == "enrol" {
        broker.audit.log_durable(rec).await;
    } else {
        broker.audit.log(rec).await;
    }
    ok(json!({
        "identity": identity,
        "certificate": cert,
        "ca": broker.ca.cert_pem(),
        "expires_at": rfc3339(not_after),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewBody {
    csr: String,
}

async fn renew(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let identity = peer(ctx)?.to_owned();
    let body: RenewBody = read_json(ctx, req, SMALL_BODY).await?;
    crate::ca::check_csr(&body.csr)?;
    let state = &ctx.broker.state;
    let serial = crate::blocking(|| {
        state.update(|s| {
            if s.revoked_identities.contains_key(&identity) {
                return Err(ApiError::IdentityRevoked(identity.clone()));
            }
            s.serial += 1;
            Ok(s.serial)
        })
    })?;
    // The CSR's own CN is ignored: the certificate is for the peer.
    issue_certificate(ctx, "renew", &identity, &body.csr, serial).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantsBody {
    grants: Vec<Grant>,
}

/// Checks requested grants against the config: each `(tool, op)` must be
/// allowed by `allowed(tool, op)`, every `allowed_values` key of the tool
/// pinned to one of its values (a constrained tool never yields an
/// unconstrained token), other pins well-formed.
fn check_grants(
    config: &Config,
    grants: &[Grant],
    allowed: impl Fn(&str, &str) -> bool,
    what: &str,
) -> Result<(), ApiError> {
    if grants.is_empty() {
        return Err(ApiError::BadRequest("no grants requested".into()));
    }
    if grants.len() > MAX_GRANTS {
        return Err(ApiError::BadRequest(format!("at most {MAX_GRANTS} grants")));
    }
    for (i, g) in grants.iter().enumerate() {
        if grants[..i].iter().any(|o| o.tool == g.tool && o.op == g.op) {
            return Err(ApiError::BadRequest(format!(
                "{}/{} is requested twice",
                g.tool, g.op
            )));
        }
        if !allowed(&g.tool, &g.op) {
            return Err(ApiError::Forbidden(format!(
                "{}/{} is not in your {what}",
                g.tool, g.op
            )));
        }
        for (k, v) in &g.constraints {
            let key_ok = !k.is_empty() && k.len() <= 64 && !k.chars().any(char::is_control);
            let value_ok =
                !v.is_empty() && v.len() <= MAX_VALUE && !v.chars().any(char::is_control);
            if !key_ok || !value_ok {
                return Err(ApiError::BadRequest(format!(
                    "constraint {k:?} must be a key of at most 64 and a value of 1 to {MAX_VALUE} characters, without control characters"
                )));
            }
        }
        if g.tool == LLM_TOOL {
            // `/llm` judges no arguments: a pin there could never be met,
            // and a token that can never be used is a mistake to report.
            if !g.constraints.is_empty() {
                return Err(ApiError::BadRequest(format!(
                    "{LLM_TOOL}/{} takes no constraints (the /llm proxy judges no arguments)",
                    g.op
                )));
            }
            continue;
        }
        let Some(tool) = config.broker.tool(&g.tool) else {
            return Err(ApiError::Forbidden(format!("unknown tool `{}`", g.tool)));
        };
        for (key, values) in &tool.allowed_values {
            match g.constraints.get(key) {
                None => {
                    return Err(ApiError::Forbidden(format!(
                        "tool `{}` requires `{key}` to be pinned (one of: {})",
                        g.tool,
                        values.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                Some(v) if !values.contains(v) => {
                    return Err(ApiError::Forbidden(format!(
                        "`{key}` = {v:?} is not allowed for tool `{}` (allowed: {})",
                        g.tool,
                        values.iter().cloned().collect::<Vec<_>>().join(", ")
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

fn grants_detail(grants: &[Grant]) -> serde_json::Value {
    serde_json::to_value(grants).unwrap_or(serde_json::Value::Null)
}

fn with_right(rec: Record, grants: &[Grant]) -> Record {
    match grants {
        [g] => rec
            .right(g.tool.clone(), g.op.clone())
            .constraints(&g.constraints),
        _ => rec,
    }
}

async fn capabilities(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let me = agent(ctx)?;
    let body: GrantsBody = read_json(ctx, req, SMALL_BODY).await?;
    let config = &ctx.broker.config;
    let checked = check_grants(config, &body.grants, |t, o| me.may_obtain(t, o), "obtain");
    if let Err(e) = checked {
        let rec = Record::new("mint")
            .deny(e.code())
            .identity(me.identity.as_str())
            .request(ctx)
            .detail("grants", grants_detail(&body.grants));
        ctx.audit_deny(with_right(rec, &body.grants)).await;
        return Err(e);
    }
    let epoch = ctx.broker.epoch();
    let minted = token::mint(
        &ctx.broker.root,
        &Mint {
            holder: me.identity.as_str(),
            grants: &body.grants,
            epoch,
            expires_at: SystemTime::now() + config.broker.grant_ttl,
            delegation: None,
            inherit_checks: &[],
        },
    )
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let rec = Record::new("mint")
        .allow()
        .identity(me.identity.as_str())
        .request(ctx)
        .token(minted.token_id.as_str())
        .detail("grants", grants_detail(&body.grants))
        .detail("epoch", epoch)
        .detail("expires_at", rfc3339(minted.expires_at));
    ctx.broker.audit.log(with_right(rec, &body.grants)).await;
    ok(json!({
        "token": minted.token,
        "token_id": minted.token_id.as_str(),
        "epoch": epoch,
        "expires_at": rfc3339(minted.expires_at),
    }))
}

/// The bearer token of a request, from `Authorization: Bearer`.
pub fn bearer<B>(req: &Request<B>) -> Result<String, ApiError> {
    bearer_of(req.headers())?
        .map(str::to_owned)
        .ok_or(ApiError::NoToken)
}

/// The `Authorization: Bearer` token of a request, if it sends one: the
/// one parser of that header. Two headers, or another scheme, are refused.
pub fn bearer_of(headers: &http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest(
            "more than one Authorization header".into(),
        ));
    }
    let v = v.to_str().map_err(|_| ApiError::Token(Denial::Malformed))?;
    let (scheme, token) = v.split_once(' ').ok_or(ApiError::NoToken)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::NoToken);
    }
    Ok(Some(token.trim()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelegateBody {
    to: String,
    grants: Vec<Grant>,
}

async fn delegate(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let me = agent(ctx)?;
    let broker = ctx.broker;
    // Verify the held token before reading the body.
    let token = bearer(&req)?;
    let parent = match broker.verify_token(&token, me.identity.as_str()) {
        Ok(v) => v,
        Err(d) => {
            let e = ApiError::from(d);
            ctx.audit_deny(
                Record::new("delegate")
                    .deny(e.code())
                    .identity(me.identity.as_str())
                    .request(ctx)
                    .lane_of(&e),
            )
            .await;
            return Err(e);
        }
    };
    let body: DelegateBody = read_json(ctx, req, SMALL_BODY).await?;
    let deny = |e: ApiError, grants: &[Grant], to: &str| {
        let rec = Record::new("delegate")
            .deny(e.code())
            .identity(me.identity.as_str())
            .request(ctx)
            .token(parent.token_id.as_str())
            .detail("to", to.to_owned())
            .detail("grants", grants_detail(grants));
        (with_right(rec, grants), e)
    };
    let result = (|| {
        let to = broker
            .config
            .agent(&body.to)
            .ok_or_else(|| ApiError::UnknownAgent(body.to.clone()))?;
        if to.identity == me.identity {
            return Err(ApiError::Forbidden(
                "an agent cannot delegate to itself".into(),
            ));
        }
        if broker.state.is_identity_revoked(to.identity.as_str()) {
            return Err(ApiError::IdentityRevoked(to.identity.to_string()));
        }
        check_grants(
            &broker.config,
            &body.grants,
            |t, o| me.may_delegate(t, o, to.identity.as_str()),
            &format!("delegate entries to `{}`", to.identity),
        )?;
        let now = SystemTime::now();
        let epoch = broker.epoch();
        let expires = parent
            .prove_covers(
                me.identity.as_str(),
                &body.grants,
                now,
                epoch,
                now + broker.config.broker.grant_ttl,
            )
            .map_err(|d| match d {
                Denial::NotGranted | Denial::ConstraintMismatch | Denial::AttenuationCheck => {
                    ApiError::Forbidden(format!(
                        "the grants are wider than the token you hold: {d}"
                    ))
                }
                other => ApiError::Token(other),
            })?;
        // The parent's own (holder-appended) checks travel with the child:
        // a restriction the replay could not see (a `reject if` on an
        // argument the grants do not pin) still binds the delegate.
        let holder_checks = parent.holder_checks().map_err(ApiError::Token)?;
        // Every block of the parent as held (so revoking any of them, or
        // the parent's own ancestors, kills the child).
        let mut chain: Vec<TokenId> = parent.block_ids.clone();
        chain.extend(parent.ancestors.iter().cloned());
        let minted = token::mint(
            &broker.root,
            &Mint {
                holder: to.identity.as_str(),
                grants: &body.grants,
                epoch,
                expires_at: expires,
                delegation: Some((me.identity.as_str(), &chain)),
                inherit_checks: &holder_checks,
            },
        )
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((to.identity.to_string(), minted, epoch))
    })();
    let (to, minted, epoch) = match result {
        Ok(v) => v,
        Err(e) => {
            let (rec, e) = deny(e, &body.grants, &body.to);
            ctx.audit_deny(rec).await;
            return Err(e);
        }
    };
    // Record the link before answering: revoking the parent must revoke
    // the child even if the child's own facts were ever not consulted. Each
    // block of the parent as held is linked, so revoking any of them
    // (an attenuated copy's own block, say) lists the child as revoked too.
    let (parent_id, child_id) = (parent.token_id.to_string(), minted.token_id.to_string());
    crate::blocking(|| {
        broker.state.update(|s| {
            for id in &parent.block_ids {
                s.children
                    .entry(id.to_string())
                    .or_default()
                    .insert(child_id.clone());
            }
            Ok::<_, ApiError>(())
        })
    })?;
    let rec = Record::new("delegate")
        .allow()
        .identity(me.identity.as_str())
        .request(ctx)
        .token(minted.token_id.as_str())
        .detail("to", to.clone())
        .detail("parent", parent_id)
        .detail("grants", grants_detail(&body.grants))
        .detail("expires_at", rfc3339(minted.expires_at));
    broker.audit.log(with_right(rec, &body.grants)).await;
    ok(json!({
        "token": minted.token,
        "token_id": minted.token_id.as_str(),
        "to": to,
        "epoch": epoch,
        "expires_at": rfc3339(minted.expires_at),
    }))
}

fn tools(ctx: &Ctx<'_>) -> Result<Response<Body>, ApiError> {
    let me = agent(ctx)?;
    let config = &ctx.broker.config;
    let describe = |tool: &str, op: &str| {
        let pins: BTreeMap<String, Vec<String>> = config
            .broker
            .tool(tool)
            .map(|t| {
                t.allowed_values
                    .iter()
                    .map(|(k, v)| (k.clone(), v.iter().cloned().collect()))
                    .collect()
            })
            .unwrap_or_default();
        json!({"tool": tool, "op": op, "name": format!("{tool}_{op}"), "pinned": pins})
    };
    let obtain: Vec<_> = me.obtain.iter().map(|r| describe(&r.tool, &r.op)).collect();
    let delegate: Vec<_> = me
        .delegate
        .iter()
        .map(|d| {
            let mut v = describe(&d.right.tool, &d.right.op);
            v["to"] = json!(d.to.iter().map(|n| n.as_str()).collect::<Vec<_>>());
            v
        })
        .collect();
    ok(json!({
        "identity": me.identity.as_str(),
        "llm": me.may_obtain(LLM_TOOL, LLM_OP),
        "obtain": obtain,
        "delegate": delegate,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionBody {
    agent: String,
}

async fn provision(ctx: &Ctx<'_>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let me = manager_only(ctx, "provision agents")?;
    let config = &ctx.broker.config;
    let body: ProvisionBody = read_json(ctx, req, SMALL_BODY).await?;
    if config.grove(&body.agent).is_none() {
        return Err(ApiError::UnknownAgent(body.agent));
    }
    let broker = ctx.broker;
    let (ticket, expires_at) = crate::blocking(|| broker.issue_ticket(&body.agent))?;
    broker
        .audit
        .log(
            Record::new("ticket_issue")
                .allow()
                .identity(&body.agent)
                .request(ctx)
                .detail("by", me)
                .detail("expires_at", rfc3339(expires_at)),
        )
        .await;
    ok(json!({"ticket": ticket, "expires_at": rfc3339(expires_at), "ca": broker.ca.cert_pem()}))
}

/// Refuses anyone but the manager.
fn manager_only(ctx: &Ctx<'_>, what: &str) -> Result<String, ApiError> {
    let me = peer(ctx)?;
    if me != ctx.broker.config.broker.manager_identity.as_str() {
        return Err(ApiError::Forbidden(format!("only the manager may {what}")));
    }
    Ok(me.to_owned())
}

/// `GET /v1/agents`: the groves the manager may dispatch, as the broker
/// knows them (never a host path).
fn agents(ctx: &Ctx<'_>) -> Result<Response<Body>, ApiError> {
    manager_only(ctx, "list agents")?;
    let broker = ctx.broker;
    let list: Vec<serde_json::Value> = broker
        .config
        .groves
        .iter()
        .map(|g| {
            let name = g.agent.identity.as_str();
            json!({
                "name": name,
                "image": g.agent.image.as_ref().map(|i| i.reference.as_str()),
                "revoked": broker.state.is_identity_revoked(name),
            })
        })
        .collect();
    ok(json!({ "agents": list }))
}

/// `POST /v1/agents/{name}/start|stop`: the caller is the manager and the
/// grove is configured and not revoked; then the jail would be driven.
/// That last step is not in this build: the answer says so (501) and the
/// attempt is audited.
async fn dispatch(ctx: &Ctx<'_>, path: &str) -> Result<Response<Body>, ApiError> {
    let me = manager_only(ctx, "start or stop agents")?;
    let rest = path.strip_prefix("/v1/agents/").unwrap_or("");
    let Some((name, action)) = rest.split_once('/') else {
        return Err(ApiError::NotFound(path.to_owned()));
    };
    if !matches!(action, "start" | "stop") {
        return Err(ApiError::NotFound(path.to_owned()));
    }
    let broker = ctx.broker;
    if broker.config.grove(name).is_none() {
        return Err(ApiError::UnknownAgent(name.to_owned()));
    }
    if broker.state.is_identity_revoked(name) {
        return Err(ApiError::IdentityRevoked(name.to_owned()));
    }
    ctx.audit_deny(
        Record::new("dispatch")
            .deny("not_implemented")
            .identity(name)
            .request(ctx)
            .detail("by", me)
            .detail("action", action),
    )
    .await;
    Err(ApiError::NotImplemented(format!(
        "dispatch ({action} `{name}`) is not in this build: the broker cannot drive Scion in the jail yet"
    )))
}
