//! The containment backends Lever implements, as data: what `backend:`
//! accepts and what `lever backends` prints. A backend exists here iff it is
//! implemented; roadmap and rejected backends are documented in
//! `docs/backends.md` and named in errors, never substituted.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    Orbstack,
    Lima,
    Qemu,
}

/// One row of the backend matrix (the columns of the containment seed).
#[derive(Clone, Copy, Debug)]
pub struct BackendRow {
    pub backend: Backend,
    pub kernel: &'static str,
    pub fs_bounded_by: &'static str,
    pub egress_enforced_at: &'static str,
    pub version_fragile: &'static str,
    /// The name the jail uses to reach the host (and so the broker).
    pub host_alias: &'static str,
    pub hosts: &'static str,
}

impl Backend {
    pub const ALL: [Backend; 3] = [Backend::Orbstack, Backend::Lima, Backend::Qemu];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Orbstack => "orbstack",
            Backend::Lima => "lima",
            Backend::Qemu => "qemu",
        }
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|b| b.name()).collect()
    }

    /// Parses a `backend:` value. Unknown, roadmap and rejected names are
    /// errors that say why; nothing is ever substituted.
    pub fn from_name(s: &str) -> Result<Backend, String> {
        if let Some(b) = Self::ALL.iter().find(|b| b.name() == s) {
            return Ok(*b);
        }
        let implemented = Self::names().join(", ");
        Err(match s {
            "linux-docker" => format!(
                "`linux-docker` is not a backend: a native jail shares the host kernel, so it has no VM boundary (rejected; see docs/backends.md). Implemented: {implemented}"
            ),
            "docker-desktop" | "docker" => format!(
                "`{s}` is not a backend: Docker Desktop's VM mounts your home and its network is not Lever's (rejected; see docs/backends.md). Implemented: {implemented}"
            ),
            "apple-container" => format!(
                "`apple-container` is on the roadmap, not implemented. Implemented: {implemented}"
            ),
            _ => format!("unknown backend `{s}`. Implemented: {implemented}"),
        })
    }

    pub fn row(self) -> BackendRow {
        match self {
            Backend::Orbstack => BackendRow {
                backend: self,
                kernel: "shared",
                fs_bounded_by: "isolated machine: no host files + project tree mounted at /lever",
                egress_enforced_at: "jail netns iptables/ip6tables",
                version_fragile: "yes",
                host_alias: "host.orb.internal",
                hosts: "macOS (Apple Silicon) with OrbStack",
            },
            Backend::Lima => BackendRow {
                backend: self,
                kernel: "separate",
                fs_bounded_by: "VM: no host files + project tree mounted at /lever",
                egress_enforced_at: "jail netns iptables/ip6tables",
                version_fragile: "yes",
                host_alias: "host.lima.internal",
                hosts: "macOS (vz), Linux (QEMU/KVM); Lima >= 2.0.0",
            },
            Backend::Qemu => BackendRow {
                backend: self,
                kernel: "separate",
                fs_bounded_by: "VM: no host files + project tree shared (9p) at /lever",
                egress_enforced_at: "closed: QEMU user-net restrict=on, broker port only; open: jail netns iptables/ip6tables",
                version_fragile: "no",
                host_alias: "10.0.2.2",
                hosts: "Linux with QEMU (KVM if available, else TCG)",
            },
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
