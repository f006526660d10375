//! Repeated refusals, counted instead of written one by one.
//!
//! Every refusal is an audit record, and the trail lives on the host's
//! disk. An agent that keeps sending requests it knows will be refused
//! (past its rate limit, with a forged or revoked token, with a spent
//! ticket) would otherwise grow `audit.jsonl` as fast as the broker can
//! answer: tens of thousands of lines a second. So the writer passes each
//! kind of refusal, the event, identity and reason it carries, through a
//! token bucket: [`BURST`] records at once, then one a second. The
//! refusals held back are not lost: the writer counts them and writes a
//! `suppressed` record with the count and the times of the first and last
//! one held, [`SUMMARY_EVERY`] after the first, and for every kind still
//! counting when it stops. Allowed requests are never held back.
//!
//! A sustained flood of one kind thus costs the trail about one refusal
//! and half a summary a second. The number of kinds is bounded by the
//! configured identities (identities come from certificates the broker's
//! CA signed, or from tickets it issued), the events and the reason codes,
//! which are fixed strings; a cap on the table is kept anyway.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::time::{Duration, Instant, SystemTime};

use super::Record;

/// Refusals of one kind written before any is held back.
pub(super) const BURST: f64 = 64.0;
/// Refusals of one kind written per second once past the burst.
pub(super) const PER_SECOND: f64 = 1.0;
/// How long after the first refusal held back its count is written.
pub(super) const SUMMARY_EVERY: Duration = Duration::from_secs(2);
/// Kinds tracked at once; a refusal of a new kind past this is written.
const KINDS: usize = 4096;

/// The event of the records that carry a count of refusals held back.
pub const SUPPRESSED: &str = "suppressed";

#[derive(Debug)]
struct Kind {
    event: &'static str,
    identity: Option<String>,
    reason: Option<String>,
    /// Records this kind may still write, refilled at `PER_SECOND`.
    tokens: f64,
    refilled: Instant,
    /// Refusals held back since the last summary, and when the first and
    /// the last of them came.
    held: u64,
    first: SystemTime,
    last: SystemTime,
    /// When the summary of those is written.
    due: Option<Instant>,
}

/// The writer's table of refusal kinds.
#[derive(Debug, Default)]
pub(super) struct Repeats {
    keys: std::hash::RandomState,
    kinds: HashMap<u64, Kind>,
    /// Kinds holding refusals back (with a summary due).
    holding: usize,
}

impl Repeats {
    /// Whether `r` is written now: always, unless it is a refusal whose
    /// kind has used its burst (it is then counted for the summary).
    pub(super) fn admit(&mut self, r: &Record) -> bool {
        if r.decision != Some("deny") || r.event == SUPPRESSED {
            return true;
        }
        self.admit_at(r, Instant::now(), SystemTime::now())
    }

    /// [`Repeats::admit`] for a refusal, at the times given.
    fn admit_at(&mut self, r: &Record, now: Instant, wall: SystemTime) -> bool {
        let key = self
            .keys
            .hash_one((r.event, r.identity.as_deref(), r.reason.as_deref()));
        if !self.kinds.contains_key(&key) && self.kinds.len() >= KINDS {
            self.prune(now);
            if self.kinds.len() >= KINDS {
                return true;
            }
        }
        let k = self.kinds.entry(key).or_insert_with(|| Kind {
            event: r.event,
            identity: r.identity.clone(),
            reason: r.reason.clone(),
            tokens: BURST,
            refilled: now,
            held: 0,
            first: wall,
            last: wall,
            due: None,
        });
        let gained = now.saturating_duration_since(k.refilled).as_secs_f64() * PER_SECOND;
        k.tokens = (k.tokens + gained).min(BURST);
        k.refilled = now;
        if k.tokens >= 1.0 {
            k.tokens -= 1.0;
            return true;
        }
        if k.held == 0 {
            k.first = wall;
            k.due = Some(now + SUMMARY_EVERY);
            self.holding += 1;
        }
        k.held += 1;
        k.last = wall;
        false
    }

    /// When the next summary is due, if any refusal is held back.
    pub(super) fn next_due(&self) -> Option<Instant> {
        if self.holding == 0 {
            return None;
        }
        self.kinds.values().filter_map(|k| k.due).min()
    }

    /// The summaries due by `now` (every one with `all`, when the writer
    /// stops), as records to write; their kinds start counting afresh.
    pub(super) fn due(&mut self, now: Instant, all: bool) -> Vec<Record> {
        let mut out = Vec::new();
        if self.holding == 0 {
            return Vec::new();
        }
        for k in self.kinds.values_mut() {
            match k.due {
                Some(d) if all || d <= now => {}
                _ => continue,
            }
            let mut r = Record::new(SUPPRESSED)
                .deny(k.reason.clone().unwrap_or_default())
                .detail("event", k.event)
                .detail("count", k.held)
                .detail("first", lever_policy::timefmt::rfc3339_millis(k.first))
                .detail("last", lever_policy::timefmt::rfc3339_millis(k.last));
            r.identity = k.identity.clone();
            out.push((k.first, r));
            k.held = 0;
            k.due = None;
            self.holding -= 1;
        }
        // Oldest first, so the trail reads in order.
        out.sort_by_key(|(first, _)| *first);
        out.into_iter().map(|(_, r)| r).collect()
    }

    /// Forgets the kinds with nothing held back and a full bucket again.
    fn prune(&mut self, now: Instant) {
        self.kinds.retain(|_, k| {
            let full = k.tokens
                + now.saturating_duration_since(k.refilled).as_secs_f64() * PER_SECOND
                >= BURST;
            k.held > 0 || !full
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(identity: &str, reason: &str) -> Record {
        Record::new("llm").deny(reason).identity(identity)
    }

    #[test]
    fn a_burst_is_written_then_one_a_second_and_the_rest_counted() {
        let mut r = Repeats::default();
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let written = (0..1000)
            .filter(|_| r.admit_at(&refusal("a", "rate_limited"), t0, wall))
            .count();
        assert_eq!(written, BURST as usize);
        assert_eq!(r.next_due(), Some(t0 + SUMMARY_EVERY));
        assert!(r.due(t0 + SUMMARY_EVERY / 2, false).is_empty());
        // A second later one more is written.
        let t1 = t0 + Duration::from_secs(1);
        assert!(r.admit_at(&refusal("a", "rate_limited"), t1, wall));
        assert!(!r.admit_at(&refusal("a", "rate_limited"), t1, wall));
        let s = r.due(t0 + SUMMARY_EVERY, false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].event, SUPPRESSED);
        assert_eq!(s[0].identity.as_deref(), Some("a"));
        assert_eq!(s[0].reason.as_deref(), Some("rate_limited"));
        assert_eq!(s[0].detail_value("count"), Some(&(1000 - 64 + 1).into()));
        assert_eq!(s[0].detail_value("event"), Some(&"llm".into()));
        assert_eq!(r.next_due(), None);
        assert!(r.due(t0 + SUMMARY_EVERY * 10, true).is_empty());
    }

    #[test]
    fn kinds_are_counted_apart_and_allowed_records_never_held() {
        let mut r = Repeats::default();
        let (t, wall) = (Instant::now(), SystemTime::now());
        for _ in 0..200 {
            r.admit_at(&refusal("a", "rate_limited"), t, wall);
        }
        // Another agent, another reason, another event: their own bursts.
        assert!(r.admit_at(&refusal("b", "rate_limited"), t, wall));
        assert!(r.admit_at(&refusal("a", "token_expired"), t, wall));
        let mut tool = refusal("a", "rate_limited");
        tool.event = "tool";
        assert!(r.admit_at(&tool, t, wall));
        assert!(r.admit(&Record::new("llm").allow().identity("a")));
        let all = r.due(t, true);
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].detail_value("count"), Some(&136.into()));
    }

    #[test]
    fn the_table_is_capped() {
        let mut r = Repeats::default();
        let (t, wall) = (Instant::now(), SystemTime::now());
        for i in 0..KINDS + 10 {
            assert!(r.admit_at(&refusal(&format!("id{i}"), "x"), t, wall));
        }
        assert_eq!(r.kinds.len(), KINDS);
    }
}
