//! `lever admin`: the client of the broker's loopback admin API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use http::Method;
use lever_broker::client::{self, Target};
use serde_json::json;

use crate::common::{fail, runtime};

#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Issue a one-time enrolment ticket for a configured agent
    Register {
        /// The agent's identity (a grove name, or the manager identity)
        identity: String,
    },
    /// Issue a one-time enrolment ticket for the manager
    Bootstrap,
    /// Revoke an identity (permanent: no mint, renew or enrolment) or a token
    /// (and every token delegated from it)
    #[command(group(clap::ArgGroup::new("what").required(true).args(["identity", "token_id"])))]
    Revoke {
        /// The identity to revoke
        #[arg(long)]
        identity: Option<String>,
        /// The token id (hex, as returned at mint) to revoke
        #[arg(long = "token-id", value_name = "HEX")]
        token_id: Option<String>,
    },
    /// Start a new epoch: every token of an older epoch is dead at once
    BumpEpoch,
    /// Print the current epoch
    Epoch,
}

pub(crate) const AFTER_HELP: &str = "\
The admin API listens on loopback only and is unauthenticated by design:
whoever can reach it on this host is the operator. The address comes from
--admin, else $LEVER_ADMIN_URL, else -c FILE's broker.admin_bind/admin_port,
else ./lever.yaml's when the current directory holds one (like every other
command, parent directories are never searched; an invalid ./lever.yaml is
an error, never a silent fallback), else http://127.0.0.1:8444. Every answer
is printed as JSON; state changes are durable when the command returns.";

/// Where the admin API is: `--admin`, `$LEVER_ADMIN_URL`, `-c FILE`,
/// `./lever.yaml` if the current directory holds one, the default port.
/// `--admin`: checked by clap, so a bad URL is a usage error (exit 2).
pub(crate) fn admin_arg(s: &str) -> Result<String, String> {
    match Target::parse(s) {
        Ok(t) if !t.https => Ok(s.to_owned()),
        Ok(_) => Err("the admin API is plain HTTP on loopback: use an http:// URL".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

fn admin_url(
    admin: Option<String>,
    env: Option<String>,
    config: Option<PathBuf>,
) -> Result<String, ExitCode> {
    if let Some(u) = admin.or(env) {
        return Ok(u);
    }
    let local = Path::new(lever_policy::config::CONFIG_FILE);
    // Present (even as a dangling symlink) means used: an admin call must
    // not reach another instance's broker because this one's config broke.
    let config = config.or_else(|| {
        local
            .symlink_metadata()
            .is_ok()
            .then(|| local.to_path_buf())
    });
    match config {
        Some(path) => crate::common::load_config(Some(path))
            .map(|c| format!("http://{}", c.broker.admin_addr())),
        None => Ok("http://127.0.0.1:8444".to_owned()),
    }
}

pub(crate) fn run(cmd: AdminCommand, admin: Option<String>, config: Option<PathBuf>) -> ExitCode {
    let url = match admin_url(admin, std::env::var("LEVER_ADMIN_URL").ok(), config) {
        Ok(u) => u,
        Err(code) => return code,
    };
    let target = match Target::parse(&url) {
        Ok(t) if !t.https => t,
        Ok(_) => return fail("the admin API is plain HTTP on loopback: use an http:// URL"),
        Err(e) => return fail(&e.to_string()),
    };
    let (method, path, body) = match &cmd {
        AdminCommand::Register { identity } => (
            Method::POST,
            "/register",
            Some(json!({"identity": identity})),
        ),
        AdminCommand::Bootstrap => (Method::POST, "/bootstrap", Some(json!({}))),
        AdminCommand::Revoke {
            identity: Some(i), ..
        } => (Method::POST, "/revoke", Some(json!({"identity": i}))),
        AdminCommand::Revoke {
            token_id: Some(t), ..
        } => (Method::POST, "/revoke", Some(json!({"token_id": t}))),
        AdminCommand::Revoke { .. } => return fail("give --identity or --token-id"),
        AdminCommand::BumpEpoch => (Method::POST, "/bump-epoch", Some(json!({}))),
        AdminCommand::Epoch => (Method::GET, "/epoch", None),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(client::send(
        &target,
        None,
        method,
        path,
        &[],
        body.as_ref(),
    )) {
        Ok(reply) if reply.status.is_success() => {
            crate::out::println(&reply.json().to_string());
            ExitCode::SUCCESS
        }
        Ok(reply) => fail(&format!("{}: {}", reply.status, reply.error_message())),
        Err(e) => fail(&format!("{e} (is `lever broker` running?)")),
    }
}
