//! Repeated refusals, counted instead of written one by one.
//!
//! Every refusal is an audit record, and the trail lives on the host's
//! disk. An agent that keeps sending requests it knows will be refused
//! (past its rate limit, with a forged or revoked token, with guessed
//! tickets) would otherwise grow `audit.jsonl` as fast as the broker can
//! answer: tens of thousands of lines a second.
//!
//! So the writer passes each refusal through two token buckets, both of
//! its requester (the CN of the request's certificate; callers without one
//! share one requester on the jail port, the operator is one on the admin
//! port): one for the refusal's kind (the same event, reason, tool and
//! operation: [`KIND_BURST`] at once, then [`KIND_PER_SECOND`]) and one for
//! all its refusals ([`AGENT_BURST`], then [`AGENT_PER_SECOND`]). A refusal
//! is written when both have room. Otherwise it is counted under its kind,
//! and [`SUMMARY_EVERY`] after the first one held back the writer writes one
//! `suppressed` record for the requester: the total, the times of the first
//! and last held back, and the count of each kind. The counts still held
//! are written before the `broker_stop` record, and those of refusals that
//! come after it when the writer stops. Allowed requests are never held
//! back.
//!
//! Bounds: a requester writes at most [`AGENT_PER_SECOND`] refusals a
//! second once past its burst, plus one summary every [`SUMMARY_EVERY`].
//! Tool and operation names can come from the request (a mint for a tool
//! that does not exist), so within one event and reason at most
//! [`KINDS_PER_GROUP`] kinds are counted apart (kinds idle again are
//! forgotten first); past that, a new one is counted by its event and
//! reason alone. Events and reasons are fixed codes, so the table is
//! bounded; requesters are capped at [`AGENTS`] too.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value, json};

use super::{Record, Requester};

/// Refusals of one kind written before any is held back.
pub(super) const KIND_BURST: f64 = 64.0;
/// Refusals of one kind written per second once past that burst.
pub(super) const KIND_PER_SECOND: f64 = 1.0;
/// Refusals of one requester, of any kind, written before any is held back.
pub(super) const AGENT_BURST: f64 = 512.0;
/// Refusals of one requester written per second once past that burst.
pub(super) const AGENT_PER_SECOND: f64 = 4.0;
/// How long after the first refusal held back the counts are written.
pub(super) const SUMMARY_EVERY: Duration = Duration::from_secs(2);
/// Kinds counted apart per requester with the same event and reason (they
/// differ in tool and operation); past that, a new one is counted by its
/// event and reason alone.
pub(super) const KINDS_PER_GROUP: usize = 32;
/// Requesters tracked at once; a refusal of one more is written.
pub(super) const AGENTS: usize = 1024;

/// The event of the records that carry the counts of refusals held back.
pub const SUPPRESSED: &str = "suppressed";

/// A refusal's kind for its requester.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct KindKey {
    event: &'static str,
    reason: Option<String>,
    tool: Option<String>,
    op: Option<String>,
}

impl KindKey {
    fn of(r: &Record) -> KindKey {
        KindKey {
            event: r.event,
            reason: r.reason.clone(),
            tool: r.tool.as_deref().map(str::to_owned),
            op: r.op.as_deref().map(str::to_owned),
        }
    }

    fn same_group(&self, other: &KindKey) -> bool {
        self.event == other.event && self.reason == other.reason
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant, burst: f64, per_second: f64) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * per_second;
        self.tokens = (self.tokens + gained).min(burst);
        self.at = now;
    }
}

#[derive(Debug)]
struct Kind {
    bucket: Bucket,
    held: u64,
}

impl Kind {
    /// Nothing held and its bucket full again: forgetting it loses nothing.
    fn idle(&mut self, now: Instant) -> bool {
        self.bucket.refill(now, KIND_BURST, KIND_PER_SECOND);
        self.held == 0 && self.bucket.tokens >= KIND_BURST
    }
}

#[derive(Debug)]
struct Agent {
    bucket: Bucket,
    kinds: HashMap<KindKey, Kind>,
    /// Refusals held back since the last summary, when the first and the
    /// last of them came, and when their summary is due.
    held: u64,
    first: SystemTime,
    last: SystemTime,
    due: Option<Instant>,
}

/// The writer's table of refusals, per requester and kind.
#[derive(Debug, Default)]
pub(super) struct Repeats {
    agents: HashMap<Requester, Agent>,
    /// The earliest summary due.
    next: Option<Instant>,
}

impl Repeats {
    /// Whether `r` is written now: always, unless it is a refusal past its
    /// kind's or its requester's burst (it is then counted).
    pub(super) fn admit(&mut self, r: &Record) -> bool {
        if r.decision != Some("deny") || r.event == SUPPRESSED {
            return true;
        }
        self.admit_at(r, Instant::now(), SystemTime::now())
    }

    /// [`Repeats::admit`] for a refusal, at the times given.
    fn admit_at(&mut self, r: &Record, now: Instant, wall: SystemTime) -> bool {
        // Whose allowance: the request's sender; for a record about no
        // request, the identity it names.
        let who = r.requester.clone().unwrap_or_else(|| match &r.identity {
            Some(id) => Requester::Agent(id.clone()),
            None => Requester::Anonymous,
        });
        if !self.agents.contains_key(&who) && self.agents.len() >= AGENTS {
            self.prune(now);
            if self.agents.len() >= AGENTS {
                return true;
            }
        }
        let a = self.agents.entry(who).or_insert_with(|| Agent {
            bucket: Bucket::full(AGENT_BURST, now),
            kinds: HashMap::new(),
            held: 0,
            first: wall,
            last: wall,
            due: None,
        });
        let mut key = KindKey::of(r);
        if !a.kinds.contains_key(&key) {
            let group = |kinds: &HashMap<KindKey, Kind>| {
                kinds.keys().filter(|k| k.same_group(&key)).count()
            };
            if group(&a.kinds) >= KINDS_PER_GROUP {
                a.kinds
                    .retain(|k, kind| !k.same_group(&key) || !kind.idle(now));
                if group(&a.kinds) >= KINDS_PER_GROUP {
                    key.tool = None;
                    key.op = None;
                }
            }
        }
        let k = a.kinds.entry(key).or_insert_with(|| Kind {
            bucket: Bucket::full(KIND_BURST, now),
            held: 0,
        });
        k.bucket.refill(now, KIND_BURST, KIND_PER_SECOND);
        a.bucket.refill(now, AGENT_BURST, AGENT_PER_SECOND);
        if k.bucket.tokens >= 1.0 && a.bucket.tokens >= 1.0 {
            k.bucket.tokens -= 1.0;
            a.bucket.tokens -= 1.0;
            return true;
        }
        k.held += 1;
        if a.held == 0 {
            a.first = wall;
            let due = now + SUMMARY_EVERY;
            a.due = Some(due);
            self.next = Some(self.next.map_or(due, |n| n.min(due)));
        }
        a.held += 1;
        a.last = wall;
        false
    }

    /// When the next summary is due, if any refusal is held back.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.next
    }

    /// The summaries due by `now` (every one with `all`), oldest first, as
    /// records to write; their requesters start counting afresh.
    pub(super) fn due(&mut self, now: Instant, all: bool) -> Vec<Record> {
        match self.next {
            None => return Vec::new(),
            Some(n) if !all && n > now => return Vec::new(),
            Some(_) => {}
        }
        let mut out = Vec::new();
        let mut next = None::<Instant>;
        for (who, a) in &mut self.agents {
            match a.due {
                Some(d) if all || d <= now => {}
                Some(d) => {
                    next = Some(next.map_or(d, |n| n.min(d)));
                    continue;
                }
                None => continue,
            }
            let mut kinds: Vec<(&KindKey, u64)> = a
                .kinds
                .iter_mut()
                .filter(|(_, k)| k.held > 0)
                .map(|(key, k)| (key, std::mem::take(&mut k.held)))
                .collect();
            // The largest count first; ties in a stable order.
            kinds.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(y.0)));
            let mut r = Record::new(SUPPRESSED)
                .detail("count", a.held)
                .detail("first", lever_policy::timefmt::rfc3339_millis(a.first))
                .detail("last", lever_policy::timefmt::rfc3339_millis(a.last))
                .detail("kinds", kinds.iter().map(kind_json).collect::<Vec<_>>());
            match who {
                Requester::Agent(id) => r.identity = Some(id.clone()),
                Requester::Anonymous => r = r.detail("requester", "anonymous"),
                Requester::Operator => r = r.detail("requester", "operator"),
            }
            r.decision = Some("deny");
            r.reason = kinds.first().and_then(|(key, _)| key.reason.clone());
            out.push((a.first, r));
            a.held = 0;
            a.due = None;
        }
        self.next = next;
        out.sort_by_key(|(first, _)| *first);
        out.into_iter().map(|(_, r)| r).collect()
    }

    /// Forgets the requesters whose buckets are all full again and who
    /// hold nothing back: they would start afresh anyway.
    fn prune(&mut self, now: Instant) {
        self.agents.retain(|_, a| {
            a.bucket.refill(now, AGENT_BURST, AGENT_PER_SECOND);
            a.held > 0
                || a.bucket.tokens < AGENT_BURST
                || a.kinds.values_mut().any(|k| !k.idle(now))
        });
    }
}

/// One kind's entry in a summary's `kinds` (fields that are `null` left
/// out).
fn kind_json((key, count): &(&KindKey, u64)) -> Value {
    let mut m = Map::new();
    m.insert("event".into(), json!(key.event));
    for (k, v) in [
        ("reason", &key.reason),
        ("tool", &key.tool),
        ("op", &key.op),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    m.insert("count".into(), json!(count));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(identity: &str, reason: &str) -> Record {
        Record::new("llm").deny(reason).identity(identity)
    }

    fn counts(s: &Record) -> Vec<(String, u64)> {
        s.detail_value("kinds")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .map(|k| {
                let name = [&k["event"], &k["reason"], &k["tool"], &k["op"]]
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" ");
                (name, k["count"].as_u64().unwrap())
            })
            .collect()
    }

    #[test]
    fn a_kind_writes_its_burst_then_one_a_second_and_the_rest_is_counted() {
        let mut r = Repeats::default();
        let (t0, wall) = (Instant::now(), SystemTime::now());
        let written = (0..1000)
            .filter(|_| r.admit_at(&refusal("a", "rate_limited"), t0, wall))
            .count();
        assert_eq!(written, KIND_BURST as usize);
        assert_eq!(r.next_due(), Some(t0 + SUMMARY_EVERY));
        assert!(r.due(t0 + SUMMARY_EVERY / 2, false).is_empty());
        // A second later one more is written.
        let t1 = t0 + Duration::from_secs(1);
        assert!(r.admit_at(&refusal("a", "rate_limited"), t1, wall));
        assert!(!r.admit_at(&refusal("a", "rate_limited"), t1, wall));
        let s = r.due(t0 + SUMMARY_EVERY, false);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].event, SUPPRESSED);
        assert_eq!(s[0].decision, Some("deny"));
        assert_eq!(s[0].identity.as_deref(), Some("a"));
        assert_eq!(s[0].reason.as_deref(), Some("rate_limited"));
        assert_eq!(s[0].detail_value("count"), Some(&json!(1000 - 64 + 1)));
        assert_eq!(counts(&s[0]), [("llm rate_limited".into(), 937)]);
        assert_eq!(r.next_due(), None);
        assert!(r.due(t0 + SUMMARY_EVERY * 10, true).is_empty());
    }

    #[test]
    fn kinds_are_counted_apart() {
        let mut r = Repeats::default();
        let (t, wall) = (Instant::now(), SystemTime::now());
        for _ in 0..200 {
            r.admit_at(&refusal("a", "rate_limited"), t, wall);
        }
        // Another agent, another reason, another event, another tool:
        // each has its own burst.
        assert!(r.admit_at(&refusal("b", "rate_limited"), t, wall));
        assert!(r.admit_at(&refusal("a", "token_expired"), t, wall));
        let mut tool = refusal("a", "not_granted");
        tool.event = "tool";
        assert!(r.admit_at(&tool.clone().right("db", "read"), t, wall));
        assert!(r.admit_at(&tool.clone().right("db", "write"), t, wall));
        let all = r.due(t, true);
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(counts(&all[0]), [("llm rate_limited".into(), 136)]);
    }

    #[test]
    fn an_agent_flooding_many_kinds_is_held_to_its_own_burst_and_each_kind_shows() {
        let mut r = Repeats::default();
        let (t, wall) = (Instant::now(), SystemTime::now());
        let mut written = 0;
        for i in 0..1000 {
            // Ten kinds, each under its own burst for a while.
            let rec = refusal(
                "a",
                ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"][i % 10],
            );
            written += usize::from(r.admit_at(&rec, t, wall));
        }
        assert_eq!(written, AGENT_BURST as usize);
        // The refusal such a flood would hide is counted under its kind.
        let hidden = Record::new("tool")
            .deny("not_granted")
            .identity("a")
            .right("db", "drop");
        assert!(!r.admit_at(&hidden, t, wall));
        // Another identity is not held back by this one's flood.
        assert!(r.admit_at(&refusal("b", "r0"), t, wall));
        let s = r.due(t, true);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].detail_value("count"), Some(&json!(1000 - 512 + 1)));
        let c = counts(&s[0]);
        assert_eq!(c.len(), 11, "{c:?}");
        assert!(c.contains(&("tool not_granted db drop".into(), 1)), "{c:?}");
        assert_eq!(c.iter().map(|(_, n)| n).sum::<u64>(), 1000 - 512 + 1);
    }

    #[test]
    fn kinds_named_by_the_caller_are_folded_past_the_cap() {
        let mut r = Repeats::default();
        let (t, wall) = (Instant::now(), SystemTime::now());
        let mut written = 0;
        for i in 0..2000 {
            // A tool named by the caller: a new kind each time.
            let rec = Record::new("mint")
                .deny("unknown_tool")
                .identity("a")
                .right(format!("t{i}"), "x");
            written += usize::from(r.admit_at(&rec, t, wall));
        }
        // One each for the first 32 kinds, then the burst of the kind they
        // fold into (event and reason alone).
        assert_eq!(written, KINDS_PER_GROUP + KIND_BURST as usize);
        let a = &r.agents[&Requester::Agent("a".into())];
        assert_eq!(a.kinds.len(), KINDS_PER_GROUP + 1);
        // Another event and reason keeps its tool and operation apart.
        let drop = Record::new("tool")
            .deny("not_granted")
            .identity("a")
            .right("db", "drop");
        for _ in 0..KIND_BURST as usize {
            assert!(r.admit_at(&drop, t, wall));
        }
        assert!(!r.admit_at(&drop, t, wall));
        let s = r.due(t, true);
        assert_eq!(
            counts(&s[0]),
            [
                ("mint unknown_tool".into(), 2000 - 96),
                ("tool not_granted db drop".into(), 1)
            ]
        );
        // Kinds idle again make room: a new tool is counted apart again.
        let later = t + Duration::from_secs(120);
        let rec = Record::new("mint")
            .deny("unknown_tool")
            .identity("a")
            .right("fresh", "x");
        assert!(r.admit_at(&rec, later, wall));
        let a = &r.agents[&Requester::Agent("a".into())];
        assert!(a.kinds.keys().any(|k| k.tool.as_deref() == Some("fresh")));
    }

    #[test]
    fn refusals_count_against_who_sent_them_not_whom_they_name() {
        let mut r = Repeats::default();
        let (t, wall) = (Instant::now(), SystemTime::now());
        // The manager's requests refused about g1 (a dispatch, say), and
        // anonymous ones naming g1 (a spent ticket of g1's).
        for (who, n) in [
            (Requester::Agent("manager".into()), 600),
            (Requester::Anonymous, 600),
        ] {
            for i in 0..n {
                let mut rec = refusal(
                    "g1",
                    ["r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9"][i % 10],
                );
                rec.requester = Some(who.clone());
                r.admit_at(&rec, t, wall);
            }
        }
        let mut own = refusal("g1", "r0");
        own.requester = Some(Requester::Agent("g1".into()));
        assert!(r.admit_at(&own, t, wall));
        let s = r.due(t, true);
        assert_eq!(s.len(), 2);
        let manager = s
            .iter()
            .find(|x| x.identity.as_deref() == Some("manager"))
            .unwrap();
        assert_eq!(manager.detail_value("count"), Some(&json!(600 - 512)));
        let anon = s.iter().find(|x| x.identity.is_none()).unwrap();
        assert_eq!(anon.detail_value("requester"), Some(&json!("anonymous")));
    }

    #[test]
    fn allowed_records_pass_even_when_the_requester_has_no_room_left() {
        let mut r = Repeats::default();
        let (t, wall) = (Instant::now(), SystemTime::now());
        for i in 0..1000 {
            r.admit_at(&refusal("a", &format!("r{}", i % 10)), t, wall);
        }
        assert!(!r.admit_at(&refusal("a", "r0"), t, wall));
        for _ in 0..100 {
            assert!(r.admit(&Record::new("llm").allow().identity("a")));
            // A record without a decision is no refusal either.
            assert!(r.admit(&Record::new("llm").identity("a")));
        }
    }

    #[test]
    fn the_table_of_identities_is_capped() {
        let mut r = Repeats::default();
        let (t, wall) = (Instant::now(), SystemTime::now());
        for i in 0..AGENTS + 10 {
            assert!(r.admit_at(&refusal(&format!("id{i}"), "x"), t, wall));
        }
        assert_eq!(r.agents.len(), AGENTS);
        // Once their buckets are full again, they make room.
        let later = t + Duration::from_secs(3600);
        assert!(r.admit_at(&refusal("new", "x"), later, wall));
        assert_eq!(r.agents.len(), 1);
    }
}
