//! The validated configuration. Values of these types exist only after
//! every rule of `lever.yaml` held: paths are resolved and confined, names
//! are valid, references between agents and tools resolve, the instance is
//! uniform in its LLM auth mode.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use super::raw::{Egress, LlmAuth, OtlpProtocol};
pub use super::values::{HttpUrl, ImageRef, Name, OpName};
pub use crate::backend::Backend;

/// The pseudo tool of LLM access: `llm` / `generate`.
pub const LLM_TOOL: &str = "llm";
pub const LLM_OP: &str = "generate";

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The config file as named on the command line.
    pub file: PathBuf,
    /// The instance root: the config file's directory (real path).
    pub root: PathBuf,
    pub name: Name,
    pub backend: Backend,
    /// The tree as written (normalized, relative to the root).
    pub tree_rel: PathBuf,
    /// The tree's real path.
    pub tree: PathBuf,
    pub scion: Option<Scion>,
    pub manager: Manager,
    pub groves: Vec<Grove>,
    pub egress: Egress,
    /// The instance's (uniform) LLM auth mode.
    pub llm_auth: LlmAuth,
    pub broker: Broker,
    pub security: Security,
}

#[derive(Debug, Clone)]
pub enum Scion {
    Version(String),
    Source(PathBuf),
}

/// What every agent has: an identity and a policy.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Agent {
    /// The capability identity (certificate CN).
    pub identity: Name,
    /// The image it runs (a grove inherits the manager's).
    pub image: Option<ImageRef>,
    /// What it may obtain, including the implicit `llm/generate` of an
    /// api-key instance.
    pub obtain: Vec<Right>,
    pub delegate: Vec<Delegation>,
}

impl Agent {
    pub fn may_obtain(&self, tool: &str, op: &str) -> bool {
        self.obtain.iter().any(|r| r.tool == tool && r.op == op)
    }

    /// The delegate entry allowing `(tool, op)` to `to`, if any.
    pub fn may_delegate(&self, tool: &str, op: &str, to: &str) -> bool {
        self.delegate.iter().any(|d| {
            d.right.tool == tool && d.right.op == op && d.to.iter().any(|t| t.as_str() == to)
        })
    }
}

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Manager {
    pub agent: Agent,
    pub prompt_file: Option<PathBuf>,
    pub credential_file: Option<PathBuf>,
    pub allow_ports: Vec<u16>,
}

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Grove {
    pub agent: Agent,
    /// Relative to the tree, normalized.
    pub dir_rel: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Right {
    pub tool: String,
    pub op: String,
}

#[derive(Debug, Clone)]
pub struct Delegation {
    pub right: Right,
    pub to: Vec<Name>,
}

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Broker {
    pub api_key_file: Option<PathBuf>,
    pub upstream: HttpUrl,
    pub upstream_ca_file: Option<PathBuf>,
    pub upstream_header_timeout: Duration,
    pub bind: IpAddr,
    pub jail_port: u16,
    pub admin_bind: IpAddr,
    pub admin_port: u16,
    pub grant_ttl: Duration,
    pub ticket_ttl: Duration,
    pub manager_identity: Name,
    pub state_dir: PathBuf,
    pub tools: Vec<Tool>,
    pub rate_limits: RateLimits,
    pub telemetry: Telemetry,
}

impl Broker {
    pub fn jail_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.jail_port)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::new(self.admin_bind, self.admin_port)
    }

    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name.as_str() == name)
    }
}

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Tool {
    pub name: Name,
    pub transport: ToolTransport,
    pub operations: Vec<Operation>,
    /// Keys pinned at mint, each to one of these values. A key listed here
    /// is required in every token for this tool.
    pub allowed_values: BTreeMap<String, BTreeSet<String>>,
    /// Longest a call may take.
    pub timeout: Duration,
}

impl Tool {
    pub fn operation(&self, name: &str) -> Option<&Operation> {
        self.operations.iter().find(|o| o.name.as_str() == name)
    }
}

#[derive(Debug, Clone)]
pub enum ToolTransport {
    /// A supervised subprocess speaking MCP streamable HTTP on `backend`;
    /// `-backend ADDR` is appended to `command`.
    Http {
        command: Vec<String>,
        backend: SocketAddr,
    },
    /// An MCP server on stdin/stdout.
    Stdio { command: Vec<String> },
}

impl ToolTransport {
    pub fn command(&self) -> &[String] {
        match self {
            ToolTransport::Http { command, .. } | ToolTransport::Stdio { command } => command,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Operation {
    pub name: OpName,
    /// Declared argument names, if any.
    pub args: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub per_minute: u32,
    pub burst: u32,
    pub max_concurrent: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct TokenBudget {
    pub tokens: u64,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RateLimits {
    pub llm: Limit,
    pub tools: Limit,
    /// Minting, delegation, renewal, provisioning and dispatch: the
    /// requests that sign something or change the state file.
    pub control: Limit,
    pub llm_tokens: Option<TokenBudget>,
}

#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Telemetry {
    pub otlp_endpoint: Option<HttpUrl>,
    pub otlp_protocol: Option<OtlpProtocol>,
    pub service_name: Option<String>,
    pub audit_file: PathBuf,
}

#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Security {
    pub allowed_image_registries: Vec<String>,
    pub require_image_digest: bool,
}

impl Config {
    /// The jail machine's name.
    pub fn machine_name(&self) -> String {
        format!("lever-{}", self.name)
    }

    /// Every agent: the manager first, then the groves in order.
    pub fn agents(&self) -> impl Iterator<Item = &Agent> {
        std::iter::once(&self.manager.agent).chain(self.groves.iter().map(|g| &g.agent))
    }

    pub fn agent(&self, identity: &str) -> Option<&Agent> {
        self.agents().find(|a| a.identity.as_str() == identity)
    }

    pub fn grove(&self, name: &str) -> Option<&Grove> {
        self.groves
            .iter()
            .find(|g| g.agent.identity.as_str() == name)
    }

    /// Every distinct image, in first-use order.
    pub fn images(&self) -> Vec<&ImageRef> {
        let mut out: Vec<&ImageRef> = Vec::new();
        for a in self.agents() {
            if let Some(i) = &a.image
                && !out.iter().any(|o| o.reference == i.reference)
            {
                out.push(i);
            }
        }
        out
    }
}

pub(crate) const DEFAULT_UPSTREAM: &str = "https://api.anthropic.com";
pub(crate) const DEFAULT_JAIL_PORT: u16 = 8443;
pub(crate) const DEFAULT_ADMIN_PORT: u16 = 8444;
pub(crate) const DEFAULT_GRANT_TTL: Duration = Duration::from_secs(24 * 3600);
pub(crate) const DEFAULT_UPSTREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(120);
pub(crate) const DEFAULT_TICKET_TTL: Duration = Duration::from_secs(10 * 60);
pub(crate) const DEFAULT_MANAGER_IDENTITY: &str = "manager";
pub(crate) const DEFAULT_STATE_DIR: &str = ".lever";
pub(crate) const DEFAULT_LLM_LIMIT: Limit = Limit {
    per_minute: 120,
    burst: 30,
    max_concurrent: 16,
};
pub(crate) const DEFAULT_TOOLS_LIMIT: Limit = Limit {
    per_minute: 600,
    burst: 60,
    max_concurrent: 32,
};
pub(crate) const DEFAULT_CONTROL_LIMIT: Limit = Limit {
    per_minute: 600,
    burst: 120,
    max_concurrent: 16,
};
