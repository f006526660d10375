//! `lever-tool-db`: read-only SQLite over MCP, behind the Lever broker.
//!
//! It serves one operation, `read`, over MCP streamable HTTP on a loopback
//! address (`-backend ADDR`, as the broker starts it) or over stdin/stdout
//! (`--stdio`). It checks every table against its own `--tables` list, so a
//! table the operator did not list stays unreachable even if something
//! reached the tool without going through the broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use lever_tool_db::db::{self, Db};
use lever_tool_db::server::{serve_http, serve_stdio};

#[derive(Parser, Debug)]
#[command(
    name = "lever-tool-db",
    version,
    about = "Read-only SQLite access over MCP, for agents behind the Lever broker.",
    long_about = "Read-only SQLite access over MCP, for agents behind the Lever broker.\n\n\
        Serves one MCP tool, `read` (arguments: `table`, and an optional `filter` \
        matched as a bound parameter, never spliced into SQL). Only the tables named \
        with --tables can be read, whatever the caller asks: the broker pins a \
        capability to a table, and this tool checks again.\n\n\
        The broker starts it as configured in lever.yaml, appending `-backend ADDR`:\n\n  \
        tools:\n    - name: db\n      command: [lever-tool-db, --database, data.db, --tables, \"users,orders\"]\n      \
        backend: 127.0.0.1:3201\n      operations: [{name: read}]\n      allowed_values: {table: [users, orders]}"
)]
struct Args {
    /// The SQLite database (opened read-only; it must exist).
    #[arg(long, value_name = "PATH")]
    database: PathBuf,
    /// Comma-separated tables that may be read; every other table is refused.
    #[arg(
        long,
        value_name = "T1,T2",
        value_delimiter = ',',
        required_unless_present = "init_demo"
    )]
    tables: Vec<String>,
    /// Serve MCP streamable HTTP on this loopback address (the broker passes `-backend ADDR`).
    #[arg(long, value_name = "ADDR", conflicts_with = "stdio")]
    backend: Option<SocketAddr>,
    /// Serve MCP on stdin/stdout instead.
    #[arg(long)]
    stdio: bool,
    /// Most rows returned by one read.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    max_rows: u32,
    /// Create a demo database at --database (users, orders, secrets) unless it exists, then exit.
    #[arg(long)]
    init_demo: bool,
}

fn main() -> ExitCode {
    // The broker's convention is a single-dash `-backend ADDR`.
    let argv = std::env::args_os().map(|a| {
        if a == "-backend" {
            "--backend".into()
        } else {
            a
        }
    });
    let args = Args::parse_from(argv);
    lever_tool_db::server::LOG_CALLS.store(true, std::sync::atomic::Ordering::Relaxed);
    if args.init_demo {
        return match db::init_demo(&args.database) {
            Ok(true) => {
                println!("created {}", args.database.display());
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("{} exists; left as it is", args.database.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    if let Some(t) = args
        .tables
        .iter()
        .find(|t| t.is_empty() || t.chars().any(char::is_control))
    {
        return fail(&format!("--tables: {t:?} is not a table name"));
    }
    let db = match Db::open(&args.database, args.tables.clone(), args.max_rows as usize) {
        Ok(d) => Arc::new(d),
        Err(e) => return fail(&e),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e.to_string()),
    };
    match (args.backend, args.stdio) {
        (Some(addr), _) => {
            if !addr.ip().is_loopback() {
                return fail(&format!(
                    "-backend {addr}: the tool listens on loopback only (the broker is its one client)"
                ));
            }
            rt.block_on(serve_http(addr, db))
        }
        (None, true) => rt.block_on(serve_stdio(db)),
        (None, false) => fail("say where to serve: -backend ADDR or --stdio"),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("lever-tool-db: {msg}");
    ExitCode::FAILURE
}
