//! The jail's egress rules, generated from the config: one ruleset per
//! address family, in `iptables-restore` / `ip6tables-restore` form, all in
//! one chain of Lever's own (`LEVER-EGRESS`) that `OUTPUT` jumps to.
//!
//! Two forms: [`ruleset`] is the chain alone, for `--noflush` reloads by an
//! applier that hooks `OUTPUT` itself (once); [`standalone_ruleset`] adds
//! the `OUTPUT` jump, for a plain `iptables-restore` that replaces the
//! whole `filter` table (what `lever egress-rules` prints).
//!
//! Order is the design (first match wins):
//!
//! 1. loopback (`closed` only: in `open` no later rule touches it);
//! 2. replies on established connections (a connection made *into* the
//!    jail answers through this);
//! 3. IPv6 neighbour discovery (solicitation and advertisement), without
//!    which no IPv6 peer is reachable at all;
//! 4. the host alias on the broker's jail port; then (`open`) on each
//!    `allow_ports` entry, and every other port of the host alias refused,
//!    the admin port among them. `closed` is the broker port only: its
//!    verdict refuses `allow_ports` with the rest. These come before the
//!    LAN ranges because a host alias may live inside one (Lima's
//!    `host.lima.internal` is 192.168.5.2);
//! 5. (`open`) DNS (UDP and TCP 53) to the backend's resolvers;
//! 6. (`open`) LAN, link-local, CGNAT, `0/8`, benchmarking and ULA
//!    ranges refused;
//! 7. the verdict: `closed` refuses the rest; `open` has no rule of its own
//!    here: what is left (the public internet) returns to `OUTPUT`, whose
//!    policy accepts it unless the system says otherwise.
//!
//! Refused means `REJECT` (an ICMP unreachable, which a TCP client sees as
//! "connection refused" at once) rather than a silent drop, so an agent
//! fails fast instead of hanging in a connect timeout. Every rule is there
//! because some connection needs it: the namespace tests remove each one in
//! turn and watch the reachability matrix change.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::config::Egress;

/// Lever's chain in the `filter` table.
pub const CHAIN: &str = "LEVER-EGRESS";

/// IPv4 ranges an open jail may not reach: private LANs, link-local
/// (cloud metadata endpoints live there), carrier-grade NAT, "this
/// network" (`0/8`: OrbStack's host services answer there, and Linux
/// routes it like any other), and the benchmarking range (`198.18/15`:
/// OrbStack's network of machines and containers).
pub const V4_REFUSED: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "0.0.0.0/8",
    "198.18.0.0/15",
];

/// IPv6 ranges an open jail may not reach: link-local and unique local.
pub const V6_REFUSED: &[&str] = &["fe80::/10", "fc00::/7"];

/// What the rules of one address family are made from.
#[derive(Debug, Clone)]
pub struct Spec {
    pub posture: Egress,
    /// The host alias of this family (how the jail reaches the host), if
    /// the backend has one in it.
    pub host: Option<IpAddr>,
    /// The broker's jail port.
    pub jail_port: u16,
    /// Host tool ports the jail may reach (`allow_ports`; used in `open`
    /// only: `closed` is the broker port alone).
    pub allow_ports: Vec<u16>,
    /// The backend's DNS resolvers of this family (used in `open` only).
    pub dns: Vec<IpAddr>,
}

/// Which family a ruleset is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The `iptables-restore` command for this family.
    pub fn restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The `iptables` command for this family.
    pub fn tables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    fn host_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn reject(self) -> &'static str {
        match self {
            Family::V4 => "-j REJECT --reject-with icmp-port-unreachable",
            Family::V6 => "-j REJECT --reject-with icmp6-port-unreachable",
        }
    }
}

/// The ruleset of `family` as `iptables-restore --noflush` input: it
/// declares (and so empties) Lever's chain and fills it, in one
/// transaction. Hooking the chain from `OUTPUT` is the applier's business
/// (once, and never undone by a reload), so a reload never opens the jail.
/// Loaded with a plain (flushing) `iptables-restore` it enforces nothing:
/// use [`standalone_ruleset`] for that.
///
/// Addresses of the other family in `spec` are ignored.
pub fn ruleset(family: Family, spec: &Spec) -> String {
    render(family, spec, false)
}

/// The ruleset of `family` as input for a plain `iptables-restore` (or
/// `ip6tables-restore`), which replaces the whole `filter` table: Lever's
/// chain, its rules and the one `OUTPUT` jump to it, so loading it alone
/// (in a fresh network namespace, say) enforces the policy, and loading it
/// again leaves one jump. Not for `--noflush`, which would add a jump per
/// load: that is what [`ruleset`] is for.
pub fn standalone_ruleset(family: Family, spec: &Spec) -> String {
    render(family, spec, true)
}

fn render(family: Family, spec: &Spec, hook: bool) -> String {
    let mut out = String::new();
    let rules = rules(family, spec);
    let _ = writeln!(
        out,
        "# Lever egress ({}), {}: generated by `lever egress-rules`; do not edit.",
        match spec.posture {
            Egress::Open => "open",
            Egress::Closed => "closed",
        },
        match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    );
    if hook {
        let _ = writeln!(
            out,
            "# Load with a plain `{}` (it replaces the filter table), not with --noflush.",
            family.restore()
        );
    }
    out.push_str("*filter\n");
    let _ = writeln!(out, ":{CHAIN} - [0:0]");
    if hook {
        let _ = writeln!(out, "-A OUTPUT -j {CHAIN}");
    }
    for r in rules {
        let _ = writeln!(out, "-A {CHAIN} {r}");
    }
    out.push_str("COMMIT\n");
    out
}

/// The rules of Lever's chain, in order, without the `-A CHAIN` prefix.
pub fn rules(family: Family, spec: &Spec) -> Vec<String> {
    let open = spec.posture == Egress::Open;
    let reject = family.reject();
    let mut r = Vec::new();
    if !open {
        r.push("-o lo -j ACCEPT".to_owned());
    }
    r.push("-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT".to_owned());
    if family == Family::V6 {
        for t in ["neighbour-solicitation", "neighbour-advertisement"] {
            r.push(format!("-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j ACCEPT"));
        }
    }
    if let Some(host) = spec.host.filter(|h| Family::of(h) == family) {
        let h = format!("{host}/{}", family.host_len());
        let mut ports = vec![spec.jail_port];
        // `closed` is the broker port only: `allow_ports` are for open jails.
        for p in spec.allow_ports.iter().filter(|_| open) {
            if !ports.contains(p) {
                ports.push(*p);
            }
        }
        for p in ports {
            r.push(format!("-d {h} -p tcp -m tcp --dport {p} -j ACCEPT"));
        }
        if open {
            // Every other host port, the admin port above all. (In
            // `closed` the verdict refuses them.)
            r.push(format!("-d {h} {reject}"));
        }
    }
    if open {
        for d in spec.dns.iter().filter(|d| Family::of(d) == family) {
            let d = format!("{d}/{}", family.host_len());
            r.push(format!("-d {d} -p udp -m udp --dport 53 -j ACCEPT"));
            r.push(format!("-d {d} -p tcp -m tcp --dport 53 -j ACCEPT"));
        }
        let refused = match family {
            Family::V4 => V4_REFUSED,
            Family::V6 => V6_REFUSED,
        };
        for net in refused {
            r.push(format!("-d {net} {reject}"));
        }
    } else {
        r.push(reject.to_owned());
    }
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn spec(posture: Egress) -> Spec {
        Spec {
            posture,
            host: Some("192.168.5.2".parse().unwrap()),
            jail_port: 8443,
            allow_ports: vec![3201, 8443],
            dns: vec!["192.168.5.3".parse().unwrap(), "fd00::3".parse().unwrap()],
        }
    }

    #[test]
    fn host_alias_rules_come_before_the_lan_range_that_holds_it() {
        let r = rules(Family::V4, &spec(Egress::Open));
        let accept = r.iter().position(|l| l.contains("--dport 8443")).unwrap();
        let host_reject = r
            .iter()
            .position(|l| l.starts_with("-d 192.168.5.2/32 -j REJECT"))
            .unwrap();
        let lan = r
            .iter()
            .position(|l| l.starts_with("-d 192.168.0.0/16"))
            .unwrap();
        assert!(accept < host_reject && host_reject < lan, "{r:#?}");
        assert_eq!(
            r.last().unwrap(),
            "-d 198.18.0.0/15 -j REJECT --reject-with icmp-port-unreachable"
        );
        // The jail port is listed once even when allow_ports repeats it.
        assert_eq!(r.iter().filter(|l| l.contains("--dport 8443")).count(), 1);
    }

    #[test]
    fn closed_reaches_the_broker_port_only_whatever_allow_ports_says() {
        let r = rules(Family::V4, &spec(Egress::Closed));
        assert_eq!(
            r,
            vec![
                "-o lo -j ACCEPT",
                "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "-d 192.168.5.2/32 -p tcp -m tcp --dport 8443 -j ACCEPT",
                "-j REJECT --reject-with icmp-port-unreachable",
            ]
        );
        let v6 = Spec {
            host: Some("fd00:5::2".parse().unwrap()),
            ..spec(Egress::Closed)
        };
        assert_eq!(
            rules(Family::V6, &v6),
            vec![
                "-o lo -j ACCEPT",
                "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                "-p ipv6-icmp -m icmp6 --icmpv6-type neighbour-solicitation -j ACCEPT",
                "-p ipv6-icmp -m icmp6 --icmpv6-type neighbour-advertisement -j ACCEPT",
                "-d fd00:5::2/128 -p tcp -m tcp --dport 8443 -j ACCEPT",
                "-j REJECT --reject-with icmp6-port-unreachable",
            ]
        );
        // Open keeps them.
        let open = rules(Family::V4, &spec(Egress::Open));
        assert!(open.iter().any(|l| l.contains("--dport 3201 -j ACCEPT")));
    }

    #[test]
    fn the_standalone_form_hooks_output_once_and_the_reload_form_never() {
        for family in [Family::V4, Family::V6] {
            let alone = standalone_ruleset(family, &spec(Egress::Closed));
            let hook = "-A OUTPUT -j LEVER-EGRESS\n";
            assert_eq!(alone.matches(hook).count(), 1, "{alone}");
            // The chain is declared before the jump that names it.
            assert!(alone.find(":LEVER-EGRESS - [0:0]\n").unwrap() < alone.find(hook).unwrap());
            assert!(alone.contains(family.restore()) && alone.contains("not with --noflush"));
            let reload = ruleset(family, &spec(Egress::Closed));
            assert!(!reload.contains("OUTPUT"), "{reload}");
            // Otherwise the same rules.
            let chain = |t: &str| -> Vec<String> {
                t.lines()
                    .filter(|l| l.starts_with("-A LEVER-EGRESS"))
                    .map(str::to_owned)
                    .collect()
            };
            assert_eq!(chain(&alone), chain(&reload));
        }
    }

    #[test]
    fn each_family_takes_only_its_own_addresses() {
        let r = rules(Family::V6, &spec(Egress::Open));
        assert!(!r.iter().any(|l| l.contains("192.168.5")), "{r:#?}");
        assert!(
            r.iter().any(|l| l.starts_with("-d fd00::3/128 -p udp")),
            "{r:#?}"
        );
        assert!(r.iter().any(|l| l.contains("neighbour-advertisement")));
        let text = ruleset(Family::V6, &spec(Egress::Closed));
        assert!(text.starts_with("# Lever egress (closed), IPv6"));
        assert!(text.contains("*filter\n:LEVER-EGRESS - [0:0]\n"));
        assert!(
            text.ends_with(
                "-A LEVER-EGRESS -j REJECT --reject-with icmp6-port-unreachable\nCOMMIT\n"
            )
        );
    }
}
