//! `lever plan` (= `lever apply --dry-run`), `lever apply` / `up` / `down`
//! (run by `bringup.rs`) and `lever doctor`.
//!
//! The plan is the ordered bring-up of this config's jail, with the
//! commands for its backend. `lever doctor` checks the config, the
//! backend's tools and version floors, the broker's health, for Lima that
//! the live machine realized exactly the Lever template, and inside a lima
//! or orbstack jail that the egress chain is in place and the admin port
//! refused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use lever_policy::backend::Backend;
use lever_policy::config::{Config, Egress, Scion};

use crate::common::load_config;
use crate::{lima, qemu};

pub(crate) const PLAN_HELP: &str = "\
Prints the ordered bring-up of this config's jail: machine up, egress, broker
up, guest packages, Scion, each distinct image once, the manager's bootstrap
staged into the tree, the manager started. Nothing is run. For lima the
rendered template is printed in full.

`lever apply` runs it (lima, orbstack); `lever qemu` runs a qemu jail.";

pub(crate) const APPLY_HELP: &str = "\
Runs the bring-up for a lima or orbstack jail, step by step with progress:
machine up (for lima: the Lever template, Lima >= 2.0.0, and the realized
config read back and checked, or bring-up stops), egress rules loaded and
hooked (for orbstack, host.orb.internal is resolved in the machine first;
no address stops bring-up), the broker started in the background (log:
STATE_DIR/broker.log), guest packages, each distinct image pulled once, the
manager's bootstrap (ticket, CA, broker URL) staged into TREE/.lever/bootstrap
without following symlinks, and for `egress: closed` the seal (the broker
port only). Every step is checked first and skipped when done: a second
apply changes nothing but reloading the egress rules, which never opens the
jail.

Not automated in this build: installing Scion and starting the manager (the
plan shows them). The qemu backend is run with `lever qemu`.";

pub(crate) const DOCTOR_HELP: &str = "\
Checks the host for this config: the backend's tools and their version
floors, the broker's health on the admin port, and, for lima, that the live
machine lever-NAME (or --machine NAME) realized exactly the Lever template
(one writable mount at /lever, the ignore-all port-forward rules, containerd
off); inside a lima or orbstack jail, that Lever's egress chain is loaded and
hooked (both families) and that the admin port is refused from inside. Exit 0
when no check failed, 1 otherwise.";

/// One step of the bring-up.
struct Step {
    title: &'static str,
    lines: Vec<String>,
}

fn machine(config: &Config) -> String {
    config.machine_name()
}

/// `--machine NAME` of `lever down`/`doctor`: a machine name for `limactl`
/// or `orb` argv (never a shell), so nothing that could read as an option.
pub(crate) fn parse_machine(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || (i > 0 && (b == b'-' || b == b'_' || b == b'.'))
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err("a machine name is ASCII letters, digits, '-', '_' and '.', starting with a letter or digit, at most 128".to_owned())
    }
}

fn tree(config: &Config) -> PathBuf {
    config.root.join(&config.tree)
}

fn plan(config: &Config, file: &Path) -> Vec<Step> {
    let m = machine(config);
    let cfg = file.display();
    let state = config.broker.state_dir.display();
    let jail_port = config.broker.jail_port;
    let mut steps = Vec::new();

    let (up, exec): (Vec<String>, String) = match config.backend {
        Backend::Lima => (
            vec![
                format!("write {state}/lima/{m}.yaml (the template below)"),
                format!("limactl --version  (2.0.0 or later)"),
                format!("limactl create --name {m} {state}/lima/{m}.yaml  (unless it exists)"),
                format!("limactl start {m}"),
                format!(
                    "limactl list --json {m}: one writable mount of {} at /lever, the ignore-all port forwards, containerd off; anything else stops bring-up",
                    tree(config).display()
                ),
            ],
            format!("limactl shell {m} sudo"),
        ),
        Backend::Orbstack => (
            vec![
                format!("orb create --isolated ubuntu:noble {m}  (unless it exists)"),
                format!(
                    "share {} as the machine's one folder, at /lever",
                    tree(config).display()
                ),
            ],
            format!("orb -m {m} -u root"),
        ),
        Backend::Qemu => (
            vec![format!(
                "lever qemu -c {cfg} --kernel KERNEL --initrd INITRD  (KVM if available, else software emulation; one 9p share of {} at /lever{})",
                tree(config).display(),
                if config.egress == Egress::Closed {
                    "; network device restrict=on: the broker only"
                } else {
                    ""
                }
            )],
            "(a shell in the guest)".to_owned(),
        ),
        _ => (
            vec!["(no bring-up known for this backend)".into()],
            String::new(),
        ),
    };
    steps.push(Step {
        title: "machine up",
        lines: up,
    });

    let egress = match (config.backend, config.egress) {
        (Backend::Qemu, Egress::Closed) => {
            vec!["enforced by QEMU itself (restrict=on): no guest rules needed".to_owned()]
        }
        (backend, _) => {
            let (v4, v6) = match backend {
                Backend::Lima => ("192.168.5.2", ""),
                Backend::Qemu => (qemu::BROKER_ALIAS, ""),
                _ => ("$HOST_V4", " --host-alias $HOST_V6"),
            };
            let dns: String = crate::bringup::resolvers(backend)
                .iter()
                .map(|d| format!(" --dns {d}"))
                .collect();
            let mut lines = Vec::new();
            if backend == Backend::Orbstack {
                lines.push(format!(
                    "{exec} getent ahostsv4 host.orb.internal. -> HOST_V4, and getent ahostsv6 -> HOST_V6 if it has one (IPv4-mapped answers skipped); looked up on every load: no IPv4 address stops bring-up, never a jail without rules"
                ));
            }
            if config.egress == Egress::Closed {
                lines.push("until the seal (the last step), the open rules: packages and images need the network; LAN and host ports are refused from the start".to_owned());
            }
            // What `lever egress-rules` prints is self-contained (it jumps
            // from OUTPUT itself); loaded next to the guest's own rules with
            // --noflush, Lever's chain goes alone and the hook once.
            lines.extend([
                format!(
                    "lever egress-rules -c {cfg} --host-alias {v4}{v6}{dns} | grep -v '^-A OUTPUT ' | {exec} iptables-restore -w --noflush"
                ),
                format!(
                    "lever egress-rules -c {cfg} --host-alias {v4}{v6}{dns} --ipv6 | grep -v '^-A OUTPUT ' | {exec} ip6tables-restore -w --noflush"
                ),
                format!(
                    "{exec} iptables -w -C OUTPUT -j LEVER-EGRESS || {exec} iptables -w -I OUTPUT 1 -j LEVER-EGRESS  (and ip6tables)"
                ),
            ]);
            lines
        }
    };
    steps.push(Step {
        title: "egress",
        lines: egress,
    });
    steps.push(Step {
        title: "broker up",
        lines: vec![
            format!("lever broker -c {cfg}  (host side; state {state})"),
            format!("wait for http://{}/healthz", config.broker.admin_addr()),
        ],
    });
    steps.push(Step {
        title: "guest packages",
        lines: vec![format!(
            "{exec} apt-get install -y iptables podman ca-certificates"
        )],
    });
    steps.push(Step {
        title: "scion",
        lines: vec![match &config.scion {
            Some(Scion::Version(v)) => format!("fetch Scion {v} and build it into the jail"),
            Some(Scion::Source(p)) => {
                format!("build Scion from {} into the jail", p.display())
            }
            None => "no scion in the config: skipped".to_owned(),
        }],
    });
    let images: BTreeSet<String> = std::iter::once(&config.manager.agent)
        .chain(config.groves.iter().map(|g| &g.agent))
        .filter_map(|a| a.image.as_ref().map(|i| i.reference.clone()))
        .collect();
    steps.push(Step {
        title: "images",
        lines: images
            .iter()
            .map(|i| format!("{exec} podman pull {i}  (once)"))
            .collect(),
    });
    steps.push(Step {
        title: "manager bootstrap",
        lines: vec![
            format!(
                "POST http://{}/bootstrap: a one-time ticket for {}",
                config.broker.admin_addr(),
                config.broker.manager_identity
            ),
            format!(
                "stage ticket, CA and broker URL (port {jail_port}) into {}/.lever/bootstrap, 0600, refusing any symlink on the way",
                tree(config).display()
            ),
        ],
    });
    if config.egress == Egress::Closed && config.backend != Backend::Qemu {
        steps.push(Step {
            title: "egress seal",
            lines: vec![format!(
                "the closed rules, loaded as above: the broker's port {jail_port} only (allow_ports do not apply to a closed jail); a sealed jail is never unsealed by a later apply"
            )],
        });
    }
    steps.push(Step {
        title: "manager started",
        lines: vec![format!(
            "{exec} podman run {} with the bootstrap and `lever agent gateway` on 127.0.0.1:8462",
            config
                .manager
                .agent
                .image
                .as_ref()
                .map_or("<image>", |i| i.reference.as_str())
        )],
    });
    steps
}

pub(crate) fn run_plan(config_path: Option<PathBuf>) -> ExitCode {
    let file = crate::config_path(config_path.clone());
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "bring-up of `{}` on {} (nothing is run; `lever apply` runs it)",
        config.name,
        config.backend.name()
    );
    for (i, s) in plan(&config, &file).iter().enumerate() {
        println!("\n{}. {}", i + 1, s.title);
        for l in &s.lines {
            println!("   {l}");
        }
    }
    if config.backend == Backend::Lima {
        let host = if cfg!(target_os = "macos") {
            lima::Host::MacOs
        } else {
            lima::Host::Linux
        };
        println!("\nthe Lima template:\n");
        print!(
            "{}",
            lima::template(config.name.as_ref(), &tree(&config), host)
        );
    }
    ExitCode::SUCCESS
}

pub(crate) fn run_apply(config_path: Option<PathBuf>) -> ExitCode {
    let file = crate::config_path(config_path.clone());
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.backend == Backend::Lima {
        match output("limactl", &["--version"]).and_then(|v| lima::check_version(&v)) {
            Ok(_) => {}
            Err(e) => return crate::common::fail(&e),
        }
    }
    let host = if cfg!(target_os = "macos") {
        lima::Host::MacOs
    } else {
        lima::Host::Linux
    };
    let mut env = crate::bringup::System {
        config_file: file,
        admin: format!("http://{}", config.broker.admin_addr()),
        state_dir: config.broker.state_dir.clone(),
    };
    let lima_file = config
        .broker
        .state_dir
        .join("lima")
        .join(format!("{}.yaml", machine(&config)));
    match crate::bringup::apply(&config, &lima_file, host, &mut env, &mut |l| {
        println!("{l}")
    }) {
        Ok(s) => {
            println!(
                "\n{}: {} step(s) run, {} already done. Not automated in this build: Scion, starting the manager (see `lever plan`).",
                machine(&config),
                s.ran.len(),
                s.already.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => crate::common::fail(&e),
    }
}

pub(crate) fn run_down(config_path: Option<PathBuf>, machine_override: Option<String>) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let machine = machine_override.unwrap_or_else(|| machine(&config));
    let mut env = crate::bringup::System {
        config_file: PathBuf::new(),
        admin: String::new(),
        state_dir: config.broker.state_dir.clone(),
    };
    match crate::bringup::down(&config, &machine, &mut env) {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => crate::common::fail(&e),
    }
}

#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn ok(&self, what: &str) {
        println!("ok    {what}");
    }
    fn warn(&self, what: &str) {
        println!("warn  {what}");
    }
    fn fail(&mut self, what: &str) {
        self.failed += 1;
        println!("FAIL  {what}");
    }
}

fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub(crate) fn run_doctor(
    config_path: Option<PathBuf>,
    machine_override: Option<String>,
) -> ExitCode {
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let overridden = machine_override.is_some();
    let machine = machine_override.unwrap_or_else(|| machine(&config));
    let mut r = Report::default();
    r.ok(&format!(
        "config: `{}` on {}",
        config.name,
        config.backend.name()
    ));
    match config.backend {
        Backend::Lima => match output("limactl", &["--version"]) {
            Ok(v) => match lima::check_version(&v) {
                Ok((a, b, c)) => r.ok(&format!("limactl {a}.{b}.{c}")),
                Err(e) => r.fail(&e),
            },
            Err(e) => r.fail(&format!("limactl not usable: {e}")),
        },
        Backend::Orbstack => match output("orb", &["version"]) {
            Ok(v) => r.ok(&format!("orb {}", v.trim())),
            Err(e) => r.fail(&format!("orb not usable: {e}")),
        },
        Backend::Qemu => {
            match output("qemu-system-x86_64", &["--version"]) {
                Ok(v) => r.ok(v.lines().next().unwrap_or("qemu")),
                Err(e) => r.fail(&format!("qemu-system-x86_64 not usable: {e}")),
            }
            if qemu::Accel::detect() == qemu::Accel::Kvm {
                r.ok("KVM available");
            } else {
                r.warn("no hardware virtualization: the qemu jail runs under software emulation (slow)");
            }
        }
        _ => r.fail("no checks known for this backend"),
    }
    if overridden && config.backend == Backend::Qemu {
        r.warn("--machine is not used with the qemu backend (the VM is `lever qemu`'s)");
    }
    let health = format!("http://{}/healthz", config.broker.admin_addr());
    let healthy = crate::common::runtime().is_ok_and(|rt| {
        rt.block_on(async {
            let Ok(t) = lever_broker::client::Target::parse(&format!(
                "http://{}",
                config.broker.admin_addr()
            )) else {
                return false;
            };
            lever_broker::client::send(&t, None, http::Method::GET, "/healthz", &[], None)
                .await
                .is_ok_and(|r| r.status == 200)
        })
    });
    if healthy {
        r.ok(&format!("broker answers {health}"));
    } else {
        r.fail(&format!(
            "broker not answering {health} (start it: lever broker)"
        ));
    }
    if config.backend == Backend::Lima
        && let Ok(listed) = output("limactl", &["list", "--json", &machine])
    {
        match serde_json::from_str::<serde_json::Value>(listed.trim()) {
            Ok(v) if v.is_object() => match lima::verify_realized(&v, &tree(&config)) {
                Ok(()) => r.ok(&format!("{machine} realized the Lever template")),
                Err(wrong) => {
                    for w in wrong {
                        r.fail(&format!("{machine}: {w}"));
                    }
                }
            },
            _ => r.warn(&format!("{machine} is not created yet")),
        }
    }
    if matches!(config.backend, Backend::Lima | Backend::Orbstack) {
        let mut env = crate::bringup::System {
            config_file: PathBuf::new(),
            admin: String::new(),
            state_dir: config.broker.state_dir.clone(),
        };
        match crate::bringup::live_checks(&config, &machine, &mut env) {
            Ok(checks) => {
                for (what, ok) in checks {
                    if ok { r.ok(&what) } else { r.fail(&what) }
                }
            }
            Err(e) => r.warn(&format!("the live jail was not checked: {e}")),
        }
    }
    if r.failed == 0 {
        ExitCode::SUCCESS
    } else {
        println!("\n{} check(s) failed", r.failed);
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(backend: &str, egress: &str) -> (Config, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "lever-plan-{}-{backend}-{egress}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let c = crate::common::test_config(
            &dir,
            &format!(
                "name: demo\nbackend: {backend}\ntree: ws\negress: {egress}\nscion: {{version: 666333f9}}\nmanager: {{image: 'img/a:1'}}\ngroves:\n  - {{name: g1, dir: g1}}\n  - {{name: g2, dir: g2, image: 'img/b:2'}}\nbroker: {{api_key_file: key}}\n"
            ),
        );
        (c, dir)
    }

    #[test]
    fn the_plan_is_ordered_and_loads_each_image_once() {
        let (c, dir) = config("lima", "open");
        let p = plan(&c, &dir.join("lever.yaml"));
        let titles: Vec<&str> = p.iter().map(|s| s.title).collect();
        assert_eq!(
            titles,
            [
                "machine up",
                "egress",
                "broker up",
                "guest packages",
                "scion",
                "images",
                "manager bootstrap",
                "manager started"
            ]
        );
        let images = &p[5].lines;
        assert_eq!(images.len(), 2, "{images:?}");
        assert!(images[0].contains("img/a:1") && images[1].contains("img/b:2"));
        assert!(p[1].lines[0].contains("--host-alias 192.168.5.2 --dns 192.168.5.3"));
        assert!(
            p[0].lines
                .iter()
                .any(|l| l.starts_with("limactl list --json lever-demo"))
        );
    }

    #[test]
    fn a_machine_override_is_a_name_never_an_option() {
        for ok in ["lever-demo", "old.jail_2", "A1"] {
            assert_eq!(parse_machine(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "",
            "-rf",
            "--all",
            "a b",
            "a/b",
            "a;b",
            "$(id)",
            &"a".repeat(129),
        ] {
            assert!(parse_machine(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_orbstack_plan_resolves_the_host_alias_and_seals() {
        let (c, dir) = config("orbstack", "closed");
        let p = plan(&c, &dir.join("lever.yaml"));
        let titles: Vec<&str> = p.iter().map(|s| s.title).collect();
        assert_eq!(titles[1], "egress");
        assert!(titles.contains(&"egress seal"), "{titles:?}");
        let egress = &p[1].lines;
        assert!(
            egress[0].starts_with("orb -m lever-demo -u root getent ahostsv4 host.orb.internal."),
            "{egress:?}"
        );
        assert!(!egress.iter().any(|l| l.contains("not run")), "{egress:?}");
        assert!(
            egress.iter().any(|l| l.contains(
                "--host-alias $HOST_V4 --host-alias $HOST_V6 --dns 0.250.250.200 --dns 198.19.248.200 --ipv6 | grep -v '^-A OUTPUT ' | orb -m lever-demo -u root ip6tables-restore -w --noflush"
            )),
            "{egress:?}"
        );
        let seal = &p.iter().find(|s| s.title == "egress seal").unwrap().lines;
        assert!(seal[0].contains("port 8443 only"), "{seal:?}");
    }

    #[test]
    fn a_closed_qemu_jail_is_fenced_by_qemu_not_guest_rules() {
        let (c, dir) = config("qemu", "closed");
        let p = plan(&c, &dir.join("lever.yaml"));
        assert!(p[0].lines[0].contains("restrict=on"));
        assert_eq!(p[1].lines.len(), 1);
        assert!(p[1].lines[0].contains("restrict=on"));
        let (c, dir) = config("qemu", "open");
        let p = plan(&c, &dir.join("lever.yaml"));
        assert!(p[1].lines[0].contains("--host-alias 10.0.2.100 --dns 10.0.2.3"));
    }
}
