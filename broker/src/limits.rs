//! Per-agent rate limits: a request rate with a burst (governor's GCRA),
//! a cap on requests in flight, and an optional LLM token budget per
//! window. Refusals become `429` with `retry-after`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use lever_policy::config::{Limit, RateLimits, TokenBudget};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;

type Keyed =
    RateLimiter<String, governor::state::keyed::DefaultKeyedStateStore<String>, DefaultClock>;

/// One kind of traffic (`llm` or `tools`).
pub struct Lane {
    what: &'static str,
    rate: Keyed,
    max_concurrent: u32,
    in_flight: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Lane {
    fn new(what: &'static str, l: Limit) -> Lane {
        let quota = Quota::per_minute(nz(l.per_minute)).allow_burst(nz(l.burst));
        Lane {
            what,
            rate: RateLimiter::keyed(quota),
            max_concurrent: l.max_concurrent,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one request of `agent`, or says how long to wait. The permit
    /// must be held until the response is finished.
    pub fn admit(&self, agent: &str) -> Result<OwnedSemaphorePermit, ApiError> {
        if let Err(not_until) = self.rate.check_key(&agent.to_owned()) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(ApiError::RateLimited(
                self.what,
                format!("{} request rate exceeded for `{agent}`", self.what),
                wait.max(Duration::from_secs(1)),
            ));
        }
        let sem = {
            let mut m = self
                .in_flight
                .lock()
                .map_err(|_| ApiError::Internal("limits poisoned".into()))?;
            match m.get(agent) {
                Some(s) => s.clone(),
                None => m
                    .entry(agent.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(self.max_concurrent as usize)))
                    .clone(),
            }
        };
        sem.try_acquire_owned().map_err(|_| {
            ApiError::RateLimited(
                self.what,
                format!(
                    "more than {} {} requests in flight for `{agent}`",
                    self.max_concurrent, self.what
                ),
                Duration::from_secs(1),
            )
        })
    }
}

/// New tokens verified per agent: a token the broker has not verified
/// yet costs a signature check and a Datalog run (100-150 µs of CPU),
/// where a cached one costs well under a microsecond. The tokens the
/// broker mints or delegates are bounded by the control lane; this bounds
/// the rest (tokens attenuated offline, forged ones), so that no agent can
/// spend the broker's CPU, shared with every other agent, on
/// verifications.
pub struct Fresh {
    rate: Keyed,
}

impl std::fmt::Debug for Fresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fresh").finish_non_exhaustive()
    }
}

/// New tokens verified per agent per second, past [`FRESH_BURST`].
pub const FRESH_PER_SECOND: u32 = 16;
/// New tokens an agent may have verified at once.
pub const FRESH_BURST: u32 = 256;

impl Fresh {
    fn new() -> Fresh {
        let quota = Quota::per_second(nz(FRESH_PER_SECOND)).allow_burst(nz(FRESH_BURST));
        Fresh {
            rate: RateLimiter::keyed(quota),
        }
    }

    /// Whether `agent` may have one more new token verified now.
    pub fn admit(&self, agent: &str) -> bool {
        self.rate.check_key(&agent.to_owned()).is_ok()
    }
}

/// Tokens used per agent in the current window.
#[derive(Debug)]
pub struct Budget {
    budget: TokenBudget,
    used: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Budget {
    /// Refuses when the agent's window is spent.
    pub fn check(&self, agent: &str) -> Result<(), ApiError> {
        let mut m = self
            .used
            .lock()
            .map_err(|_| ApiError::Internal("budget poisoned".into()))?;
        let now = Instant::now();
        let entry = m.entry(agent.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.budget.window {
            *entry = (now, 0);
        }
        if entry.1 >= self.budget.tokens {
            let left = self
                .budget
                .window
                .saturating_sub(now.duration_since(entry.0));
            return Err(ApiError::RateLimited(
                "llm",
                format!(
                    "LLM token budget of {} per window spent for `{agent}`",
                    self.budget.tokens
                ),
                left.max(Duration::from_secs(1)),
            ));
        }
        Ok(())
    }

    /// Counts tokens a finished call used.
    pub fn spend(&self, agent: &str, tokens: u64) {
        if let Ok(mut m) = self.used.lock() {
            let now = Instant::now();
            let entry = m.entry(agent.to_owned()).or_insert((now, 0));
            if now.duration_since(entry.0) >= self.budget.window {
                *entry = (now, 0);
            }
            entry.1 = entry.1.saturating_add(tokens);
        }
    }
}

/// All of an instance's limits.
#[derive(Debug)]
pub struct Limits {
    pub llm: Lane,
    pub tools: Lane,
    /// Minting, delegation, renewal, provisioning, dispatch: each signs
    /// something or writes the state file (whose writes queue behind one
    /// lock, an operator's revocation among them).
    pub control: Lane,
    pub llm_tokens: Option<Arc<Budget>>,
    /// New tokens verified, per agent (not configurable).
    pub fresh: Fresh,
}

impl Limits {
    pub fn new(r: &RateLimits) -> Limits {
        Limits {
            llm: Lane::new("llm", r.llm),
            tools: Lane::new("tool", r.tools),
            control: Lane::new("control", r.control),
            fresh: Fresh::new(),
            llm_tokens: r.llm_tokens.map(|budget| {
                Arc::new(Budget {
                    budget,
                    used: Mutex::new(HashMap::new()),
                })
            }),
        }
    }
}
