//! `lever`: the operator CLI.
//!
//! Exit status: 0 success, 1 the command ran and found a problem (an
//! invalid config, a failed check), 2 a usage error.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backends;
mod out;
mod validate;

const AFTER_HELP: &str = "\
Lever reads lever.yaml from the current directory only (never from a parent
directory) unless -c FILE names one. Start with:

  lever validate            check ./lever.yaml and the files it names
  lever backends            the containment backends this build implements
  lever schema > lever.schema.json
                            the JSON Schema of lever.yaml, for your editor

Docs: docs/getting-started.md, docs/config-reference.md, docs/security-model.md";

#[derive(Debug, Parser)]
#[command(
    name = "lever",
    version,
    about = "Run autonomous coding agents without giving them your credentials or your network",
    after_help = AFTER_HELP,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check lever.yaml and the files it names; print a summary, or every problem
    #[command(after_help = validate::AFTER_HELP)]
    Validate {
        /// The config file (default: ./lever.yaml; parent directories are never searched)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the result as one JSON object: validity and every problem
        #[arg(long)]
        json: bool,
    },
    /// Print the JSON Schema of lever.yaml
    Schema,
    /// Print the containment backends this build implements
    #[command(after_help = backends::AFTER_HELP)]
    Backends {
        /// Print the matrix as JSON
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config, json } => validate::run(config, json),
        Command::Schema => {
            let schema = lever_policy::config::json_schema();
            match serde_json::to_string_pretty(&schema) {
                Ok(s) => {
                    out::println(&s);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lever schema: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Backends { json } => backends::run(json),
    }
}

/// The config path: explicit, or `lever.yaml` in the current directory.
pub(crate) fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit.unwrap_or_else(|| PathBuf::from(lever_policy::config::CONFIG_FILE))
}
