//! `lever`: the operator CLI.
//!
//! Exit status: 0 success, 1 the command ran and found a problem (an
//! invalid config, a failed check), 2 a usage error.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin;
mod agent;
mod audit_cmd;
mod backends;
mod bringup;
mod broker_cmd;
mod common;
mod demo;
mod egress_cmd;
mod jail_cmd;
mod lima;
mod out;
mod qemu;
mod validate;

const QEMU_HELP: &str = "\
Runs the jail VM with QEMU in the foreground: KVM when the host has hardware
virtualization, otherwise software emulation (with a warning). The tree is
the one shared directory (virtio-9p, tag `lever`: mount it at /lever); the
broker is at 10.0.2.100:JAIL_PORT inside the guest. With `egress: closed`
the VM's network device is restricted (restrict=on): the guest reaches the
broker and nothing else. Start the broker first (`lever broker`).";

const AFTER_HELP: &str = "\
Lever reads lever.yaml from the current directory only (never from a parent
directory) unless -c FILE names one. Start with:

  lever demo                the whole broker flow, offline, in one command
  lever validate            check ./lever.yaml and the files it names
  lever broker              run the broker (CA, tokens, audit) in the foreground
  lever admin register NAME a one-time enrolment ticket for an agent
  lever backends            the containment backends this build implements
  lever plan                the jail's ordered bring-up (nothing is run)
  lever doctor              check the backend's tools, the broker, the live jail
  lever egress-rules --host-alias IP
                            the jail's egress rules (iptables-restore input)
  lever schema > lever.schema.json
                            the JSON Schema of lever.yaml, for your editor

Docs: docs/getting-started.md, docs/config-reference.md, docs/security-model.md,
docs/backends.md, docs/egress.md, docs/tools.md";

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
    /// Run the capability broker in the foreground (also a standalone gateway)
    #[command(after_help = broker_cmd::AFTER_HELP)]
    Broker {
        /// The config file (default: ./lever.yaml)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Drive the broker's loopback admin API: tickets, revocation, epochs
    #[command(after_help = admin::AFTER_HELP)]
    Admin {
        /// The admin API URL (default: $LEVER_ADMIN_URL, else from -c FILE, else from
        /// ./lever.yaml if present, else http://127.0.0.1:8444)
        #[arg(long, value_name = "URL", global = true, value_parser = admin::admin_arg)]
        admin: Option<String>,
        /// Take the admin address from this config file (default: ./lever.yaml if present)
        #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// The in-jail client side: enrol, renew, obtain tokens
    #[command(after_help = agent::AFTER_HELP)]
    Agent {
        /// Where the agent's key, certificate and pinned CA live
        #[arg(long, value_name = "DIR", global = true)]
        dir: Option<PathBuf>,
        #[command(subcommand)]
        command: agent::AgentCommand,
    },
    /// The whole broker flow, offline: enrol, stream an LLM call, a denial, the audit trail
    #[command(after_help = demo::AFTER_HELP)]
    Demo {
        /// Keep the temporary instance directory
        #[arg(long)]
        keep: bool,
    },
    /// An Anthropic-compatible mock upstream, for tests and the demo
    #[command(hide = true)]
    MockUpstream {
        /// Where to listen
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// Answer 401 unless x-api-key equals this file's contents
        #[arg(long, value_name = "FILE")]
        expect_key_file: Option<PathBuf>,
        /// Serve HTTPS (h2 and http/1.1) with this certificate chain (PEM)
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) for --tls-cert
        #[arg(long, value_name = "FILE")]
        tls_key: Option<PathBuf>,
    },
    /// Print the jail's egress ruleset (iptables-restore input), or apply it here
    #[command(name = "egress-rules", after_help = egress_cmd::AFTER_HELP)]
    EgressRules {
        /// The config file (default: ./lever.yaml)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// How the jail reaches the host (e.g. 192.168.5.2 for Lima); once per address family
        #[arg(long = "host-alias", value_name = "IP", required = true)]
        host_alias: Vec<std::net::IpAddr>,
        /// A DNS resolver the jail may query (`egress: open` only); repeatable
        #[arg(long, value_name = "IP")]
        dns: Vec<std::net::IpAddr>,
        /// Print the IPv6 (ip6tables-restore) ruleset instead of the IPv4 one
        #[arg(long, conflicts_with = "apply")]
        ipv6: bool,
        /// Apply both rulesets to this network namespace (needs root and iptables)
        #[arg(long)]
        apply: bool,
    },
    /// Print the jail's ordered bring-up plan (nothing is run)
    #[command(after_help = jail_cmd::PLAN_HELP)]
    Plan {
        /// The config file (default: ./lever.yaml)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Bring the jail up, step by step, skipping what is done (`--dry-run`: the plan)
    #[command(after_help = jail_cmd::APPLY_HELP)]
    Apply {
        /// The config file (default: ./lever.yaml)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the plan instead of running it
        #[arg(long)]
        dry_run: bool,
    },
    /// Bring the jail up (the same as `lever apply`)
    #[command(after_help = jail_cmd::APPLY_HELP)]
    Up {
        /// The config file (default: ./lever.yaml)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Stop and delete the jail's machine
    Down {
        /// The config file (default: ./lever.yaml)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// The machine to stop and delete (default: lever-NAME, from the config)
        #[arg(long, value_name = "NAME", value_parser = jail_cmd::parse_machine)]
        machine: Option<String>,
    },
    /// Check the host, the broker and the live jail for this config
    #[command(after_help = jail_cmd::DOCTOR_HELP)]
    Doctor {
        /// The config file (default: ./lever.yaml)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// The machine to check (default: lever-NAME, from the config)
        #[arg(long, value_name = "NAME", value_parser = jail_cmd::parse_machine)]
        machine: Option<String>,
    },
    /// Run this config's qemu jail in the foreground (what `lever up` will drive)
    #[command(name = "qemu", after_help = QEMU_HELP)]
    Qemu {
        /// The config file (default: ./lever.yaml)
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// The guest kernel
        #[arg(long, value_name = "FILE")]
        kernel: PathBuf,
        /// The guest initramfs
        #[arg(long, value_name = "FILE")]
        initrd: Option<PathBuf>,
        /// The kernel command line
        #[arg(long, default_value = "console=ttyS0 panic=-1")]
        append: String,
        /// Guest memory in MiB
        #[arg(long, default_value_t = 1024)]
        memory: u32,
        /// Guest CPUs
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Where the serial console is written (default: STATE_DIR/qemu-console.log)
        #[arg(long, value_name = "FILE")]
        console: Option<PathBuf>,
        /// Print the QEMU command line instead of running it
        #[arg(long)]
        dry_run: bool,
    },
    /// Relay stdin/stdout to a TCP address (QEMU's guestfwd runs it)
    #[command(hide = true)]
    Relay { to: std::net::SocketAddr },
    /// Check the audit trail's hash chain, or follow it
    Audit {
        /// Take the audit file from this config file
        #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: audit_cmd::AuditCommand,
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
        Command::Broker { config } => broker_cmd::run(config),
        Command::Admin {
            admin,
            config,
            command,
        } => admin::run(command, admin, config),
        Command::Agent { dir, command } => agent::run(command, dir),
        Command::Audit { config, command } => audit_cmd::run(command, config),
        Command::MockUpstream {
            listen,
            expect_key_file,
            tls_cert,
            tls_key,
        } => mock_upstream(listen, expect_key_file, tls_cert.zip(tls_key)),
        Command::Demo { keep } => demo::run(keep),
        Command::Relay { to } => qemu::relay(to),
        Command::Plan { config } => jail_cmd::run_plan(config),
        Command::Apply { config, dry_run } => {
            if dry_run {
                jail_cmd::run_plan(config)
            } else {
                jail_cmd::run_apply(config)
            }
        }
        Command::Up { config } => jail_cmd::run_apply(config),
        Command::Down { config, machine } => jail_cmd::run_down(config, machine),
        Command::Doctor { config, machine } => jail_cmd::run_doctor(config, machine),
        Command::Qemu {
            config,
            kernel,
            initrd,
            append,
            memory,
            cpus,
            console,
            dry_run,
        } => qemu::run(qemu::RunArgs {
            config,
            kernel,
            initrd,
            append,
            memory,
            cpus,
            console,
            dry_run,
        }),
        Command::EgressRules {
            config,
            host_alias,
            dns,
            ipv6,
            apply,
        } => egress_cmd::run(egress_cmd::Args {
            config,
            host_alias,
            dns,
            ipv6,
            apply,
        }),
    }
}

/// The config path: explicit, or `lever.yaml` in the current directory.
pub(crate) fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit.unwrap_or_else(|| PathBuf::from(lever_policy::config::CONFIG_FILE))
}

fn mock_upstream(
    listen: std::net::SocketAddr,
    expect_key_file: Option<PathBuf>,
    tls: Option<(PathBuf, PathBuf)>,
) -> ExitCode {
    let tls = match tls {
        None => None,
        Some((c, k)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))
            };
            match read(&c)
                .and_then(|c| read(&k).map(|k| (c, k)))
                .and_then(|(c, k)| lever_broker::mock_upstream::tls_config(&c, &k))
            {
                Ok(cfg) => Some(cfg),
                Err(e) => return common::fail(&e),
            }
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let key = match expect_key_file.map(std::fs::read_to_string).transpose() {
        Ok(k) => k.map(|k| k.trim().to_owned()),
        Err(e) => return common::fail(&format!("reading the key file: {e}")),
    };
    let rt = match common::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => return common::fail(&format!("cannot listen on {listen}: {e}")),
        };
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        out::println(&format!("lever mock-upstream ready: {scheme}://{addr}"));
        tokio::select! {
            _ = lever_broker::mock_upstream::serve_with(listener, key, tls) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        ExitCode::SUCCESS
    })
}
