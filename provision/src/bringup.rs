//! Running the bring-up: `lever apply` / `lever up` / `lever down` for the
//! backends driven by a VM manager (`lima`, `orbstack`).
//!
//! Every step has a check that says whether it is already done; a done step
//! is not run again, so applying twice changes nothing. Commands go through
//! an [`Env`], with the host-side work, so the whole
//! sequence is tested with recording fakes.

use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use lever_policy::backend::Backend;
use lever_policy::config::{Config, Egress};
use lever_policy::egress::{self, Family, Spec};

use crate::lima;

/// A command: its argv and what goes to its stdin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Cmd {
    pub argv: Vec<String>,
    pub stdin: Option<String>,
}

fn cmd(argv: &[&str]) -> Cmd {
    Cmd {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        stdin: None,
    }
}

/// A command's outcome.
#[derive(Clone, Debug, Default)]
pub(crate) struct Out {
    pub ok: bool,
    pub stdout: String,
}

/// Where the bring-up acts: commands, and the host-side work that is not
/// a command.
pub(crate) trait Env {
    /// `Err` only when the command could not be run at all.
    fn run(&mut self, c: &Cmd) -> Result<Out, String>;
    fn write_file(&mut self, path: &Path, text: &str) -> Result<(), String>;
    fn broker_healthy(&mut self) -> bool;
    fn start_broker(&mut self) -> Result<(), String>;
    /// A one-time bootstrap ticket for the manager and the CA PEM.
    fn bootstrap(&mut self) -> Result<(String, String), String>;
}

/// The real world: commands run here, the broker started in the
/// background, the bootstrap ticket taken from the admin API.
pub(crate) struct System {
    pub config_file: PathBuf,
    pub admin: String,
    pub state_dir: PathBuf,
}

impl System {
    /// The started broker's log: the state dir 0700 and the log 0600, as
    /// the broker requires of the dir it is about to open (and it accepts
    /// this log in a fresh one).
    fn broker_log(&self) -> Result<(PathBuf, std::fs::File), String> {
        let log = self.state_dir.join(lever_broker::state::BROKER_LOG);
        let f = crate::common::private_file(&log, true)?;
        Ok((log, f))
    }
}

impl Env for System {
    fn run(&mut self, c: &Cmd) -> Result<Out, String> {
        use std::io::Write;
        let Some((program, args)) = c.argv.split_first() else {
            return Err("empty command".into());
        };
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(if c.stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{program}: {e}"))?;
        if let (Some(text), Some(mut pipe)) = (&c.stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| format!("{program}: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{program}: {e}"))?;
        Ok(Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        })
    }

    /// Machine definitions go under the state dir: 0600, their directories
    /// (the state dir too, if the broker has not made it yet) 0700.
    fn write_file(&mut self, path: &Path, text: &str) -> Result<(), String> {
        let mut f = crate::common::private_file(path, false)?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    fn broker_healthy(&mut self) -> bool {
        let Ok(t) = lever_broker::client::Target::parse(&self.admin) else {
            return false;
        };
        crate::common::runtime().is_ok_and(|rt| {
            rt.block_on(async {
                lever_broker::client::send(&t, None, http::Method::GET, "/healthz", &[], None)
                    .await
                    .is_ok_and(|r| r.status == 200)
            })
        })
    }

    fn start_broker(&mut self) -> Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let (log, out) = self.broker_log()?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        std::process::Command::new(exe)
            .arg("broker")
            .arg("-c")
            .arg(&self.config_file)
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting the broker: {e}"))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if self.broker_healthy() {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(format!("the broker did not come up; see {}", log.display()))
    }

    fn bootstrap(&mut self) -> Result<(String, String), String> {
        let t = lever_broker::client::Target::parse(&self.admin).map_err(|e| e.to_string())?;
        let rt = crate::common::runtime().map_err(|_| "no runtime".to_owned())?;
        let r = rt
            .block_on(lever_broker::client::send(
                &t,
                None,
                http::Method::POST,
                "/bootstrap",
                &[],
                Some(&serde_json::json!({})),
            ))
            .map_err(|e| e.to_string())?;
        let v = r.json();
        match (v["ticket"].as_str(), v["ca"].as_str()) {
            (Some(t), Some(c)) => {
                same_ca(c, &self.state_dir)?;
                Ok((t.to_owned(), c.to_owned()))
            }
            _ => Err(format!("/bootstrap: {}", r.error_message())),
        }
    }
}

/// The CA an admin API answered with must be this instance's own (the
/// state dir's `ca.crt`): whatever else answers on the admin port (another
/// local process that bound it first) must never have its CA pinned by the
/// manager.
fn same_ca(answered: &str, state_dir: &Path) -> Result<(), String> {
    let path = state_dir.join("ca.crt");
    let ours = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "{}: {e} (the broker answering on the admin port keeps no state here: is another process holding that port?)",
            path.display()
        )
    })?;
    if ours.trim() == answered.trim() {
        Ok(())
    } else {
        Err(format!(
            "the admin port answered with a CA that is not {}: another process holds that port; bring-up stops and nothing is staged",
            path.display()
        ))
    }
}

/// How a step knows it is done already.
enum Check {
    /// The command succeeds and prints this.
    Prints(Cmd, &'static str),
    /// The command succeeds.
    Succeeds(Cmd),
    BrokerHealthy,
    /// This file exists in the tree's bootstrap directory.
    Staged(PathBuf),
    /// The command succeeds and the last rule it prints is this one.
    LastRule(Cmd, String),
}

enum Work {
    Run(Vec<Cmd>),
    /// Write the machine definition, then run.
    WriteThenRun(PathBuf, String, Vec<Cmd>),
    StartBroker,
    StageBootstrap {
        dir: PathBuf,
        broker_url: String,
    },
    /// Load the egress rules of this posture in the machine, the host
    /// alias's address found first (see [`host_aliases`]).
    LoadEgress(Egress),
}

struct Action {
    title: String,
    check: Option<Check>,
    work: Work,
}

/// Where the egress rules find the host alias's address.
enum HostAlias {
    /// The backend fixes it (Lima's `host.lima.internal` is 192.168.5.2).
    Fixed(&'static str),
    /// Resolved inside the machine at apply time, by name (OrbStack's
    /// `host.orb.internal`, whose address this build does not know in
    /// advance).
    Resolved,
}

/// The pieces of one backend the steps are made of.
struct Machine {
    name: String,
    /// Runs a command as root in the guest.
    exec: Vec<String>,
    host_alias: HostAlias,
    host_alias_name: &'static str,
    /// The backend's DNS resolvers, which an open jail may query.
    dns: &'static [&'static str],
}

/// The DNS resolvers an open jail on `backend` may query: what the
/// backend's network answers DNS on.
pub(crate) fn resolvers(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Lima => &["192.168.5.3"],
        // OrbStack's resolver: 0.250.250.200 in 2.x, 198.19.248.200 in
        // 1.x. Both lie in ranges an open jail is refused (0/8, 198.18/15).
        Backend::Orbstack => &["0.250.250.200", "198.19.248.200"],
        // QEMU's user-mode network.
        Backend::Qemu => &["10.0.2.3"],
        _ => &[],
    }
}

fn machine(config: &Config) -> Result<Machine, String> {
    machine_named(config, &config.machine_name())
}

/// The machine `name` (`lever down`/`doctor --machine`) on the config's
/// backend.
fn machine_named(config: &Config, name: &str) -> Result<Machine, String> {
    let name = name.to_owned();
    match config.backend {
        Backend::Lima => Ok(Machine {
            exec: vec![
                "limactl".into(),
                "shell".into(),
                name.clone(),
                "sudo".into(),
            ],
            name,
            host_alias: HostAlias::Fixed("192.168.5.2"),
            host_alias_name: "host.lima.internal",
            dns: resolvers(Backend::Lima),
        }),
        Backend::Orbstack => Ok(Machine {
            exec: vec![
                "orb".into(),
                "-m".into(),
                name.clone(),
                "-u".into(),
                "root".into(),
            ],
            name,
            host_alias: HostAlias::Resolved,
            host_alias_name: "host.orb.internal",
            dns: resolvers(Backend::Orbstack),
        }),
        Backend::Qemu => Err(
            "the qemu backend is brought up with `lever qemu` in this build (see `lever plan`)"
                .into(),
        ),
        _ => Err("no bring-up is known for this backend".into()),
    }
}

fn in_guest(m: &Machine, argv: &[&str]) -> Cmd {
    let mut a = m.exec.clone();
    a.extend(argv.iter().map(|s| (*s).to_owned()));
    Cmd {
        argv: a,
        stdin: None,
    }
}

/// The host alias's addresses, at most one per family. A fixed one is
/// taken as is; a resolved one is looked up inside the machine with
/// `getent` through the machine's exec path. No IPv4 address is an error:
/// without it the rules cannot name the broker, and loading none would
/// leave the host's loopback services (the admin API) reachable. IPv6 is
/// optional (`ahostsv6` answers IPv4-mapped addresses when the name has no
/// IPv6 one; those are not IPv6 and are skipped).
fn host_aliases(m: &Machine, r: &mut dyn Env) -> Result<Vec<IpAddr>, String> {
    match m.host_alias {
        HostAlias::Fixed(a) => a
            .parse()
            .map(|ip| vec![ip])
            .map_err(|e| format!("host alias {a}: {e}")),
        HostAlias::Resolved => {
            // Fully qualified: no search domain can answer for it.
            let fqdn = format!("{}.", m.host_alias_name);
            let name = fqdn.as_str();
            let lookup = |r: &mut dyn Env, db: &str| -> Result<Vec<IpAddr>, String> {
                let o = r.run(&in_guest(m, &["getent", db, name]))?;
                Ok(if o.ok {
                    o.stdout
                        .lines()
                        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
                        .filter(|ip: &IpAddr| !ip.is_unspecified() && !ip.is_loopback())
                        .collect()
                } else {
                    Vec::new()
                })
            };
            let v4 = lookup(r, "ahostsv4")?.into_iter().find(IpAddr::is_ipv4);
            let Some(v4) = v4 else {
                return Err(format!(
                    "egress: `{}` found no IPv4 address for {name} inside {}: the egress rules cannot be loaded without it, so bring-up stops here (the jail is not left running without them)",
                    in_guest(m, &["getent", "ahostsv4", name]).argv.join(" "),
                    m.name
                ));
            };
            let v6 = lookup(r, "ahostsv6")?.into_iter().find(|ip| match ip {
                IpAddr::V6(a) => a.to_ipv4_mapped().is_none(),
                IpAddr::V4(_) => false,
            });
            Ok(std::iter::once(v4).chain(v6).collect())
        }
    }
}

/// The commands that load the rules of `posture` in the machine, per
/// family: Lever's chain alone, replaced in one `--noflush` transaction,
/// then the `OUTPUT` jump unless it is there (so a reload adds none).
fn egress_loads(config: &Config, m: &Machine, hosts: &[IpAddr], posture: Egress) -> Vec<Cmd> {
    let mut cmds = Vec::new();
    for family in [Family::V4, Family::V6] {
        let spec = Spec {
            posture,
            host: hosts
                .iter()
                .copied()
                .find(|h| h.is_ipv4() == (family == Family::V4)),
            jail_port: config.broker.jail_port,
            allow_ports: config.manager.allow_ports.clone(),
            dns: m
                .dns
                .iter()
                .filter_map(|d| d.parse().ok())
                .filter(|_| posture == Egress::Open)
                .collect(),
        };
        let mut c = in_guest(m, &[family.restore(), "-w", "--noflush"]);
        c.stdin = Some(egress::ruleset(family, &spec));
        cmds.push(c);
        let t = family.tables();
        cmds.push(in_guest(
            m,
            &[
                "sh",
                "-c",
                &format!(
                    "{t} -w -C OUTPUT -j {c} 2>/dev/null || {t} -w -I OUTPUT 1 -j {c}",
                    c = egress::CHAIN
                ),
            ],
        ));
    }
    cmds
}

fn actions(config: &Config, lima_file: &Path, host: lima::Host) -> Result<Vec<Action>, String> {
    let m = machine(config)?;
    let tree = config.root.join(&config.tree);
    let mut v = Vec::new();
    match config.backend {
        Backend::Lima => v.push(Action {
            title: "machine up".into(),
            check: Some(Check::Prints(
                cmd(&["limactl", "list", &m.name, "--format", "{{.Status}}"]),
                "Running",
            )),
            work: Work::WriteThenRun(
                lima_file.to_path_buf(),
                lima::template(config.name.as_ref(), &tree, host),
                vec![
                    // Created once: a stopped machine is only started.
                    cmd(&[
                        "sh",
                        "-c",
                        "limactl list -q | grep -qxF \"$1\" || limactl create --tty=false --name \"$1\" \"$2\"",
                        "sh",
                        &m.name,
                        &lima_file.display().to_string(),
                    ]),
                    cmd(&["limactl", "start", "--tty=false", &m.name]),
                ],
            ),
        }),
        _ => v.push(Action {
            title: "machine up".into(),
            check: Some(Check::Succeeds(cmd(&["orb", "-m", &m.name, "true"]))),
            work: Work::Run(vec![cmd(&[
                "orb",
                "create",
                "--isolated",
                "ubuntu:noble",
                &m.name,
            ])]),
        }),
    }
    // Egress. The rules of the config's posture are loaded on every apply
    // (a reload swaps the chain in one transaction and never opens the
    // jail). A closed jail still needs the network once, for its packages
    // and images: until it is sealed it runs the open rules (LAN, host
    // ports and the admin port already refused), and the seal comes last.
    // A jail that is sealed already is never unsealed. Every load finds the
    // host alias's address first (OrbStack: resolved in the machine), and
    // bring-up stops when it cannot: never a jail without its rules.
    let sealed = || {
        Check::LastRule(
            in_guest(&m, &["iptables", "-w", "-S", egress::CHAIN]),
            format!(
                "-A {} {}",
                egress::CHAIN,
                egress::rules(
                    Family::V4,
                    &Spec {
                        posture: Egress::Closed,
                        host: None,
                        jail_port: 0,
                        allow_ports: Vec::new(),
                        dns: Vec::new(),
                    }
                )
                .last()
                .cloned()
                .unwrap_or_default()
            ),
        )
    };
    let closed = config.egress == Egress::Closed;
    v.push(Action {
        title: "egress".into(),
        check: closed.then(sealed),
        work: Work::LoadEgress(Egress::Open),
    });
    v.push(Action {
        title: "broker up".into(),
        check: Some(Check::BrokerHealthy),
        work: Work::StartBroker,
    });
    v.push(Action {
        title: "guest packages".into(),
        check: Some(Check::Succeeds(in_guest(
            &m,
            &[
                "sh",
                "-c",
                "command -v podman && command -v iptables-restore",
            ],
        ))),
        work: Work::Run(vec![
            in_guest(&m, &["apt-get", "update", "-q"]),
            in_guest(
                &m,
                &[
                    "apt-get",
                    "install",
                    "-y",
                    "-q",
                    "podman",
                    "iptables",
                    "ca-certificates",
                ],
            ),
        ]),
    });
    let mut images: Vec<String> = std::iter::once(&config.manager.agent)
        .chain(config.groves.iter().map(|g| &g.agent))
        .filter_map(|a| a.image.as_ref().map(|i| i.reference.clone()))
        .collect();
    images.sort();
    images.dedup();
    for image in &images {
        v.push(Action {
            title: format!("image {image}"),
            check: Some(Check::Succeeds(in_guest(
                &m,
                &["podman", "image", "exists", image],
            ))),
            work: Work::Run(vec![in_guest(&m, &["podman", "pull", image])]),
        });
    }
    let dir = tree.join(".lever").join("bootstrap");
    v.push(Action {
        title: "manager bootstrap".into(),
        check: Some(Check::Staged(dir.join("ticket"))),
        work: Work::StageBootstrap {
            dir,
            broker_url: format!("https://{}:{}", m.host_alias_name, config.broker.jail_port),
        },
    });
    if closed {
        v.push(Action {
            title: "egress seal".into(),
            check: None,
            work: Work::LoadEgress(Egress::Closed),
        });
    }
    Ok(v)
}

/// What an apply did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    pub ran: Vec<String>,
    pub already: Vec<String>,
}

fn checked(c: &Check, r: &mut dyn Env) -> Result<bool, String> {
    Ok(match c {
        Check::Prints(cmd, want) => {
            let o = r.run(cmd)?;
            o.ok && o.stdout.trim() == *want
        }
        Check::Succeeds(cmd) => r.run(cmd)?.ok,
        Check::BrokerHealthy => r.broker_healthy(),
        Check::Staged(p) => p.exists(),
        Check::LastRule(cmd, want) => {
            let o = r.run(cmd)?;
            o.ok && o.stdout.lines().rev().find(|l| l.starts_with("-A ")) == Some(want.as_str())
        }
    })
}

fn must(r: &mut dyn Env, c: &Cmd) -> Result<(), String> {
    let o = r.run(c)?;
    if o.ok {
        Ok(())
    } else {
        Err(format!("`{}` failed", c.argv.join(" ")))
    }
}

/// Brings the jail up, step by step, skipping what is done.
pub(crate) fn apply(
    config: &Config,
    lima_file: &Path,
    host_os: lima::Host,
    r: &mut dyn Env,
    progress: &mut dyn FnMut(&str),
) -> Result<Summary, String> {
    let acts = actions(config, lima_file, host_os)?;
    let n = acts.len();
    let mut s = Summary::default();
    for (i, a) in acts.into_iter().enumerate() {
        let head = format!("[{}/{n}] {}", i + 1, a.title);
        progress(&format!("{head} ..."));
        if let Some(c) = &a.check
            && checked(c, r)?
        {
            progress(&format!("{head}: already done"));
            s.already.push(a.title);
            continue;
        }
        match a.work {
            Work::Run(cmds) => {
                for c in &cmds {
                    must(r, c)?;
                }
            }
            Work::WriteThenRun(path, text, cmds) => {
                r.write_file(&path, &text)?;
                for c in &cmds {
                    must(r, c)?;
                }
            }
            Work::StartBroker => r.start_broker()?,
            Work::LoadEgress(posture) => {
                let m = machine(config)?;
                let hosts = host_aliases(&m, r)?;
                for c in &egress_loads(config, &m, &hosts, posture) {
                    must(r, c)?;
                }
            }
            Work::StageBootstrap { dir, broker_url } => {
                let (ticket, ca) = r.bootstrap()?;
                stage(
                    &config.root.join(&config.tree),
                    &dir,
                    &[
                        ("ticket", &ticket),
                        ("ca.pem", &ca),
                        ("broker", &broker_url),
                    ],
                )?;
            }
        }
        if config.backend == Backend::Lima && a.title == "machine up" {
            verify_lima(config, r)?;
        }
        progress(&format!("{head}: done"));
        s.ran.push(a.title);
    }
    Ok(s)
}

/// After Lima started the machine: what it realized must be the template.
fn verify_lima(config: &Config, r: &mut dyn Env) -> Result<(), String> {
    let name = format!("lever-{}", config.name);
    let o = r.run(&cmd(&["limactl", "list", "--json", &name]))?;
    let v: serde_json::Value = serde_json::from_str(o.stdout.trim())
        .map_err(|e| format!("limactl list --json {name}: {e}"))?;
    lima::verify_realized(&v, &config.root.join(&config.tree)).map_err(|wrong| {
        format!(
            "{name} does not match the Lever template, stopping: {}",
            wrong.join("; ")
        )
    })
}

/// Tears the jail down (the machine `machine`, `lever-NAME` unless
/// overridden; the broker is left to the operator).
pub(crate) fn down(config: &Config, machine: &str, r: &mut dyn Env) -> Result<Vec<String>, String> {
    let m = machine_named(config, machine)?;
    let cmds = match config.backend {
        Backend::Lima => vec![
            cmd(&["limactl", "stop", &m.name]),
            cmd(&["limactl", "delete", &m.name]),
        ],
        _ => vec![cmd(&["orb", "delete", "-f", &m.name])],
    };
    let mut ran = Vec::new();
    for c in &cmds {
        // Stopping what is not running is not an error.
        let o = r.run(c)?;
        ran.push(format!(
            "{} ({})",
            c.argv.join(" "),
            if o.ok { "ok" } else { "nothing to do" }
        ));
    }
    Ok(ran)
}

/// The live jail's own checks, for `lever doctor`: Lever's chain is loaded
/// and hooked, and a connection from inside to the admin port is refused.
/// Each result is (what, passed).
pub(crate) fn live_checks(
    config: &Config,
    machine: &str,
    r: &mut dyn Env,
) -> Result<Vec<(String, bool)>, String> {
    let m = machine_named(config, machine)?;
    let mut out = Vec::new();
    for family in [Family::V4, Family::V6] {
        let t = family.tables();
        let loaded = r.run(&in_guest(&m, &[t, "-w", "-S", egress::CHAIN]))?;
        let rules = loaded
            .stdout
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count();
        out.push((
            format!("{t}: {} loaded ({rules} rules)", egress::CHAIN),
            loaded.ok && rules > 0,
        ));
        let hooked = r.run(&in_guest(
            &m,
            &[t, "-w", "-C", "OUTPUT", "-j", egress::CHAIN],
        ))?;
        out.push((format!("{t}: OUTPUT jumps to {}", egress::CHAIN), hooked.ok));
    }
    let admin = config.broker.admin_port.to_string();
    // bash's /dev/tcp (dash has none): a plain connect from inside,
    // bounded in time.
    let probe = r.run(&in_guest(
        &m,
        &[
            "timeout",
            "3",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{}/{admin}", m.host_alias_name),
        ],
    ))?;
    out.push((
        format!(
            "from inside, {}:{admin} (the admin port) is refused",
            m.host_alias_name
        ),
        !probe.ok,
    ));
    Ok(out)
}

/// Writes `files` into `dir` inside `tree`, 0600, refusing to follow any
/// symlink on the way: the tree is agent-writable, so an agent could have
/// planted one to make the host write elsewhere.
pub(crate) fn stage(tree: &Path, dir: &Path, files: &[(&str, &str)]) -> Result<(), String> {
    let rel = dir
        .strip_prefix(tree)
        .map_err(|_| format!("{} is not inside the tree", dir.display()))?;
    let mut at = tree.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(md) if md.file_type().is_symlink() => {
                return Err(format!(
                    "{} is a symlink: refusing to stage through it",
                    at.display()
                ));
            }
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(format!("{} is not a directory", at.display())),
            Err(_) => {
                std::fs::create_dir(&at).map_err(|e| format!("{}: {e}", at.display()))?;
                std::fs::set_permissions(&at, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .map_err(|e| format!("{}: {e}", at.display()))?;
            }
        }
    }
    for (name, text) in files {
        let path = dir.join(name);
        let fd = rustix::fs::open(
            &path,
            rustix::fs::OFlags::WRONLY
                | rustix::fs::OFlags::CREATE
                | rustix::fs::OFlags::TRUNC
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .map_err(|e| format!("{}: {e} (a symlink there is refused)", path.display()))?;
        let mut f = std::fs::File::from(fd);
        std::io::Write::write_all(&mut f, text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use super::*;

    /// A machine world in memory: commands recorded, state kept.
    #[derive(Default)]
    struct World {
        ran: Vec<String>,
        running: bool,
        packages: bool,
        images: BTreeSet<String>,
        broker: bool,
        tickets: usize,
        tree: String,
        extra_mount: bool,
        /// The IPv4 ruleset loaded last, and every one loaded.
        v4_rules: String,
        loads: Vec<String>,
    }

    impl Env for World {
        fn run(&mut self, c: &Cmd) -> Result<Out, String> {
            let line = c.argv.join(" ");
            self.ran.push(line.clone());
            let a: Vec<&str> = c.argv.iter().map(String::as_str).collect();
            let ok = |stdout: &str| {
                Ok(Out {
                    ok: true,
                    stdout: stdout.into(),
                })
            };
            if let Some(text) = &c.stdin
                && a.contains(&"iptables-restore")
            {
                self.v4_rules = text.clone();
                self.loads.push(text.clone());
            }
            match a.as_slice() {
                [.., "iptables", "-w", "-S", _] => ok(&self.v4_rules.replace("-A ", "\n-A ")),
                ["limactl", "list", _, "--format", _] => {
                    ok(if self.running { "Running" } else { "" })
                }
                ["limactl", "list", "--json", _] => {
                    let mut mounts = vec![
                        serde_json::json!({"location": self.tree, "mountPoint": "/lever", "writable": true}),
                    ];
                    if self.extra_mount {
                        mounts.push(serde_json::json!({"location": "~", "mountPoint": "/home", "writable": false}));
                    }
                    ok(&serde_json::json!({"config": {"mounts": mounts,
                        "portForwards": [
                            {"guestIP": "0.0.0.0", "guestIPMustBeZero": true, "guestPortRange": [1, 65535], "ignore": true},
                            {"guestIP": "127.0.0.1", "guestPortRange": [1, 65535], "ignore": true}],
                        "containerd": {"system": false, "user": false}}}).to_string())
                }
                ["limactl", "start", ..] => {
                    self.running = true;
                    ok("")
                }
                [.., "sh", "-c", s] if s.starts_with("command -v podman") => Ok(Out {
                    ok: self.packages,
                    stdout: String::new(),
                }),
                _ if a.windows(2).any(|w| w == ["apt-get", "install"]) => {
                    self.packages = true;
                    ok("")
                }
                [.., "podman", "image", "exists", i] => Ok(Out {
                    ok: self.images.contains(*i),
                    stdout: String::new(),
                }),
                [.., "podman", "pull", i] => {
                    self.images.insert((*i).to_owned());
                    ok("")
                }
                ["limactl", "stop" | "delete", ..] => {
                    let was = self.running;
                    self.running = false;
                    Ok(Out {
                        ok: was || a[1] == "delete",
                        stdout: String::new(),
                    })
                }
                _ => ok(""),
            }
        }

        fn write_file(&mut self, path: &Path, _: &str) -> Result<(), String> {
            self.ran.push(format!("write {}", path.display()));
            Ok(())
        }
        fn broker_healthy(&mut self) -> bool {
            self.broker
        }
        fn start_broker(&mut self) -> Result<(), String> {
            self.ran.push("start broker".into());
            self.broker = true;
            Ok(())
        }
        fn bootstrap(&mut self) -> Result<(String, String), String> {
            self.tickets += 1;
            Ok((format!("lvtk_{}", self.tickets), "CA".into()))
        }
    }

    fn config(dir: &Path) -> Config {
        crate::common::test_config(
            dir,
            "name: demo\nbackend: lima\ntree: ws\negress: closed\nmanager: {image: 'img/a:1', allow_ports: [3201]}\ngroves:\n  - {name: g1, dir: g1}\n  - {name: g2, dir: g2, image: 'img/b:2'}\n  - {name: g3, dir: g3, image: 'img/b:2'}\nbroker: {api_key_file: key}\n",
        )
    }

    /// A scratch directory, removed when the test ends (pass or fail).
    struct Tmp(PathBuf);

    impl std::ops::Deref for Tmp {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(tag: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("lever-bringup-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }

    fn world(c: &Config) -> World {
        World {
            tree: c.root.join("ws").display().to_string(),
            ..World::default()
        }
    }

    #[test]
    fn apply_brings_everything_up_and_a_second_apply_changes_nothing() {
        let dir = tmp("idem");
        let c = config(&dir);
        let mut w = world(&c);
        let lima_file = dir.join(".lever/lima/lever-demo.yaml");
        let mut log = Vec::new();
        let s = apply(&c, &lima_file, lima::Host::Linux, &mut w, &mut |l| {
            log.push(l.to_owned())
        })
        .unwrap();
        assert_eq!(
            s.ran,
            [
                "machine up",
                "egress",
                "broker up",
                "guest packages",
                "image img/a:1",
                "image img/b:2",
                "manager bootstrap",
                "egress seal"
            ]
        );
        assert!(s.already.is_empty());
        assert!(log.iter().any(|l| l == "[1/8] machine up: done"), "{log:?}");
        // A closed jail fetches its packages behind the open rules (LAN and
        // host ports refused), and ends sealed.
        assert!(
            w.loads[0].contains("-d 192.168.0.0/16 -j REJECT"),
            "{}",
            w.loads[0]
        );
        assert!(
            w.v4_rules
                .trim_end()
                .ends_with("-A LEVER-EGRESS -j REJECT --reject-with icmp-port-unreachable\nCOMMIT"),
            "{}",
            w.v4_rules
        );
        // The applier hooks OUTPUT itself: what it loads with --noflush is
        // the chain alone, so no reload piles up jumps.
        assert!(
            w.loads.iter().all(|l| !l.contains("-A OUTPUT")),
            "{:#?}",
            w.loads
        );
        // The template was written before Lima was asked to create from it.
        let write = w.ran.iter().position(|l| l.starts_with("write ")).unwrap();
        let create = w
            .ran
            .iter()
            .position(|l| l.contains("limactl create"))
            .unwrap();
        assert!(write < create);
        // Each distinct image pulled once; the egress rules loaded and hooked.
        assert_eq!(
            w.ran.iter().filter(|l| l.contains("podman pull")).count(),
            2
        );
        assert!(
            w.ran
                .iter()
                .any(|l| l.ends_with("iptables-restore -w --noflush"))
        );
        assert!(
            w.ran
                .iter()
                .any(|l| l.contains("-I OUTPUT 1 -j LEVER-EGRESS"))
        );
        let boot = c.root.join("ws/.lever/bootstrap");
        assert_eq!(
            std::fs::read_to_string(boot.join("ticket")).unwrap(),
            "lvtk_1"
        );
        assert_eq!(
            std::fs::read_to_string(boot.join("broker")).unwrap(),
            "https://host.lima.internal:8443"
        );

        // Again: only the checks run, and the sealed rules are reloaded (the
        // jail is never unsealed); no machine created, nothing pulled, no
        // new ticket.
        w.ran.clear();
        w.loads.clear();
        let s = apply(&c, &lima_file, lima::Host::Linux, &mut w, &mut |_| {}).unwrap();
        assert_eq!(s.ran, ["egress seal"]);
        assert_eq!(s.already.len(), 7);
        assert!(
            w.loads.iter().all(|l| !l.contains("192.168.0.0/16")),
            "unsealed: {:#?}",
            w.loads
        );
        assert!(
            !w.ran.iter().any(|l| l.contains("create")
                || l.contains("pull")
                || l.contains("apt-get")
                || l.starts_with("start")),
            "{:#?}",
            w.ran
        );
        assert_eq!(w.tickets, 1);
    }

    #[test]
    fn a_lima_machine_that_realized_something_else_stops_bring_up() {
        let dir = tmp("realized");
        let c = config(&dir);
        let mut w = World {
            extra_mount: true,
            ..world(&c)
        };
        let e = apply(
            &c,
            &dir.join("l.yaml"),
            lima::Host::Linux,
            &mut w,
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.contains("does not match the Lever template"), "{e}");
        // Nothing after the machine ran.
        assert!(!w.broker && w.images.is_empty());
    }

    #[test]
    fn down_stops_and_deletes_and_is_harmless_twice() {
        let dir = tmp("down");
        let c = config(&dir);
        let mut w = world(&c);
        w.running = true;
        let first = down(&c, &c.machine_name(), &mut w).unwrap();
        assert_eq!(
            first,
            [
                "limactl stop lever-demo (ok)",
                "limactl delete lever-demo (ok)"
            ]
        );
        let second = down(&c, &c.machine_name(), &mut w).unwrap();
        assert_eq!(second[0], "limactl stop lever-demo (nothing to do)");
    }

    #[test]
    fn down_and_the_live_checks_act_on_the_machine_named() {
        let dir = tmp("named");
        let c = config(&dir);
        let mut w = world(&c);
        live_checks(&c, "lever-old", &mut w).unwrap();
        down(&c, "lever-old", &mut w).unwrap();
        assert!(!w.ran.is_empty());
        for line in &w.ran {
            assert!(
                line.contains(" lever-old") && !line.contains("lever-demo"),
                "{line}"
            );
        }
        assert_eq!(
            w.ran[w.ran.len() - 2..],
            ["limactl stop lever-old", "limactl delete lever-old"]
        );
    }

    /// An OrbStack machine that does not exist yet: every check fails,
    /// every command works, and `getent` answers what it is given (an
    /// empty answer is a failed lookup, as `getent`'s exit 2).
    struct Orb {
        log: Vec<String>,
        /// What each `*tables-restore` was fed, in order.
        loads: Vec<String>,
        ahostsv4: &'static str,
        ahostsv6: &'static str,
    }

    impl Orb {
        fn new(ahostsv4: &'static str, ahostsv6: &'static str) -> Orb {
            Orb {
                log: Vec::new(),
                loads: Vec::new(),
                ahostsv4,
                ahostsv6,
            }
        }
    }

    impl Env for Orb {
        fn run(&mut self, c: &Cmd) -> Result<Out, String> {
            self.log.push(c.argv.join(" "));
            if let Some(text) = &c.stdin {
                self.loads.push(text.clone());
            }
            let a: Vec<&str> = c.argv.iter().map(String::as_str).collect();
            if let [.., "getent", db, _] = a.as_slice() {
                let answer = if *db == "ahostsv4" {
                    self.ahostsv4
                } else {
                    self.ahostsv6
                };
                return Ok(Out {
                    ok: !answer.is_empty(),
                    stdout: answer.into(),
                });
            }
            let check = c.argv.iter().any(|a| a == "true" || a == "exists")
                || c.argv.last().is_some_and(|a| a.starts_with("command -v"));
            Ok(Out {
                ok: !check,
                stdout: String::new(),
            })
        }
        fn write_file(&mut self, p: &Path, _: &str) -> Result<(), String> {
            self.log.push(format!("write {}", p.display()));
            Ok(())
        }
        fn broker_healthy(&mut self) -> bool {
            false
        }
        fn start_broker(&mut self) -> Result<(), String> {
            self.log.push("start broker".into());
            Ok(())
        }
        fn bootstrap(&mut self) -> Result<(String, String), String> {
            Ok(("lvtk_x".into(), "CA".into()))
        }
    }

    const ORB_V4: &str = "0.250.250.254   STREAM host.orb.internal\n0.250.250.254   DGRAM  \n0.250.250.254   RAW    \n";
    const ORB_V6: &str =
        "fd07:b51a:cc66:f0::fe STREAM host.orb.internal\nfd07:b51a:cc66:f0::fe DGRAM  \n";

    /// `apply` of an OrbStack instance in a fresh dir tagged `tag`, the
    /// machine's `getent` answering `v4` and `v6`.
    fn orb_apply(
        tag: &str,
        v4: &'static str,
        v6: &'static str,
    ) -> (Result<Summary, String>, Orb, Config) {
        let dir = tmp(tag);
        let mut c = config(&dir);
        c.backend = Backend::Orbstack;
        let mut r = Orb::new(v4, v6);
        let s = apply(
            &c,
            &dir.join("unused.yaml"),
            lima::Host::Linux,
            &mut r,
            &mut |_| {},
        );
        (s, r, c)
    }

    #[test]
    fn orbstack_bring_up_runs_these_commands() {
        let (s, mut r, c) = orb_apply("orb", ORB_V4, ORB_V6);
        let s = s.unwrap();
        // The host alias is resolved in the machine and the rules loaded,
        // as on Lima: open rules first, the seal last.
        assert_eq!(
            s.ran,
            [
                "machine up",
                "egress",
                "broker up",
                "guest packages",
                "image img/a:1",
                "image img/b:2",
                "manager bootstrap",
                "egress seal"
            ]
        );
        let load = [
            "orb -m lever-demo -u root getent ahostsv4 host.orb.internal.",
            "orb -m lever-demo -u root getent ahostsv6 host.orb.internal.",
            "orb -m lever-demo -u root iptables-restore -w --noflush",
            "orb -m lever-demo -u root sh -c iptables -w -C OUTPUT -j LEVER-EGRESS 2>/dev/null || iptables -w -I OUTPUT 1 -j LEVER-EGRESS",
            "orb -m lever-demo -u root ip6tables-restore -w --noflush",
            "orb -m lever-demo -u root sh -c ip6tables -w -C OUTPUT -j LEVER-EGRESS 2>/dev/null || ip6tables -w -I OUTPUT 1 -j LEVER-EGRESS",
        ];
        let mut want = vec![
            "orb -m lever-demo true",
            "orb create --isolated ubuntu:noble lever-demo",
            "orb -m lever-demo -u root iptables -w -S LEVER-EGRESS",
        ];
        want.extend(load);
        want.extend([
            "start broker",
            "orb -m lever-demo -u root sh -c command -v podman && command -v iptables-restore",
            "orb -m lever-demo -u root apt-get update -q",
            "orb -m lever-demo -u root apt-get install -y -q podman iptables ca-certificates",
            "orb -m lever-demo -u root podman image exists img/a:1",
            "orb -m lever-demo -u root podman pull img/a:1",
            "orb -m lever-demo -u root podman image exists img/b:2",
            "orb -m lever-demo -u root podman pull img/b:2",
        ]);
        want.extend(load);
        assert_eq!(r.log, want);
        // The resolved addresses are in the rules: the open rules refuse
        // every other host port (the admin port); the seal allows the
        // broker port alone; no load adds an OUTPUT jump of its own.
        assert_eq!(r.loads.len(), 4);
        let (v4_open, v6_open, v4_sealed, v6_sealed) =
            (&r.loads[0], &r.loads[1], &r.loads[2], &r.loads[3]);
        assert!(
            v4_open.contains(
                "-A LEVER-EGRESS -d 0.250.250.254/32 -p tcp -m tcp --dport 8443 -j ACCEPT\n"
            ) && v4_open.contains("-A LEVER-EGRESS -d 0.250.250.254/32 -j REJECT"),
            "{v4_open}"
        );
        // OrbStack's resolvers answer from ranges an open jail is refused:
        // DNS to them is let through before those ranges are.
        let at = |l: &str| v4_open.find(l).unwrap_or_else(|| panic!("{l}: {v4_open}"));
        for d in ["0.250.250.200", "198.19.248.200"] {
            let dns = at(&format!("-d {d}/32 -p udp -m udp --dport 53 -j ACCEPT"));
            assert!(dns < at("-d 0.0.0.0/8 -j REJECT"), "{v4_open}");
            assert!(dns < at("-d 198.18.0.0/15 -j REJECT"), "{v4_open}");
        }
        assert!(
            v6_open.contains("-d fd07:b51a:cc66:f0::fe/128 -j REJECT"),
            "{v6_open}"
        );
        assert!(
            v4_sealed.contains("-d 0.250.250.254/32 -p tcp -m tcp --dport 8443 -j ACCEPT")
                && !v4_sealed.contains("3201")
                && v4_sealed.ends_with(
                    "-A LEVER-EGRESS -j REJECT --reject-with icmp-port-unreachable\nCOMMIT\n"
                ),
            "{v4_sealed}"
        );
        assert!(
            v6_sealed.contains("-d fd07:b51a:cc66:f0::fe/128 -p tcp -m tcp --dport 8443 -j ACCEPT"),
            "{v6_sealed}"
        );
        assert!(r.loads.iter().all(|l| !l.contains("-A OUTPUT")));
        assert_eq!(
            down(&c, &c.machine_name(), &mut r).unwrap(),
            ["orb delete -f lever-demo (ok)"]
        );
    }

    #[test]
    fn an_orbstack_host_alias_that_does_not_resolve_stops_bring_up() {
        // getent finds nothing (or only what is never the host).
        for v4 in ["", "127.0.0.1 STREAM host.orb.internal\n"] {
            let (s, r, _) = orb_apply("orb-unresolved", v4, ORB_V6);
            let e = s.unwrap_err();
            assert!(
                e.contains("getent ahostsv4 host.orb.internal.") && e.contains("bring-up stops"),
                "{e}"
            );
            // Nothing loaded, and nothing after the egress step ran.
            assert!(r.loads.is_empty(), "{:#?}", r.loads);
            assert_eq!(
                r.log.last().unwrap(),
                "orb -m lever-demo -u root getent ahostsv4 host.orb.internal."
            );
            assert!(!r.log.iter().any(|l| l == "start broker"));
        }
    }

    #[test]
    fn an_ipv4_mapped_answer_is_no_ipv6_host_alias() {
        // What `getent ahostsv6` prints for a name with no IPv6 address.
        let (s, r, _) = orb_apply(
            "orb-mapped",
            ORB_V4,
            "::ffff:0.250.250.254 STREAM host.orb.internal\n",
        );
        s.unwrap();
        assert!(r.loads[0].contains("-d 0.250.250.254/32"));
        // IPv6: no host rule at all (ULA and link-local still refused).
        assert!(!r.loads[1].contains("ffff"), "{}", r.loads[1]);
        assert!(!r.loads[1].contains("--dport"), "{}", r.loads[1]);
        assert!(
            r.loads[1].contains("-d fc00::/7 -j REJECT"),
            "{}",
            r.loads[1]
        );
    }

    #[test]
    fn doctor_sees_missing_rules_and_an_open_admin_port() {
        let dir = tmp("live");
        let c = config(&dir);
        struct Jail {
            loaded: bool,
            admin_open: bool,
        }
        impl Env for Jail {
            fn run(&mut self, c: &Cmd) -> Result<Out, String> {
                let line = c.argv.join(" ");
                Ok(if line.contains(" -S LEVER-EGRESS") {
                    Out {
                        ok: self.loaded,
                        stdout: if self.loaded {
                            "-N LEVER-EGRESS\n-A LEVER-EGRESS -j REJECT\n".into()
                        } else {
                            String::new()
                        },
                    }
                } else if line.contains(" -C OUTPUT") {
                    Out {
                        ok: self.loaded,
                        stdout: String::new(),
                    }
                } else {
                    Out {
                        ok: self.admin_open,
                        stdout: String::new(),
                    }
                })
            }
            fn write_file(&mut self, _: &Path, _: &str) -> Result<(), String> {
                Ok(())
            }
            fn broker_healthy(&mut self) -> bool {
                true
            }
            fn start_broker(&mut self) -> Result<(), String> {
                Ok(())
            }
            fn bootstrap(&mut self) -> Result<(String, String), String> {
                Err("unused".into())
            }
        }
        let good = live_checks(
            &c,
            &c.machine_name(),
            &mut Jail {
                loaded: true,
                admin_open: false,
            },
        )
        .unwrap();
        assert!(good.iter().all(|(_, ok)| *ok), "{good:?}");
        assert!(good.last().unwrap().0.contains("host.lima.internal:8444"));
        let bad = live_checks(
            &c,
            &c.machine_name(),
            &mut Jail {
                loaded: false,
                admin_open: true,
            },
        )
        .unwrap();
        assert!(bad.iter().all(|(_, ok)| !*ok), "{bad:?}");
    }

    #[test]
    fn provisioning_writes_the_state_dir_0700_and_its_files_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tmp("private");
        let state = dir.join(".lever");
        let mut sys = System {
            config_file: PathBuf::new(),
            admin: String::new(),
            state_dir: state.clone(),
        };
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // Step 1 of a lima apply, before any broker ran: the template.
        let template = state.join("lima/lever-demo.yaml");
        sys.write_file(&template, "a: 1\n").unwrap();
        let (log, _f) = sys.broker_log().unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("lima")), 0o700);
        assert_eq!(mode(&template), 0o600);
        assert_eq!(mode(&log), 0o600);
        // Rewritten in place, a looser file left by an older Lever is
        // tightened, and a symlink is never written through.
        std::fs::set_permissions(&template, std::fs::Permissions::from_mode(0o644)).unwrap();
        sys.write_file(&template, "b: 2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&template).unwrap(), "b: 2\n");
        assert_eq!(mode(&template), 0o600);
        std::os::unix::fs::symlink(dir.join("elsewhere"), state.join("lima/x.yaml")).unwrap();
        assert!(sys.write_file(&state.join("lima/x.yaml"), "c").is_err());
        assert!(!dir.join("elsewhere").exists());
    }

    #[test]
    fn staging_never_follows_a_symlink_an_agent_planted() {
        let dir = tmp("stage");
        let tree = dir.join("ws");
        let outside = dir.join("outside");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // A symlinked directory on the way.
        std::os::unix::fs::symlink(&outside, tree.join(".lever")).unwrap();
        let e = stage(&tree, &tree.join(".lever/bootstrap"), &[("ticket", "t")]).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        // A symlinked file at the destination.
        std::fs::remove_file(tree.join(".lever")).unwrap();
        std::fs::create_dir_all(tree.join(".lever/bootstrap")).unwrap();
        std::os::unix::fs::symlink(outside.join("stolen"), tree.join(".lever/bootstrap/ticket"))
            .unwrap();
        let e = stage(&tree, &tree.join(".lever/bootstrap"), &[("ticket", "t")]).unwrap_err();
        assert!(e.contains("symlink"), "{e}");
        assert!(!outside.join("stolen").exists());
        // A clean tree: written, 0600.
        std::fs::remove_file(tree.join(".lever/bootstrap/ticket")).unwrap();
        stage(&tree, &tree.join(".lever/bootstrap"), &[("ticket", "t")]).unwrap();
        let md = std::fs::metadata(tree.join(".lever/bootstrap/ticket")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777,
            0o600
        );
    }
}
