//! `lever audit`: check the audit trail's hash chain; follow it.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use lever_broker::audit::{Verdict, verify_file};

use crate::common::fail;

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check the hash chain; name the first broken line
    Verify {
        /// The audit file (default: the config's broker.telemetry.audit_file)
        file: Option<PathBuf>,
    },
    /// Replay the audit trail to an OTLP collector as log records (backfill)
    Export {
        /// The audit file (default: the config's broker.telemetry.audit_file)
        file: Option<PathBuf>,
        /// The collector's OTLP/HTTP base URL (logs go to URL/v1/logs)
        #[arg(long, value_name = "URL")]
        otlp: String,
        /// Only records at or after this time (RFC 3339, e.g. 2026-11-23T10:00:00Z)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// The service.name resource attribute (default: OTEL_SERVICE_NAME, then lever-broker)
        #[arg(long, value_name = "NAME")]
        service_name: Option<String>,
    },
    /// Print the last records, and with --follow, new ones as they come
    Tail {
        file: Option<PathBuf>,
        /// How many of the last records to print first
        #[arg(short = 'n', default_value_t = 20)]
        lines: usize,
        /// Keep printing new records (until interrupted)
        #[arg(short, long)]
        follow: bool,
    },
}

fn audit_file(file: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    match file {
        Some(f) => Ok(f),
        None => crate::common::load_config(config).map(|c| c.broker.telemetry.audit_file.clone()),
    }
}

pub(crate) fn run(cmd: AuditCommand, config: Option<PathBuf>) -> ExitCode {
    match cmd {
        AuditCommand::Export {
            file,
            otlp,
            since,
            service_name,
        } => {
            let path = match audit_file(file, config) {
                Ok(p) => p,
                Err(code) => return code,
            };
            export(&path, &otlp, since.as_deref(), service_name)
        }
        AuditCommand::Verify { file } => {
            let path = match audit_file(file, config) {
                Ok(p) => p,
                Err(code) => return code,
            };
            match verify_file(&path) {
                Ok(Verdict::Intact { records, tip }) => {
                    crate::out::println(&format!(
                        "{}: intact, {records} records, tip {tip}",
                        path.display()
                    ));
                    ExitCode::SUCCESS
                }
                // Line 0: the trail's recorded tip, not a line of it.
                Ok(Verdict::Broken { line: 0, why }) => fail(&why),
                Ok(Verdict::Broken { line, why }) => {
                    eprintln!("{}:{line}: chain broken: {why}", path.display());
                    ExitCode::FAILURE
                }
                Err(e) => fail(&format!("{}: {e}", path.display())),
            }
        }
        AuditCommand::Tail {
            file,
            lines,
            follow,
        } => {
            let path = match audit_file(file, config) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => return fail(&format!("{}: {e}", path.display())),
            };
            let mut reader = std::io::BufReader::new(f);
            let mut all: Vec<String> = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) => all.push(line.clone()),
                    Err(e) => return fail(&e.to_string()),
                }
            }
            for l in all.iter().skip(all.len().saturating_sub(lines)) {
                crate::out::print(l);
            }
            if !follow {
                return ExitCode::SUCCESS;
            }
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) => std::thread::sleep(Duration::from_millis(250)),
                    Ok(_) => crate::out::print(&line),
                    Err(e) => return fail(&e.to_string()),
                }
            }
        }
    }
}

/// Replays `path` to the collector in batches of 512 records (fewer when
/// they reach 1 MiB), with progress; stops at the first batch the
/// collector refuses.
fn export(
    path: &std::path::Path,
    url: &str,
    since: Option<&str>,
    service: Option<String>,
) -> ExitCode {
    use lever_broker::otel;
    let since = match since.map(|s| (s, lever_policy::timefmt::parse_rfc3339(s))) {
        None => None,
        Some((_, Some(t))) => Some(t),
        Some((s, None)) => {
            eprintln!("lever audit export: --since {s:?} is not an RFC 3339 time");
            return ExitCode::from(2);
        }
    };
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let Some(target) = otel::Target::resolve(Some(url.to_owned()), service, &env) else {
        return fail("no collector URL");
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return fail(&format!("{}: {e}", path.display())),
    };
    let rt = match crate::common::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let Ok(http) = otel::http_client() else {
        return fail("cannot build the HTTP client");
    };
    let mut batch = otel::Batch::default();
    let (mut sent, mut skipped) = (0usize, 0usize);
    let mut flush = |batch: &mut otel::Batch| -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.len();
        let body = otel::logs_request(&target, &std::mem::take(batch));
        rt.block_on(otel::post(
            &http,
            &format!("{}/v1/logs", target.endpoint),
            body.into(),
        ))?;
        sent += n;
        eprintln!("lever audit export: {sent} records sent");
        Ok(())
    };
    for line in std::io::BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            skipped += 1;
            continue;
        };
        let at = v["time"]
            .as_str()
            .and_then(lever_policy::timefmt::parse_rfc3339);
        if let (Some(since), Some(at)) = (since, at)
            && at < since
        {
            continue;
        }
        batch.push_line(&v);
        if (batch.len() >= 512 || batch.size() >= otel::BATCH_BYTES)
            && let Err(e) = flush(&mut batch)
        {
            return fail(&format!(
                "the collector refused a batch after {sent} records: {e}"
            ));
        }
    }
    if let Err(e) = flush(&mut batch) {
        return fail(&format!(
            "the collector refused a batch after {sent} records: {e}"
        ));
    }
    println!(
        "exported {sent} records to {}{}",
        target.endpoint,
        if skipped > 0 {
            format!(" ({skipped} unreadable lines skipped)")
        } else {
            String::new()
        }
    );
    ExitCode::SUCCESS
}
