//! The audit trail: one JSON object per line in `audit.jsonl`, each
//! carrying the SHA-256 of the previous line (`prev`), so editing,
//! removing or reordering a line breaks the chain at that line.
//!
//! Records are handed to a dedicated writer thread through a bounded
//! channel: the request path never touches the disk, and a full channel
//! makes senders wait (backpressure) rather than dropping a record. The
//! writer appends each record with one `write` (so `kill -9` loses nothing
//! that was handed over and written) and fsyncs at least every second.
//!
//! A chain alone cannot show that lines were cut from its end. So after
//! each fsync the writer also records the chain's durable tip (the last
//! written `seq` and that line's hash) in a file beside the trail
//! (`audit.jsonl.tip`, replaced atomically). `lever audit verify` and the
//! broker's start compare the trail with it: a trail that ends before its
//! tip lost records from its end.
//!
//! Refusals repeated past a burst are counted rather than written one by
//! one, so a flood cannot fill the host's disk (`repeats.rs`).
//!
//! Schema (every key always present, `null` when it does not apply):
//! `seq`, `time`, `event`, `request_id`, `identity`, `tool`, `op`,
//! `constraints`, `decision`, `reason`, `token_id`, `detail`, `prev`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::error::StartError;

mod repeats;
pub use repeats::SUPPRESSED;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const CHANNEL: usize = 65_536;
const FSYNC_EVERY: Duration = Duration::from_secs(1);

/// The file beside an audit trail that records its durable tip.
pub fn tip_path(audit: &Path) -> PathBuf {
    let mut name = audit.file_name().unwrap_or_default().to_owned();
    name.push(".tip");
    audit.with_file_name(name)
}

/// The tip recorded beside `audit`: `None` when there is no tip file (a
/// trail from before tips were kept, or one the operator started over).
pub fn recorded_tip(audit: &Path) -> Result<Option<(u64, String)>, String> {
    let path = tip_path(audit);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not the tip Lever writes ({e})", path.display()))?;
    match (v["seq"].as_u64(), v["hash"].as_str()) {
        (Some(seq), Some(hash)) if hash.len() == 64 => Ok(Some((seq, hash.to_owned()))),
        _ => Err(format!(
            "{}: not the tip Lever writes (no seq and hash)",
            path.display()
        )),
    }
}

/// Records `(seq, hash)` as the durable tip of `audit`: written to a
/// temporary file, synced, and renamed over the tip.
fn write_tip(audit: &Path, seq: u64, hash: &str) {
    let path = tip_path(audit);
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let result = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            writeln!(f, "{{\"seq\":{seq},\"hash\":\"{hash}\"}}")?;
            f.sync_data()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = result {
        eprintln!(
            "lever broker: cannot record the audit tip in {}: {e}",
            path.display()
        );
    }
}

/// What happened, as recorded. Build with [`Record::new`] and the setters.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub event: &'static str,
    pub request_id: Option<String>,
    pub identity: Option<String>,
    pub tool: Option<Cow<'static, str>>,
    pub op: Option<Cow<'static, str>>,
    pub constraints: Option<BTreeMap<String, String>>,
    pub decision: Option<&'static str>,
    pub reason: Option<String>,
    pub token_id: Option<String>,
    /// The request's trace ids when telemetry already derived them (the
    /// writer derives them otherwise).
    pub trace: Option<crate::otel::Ids>,
    /// Who sent the request the record is about (set with
    /// [`Record::request`]; `None` when it is the record's `identity`):
    /// whose allowance a refusal counts against (`repeats`). Not written.
    pub requester: Option<Requester>,
    /// Event-specific fields, written as the `detail` object in key order
    /// (a key set twice keeps its last value).
    pub detail: Vec<(&'static str, serde_json::Value)>,
}

impl Record {
    pub fn new(event: &'static str) -> Record {
        Record {
            event,
            detail: Vec::with_capacity(12),
            ..Record::default()
        }
    }
    pub fn allow(mut self) -> Self {
        self.decision = Some("allow");
        self
    }
    pub fn deny(mut self, reason: impl Into<String>) -> Self {
        self.decision = Some("deny");
        self.reason = Some(reason.into());
        self
    }
    pub fn identity(mut self, id: impl Into<String>) -> Self {
        self.identity = Some(id.into());
        self
    }
    /// The request the record is about (and its trace ids, if known).
    pub fn request(mut self, ctx: &crate::stack::Ctx<'_>) -> Self {
        self.request_id = Some(ctx.request_id.clone());
        self.trace = ctx.known_trace_ids();
        self.requester = match ctx.conn.listener {
            crate::server::Listener::Admin => Some(Requester::Operator),
            crate::server::Listener::Jail => match ctx.cn() {
                // The usual case: the record names its sender, which
                // `repeats` falls back to (nothing to copy).
                Some(cn) if self.identity.as_deref() == Some(cn) => None,
                Some(cn) => Some(Requester::Agent(cn.to_owned())),
                None => Some(Requester::Anonymous),
            },
        };
        self
    }
    pub fn right(
        mut self,
        tool: impl Into<Cow<'static, str>>,
        op: impl Into<Cow<'static, str>>,
    ) -> Self {
        self.tool = Some(tool.into());
        self.op = Some(op.into());
        self
    }
    pub fn constraints(mut self, c: &BTreeMap<String, String>) -> Self {
        self.constraints = Some(c.clone());
        self
    }
    pub fn token(mut self, id: impl Into<String>) -> Self {
        self.token_id = Some(id.into());
        self
    }
    pub fn detail(mut self, key: &'static str, v: impl Into<serde_json::Value>) -> Self {
        let v = v.into();
        match self.detail.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = v,
            None => self.detail.push((key, v)),
        }
        self
    }

    /// The rate limit that refused the request, as `detail.lane`, when one
    /// did (`verify`: too many new tokens, on routes with a lane of their
    /// own).
    pub fn lane_of(self, e: &crate::error::ApiError) -> Self {
        match e.rate_limited_lane() {
            Some(lane) => self.detail("lane", lane),
            None => self,
        }
    }

    /// A detail field's value.
    pub fn detail_value(&self, key: &str) -> Option<&serde_json::Value> {
        self.detail.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Sorts the detail fields by key, as they are written.
    fn sort_detail(&mut self) {
        self.detail.sort_unstable_by_key(|(k, _)| *k);
    }
}

/// Who sent a request, as far as the broker can tell.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requester {
    /// A caller with a verified certificate of this CN.
    Agent(String),
    /// A caller on the jail port without a usable certificate.
    Anonymous,
    /// A caller on the admin port.
    Operator,
}

/// The `detail` object of a line.
struct Detail<'a>(&'a [(&'static str, serde_json::Value)]);

impl Serialize for Detail<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (*k, v)))
    }
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    time: &'a str,
    event: &'a str,
    request_id: &'a Option<String>,
    identity: &'a Option<String>,
    tool: &'a Option<Cow<'static, str>>,
    op: &'a Option<Cow<'static, str>>,
    constraints: &'a Option<BTreeMap<String, String>>,
    decision: &'a Option<&'static str>,
    reason: &'a Option<String>,
    token_id: &'a Option<String>,
    detail: Detail<'a>,
    prev: &'a str,
}

/// The sending side. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Audit {
    tx: mpsc::Sender<Msg>,
    /// Where records also go once telemetry export is on.
    pub(crate) otel: std::sync::Arc<std::sync::OnceLock<crate::otel::Otel>>,
}

enum Msg {
    Record(Box<Record>),
    /// A record the writer makes itself (a count of refusals held back).
    Own(Box<Record>),
    /// The last record of a run: the counts still held go before it.
    Last(Box<Record>),
    Flush(std::sync::mpsc::Sender<()>),
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl Audit {
    /// Opens (or creates, 0600) the audit file, finds the chain's tip, and
    /// starts the writer thread.
    pub fn open(path: &Path) -> Result<(Audit, std::thread::JoinHandle<()>), StartError> {
        let (seq, tip) = tip(path).map_err(StartError::Audit)?;
        if let Some(why) = cut_short(path, seq, &tip).map_err(StartError::Audit)? {
            return Err(StartError::Audit(format!(
                "{why}; check it with `lever audit verify` (delete {} only if you cut the trail yourself)",
                tip_path(path).display()
            )));
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| StartError::Audit(format!("{}: {e}", path.display())))?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let path = path.to_path_buf();
        let otel: std::sync::Arc<std::sync::OnceLock<crate::otel::Otel>> = Default::default();
        let for_writer = otel.clone();
        // The writer's timed wait for the next record (the fsync a second
        // after the last write, with nothing else to wake it) runs on a
        // timer of its own, made (and dropped) on the writer's thread.
        let (ready, started) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("lever-audit".into())
            .spawn(move || {
                let timer = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build();
                match timer {
                    Ok(timer) => {
                        let _ = ready.send(Ok(()));
                        writer(file, path, rx, seq, tip, &for_writer, &timer);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(format!("the audit writer's timer: {e}")));
                    }
                }
            })
            .map_err(|e| StartError::Audit(e.to_string()))?;
        match started.recv() {
            Ok(Ok(())) => Ok((Audit { tx, otel }, handle)),
            Ok(Err(e)) => Err(StartError::Audit(e)),
            Err(_) => Err(StartError::Audit("the audit writer did not start".into())),
        }
    }

    /// Hands a record to the writer (waits if the channel is full).
    pub async fn log(&self, r: Record) {
        // The writer lives as long as the broker; if it is gone the broker
        // is shutting down and there is nowhere left to write.
        let _ = self.tx.send(Msg::Record(Box::new(r))).await;
    }

    /// Hands over the last record of the broker's run (`broker_stop`): the
    /// counts of refusals still held back are written before it.
    pub async fn log_last(&self, r: Record) {
        let _ = self.tx.send(Msg::Last(Box::new(r))).await;
    }

    /// Hands a record over and waits until it is on disk: for the records
    /// of state changes, answered only once both are durable.
    pub async fn log_durable(&self, r: Record) {
        self.log(r).await;
        self.flush().await;
    }

    /// Like [`Audit::log`], from code that cannot wait (a body's `Drop`):
    /// hands the record over at once, or, when the channel is full, on a
    /// task that waits for room. Nothing is dropped either way.
    pub fn log_now(&self, r: Record) {
        match self.tx.try_send(Msg::Record(Box::new(r))) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let tx = self.tx.clone();
                // Outside a runtime only at shutdown, when nothing is left
                // to write to.
                if let Ok(h) = tokio::runtime::Handle::try_current() {
                    h.spawn(async move {
                        let _ = tx.send(msg).await;
                    });
                }
            }
        }
    }

    /// Like [`Audit::log`], from blocking code.
    pub fn log_blocking(&self, r: Record) {
        let _ = self.tx.blocking_send(Msg::Record(Box::new(r)));
    }

    /// Waits until everything handed over so far is written and fsynced.
    pub async fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ =
                tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10))).await;
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    lever_policy::hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The writer's clock: RFC 3339 with milliseconds, the whole-second part
/// formatted once per second.
#[derive(Default)]
struct Clock {
    secs: Option<u64>,
    base: String,
    text: String,
}

impl Clock {
    fn format(&mut self, t: SystemTime) -> &str {
        let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        if self.secs != Some(d.as_secs()) {
            self.secs = Some(d.as_secs());
            self.base = lever_policy::timefmt::rfc3339(
                std::time::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
            );
            self.base.pop(); // the `Z`
        }
        let ms = d.subsec_millis();
        self.text.clear();
        self.text.push_str(&self.base);
        self.text.push('.');
        for div in [100, 10, 1] {
            self.text.push(char::from(b'0' + (ms / div % 10) as u8));
        }
        self.text.push('Z');
        &self.text
    }
}

fn writer(
    mut file: File,
    path: PathBuf,
    mut rx: mpsc::Receiver<Msg>,
    mut seq: u64,
    mut prev: String,
    otel: &std::sync::OnceLock<crate::otel::Otel>,
    timer: &tokio::runtime::Runtime,
) {
    let mut last_sync = Instant::now();
    let mut dirty = false;
    let mut pending: Vec<u8> = Vec::with_capacity(BATCH);
    // When the oldest record in `pending` was put there.
    let mut pending_since = Instant::now();
    // Records came since this thread last slept: more may be on their way.
    let mut gather = false;
    let mut clock = Clock::default();
    let mut prev_line = String::with_capacity(64);
    // The last record handed to the file, and the last one recorded as the
    // durable tip.
    let mut written = (seq, prev.clone());
    let mut tipped = seq;
    // Repeated refusals, counted rather than written (`repeats`), and the
    // records carrying their counts, written next.
    let mut repeats = repeats::Repeats::default();
    let mut own: std::collections::VecDeque<Record> = Default::default();
    let mut closing = false;
    // The tip moves only past records that were written and synced: a
    // failed write or sync never makes it claim more than the file holds.
    let mut sync = |file: &File, written: &(u64, String)| {
        if file.sync_data().is_ok() && written.0 != tipped {
            write_tip(&path, written.0, &written.1);
            tipped = written.0;
        }
    };
    loop {
        // While records keep coming, let the next ones gather for GATHER
        // before looking again: no waker is registered while this thread
        // sleeps, so their senders wake no one, and a burst is one write.
        if gather && rx.is_empty() {
            std::thread::sleep(GATHER);
            gather = false;
        }
        if let Some(due) = repeats.next_due()
            && (closing || due <= Instant::now())
        {
            own.extend(repeats.due(Instant::now(), closing));
        }
        let msg = match own.pop_front() {
            Some(r) => Some(Msg::Own(Box::new(r))),
            None if closing => None,
            None => match rx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Wait for the next record, or until the fsync (a second
                    // after a write, with nothing else to wake this thread)
                    // or a count of refusals held back is due.
                    let sync_due = dirty.then(|| last_sync + FSYNC_EVERY);
                    match sync_due.into_iter().chain(repeats.next_due()).min() {
                        None => rx.blocking_recv(),
                        Some(due) => {
                            let due = tokio::time::Instant::from_std(due);
                            match timer
                                .block_on(async { tokio::time::timeout_at(due, rx.recv()).await })
                            {
                                Ok(m) => m,
                                Err(_) => {
                                    // Whichever was due: the counts are
                                    // taken at the top of the loop.
                                    if dirty && last_sync.elapsed() >= FSYNC_EVERY {
                                        sync(&file, &written);
                                        dirty = false;
                                        last_sync = Instant::now();
                                    }
                                    continue;
                                }
                            }
                        }
                    }
                }
            },
        };
        let Some(msg) = msg else {
            // Every count still held is written before the writer stops.
            if repeats.next_due().is_some() {
                closing = true;
                continue;
            }
            break;
        };
        let (mut r, mine) = match msg {
            Msg::Flush(done) => {
                if write_out(&mut file, &mut pending, &path) {
                    written.0 = seq;
                    written.1.clone_from(&prev);
                }
                sync(&file, &written);
                dirty = false;
                last_sync = Instant::now();
                let _ = done.send(());
                continue;
            }
            Msg::Last(r) => {
                own.extend(repeats.due(Instant::now(), true));
                own.push_back(*r);
                continue;
            }
            Msg::Record(r) => (r, false),
            Msg::Own(r) => (r, true),
        };
        // A refusal past its bursts is counted, not written (`repeats`).
        if mine || repeats.admit(&r) {
            if !mine {
                gather = true;
            }
            seq += 1;
            let now = SystemTime::now();
            r.sort_detail();
            let detail = &r.detail;
            let line = Line {
                seq,
                time: clock.format(now),
                event: r.event,
                request_id: &r.request_id,
                identity: &r.identity,
                tool: &r.tool,
                op: &r.op,
                constraints: &r.constraints,
                decision: &r.decision,
                reason: &r.reason,
                token_id: &r.token_id,
                detail: Detail(detail),
                prev: &prev,
            };
            // Serialized straight onto the pending batch, hashed there.
            let start = pending.len();
            if serde_json::to_writer(&mut pending, &line).is_err() {
                pending.truncate(start);
                seq -= 1;
                continue;
            }
            if start == 0 {
                pending_since = Instant::now();
            }
            // `prev` becomes this line's hash; `prev_line` keeps the one
            // this line carries (both buffers reused).
            std::mem::swap(&mut prev, &mut prev_line);
            prev.clear();
            let digest = ring::digest::digest(&ring::digest::SHA256, &pending[start..]);
            lever_policy::hex::encode_into(&mut prev, digest.as_ref());
            // Exported as written (the file stays the system of record;
            // the export queue never blocks this thread).
            if let Some(o) = otel.get() {
                o.audit(
                    &crate::otel::AuditView {
                        seq: Some(seq),
                        time: Some(now),
                        event: r.event,
                        request_id: r.request_id.as_deref(),
                        identity: r.identity.as_deref(),
                        tool: r.tool.as_deref(),
                        op: r.op.as_deref(),
                        constraints: r.constraints.as_ref(),
                        decision: r.decision,
                        reason: r.reason.as_deref(),
                        token_id: r.token_id.as_deref(),
                        detail: crate::otel::Details::Pairs(detail),
                        prev: Some(&prev_line),
                    },
                    r.trace,
                );
            }
            pending.push(b'\n');
        }
        // One write per burst rather than per record: write when the queue
        // is drained, the batch is large, or its oldest record has waited
        // GATHER (records that keep coming, refusals held back among
        // them, do not keep the others from the file).
        if !pending.is_empty()
            && (rx.is_empty() || pending.len() >= BATCH || pending_since.elapsed() >= GATHER)
        {
            if write_out(&mut file, &mut pending, &path) {
                written.0 = seq;
                written.1.clone_from(&prev);
            }
            dirty = true;
        }
        if dirty && last_sync.elapsed() >= FSYNC_EVERY {
            sync(&file, &written);
            dirty = false;
            last_sync = Instant::now();
        }
    }
    if write_out(&mut file, &mut pending, &path) {
        written.0 = seq;
        written.1.clone_from(&prev);
    }
    sync(&file, &written);
}

/// How long the writer lets records gather once they are coming: at
/// 1,000 records a second it wakes 200 times, not 1,000, and a lone record
/// costs one more wake-up. A record reaches the file within about this
/// long (and is fsynced within `FSYNC_EVERY`, or before the answer for
/// [`Audit::log_durable`]).
const GATHER: Duration = Duration::from_millis(5);

/// Largest batch of records written at once.
const BATCH: usize = 64 * 1024;

/// Writes the pending records out; false if they could not be written.
fn write_out(file: &mut File, pending: &mut Vec<u8>, path: &Path) -> bool {
    if pending.is_empty() {
        return true;
    }
    let ok = match file.write_all(pending) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "lever broker: cannot write the audit log {}: {e}",
                path.display()
            );
            false
        }
    };
    pending.clear();
    ok
}

/// The last sequence number and the hash of the last line of an audit file
/// (0 and the genesis hash for an absent or empty one).
fn tip(path: &Path) -> Result<(u64, String), String> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, GENESIS.to_owned())),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len == 0 {
        return Ok((0, GENESIS.to_owned()));
    }
    // Read the tail: a line is at most a few KiB.
    let start = len.saturating_sub(1024 * 1024);
    f.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).map_err(|e| e.to_string())?;
    if tail.last() != Some(&b'\n') {
        return Err(format!(
            "{} ends with an incomplete line; check it with `lever audit verify` before starting",
            path.display()
        ));
    }
    let body = &tail[..tail.len() - 1];
    let mut lines = body.rsplit(|b| *b == b'\n');
    let last = lines.next().unwrap_or(body);
    // The last link must hold: the tip is where new records chain on, so
    // an edited last line would otherwise go unnoticed for good.
    if let Some(before) = lines
        .next()
        .filter(|_| start == 0 || body.len() > last.len())
    {
        let v: serde_json::Value = serde_json::from_slice(last).unwrap_or_default();
        if v["prev"].as_str() != Some(sha256_hex(before).as_str()) {
            return Err(format!(
                "{}: the last line does not chain to the one before it (the trail was edited); check it with `lever audit verify`",
                path.display()
            ));
        }
    }
    let v: serde_json::Value = serde_json::from_slice(last)
        .map_err(|e| format!("{}: the last line is not JSON ({e})", path.display()))?;
    let seq = v["seq"]
        .as_u64()
        .ok_or_else(|| format!("{}: the last line has no seq", path.display()))?;
    Ok((seq, sha256_hex(last)))
}

/// Why a trail whose last record is `(seq, hash)` does not reach the tip
/// recorded beside it, if it does not.
fn cut_short(path: &Path, seq: u64, hash: &str) -> Result<Option<String>, String> {
    Ok(match recorded_tip(path)? {
        Some((at, _)) if at > seq => Some(format!(
            "{} ends at seq {seq}, but its tip records that seq {at} was written: records were removed from its end",
            path.display()
        )),
        Some((at, h)) if at == seq && h != hash => Some(format!(
            "{}: its last record (seq {seq}) is not the one its tip records: the end of the trail was replaced",
            path.display()
        )),
        _ => None,
    })
}

/// The result of checking a chain.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every line links to the one before. `tip` is the last line's hash.
    Intact { records: u64, tip: String },
    /// The first line (1-based) whose `prev` or shape is wrong, and why;
    /// the line after the last when records were cut from the end; 0 when
    /// the recorded tip beside the trail cannot be read.
    Broken { line: u64, why: String },
}

/// Checks an audit file's hash chain from the first line.
pub fn verify_file(path: &Path) -> std::io::Result<Verdict> {
    let f = File::open(path)?;
    let recorded = match recorded_tip(path) {
        Ok(t) => t,
        Err(why) => return Ok(Verdict::Broken { line: 0, why }),
    };
    let mut last_seq = 0;
    let mut prev = GENESIS.to_owned();
    let mut expected_seq = None;
    let mut n = 0u64;
    let mut reader = BufReader::new(f);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf)?;
        if read == 0 {
            break;
        }
        n += 1;
        let Some(line) = buf.strip_suffix(b"\n") else {
            return Ok(Verdict::Broken {
                line: n,
                why: "incomplete last line".into(),
            });
        };
        let v: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Verdict::Broken {
                    line: n,
                    why: format!("not JSON: {e}"),
                });
            }
        };
        match v["prev"].as_str() {
            Some(p) if p == prev => {}
            Some(_) => {
                return Ok(Verdict::Broken {
                    line: n,
                    why: "its prev hash does not match the line before (a line was edited, removed or reordered)".into(),
                });
            }
            None => {
                return Ok(Verdict::Broken {
                    line: n,
                    why: "no prev hash".into(),
                });
            }
        }
        let seq = v["seq"].as_u64();
        if let (Some(want), Some(got)) = (expected_seq, seq)
            && got != want
        {
            return Ok(Verdict::Broken {
                line: n,
                why: format!("seq {got} where {want} was expected"),
            });
        }
        expected_seq = seq.map(|s| s + 1);
        prev = sha256_hex(line);
        if let (Some(s), Some((at, h))) = (seq, &recorded)
            && s == *at
            && prev != *h
        {
            return Ok(Verdict::Broken {
                line: n,
                why: format!(
                    "seq {s} is not the record the tip beside the trail ({}) recorded: the trail was rewritten from here",
                    tip_path(path).display()
                ),
            });
        }
        last_seq = seq.unwrap_or(last_seq);
    }
    if let Some((at, _)) = recorded
        && at > last_seq
    {
        return Ok(Verdict::Broken {
            line: n + 1,
            why: format!(
                "the trail ends at seq {last_seq}, but the tip beside it ({}) records that seq {at} was written: records were removed from its end",
                tip_path(path).display()
            ),
        });
    }
    Ok(Verdict::Intact {
        records: n,
        tip: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_clock_formats_as_rfc3339_with_milliseconds() {
        let mut c = Clock::default();
        for (secs, ms) in [
            (0u64, 0u32),
            (1_700_000_000, 7),
            (1_700_000_000, 999),
            (1_700_000_001, 40),
        ] {
            let t = std::time::UNIX_EPOCH
                + Duration::from_secs(secs)
                + Duration::from_millis(ms.into());
            assert_eq!(c.format(t), lever_policy::timefmt::rfc3339_millis(t));
        }
    }

    /// An empty dir of this process tagged `tag`, and its trail's path.
    fn fresh(tag: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("lever-audit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.jsonl");
        (dir, path)
    }

    /// The complete lines of a trail (one being written is left out).
    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The refusals the `suppressed` records of `all` count.
    fn held(all: &[serde_json::Value]) -> u64 {
        all.iter()
            .filter(|l| l["event"] == SUPPRESSED)
            .map(|l| l["detail"]["count"].as_u64().unwrap())
            .sum()
    }

    #[test]
    fn a_flood_of_one_refusal_is_counted_and_the_counts_go_before_the_last_record() {
        let (dir, path) = fresh("flood");
        let (audit, handle) = Audit::open(&path).unwrap();
        let refusal = || Record::new("llm").deny("rate_limited").identity("a");
        for i in 0..1000u64 {
            audit.log_blocking(refusal());
            // Allowed records in between are all written.
            if i % 100 == 0 {
                audit.log_blocking(Record::new("llm").allow().identity("a"));
            }
        }
        // Another agent's refusal is not held back by this flood.
        audit.log_blocking(Record::new("llm").deny("rate_limited").identity("b"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(audit.log_last(Record::new("broker_stop")));
        drop(audit);
        handle.join().unwrap();
        let all = lines(&path);
        let of = |event: &str, id: &str, decision: &str| {
            all.iter()
                .filter(|l| l["event"] == event && l["identity"] == id && l["decision"] == decision)
                .count()
        };
        assert_eq!(of("llm", "a", "allow"), 10);
        // The burst, and one more a second should the host be that slow.
        let written = of("llm", "a", "deny");
        assert!((64..70).contains(&written), "{written}");
        assert_eq!(of("llm", "b", "deny"), 1);
        assert_eq!(held(&all) + written as u64, 1000);
        let counts: Vec<_> = all.iter().filter(|l| l["event"] == SUPPRESSED).collect();
        for s in &counts {
            assert_eq!(s["identity"], "a");
            assert_eq!(s["decision"], "deny");
            assert_eq!(s["reason"], "rate_limited");
            assert_eq!(s["detail"]["kinds"][0]["event"], "llm");
        }
        // The last summary came before the run's last record.
        assert_eq!(all.last().unwrap()["event"], "broker_stop");
        assert!(matches!(
            verify_file(&path).unwrap(),
            Verdict::Intact { records, .. } if records as usize == all.len()
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_record_reaches_the_file_while_a_flood_of_refusals_keeps_the_writer_busy() {
        let (dir, path) = fresh("flood-busy");
        let (audit, handle) = Audit::open(&path).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Two senders keep the queue from draining with refusals that are
        // all held back (past the first bursts).
        let floods: Vec<_> = (0..2)
            .map(|_| {
                let (audit, stop) = (audit.clone(), stop.clone());
                std::thread::spawn(move || {
                    let started = Instant::now();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(20)
                    {
                        audit.log_blocking(Record::new("llm").deny("rate_limited").identity("a"));
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        audit.log_blocking(Record::new("llm").allow().identity("b"));
        let deadline = Instant::now() + Duration::from_secs(3);
        let seen = loop {
            if lines(&path).iter().any(|l| l["identity"] == "b") {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for f in floods {
            f.join().unwrap();
        }
        assert!(seen, "an allowed record waited for the flood to end");
        drop(audit);
        handle.join().unwrap();
        let all = lines(&path);
        let written = all
            .iter()
            .filter(|l| l["decision"] == "deny" && l["event"] == "llm")
            .count();
        assert!(
            held(&all) > 0 && written < 100,
            "{written} refusals written"
        );
        assert!(matches!(
            verify_file(&path).unwrap(),
            Verdict::Intact { .. }
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_count_of_refusals_held_back_is_written_while_the_writer_waits() {
        let (dir, path) = fresh("flood-timed");
        let (audit, handle) = Audit::open(&path).unwrap();
        for _ in 0..100 {
            audit.log_blocking(Record::new("enrol").deny("ticket_unknown"));
        }
        // Nothing else comes: the writer wakes for the count on its own.
        let deadline = Instant::now() + repeats::SUMMARY_EVERY * 3;
        let summary = loop {
            let all = lines(&path);
            if let Some(s) = all.iter().find(|l| l["event"] == SUPPRESSED) {
                break s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no count within {:?}",
                repeats::SUMMARY_EVERY * 3
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(summary["identity"], serde_json::Value::Null);
        assert_eq!(summary["reason"], "ticket_unknown");
        drop(audit);
        handle.join().unwrap();
        let all = lines(&path);
        let written = all.iter().filter(|l| l["event"] == "enrol").count();
        assert!((64..70).contains(&written), "{written}");
        assert_eq!(held(&all) + written as u64, 100);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_rewritten_or_shortened_end_is_caught_by_the_recorded_tip() {
        let (dir, path) = fresh("tip");
        let (audit, handle) = Audit::open(&path).unwrap();
        for i in 0..3u64 {
            audit.log_blocking(Record::new("llm").allow().detail("n", i));
        }
        drop(audit);
        handle.join().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        assert_eq!(
            recorded_tip(&path).unwrap(),
            Some((3, sha256_hex(last.as_bytes())))
        );
        let tip_mode = std::fs::metadata(tip_path(&path)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&tip_mode) & 0o777,
            0o600
        );

        // The last record replaced by another that still chains: the chain
        // alone holds, the tip does not.
        let forged = last.replace(r#""n":2"#, r#""n":7"#);
        assert_ne!(forged, last);
        std::fs::write(&path, text.replace(last, &forged)).unwrap();
        match verify_file(&path).unwrap() {
            Verdict::Broken { line: 3, why } => assert!(why.contains("rewritten"), "{why}"),
            v => panic!("{v:?}"),
        }
        let e = Audit::open(&path).err().unwrap().to_string();
        assert!(e.contains("was replaced"), "{e}");

        // Without the tip file, the same trail verifies (nothing to compare).
        std::fs::remove_file(tip_path(&path)).unwrap();
        assert!(matches!(
            verify_file(&path).unwrap(),
            Verdict::Intact { records: 3, .. }
        ));
        // A tip that is not Lever's is reported, not ignored.
        std::fs::write(tip_path(&path), "garbage").unwrap();
        assert!(matches!(
            verify_file(&path).unwrap(),
            Verdict::Broken { line: 0, .. }
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lone_record_is_synced_and_tipped_within_about_a_second() {
        // Nothing follows the record and nothing flushes: the writer's own
        // timed wait must fsync it and move the tip.
        let (dir, path) = fresh("timed");
        let (audit, handle) = Audit::open(&path).unwrap();
        audit.log_blocking(Record::new("llm").allow());
        let deadline = Instant::now() + FSYNC_EVERY * 3;
        let tipped = loop {
            match recorded_tip(&path) {
                Ok(Some((1, _))) => break true,
                _ if Instant::now() > deadline => break false,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        assert!(tipped, "no tip within {:?}", FSYNC_EVERY * 3);
        drop(audit);
        handle.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_tip_never_claims_records_that_were_not_written() {
        // Every write fails (ENOSPC): the tip must not move past the file.
        let (dir, path) = fresh("full");
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let (audit, handle) = Audit::open(&path).unwrap();
        for i in 0..3u64 {
            audit.log_blocking(Record::new("llm").allow().detail("n", i));
        }
        drop(audit);
        handle.join().unwrap();
        assert!(
            !matches!(recorded_tip(&path), Ok(Some((n, _))) if n > 0),
            "{:?}",
            recorded_tip(&path)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn records_chain_and_details_are_written_in_key_order() {
        let (dir, path) = fresh("unit");
        let (audit, handle) = Audit::open(&path).unwrap();
        for i in 0..3u64 {
            audit.log_blocking(
                Record::new("llm")
                    .allow()
                    .right("llm", "generate")
                    .detail("status", 200)
                    .detail("model", "m")
                    .detail("status", 200 + i),
            );
        }
        drop(audit);
        handle.join().unwrap();
        assert_eq!(
            verify_file(&path).unwrap(),
            Verdict::Intact {
                records: 3,
                tip: sha256_hex(
                    std::fs::read_to_string(&path)
                        .unwrap()
                        .lines()
                        .last()
                        .unwrap()
                        .as_bytes()
                )
            }
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        assert!(
            last.contains(r#""detail":{"model":"m","status":202}"#),
            "{last}"
        );
        assert!(last.contains(r#""tool":"llm","op":"generate""#), "{last}");
        // The schema's keys, every one present, in order.
        assert!(last.starts_with(r#"{"seq":3,"time":""#), "{last}");
        let keys = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(last)
            .unwrap()
            .len();
        assert_eq!(keys, 13, "{last}");
        let at: Vec<usize> = [
            "seq",
            "time",
            "event",
            "request_id",
            "identity",
            "tool",
            "op",
            "constraints",
            "decision",
            "reason",
            "token_id",
            "detail",
            "prev",
        ]
        .iter()
        .map(|k| last.find(&format!("\"{k}\":")).unwrap())
        .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{last}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
