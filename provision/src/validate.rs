//! `lever validate`: judge the config and the files it names.

use std::path::PathBuf;
use std::process::ExitCode;

use lever_policy::config::values::format_duration;
use lever_policy::config::{self, Config, Env, LlmAuth, Report, Severity, ToolTransport};

pub(crate) const AFTER_HELP: &str = "\
On success, prints a summary of the instance (exit 0); warnings go to stderr.
On failure, prints every problem found, one per line (exit 1):

  lever.yaml:12:9: broker.tools[0].allowed_values.tabel: unknown key `tabel` ...

It checks the config and the files it names (paths confined to the
instance root, symlinks, key files 0600 and yours, sizes). Whether programs,
images or backends are installed on this host is `lever doctor`'s business.";

pub(crate) fn run(config: Option<PathBuf>, json: bool) -> ExitCode {
    let path = crate::config_path(config);
    let env = Env::from_process();
    match config::load(&path, &env) {
        Ok(loaded) => {
            if json {
                print_json(&loaded.report, Some(&loaded.config));
            } else {
                for w in loaded.report.warnings() {
                    eprintln!("{}", loaded.report.line(w));
                }
                crate::out::print(&summary(&loaded.config, &loaded.report.file));
            }
            ExitCode::SUCCESS
        }
        Err(report) => {
            if json {
                print_json(&report, None);
            } else {
                eprint!("{report}");
            }
            ExitCode::FAILURE
        }
    }
}

fn print_json(report: &Report, config: Option<&Config>) {
    let problems: Vec<serde_json::Value> = report
        .problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "file": report.file,
                "line": p.line,
                "col": p.col,
                "path": p.path,
                "severity": match p.severity { Severity::Error => "error", Severity::Warning => "warning" },
                "message": p.message,
            })
        })
        .collect();
    let out = serde_json::json!({
        "file": report.file,
        "valid": config.is_some(),
        "problems": problems,
        "instance": config.map(|c| c.name.to_string()),
    });
    crate::out::println(&out.to_string());
}

fn summary(c: &Config, file: &str) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("  {k:<10} {v}\n"));
    let auth = match c.llm_auth {
        LlmAuth::ApiKey => format!(
            "api-key (the broker injects the key from {})",
            c.broker
                .api_key_file
                .as_ref()
                .map_or_else(|| "?".to_owned(), |p| p.display().to_string())
        ),
        LlmAuth::Subscription => {
            "subscription (the OAuth token is projected into the agents)".to_owned()
        }
    };
    line(
        "instance",
        format!("{} (jail machine {})", c.name, c.machine_name()),
    );
    line("backend", c.backend.to_string());
    line("tree", format!("{} (mounted at /lever)", c.tree.display()));
    line(
        "egress",
        match c.egress {
            config::Egress::Open => {
                "open (LAN and other host ports dropped; internet reachable)".to_owned()
            }
            config::Egress::Closed => "closed (the broker port only)".to_owned(),
        },
    );
    line("llm_auth", auth);
    let groves: Vec<String> = c
        .groves
        .iter()
        .map(|g| format!("{} ({})", g.agent.identity, g.dir_rel.display()))
        .collect();
    line(
        "agents",
        format!(
            "manager `{}`; groves: {}",
            c.manager.agent.identity,
            if groves.is_empty() {
                "none".to_owned()
            } else {
                groves.join(", ")
            }
        ),
    );
    for t in &c.broker.tools {
        let how = match &t.transport {
            ToolTransport::Http { backend, .. } => format!("http {backend}"),
            ToolTransport::Stdio { .. } => "stdio".to_owned(),
        };
        let ops: Vec<&str> = t.operations.iter().map(|o| o.name.as_str()).collect();
        let pins: Vec<String> = t
            .allowed_values
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k} in {{{}}}",
                    v.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        line(
            "tool",
            format!(
                "{} ({how}; ops {}{})",
                t.name,
                ops.join(", "),
                if pins.is_empty() {
                    String::new()
                } else {
                    format!("; pinned {}", pins.join(", "))
                }
            ),
        );
    }
    line(
        "broker",
        format!(
            "jail {} (mTLS), admin {} (loopback), upstream {}, grant_ttl {}",
            c.broker.jail_addr(),
            c.broker.admin_addr(),
            c.broker.upstream,
            format_duration(c.broker.grant_ttl)
        ),
    );
    line("state", c.broker.state_dir.display().to_string());
    if !c.manager.allow_ports.is_empty() {
        let ports: Vec<String> = c.manager.allow_ports.iter().map(u16::to_string).collect();
        let ignored = if c.egress == config::Egress::Closed {
            " (ignored: egress is closed)"
        } else {
            ""
        };
        line("allow", format!("host ports {}{ignored}", ports.join(", ")));
    }
    format!("{file}: valid\n{s}")
}
