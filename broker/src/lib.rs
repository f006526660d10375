//! lever-broker: the host-side capability broker.
//!
//! It holds the real secrets (the CA key, the Biscuit root key, later the
//! API key), enrols agents into mTLS identities with one-time tickets,
//! mints and checks capability tokens, and records every decision in a
//! hash-chained audit trail. Two listeners: the mTLS jail port and the
//! loopback-only admin port. The request path is in `stack.rs`.
//!
//! What it must never do: hand a secret, a token or a ticket to anyone who
//! did not send it; read a request body before the caller is known; answer
//! a state change before it is durable; start over a damaged state dir.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod body;
pub mod ca;
pub mod client;
pub mod error;
pub mod gateway;
pub mod jail;
pub mod limits;
pub mod llm;
pub mod mcp;
pub mod metrics;
pub mod mock_upstream;
pub mod otel;
pub mod server;
pub mod stack;
pub mod state;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lever_policy::config::Config;
use lever_policy::token::{self, Denial, RootKey, Verified};

use crate::audit::{Audit, Record};
use crate::ca::Ca;
use crate::error::StartError;
use crate::state::State;

/// Most verified tokens kept in the cache (it is cleared when full).
const TOKEN_CACHE_MAX: usize = 4096;

/// Makes room in a token cache holding `max` entries for one more, that
/// `peer` brings: when it is full, `peer`'s own tokens go first, so that
/// an agent filling the cache with its own attenuations empties it only
/// of those; only if that is not enough is it cleared.
fn make_room(m: &mut HashMap<String, Arc<CachedToken>>, peer: &str, max: usize) {
    if m.len() >= max {
        m.retain(|_, c| c.verified.holder != peer);
    }
    if m.len() >= max {
        m.clear();
    }
}

/// A token verified for a request ([`Broker::hold_token`]), held so that
/// the request's later steps authorize from it
/// ([`Broker::authorize_held`]) without looking it up, or verifying it,
/// again.
#[derive(Clone)]
pub struct HeldToken(Arc<CachedToken>);

impl std::fmt::Debug for HeldToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldToken")
            .field("token_id", &self.0.verified.token_id)
            .finish_non_exhaustive()
    }
}

impl HeldToken {
    pub fn verified(&self) -> &Arc<Verified> {
        &self.0.verified
    }
}

/// A running broker's shared state.
pub struct Broker {
    pub config: Arc<Config>,
    pub(crate) state: State,
    pub(crate) ca: Arc<Ca>,
    pub(crate) root: RootKey,
    root_public: token::PublicKey,
    pub audit: Audit,
    pub(crate) upstream: llm::Upstream,
    pub limits: limits::Limits,
    /// The supervised tool backends behind `/mcp`.
    pub tools: mcp::Backends,
    pub(crate) mcp_sessions: mcp::Sessions,
    /// Moves after every revocation and epoch bump: a tool call or an
    /// `/llm` call in flight re-checks its token's standing when it does,
    /// and is cut if the token no longer stands.
    pub(crate) revocations: tokio::sync::watch::Sender<u64>,
    tokens: Mutex<HashMap<String, Arc<CachedToken>>>,
    /// Counters and histograms, served on the admin port's `/metrics`.
    pub stats: Arc<metrics::Metrics>,
    /// A short random tag that prefixes request ids.
    pub(crate) instance_tag: String,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// A verified token and, for tokens the broker minted directly (one block,
/// not delegated), the Datalog decisions already taken for it. Such a
/// token's decision depends only on the request and on holder, epoch and
/// expiry, which are checked in Rust on every call. A token with
/// holder-appended blocks, or a delegated one (which may carry checks
/// inherited from its parent, time checks among them), is judged afresh
/// every time.
struct CachedToken {
    verified: Arc<Verified>,
    /// Keyed by the SHA-256 of the request (tool, op, arguments): a key
    /// costs 32 bytes however long the arguments.
    decisions: Mutex<HashMap<[u8; 32], Result<(), Denial>>>,
}

/// How the broker starts: the state dir opened (or created), the CA and
/// root key loaded, the audit writer running. Listeners are bound by [`run`].
pub fn open(config: Config) -> Result<Arc<Broker>, StartError> {
    let instance = config.name.to_string();
    let loaded = State::open(&config.broker.state_dir, || {
        let (ca_key_pem, ca_cert_pem) = Ca::generate(&instance)?;
        let root_key_pem = RootKey::generate()
            .to_pem()
            .map_err(|e| StartError::State(e.to_string()))?;
        Ok(state::Fresh {
            ca_key_pem,
            ca_cert_pem,
            root_key_pem,
        })
    })?;
    let ca = Arc::new(Ca::load(&loaded.ca_key_pem, &loaded.ca_cert_pem)?);
    let root = RootKey::from_pem(&loaded.root_key_pem)
        .map_err(|e| StartError::State(format!("root.key: {e}")))?;
    let audit_path = config.broker.telemetry.audit_file.clone();
    let (audit, _writer) = Audit::open(&audit_path)?;
    let mut tag = [0u8; 3];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag)
        .map_err(|_| StartError::State("no randomness".into()))?;
    let root_public = root.public();
    let upstream = llm::Upstream::new(&config)?;
    let config_limits = config.broker.rate_limits;
    let tools = mcp::Backends::new(&config.broker.tools, &config.root);
    let broker = Arc::new(Broker {
        config: Arc::new(config),
        state: loaded.state,
        ca,
        root,
        root_public,
        audit,
        upstream,
        limits: limits::Limits::new(&config_limits),
        tools,
        mcp_sessions: mcp::Sessions::default(),
        revocations: tokio::sync::watch::Sender::new(0),
        tokens: Mutex::new(HashMap::new()),
        stats: Arc::default(),
        instance_tag: lever_policy::hex::encode(&tag),
    });
    broker.audit.log_blocking(
        Record::new("broker_start")
            .detail("epoch", broker.state.epoch())
            .detail("state_created", loaded.created),
    );
    Ok(broker)
}

/// Runs the broker until SIGINT/SIGTERM: binds both listeners, prints one
/// `lever broker ready: ...` line on stdout, serves, rotates the server
/// certificate before it expires.
pub async fn run(broker: Arc<Broker>) -> Result<(), StartError> {
    let b = &broker.config.broker;
    let admin_addr = b.admin_addr();
    if !admin_addr.ip().is_loopback() {
        return Err(StartError::Config(format!(
            "the admin listener must bind a loopback address, not {admin_addr}"
        )));
    }
    let jail_addr = b.jail_addr();
    let jail = tokio::net::TcpListener::bind(jail_addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: jail_addr,
            source,
        })?;
    let admin = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: admin_addr,
            source,
        })?;
    start_telemetry(&broker)?;
    let cert = Arc::new(tls::ServerCert::new(broker.ca.clone())?);
    let tls_config = tls::server_config(&broker.ca, cert.clone())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));

    // Tool backends first: they are killed with the broker.
    let (stop_tools, tools_stopped) = tokio::sync::watch::channel(false);
    let supervisors = broker.tools.start(&tools_stopped);
    let workers = Arc::new(
        server::JailWorkers::start(acceptor, broker.clone(), server::JAIL_LIMITS)
            .map_err(StartError::Workers)?,
    );
    let jail_task = tokio::spawn(workers.clone().serve(jail));
    let admin_task = tokio::spawn(server::serve_admin(
        admin,
        broker.clone(),
        server::ADMIN_LIMITS,
    ));
    let rotate = {
        let cert = cert.clone();
        let audit = broker.audit.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(600)).await;
                match cert.rotate_if_due(SystemTime::now()) {
                    Ok(true) => {
                        audit
                            .log(Record::new("server_cert_rotated").detail(
                                "not_after",
                                lever_policy::timefmt::rfc3339(cert.not_after()),
                            ))
                            .await
                    }
                    Ok(false) => {}
                    Err(e) => eprintln!("lever broker: server certificate rotation failed: {e}"),
                }
            }
        })
    };
    println!(
        "lever broker ready: jail https://{jail_addr} (mTLS), admin http://{admin_addr} (loopback), state {}",
        broker.state.dir().display()
    );
    shutdown_signal().await;
    jail_task.abort();
    admin_task.abort();
    // The accept loop gone, end the jail workers and their connections
    // before the last audit records (a dropped stream writes its own).
    let _ = jail_task.await;
    if let Ok(workers) = Arc::try_unwrap(workers) {
        let _ = tokio::task::spawn_blocking(move || workers.shutdown(Duration::from_secs(2))).await;
    }
    rotate.abort();
    stop_tools.send_replace(true);
    for s in supervisors {
        let _ = s.await;
    }
    broker.audit.log_last(Record::new("broker_stop")).await;
    broker.audit.flush().await;
    Ok(())
}

/// Starts OTLP export when an endpoint is configured (`broker.telemetry`,
/// else `OTEL_EXPORTER_OTLP_ENDPOINT`).
fn start_telemetry(broker: &Broker) -> Result<(), StartError> {
    let t = &broker.config.broker.telemetry;
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let grpc = t.otlp_protocol == Some(lever_policy::config::OtlpProtocol::Grpc)
        || (t.otlp_protocol.is_none()
            && env("OTEL_EXPORTER_OTLP_PROTOCOL").is_some_and(|p| p == "grpc"));
    let Some(mut target) = otel::Target::resolve(
        t.otlp_endpoint.as_ref().map(|u| u.to_string()),
        t.service_name.clone(),
        &env,
    ) else {
        return Ok(());
    };
    target.grpc = grpc;
    let o = otel::Otel::start(target, &broker.instance_tag, broker.stats.clone());
    let _ = broker.audit.otel.set(o);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

impl Broker {
    pub fn epoch(&self) -> u64 {
        self.state.epoch()
    }

    /// Verifies a bearer token (signature and facts, cached) and its
    /// standing for `peer` now: revocation (of every block, every ancestor
    /// and the holder), epoch and expiry are checked on every call.
    pub fn verify_token(&self, token: &str, peer: &str) -> Result<Arc<Verified>, Denial> {
        self.standing(token, peer).map(|c| c.verified.clone())
    }

    /// [`Broker::verify_token`], the verified token held for the rest of
    /// the request.
    pub fn hold_token(&self, token: &str, peer: &str) -> Result<HeldToken, Denial> {
        self.standing(token, peer).map(HeldToken)
    }

    fn standing(&self, token: &str, peer: &str) -> Result<Arc<CachedToken>, Denial> {
        let cached = self.tokens.lock().ok().and_then(|m| m.get(token).cloned());
        let entry = match cached {
            Some(v) => {
                self.stats.token_cache_hits.fetch_add(1, Ordering::Relaxed);
                v
            }
            None => {
                self.stats
                    .token_cache_misses
                    .fetch_add(1, Ordering::Relaxed);
                // A token not seen yet: verified only within the agent's
                // allowance of new tokens (`limits::Fresh`).
                if !self.limits.fresh.admit(peer) {
                    return Err(Denial::Throttled);
                }
                let v = Arc::new(CachedToken {
                    verified: Arc::new(token::verify(&self.root_public, token)?),
                    decisions: Mutex::new(HashMap::new()),
                });
                if let Ok(mut m) = self.tokens.lock() {
                    make_room(&mut m, peer, TOKEN_CACHE_MAX);
                    m.insert(token.to_owned(), v.clone());
                }
                v
            }
        };
        self.still_stands(&entry.verified, peer)?;
        Ok(entry)
    }

    /// Whether a verified token stands for `peer` now: its holder and any
    /// delegator not revoked, no block or ancestor revoked, its epoch
    /// current, not expired.
    pub(crate) fn still_stands(&self, verified: &Verified, peer: &str) -> Result<(), Denial> {
        if self.state.is_identity_revoked(&verified.holder)
            || verified
                .delegated_by
                .as_deref()
                .is_some_and(|d| self.state.is_identity_revoked(d))
        {
            return Err(Denial::Revoked);
        }
        verified.check_standing(peer, SystemTime::now(), self.epoch(), |id| {
            self.state.is_token_revoked(id)
        })
    }

    /// If a revocation or an epoch bump landed since `seen` last looked:
    /// whether the token still stands (one atomic read when none did).
    pub(crate) fn recheck(
        &self,
        seen: &mut tokio::sync::watch::Receiver<u64>,
        verified: &Verified,
        peer: &str,
    ) -> Option<Denial> {
        if !seen.has_changed().unwrap_or(false) {
            return None;
        }
        seen.borrow_and_update();
        self.still_stands(verified, peer).err()
    }

    /// Resolves once a revocation or an epoch bump leaves the token no
    /// longer standing (counting any that landed since `seen` was made):
    /// what a call in flight waits on beside its work.
    pub(crate) async fn revoked(
        &self,
        seen: &mut tokio::sync::watch::Receiver<u64>,
        verified: &Verified,
        peer: &str,
    ) -> Denial {
        if let Some(d) = self.recheck(seen, verified, peer) {
            return d;
        }
        loop {
            if seen.changed().await.is_err() {
                // The broker is going away: nothing more to watch.
                return std::future::pending().await;
            }
            // `changed` marked the change seen: judged here.
            if let Err(d) = self.still_stands(verified, peer) {
                return d;
            }
        }
    }

    /// Records a revocation or an epoch bump that is in the state, then
    /// tells the calls in flight (so the records of the calls it cuts
    /// follow its own in the trail), then waits for the record to be on
    /// disk (answered only once it is).
    pub(crate) async fn record_revocation(&self, rec: Record) {
        self.audit.log(rec).await;
        self.revocations.send_modify(|n| *n = n.wrapping_add(1));
        self.audit.flush().await;
    }

    /// Verifies `token` for `peer` and authorizes `(tool, op, args)`:
    /// standing on every call, the Datalog decision cached where sound.
    pub fn authorize_token(
        &self,
        token: &str,
        peer: &str,
        tool: &str,
        op: &str,
        args: &std::collections::BTreeMap<String, String>,
    ) -> Result<Arc<Verified>, Denial> {
        let entry = self.standing(token, peer)?;
        self.decide(&entry, peer, tool, op, args)
    }

    /// [`Broker::authorize_token`] for a token the request holds: its
    /// standing is judged again now (a revocation may have landed since it
    /// was verified), its decision taken from the same entry.
    pub fn authorize_held(
        &self,
        held: &HeldToken,
        peer: &str,
        tool: &str,
        op: &str,
        args: &std::collections::BTreeMap<String, String>,
    ) -> Result<Arc<Verified>, Denial> {
        self.still_stands(&held.0.verified, peer)?;
        self.decide(&held.0, peer, tool, op, args)
    }

    /// The decision on `(tool, op, args)` for a token whose standing was
    /// just judged, cached where sound.
    fn decide(
        &self,
        entry: &CachedToken,
        peer: &str,
        tool: &str,
        op: &str,
        args: &std::collections::BTreeMap<String, String>,
    ) -> Result<Arc<Verified>, Denial> {
        // Facts only: the decision depends on the request alone (expiry,
        // the one thing that changes with time, is standing, checked above).
        let cacheable = !entry.verified.carries_checks;
        // The digest of a structured encoding (JSON of tool, op and the
        // sorted arguments): distinct requests never share one.
        let key = cacheable
            .then(|| serde_json::to_vec(&(tool, op, args)).ok())
            .flatten()
            .map(|json| {
                let mut k = [0u8; 32];
                k.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &json).as_ref());
                k
            });
        if let Some(k) = &key
            && let Some(d) = entry.decisions.lock().ok().and_then(|m| m.get(k).cloned())
        {
            return d.map(|()| entry.verified.clone());
        }
        let decision = entry.verified.authorize(&token::Request {
            peer,
            now: SystemTime::now(),
            epoch: self.epoch(),
            tool,
            op,
            args,
        });
        // Refusals for size are decided before any Datalog: not kept.
        if let (Some(k), Ok(mut m)) = (key, entry.decisions.lock())
            && m.len() < 256
            && decision != Err(Denial::RequestTooLarge)
        {
            m.insert(k, decision.clone());
        }
        decision.map(|()| entry.verified.clone())
    }

    /// A new one-time enrolment ticket for `identity`, stored hashed.
    /// Blocking (fsync).
    pub(crate) fn issue_ticket(
        &self,
        identity: &str,
    ) -> Result<(String, SystemTime), error::ApiError> {
        if self.state.is_identity_revoked(identity) {
            return Err(error::ApiError::IdentityRevoked(identity.to_owned()));
        }
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| error::ApiError::Internal("no randomness".into()))?;
        let ticket = format!("{TICKET_PREFIX}{}", lever_policy::hex::encode(&raw));
        let expires_at = SystemTime::now() + self.config.broker.ticket_ttl;
        let hash = ticket_hash(&ticket);
        self.state.update(|s| {
            s.tickets.insert(
                hash,
                state::Ticket {
                    identity: identity.to_owned(),
                    expires_at: token::unix_secs(expires_at),
                    consumed_at: None,
                },
            );
            Ok::<_, error::ApiError>(())
        })?;
        Ok((ticket, expires_at))
    }
}

/// Enrolment tickets look nothing like tokens: `lvtk_` and 64 hex digits.
pub const TICKET_PREFIX: &str = "lvtk_";

pub(crate) fn ticket_hash(ticket: &str) -> String {
    lever_policy::hex::encode(
        ring::digest::digest(&ring::digest::SHA256, ticket.as_bytes()).as_ref(),
    )
}

pub(crate) fn is_ticket_shaped(s: &str) -> bool {
    s.strip_prefix(TICKET_PREFIX).is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

/// Runs blocking work (a state file update and its fsync) from a request
/// handler: through `block_in_place` on a multi-threaded runtime, so the
/// worker's other tasks move elsewhere meanwhile; inline on a
/// current-thread runtime, where there is nowhere else to move them.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
            // This thread may not be a worker again: what it holds of
            // ended calls is finished now, and its next ones in place.
            llm::finish_ended_and_stop();
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lever_policy::token::{Grant, Mint};

    fn cached(root: &RootKey, holder: &str) -> (String, Arc<CachedToken>) {
        let grants = [Grant {
            tool: "db".into(),
            op: "read".into(),
            constraints: Default::default(),
        }];
        let t = token::mint(
            root,
            &Mint {
                holder,
                grants: &grants,
                epoch: 1,
                expires_at: SystemTime::now() + Duration::from_secs(60),
                delegation: None,
                inherit_checks: &[],
            },
        )
        .unwrap()
        .token;
        let verified = Arc::new(token::verify(&root.public(), &t).unwrap());
        let entry = Arc::new(CachedToken {
            verified,
            decisions: Mutex::new(HashMap::new()),
        });
        (t, entry)
    }

    #[test]
    fn a_full_token_cache_gives_up_the_incoming_agents_own_tokens_first() {
        let root = RootKey::generate();
        let mut m = HashMap::new();
        for holder in ["a", "a", "b", "b"] {
            let (t, e) = cached(&root, holder);
            m.insert(t, e);
        }
        let b_tokens: Vec<String> = m
            .iter()
            .filter(|(_, c)| c.verified.holder == "b")
            .map(|(t, _)| t.clone())
            .collect();
        // Not full: nothing goes.
        make_room(&mut m, "a", 5);
        assert_eq!(m.len(), 4);
        // Full: a's go, b's stay.
        make_room(&mut m, "a", 4);
        assert_eq!(m.len(), 2);
        assert!(b_tokens.iter().all(|t| m.contains_key(t)));
        // Full of others' tokens only: cleared.
        make_room(&mut m, "c", 2);
        assert!(m.is_empty());
    }
}
