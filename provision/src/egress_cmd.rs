//! `lever egress-rules`: print the jail's egress ruleset for this config
//! (self-contained: the chain and the `OUTPUT` jump, for a plain
//! `iptables-restore`), or apply it to the network namespace the command
//! runs in.
//!
//! Applying is, per address family: one `iptables-restore --noflush` that
//! empties and refills Lever's chain in a single transaction, then a jump
//! from `OUTPUT` to the chain if there is none yet. A reload only ever
//! swaps the chain's contents, so a running closed jail is never open for
//! a moment; applying twice changes nothing.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use lever_policy::egress::{self, CHAIN, Family, Spec};

use crate::common::{fail, load_config};

pub(crate) const AFTER_HELP: &str = "\
The ruleset is Lever's own chain (LEVER-EGRESS), hooked from OUTPUT. In
order: loopback (closed); replies on established connections; IPv6
neighbour discovery; the host alias on the broker's jail port. Then with
`egress: open`: the host alias on each allow_ports entry, every other
host-alias port refused (the admin port above all), DNS to --dns allowed,
the LAN, link-local, CGNAT, 0/8, benchmarking (198.18/15) and ULA ranges
refused, and the rest (the public internet) left to OUTPUT's policy; with `egress: closed`: everything else
refused, allow_ports included (closed is the broker port only). Refused
means REJECT, so an agent fails at once instead of hanging.

Printed (no --apply), the output is self-contained iptables-restore input:
the chain, its rules and the `-A OUTPUT -j LEVER-EGRESS` jump. Load it with
a plain `iptables-restore` (IPv4) or `ip6tables-restore` (with --ipv6),
which replaces the whole filter table; loading it again leaves one jump.
Do not load it with --noflush: that adds a jump per load (use --apply).

--apply loads both families into the network namespace it runs in, next to
the rules already there: Lever's chain alone is replaced in one
`iptables-restore --noflush` transaction and hooked from OUTPUT once, so
reloading a running closed jail never opens it. Applying twice changes
nothing.

Examples:
  lever egress-rules --host-alias 192.168.5.2 --dns 192.168.5.3 | sudo iptables-restore
  lever egress-rules --host-alias fd00:5::2 --ipv6 | sudo ip6tables-restore
  sudo lever egress-rules --host-alias 192.168.5.2 --apply   (inside the jail)

Docs: docs/egress.md";

/// One command run by the applier.
pub(crate) trait Runner {
    /// Runs `argv` with `stdin`; `Ok(true)` when it exited 0, `Ok(false)`
    /// when it ran and failed, `Err` with its error output when that
    /// failure is fatal to the caller.
    fn run(&mut self, argv: &[&str], stdin: Option<&str>) -> Result<bool, String>;
}

/// Runs commands for real.
struct System;

impl Runner for System {
    fn run(&mut self, argv: &[&str], stdin: Option<&str>) -> Result<bool, String> {
        let Some((program, args)) = argv.split_first() else {
            return Err("empty command".into());
        };
        let mut child = Command::new(program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{program}: {e}"))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| format!("{program}: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{program}: {e}"))?;
        if out.status.success() {
            Ok(true)
        } else if stdin.is_some() {
            Err(format!(
                "{} failed: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        } else {
            Ok(false)
        }
    }
}

/// What applying one family did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    /// The jump from OUTPUT was already there.
    Present,
    /// It was added now (the first apply).
    Added,
}

/// Loads `ruleset` (Lever's chain, replaced in one transaction) and makes
/// sure OUTPUT jumps to it.
pub(crate) fn apply(r: &mut dyn Runner, family: Family, ruleset: &str) -> Result<Hook, String> {
    r.run(&[family.restore(), "-w", "--noflush"], Some(ruleset))?;
    let jump = ["OUTPUT", "-j", CHAIN];
    let mut check = vec![family.tables(), "-w", "-C"];
    check.extend(jump);
    if r.run(&check, None)? {
        return Ok(Hook::Present);
    }
    let insert = [family.tables(), "-w", "-I", "OUTPUT", "1", "-j", CHAIN];
    if !r.run(&insert, None)? {
        return Err(format!(
            "{} could not hook {CHAIN} from OUTPUT",
            family.tables()
        ));
    }
    Ok(Hook::Added)
}

pub(crate) struct Args {
    pub config: Option<PathBuf>,
    pub host_alias: Vec<IpAddr>,
    pub dns: Vec<IpAddr>,
    pub ipv6: bool,
    pub apply: bool,
}

pub(crate) fn run(a: Args) -> ExitCode {
    let config = match load_config(a.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let v4 = a.host_alias.iter().filter(|h| h.is_ipv4()).count();
    let v6 = a.host_alias.iter().filter(|h| h.is_ipv6()).count();
    if v4 > 1 || v6 > 1 {
        eprintln!("lever egress-rules: at most one IPv4 and one IPv6 --host-alias");
        return ExitCode::from(2);
    }
    let spec = |family: Family| Spec {
        posture: config.egress,
        host: a
            .host_alias
            .iter()
            .copied()
            .find(|h| h.is_ipv4() == (family == Family::V4)),
        jail_port: config.broker.jail_port,
        allow_ports: config.manager.allow_ports.clone(),
        dns: a.dns.clone(),
    };
    if !a.apply {
        let family = if a.ipv6 { Family::V6 } else { Family::V4 };
        // Self-contained: a plain (flushing) restore of it enforces the
        // policy. The applier below loads the chain alone instead.
        print!("{}", egress::standalone_ruleset(family, &spec(family)));
        return ExitCode::SUCCESS;
    }
    for family in [Family::V4, Family::V6] {
        let text = egress::ruleset(family, &spec(family));
        match apply(&mut System, family, &text) {
            Ok(hook) => println!(
                "{}: {CHAIN} loaded ({} rules){}",
                family.tables(),
                egress::rules(family, &spec(family)).len(),
                if hook == Hook::Added {
                    "; hooked from OUTPUT"
                } else {
                    ""
                }
            ),
            Err(e) => return fail(&e),
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Records commands; the hook exists once it was inserted.
    #[derive(Default)]
    struct Recorder {
        calls: Vec<(String, Option<String>)>,
        hooked: bool,
    }

    impl Runner for Recorder {
        fn run(&mut self, argv: &[&str], stdin: Option<&str>) -> Result<bool, String> {
            self.calls.push((argv.join(" "), stdin.map(str::to_owned)));
            Ok(match argv.get(2) {
                Some(&"-C") => self.hooked,
                Some(&"-I") => {
                    self.hooked = true;
                    true
                }
                _ => true,
            })
        }
    }

    #[test]
    fn the_first_apply_hooks_the_chain_and_a_second_only_reloads_it() {
        let mut r = Recorder::default();
        let rules = "*filter\n:LEVER-EGRESS - [0:0]\nCOMMIT\n";
        assert_eq!(apply(&mut r, Family::V4, rules).unwrap(), Hook::Added);
        let first: Vec<&str> = r.calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            first,
            vec![
                "iptables-restore -w --noflush",
                "iptables -w -C OUTPUT -j LEVER-EGRESS",
                "iptables -w -I OUTPUT 1 -j LEVER-EGRESS",
            ]
        );
        assert_eq!(r.calls[0].1.as_deref(), Some(rules));
        r.calls.clear();
        assert_eq!(apply(&mut r, Family::V4, rules).unwrap(), Hook::Present);
        let second: Vec<&str> = r.calls.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            second,
            vec![
                "iptables-restore -w --noflush",
                "iptables -w -C OUTPUT -j LEVER-EGRESS",
            ]
        );
    }

    #[test]
    fn a_failed_load_stops_before_the_hook() {
        struct Failing(Vec<String>);
        impl Runner for Failing {
            fn run(&mut self, argv: &[&str], stdin: Option<&str>) -> Result<bool, String> {
                self.0.push(argv.join(" "));
                if stdin.is_some() {
                    Err("iptables-restore: line 3 failed".into())
                } else {
                    Ok(true)
                }
            }
        }
        let mut r = Failing(Vec::new());
        assert!(apply(&mut r, Family::V6, "x").is_err());
        assert_eq!(r.0, vec!["ip6tables-restore -w --noflush"]);
    }
}
