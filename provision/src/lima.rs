//! The `lima` backend's machine definition: a Lever-owned template (stock
//! Lima templates are never used), the version floor, and the check of the
//! configuration Lima actually realized.
//!
//! The template's containment rests on three things:
//!
//! - exactly one mount, the tree, writable, at `/lever` (nothing of the
//!   home directory Lima mounts by default);
//! - every guest port forward ignored, for `0.0.0.0` binds
//!   (`guestIPMustBeZero: true`) and for `127.0.0.1` binds, so a guest
//!   listener can never appear on the host's loopback;
//! - Lima's bundled containerd off (Lever installs its own runtime).
//!
//! Lima merges templates with the user's `_config/default.yaml` and
//! `override.yaml`, so what runs can differ from what was rendered: after
//! start, [`verify_realized`] reads `limactl list --json` back and bring-up
//! fails closed on any difference.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

/// The oldest `limactl` whose port-forward ignore rules mean what the
/// template says (2.0 changed their semantics).
pub(crate) const MIN_VERSION: (u64, u64, u64) = (2, 0, 0);

/// The VM type: Apple's Virtualization.framework on macOS, QEMU on Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Host {
    MacOs,
    Linux,
}

/// Lima's YAML strings: double-quoted, JSON escaping (a YAML subset).
fn q(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// The template for machine `lever-NAME` sharing `tree`.
pub(crate) fn template(name: &str, tree: &Path, host: Host) -> String {
    let (vm, mount_type) = match host {
        Host::MacOs => ("vz", "virtiofs"),
        Host::Linux => ("qemu", "9p"),
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Lima machine lever-{name}: rendered by `lever apply`; do not edit (it is\n# rewritten, and bring-up checks that Lima realized exactly this)."
    );
    let _ = writeln!(t, "vmType: {vm}");
    t.push_str(
        "images:\n  - location: \"https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img\"\n    arch: x86_64\n  - location: \"https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-arm64.img\"\n    arch: aarch64\n",
    );
    t.push_str("cpus: 4\nmemory: 8GiB\ndisk: 64GiB\n");
    let _ = writeln!(t, "mountType: {mount_type}");
    t.push_str("# The one mount: the tree, writable, at /lever. Nothing else.\n");
    let _ = writeln!(
        t,
        "mounts:\n  - location: {}\n    mountPoint: /lever\n    writable: true",
        q(&tree.display().to_string())
    );
    t.push_str("# No guest port ever appears on the host.\n");
    t.push_str(
        "portForwards:\n  - guestIP: 0.0.0.0\n    guestIPMustBeZero: true\n    guestPortRange: [1, 65535]\n    ignore: true\n  - guestIP: 127.0.0.1\n    guestPortRange: [1, 65535]\n    ignore: true\n",
    );
    t.push_str("containerd:\n  system: false\n  user: false\n");
    t
}

/// Parses `limactl --version` output (`limactl version 2.0.3`) and refuses
/// anything older than [`MIN_VERSION`].
pub(crate) fn check_version(output: &str) -> Result<(u64, u64, u64), String> {
    let word = output
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .ok_or_else(|| format!("cannot read a version from `{}`", output.trim()))?;
    let core = word.split(['-', '+']).next().unwrap_or(word);
    let mut parts = core.split('.').map(|p| p.parse::<u64>());
    let mut next = || match parts.next() {
        Some(Ok(n)) => Ok(n),
        None => Ok(0),
        Some(Err(_)) => Err(format!("cannot read a version from `{}`", output.trim())),
    };
    let v = (next()?, next()?, next()?);
    if v < MIN_VERSION {
        return Err(format!(
            "Lima {}.{}.{} is too old: Lever needs {}.{}.{} or later (older releases read port-forward ignore rules differently)",
            v.0, v.1, v.2, MIN_VERSION.0, MIN_VERSION.1, MIN_VERSION.2
        ));
    }
    Ok(v)
}

/// Checks the configuration Lima realized (`limactl list --json NAME`,
/// its `config` object) against the template: every difference is listed,
/// and any one of them stops bring-up.
pub(crate) fn verify_realized(listed: &Value, tree: &Path) -> Result<(), Vec<String>> {
    let mut wrong = Vec::new();
    let config = &listed["config"];
    match config["mounts"].as_array().map(Vec::as_slice) {
        Some([m]) => {
            if m["mountPoint"].as_str() != Some("/lever") {
                wrong.push(format!("the mount is at {}, not /lever", m["mountPoint"]));
            }
            let location = m["location"].as_str().unwrap_or("");
            if Path::new(location) != tree {
                wrong.push(format!(
                    "the mount shares {location:?}, not the tree {}",
                    tree.display()
                ));
            }
            if m["writable"].as_bool() != Some(true) {
                wrong.push("the tree is not mounted writable".into());
            }
        }
        Some(ms) => wrong.push(format!(
            "{} mounts instead of exactly one (the tree): {}",
            ms.len(),
            ms.iter()
                .map(|m| m["location"].as_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => wrong.push("no mounts in the realized configuration".into()),
    }
    let forwards = config["portForwards"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ignores = |ip: &str, zero: bool| {
        forwards.iter().position(|f| {
            f["guestIP"].as_str() == Some(ip)
                && f["ignore"].as_bool() == Some(true)
                && (!zero || f["guestIPMustBeZero"].as_bool() == Some(true))
                && f["guestPortRange"] == serde_json::json!([1, 65535])
        })
    };
    match (ignores("0.0.0.0", true), ignores("127.0.0.1", false)) {
        (Some(a), Some(b)) => {
            // Rules match in order: nothing may forward before them.
            let first_forward = forwards
                .iter()
                .position(|f| f["ignore"].as_bool() != Some(true))
                .unwrap_or(usize::MAX);
            if first_forward < a.max(b) {
                wrong.push("a port forward comes before the ignore-all rules".into());
            }
        }
        _ => wrong.push(
            "the ignore-all port-forward rules (0.0.0.0 with guestIPMustBeZero, 127.0.0.1) are missing"
                .into(),
        ),
    }
    for k in ["system", "user"] {
        if config["containerd"][k].as_bool() != Some(false) {
            wrong.push(format!("Lima's bundled containerd ({k}) is not off"));
        }
    }
    if wrong.is_empty() { Ok(()) } else { Err(wrong) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn the_template_matches_the_golden_files() {
        let tree = Path::new("/Users/ada/inst/workspace");
        assert_eq!(
            template("demo", tree, Host::MacOs),
            include_str!("../tests/golden/lima-macos.yaml")
        );
        assert_eq!(
            template("demo", tree, Host::Linux),
            include_str!("../tests/golden/lima-linux.yaml")
        );
    }

    #[test]
    fn paths_are_quoted_not_spliced_into_the_yaml() {
        let t = template("x", Path::new("/tmp/a\"b\n- location: /"), Host::Linux);
        assert!(t.contains(r#"location: "/tmp/a\"b\n- location: /""#), "{t}");
        assert_eq!(t.matches("mountPoint:").count(), 1);
    }

    /// What `limactl list --json` shows for a machine that realized the
    /// template (the fields the check reads).
    fn realized(tree: &str) -> Value {
        json!({"name": "lever-demo", "status": "Running", "config": {
            "mounts": [{"location": tree, "mountPoint": "/lever", "writable": true}],
            "portForwards": [
                {"guestIP": "0.0.0.0", "guestIPMustBeZero": true, "guestPortRange": [1, 65535], "ignore": true, "hostIP": "127.0.0.1"},
                {"guestIP": "127.0.0.1", "guestPortRange": [1, 65535], "ignore": true, "hostIP": "127.0.0.1"}
            ],
            "containerd": {"system": false, "user": false}
        }})
    }

    #[test]
    fn the_realized_config_must_be_the_template() {
        let tree = Path::new("/srv/inst/ws");
        assert!(verify_realized(&realized("/srv/inst/ws"), tree).is_ok());

        let mut home = realized("/srv/inst/ws");
        home["config"]["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"location": "~", "mountPoint": "/Users/ada", "writable": false}));
        let e = verify_realized(&home, tree).unwrap_err();
        assert!(e[0].contains("2 mounts"), "{e:?}");

        let mut ro = realized("/srv/inst/ws");
        ro["config"]["mounts"][0]["writable"] = json!(false);
        assert!(verify_realized(&ro, tree).is_err());

        let other = realized("/srv/inst");
        assert!(verify_realized(&other, tree).unwrap_err()[0].contains("not the tree"));

        let mut forward_first = realized("/srv/inst/ws");
        forward_first["config"]["portForwards"]
            .as_array_mut()
            .unwrap()
            .insert(0, json!({"guestPort": 8080, "hostPort": 8080}));
        assert!(verify_realized(&forward_first, tree).is_err());

        let mut no_zero = realized("/srv/inst/ws");
        no_zero["config"]["portForwards"][0]["guestIPMustBeZero"] = json!(false);
        assert!(verify_realized(&no_zero, tree).is_err());

        let mut containerd = realized("/srv/inst/ws");
        containerd["config"]["containerd"]["user"] = json!(true);
        assert!(verify_realized(&containerd, tree).unwrap_err()[0].contains("containerd"));
    }

    #[test]
    fn lima_older_than_2_is_refused() {
        assert_eq!(check_version("limactl version 2.0.0\n").unwrap(), (2, 0, 0));
        assert_eq!(
            check_version("limactl version 2.1.3-rc.1").unwrap(),
            (2, 1, 3)
        );
        assert!(
            check_version("limactl version 1.2.9")
                .unwrap_err()
                .contains("too old")
        );
        assert!(check_version("limactl version 0.23.2").is_err());
        assert!(check_version("limactl version").is_err());
        assert!(check_version("limactl version 2.x").is_err());
    }
}
