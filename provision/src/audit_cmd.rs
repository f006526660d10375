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
